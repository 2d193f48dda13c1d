//! The planner against hand-computed values and the published anchors (minimax-01.md §5).

use ringbolt_planner::{PlanRequest, WeightFormat, gpu, plan, plan_with_degree, text01};

fn req(nodes: u64, weights: WeightFormat, context: u64) -> PlanRequest {
    PlanRequest {
        model: text01(),
        gpu: gpu("h800").unwrap(),
        nodes,
        gpus_per_node: 8,
        weights,
        context,
        prefill_chunk: 16_384,
    }
}

#[test]
fn memory_per_gpu_is_the_hand_computed_sum() {
    let p = plan(&req(2, WeightFormat::Bf16, 4_000_000));
    let m = &p.per_gpu;
    // Segment of 2M tokens per node, 40,960 B/token, split over 8 GPUs.
    assert_eq!(m.kv_cache, 2_000_000 * 40_960 / 8);
    // Attention + embeddings + routers + norms, bf16, over 8 GPUs.
    let attn = (18_749_112_320u64 + 2_458_386_432 + 15_728_640 + 989_184) * 2;
    assert_eq!(m.attention_weights, attn.div_ceil(8));
    // 2560 units over 16 GPUs: 160 each, 169,869,312 params × 2 bytes.
    assert_eq!(p.expert_units_per_gpu, 160);
    assert!(m.expert_weights >= 160 * 169_869_312 * 2);
    // Own + in-flight lightning states: 2 × 280 MiB over 8 GPUs.
    assert_eq!(m.lightning_states, (2u64 * (280 << 20)).div_ceil(8));
    assert_eq!(
        m.total,
        m.attention_weights
            + m.expert_weights
            + m.kv_cache
            + m.lightning_states
            + m.activations
            + m.transfer_buffers
    );
    assert_eq!(p.context_parallel, 2);
    // Per-layer traffic: 4M tokens × top-2 × 6144 × 2 bytes, dispatch and combine.
    assert_eq!(
        p.per_layer.expert_all_to_all_bytes,
        4_000_000 * 2 * 6144 * 2 * 2
    );
    assert_eq!(p.per_layer.lightning_state_exchange_bytes, 4 << 20);
    assert_eq!(p.per_layer.ring_kv_bytes, 4_000_000 * 2 * 8 * 128 * 2);
}

#[test]
fn one_h800_node_serves_1m_tokens_with_int8_experts_but_not_4m_in_bf16() {
    let int8_1m = plan(&req(1, WeightFormat::Int8, 1_000_000));
    assert!(int8_1m.fits, "{:?}", int8_1m.shortfall);
    let bf16_4m = plan(&req(1, WeightFormat::Bf16, 4_000_000));
    assert!(!bf16_4m.fits);
    assert!(
        bf16_4m.shortfall[0].contains("short"),
        "{:?}",
        bf16_4m.shortfall
    );
    // bf16 weights alone (912 GB) exceed one node's 640 GB.
    assert!(!plan(&req(1, WeightFormat::Bf16, 1_000)).fits);
}

/// MiniMax report, Fig. 2: 8×H800, W8A16, 1M-token prefill ≈ 140 s (read off the figure).
/// The planner is a roofline with stated efficiencies, so it should be optimistic, but not by
/// more than a factor of two: 140 s must lie within [prediction, 2 × prediction].
#[test]
fn one_node_1m_prefill_is_within_a_factor_of_two_of_the_report() {
    let p = plan(&req(1, WeightFormat::Int8, 1_000_000));
    assert!(
        p.prefill_seconds <= 140.0 && 140.0 <= 2.0 * p.prefill_seconds,
        "predicted {:.1} s vs the report's ~140 s",
        p.prefill_seconds
    );
}

#[test]
fn the_context_is_split_among_the_fewest_nodes_it_fits_and_more_ranks_prefill_faster() {
    for nodes in [2, 4, 8, 16] {
        let r = req(nodes, WeightFormat::Bf16, 4_000_000);
        let p = plan(&r);
        assert!(p.fits, "{nodes} nodes: {:?}", p.shortfall);
        assert!(p.context_parallel <= nodes);
        assert_eq!(p.attention_workers, nodes);
        for q in 1..p.context_parallel {
            assert!(
                !plan_with_degree(&r, q).fits,
                "{nodes} nodes: P = {q} fits too"
            );
        }
        assert!(p.decode_tokens_per_second > 0.0);
        // Splitting wider than needed costs memory per rank less and prefill time less.
        let mut last = f64::MAX;
        for q in p.context_parallel..=nodes {
            let w = plan_with_degree(&r, q);
            assert!(w.fits, "{nodes} nodes, P = {q}");
            assert!(w.prefill_seconds < last, "{nodes} nodes, P = {q}");
            last = w.prefill_seconds;
        }
    }
}

#[test]
fn a_context_goes_to_the_fewest_workers_whose_memory_holds_its_share() {
    use ringbolt_planner::{ContextCost, context_degree};
    let cost = ContextCost {
        kv_bytes_per_token: 100,
        state_bytes: 1_000,
    };
    // 10,000 tokens: 1,001,000 bytes on one rank, 501,000 on each of two, 334,400 of three.
    assert_eq!(context_degree(&cost, 10_000, 2_000_000, 4), 1);
    assert_eq!(context_degree(&cost, 10_000, 600_000, 4), 2);
    assert_eq!(context_degree(&cost, 10_000, 400_000, 4), 3);
    // Nothing fits: every worker takes a share (and the job may still not fit).
    assert_eq!(context_degree(&cost, 10_000, 100_000, 4), 4);
    assert_eq!(context_degree(&cost, 10_000, 100_000, 0), 1);
}
