//! MiniMax-VL-01 against transformers (LlavaNextForConditionalGeneration with a CLIP vision tower
//! and the MiniMax text model, f32; scripts/reference/gen_vl_fixtures.py): each image's features
//! after the vision tower, the projector and the packing, and the logits of a prompt holding two
//! images, within 1e-4 of the largest reference value.

mod common;
use common::assert_close;

use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::{Checkpoint, Logits, Model};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference/vl")
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Self {
        Expected {
            bytes: std::fs::read(dir().join("expected.safetensors")).expect("fixture present"),
        }
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn tokens(&self) -> Vec<u32> {
        self.tokens_named("tokens")
    }

    fn tokens_named(&self, name: &str) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }

    fn image_sizes(&self) -> Vec<(usize, usize)> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata().as_ref().unwrap()["image_sizes"]
            .split(';')
            .map(|hw| {
                let (h, w) = hw.split_once(',').unwrap();
                (h.parse().unwrap(), w.parse().unwrap())
            })
            .collect()
    }
}

#[test]
fn image_features_match_transformers() {
    let ckpt = Checkpoint::open(&dir().join("checkpoint")).unwrap();
    let v = ckpt.vision().expect("a VL-01 checkpoint").clone();
    assert_eq!((v.feature_layer, v.num_layers, v.image_token), (3, 3, 95));
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    let e = Expected::load();
    for (i, size) in e.image_sizes().into_iter().enumerate() {
        let want = e.f32s(&format!("features_{i}"));
        assert_eq!(
            want.len(),
            v.feature_count(size.0, size.1) * ckpt.config().hidden_size,
            "image {i}: the placeholder count"
        );
        let got = model
            .image_features(&e.f32s(&format!("pixels_{i}")), size)
            .unwrap();
        assert_close(&got, &want, &format!("image {i} ({size:?}) features"));
    }
    // Pixels for the wrong number of crops are refused, not misread.
    let err = model
        .image_features(&e.f32s("pixels_0"), e.image_sizes()[1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("crops"), "{err}");
}

/// The prompt's placeholder runs take the images' features (in order); the logits of the whole
/// prompt match, in one forward pass and in chunks that cut through an image.
#[test]
fn logits_of_a_prompt_with_two_images_match_transformers() {
    let ckpt = Checkpoint::open(&dir().join("checkpoint")).unwrap();
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    let e = Expected::load();
    let tokens = e.tokens();
    let image = ckpt.vision().unwrap().image_token;
    let features: Vec<Vec<f32>> = e
        .image_sizes()
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            model
                .image_features(&e.f32s(&format!("pixels_{i}")), s)
                .unwrap()
        })
        .collect();
    // Each run of placeholders, in order.
    let mut runs = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == image {
            let s = i;
            while i < tokens.len() && tokens[i] == image {
                i += 1;
            }
            runs.push(s);
        } else {
            i += 1;
        }
    }
    assert_eq!(runs.len(), features.len());
    let want = e.f32s("logits");
    for chunk in [tokens.len(), 7] {
        let mut st = model.new_state();
        for (&pos, f) in runs.iter().zip(&features) {
            st.set_embeddings(pos, f.clone());
        }
        let mut got = Vec::new();
        for part in tokens.chunks(chunk) {
            got.extend(model.forward(&mut st, part, Logits::All).unwrap());
        }
        assert_close(&got, &want, &format!("logits, chunks of {chunk}"));
    }
    // Without the images the logits differ: the features are what made them match.
    let mut st = model.new_state();
    let plain = model.forward(&mut st, &tokens, Logits::All).unwrap();
    let diff = plain
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-2, "{diff}");
}

/// The processor's crops of PNG and JPEG files (decoded, resized with Pillow's bicubic, fitted
/// into the best grid resolution, tiled, normalized) against the released processor's, as the
/// fixture script computed them with Pillow (and checked against transformers'): equal for PNG;
/// for JPEG within what two JPEG decoders may differ by.
#[test]
fn crops_of_image_files_match_the_reference_processor() {
    use ringbolt_model::image::{Rgb, crops};
    let ckpt = Checkpoint::open(&dir().join("checkpoint")).unwrap();
    let v = ckpt.vision().unwrap();
    let e = Expected::load();
    for (name, file) in [
        ("a", "a.png"),
        ("b", "b.png"),
        ("c", "c.png"),
        ("d", "d.jpg"),
    ] {
        let bytes = std::fs::read(dir().join("images").join(file)).unwrap();
        let img = Rgb::decode(&bytes, 1 << 20).unwrap();
        let got = crops(&img, v).unwrap();
        let want = e.f32s(&format!("processed_{name}"));
        assert_eq!(got.len(), want.len(), "{file}: crops");
        assert_eq!(got.len(), v.crops(img.height, img.width) * 3 * 28 * 28);
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{file}: max pixel difference {err:e}");
        // One level of 8 bits is 1/255/0.26 ≈ 0.015 after normalization.
        let tol = if file.ends_with(".png") { 1e-6 } else { 0.1 };
        assert!(err <= tol, "{file}: {err}");
    }
}

/// Images from files through the processor and the model: the logits transformers computes.
#[test]
fn logits_of_a_prompt_with_two_image_files_match_transformers() {
    use ringbolt_model::image::{Rgb, crops};
    let ckpt = Checkpoint::open(&dir().join("checkpoint")).unwrap();
    let model = Model::load(&ckpt, Cpu::default()).unwrap();
    let v = ckpt.vision().unwrap();
    let e = Expected::load();
    let tokens = e.tokens_named("tokens_files");
    let mut st = model.new_state();
    let mut pos = 0;
    for file in ["a.png", "b.png"] {
        let img = Rgb::decode(
            &std::fs::read(dir().join("images").join(file)).unwrap(),
            1 << 20,
        )
        .unwrap();
        let f = model
            .image_features(&crops(&img, v).unwrap(), (img.height, img.width))
            .unwrap();
        while tokens[pos] != v.image_token {
            pos += 1;
        }
        let n = f.len() / ckpt.config().hidden_size;
        assert!(tokens[pos..pos + n].iter().all(|&t| t == v.image_token));
        st.set_embeddings(pos, f);
        pos += n;
    }
    let got = model.forward(&mut st, &tokens, Logits::All).unwrap();
    assert_close(&got, &e.f32s("logits_files"), "logits of two image files");
}
