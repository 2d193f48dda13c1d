//! The CUDA side of the compute interface (feature `cuda`): the kernel sources under
//! `kernels/cuda/`, their compilation by NVRTC for a GPU architecture (cached on disk by source,
//! architecture and compiler version), and device probing. cudarc loads the CUDA libraries at
//! run time, so this builds, and reports "no CUDA" cleanly, on machines without them.

use std::path::{Path, PathBuf};

/// `(module, source)` of every kernel file; `common.cuh` is inlined where included.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../cuda/elementwise.cu")),
    ("rope", include_str!("../cuda/rope.cu")),
    ("route", include_str!("../cuda/route.cu")),
    ("lightning", include_str!("../cuda/lightning.cu")),
    ("attention", include_str!("../cuda/attention.cu")),
    ("w8a16", include_str!("../cuda/w8a16.cu")),
];

const COMMON: &str = include_str!("../cuda/common.cuh");

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "the NVRTC library (libnvrtc) was not found: put CUDA 13's lib directory on \
         LD_LIBRARY_PATH (or `pip install nvidia-cuda-nvrtc==13.0.88`)"
    )]
    NoNvrtc,
    #[error("no CUDA driver on this machine (libcuda not found)")]
    NoDriver,
    #[error("kernel `{kernel}` (module {module}) does not compile for {arch}:\n{log}")]
    Compile {
        module: String,
        kernel: String,
        arch: String,
        log: String,
    },
    #[error("module {module}: kernel `{kernel}` is missing from the compiled PTX")]
    Missing { module: String, kernel: String },
    #[error("CUDA: {0}")]
    Driver(String),
}

/// A kernel's name and the first and last source lines of its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDef {
    pub name: String,
    pub lines: (usize, usize),
}

/// The source as NVRTC sees it: `#include "common.cuh"` replaced by the header's text.
pub fn expanded(source: &str) -> String {
    source.replace("#include \"common.cuh\"", COMMON)
}

/// The `extern "C" __global__` kernels (written `RB_EXTERN void name(`) of an expanded source.
pub fn kernels_of(source: &str) -> Vec<KernelDef> {
    let lines: Vec<&str> = source.lines().collect();
    let mut out: Vec<KernelDef> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        // `RB_EXTERN void name(`, or with launch bounds: `RB_EXTERN void __launch_bounds__(..)`
        // and the name opening the next line.
        let Some(rest) = l.trim_start().strip_prefix("RB_EXTERN void ") else {
            continue;
        };
        let rest = match rest.strip_prefix("__launch_bounds__(") {
            Some(b) => match b.split_once(')') {
                Some((_, after)) if after.trim().is_empty() => {
                    lines.get(i + 1).copied().unwrap_or("")
                }
                Some((_, after)) => after,
                None => continue,
            },
            None => rest,
        };
        if let Some(name) = rest
            .trim_start()
            .split('(')
            .next()
            .filter(|n| !n.is_empty())
        {
            if let Some(prev) = out.last_mut() {
                prev.lines.1 = i;
            }
            out.push(KernelDef {
                name: name.trim().to_string(),
                lines: (i + 1, lines.len()),
            });
        }
    }
    out
}

/// The kernel whose definition holds source line `line` (1-based), if any.
fn kernel_at(defs: &[KernelDef], line: usize) -> Option<&KernelDef> {
    defs.iter().find(|k| line >= k.lines.0 && line <= k.lines.1)
}

/// The first `(LINE)` an NVRTC log names (`name(LINE): error: ...`).
fn first_error_line(log: &str) -> Option<usize> {
    log.lines().find(|l| l.contains("error")).and_then(|l| {
        let open = l.find('(')?;
        let close = l[open..].find(')')? + open;
        l[open + 1..close].parse().ok()
    })
}

/// Include directories: `explicit` if given, else `$RINGBOLT_CUDA_INCLUDE`, else
/// `$CUDA_HOME/include`, else `/usr/local/cuda/include` when it exists.
pub fn include_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("RINGBOLT_CUDA_INCLUDE").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        v.push(PathBuf::from(h).join("include"));
    }
    let default = PathBuf::from("/usr/local/cuda/include");
    if default.exists() {
        v.push(default);
    }
    v
}

/// One compiled module: its PTX and the kernels in it.
pub struct Compiled {
    pub module: String,
    pub ptx: String,
    pub kernels: Vec<String>,
}

/// Compiles (or loads from the cache) every module for `arch` (e.g. `sm_90`), checking that
/// each kernel is in the PTX.
pub fn compile_all(arch: &str, include: &[PathBuf]) -> Result<Vec<Compiled>, CudaError> {
    SOURCES
        .iter()
        .map(|(m, s)| compile_module(m, s, arch, include, true))
        .collect()
}

