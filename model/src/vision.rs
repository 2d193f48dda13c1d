//! MiniMax-VL-01's vision side: the config, any-resolution tiling arithmetic, the CLIP vision
//! tower, the projector and the packing of an image's features (LLaVA-NeXT's structure with the
//! released model's choices: the last layer's hidden states, CLS dropped, exact-GELU projector,
//! unpadding with floor rounding and an `image_newline` column).
//!
//! An image reaches [`VisionTower::image_features`] as its crops' pixels (the base image resized
//! to the tile size, then the tiles of the best-fitting grid resolution, row-major; normalized)
//! and its original size; what comes back replaces the image's placeholder tokens in the prompt.

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use ringbolt_kernels::{AttentionShape, Backend};
use serde_json::Value;

/// `model_type`s of a VL-01 config: the released one, and the one transformers writes for the
/// same structure (LLaVA-NeXT with a MiniMax text config).
pub const VL_MODEL_TYPES: [&str; 2] = ["minimax_vl_01", "llava_next"];

/// The text of an image placeholder (the processor's `image_token`): the tokenizer encodes it
/// to `image_token_index`, and chat messages put it where an image part is.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// The vision side of a VL-01 config.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Side of a crop in pixels (336).
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
    /// The hidden states whose features are used: 0 is the embeddings after the pre-norm,
    /// `i` the output of layer `i` (the config's negative index resolved).
    pub feature_layer: usize,
    /// Grid resolutions a large image is tiled at, (height, width) in pixels.
    pub pinpoints: Vec<(usize, usize)>,
    /// The placeholder token of an image in a prompt.
    pub image_token: u32,
}

/// Where an image's packed features come from: `rows × cols` of the tiles' feature grid
/// (starting at `row0`, `col0`), each row followed by `image_newline`, after the base image's
/// tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// Tiles down and across.
    pub tiles_h: usize,
    pub tiles_w: usize,
    pub row0: usize,
    pub rows: usize,
    pub col0: usize,
    pub cols: usize,
}

