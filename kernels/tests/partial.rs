//! The context-parallel pieces against the whole computations they split: lightning attention
//! from a prefix state = from zero + the prefix term (and the state folds), and causal
//! attention over all keys = the log-sum-exp merge of partials over any split of the keys.

use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::partial::fold_state;
use ringbolt_kernels::{AttentionShape, Backend, LightningShape};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503);
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let max = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= 2e-5 * max, "{what}: error {err} of {max}");
}

#[test]
fn lightning_from_a_prefix_state_is_zero_start_plus_the_prefix_term() {
    let b = Cpu::default();
    let (heads, d) = (3, 8);
    let decay = [0.05f32, 0.3, 0.9];
    for (t, block) in [(1, 4), (5, 4), (37, 16), (64, 16)] {
        let shape = LightningShape {
            heads,
            head_dim: d,
            block,
        };
        let qkv = b.upload(&values(t * heads * 3 * d, t as u32));
        let g = values(heads * d * d, 99);
        let mut from_g = b.upload(&g);
        let want = b.lightning(&qkv, t, shape, &decay, &mut from_g);
        let mut from_zero = b.zeros(heads * d * d);
        let own = b.lightning(&qkv, t, shape, &decay, &mut from_zero);
        let prefix = b.lightning_prefix(&qkv, t, shape, &decay, &g);
        let reference = ringbolt_kernels::partial::lightning_prefix(&qkv, t, shape, &decay, &g);
        close(
            &prefix,
            &reference,
            &format!("t={t} prefix term: CPU vs reference"),
        );
        let got = b.axpby(1.0, &own, 1.0, &prefix);
        close(&got, &want, &format!("t={t} output"));
        let mut folded = g.clone();
        fold_state(&mut folded, t, &from_zero, &decay, d);
        close(&folded, &from_g, &format!("t={t} state"));
    }
}

#[test]
fn attention_over_all_keys_is_the_merge_of_partials_over_any_split() {
    let b = Cpu::default();
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (hw, kvw) = (4 * 8, 2 * 8);
    // Queries at positions 20..33 over keys 0..33 (the first 33 positions).
    let (pos0, t) = (20, 13);
    let keys = pos0 + t;
    let q = b.upload(&values(t * hw, 1));
    let kall = values(keys * kvw, 2);
    let vall = values(keys * kvw, 3);
    let want = b.attention(&q, t, &kall, &vall, pos0, shape);
    for cuts in [
        vec![],
        vec![10],
        vec![5, 20, 27],
        vec![20],
        vec![1, 2, 3, 30],
    ] {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(keys);
        let mut parts = Vec::new();
        // In any order: the merge does not care.
        for w in bounds.windows(2).rev() {
            let (k0, n) = (w[0], w[1] - w[0]);
            let k = b.upload(&kall[k0 * kvw..(k0 + n) * kvw]);
            let v = b.upload(&vall[k0 * kvw..(k0 + n) * kvw]);
            parts.push(b.attention_partial(&q, t, pos0, &k, &v, n, k0, shape));
        }
        let (got, _) = b.attention_merge(&parts, t, shape);
        close(&got, &want, &format!("cuts {cuts:?}"));
    }
    // The CPU backend's tiled partial equals the host reference, log-sum-exp included.
    let (k0, n) = (7, 20);
    let (o, lse) = b.attention_partial(
        &q,
        t,
        pos0,
        &kall[k0 * kvw..(k0 + n) * kvw].to_vec(),
        &vall[k0 * kvw..(k0 + n) * kvw].to_vec(),
        n,
        k0,
        shape,
    );
    let (ro, rlse) = ringbolt_kernels::partial::attention(
        &q,
        t,
        pos0,
        &kall[k0 * kvw..(k0 + n) * kvw],
        &vall[k0 * kvw..(k0 + n) * kvw],
        n,
        k0,
        shape,
    );
    close(&o, &ro, "tiled vs reference output");
    close(&lse, &rlse, "tiled vs reference log-sum-exp");
    // Keys entirely after the queries contribute nothing (an empty partial).
    let k = b.upload(&kall[..kvw]);
    let (o, lse) = b.attention_partial(&q, t, 0, &k, &k, 1, t, shape);
    assert!(o.iter().all(|x| *x == 0.0) && lse.iter().all(|l| *l == f32::NEG_INFINITY));
}