/// Compiles one module; with `cached`, reuses (and fills) the PTX cache under
/// `$XDG_CACHE_HOME/ringbolt/kernels`, keyed by source, architecture and NVRTC version.
pub fn compile_module(
    module: &str,
    source: &str,
    arch: &str,
    include: &[PathBuf],
    cached: bool,
) -> Result<Compiled, CudaError> {
    use cudarc::nvrtc::{CompileError, CompileOptions};
    // SAFETY: only tries to load the library (dlopen); calls nothing in it.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let src = expanded(source);
    let defs = kernels_of(&src);
    let version = nvrtc_version();
    let cache = if cached {
        cache_path(module, &src, arch, &version)
    } else {
        None
    };
    let ptx = match cache.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(p) => p,
        None => {
            let opts = CompileOptions {
                include_paths: include.iter().map(|p| p.display().to_string()).collect(),
                options: vec![
                    format!("--gpu-architecture={}", arch.replace("sm_", "compute_")),
                    "--std=c++17".into(),
                ],
                name: Some(format!("{module}.cu")),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| {
                let log = match &e {
                    CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                    other => format!("{other:?}"),
                };
                let kernel = first_error_line(&log)
                    .and_then(|l| kernel_at(&defs, l))
                    .map(|k| k.name.clone())
                    .unwrap_or_else(|| {
                        defs.iter()
                            .map(|k| k.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    });
                CudaError::Compile {
                    module: module.into(),
                    kernel,
                    arch: arch.into(),
                    log,
                }
            })?;
            let text = ptx.to_src();
            if let Some(p) = &cache
                && let Some(dir) = p.parent()
                && std::fs::create_dir_all(dir).is_ok()
            {
                // Written aside and renamed: a process starting at the same time never reads
                // a half-written file.
                let tmp = p.with_extension(format!("ptx.{}", std::process::id()));
                if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, p).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            text
        }
    };
    for k in &defs {
        if !ptx.contains(&format!(".entry {}(", k.name))
            && !ptx.contains(&format!(".entry {}\n", k.name))
        {
            return Err(CudaError::Missing {
                module: module.into(),
                kernel: k.name.clone(),
            });
        }
    }
    Ok(Compiled {
        module: module.into(),
        ptx,
        kernels: defs.into_iter().map(|k| k.name).collect(),
    })
}

/// What the `scatter_add_rows` kernel takes: the rows to add, grouped by destination.
#[derive(Debug, Default, PartialEq)]
pub struct Unpermute {
    /// Destination rows, each once.
    pub dst: Vec<u32>,
    /// `starts[k]..starts[k + 1]` index `src` and `weights` for `dst[k]`.
    pub starts: Vec<u32>,
    /// Rows of `y` to add.
    pub src: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Unpermute {
    /// From `(destination row, row of y, weight)` entries; a destination's rows keep the order
    /// of the entries, so the kernel adds them in that order (for the experts' outputs, the
    /// order of adding the experts one after another, as the CPU does).
    pub fn new(entries: impl IntoIterator<Item = (u32, u32, f32)>) -> Self {
        let mut e: Vec<(u32, u32, f32)> = entries.into_iter().collect();
        e.sort_by_key(|&(d, _, _)| d); // stable: keeps each destination's order
        let mut u = Unpermute::default();
        for (i, &(d, s, w)) in e.iter().enumerate() {
            if i == 0 || e[i - 1].0 != d {
                u.dst.push(d);
                u.starts.push(i as u32);
            }
            u.src.push(s);
            u.weights.push(w);
        }
        u.starts.push(e.len() as u32);
        u
    }
}

/// The NVRTC version as `major.minor` (empty when it cannot be asked).
pub fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked by the caller); the call writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        String::new()
    }
}

fn cache_path(module: &str, src: &str, arch: &str, version: &str) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (src, arch, version).hash(&mut h);
    Some(
        base.join("ringbolt")
            .join("kernels")
            .join(format!("{module}-{arch}-{:016x}.ptx", h.finish())),
    )
}

/// CUDA devices on this machine (0 or an error when there is no driver).
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: only tries to load the library (dlopen); calls nothing in it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(|e| CudaError::Driver(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_lists_its_kernels() {
        let mut all = Vec::new();
        for (m, s) in SOURCES {
            let defs = kernels_of(&expanded(s));
            assert!(!defs.is_empty(), "{m} has no kernels");
            all.extend(defs.into_iter().map(|d| d.name));
        }
        for k in [
            "rms_norm",
            "layer_norm",
            "add_bias",
            "gelu_inplace",
            "swiglu",
            "scatter_add_rows",
            "rope_inplace",
            "rope_rows",
            "cache_append_rows",
            "route_topk",
            "lightning_prefill",
            "lightning_block_kv",
            "lightning_scan",
            "lightning_block_out",
            "lightning_fused",
            "lightning_decode",
            "attention",
            "attention_tc",
            "attention_decode_tc",
            "attention_merge_splits",
            "attention_merge",
        ] {
            assert!(all.iter().any(|a| a == k), "missing kernel {k}");
        }
        assert!(!expanded(SOURCES[0].1).contains("#include \"common.cuh\""));
    }

    #[test]
    fn kernels_are_found_with_and_without_launch_bounds() {
        let src = "RB_EXTERN void __launch_bounds__(128)\nfoo(int x) {\n}\n\
                   RB_EXTERN void __launch_bounds__(256, 2) baz(int y) {}\n\
                   RB_EXTERN void bar(int y) {}\n";
        let names: Vec<String> = kernels_of(src).into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["foo", "baz", "bar"]);
    }

    #[test]
    fn unpermute_groups_rows_by_destination_in_entry_order() {
        let u = Unpermute::new([(5, 0, 0.5), (2, 1, 0.25), (5, 2, 0.125), (2, 3, 1.0)]);
        assert_eq!(u.dst, [2, 5]);
        assert_eq!(u.starts, [0, 2, 4]);
        assert_eq!(u.src, [1, 3, 0, 2]);
        assert_eq!(u.weights, [0.25, 1.0, 0.5, 0.125]);
        assert_eq!(Unpermute::new([]).starts, [0]);
    }

    #[test]
    fn a_compiler_error_line_names_its_kernel() {
        let src = expanded(SOURCES[3].1);
        let defs = kernels_of(&src);
        let decode = defs.iter().find(|k| k.name == "lightning_decode").unwrap();
        let log = format!(
            "lightning.cu({}): error: identifier \"x\" is undefined",
            decode.lines.0 + 3
        );
        let line = first_error_line(&log).unwrap();
        assert_eq!(kernel_at(&defs, line).unwrap().name, "lightning_decode");
    }
}