impl VisionConfig {
    /// Reads the vision fields of a VL-01 `config.json` (top level and `vision_config`).
    pub fn from_json(v: &Value) -> Result<Self> {
        let vc = v
            .get("vision_config")
            .ok_or_else(|| ModelError::field("vision_config", "missing"))?;
        let num = |obj: &Value, prefix: &str, key: &str| -> Result<usize> {
            obj.get(key)
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ModelError::field(&format!("{prefix}{key}"), "a positive integer is required")
                })
        };
        let vnum = |key: &str| num(vc, "vision_config.", key);
        // A string setting (`default` when absent) that must be `want`.
        let only = |obj: &Value, prefix: &str, key: &str, default: &str, want: &str, why: &str| {
            let got = obj.get(key).and_then(Value::as_str).unwrap_or(default);
            if got == want {
                return Ok(());
            }
            Err(ModelError::field(
                &format!("{prefix}{key}"),
                format!("`{got}`: {why}"),
            ))
        };
        let tower = "the vision tower computes exact GELU (`gelu`) only";
        only(vc, "vision_config.", "hidden_act", "", "gelu", tower)?;
        let projector = "the projector computes exact GELU (`gelu`) only";
        only(v, "", "projector_hidden_act", "gelu", "gelu", projector)?;
        only(
            v,
            "",
            "vision_feature_select_strategy",
            "default",
            "default",
            "only `default` (the CLS token dropped) is supported",
        )?;
        let num_layers = vnum("num_hidden_layers")?;
        let layer = v
            .get("vision_feature_layer")
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        let feature_layer = if layer < 0 {
            num_layers as i64 + 1 + layer
        } else {
            layer
        };
        if !(0..=num_layers as i64).contains(&feature_layer) {
            return Err(ModelError::field(
                "vision_feature_layer",
                format!("{layer} is not a hidden state of a {num_layers}-layer tower"),
            ));
        }
        let image_size = vnum("image_size")?;
        let patch_size = vnum("patch_size")?;
        if !image_size.is_multiple_of(patch_size) {
            return Err(ModelError::field(
                "vision_config.patch_size",
                format!("{patch_size} does not divide image_size {image_size}"),
            ));
        }
        let pinpoints = v
            .get("image_grid_pinpoints")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| ModelError::field("image_grid_pinpoints", "a list of [height, width]"))?
            .iter()
            .map(|p| {
                let hw: Option<Vec<usize>> = p.as_array().map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                });
                match hw.as_deref() {
                    Some(&[h, w])
                        if h > 0 && w > 0 && h % image_size == 0 && w % image_size == 0 =>
                    {
                        Ok((h, w))
                    }
                    _ => Err(ModelError::field(
                        "image_grid_pinpoints",
                        format!("{p}: not [height, width] in multiples of {image_size}"),
                    )),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let image_token = v
            .get("image_token_index")
            .and_then(Value::as_u64)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ModelError::field("image_token_index", "a token id is required"))?;
        let heads = vnum("num_attention_heads")?;
        let hidden_size = vnum("hidden_size")?;
        if !hidden_size.is_multiple_of(heads) {
            return Err(ModelError::field(
                "vision_config.num_attention_heads",
                format!("{heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        Ok(VisionConfig {
            hidden_size,
            intermediate_size: vnum("intermediate_size")?,
            num_layers,
            num_heads: heads,
            image_size,
            patch_size,
            layer_norm_eps: vc
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5) as f32,
            feature_layer: feature_layer as usize,
            pinpoints,
            image_token,
        })
    }

    /// The released MiniMax-VL-01's vision side (CLIP ViT-L/14 at 336 pixels, its last layer;
    /// 28 grid resolutions up to 2016 × 1008 pixels), with placeholder token `image_token`.
    pub fn released(image_token: u32) -> Self {
        VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_layers: 24,
            num_heads: 16,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            feature_layer: 24,
            pinpoints: Self::grids(336, 6, 18),
            image_token,
        }
    }

    /// Every grid resolution of up to `side` tiles of `tile` pixels a side and `tiles` tiles in
    /// all, (height, width), in the released list's order (by height, then width).
    pub fn grids(tile: usize, side: usize, tiles: usize) -> Vec<(usize, usize)> {
        (1..=side)
            .flat_map(|a| (1..=side).map(move |b| (a, b)))
            .filter(|(a, b)| a * b <= tiles)
            .map(|(a, b)| (tile * a, tile * b))
            .collect()
    }

    /// The released `config.json` of a VL-01 model with this vision side and `text_config`.
    pub fn to_json(&self, text_config: Value) -> Value {
        serde_json::json!({
            "architectures": ["MiniMaxVL01ForConditionalGeneration"],
            "model_type": "minimax_vl_01",
            "image_token_index": self.image_token,
            "image_grid_pinpoints": self.pinpoints.iter().map(|&(h, w)| [h, w]).collect::<Vec<_>>(),
            "vision_feature_layer": self.feature_layer as i64 - self.num_layers as i64 - 1,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
            "tie_word_embeddings": false,
            "text_config": text_config,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_act": "gelu",
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "layer_norm_eps": self.layer_norm_eps,
                "num_channels": 3,
            },
        })
    }

    /// Patches along a crop's side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Features one crop gives (its patches; the CLS token is dropped).
    pub fn tokens_per_crop(&self) -> usize {
        self.grid() * self.grid()
    }

    /// The grid resolution (height, width) an image of `h × w` pixels is tiled at: the one
    /// that keeps the most of the image's resolution once fitted inside, then wastes the least
    /// (LLaVA-NeXT's `select_best_resolution`, in its floating-point arithmetic).
    pub fn best_resolution(&self, h: usize, w: usize) -> (usize, usize) {
        let (mut best, mut max_eff, mut min_waste) = (self.pinpoints[0], 0u64, u64::MAX);
        for &(th, tw) in &self.pinpoints {
            let scale = (tw as f64 / w as f64).min(th as f64 / h as f64);
            let (dw, dh) = ((w as f64 * scale) as u64, (h as f64 * scale) as u64);
            let eff = (dw * dh).min((w * h) as u64);
            let waste = (th * tw) as u64 - eff;
            if eff > max_eff || (eff == max_eff && waste < min_waste) {
                (best, max_eff, min_waste) = ((th, tw), eff, waste);
            }
        }
        best
    }

    /// Crops an image of `h × w` pixels is cut into: the base image and the tiles.
    pub fn crops(&self, h: usize, w: usize) -> usize {
        let (bh, bw) = self.best_resolution(h, w);
        1 + (bh / self.image_size) * (bw / self.image_size)
    }

    /// How an `h × w` image's tile features are unpadded: the grid rows (or columns) the
    /// resized image covers, with floor rounding as the released model computes it.
    pub fn packing(&self, h: usize, w: usize) -> Packing {
        let (bh, bw) = self.best_resolution(h, w);
        let (tiles_h, tiles_w) = (bh / self.image_size, bw / self.image_size);
        let (ch, cw) = (tiles_h * self.grid(), tiles_w * self.grid());
        if w * ch > cw * h {
            // Wider than the grid: full width, the rows the image covers.
            let nh = h * cw / w;
            let pad = (ch - nh) / 2;
            Packing {
                tiles_h,
                tiles_w,
                row0: pad,
                rows: ch - 2 * pad,
                col0: 0,
                cols: cw,
            }
        } else {
            let nw = w * ch / h;
            let pad = (cw - nw) / 2;
            Packing {
                tiles_h,
                tiles_w,
                row0: 0,
                rows: ch,
                col0: pad,
                cols: cw - 2 * pad,
            }
        }
    }

    /// Features (and so placeholder tokens) of an `h × w` image: the base crop's, then each
    /// kept row of the tiles' grid and its newline.
    pub fn feature_count(&self, h: usize, w: usize) -> usize {
        let p = self.packing(h, w);
        self.tokens_per_crop() + p.rows * (p.cols + 1)
    }

    /// Whether a prompt holding `placeholders` image tokens can take `images` images: one
    /// placeholder per image (a prompt without images keeps its image tokens as tokens).
    pub fn check_placeholders(&self, placeholders: usize, images: usize) -> Result<()> {
        if images == 0 || placeholders == images {
            return Ok(());
        }
        Err(ModelError::Invalid(format!(
            "the prompt holds {placeholders} image placeholder(s) (token {}) for {images} \
             image(s): give one per image, in order",
            self.image_token
        )))
    }
}

