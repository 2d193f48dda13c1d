//! Writes random Hugging Face-format checkpoints (`ringbolt init-checkpoint`).

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{Init, TensorSpec, tensor_specs};
use half::bf16;
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// On-disk dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl WeightDtype {
    fn safetensors(self) -> Dtype {
        match self {
            WeightDtype::F32 => Dtype::F32,
            WeightDtype::Bf16 => Dtype::BF16,
        }
    }
    fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 => 2,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
        }
    }
}

/// Built-in model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few hundred thousand parameters: unit tests.
    Tiny,
    /// About 145M parameters: a laptop runs 4K tokens in seconds.
    Small,
    /// `Tiny` with a small vision tower: MiniMax-VL-01's layout (56-pixel crops of 4 × 4
    /// patches, grids of up to 6 crops).
    VlTiny,
}

impl Preset {
    pub fn config(self) -> ModelConfig {
        let mut c = match self {
            Preset::Tiny | Preset::VlTiny => {
                ModelConfig::text01_shape(512, 64, 128, 8, 4, 2, 16, 8, 4)
            }
            Preset::Small => ModelConfig::text01_shape(32_000, 512, 1024, 8, 8, 2, 64, 32, 8),
        };
        c.dialect = crate::config::Dialect::Transformers;
        (c.block_size, c.max_position_embeddings) = match self {
            Preset::Tiny | Preset::VlTiny => (16, 65_536),
            Preset::Small => (256, 1_048_576),
        };
        c
    }
}

impl Preset {
    /// The vision side of a VL preset.
    pub fn vision(self) -> Option<crate::vision::VisionConfig> {
        let c = self.config();
        (self == Preset::VlTiny).then(|| crate::vision::VisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            image_size: 56,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            feature_layer: 2,
            pinpoints: crate::vision::VisionConfig::grids(56, 6, 6),
            image_token: c.vocab_size as u32 - 1,
        })
    }
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: each tensor's values depend only on
    // (seed, name), not on sharding or order.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn fill(spec: &TensorSpec, seed: u64, std_scale: f32) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Normal(std) => {
            let std = std * std_scale;
            // Chunks with their own streams so large tensors fill in parallel.
            const CH: usize = 1 << 16;
            let base = tensor_seed(seed, &spec.name);
            let dist = Normal::new(0.0f32, std).unwrap_or_else(|_| unreachable!("std is positive"));
            let mut out = vec![0f32; n];
            out.par_chunks_mut(CH).enumerate().for_each(|(c, o)| {
                let mut rng = StdRng::seed_from_u64(base.wrapping_add(c as u64));
                o.iter_mut().for_each(|x| *x = dist.sample(&mut rng));
            });
            out
        }
    }
}

fn encode(values: &[f32], dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDtype::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Writes `cfg` with random weights to `out`: `config.json` and either `model.safetensors`
/// or shards of at most `max_shard_bytes` (a single tensor larger than that gets its own
/// shard) with `model.safetensors.index.json`. Returns the number of shard files.
pub fn write_random_checkpoint(
    cfg: &ModelConfig,
    seed: u64,
    dtype: WeightDtype,
    out: &Path,
    max_shard_bytes: Option<u64>,
) -> Result<usize> {
    write_random_checkpoint_scaled(cfg, seed, dtype, out, max_shard_bytes, 1.0)
}

/// [`write_random_checkpoint`] with the random weights' standard deviation (0.02) multiplied
/// by `std_scale`: tests use larger weights so that every part of the model moves the logits.
pub fn write_random_checkpoint_scaled(
    cfg: &ModelConfig,
    seed: u64,
    dtype: WeightDtype,
    out: &Path,
    max_shard_bytes: Option<u64>,
    std_scale: f32,
) -> Result<usize> {
    write_checkpoint(
        cfg.to_transformers_json(),
        tensor_specs(cfg),
        seed,
        dtype,
        out,
        max_shard_bytes,
        std_scale,
    )
}

/// A random MiniMax-VL-01 checkpoint in the released layout: `model_type` `minimax_vl_01`,
/// the text model's config as `text_config` and its tensors under `language_model.`, the
/// vision tower under `vision_tower.vision_model.`, the projector and `image_newline`.
pub fn write_random_vl_checkpoint(
    cfg: &ModelConfig,
    vision: &crate::vision::VisionConfig,
    seed: u64,
    dtype: WeightDtype,
    out: &Path,
    max_shard_bytes: Option<u64>,
) -> Result<usize> {
    let mut specs = tensor_specs(cfg);
    for s in &mut specs {
        s.name = format!("{}{}", crate::checkpoint::TEXT_PREFIX, s.name);
    }
    specs.extend(crate::weights::vision_specs(vision, cfg.hidden_size));
    let config = vision.to_json(cfg.to_transformers_json());
    write_checkpoint(config, specs, seed, dtype, out, max_shard_bytes, 1.0)
}

fn write_checkpoint(
    mut config: serde_json::Value,
    specs: Vec<TensorSpec>,
    seed: u64,
    dtype: WeightDtype,
    out: &Path,
    max_shard_bytes: Option<u64>,
    std_scale: f32,
) -> Result<usize> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    config["torch_dtype"] = json!(dtype.torch_name());
    config["dtype"] = json!(dtype.torch_name());
    let cfg_path = out.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config).unwrap_or_default() + "\n",
    )
    .map_err(io(&cfg_path))?;
    // Group tensors into shards by size, in checkpoint order.
    let limit = max_shard_bytes.unwrap_or(u64::MAX);
    let mut shards: Vec<Vec<&TensorSpec>> = vec![vec![]];
    let mut size = 0u64;
    for s in &specs {
        let bytes = (s.shape.iter().product::<usize>() * dtype.bytes()) as u64;
        if size > 0 && size + bytes > limit {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap_or_else(|| unreachable!()).push(s);
        size += bytes;
    }
    let n = shards.len();
    let sharded = max_shard_bytes.is_some() && n > 1;
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, group) in shards.iter().enumerate() {
        let file = if sharded {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        } else {
            SINGLE_FILE.to_string()
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = group
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.shape.clone(),
                    encode(&fill(s, seed, std_scale), dtype),
                )
            })
            .collect();
        let views = data
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::Tensor {
                        tensor: name.clone(),
                        file: out.join(&file),
                        msg: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = out.join(&file);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
            ModelError::Checkpoint {
                path: path.clone(),
                msg: e.to_string(),
            }
        })?;
        for (name, _, bytes) in &data {
            weight_map.insert(name.clone(), file.clone());
            total += bytes.len() as u64;
        }
    }
    let index_path = out.join(INDEX_FILE);
    if sharded {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            &index_path,
            serde_json::to_string_pretty(&index).unwrap_or_default() + "\n",
        )
        .map_err(io(&index_path))?;
    } else if index_path.exists() {
        std::fs::remove_file(&index_path).map_err(io(&index_path))?;
    }
    Ok(n)
}
