//! `init-checkpoint`, `logits` and `generate`: the model engine from the command line.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use ringbolt_cluster::ComputeArgs;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Activations, Backend, OnBackend, WeightFormat};
use ringbolt_model::scheduler::{
    Event, FinishReason, LocalForward, Request, Scheduler, SchedulerConfig, SeqError, SeqStats,
    Sink,
};
use ringbolt_model::{
    Checkpoint, Logits, Model, ModelConfig, Preset, SamplingParams, WeightDtype,
    tokens::parse_token_list, write_random_checkpoint, write_random_vl_checkpoint,
};
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub enum PresetArg {
    Tiny,
    Small,
    /// `tiny` with a small vision tower, in MiniMax-VL-01's layout.
    VlTiny,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct InitCheckpointArgs {
    /// Built-in model shape.
    #[arg(long, env = "RINGBOLT_PRESET", value_enum, default_value = "tiny")]
    preset: PresetArg,
    /// A config.json (either dialect) to use instead of the preset's shape.
    #[arg(long, env = "RINGBOLT_CONFIG")]
    config: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, env = "RINGBOLT_SEED", default_value_t = 0)]
    seed: u64,
    /// On-disk dtype.
    #[arg(long, env = "RINGBOLT_DTYPE", value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Output directory.
    #[arg(long, env = "RINGBOLT_OUT")]
    out: PathBuf,
    /// Shard the weights into files of at most this many bytes, with an index.
    #[arg(long, env = "RINGBOLT_MAX_SHARD_BYTES")]
    max_shard_bytes: Option<u64>,
}

#[derive(Args)]
#[group(id = "prompt", multiple = false)]
pub struct PromptArgs {
    /// Token ids, separated by commas.
    #[arg(long, env = "RINGBOLT_TOKENS", group = "prompt")]
    tokens: Option<String>,
    /// A file of token ids separated by commas and/or whitespace.
    #[arg(long, env = "RINGBOLT_TOKENS_FILE", group = "prompt")]
    tokens_file: Option<PathBuf>,
}

/// `--image FILE` (repeatable): images for a MiniMax-VL-01 checkpoint's prompt.
#[derive(Args, Clone, Debug, Default)]
pub struct ImageArgs {
    /// An image (PNG or JPEG) for the prompt's next image placeholder (the checkpoint's
    /// `image_token_index`; one per image, in order). Each placeholder is expanded to the
    /// image's feature count, as the reference processor does. Repeatable.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Largest image accepted, in pixels.
    #[arg(long, env = "RINGBOLT_MAX_IMAGE_PIXELS", default_value_t = ringbolt_model::image::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
}

impl ImageArgs {
    /// The images, decoded.
    pub fn read(&self) -> Result<Vec<ringbolt_model::image::Rgb>> {
        self.images
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                ringbolt_model::image::Rgb::decode(&bytes, self.max_image_pixels)
                    .with_context(|| format!("image {}", p.display()))
            })
            .collect()
    }
}

impl PromptArgs {
    pub fn read(&self) -> Result<Vec<u32>> {
        let ids = match (&self.tokens, &self.tokens_file) {
            (Some(t), _) => parse_token_list(t)?,
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                parse_token_list(&text).with_context(|| format!("in {}", f.display()))?
            }
            (None, None) => bail!("give --tokens or --tokens-file"),
        };
        if ids.is_empty() {
            bail!("the prompt is empty");
        }
        Ok(ids)
    }
}

