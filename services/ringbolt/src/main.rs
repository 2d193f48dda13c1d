//! `ringbolt`: one binary, one subcommand per role and tool.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_cache;
mod bench_http;
mod bench_kernels;
mod bench_tls;
mod bench_vision;
mod client;
mod demo;
mod kernels_cli;
mod local_cluster;
mod model_cli;
mod plan_cli;
mod server;

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
    /// Bearer token for a server started with --auth-tokens-file (submit, jobs, status).
    #[arg(long, env = "RINGBOLT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
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
    /// Every role in one process: the public API, the job store and the engine.
    Standalone(server::StandaloneArgs),
    /// The cluster's coordinator: public API, job records in etcd, placement plan, job driving.
    Coordinator(ringbolt_cluster::coordinator::CoordinatorArgs),
    /// A cluster attention worker: attention weights; MoE layers through the expert workers.
    AttentionWorker(ringbolt_cluster::attention::AttentionWorkerArgs),
    /// A cluster expert worker: holds the experts the plan gives it.
    ExpertWorker(ringbolt_cluster::expert::ExpertWorkerArgs),
    /// Submit a job (streams the prompt, then follows the job).
    Submit(client::SubmitArgs),
    /// List, inspect, follow or cancel jobs.
    Jobs(client::JobsArgs),
    /// The cluster's members and placement.
    Status(client::StatusArgs),
    /// What the model needs on a GPU cluster: placement, memory, time.
    Plan(plan_cli::PlanArgs),
    /// CUDA kernels: compile every one with NVRTC (no GPU needed).
    Kernels(kernels_cli::KernelsArgs),
    /// Benchmarks of the model engine (prints JSON with ratios against in-run baselines).
    Bench(bench::BenchArgs),
}

impl Command {
    /// A serving role's name and its OTLP collector (`--otlp-endpoint`).
    fn otlp(&self) -> Option<(&'static str, &str)> {
        let (role, t) = match self {
            Command::Standalone(a) => ("standalone", &a.serve.telemetry),
            Command::Coordinator(a) => ("coordinator", &a.common.serve.telemetry),
            Command::AttentionWorker(a) => ("attention-worker", &a.common.serve.telemetry),
            Command::ExpertWorker(a) => ("expert-worker", &a.common.serve.telemetry),
            _ => return None,
        };
        Some((role, t.otlp_endpoint.as_deref()?))
    }

    /// The CA a client command dials TLS servers with (`--tls-ca`).
    fn tls_ca(&self) -> Option<std::path::PathBuf> {
        match self {
            Command::Submit(a) => a.tls_ca.clone(),
            Command::Jobs(a) => a.tls_ca.clone(),
            Command::Status(a) => a.tls_ca.clone(),
            _ => None,
        }
    }
}

/// Runs `f` on the process's runtime (entered in `main`).
pub(crate) fn run_async(
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::runtime::Handle::current().block_on(f)
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_t`, v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory the process frees stays with it for reuse instead of going back to the OS after a
/// delay (mimalloc's default). A forward pass frees and allocates activation buffers of many
/// sizes; handed back, each new one was faulted in and zeroed by the kernel again, which took
/// 0.5–0.6 s of system time in a 4096-token `small` prefill of 1.3 s (0.2–0.3 s kept). The
/// process's peak stays what it was: freed memory is reused, not added to.
/// `MIMALLOC_PURGE_DELAY` (milliseconds) still sets it.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores an option value that mimalloc reads when it decides
        // whether to purge; it touches no memory of ours.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    // One runtime for the process; entered now so that the trace exporter (if any) starts
    // on it with the logs.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let _entered = rt.enter();
    let _logs = match ringbolt_shell::telemetry::init_logs(cli.command.otlp()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
    {
        eprintln!("error: cannot start {n} compute threads: {e}");
        std::process::exit(2);
    }
    if let Err(e) = client::set_dial(cli.command.tls_ca(), cli.token.as_deref()) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::InitCheckpoint(a) => model_cli::init_checkpoint(a),
        Command::Logits(a) => model_cli::logits(a),
        Command::Generate(a) => model_cli::generate(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => run_async(demo::run(a)),
        Command::Standalone(a) => run_async(server::standalone(a)),
        Command::Coordinator(a) => {
            run_async(async { Ok(ringbolt_cluster::coordinator::run(a).await?) })
        }
        Command::AttentionWorker(a) => {
            run_async(async { Ok(ringbolt_cluster::attention::run(a).await?) })
        }
        Command::ExpertWorker(a) => {
            run_async(async { Ok(ringbolt_cluster::expert::run(a).await?) })
        }
        Command::Submit(a) => run_async(client::submit(a)),
        Command::Jobs(a) => run_async(client::jobs(a)),
        Command::Status(a) => run_async(client::status(a)),
        Command::Plan(a) => plan_cli::run(a),
        Command::Kernels(a) => kernels_cli::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
