//! The engine against logits computed by the reference implementation (transformers'
//! `MiniMaxForCausalLM` in f32, see scripts/reference/gen_fixtures.py).

mod common;
use common::assert_close;

use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::{Checkpoint, Dialect, Logits, Model};
use safetensors::SafeTensors;
use std::path::PathBuf;

struct Fixture {
    ckpt: PathBuf,
    tokens: Vec<u32>,
    prefill_len: usize,
    prefill: Vec<f32>,
    decode: Vec<f32>,
    stepwise: Vec<f32>,
}

fn fixture(name: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(name);
    let bytes = std::fs::read(dir.join("expected.safetensors")).expect("fixture present");
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("metadata");
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let tokens = st
        .tensor("tokens")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let prefill_len = meta.metadata().as_ref().unwrap()["prefill_len"]
        .parse()
        .unwrap();
    Fixture {
        ckpt: dir.join("checkpoint"),
        tokens,
        prefill_len,
        prefill: f32s("prefill_logits"),
        decode: f32s("decode_logits"),
        stepwise: f32s("stepwise_logits"),
    }
}

fn run(model: &Model<Cpu>, tokens: &[u32], prefill_len: usize) -> Vec<f32> {
    let mut st = model.new_state();
    let mut out = model
        .forward(&mut st, &tokens[..prefill_len], Logits::All)
        .unwrap();
    for &t in &tokens[prefill_len..] {
        out.extend(model.forward(&mut st, &[t], Logits::All).unwrap());
    }
    out
}

fn check_fixture(name: &str, dialect: Dialect) {
    let f = fixture(name);
    let ckpt = Checkpoint::open(&f.ckpt).unwrap();
    assert_eq!(ckpt.config().dialect, dialect);
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    let t = f.tokens.len();
    assert_close(
        &run(&model, &f.tokens, t),
        &f.prefill,
        &format!("{name}: full prefill"),
    );
    assert_close(
        &run(&model, &f.tokens, f.prefill_len),
        &f.decode,
        &format!("{name}: prefill + decode"),
    );
    assert_close(
        &run(&model, &f.tokens, 1),
        &f.stepwise,
        &format!("{name}: pure decode"),
    );
}

#[test]
fn transformers_dialect_f32_matches_reference() {
    check_fixture("hf-f32", Dialect::Transformers);
}

#[test]
fn original_dialect_bf16_sharded_matches_reference() {
    check_fixture("original-bf16-sharded", Dialect::Original);
}

#[test]
fn block_size_does_not_change_results_beyond_rounding() {
    let f = fixture("hf-f32");
    let ckpt = Checkpoint::open(&f.ckpt).unwrap();
    let mut model = Model::load(&ckpt, Cpu::default()).unwrap();
    let t = f.tokens.len();
    for block in [1, 3, 16, 64, 256] {
        model.set_block_size(block);
        assert_close(
            &run(&model, &f.tokens, t),
            &f.prefill,
            &format!("block {block}"),
        );
    }
}

#[test]
fn prefill_then_decode_equals_prefill_for_every_split() {
    let f = fixture("original-bf16-sharded");
    let ckpt = Checkpoint::open(&f.ckpt).unwrap();
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    for k in [1, 2, 15, 16, 17, 33, 39, 40] {
        assert_close(
            &run(&model, &f.tokens, k),
            &f.prefill,
            &format!("prefill {k} + decode"),
        );
    }
    // Chunked prefill (several multi-token calls continuing the caches) too.
    let mut st = model.new_state();
    let mut out = Vec::new();
    for part in f.tokens.chunks(7) {
        out.extend(model.forward(&mut st, part, Logits::All).unwrap());
    }
    assert_close(&out, &f.prefill, "chunks of 7");
}

