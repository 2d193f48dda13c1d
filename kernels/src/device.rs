//! `--device cpu|cuda:N`: which backend a process computes on, and the one place that opens it.
//!
//! Code that runs on any backend is written once, generic over [`Backend`]; [`Device::open`]
//! builds the backend the device names and hands it to an [`OnBackend`] task, so callers need
//! no `cfg(feature = "cuda")` of their own.

use crate::cpu::Cpu;
use crate::{Activations, Backend};
use std::fmt;
use std::path::PathBuf;

/// A compute device: the CPU backend or CUDA GPU N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "{0} asked for, but this ringbolt was built without the `cuda` feature \
         (cargo build --release --features cuda)"
    )]
    NotBuilt(Device),
    #[error("{device}: {msg}")]
    Open { device: Device, msg: String },
}

/// Work that runs on whichever backend a device gives.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, backend: B) -> Self::Output;
}

impl Device {
    /// Opens the device's backend (a CUDA context on GPU N, its kernels compiled by NVRTC with
    /// headers from `cuda_include`, else `$CUDA_HOME/include`) and runs `task` on it.
    /// `activations` is what its GEMMs take (None: the device's own, f32 on the CPU); a GPU
    /// computes with bf16 activations only.
    pub fn open<T: OnBackend>(
        self,
        cuda_include: Option<PathBuf>,
        activations: Option<Activations>,
        task: T,
    ) -> Result<T::Output, DeviceError> {
        match self {
            Device::Cpu => {
                let _ = cuda_include;
                Ok(task.run(Cpu::new(activations.unwrap_or_default())))
            }
            Device::Cuda(_) if activations == Some(Activations::F32) => Err(DeviceError::Open {
                device: self,
                msg: "a GPU multiplies bf16 activations (--activations bf16); f32 activations \
                      are computed on the CPU only"
                    .into(),
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let b = crate::cuda_backend::CudaBackend::new(n, cuda_include).map_err(|e| {
                    DeviceError::Open {
                        device: self,
                        msg: e.to_string(),
                    }
                })?;
                Ok(task.run(b))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(DeviceError::NotBuilt(self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        let e = "gpu".parse::<Device>().unwrap_err();
        assert!(e.contains("cpu or cuda:N"), "{e}");
        assert!("cuda:x".parse::<Device>().is_err());
    }

    struct Name;
    impl OnBackend for Name {
        type Output = String;
        fn run<B: Backend>(self, b: B) -> String {
            b.name()
        }
    }

    #[test]
    fn cpu_opens_everywhere_and_cuda_fails_cleanly_without_a_gpu() {
        assert!(
            Device::Cpu
                .open(None, None, Name)
                .unwrap()
                .starts_with("cpu")
        );
        let bf16 = Device::Cpu
            .open(None, Some(Activations::Bf16), Name)
            .unwrap();
        assert!(bf16.contains("bf16 activations"), "{bf16}");
        // Without the feature, or on a machine without a GPU, opening a GPU is an error that
        // names the device (never a panic).
        if cfg!(not(feature = "cuda")) {
            let e = Device::Cuda(0)
                .open(None, None, Name)
                .unwrap_err()
                .to_string();
            assert!(e.contains("cuda:0") && e.contains("`cuda` feature"), "{e}");
        }
        let e = Device::Cuda(0)
            .open(None, Some(Activations::F32), Name)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cuda:0") && e.contains("--activations bf16"),
            "{e}"
        );
    }
}
