//! Loading checkpoints: sharded and single files, dtypes, selective loading, and clear errors
//! that name the tensor and the file.

use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::engine::Expert;
use ringbolt_model::{Checkpoint, Logits, Model, Preset, WeightDtype, write_random_checkpoint};
use std::path::Path;

fn logits(dir: &Path) -> Vec<f32> {
    let model = Model::load(&Checkpoint::open(dir).unwrap(), Cpu::default()).unwrap();
    let mut st = model.new_state();
    model
        .forward(
            &mut st,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
            Logits::All,
        )
        .unwrap()
}

/// The error of loading the whole model from `dir`.
fn load_error(dir: &Path) -> String {
    match Model::load(&Checkpoint::open(dir).unwrap(), Cpu::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn write(dir: &Path, dtype: WeightDtype, shard: Option<u64>) -> usize {
    write_random_checkpoint(&Preset::Tiny.config(), 3, dtype, dir, shard).unwrap()
}

#[test]
fn sharded_and_single_file_checkpoints_are_the_same_model() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(write(a.path(), WeightDtype::F32, None), 1);
    assert!(write(b.path(), WeightDtype::F32, Some(100_000)) > 3);
    assert!(b.path().join("model.safetensors.index.json").exists());
    assert_eq!(logits(a.path()), logits(b.path()));
}

#[test]
fn bf16_checkpoint_is_the_f32_one_rounded() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), WeightDtype::F32, None);
    write(b.path(), WeightDtype::Bf16, Some(50_000));
    let (x, y) = (logits(a.path()), logits(b.path()));
    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = x
        .iter()
        .zip(&y)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(
        err > 0.0 && err < 0.05 * scale,
        "bf16 vs f32: {err} of {scale}"
    );
    let size = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    assert!(
        size(b.path()) * 10 < size(a.path()) * 6,
        "bf16 files are about half the size"
    );
}

#[test]
fn loads_only_the_tensors_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::F32, Some(60_000));
    // Corrupt every shard except the one holding expert 2 of layer 5: loading that expert
    // still works, loading the whole model names a broken file.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let keep: std::collections::HashSet<&str> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| {
            map[&format!("model.layers.5.block_sparse_moe.experts.2.{w}.weight")]
                .as_str()
                .unwrap()
        })
        .collect();
    for f in map.values().map(|v| v.as_str().unwrap()) {
        if !keep.contains(f) {
            std::fs::write(dir.path().join(f), b"garbage").unwrap();
        }
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    Expert::load(
        &ckpt,
        &Cpu::default(),
        5,
        2,
        ringbolt_kernels::WeightFormat::Bf16,
    )
    .expect("the expert's own shards are intact");
    let err = Model::load(&ckpt, Cpu::default())
        .err()
        .expect("other shards are corrupt")
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn missing_tensor_names_the_tensor_and_the_index() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::F32, Some(100_000));
    let path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.3.self_attn.output_gate.weight");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("`model.layers.3.self_attn.output_gate.weight`"),
        "{err}"
    );
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_file_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::F32, None);
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["intermediate_size"] = 100.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("`model.layers.0.block_sparse_moe.experts.0.w1.weight`"),
        "{err}"
    );
    assert!(
        err.contains("model.safetensors") && err.contains("[128, 64]") && err.contains("[100, 64]"),
        "{err}"
    );
}

#[test]
fn truncated_shard_names_the_tensor_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::Bf16, Some(100_000));
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-00002-of-")
        })
        .expect("a second shard");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_error(dir.path());
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name) && err.contains("tensor `"), "{err}");
}

#[test]
fn non_finite_weights_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::F32, None);
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // Overwrite the first value of the first tensor's data with NaN.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["model.embed_tokens.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[8 + n + start..8 + n + start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn missing_or_broken_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("JSON"), "{err}");
}

#[test]
fn bad_tokens_and_overlong_contexts_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), WeightDtype::F32, None);
    let model = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu::default()).unwrap();
    let mut st = model.new_state();
    let err = model
        .forward(&mut st, &[1, 512], Logits::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("512") && err.contains("vocabulary"), "{err}");
    assert_eq!(st.pos, 0, "a rejected step changes nothing");
    assert!(model.forward(&mut st, &[], Logits::Last).is_err());
    st.pos = model.config().max_position_embeddings;
    assert!(
        model
            .forward(&mut st, &[1], Logits::Last)
            .unwrap_err()
            .to_string()
            .contains("exceeds")
    );
}