/// Crops one pass of the vision tower takes.
const CROPS_PER_PASS: usize = 4;

/// A linear layer with a bias.
struct Linear<B: Backend> {
    w: B::Weight,
    b: B::Buf,
}

impl<B: Backend> Linear<B> {
    fn load(ckpt: &Checkpoint, backend: &B, name: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Linear {
            w: backend.upload_weight_owned(
                ckpt.load(&format!("{name}.weight"), &[out, inp])?,
                out,
                inp,
            ),
            b: backend.upload(&ckpt.load(&format!("{name}.bias"), &[out])?),
        })
    }

    fn forward(&self, b: &B, x: &B::Buf, rows: usize, inp: usize, out: usize) -> B::Buf {
        let mut y = b.linear(x, &self.w, rows, inp, out);
        b.add_bias(&mut y, &self.b);
        y
    }
}

/// A LayerNorm's weight and bias.
struct Norm<B: Backend> {
    g: B::Buf,
    b: B::Buf,
}

impl<B: Backend> Norm<B> {
    fn load(ckpt: &Checkpoint, backend: &B, name: &str, width: usize) -> Result<Self> {
        Ok(Norm {
            g: backend.upload(&ckpt.load(&format!("{name}.weight"), &[width])?),
            b: backend.upload(&ckpt.load(&format!("{name}.bias"), &[width])?),
        })
    }
}

