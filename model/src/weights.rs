//! Tensor names and shapes of a MiniMax-01 checkpoint (original names, `nn.Linear` layout).

use crate::config::{LayerKind, ModelConfig};

/// How `init-checkpoint` fills a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f32),
    Ones,
    Zeros,
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

/// Every tensor of a VL-01 checkpoint's vision tower, projector and `image_newline` (released
/// names), for a text model of hidden size `text_hidden`.
pub fn vision_specs(v: &crate::vision::VisionConfig, text_hidden: usize) -> Vec<TensorSpec> {
    let (d, i, p, g) = (v.hidden_size, v.intermediate_size, v.patch_size, v.grid());
    let std = 0.02;
    let mut out = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init| out.push(TensorSpec { name, shape, init });
    let root = "vision_tower.vision_model";
    push(
        format!("{root}.embeddings.class_embedding"),
        vec![d],
        Init::Normal(std),
    );
    push(
        format!("{root}.embeddings.patch_embedding.weight"),
        vec![d, 3, p, p],
        Init::Normal(std),
    );
    push(
        format!("{root}.embeddings.position_embedding.weight"),
        vec![1 + g * g, d],
        Init::Normal(std),
    );
    let norm = |name: String, push: &mut dyn FnMut(String, Vec<usize>, Init)| {
        push(format!("{name}.weight"), vec![d], Init::Ones);
        push(format!("{name}.bias"), vec![d], Init::Zeros);
    };
    norm(format!("{root}.pre_layrnorm"), &mut push);
    let linear =
        |name: String, o: usize, n: usize, push: &mut dyn FnMut(String, Vec<usize>, Init)| {
            push(format!("{name}.weight"), vec![o, n], Init::Normal(std));
            push(format!("{name}.bias"), vec![o], Init::Zeros);
        };
    for l in 0..v.num_layers {
        let n = format!("{root}.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(format!("{n}.self_attn.{proj}"), d, d, &mut push);
        }
        norm(format!("{n}.layer_norm1"), &mut push);
        linear(format!("{n}.mlp.fc1"), i, d, &mut push);
        linear(format!("{n}.mlp.fc2"), d, i, &mut push);
        norm(format!("{n}.layer_norm2"), &mut push);
    }
    linear(
        "multi_modal_projector.linear_1".into(),
        text_hidden,
        d,
        &mut push,
    );
    linear(
        "multi_modal_projector.linear_2".into(),
        text_hidden,
        text_hidden,
        &mut push,
    );
    push("image_newline".into(), vec![text_hidden], Init::Normal(std));
    out
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
