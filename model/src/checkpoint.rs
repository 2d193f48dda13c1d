//! Hugging Face checkpoints: `config.json` plus safetensors, single file or sharded with
//! `model.safetensors.index.json`. Shards are memory-mapped when first needed, and only the
//! tensors a caller asks for are read (a worker owns a subset).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

struct Shard {
    path: PathBuf,
    opened: OnceLock<std::result::Result<Arc<ShardData>, String>>,
}

struct ShardData {
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    /// A MiniMax-VL-01 checkpoint's vision tower, projector and image settings.
    vision: Option<crate::vision::VisionConfig>,
    shards: Vec<Shard>,
    /// Tensor name → shard index, from the index file (or the single file's header).
    locations: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.locations.len())
            .finish()
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                msg: "not a directory".into(),
            });
        }
        let (config, vision) = read_config(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut locations = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index_path.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    path: index_path.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Checkpoint {
                    path: index_path.clone(),
                    msg: format!("weight_map entry for `{name}` is not a file name"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ModelError::Checkpoint {
                        path: index_path.clone(),
                        msg: format!(
                            "weight_map entry for `{name}` points outside the directory: {file}"
                        ),
                    });
                }
                let idx = *by_file.entry(file.to_string()).or_insert_with(|| {
                    shards.push(Shard {
                        path: dir.join(file),
                        opened: OnceLock::new(),
                    });
                    shards.len() - 1
                });
                locations.insert(name.clone(), idx);
            }
        } else {
            let single = dir.join(SINGLE_FILE);
            let path = if single.exists() {
                single
            } else {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|source| ModelError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                if found.len() != 1 {
                    return Err(ModelError::Checkpoint {
                        path: dir.to_path_buf(),
                        msg: format!(
                            "no {INDEX_FILE} and {} .safetensors files (expected {SINGLE_FILE} or an index)",
                            found.len()
                        ),
                    });
                }
                found.pop().unwrap_or_default()
            };
            shards.push(Shard {
                path,
                opened: OnceLock::new(),
            });
            let data = open_shard(&shards[0]).map_err(|msg| ModelError::Checkpoint {
                path: shards[0].path.clone(),
                msg,
            })?;
            for name in data.meta.tensors().keys() {
                locations.insert(name.clone(), 0);
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            vision,
            shards,
            locations,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The vision side of a MiniMax-VL-01 checkpoint (None for a text model).
    pub fn vision(&self) -> Option<&crate::vision::VisionConfig> {
        self.vision.as_ref()
    }

    /// Where tensor `name` is: a VL-01 checkpoint keeps the text model's tensors under
    /// `language_model.` (`language_model.model.layers.…`, `language_model.lm_head.weight`), so
    /// a text name not found as is is looked for there.
    fn locate<'a>(&self, name: &'a str) -> Option<(usize, std::borrow::Cow<'a, str>)> {
        if let Some(&i) = self.locations.get(name) {
            return Some((i, name.into()));
        }
        self.vision.as_ref()?;
        let prefixed = format!("{TEXT_PREFIX}{name}");
        let &i = self.locations.get(&prefixed)?;
        Some((i, prefixed.into()))
    }

    /// Identifies the weights this checkpoint holds as files: each weight file's name, size,
    /// modification time, inode and change time (which no copy preserves: a rewritten or
    /// replaced file gets another), and the config.
    pub fn fingerprint(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(format!("{:?}", self.config).as_bytes());
        for s in &self.shards {
            h.update(s.path.to_string_lossy().as_bytes());
            if let Ok(m) = std::fs::metadata(&s.path) {
                h.update(&m.len().to_le_bytes());
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                h.update(&t.to_le_bytes());
                use std::os::unix::fs::MetadataExt;
                h.update(&m.ino().to_le_bytes());
                h.update(&m.ctime().to_le_bytes());
                h.update(&m.ctime_nsec().to_le_bytes());
            }
        }
        h.digest()
    }

    pub fn has(&self, name: &str) -> bool {
        self.locate(name).is_some()
    }

    /// The on-disk dtype of tensor `name` as safetensors names it (`F32`, `BF16`, `F16`, ...);
    /// None when absent or unreadable.
    pub fn dtype(&self, name: &str) -> Option<String> {
        let (i, name) = self.locate(name)?;
        let data = open_shard(&self.shards[i]).ok()?;
        Some(format!("{:?}", data.meta.info(&name)?.dtype))
    }

    /// Reads tensor `name`, checks its shape, and converts it to f32.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.load_into(name, shape, &mut out)?;
        Ok(out)
    }

    /// [`load`](Self::load) appending to `out` (no temporary copy: fused matrices are read
    /// straight into place).
    pub fn load_into(&self, name: &str, shape: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let at = out.len();
        out.resize(at + shape.iter().product::<usize>(), 0.0);
        let read = self.read_into(name, shape, &mut out[at..]);
        if read.is_err() {
            out.truncate(at);
        }
        read
    }

    /// [`load`](Self::load) into `dst`, which holds exactly the tensor's values.
    pub fn read_into(&self, name: &str, shape: &[usize], dst: &mut [f32]) -> Result<()> {
        let (idx, located) = self.locate(name).ok_or_else(|| {
            let where_ = if self.shards.len() == 1 && !self.dir.join(INDEX_FILE).exists() {
                self.shards[0].path.clone()
            } else {
                self.dir.join(INDEX_FILE)
            };
            ModelError::Tensor {
                tensor: name.to_string(),
                file: where_,
                msg: "missing from the checkpoint".into(),
            }
        })?;
        let shard = &self.shards[idx];
        let err = |msg: String| ModelError::Tensor {
            tensor: located.to_string(),
            file: shard.path.clone(),
            msg,
        };
        let data = open_shard(shard).map_err(err)?;
        let info = data
            .meta
            .info(&located)
            .ok_or_else(|| err("listed in the index but not in this file".into()))?;
        if info.shape != shape {
            return Err(err(format!("shape {:?}, expected {:?}", info.shape, shape)));
        }
        let n: usize = shape.iter().product();
        let (b, e) = info.data_offsets;
        let start = 8 + data.header_len;
        let bytes = data
            .mmap
            .get(start + b..start + e)
            .ok_or_else(|| err("data lies beyond the end of the file".into()))?;
        assert_eq!(
            dst.len(),
            n,
            "read_into: the destination is not the tensor's size"
        );
        convert(bytes, info.dtype, dst)
            .and_then(|()| match dst.par_iter().position_any(|x| !x.is_finite()) {
                Some(i) => Err(format!("non-finite value at element {i}")),
                None => Ok(()),
            })
            .map_err(err)
    }
}

