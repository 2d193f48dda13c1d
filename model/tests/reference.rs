//! The engine against logits computed by the reference implementation (transformers'
//! `MiniMaxForCausalLM` in f32, see scripts/reference/gen_fixtures.py).

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

/// |got − want| ≤ 1e-4 · max|want| everywhere.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max error {err:e} (max|logit| {scale})");
    assert!(
        err <= 1e-4 * scale,
        "{what}: max error {err:e} > 1e-4 × {scale}"
    );
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
    let model = Model::load(&ckpt, Cpu).unwrap();
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
    let mut model = Model::load(&ckpt, Cpu).unwrap();
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
    let model = Model::load(&ckpt, Cpu).unwrap();
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
    let model = Model::load(&ckpt, Cpu).unwrap();
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