#[test]
fn batched_decode_of_several_sequences_matches_the_reference() {
    // Three sequences at different positions (prefills of 5, 9 and 14 tokens of the fixture's
    // prompt) decoding together: every step one forward pass of three one-token rows, the
    // batched path (one lightning decode call for all of them), each against the reference.
    let f = fixture("original-bf16-sharded");
    let ckpt = Checkpoint::open(&f.ckpt).unwrap();
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    let v = model.config().vocab_size;
    let starts = [5usize, 9, 14];
    let mut states: Vec<_> = starts
        .iter()
        .map(|&k| {
            let mut st = model.new_state();
            model
                .forward(&mut st, &f.tokens[..k], Logits::None)
                .unwrap();
            st
        })
        .collect();
    for step in 0..6 {
        let toks: Vec<[u32; 1]> = starts.iter().map(|&k| [f.tokens[k + step]]).collect();
        let mut seqs: Vec<_> = states
            .iter_mut()
            .zip(&toks)
            .map(|(st, t)| (st, &t[..]))
            .collect();
        let out = model.forward_batch(&mut seqs, Logits::Last).unwrap();
        for (s, (&k, logits)) in starts.iter().zip(&out).enumerate() {
            let at = k + step;
            assert_close(
                logits,
                &f.prefill[at * v..(at + 1) * v],
                &format!("sequence {s}, position {at}"),
            );
        }
    }
}

/// The bound on a quantized matrix's relative error that its scales give: each weight of row
/// j is off by at most s_j / 2, so ‖W − Ŵ‖_F ≤ sqrt(Σ_j cols · (s_j / 2)²), over ‖W‖_F. The
/// largest over every expert matrix of the checkpoint.
fn int8_relative_error_bound(ckpt: &Checkpoint) -> f64 {
    let c = ckpt.config();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut worst = 0f64;
    for l in 0..c.num_layers() {
        for e in 0..c.num_experts {
            for (w, rows, cols) in [("w1", i, h), ("w3", i, h), ("w2", h, i)] {
                let name = ringbolt_model::weights::expert_name(l, e, w);
                let data = ckpt.load(&name, &[rows, cols]).unwrap();
                let (_, scales) = ringbolt_kernels::format::quantize_int8(&data, rows, cols);
                let err: f64 = scales
                    .iter()
                    .map(|&s| cols as f64 * (s as f64 / 2.0).powi(2))
                    .sum();
                let norm: f64 = data.iter().map(|&v| (v as f64).powi(2)).sum();
                worst = worst.max((err / norm).sqrt());
            }
        }
    }
    worst
}

/// Relative RMS difference of `got` from `want`.
fn rel_rms(got: &[f32], want: &[f32]) -> f64 {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let w: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (d / w).sqrt()
}

/// int8 experts (`--weights int8`) against the reference's f32 logits: the relative RMS error
/// of the logits stays within the error the scales allow each expert matrix (δ), times the
/// layers it passes through, times 2 for the two matrices in series in each expert (gate/up,
/// then down). Every position of the prefill, and prefill + decode.
#[test]
fn int8_experts_stay_within_the_bound_their_scales_give() {
    use ringbolt_kernels::WeightFormat;
    for name in ["hf-f32", "original-bf16-sharded"] {
        let f = fixture(name);
        let ckpt = Checkpoint::open(&f.ckpt).unwrap();
        let delta = int8_relative_error_bound(&ckpt);
        let layers = ckpt.config().num_layers() as f64;
        let bound = 2.0 * layers * delta;
        let plain = Model::load(&ckpt, Cpu::default()).unwrap();
        let int8 = Model::load_parts(&ckpt, Cpu::default(), true, WeightFormat::Int8).unwrap();
        let t = f.tokens.len();
        let base = rel_rms(&run(&plain, &f.tokens, t), &f.prefill);
        for (what, got, want) in [
            ("prefill", run(&int8, &f.tokens, t), &f.prefill),
            (
                "prefill + decode",
                run(&int8, &f.tokens, f.prefill_len),
                &f.decode,
            ),
        ] {
            let e = rel_rms(&got, want);
            eprintln!(
                "{name}, {what}: int8 logits off by {e:.2e} (RMS, relative; the checkpoint's \
                 own weights: {base:.1e}); per-matrix bound δ = {delta:.2e}, asserted ≤ {bound:.2e}"
            );
            assert!(e <= bound, "{name}, {what}: {e:e} > {bound:e}");
            // Quantization did something: not the unquantized result.
            assert!(e > 10.0 * base, "{name}: int8 changed nothing ({e:e})");
        }
    }
}
