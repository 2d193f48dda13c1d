//! `config.json` in both dialects: the original MiniMax-Text-01 one (`attn_type_list`,
//! `layernorm_*_alpha/beta`, `postnorm`, `rotary_dim`, `rope_theta`, `block`) and the
//! transformers one (`model_type: "minimax"`, `layer_types`, `*_alpha_factor`,
//! `rope_parameters`, `head_dim`, `block_size`).

use crate::error::{ModelError, Result};
use serde_json::{Map, Value, json};
use std::path::Path;

/// The mixer of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Lightning (linear) attention.
    Lightning,
    /// Softmax attention (GQA, RoPE, KV cache).
    Softmax,
}

/// Which `config.json` dialect a config was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The original remote-code config (`MiniMaxText01Config`).
    Original,
    /// transformers' in-tree `MiniMaxConfig` (`model_type: "minimax"`).
    Transformers,
}

/// A validated model configuration, dialect-independent.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub dialect: Dialect,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f32,
    pub num_experts: usize,
    pub experts_per_tok: usize,
    pub layers: Vec<LayerKind>,
    pub lightning_alpha: f32,
    pub lightning_beta: f32,
    pub softmax_alpha: f32,
    pub softmax_beta: f32,
    pub mlp_alpha: f32,
    pub mlp_beta: f32,
    pub postnorm: bool,
    pub block_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
}

/// Epsilon of the lightning output norm (constructed without an eps argument in the
/// reference, so torch's default for it).
pub const LIGHTNING_NORM_EPS: f32 = 1e-6;

struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, f: &str) -> Option<&'a Value> {
        self.obj.get(f).filter(|v| !v.is_null())
    }
    fn usize(&self, f: &str) -> Result<Option<usize>> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                ModelError::field(f, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }
    fn req_usize(&self, f: &str) -> Result<usize> {
        self.usize(f)?
            .ok_or_else(|| ModelError::field(f, "missing"))
    }
    fn f64(&self, f: &str) -> Result<Option<f64>> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ModelError::field(f, format!("expected a number, got {v}"))),
        }
    }
    fn bool(&self, f: &str) -> Result<Option<bool>> {
        match self.get(f) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ModelError::field(f, format!("expected true or false, got {v}"))),
        }
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::ConfigField { .. } => ModelError::Config {
                path: path.to_path_buf(),
                msg: e.to_string(),
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::field("(document)", format!("not valid JSON: {e}")))?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| ModelError::field("(document)", "expected a JSON object"))?;
        let f = Fields { obj };
        let model_type = f.get("model_type").and_then(Value::as_str).unwrap_or("");
        let dialect = if model_type == "minimax" || f.get("layer_types").is_some() {
            Dialect::Transformers
        } else if f.get("attn_type_list").is_some()
            || f.get("decoder_attention_types").is_some()
            || model_type.eq_ignore_ascii_case("minimaxtext01")
            || model_type == "minimax_text_01"
        {
            Dialect::Original
        } else {
            return Err(ModelError::field(
                "model_type",
                format!(
                    "`{model_type}` with neither `layer_types` nor `attn_type_list`: not a MiniMax-01 config"
                ),
            ));
        };

        if let Some(act) = f.get("hidden_act")
            && act.as_str() != Some("silu")
        {
            return Err(ModelError::field(
                "hidden_act",
                format!("only \"silu\" is supported, got {act}"),
            ));
        }
        let shared_experts = match f.get("shared_intermediate_size") {
            None => false,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_u64() != Some(0)),
            Some(x) => x.as_u64() != Some(0),
        };
        if shared_experts {
            return Err(ModelError::field(
                "shared_intermediate_size",
                "shared experts are not supported (MiniMax-Text-01 has none)",
            ));
        }

        let vocab_size = f.req_usize("vocab_size")?;
        let hidden_size = f.req_usize("hidden_size")?;
        let intermediate_size = f.req_usize("intermediate_size")?;
        let num_layers = f.req_usize("num_hidden_layers")?;
        let num_heads = f.req_usize("num_attention_heads")?;
        let num_kv_heads = f.usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(ModelError::field(
                        "head_dim",
                        "missing, and hidden_size is not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_heads
            }
        };
        let rotary_dim = f.usize("rotary_dim")?.unwrap_or(head_dim);
        let num_experts = f.usize("num_local_experts")?.unwrap_or(8);
        let experts_per_tok = f.usize("num_experts_per_tok")?.unwrap_or(2);
        let rms_norm_eps = f.f64("rms_norm_eps")?.unwrap_or(1e-5) as f32;
        let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(4096 * 32);
        let tie_word_embeddings = f.bool("tie_word_embeddings")?.unwrap_or(false);
        let eos_token_ids = match f.get("eos_token_id") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ModelError::field("eos_token_id", "expected integers"))?,
            Some(x) => vec![x.as_u64().ok_or_else(|| {
                ModelError::field("eos_token_id", format!("expected an integer, got {x}"))
            })? as u32],
        };

        let (layers, alphas, postnorm, rope_theta, block_size);
        match dialect {
            Dialect::Original => {
                let (name, list) = match (f.get("attn_type_list"), f.get("decoder_attention_types"))
                {
                    (Some(l), _) => ("attn_type_list", l),
                    (None, Some(l)) => ("decoder_attention_types", l),
                    (None, None) => return Err(ModelError::field("attn_type_list", "missing")),
                };
                let arr = list
                    .as_array()
                    .ok_or_else(|| ModelError::field(name, "expected a list of 0/1"))?;
                layers = arr
                    .iter()
                    .enumerate()
                    .map(|(i, x)| match x.as_u64() {
                        Some(0) => Ok(LayerKind::Lightning),
                        Some(1) => Ok(LayerKind::Softmax),
                        _ => Err(ModelError::field(
                            name,
                            format!("entry {i} is {x}, expected 0 or 1"),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let g = |k: &str| -> Result<f32> { Ok(f.f64(k)?.unwrap_or(1.0) as f32) };
                alphas = [
                    g("layernorm_linear_attention_alpha")?,
                    g("layernorm_linear_attention_beta")?,
                    g("layernorm_full_attention_alpha")?,
                    g("layernorm_full_attention_beta")?,
                    g("layernorm_mlp_alpha")?,
                    g("layernorm_mlp_beta")?,
                ];
                postnorm = f.bool("postnorm")?.unwrap_or(false);
                rope_theta = f.f64("rope_theta")?.unwrap_or(1e6);
                block_size = f.usize("block")?.unwrap_or(256);
            }
            Dialect::Transformers => {
                layers = match f.get("layer_types") {
                    None => (0..num_layers)
                        .map(|i| if i % 2 == 0 { LayerKind::Softmax } else { LayerKind::Lightning })
                        .collect(),
                    Some(l) => l
                        .as_array()
                        .ok_or_else(|| ModelError::field("layer_types", "expected a list of strings"))?
                        .iter()
                        .enumerate()
                        .map(|(i, x)| match x.as_str() {
                            Some("linear_attention") => Ok(LayerKind::Lightning),
                            Some("full_attention") => Ok(LayerKind::Softmax),
                            _ => Err(ModelError::field(
                                "layer_types",
                                format!("entry {i} is {x}, expected \"linear_attention\" or \"full_attention\""),
                            )),
                        })
                        .collect::<Result<Vec<_>>>()?,
                };
                let g = |k: &str| -> Result<f32> { Ok(f.f64(k)?.unwrap_or(1.0) as f32) };
                alphas = [
                    g("linear_attn_alpha_factor")?,
                    g("linear_attn_beta_factor")?,
                    g("full_attn_alpha_factor")?,
                    g("full_attn_beta_factor")?,
                    g("mlp_alpha_factor")?,
                    g("mlp_beta_factor")?,
                ];
                // transformers always uses the post-norm residual; an explicit field wins.
                postnorm = f.bool("postnorm")?.unwrap_or(true);
                let rp = f.get("rope_parameters").and_then(Value::as_object);
                let from_params = match rp.and_then(|m| m.get("rope_theta")) {
                    None => None,
                    Some(t) => Some(t.as_f64().ok_or_else(|| {
                        ModelError::field(
                            "rope_parameters.rope_theta",
                            format!("expected a number, got {t}"),
                        )
                    })?),
                };
                if let Some(kind) = rp.and_then(|m| m.get("rope_type")).and_then(Value::as_str)
                    && kind != "default"
                {
                    return Err(ModelError::field(
                        "rope_parameters.rope_type",
                        format!("only \"default\" RoPE is supported, got \"{kind}\""),
                    ));
                }
                rope_theta = match from_params {
                    Some(t) => t,
                    None => f.f64("rope_theta")?.unwrap_or(1e6),
                };
                block_size = f.usize("block_size")?.unwrap_or(256);
            }
        }

        let cfg = ModelConfig {
            dialect,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rms_norm_eps,
            num_experts,
            experts_per_tok,
            layers,
            lightning_alpha: alphas[0],
            lightning_beta: alphas[1],
            softmax_alpha: alphas[2],
            softmax_beta: alphas[3],
            mlp_alpha: alphas[4],
            mlp_beta: alphas[5],
            postnorm,
            block_size,
            max_position_embeddings,
            tie_word_embeddings,
            eos_token_ids,
        };
        cfg.validate(num_layers)?;
        Ok(cfg)
    }

    fn validate(&self, num_layers: usize) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_experts),
            ("num_experts_per_tok", self.experts_per_tok),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ModelError::field(name, "must be positive"));
            }
        }
        let list = match self.dialect {
            Dialect::Original => "attn_type_list",
            Dialect::Transformers => "layer_types",
        };
        if self.layers.len() != num_layers {
            return Err(ModelError::field(
                list,
                format!(
                    "has {} entries but num_hidden_layers is {num_layers}",
                    self.layers.len()
                ),
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::field(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.experts_per_tok > self.num_experts {
            return Err(ModelError::field(
                "num_experts_per_tok",
                format!(
                    "{} exceeds num_local_experts ({})",
                    self.experts_per_tok, self.num_experts
                ),
            ));
        }
        if self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2) {
            return Err(ModelError::field(
                "rotary_dim",
                format!(
                    "{} must be even and at most head_dim ({})",
                    self.rotary_dim, self.head_dim
                ),
            ));
        }
        let block_field = match self.dialect {
            Dialect::Original => "block",
            Dialect::Transformers => "block_size",
        };
        if self.block_size == 0 {
            return Err(ModelError::field(block_field, "must be positive"));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(ModelError::field(
                "rms_norm_eps",
                "must be a positive number",
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(ModelError::field("rope_theta", "must be a positive number"));
        }
        if let Some(&e) = self
            .eos_token_ids
            .iter()
            .find(|&&e| e as usize >= self.vocab_size)
        {
            return Err(ModelError::field(
                "eos_token_id",
                format!("{e} is outside the vocabulary"),
            ));
        }
        Ok(())
    }

    /// MiniMax-Text-01 as released (minimax-01.md §1.1): 80 layers, every 8th softmax.
    pub fn text01() -> Self {
        let mut c = Self::text01_shape(200_064, 6144, 9216, 80, 64, 8, 128, 64, 32);
        c.max_position_embeddings = 10_240_000;
        c
    }

    /// The MiniMax-Text-01 architecture (every 8th layer softmax, RoPE θ 1e7, the released
    /// residual factors, top-2 routing, post-norm, block 256) at another size.
    #[allow(clippy::too_many_arguments)]
    pub fn text01_shape(
        vocab: usize,
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        experts: usize,
    ) -> Self {
        const ALPHA: f32 = 3.556_558_8; // (2·80)^(1/4), the released checkpoint's value
        ModelConfig {
            dialect: Dialect::Original,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rotary_dim,
            rope_theta: 1e7,
            rms_norm_eps: 1e-5,
            num_experts: experts,
            experts_per_tok: 2,
            layers: (0..layers)
                .map(|i| {
                    if (i + 1) % 8 == 0 {
                        LayerKind::Softmax
                    } else {
                        LayerKind::Lightning
                    }
                })
                .collect(),
            lightning_alpha: ALPHA,
            lightning_beta: 1.0,
            softmax_alpha: ALPHA,
            softmax_beta: 1.0,
            mlp_alpha: ALPHA,
            mlp_beta: 1.0,
            postnorm: true,
            block_size: 256,
            max_position_embeddings: 1 << 20,
            tie_word_embeddings: false,
            eos_token_ids: vec![],
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layers of kind `kind`.
    pub fn layers_of(&self, kind: LayerKind) -> usize {
        self.layers.iter().filter(|k| **k == kind).count()
    }

    /// Residual factors `(alpha, beta)` of the attention sublayer of `layer`.
    pub fn attn_factors(&self, layer: usize) -> (f32, f32) {
        match self.layers[layer] {
            LayerKind::Lightning => (self.lightning_alpha, self.lightning_beta),
            LayerKind::Softmax => (self.softmax_alpha, self.softmax_beta),
        }
    }

    /// λ per head for lightning layer `layer` with the original slope formula:
    /// `s_h · (1 − l/(L−1) + 1e-5)`, ALiBi slopes `s_h` (with the interleaved fallback for a
    /// head count that is not a power of two); `(1 + 1e-5)` when there is one layer.
    pub fn lightning_decay(&self, layer: usize) -> Vec<f32> {
        let l = self.num_layers();
        let factor = if l <= 1 {
            1.0 + 1e-5
        } else {
            1.0 - layer as f64 / (l as f64 - 1.0) + 1e-5
        };
        let factor = factor as f32;
        alibi_slopes(self.num_heads)
            .into_iter()
            .map(|s| (s as f32) * factor)
            .collect()
    }

    /// Bytes of lightning state per sequence (f32).
    pub fn lightning_state_len(&self) -> usize {
        self.num_heads * self.head_dim * self.head_dim
    }

    /// The config in transformers' dialect (what `init-checkpoint` writes), with the fields
    /// transformers does not know (`rotary_dim`, `postnorm`) kept for Ringbolt.
    pub fn to_transformers_json(&self) -> Value {
        let layer_types: Vec<&str> = self
            .layers
            .iter()
            .map(|k| match k {
                LayerKind::Lightning => "linear_attention",
                LayerKind::Softmax => "full_attention",
            })
            .collect();
        json!({
            "architectures": ["MiniMaxForCausalLM"],
            "model_type": "minimax",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers(),
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps as f64,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_tok,
            "layer_types": layer_types,
            "block_size": self.block_size,
            "linear_attn_alpha_factor": self.lightning_alpha as f64,
            "linear_attn_beta_factor": self.lightning_beta as f64,
            "full_attn_alpha_factor": self.softmax_alpha as f64,
            "full_attn_beta_factor": self.softmax_beta as f64,
            "mlp_alpha_factor": self.mlp_alpha as f64,
            "mlp_beta_factor": self.mlp_beta as f64,
            "postnorm": self.postnorm,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": null,
            "eos_token_id": match self.eos_token_ids.as_slice() { [] => Value::Null, [e] => json!(e), es => json!(es) },
            "pad_token_id": null,
            "sliding_window": null,
            "use_cache": true,
        })
    }
}

/// ALiBi slopes for `n` heads: `2^(−8(i+1)/n)` for a power of two, else the interleaved
/// fallback of the reference.
pub fn alibi_slopes(n: usize) -> Vec<f64> {
    fn pow2(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if n == 0 {
        return vec![];
    }
    if n.is_power_of_two() {
        pow2(n)
    } else {
        let closest = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let mut s = pow2(closest);
        s.extend(
            alibi_slopes(2 * closest)
                .into_iter()
                .step_by(2)
                .take(n - closest),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original_text01() -> Value {
        let attn: Vec<u32> = (0..80).map(|i| u32::from((i + 1) % 8 == 0)).collect();
        json!({
            "model_type": "minimax_text_01",
            "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 9216,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 128, "rotary_dim": 64, "rope_theta": 10000000, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "attn_type_list": attn,
            "layernorm_linear_attention_alpha": 3.5565588200778455, "layernorm_linear_attention_beta": 1.0,
            "layernorm_full_attention_alpha": 3.5565588200778455, "layernorm_full_attention_beta": 1.0,
            "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0,
            "postnorm": true, "num_local_experts": 32, "num_experts_per_tok": 2,
            "shared_intermediate_size": [0], "max_position_embeddings": 10240000,
            "tie_word_embeddings": false, "eos_token_id": null
        })
    }

    #[test]
    fn reads_the_text01_original_config() {
        let c = ModelConfig::from_json(&original_text01()).unwrap();
        assert_eq!(c.dialect, Dialect::Original);
        assert_eq!(
            c.layers
                .iter()
                .filter(|k| **k == LayerKind::Softmax)
                .count(),
            10
        );
        assert_eq!(c.layers[7], LayerKind::Softmax);
        assert_eq!(c.layers[78], LayerKind::Lightning);
        assert_eq!((c.head_dim, c.rotary_dim, c.block_size), (128, 64, 256));
        assert!(c.postnorm);
        assert_eq!(c.rope_theta, 1e7);
        // Slopes (minimax-01.md §2.4.2): head 7 of 64 is 0.5, head 63 is 2^-8.
        let l0 = c.lightning_decay(0);
        assert!((l0[7] - 0.5 * (1.0 + 1e-5) as f32).abs() < 1e-7);
        let l78 = c.lightning_decay(78);
        assert!((l78[63] as f64 - 2f64.powi(-8) * (1.0 - 78.0 / 79.0 + 1e-5)).abs() < 1e-9);
    }

    #[test]
    fn the_built_in_text01_equals_the_released_config() {
        let from_json = ModelConfig::from_json(&original_text01()).unwrap();
        assert_eq!(ModelConfig::text01(), from_json);
    }

    #[test]
    fn round_trips_through_the_transformers_dialect() {
        let c = ModelConfig::from_json(&original_text01()).unwrap();
        let hf = c.to_transformers_json();
        let back = ModelConfig::from_json(&hf).unwrap();
        assert_eq!(back.dialect, Dialect::Transformers);
        assert_eq!(
            ModelConfig {
                dialect: Dialect::Original,
                ..back
            },
            c
        );
    }

    #[test]
    fn transformers_defaults_alternate_layers_and_full_rope() {
        let v = json!({"model_type": "minimax", "vocab_size": 99, "hidden_size": 32,
            "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 2});
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(
            c.layers,
            vec![LayerKind::Softmax, LayerKind::Lightning, LayerKind::Softmax]
        );
        assert_eq!((c.head_dim, c.rotary_dim, c.num_kv_heads), (16, 16, 2));
        assert!(c.postnorm);
        assert_eq!(c.lightning_alpha, 1.0);
    }

    #[test]
    fn inconsistent_configs_name_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("num_hidden_layers", json!(81), "attn_type_list"),
            ("num_key_value_heads", json!(7), "num_key_value_heads"),
            ("rotary_dim", json!(129), "rotary_dim"),
            ("num_experts_per_tok", json!(33), "num_experts_per_tok"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("vocab_size", json!("big"), "vocab_size"),
            ("attn_type_list", json!([0, 2]), "attn_type_list"),
            (
                "shared_intermediate_size",
                json!(1024),
                "shared_intermediate_size",
            ),
            ("block", json!(0), "block"),
        ];
        for (field, value, named) in cases {
            let mut v = original_text01();
            v[field] = value;
            let err = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(err.contains(&format!("`{named}`")), "{field}: {err}");
        }
        let err = ModelConfig::from_json(&json!({"model_type": "llama"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_type"), "{err}");
    }

    #[test]
    fn alibi_fallback_for_non_power_of_two() {
        let s = alibi_slopes(6);
        let p4 = alibi_slopes(4);
        let p8 = alibi_slopes(8);
        assert_eq!(&s[..4], &p4[..]);
        assert_eq!(s[4], p8[0]);
        assert_eq!(s[5], p8[2]);
    }
}
