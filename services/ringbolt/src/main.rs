//! `ringbolt`: one binary, one subcommand per role and tool.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod demo;
mod model_cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ringbolt",
    version,
    about = "Serve MiniMax-01 at very long contexts"
)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, env = "RINGBOLT_THREADS", global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a long prompt through a small random model and report its speed (no set-up).
    Demo(demo::DemoArgs),
    /// Write a random Hugging Face-format checkpoint.
    InitCheckpoint(model_cli::InitCheckpointArgs),
    /// Run a prompt through the model and write the logits of every position.
    Logits(model_cli::LogitsArgs),
    /// Generate tokens after a prompt; prints one JSON line.
    Generate(model_cli::GenerateArgs),
    /// Benchmarks of the model engine (prints JSON with ratios against in-run baselines).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
    {
        eprintln!("error: cannot start {n} compute threads: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::InitCheckpoint(a) => model_cli::init_checkpoint(a),
        Command::Logits(a) => model_cli::logits(a),
        Command::Generate(a) => model_cli::generate(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
