//! Tensor names and shapes of a MiniMax-01 checkpoint (original names, `nn.Linear` layout).

use crate::config::{LayerKind, ModelConfig};

/// How `init-checkpoint` fills a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f32),
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

pub fn expert_name(layer: usize, expert: usize, w: &str) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight")
}

/// Every tensor of the model, in checkpoint order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let std = 0.02;
    let mut out = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init| out.push(TensorSpec { name, shape, init });
    push(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Init::Normal(std),
    );
    for (l, kind) in cfg.layers.iter().enumerate() {
        let p = layer_prefix(l);
        push(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
        match kind {
            LayerKind::Lightning => {
                push(
                    format!("{p}.self_attn.qkv_proj.weight"),
                    vec![3 * nh * d, h],
                    Init::Normal(std),
                );
                push(
                    format!("{p}.self_attn.output_gate.weight"),
                    vec![nh * d, h],
                    Init::Normal(std),
                );
                push(
                    format!("{p}.self_attn.norm.weight"),
                    vec![nh * d],
                    Init::Ones,
                );
                push(
                    format!("{p}.self_attn.out_proj.weight"),
                    vec![h, nh * d],
                    Init::Normal(std),
                );
            }
            LayerKind::Softmax => {
                push(
                    format!("{p}.self_attn.q_proj.weight"),
                    vec![nh * d, h],
                    Init::Normal(std),
                );
                push(
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![nkv * d, h],
                    Init::Normal(std),
                );
                push(
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![nkv * d, h],
                    Init::Normal(std),
                );
                push(
                    format!("{p}.self_attn.o_proj.weight"),
                    vec![h, nh * d],
                    Init::Normal(std),
                );
            }
        }
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
        push(
            format!("{p}.block_sparse_moe.gate.weight"),
            vec![cfg.num_experts, h],
            Init::Normal(std),
        );
        for e in 0..cfg.num_experts {
            push(expert_name(l, e, "w1"), vec![i, h], Init::Normal(std));
            push(expert_name(l, e, "w2"), vec![h, i], Init::Normal(std));
            push(expert_name(l, e, "w3"), vec![i, h], Init::Normal(std));
        }
    }
    push("model.norm.weight".into(), vec![h], Init::Ones);
    if !cfg.tie_word_embeddings {
        push("lm_head.weight".into(), vec![v, h], Init::Normal(std));
    }
    out
}
