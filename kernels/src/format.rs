//! Compute formats: how weights are held (`--weights`) and how activations enter a GEMM
//! (`--activations`), and the one int8 quantization rule every backend uses.

use rayon::prelude::*;
use std::fmt;

/// `--weights`: how the model's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum WeightFormat {
    /// As the checkpoint has them: bf16 (a CPU keeps a wider checkpoint in f32).
    #[default]
    Bf16,
    /// Routed experts in int8, one symmetric scale per output channel (W8A16); everything
    /// else as [`Bf16`](Self::Bf16).
    Int8,
    /// The attention projections in int8 as well (the embedding, the router and the LM head
    /// stay as they are).
    Int8All,
}

impl WeightFormat {
    /// Whether the routed experts are quantized.
    pub fn int8_experts(self) -> bool {
        self != WeightFormat::Bf16
    }

    /// Whether the attention projections are quantized.
    pub fn int8_attention(self) -> bool {
        self == WeightFormat::Int8All
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(WeightFormat::Bf16),
            "int8" => Ok(WeightFormat::Int8),
            "int8-all" => Ok(WeightFormat::Int8All),
            _ => Err(format!(
                "`{s}` is not a weight format: bf16, int8 or int8-all"
            )),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Int8All => "int8-all",
        })
    }
}

/// `--activations`: what a GEMM multiplies the weights with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Activations {
    /// f32 exactly (the CPU's default: the reference numerics).
    #[default]
    F32,
    /// Rounded to bf16 before each GEMM, accumulated in f32: what a GPU computes.
    Bf16,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Activations::F32),
            "bf16" => Ok(Activations::Bf16),
            _ => Err(format!("`{s}` is not an activation format: f32 or bf16")),
        }
    }
}

impl fmt::Display for Activations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Activations::F32 => "f32",
            Activations::Bf16 => "bf16",
        })
    }
}

/// Largest int8 magnitude used: symmetric, so −128 never occurs.
pub const INT8_MAX: f32 = 127.0;

/// Bytes of one int8 weight value.
pub const INT8_WEIGHT_BYTES: u64 = 1;

/// Bytes of one output channel's scale (f32).
pub const SCALE_BYTES: u64 = 4;

/// Quantizes a weight matrix `[rows, cols]` to int8 with one scale per row (output channel):
/// `scale = max|w| / 127`, `q = round(w / scale)`, so that `w ≈ q · scale` within `scale / 2`
/// per element. A row of zeros gets scale 0.
pub fn quantize_int8(data: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; data.len()];
    let mut scales = vec![0f32; rows];
    quantize_int8_into(data, rows, cols, &mut q, &mut scales);
    (q, scales)
}

/// [`quantize_int8`] into `q` (`rows·cols`) and `scales` (`rows`).
pub fn quantize_int8_into(
    data: &[f32],
    rows: usize,
    cols: usize,
    q: &mut [i8],
    scales: &mut [f32],
) {
    assert_eq!(
        data.len(),
        rows * cols,
        "quantize: weight is not [rows, cols]"
    );
    assert_eq!(
        (q.len(), scales.len()),
        (data.len(), rows),
        "quantize: outputs' sizes"
    );
    if cols == 0 {
        return;
    }
    q.par_chunks_mut(cols)
        .zip(scales.par_iter_mut())
        .zip(data.par_chunks(cols))
        .for_each(|((q, s), w)| {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 || !amax.is_finite() {
                *s = if amax.is_finite() { 0.0 } else { f32::NAN };
                return;
            }
            *s = amax / INT8_MAX;
            let inv = INT8_MAX / amax;
            for (o, &v) in q.iter_mut().zip(w) {
                *o = (v * inv).round().clamp(-INT8_MAX, INT8_MAX) as i8;
            }
        });
}

/// `v` rounded to the nearest bf16 (ties to even), as an f32.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let b = v.to_bits();
    f32::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1))) & 0xffff_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_print() {
        for s in ["bf16", "int8", "int8-all"] {
            assert_eq!(s.parse::<WeightFormat>().unwrap().to_string(), s);
        }
        for s in ["f32", "bf16"] {
            assert_eq!(s.parse::<Activations>().unwrap().to_string(), s);
        }
        let e = "fp8".parse::<WeightFormat>().unwrap_err();
        assert!(e.contains("bf16, int8 or int8-all"), "{e}");
        assert!("f16".parse::<Activations>().is_err());
    }

    #[test]
    fn quantization_is_within_half_a_step_per_row() {
        let cols = 37;
        let data: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .map(|v| {
                if v.abs() < 0.02 {
                    0.0
                } else {
                    v * (1 + v as i32 as usize % 3) as f32
                }
            })
            .collect();
        let mut with_zero_row = data.clone();
        with_zero_row.extend(std::iter::repeat_n(0.0, cols));
        let (q, s) = quantize_int8(&with_zero_row, 4, cols);
        for r in 0..4 {
            let row = &with_zero_row[r * cols..][..cols];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(s[r], amax / 127.0);
            for (v, &qv) in row.iter().zip(&q[r * cols..][..cols]) {
                assert!(qv > -128);
                assert!(
                    (qv as f32 * s[r] - v).abs() <= s[r] / 2.0 * 1.0001,
                    "{v} {qv}"
                );
            }
        }
        assert!(q[3 * cols..].iter().all(|&v| v == 0));
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-1.0 - 1.0 / 512.0), -1.0);
        assert!(round_bf16(f32::NAN).is_nan());
    }
}
