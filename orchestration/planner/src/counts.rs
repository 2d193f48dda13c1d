//! Exact parameter, cache and FLOP counts of a MiniMax-01 config (minimax-01.md §4).

use ringbolt_model::{LayerKind, ModelConfig};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCounts {
    pub lightning_layers: u64,
    pub softmax_layers: u64,
    /// Attention (all mixers, incl. the lightning output norm), all layers.
    pub attention_params: u64,
    /// One (layer, expert) unit: w1, w2, w3.
    pub expert_unit_params: u64,
    pub expert_units: u64,
    pub router_params: u64,
    /// Input/post-attention norms of every layer plus the final norm.
    pub norm_params: u64,
    /// Embedding plus LM head (one table when tied).
    pub embedding_params: u64,
    pub total_params: u64,
    /// Parameters one token passes through, without the embedding and LM head (the published
    /// "activated" figure).
    pub active_params: u64,
}

impl ModelCounts {
    pub fn new(c: &ModelConfig) -> Self {
        let (h, i, v) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
        );
        let (nh, nkv, d) = (c.num_heads as u64, c.num_kv_heads as u64, c.head_dim as u64);
        let e = c.num_experts as u64;
        let lightning_layers = c
            .layers
            .iter()
            .filter(|k| **k == LayerKind::Lightning)
            .count() as u64;
        let softmax_layers = c.layers.len() as u64 - lightning_layers;
        let lightning = 3 * nh * d * h + nh * d * h + h * nh * d + nh * d;
        let softmax = nh * d * h + 2 * nkv * d * h + h * nh * d;
        let attention_params = lightning_layers * lightning + softmax_layers * softmax;
        let expert_unit_params = 3 * h * i;
        let layers = c.layers.len() as u64;
        let expert_units = layers * e;
        let router_params = layers * e * h;
        let norm_params = layers * 2 * h + h;
        let embedding_params = if c.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        let total_params = attention_params
            + expert_units * expert_unit_params
            + router_params
            + norm_params
            + embedding_params;
        let active_params = attention_params
            + layers * c.experts_per_tok as u64 * expert_unit_params
            + router_params
            + norm_params;
        ModelCounts {
            lightning_layers,
            softmax_layers,
            attention_params,
            expert_unit_params,
            expert_units,
            router_params,
            norm_params,
            embedding_params,
            total_params,
            active_params,
        }
    }
}

/// Softmax-layer K and V bytes per token at `bytes_per_value`.
pub fn kv_bytes_per_token(c: &ModelConfig, bytes_per_value: u64) -> u64 {
    let softmax = c
        .layers
        .iter()
        .filter(|k| **k == LayerKind::Softmax)
        .count() as u64;
    softmax * 2 * c.num_kv_heads as u64 * c.head_dim as u64 * bytes_per_value
}

/// f32 lightning state of one sequence, all lightning layers.
pub fn lightning_state_bytes(c: &ModelConfig) -> u64 {
    let lightning = c
        .layers
        .iter()
        .filter(|k| **k == LayerKind::Lightning)
        .count() as u64;
    lightning * (c.num_heads * c.head_dim * c.head_dim) as u64 * 4
}

/// FLOPs of a prefill of `n` tokens (2 per multiply-add): (matmuls, lightning mixing, softmax
/// attention). Matmuls count every active parameter once per token; the LM head once.
pub fn prefill_flops(c: &ModelConfig, n: u64) -> (f64, f64, f64) {
    let counts = ModelCounts::new(c);
    let nf = n as f64;
    let (nh, d, b) = (c.num_heads as f64, c.head_dim as f64, c.block_size as f64);
    let matmul =
        2.0 * counts.active_params as f64 * nf + 2.0 * (c.vocab_size * c.hidden_size) as f64;
    // Block algorithm per token and head: intra-block 4·B·d, inter-block + state update 4·d².
    let lightning = counts.lightning_layers as f64 * nh * (4.0 * b * d + 4.0 * d * d) * nf;
    // Causal: QKᵀ and PV, 4·d FLOPs per (query, visible key) pair and head.
    let softmax = counts.softmax_layers as f64 * nh * 4.0 * d * nf * (nf + 1.0) / 2.0;
    (matmul, lightning, softmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::text01;

    #[test]
    fn text01_counts_match_the_published_and_derived_figures() {
        let c = text01();
        let k = ModelCounts::new(&c);
        assert_eq!((k.lightning_layers, k.softmax_layers), (70, 10));
        assert_eq!(k.attention_params, 17_616_650_240 + 1_132_462_080);
        assert_eq!(k.expert_unit_params, 169_869_312);
        assert_eq!(k.router_params, 15_728_640);
        assert_eq!(k.norm_params, 989_184);
        assert_eq!(k.embedding_params, 2_458_386_432);
        assert_eq!(k.total_params, 456_089_655_296);
        assert_eq!(k.active_params, 45_944_920_064);
        assert_eq!(kv_bytes_per_token(&c, 2), 40_960);
        assert_eq!(lightning_state_bytes(&c), 280 << 20);
    }

    #[test]
    fn prefill_flops_match_hand_computation() {
        let c = text01();
        let n = 1u64 << 20;
        let (mm, lin, sm) = prefill_flops(&c, n);
        // minimax-01.md §4.3: softmax ≈ 163,840·N² (causal), lightning ≈ 0.88 GFLOP/token,
        // matmuls 2 × 45.94B per token.
        let nf = n as f64;
        assert!((sm - 163_840.0 * nf * (nf + 1.0) / 2.0 * 2.0).abs() / sm < 1e-12);
        assert!((lin / nf - 70.0 * 64.0 * 196_608.0).abs() < 1.0);
        assert!((lin / nf / 1e9 - 0.88).abs() < 0.01);
        assert!((mm / nf / 1e9 - 91.9).abs() < 0.1);
        // Total ≈ 280 PFLOP at 2^20 tokens.
        assert!(
            ((mm + lin + sm) / 1e15 - 280.0).abs() < 3.0,
            "{}",
            (mm + lin + sm) / 1e15
        );
    }
}