#[derive(Args)]
pub struct LogitsArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    images: ImageArgs,
    /// Prefill this many tokens at once, then decode the rest one at a time (default: all).
    #[arg(long, env = "RINGBOLT_PREFILL_LEN")]
    prefill_len: Option<usize>,
    /// Lightning prefill block size (default: the config's).
    #[arg(long, env = "RINGBOLT_BLOCK_SIZE")]
    block_size: Option<usize>,
    #[command(flatten)]
    compute: ringbolt_cluster::ComputeArgs,
    /// Output safetensors file with one f32 tensor `logits` of shape [T, vocab].
    #[arg(long, env = "RINGBOLT_OUT")]
    out: PathBuf,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, env = "RINGBOLT_CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    compute: ringbolt_cluster::ComputeArgs,
    /// Number of tokens to generate (at most; the model's end-of-sequence tokens stop it).
    #[arg(long, env = "RINGBOLT_MAX_NEW_TOKENS")]
    max_new_tokens: usize,
    /// Keep generating past the model's end-of-sequence tokens.
    #[arg(long, env = "RINGBOLT_IGNORE_EOS")]
    ignore_eos: bool,
    /// Sampling temperature (0: greedy).
    #[arg(long, env = "RINGBOLT_TEMPERATURE", default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, env = "RINGBOLT_TOP_P", default_value_t = 1.0)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, env = "RINGBOLT_SEED", default_value_t = 0)]
    seed: u64,
}

pub fn init_checkpoint(a: InitCheckpointArgs) -> Result<()> {
    let preset = match a.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::Small => Preset::Small,
        PresetArg::VlTiny => Preset::VlTiny,
    };
    let (cfg, vision) = match &a.config {
        Some(path) => (ModelConfig::from_file(path)?, None),
        None => (preset.config(), preset.vision()),
    };
    let dtype = match a.dtype {
        DtypeArg::F32 => WeightDtype::F32,
        DtypeArg::Bf16 => WeightDtype::Bf16,
    };
    if a.max_shard_bytes == Some(0) {
        bail!("--max-shard-bytes must be positive");
    }
    let shards = match &vision {
        Some(v) => write_random_vl_checkpoint(&cfg, v, a.seed, dtype, &a.out, a.max_shard_bytes)?,
        None => write_random_checkpoint(&cfg, a.seed, dtype, &a.out, a.max_shard_bytes)?,
    };
    // The text files: a tokenizer trained on a bundled text and MiniMax-01's chat template.
    let text = if cfg.vocab_size >= ringbolt_text::init::MIN_VOCAB {
        // A VL-01 model's image placeholder is a special token of its own, as released.
        let last: &[&str] = match &vision {
            Some(v) if v.image_token as usize + 1 == cfg.vocab_size => {
                &[ringbolt_model::vision::IMAGE_PLACEHOLDER]
            }
            _ => &[],
        };
        ringbolt_text::init::write(&a.out, cfg.vocab_size, last)?;
        ", tokenizer.json, tokenizer_config.json"
    } else {
        eprintln!(
            "no tokenizer written: a vocabulary of {} ids is below the {} a byte-level tokenizer needs",
            cfg.vocab_size,
            ringbolt_text::init::MIN_VOCAB
        );
        ""
    };
    eprintln!(
        "wrote {} ({} safetensors file{}{text})",
        a.out.display(),
        shards,
        if shards == 1 { "" } else { "s" }
    );
    Ok(())
}

pub fn load_model(dir: &Path) -> Result<Model<Cpu>> {
    load_model_as(dir, WeightFormat::Bf16, Activations::F32)
}

/// [`load_model`] with its weights held as `weights` and GEMMs taking `activations`.
pub fn load_model_as(
    dir: &Path,
    weights: WeightFormat,
    activations: Activations,
) -> Result<Model<Cpu>> {
    let ckpt = Checkpoint::open(dir)?;
    Ok(Model::load_parts(
        &ckpt,
        Cpu::new(activations),
        true,
        weights,
    )?)
}

pub use ringbolt_kernels::Device;

/// Work to do with a model on whatever backend the device gives.
trait ModelTask {
    fn run<B: Backend>(self, model: Model<B>) -> Result<()>;
}

/// Loads the checkpoint onto a backend and runs the task there.
struct Load<'a, T> {
    ckpt: &'a Checkpoint,
    weights: WeightFormat,
    task: T,
}

impl<T: ModelTask> OnBackend for Load<'_, T> {
    type Output = Result<()>;
    fn run<B: Backend>(self, backend: B) -> Result<()> {
        let model = Model::load_parts(self.ckpt, backend, true, self.weights)?;
        self.task.run(model)
    }
}

