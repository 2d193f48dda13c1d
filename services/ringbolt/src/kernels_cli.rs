//! `ringbolt kernels compile`: every CUDA kernel through NVRTC, no GPU needed.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct KernelsArgs {
    #[command(subcommand)]
    cmd: KernelsCmd,
}

#[derive(Subcommand)]
enum KernelsCmd {
    /// Compile every kernel for a GPU architecture; one line per kernel ending in `ok`.
    Compile {
        /// GPU architecture, e.g. sm_90 (H800/H100/H200).
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Directory with the CUDA headers (cuda_bf16.h); default `$CUDA_HOME/include`.
        #[arg(long, env = "RINGBOLT_CUDA_INCLUDE")]
        cuda_include: Option<PathBuf>,
    },
}

pub fn run(a: KernelsArgs) -> Result<()> {
    match a.cmd {
        KernelsCmd::Compile { arch, cuda_include } => compile(&arch, cuda_include),
    }
}

fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .is_some_and(|n| n.len() >= 2 && n.chars().all(|c| c.is_ascii_alphanumeric()));
    if !ok {
        bail!("--arch must look like sm_90, got `{arch}`");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn compile(arch: &str, include: Option<PathBuf>) -> Result<()> {
    use ringbolt_kernels::cuda;
    check_arch(arch)?;
    let dirs = cuda::include_dirs(include.as_deref());
    if dirs.is_empty() {
        bail!(
            "no CUDA headers: pass --cuda-include DIR (the directory holding cuda_bf16.h) or set CUDA_HOME"
        );
    }
    let mut n = 0;
    for (module, src) in cuda::SOURCES {
        let c = cuda::compile_module(module, src, arch, &dirs, false)?;
        for k in &c.kernels {
            println!("{k:<20} {module:<12} {arch} ok");
            n += 1;
        }
    }
    eprintln!(
        "{n} kernels compiled for {arch} (NVRTC {})",
        cuda::nvrtc_version()
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compile(arch: &str, _include: Option<PathBuf>) -> Result<()> {
    check_arch(arch)?;
    bail!(
        "this ringbolt was built without the `cuda` feature: build it with \
         `cargo build --release --features cuda`"
    )
}
