//! Built-in GPU and model profiles.

use ringbolt_model::ModelConfig;
use serde::Serialize;

/// What the planner needs to know about one GPU. Bandwidths are per GPU, per direction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuProfile {
    pub name: &'static str,
    pub memory_bytes: u64,
    /// Dense bf16 tensor-core throughput.
    pub bf16_flops: f64,
    /// Dense fp8 tensor-core throughput.
    pub fp8_flops: f64,
    pub hbm_bytes_per_s: f64,
    /// NVLink bandwidth to the other GPUs of the node.
    pub nvlink_bytes_per_s: f64,
    /// Network bandwidth to other nodes (one 400 Gb/s NIC per GPU in the usual H800 pod).
    pub network_bytes_per_s: f64,
}

const GB: f64 = 1e9;
const TFLOPS: f64 = 1e12;

/// A 400 Gb/s InfiniBand/RoCE NIC per GPU: 50 GB/s per direction.
const NIC_400G: f64 = 50.0 * GB;

pub fn gpu(name: &str) -> Option<GpuProfile> {
    let p = match name.to_ascii_lowercase().as_str() {
        // NVIDIA H800 SXM5 (export variant of H100 SXM5): same Hopper compute as H100 SXM5
        // (989.4 dense bf16 TFLOPS, 1978.9 dense fp8), 80 GB HBM3 at 3.35 TB/s, NVLink cut to
        // 400 GB/s total (200 GB/s per direction). Source: NVIDIA H800 product brief / H100
        // datasheet (dense, i.e. without sparsity).
        "h800" => GpuProfile {
            name: "h800",
            memory_bytes: 80_000_000_000,
            bf16_flops: 989.4 * TFLOPS,
            fp8_flops: 1978.9 * TFLOPS,
            hbm_bytes_per_s: 3350.0 * GB,
            nvlink_bytes_per_s: 200.0 * GB,
            network_bytes_per_s: NIC_400G,
        },
        // NVIDIA H100 SXM5: 989.4 / 1978.9 dense TFLOPS, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at
        // 900 GB/s total (450 per direction). Source: NVIDIA H100 Tensor Core GPU datasheet.
        "h100" => GpuProfile {
            name: "h100",
            memory_bytes: 80_000_000_000,
            bf16_flops: 989.4 * TFLOPS,
            fp8_flops: 1978.9 * TFLOPS,
            hbm_bytes_per_s: 3350.0 * GB,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: NIC_400G,
        },
        // NVIDIA H200 SXM: H100 compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
        // Source: NVIDIA H200 Tensor Core GPU datasheet.
        "h200" => GpuProfile {
            name: "h200",
            memory_bytes: 141_000_000_000,
            bf16_flops: 989.4 * TFLOPS,
            fp8_flops: 1978.9 * TFLOPS,
            hbm_bytes_per_s: 4800.0 * GB,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: NIC_400G,
        },
        // NVIDIA H20: 148 dense bf16 TFLOPS, 296 fp8, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s.
        // Source: NVIDIA HGX H20 product brief (as reported by press coverage of the brief).
        "h20" => GpuProfile {
            name: "h20",
            memory_bytes: 96_000_000_000,
            bf16_flops: 148.0 * TFLOPS,
            fp8_flops: 296.0 * TFLOPS,
            hbm_bytes_per_s: 4000.0 * GB,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: NIC_400G,
        },
        _ => return None,
    };
    Some(p)
}

pub const GPU_NAMES: [&str; 4] = ["h800", "h100", "h200", "h20"];

/// MiniMax-Text-01 as released (minimax-01.md §1.1).
pub fn text01() -> ModelConfig {
    ModelConfig::text01()
}
