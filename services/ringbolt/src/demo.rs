//! `ringbolt demo`: the README's first command. Writes the `small` random checkpoint to a
//! cache directory if absent, runs a long prompt through the engine in chunks with progress,
//! streams the generated tokens, and ends with a short report.

use crate::model_cli::load_model;
use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringbolt_model::{
    Logits, Preset, Sampler, SamplingParams, WeightDtype, write_random_checkpoint,
};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo checkpoint lives (written on first use).
    #[arg(long, env = "RINGBOLT_DEMO_CHECKPOINT")]
    checkpoint: Option<PathBuf>,
    /// Prompt length in tokens (random ids).
    #[arg(long, env = "RINGBOLT_DEMO_PROMPT_TOKENS", default_value_t = 32_768)]
    prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, env = "RINGBOLT_MAX_NEW_TOKENS", default_value_t = 32)]
    max_new_tokens: usize,
    /// Prefill chunk size (tokens per forward call).
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 4096)]
    prefill_chunk: usize,
}

fn default_checkpoint() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ringbolt").join("small-seed0")
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.max_new_tokens == 0 || a.prefill_chunk == 0 {
        bail!("--prompt-tokens, --max-new-tokens and --prefill-chunk must be positive");
    }
    let dir = a.checkpoint.unwrap_or_else(default_checkpoint);
    if !dir.join("config.json").exists() {
        eprintln!(
            "writing the `small` random checkpoint to {} ...",
            dir.display()
        );
        write_random_checkpoint(&Preset::Small.config(), 0, WeightDtype::Bf16, &dir, None)
            .with_context(|| format!("writing {}", dir.display()))?;
    }
    let t_load = Instant::now();
    let model = load_model(&dir)?;
    let cfg = model.config();
    eprintln!(
        "loaded {} in {:.1}s: {} layers ({} lightning), hidden {}, {} experts top-{}, vocab {}",
        dir.display(),
        t_load.elapsed().as_secs_f64(),
        cfg.num_layers(),
        cfg.layers
            .iter()
            .filter(|k| **k == ringbolt_model::LayerKind::Lightning)
            .count(),
        cfg.hidden_size,
        cfg.num_experts,
        cfg.experts_per_tok,
        cfg.vocab_size
    );
    let mut rng = StdRng::seed_from_u64(42);
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    model.check_tokens(0, &prompt)?;

    let bar = ProgressBar::new(prompt.len() as u64).with_style(
        ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut state = model.new_state();
    let start = Instant::now();
    let mut logits = Vec::new();
    let chunks = prompt.chunks(a.prefill_chunk).count();
    for (i, chunk) in prompt.chunks(a.prefill_chunk).enumerate() {
        let want = if i + 1 == chunks {
            Logits::Last
        } else {
            Logits::None
        };
        logits = model.forward(&mut state, chunk, want)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mut sampler = Sampler::new(SamplingParams::default())?;
    let mut next = sampler.sample(&logits);
    let ttft = start.elapsed();
    print!("tokens:");
    let mut out = vec![next];
    print!(" {next}");
    std::io::stdout().flush().ok();
    let t_dec = Instant::now();
    while out.len() < a.max_new_tokens {
        logits = model.forward(&mut state, &[next], Logits::Last)?;
        next = sampler.sample(&logits);
        out.push(next);
        print!(" {next}");
        std::io::stdout().flush().ok();
    }
    println!();
    let dec = t_dec.elapsed().as_secs_f64();
    println!("prompt tokens:        {}", prompt.len());
    println!(
        "prefill:              {:.0} tokens/s",
        prompt.len() as f64 / ttft.as_secs_f64()
    );
    println!("time to first token:  {:.2} s", ttft.as_secs_f64());
    if out.len() > 1 {
        println!(
            "decode:               {:.1} tokens/s",
            (out.len() - 1) as f64 / dec
        );
    }
    println!(
        "sequence cache:       {:.1} MiB (lightning states are constant in length; softmax KV grows)",
        state.cache_bytes(model.backend()) as f64 / (1 << 20) as f64
    );
    Ok(())
}
