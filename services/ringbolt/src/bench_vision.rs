//! `ringbolt bench vision`: MiniMax-VL-01's vision path for one image (the processor's crops,
//! then the vision tower, the projector and the packing) at the released model's shapes,
//! against transformers on the same shapes (`scripts/reference/bench_vision_transformers.py`).

use anyhow::{Result, bail};
use clap::Args;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::image::{Rgb, crops};
use ringbolt_model::vision::VisionConfig;
use ringbolt_model::{Checkpoint, Model, ModelConfig, WeightDtype, write_random_vl_checkpoint};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct VisionBenchArgs {
    /// A VL-01 checkpoint (default: a random one with the released vision tower and projector
    /// shapes — CLIP ViT-L/14 at 336 pixels into a 6144-wide text model — written to
    /// --work-dir).
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// Where the random checkpoint is written (and found again).
    #[arg(long, default_value = "target/bench-vision")]
    work_dir: PathBuf,
    /// The image's width and height in pixels (a synthetic image).
    #[arg(long, default_value_t = 1344)]
    width: usize,
    #[arg(long, default_value_t = 1344)]
    height: usize,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// What the GEMMs multiply (`f32`, `bf16`).
    #[arg(long, default_value = "f32")]
    activations: ringbolt_kernels::Activations,
}

/// A text model just wide enough to hold the projector's output (one small layer).
fn text_config() -> ModelConfig {
    ModelConfig::text01_shape(512, 6144, 64, 1, 1, 1, 64, 64, 2)
}

/// A synthetic photo-like image: smooth colour gradients.
fn synthetic(width: usize, height: usize) -> Rgb {
    let mut img = Rgb::filled(width, height, [0; 3]);
    for y in 0..height {
        for x in 0..width {
            let i = (y * width + x) * 3;
            for c in 0..3 {
                let v = 128.0 + 100.0 * ((x as f32 / (7.0 + c as f32)) + (y as f32 / 11.0)).sin();
                img.data[i + c] = v as u8;
            }
        }
    }
    img
}

pub fn run(a: VisionBenchArgs) -> Result<()> {
    if a.width == 0 || a.height == 0 || a.repeat == 0 {
        bail!("--width, --height and --repeat must be positive");
    }
    let dir = match a.checkpoint {
        Some(d) => d,
        None => {
            let d = a.work_dir.join("vl-released-vision");
            if !d.join("config.json").exists() {
                eprintln!("writing a random VL-01 checkpoint to {}", d.display());
                write_random_vl_checkpoint(
                    &text_config(),
                    &VisionConfig::released(511),
                    1,
                    WeightDtype::Bf16,
                    &d,
                    None,
                )?;
            }
            d
        }
    };
    let t = Instant::now();
    let ckpt = Checkpoint::open(&dir)?;
    let model = Model::load(&ckpt, Cpu::new(a.activations))?;
    let load_s = t.elapsed().as_secs_f64();
    let v = ckpt
        .vision()
        .ok_or_else(|| anyhow::anyhow!("{} is not a VL-01 checkpoint", dir.display()))?
        .clone();
    let img = synthetic(a.width, a.height);
    let (mut pre, mut tower) = (f64::MAX, f64::MAX);
    let mut features = 0;
    for _ in 0..a.repeat {
        let t = Instant::now();
        let pixels = crops(&img, &v)?;
        pre = pre.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let f = model.image_features(&pixels, (a.height, a.width))?;
        tower = tower.min(t.elapsed().as_secs_f64());
        features = f.len() / model.config().hidden_size;
    }
    println!(
        "{}",
        json!({
            "bench": "vision",
            "checkpoint": dir,
            "threads": rayon::current_num_threads(),
            "activations": a.activations.to_string(),
            "image": [a.height, a.width],
            "crops": v.crops(a.height, a.width),
            "features": features,
            "load_seconds": load_s,
            "preprocess_seconds": pre,
            "tower_and_projector_seconds": tower,
            "total_seconds": pre + tower,
        })
    );
    Ok(())
}