/// Where a VL-01 checkpoint keeps the text model's tensors.
pub const TEXT_PREFIX: &str = "language_model.";

/// The text model's config and, for MiniMax-VL-01 (`model_type` `minimax_vl_01`, or
/// `llava_next` as transformers writes the same structure), the vision side; the text config
/// of a VL-01 checkpoint is its `text_config`, in either dialect.
fn read_config(path: &Path) -> Result<(ModelConfig, Option<crate::vision::VisionConfig>)> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let in_file = |e: ModelError| match e {
        ModelError::ConfigField { .. } => ModelError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        },
        other => other,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    if !crate::vision::VL_MODEL_TYPES.contains(&model_type) {
        return Ok((ModelConfig::from_json(&v).map_err(in_file)?, None));
    }
    let text_cfg = v.get("text_config").ok_or_else(|| {
        in_file(ModelError::field(
            "text_config",
            format!("a `{model_type}` config needs the text model's config"),
        ))
    })?;
    let config = ModelConfig::from_json(text_cfg).map_err(|e| {
        in_file(match e {
            ModelError::ConfigField { field, msg } => ModelError::ConfigField {
                field: format!("text_config.{field}"),
                msg,
            },
            other => other,
        })
    })?;
    let vision = crate::vision::VisionConfig::from_json(&v).map_err(in_file)?;
    Ok((config, Some(vision)))
}

fn open_shard(shard: &Shard) -> std::result::Result<Arc<ShardData>, String> {
    shard
        .opened
        .get_or_init(|| {
            let file = std::fs::File::open(&shard.path).map_err(|e| format!("cannot open: {e}"))?;
            // SAFETY: the checkpoint is read-only input; a file changed underneath a running
            // process is outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot mmap: {e}"))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| format!("corrupt safetensors file: {e}"))?;
            Ok(Arc::new(ShardData {
                mmap,
                header_len,
                meta,
            }))
        })
        .clone()
}

fn convert(bytes: &[u8], dtype: Dtype, out: &mut [f32]) -> std::result::Result<(), String> {
    let n = out.len();
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => return Err(format!("dtype {other:?} is not supported (f32, bf16, f16)")),
    };
    if bytes.len() != n * width {
        return Err(format!(
            "{} bytes of data for {n} {dtype:?} values",
            bytes.len()
        ));
    }
    const CH: usize = 1 << 16;
    out.par_chunks_mut(CH)
        .zip(bytes.par_chunks(CH * width))
        .for_each(|(o, b)| match dtype {
            Dtype::F32 => o
                .iter_mut()
                .zip(b.chunks_exact(4))
                .for_each(|(x, c)| *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::BF16 => o
                .iter_mut()
                .zip(b.chunks_exact(2))
                .for_each(|(x, c)| *x = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            _ => o
                .iter_mut()
                .zip(b.chunks_exact(2))
                .for_each(|(x, c)| *x = f16::from_le_bytes([c[0], c[1]]).to_f32()),
        });
    Ok(())
}
