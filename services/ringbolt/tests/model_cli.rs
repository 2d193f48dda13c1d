//! The model CLI as other tools drive it: `init-checkpoint`, `logits`, `generate`.

use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::{Checkpoint, Logits, Model};
use safetensors::SafeTensors;
use std::path::Path;
use std::process::{Command, Output};

fn ringbolt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringbolt"))
        .args(args)
        .output()
        .expect("ringbolt runs")
}

fn ok(args: &[&str]) -> String {
    let out = ringbolt(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let out = ringbolt(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks `{needle}`: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

fn init(dir: &Path, extra: &[&str]) {
    let d = dir.to_str().unwrap();
    let mut args = vec![
        "init-checkpoint",
        "--preset",
        "tiny",
        "--seed",
        "4",
        "--out",
        d,
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn logits_writes_every_position_and_matches_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    init(&ckpt, &["--dtype", "bf16", "--max-shard-bytes", "150000"]);
    assert!(ckpt.join("model.safetensors.index.json").exists());
    let toks = "5,17,3,99,100,101,7,8,9,10,11,12,13,14,15,16,17,18,19,20";
    let out = dir.path().join("a.safetensors");
    ok(&[
        "logits",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--tokens",
        toks,
        "--out",
        out.to_str().unwrap(),
    ]);
    let (shape, full) = read_logits(&out);
    assert_eq!(shape, vec![20, 512]);

    // Prefill 6 then decode, from a tokens file with mixed separators.
    let file = dir.path().join("toks.txt");
    std::fs::write(&file, toks.replace(',', " \n").replacen(" \n", ",", 3)).unwrap();
    let out2 = dir.path().join("b.safetensors");
    ok(&[
        "logits",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--tokens-file",
        file.to_str().unwrap(),
        "--prefill-len",
        "6",
        "--block-size",
        "4",
        "--out",
        out2.to_str().unwrap(),
    ]);
    let (_, split) = read_logits(&out2);
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = full
        .iter()
        .zip(&split)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * scale, "prefill+decode vs prefill: {err}");

    // Same numbers as the library.
    let model = Model::load(&Checkpoint::open(&ckpt).unwrap(), Cpu::default()).unwrap();
    let ids: Vec<u32> = toks.split(',').map(|s| s.parse().unwrap()).collect();
    let lib = model
        .forward(&mut model.new_state(), &ids, Logits::All)
        .unwrap();
    assert_eq!(lib, full);
}

/// bf16 weights on CPUs with AMX take the tile-unit GEMM (activations split into three bf16
/// terms); it must agree with the f32 path (`RINGBOLT_CPU_AMX=0`) to f32 rounding. On a CPU
/// without AMX both runs take the f32 path.
#[test]
fn amx_and_f32_gemms_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    init(&ckpt, &["--dtype", "bf16"]);
    let toks: Vec<String> = (0..96).map(|i| ((i * 37 + 11) % 512).to_string()).collect();
    let toks = toks.join(",");
    let run = |amx: &str, name: &str| {
        let out = dir.path().join(name);
        let st = Command::new(env!("CARGO_BIN_EXE_ringbolt"))
            .env("RINGBOLT_CPU_AMX", amx)
            .args([
                "logits",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--tokens",
                &toks,
            ])
            .args(["--prefill-len", "80", "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        read_logits(&out).1
    };
    let (amx, f32) = (run("1", "amx.safetensors"), run("0", "f32.safetensors"));
    let scale = f32.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = amx
        .iter()
        .zip(&f32)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 1e-5 * scale,
        "AMX vs f32 GEMM: {err} (scale {scale})"
    );
}

#[test]
fn generate_is_greedy_by_default_and_seeded_when_sampling() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), &[]);
    let d = dir.path().to_str().unwrap();
    let line = ok(&[
        "generate",
        "--checkpoint",
        d,
        "--tokens",
        "1,2,3,4",
        "--max-new-tokens",
        "6",
    ]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let toks: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(toks.len(), 6);

    // Greedy equals argmax of the engine's logits, step by step.
    let model = Model::load(&Checkpoint::open(dir.path()).unwrap(), Cpu::default()).unwrap();
    let mut st = model.new_state();
    let mut logits = model.forward(&mut st, &[1, 2, 3, 4], Logits::Last).unwrap();
    for &t in &toks {
        assert_eq!(ringbolt_model::sampling::argmax(&logits), t);
        logits = model.forward(&mut st, &[t], Logits::Last).unwrap();
    }

    let sampled = |seed: &str| {
        ok(&[
            "generate",
            "--checkpoint",
            d,
            "--tokens",
            "1,2,3,4",
            "--max-new-tokens",
            "8",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
    };
    let (a, b) = (sampled("7"), sampled("7"));
    let tok =
        |s: &str| serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["tokens"].clone();
    assert_eq!(tok(&a), tok(&b), "same seed, same tokens");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), &[]);
    let d = dir.path().to_str().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = out.to_str().unwrap();
    fails(
        &[
            "logits",
            "--checkpoint",
            d,
            "--tokens",
            "1,9999",
            "--out",
            o,
        ],
        "outside the vocabulary",
    );
    fails(
        &["logits", "--checkpoint", d, "--tokens", "1,x", "--out", o],
        "`x`",
    );
    fails(
        &["logits", "--checkpoint", d, "--tokens", "", "--out", o],
        "empty",
    );
    fails(
        &[
            "logits",
            "--checkpoint",
            d,
            "--tokens",
            "1,2",
            "--prefill-len",
            "3",
            "--out",
            o,
        ],
        "--prefill-len",
    );
    fails(
        &[
            "logits",
            "--checkpoint",
            "/nonexistent",
            "--tokens",
            "1",
            "--out",
            o,
        ],
        "/nonexistent",
    );
    fails(
        &[
            "generate",
            "--checkpoint",
            d,
            "--tokens",
            "1",
            "--max-new-tokens",
            "0",
        ],
        "max-new-tokens",
    );
    fails(
        &[
            "generate",
            "--checkpoint",
            d,
            "--tokens",
            "1",
            "--max-new-tokens",
            "2",
            "--top-p",
            "0",
        ],
        "top_p",
    );
    fails(&["init-checkpoint", "--preset", "huge", "--out", o], "huge");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"model_type":"minimax","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":3}"#).unwrap();
    fails(
        &[
            "init-checkpoint",
            "--config",
            bad.to_str().unwrap(),
            "--out",
            o,
        ],
        "head_dim",
    );
}