fn on_device(dir: &Path, compute: ComputeArgs, task: impl ModelTask) -> Result<()> {
    let ckpt = Checkpoint::open(dir)?;
    compute.open(Load {
        ckpt: &ckpt,
        weights: compute.weights,
        task,
    })?
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let (dir, compute) = (a.checkpoint.clone(), a.compute);
    on_device(&dir, compute, a)
}

impl ModelTask for LogitsArgs {
    fn run<B: Backend>(self, mut model: Model<B>) -> Result<()> {
        let a = self;
        if let Some(b) = a.block_size {
            if b == 0 {
                bail!("--block-size must be positive");
            }
            model.set_block_size(b);
        }
        let (ids, embeddings) = model.prompt_with_images(&a.prompt.read()?, &a.images.read()?)?;
        let t = ids.len();
        let k = a.prefill_len.unwrap_or(t);
        if k == 0 || k > t {
            bail!("--prefill-len must be between 1 and the number of tokens ({t}), got {k}");
        }
        model.check_tokens(0, &ids)?;
        let vocab = model.config().vocab_size;
        let mut state = model.new_state();
        for (pos, rows) in embeddings {
            state.set_embeddings(pos, rows);
        }
        let mut all = model.forward(&mut state, &ids[..k], Logits::All)?;
        for &id in &ids[k..] {
            all.extend(model.forward(&mut state, &[id], Logits::All)?);
        }
        let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![t, vocab], &bytes)?;
        safetensors::serialize_to_file([("logits", view)], None, &a.out)
            .with_context(|| format!("writing {}", a.out.display()))?;
        Ok(())
    }
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let (dir, compute) = (a.checkpoint.clone(), a.compute);
    on_device(&dir, compute, a)
}

impl ModelTask for GenerateArgs {
    fn run<B: Backend>(self, model: Model<B>) -> Result<()> {
        let a = self;
        let (ids, embeddings) = model.prompt_with_images(&a.prompt.read()?, &a.images.read()?)?;
        let n = ids.len();
        let max_new_tokens = u32::try_from(a.max_new_tokens)
            .map_err(|_| anyhow::anyhow!("--max-new-tokens {} is too large", a.max_new_tokens))?;
        // One sequence through the same scheduler core the servers use: the same stop rules,
        // the same checks.
        let mut sched = Scheduler::new(SchedulerConfig {
            max_batch: 1,
            prefill_chunk: n.max(1),
        });
        let mut out = Collect::default();
        sched.admit(
            &model,
            Request {
                prompt: ids,
                max_new_tokens,
                sampling: SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                },
                stop_tokens: Vec::new(),
                ignore_eos: a.ignore_eos,
                prefill_chunk: None,
                context_parallel: 1,
                // One generation: nothing to share a prefix with.
                context_cache: false,
                embeddings,
            },
            &mut out,
        );
        while !sched.is_idle() {
            sched.step(&model, &LocalForward);
        }
        let (reason, stats) = match out.end {
            Some(Ok(end)) => end,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("the sequence ended without a result"),
        };
        let line = serde_json::json!({
            "tokens": out.tokens,
            "finish_reason": if reason == FinishReason::Stop { "stop" } else { "length" },
            "prompt_tokens": n,
            "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
        });
        println!("{line}");
        Ok(())
    }
}

/// A sequence's tokens and end, as `generate` prints them.
#[derive(Default)]
struct Collect {
    tokens: Vec<u32>,
    end: Option<std::result::Result<(FinishReason, SeqStats), SeqError>>,
}

impl Sink for &mut Collect {
    fn send(&mut self, event: Event<'_>) -> bool {
        match event {
            Event::Token { token, .. } => self.tokens.push(token),
            Event::Finished { reason, stats } => self.end = Some(Ok((reason, stats.clone()))),
            Event::Failed(e) => self.end = Some(Err(e)),
            Event::Progress { .. } | Event::ContextParallel { .. } | Event::Cached { .. } => {}
        }
        true
    }
}