struct EncoderLayer<B: Backend> {
    norm1: Norm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    norm2: Norm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The CLIP vision tower (up to the layer whose features are used), the projector into the
/// text model's hidden size, and `image_newline`.
pub struct VisionTower<B: Backend> {
    cfg: VisionConfig,
    text_hidden: usize,
    /// The patch embedding as a linear layer over flattened patches (`[D, 3·p·p]`, no bias).
    patch: B::Weight,
    /// `class_embedding` (`[D]`) and `position_embedding` (`[1 + g², D]`), on the host.
    class: Vec<f32>,
    position: Vec<f32>,
    pre_norm: Norm<B>,
    layers: Vec<EncoderLayer<B>>,
    proj1: Linear<B>,
    proj2: Linear<B>,
    newline: Vec<f32>,
}

impl<B: Backend> VisionTower<B> {
    /// Loads the vision tower and projector of a VL-01 checkpoint (None for a text model).
    pub fn load(ckpt: &Checkpoint, backend: &B) -> Result<Option<Self>> {
        let Some(cfg) = ckpt.vision().cloned() else {
            return Ok(None);
        };
        let text_hidden = ckpt.config().hidden_size;
        // The released checkpoint nests the tower under `vision_model.`; transformers 5 writes
        // it without.
        let root = if ckpt.has("vision_tower.vision_model.pre_layrnorm.weight") {
            "vision_tower.vision_model"
        } else {
            "vision_tower"
        };
        let (d, p, g) = (cfg.hidden_size, cfg.patch_size, cfg.grid());
        let patch = backend.upload_weight_owned(
            ckpt.load(
                &format!("{root}.embeddings.patch_embedding.weight"),
                &[d, 3, p, p],
            )?,
            d,
            3 * p * p,
        );
        let class = ckpt.load(&format!("{root}.embeddings.class_embedding"), &[d])?;
        let position = ckpt.load(
            &format!("{root}.embeddings.position_embedding.weight"),
            &[1 + g * g, d],
        )?;
        let pre_norm = Norm::load(ckpt, backend, &format!("{root}.pre_layrnorm"), d)?;
        let i = cfg.intermediate_size;
        let layers = (0..cfg.feature_layer)
            .map(|l| {
                let n = format!("{root}.encoder.layers.{l}");
                Ok(EncoderLayer {
                    norm1: Norm::load(ckpt, backend, &format!("{n}.layer_norm1"), d)?,
                    q: Linear::load(ckpt, backend, &format!("{n}.self_attn.q_proj"), d, d)?,
                    k: Linear::load(ckpt, backend, &format!("{n}.self_attn.k_proj"), d, d)?,
                    v: Linear::load(ckpt, backend, &format!("{n}.self_attn.v_proj"), d, d)?,
                    out: Linear::load(ckpt, backend, &format!("{n}.self_attn.out_proj"), d, d)?,
                    norm2: Norm::load(ckpt, backend, &format!("{n}.layer_norm2"), d)?,
                    fc1: Linear::load(ckpt, backend, &format!("{n}.mlp.fc1"), i, d)?,
                    fc2: Linear::load(ckpt, backend, &format!("{n}.mlp.fc2"), d, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let th = text_hidden;
        Ok(Some(VisionTower {
            proj1: Linear::load(ckpt, backend, "multi_modal_projector.linear_1", th, d)?,
            proj2: Linear::load(ckpt, backend, "multi_modal_projector.linear_2", th, th)?,
            newline: ckpt.load("image_newline", &[th])?,
            cfg,
            text_hidden,
            patch,
            class,
            position,
            pre_norm,
            layers,
        }))
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Projected features of `n` crops (`pixels`: `[n, 3, S, S]`, normalized): `[n, g², H]`
    /// (the text model's hidden size), on the host. The crops go through the tower a few at a
    /// time, so that its activations stay small (a 2016 × 1008 image has 19 crops: 11k rows).
    pub fn crop_features(&self, b: &B, pixels: &[f32], n: usize) -> Result<Vec<f32>> {
        let s = self.cfg.image_size;
        if pixels.len() != n * 3 * s * s {
            return Err(ModelError::Invalid(format!(
                "{} pixel values are not {n} crops of 3 × {s} × {s}",
                pixels.len()
            )));
        }
        let mut out = Vec::with_capacity(n * self.cfg.tokens_per_crop() * self.text_hidden);
        for part in pixels.chunks(CROPS_PER_PASS * 3 * s * s) {
            out.extend(self.crops_through(b, part, part.len() / (3 * s * s)));
        }
        Ok(out)
    }

    /// [`crop_features`](Self::crop_features) of crops whose pixels were checked.
    fn crops_through(&self, b: &B, pixels: &[f32], n: usize) -> Vec<f32> {
        let (s, p, g, d) = (
            self.cfg.image_size,
            self.cfg.patch_size,
            self.cfg.grid(),
            self.cfg.hidden_size,
        );
        // Patches flattened as the convolution's weight is ([channel, row, column]), row-major
        // over the grid.
        let k = 3 * p * p;
        let mut patches = vec![0f32; n * g * g * k];
        for (c, crop) in pixels.chunks(3 * s * s).enumerate() {
            for (t, dst) in patches[c * g * g * k..][..g * g * k]
                .chunks_mut(k)
                .enumerate()
            {
                let (pr, pc) = (t / g, t % g);
                for ch in 0..3 {
                    for y in 0..p {
                        let src = &crop[ch * s * s + (pr * p + y) * s + pc * p..][..p];
                        dst[(ch * p + y) * p..][..p].copy_from_slice(src);
                    }
                }
            }
        }
        let emb = b
            .host_view(&b.linear(&b.upload_owned(patches), &self.patch, n * g * g, k, d))
            .into_owned();
        // [CLS; patches] + positions, per crop.
        let t = 1 + g * g;
        let mut x = vec![0f32; n * t * d];
        for c in 0..n {
            let crop = &mut x[c * t * d..][..t * d];
            crop[..d].copy_from_slice(&self.class);
            crop[d..].copy_from_slice(&emb[c * g * g * d..][..g * g * d]);
            crop.iter_mut()
                .zip(&self.position)
                .for_each(|(a, p)| *a += p);
        }
        let eps = self.cfg.layer_norm_eps;
        let rows = n * t;
        let mut h = b.layer_norm(
            &b.upload_owned(x),
            &self.pre_norm.g,
            &self.pre_norm.b,
            d,
            eps,
        );
        let heads = self.cfg.num_heads;
        let shape = AttentionShape {
            heads,
            kv_heads: heads,
            head_dim: d / heads,
        };
        for layer in &self.layers {
            let a = b.layer_norm(&h, &layer.norm1.g, &layer.norm1.b, d, eps);
            let q = layer.q.forward(b, &a, rows, d, d);
            let k = layer.k.forward(b, &a, rows, d, d);
            let v = layer.v.forward(b, &a, rows, d, d);
            // Each crop attends to itself, without a mask: queries placed after every key.
            let parts: Vec<B::Buf> = (0..n)
                .map(|c| {
                    let (qc, kc, vc) = (
                        b.rows(&q, c * t, t, d),
                        b.rows(&k, c * t, t, d),
                        b.rows(&v, c * t, t, d),
                    );
                    b.attention_partial(&qc, t, t, &kc, &vc, t, 0, shape).0
                })
                .collect();
            let o = layer.out.forward(b, &b.concat_rows(&parts), rows, d, d);
            h = b.axpby(1.0, &h, 1.0, &o);
            let m = b.layer_norm(&h, &layer.norm2.g, &layer.norm2.b, d, eps);
            let mut f = layer
                .fc1
                .forward(b, &m, rows, d, self.cfg.intermediate_size);
            b.gelu_inplace(&mut f);
            let f = layer
                .fc2
                .forward(b, &f, rows, self.cfg.intermediate_size, d);
            h = b.axpby(1.0, &h, 1.0, &f);
        }
        // The CLS token of each crop dropped, then the projector.
        let ids: Vec<u32> = (0..n)
            .flat_map(|c| (1..t).map(move |i| (c * t + i) as u32))
            .collect();
        let sel = b.gather_rows(&h, &ids, d);
        let th = self.text_hidden;
        let mut y = self.proj1.forward(b, &sel, n * g * g, d, th);
        b.gelu_inplace(&mut y);
        let y = self.proj2.forward(b, &y, n * g * g, th, th);
        b.host_view(&y).into_owned()
    }

    /// The features an image of `size` (height, width) pixels puts in place of its
    /// placeholders (`[feature_count, H]`), from its crops' pixels (`[crops, 3, S, S]`).
    pub fn image_features(&self, b: &B, pixels: &[f32], size: (usize, usize)) -> Result<Vec<f32>> {
        let (h, w) = size;
        if h == 0 || w == 0 {
            return Err(ModelError::Invalid(format!("an image of {h} × {w} pixels")));
        }
        let n = self.cfg.crops(h, w);
        let f = self.crop_features(b, pixels, n)?;
        Ok(self.pack(&f, size))
    }

    /// LLaVA-NeXT's packing of one image's crop features (`[crops, g², H]`): the base crop's
    /// tokens, then the kept rows of the tiles' feature grid, each followed by `image_newline`.
    pub fn pack(&self, f: &[f32], (h, w): (usize, usize)) -> Vec<f32> {
        let (g, th) = (self.cfg.grid(), self.text_hidden);
        let p = self.cfg.packing(h, w);
        let per_crop = g * g * th;
        let mut out = Vec::with_capacity(self.cfg.feature_count(h, w) * th);
        out.extend_from_slice(&f[..per_crop]);
        for r in p.row0..p.row0 + p.rows {
            for c in p.col0..p.col0 + p.cols {
                let crop = 1 + (r / g) * p.tiles_w + c / g;
                let tok = (r % g) * g + c % g;
                out.extend_from_slice(&f[crop * per_crop + tok * th..][..th]);
            }
            out.extend_from_slice(&self.newline);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VL config with a field the engine does not compute is refused, naming the field.
    #[test]
    fn unsupported_vision_settings_are_refused_by_name() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/reference/vl/checkpoint/config.json"
        ))
        .unwrap();
        let good: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(VisionConfig::from_json(&good).unwrap().feature_layer, 3);
        let refused = |edit: &dyn Fn(&mut Value), field: &str| {
            let mut v = good.clone();
            edit(&mut v);
            let e = VisionConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        };
        refused(
            &|v| v["vision_config"]["hidden_act"] = "quick_gelu".into(),
            "vision_config.hidden_act",
        );
        refused(
            &|v| v["projector_hidden_act"] = "relu".into(),
            "projector_hidden_act",
        );
        refused(
            &|v| v["vision_feature_select_strategy"] = "full".into(),
            "vision_feature_select_strategy",
        );
        refused(
            &|v| v["vision_feature_layer"] = (-5).into(),
            "vision_feature_layer",
        );
        refused(
            &|v| v["image_grid_pinpoints"] = serde_json::json!([[28, 30]]),
            "image_grid_pinpoints",
        );
        refused(
            &|v| v["vision_config"]["patch_size"] = 5.into(),
            "vision_config.patch_size",
        );
        refused(
            &|v| {
                v.as_object_mut().unwrap().remove("image_token_index");
            },
            "image_token_index",
        );
    }

    /// Placeholder counts of the released processor for images of these (height, width), as
    /// its `get_num_token` computes them (576 + rows · (cols + 1)).
    #[test]
    fn feature_counts_follow_the_released_processor() {
        let c = VisionConfig::released(200025);
        assert_eq!(c.pinpoints.len(), 28);
        for ((h, w), want) in [
            ((336, 336), 1176),
            ((480, 640), 2340),
            ((640, 480), 2352),
            ((1080, 1920), 9864),
            ((1920, 1080), 9920),
            ((1000, 1000), 5832),
            ((100, 2000), 1736),
            ((3000, 4000), 7560),
            ((50, 1000), 868),
        ] {
            assert_eq!(c.feature_count(h, w), want, "{h} × {w}");
        }
    }
}