#[test]
fn plan_prints_one_json_line_and_says_what_is_short() {
    let line = ok(&[
        "plan",
        "--model",
        "text-01",
        "--gpu",
        "h800",
        "--nodes",
        "1",
        "--context",
        "1000000",
        "--weights",
        "int8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["fits"], true);
    assert!(v["prefill_seconds"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["per_gpu"]["total"].as_u64().unwrap() <= v["per_gpu"]["usable"].as_u64().unwrap());
    let line = ok(&[
        "plan",
        "--model",
        "text-01",
        "--gpu",
        "h800",
        "--nodes",
        "1",
        "--context",
        "4000000",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["fits"], false);
    assert!(v["shortfall"][0].as_str().unwrap().contains("GB short"));
    let table = ok(&[
        "plan",
        "--model",
        "text-01",
        "--gpu",
        "h800",
        "--nodes",
        "4",
        "--context",
        "4000000",
    ]);
    assert!(
        table.contains("FITS") && table.contains("prefill:"),
        "{table}"
    );
    fails(
        &[
            "plan",
            "--model",
            "text-01",
            "--gpu",
            "a100",
            "--nodes",
            "1",
            "--context",
            "10",
        ],
        "unknown GPU",
    );
    fails(
        &["plan", "--gpu", "h800", "--nodes", "1", "--context", "10"],
        "--model",
    );
}

#[test]
fn every_compute_role_takes_a_device_and_refuses_one_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    init(&ckpt, &[]);
    let (c, data) = (
        ckpt.to_str().unwrap(),
        dir.path().join("data").to_str().unwrap().to_string(),
    );
    let roles: [Vec<&str>; 3] = [
        vec![
            "standalone",
            "--checkpoint",
            c,
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
        ],
        vec![
            "attention-worker",
            "--checkpoint",
            c,
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            "http://127.0.0.1:1",
        ],
        vec![
            "expert-worker",
            "--checkpoint",
            c,
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            "http://127.0.0.1:1",
        ],
    ];
    for role in &roles {
        let mut args = role.clone();
        args.extend(["--device", "gpu"]);
        fails(&args, "use cpu or cuda:N");
        // The device is opened before anything else (etcd included), so a build without the
        // `cuda` feature says so at once. (A CUDA build on a GPU machine would start serving.)
        if cfg!(not(feature = "cuda")) {
            let mut args = role.clone();
            args.extend(["--device", "cuda:0"]);
            fails(
                &args,
                "cuda:0 asked for, but this ringbolt was built without the `cuda` feature",
            );
        }
    }
    // The one-shot tools take it too.
    if cfg!(not(feature = "cuda")) {
        fails(
            &[
                "logits",
                "--checkpoint",
                c,
                "--tokens",
                "1,2",
                "--out",
                &data,
                "--device",
                "cuda:1",
            ],
            "cuda:1 asked for",
        );
    }
}

/// `--weights int8`, `int8-all` and `--activations bf16` on the `small` preset: the greedy
/// tokens of `generate` agree with the checkpoint's bf16 weights and f32 activations for the
/// first 16 tokens of each test prompt, and `logits` takes the same flags (its int8 logits
/// differ from bf16, within a few percent).
#[test]
fn compute_formats_keep_the_greedy_tokens_of_small() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&[
        "init-checkpoint",
        "--preset",
        "small",
        "--seed",
        "1",
        "--dtype",
        "bf16",
        "--out",
        d,
    ]);
    let prompts = [
        "1,2,3,4,5,6,7,8",
        "4242,17,99,31000,5,600,7000,12,12,12",
        "29999,1,15000,77,3",
    ];
    let greedy = |prompt: &str, flags: &[&str]| -> Vec<u64> {
        let mut args = vec![
            "generate",
            "--checkpoint",
            d,
            "--tokens",
            prompt,
            "--max-new-tokens",
            "16",
            "--ignore-eos",
        ];
        args.extend_from_slice(flags);
        let v: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    for p in prompts {
        let want = greedy(p, &[]);
        assert_eq!(want.len(), 16);
        for flags in [
            &["--weights", "int8"][..],
            &["--weights", "int8-all"],
            &["--activations", "bf16"],
            &["--weights", "int8", "--activations", "bf16"],
        ] {
            assert_eq!(greedy(p, flags), want, "prompt {p}, {flags:?}");
        }
    }
    let logits = |flags: &[&str]| {
        let out = dir.path().join(format!("{}.safetensors", flags.join("")));
        let mut args = vec![
            "logits",
            "--checkpoint",
            d,
            "--tokens",
            prompts[1],
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        ok(&args);
        read_logits(&out).1
    };
    let (a, b) = (logits(&[]), logits(&["--weights", "int8"]));
    let d2: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let n2: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    let rel = (d2 / n2).sqrt();
    assert!(rel > 0.0 && rel < 0.05, "int8 logits off by {rel:e}");
    fails(
        &[
            "logits",
            "--checkpoint",
            d,
            "--tokens",
            "1",
            "--out",
            "x",
            "--weights",
            "fp4",
        ],
        "bf16, int8 or int8-all",
    );
}

/// `init-checkpoint --preset vl-tiny` writes a VL-01 checkpoint; `generate` and `logits` take
/// `--image FILE` (repeatable) for the prompt's placeholders, expand each to the image's
/// features, and write the logits of the expanded sequence (the engine's, row for row); bad
/// images and placeholder counts are refused with reasons.
#[test]
fn vl_tiny_takes_images_in_generate_and_logits() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("vl");
    let c = ckpt.to_str().unwrap();
    ok(&[
        "init-checkpoint",
        "--preset",
        "vl-tiny",
        "--seed",
        "3",
        "--out",
        c,
    ]);
    let opened = Checkpoint::open(&ckpt).unwrap();
    let v = opened.vision().expect("a VL-01 checkpoint").clone();
    assert!(opened.has("language_model.model.embed_tokens.weight"));
    assert!(opened.has("vision_tower.vision_model.pre_layrnorm.weight"));
    let images =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/vl/images");
    let (a, b) = (images.join("a.png"), images.join("d.jpg"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let img = v.image_token.to_string();
    let prompt = format!("5,{img},6,7,{img},8");
    let out = dir.path().join("l.safetensors");
    let logits = |image1: &str| {
        ok(&[
            "logits",
            "--checkpoint",
            c,
            "--tokens",
            &prompt,
            "--image",
            a,
            "--image",
            image1,
            "--out",
            out.to_str().unwrap(),
        ]);
        read_logits(&out)
    };
    let (shape, got) = logits(b);
    let expanded = 4 + v.feature_count(45, 70) + v.feature_count(50, 61);
    assert_eq!(shape, vec![expanded, 512]);
    // The engine's own logits for the same images.
    let model = Model::load(&opened, Cpu::default()).unwrap();
    let decode =
        |p: &str| ringbolt_model::image::Rgb::decode(&std::fs::read(p).unwrap(), 1 << 20).unwrap();
    let ids: Vec<u32> = prompt.split(',').map(|t| t.parse().unwrap()).collect();
    let (full, rows) = model
        .prompt_with_images(&ids, &[decode(a), decode(b)])
        .unwrap();
    assert_eq!(full.len(), expanded);
    let mut st = model.new_state();
    for (pos, r) in rows {
        st.set_embeddings(pos, r);
    }
    assert_eq!(got, model.forward(&mut st, &full, Logits::All).unwrap());
    // Another image, other logits.
    let (_, other) = logits(a);
    assert_ne!(got, other);
    // generate: the expanded prompt's length, and tokens.
    let line = ok(&[
        "generate",
        "--checkpoint",
        c,
        "--tokens",
        &prompt,
        "--image",
        a,
        "--image",
        b,
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    let g: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(g["prompt_tokens"], expanded);
    assert_eq!(g["tokens"].as_array().unwrap().len(), 3);
    // Refusals, with reasons.
    let refuse = |extra: &[&str], needle: &str| {
        let mut args = vec!["generate", "--checkpoint", c, "--max-new-tokens", "1"];
        args.extend_from_slice(extra);
        fails(&args, needle);
    };
    refuse(
        &["--tokens", &prompt, "--image", a],
        "2 image placeholder(s)",
    );
    refuse(&["--tokens", "5,6", "--image", a], "0 image placeholder(s)");
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    refuse(
        &[
            "--tokens",
            &format!("5,{img}"),
            "--image",
            bad.to_str().unwrap(),
        ],
        "bad.png",
    );
    refuse(
        &[
            "--tokens",
            &format!("5,{img}"),
            "--image",
            a,
            "--max-image-pixels",
            "100",
        ],
        "above the limit of 100 pixels",
    );
    let text = dir.path().join("text");
    init(&text, &[]);
    fails(
        &[
            "generate",
            "--checkpoint",
            text.to_str().unwrap(),
            "--tokens",
            "5,6",
            "--image",
            a,
            "--max-new-tokens",
            "1",
        ],
        "MiniMax-VL-01",
    );
}
