//! The expert request on the data plane: one MoE layer step's rows for one expert worker.
//!
//! Request (little-endian): `layer u32, rows u32, hidden u32, groups u32, dtype u32`, then per
//! group `expert u32, n u32, n × row u32` (rows index the request's rows), then `rows × hidden`
//! values in `dtype`. Answer: each group's expert output, `n × hidden` values in the same
//! dtype, in group order.
//!
//! bf16 goes to expert workers on a GPU: they round their GEMM inputs to bf16 anyway, so the
//! rows lose nothing and the traffic halves both ways (the planner's figures assume bf16).
//! CPU expert workers get f32, so a CPU cluster computes exactly what the standalone engine
//! does.

use bytes::{BufMut, Bytes, BytesMut};

/// How a request's rows and its answer are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F32,
    /// Rounded to nearest even.
    Bf16,
}

impl Dtype {
    /// bf16 for an expert worker on a GPU (`device` as members register it), else f32.
    pub fn for_device(device: &str) -> Self {
        if device.starts_with("cuda") {
            Dtype::Bf16
        } else {
            Dtype::F32
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }

    fn code(self) -> u32 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
        }
    }

    fn from_code(c: u32) -> Result<Self, String> {
        match c {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::Bf16),
            _ => Err(format!("unknown value type {c} (0: f32, 1: bf16)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRequest {
    pub layer: u32,
    pub hidden: u32,
    /// (expert, rows of `x` routed to it).
    pub groups: Vec<(u32, Vec<u32>)>,
    /// `[rows, hidden]` (rounded to bf16 when written, if `dtype` is bf16).
    pub x: Vec<f32>,
    /// How `x` travels and the answer comes back.
    pub dtype: Dtype,
}

impl ExpertRequest {
    pub fn rows(&self) -> usize {
        self.x.len() / self.hidden.max(1) as usize
    }

    pub fn encode(&self) -> Bytes {
        let ids: usize = self.groups.iter().map(|g| 2 + g.1.len()).sum();
        let mut b = BytesMut::with_capacity(20 + 4 * ids + self.dtype.size() * self.x.len());
        b.put_u32_le(self.layer);
        b.put_u32_le(self.rows() as u32);
        b.put_u32_le(self.hidden);
        b.put_u32_le(self.groups.len() as u32);
        b.put_u32_le(self.dtype.code());
        for (e, rows) in &self.groups {
            b.put_u32_le(*e);
            b.put_u32_le(rows.len() as u32);
            for r in rows {
                b.put_u32_le(*r);
            }
        }
        put_values(&mut b, &self.x, self.dtype);
        b.freeze()
    }

    pub fn decode(data: &[u8]) -> Result<Self, String> {
        let mut r = Reader { data, at: 0 };
        let layer = r.u32()?;
        let rows = r.u32()? as usize;
        let hidden = r.u32()?;
        let n = r.u32()? as usize;
        let dtype = Dtype::from_code(r.u32()?)?;
        let mut groups = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let e = r.u32()?;
            let k = r.u32()? as usize;
            if k == 0 {
                return Err(format!("expert {e} is sent no rows"));
            }
            let mut ids = Vec::with_capacity(k.min(data.len() / 4));
            for _ in 0..k {
                let id = r.u32()?;
                if id as usize >= rows {
                    return Err(format!("row {id} out of {rows} rows"));
                }
                ids.push(id);
            }
            groups.push((e, ids));
        }
        let want = rows
            .checked_mul(hidden as usize)
            .ok_or("row count overflows")?;
        let rest = &data[r.at..];
        if Some(rest.len()) != want.checked_mul(dtype.size()) {
            return Err(format!(
                "expected {want} {dtype:?} values ({rows} rows × {hidden}), got {} bytes",
                rest.len()
            ));
        }
        Ok(ExpertRequest {
            layer,
            hidden,
            groups,
            x: values(rest, dtype),
            dtype,
        })
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        let b = self
            .data
            .get(self.at..self.at + 4)
            .ok_or("truncated expert request")?;
        self.at += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Bytes {
    value_bytes(v, Dtype::F32)
}

/// `v` written as `dtype`.
pub fn value_bytes(v: &[f32], dtype: Dtype) -> Bytes {
    let mut b = BytesMut::with_capacity(v.len() * dtype.size());
    put_values(&mut b, v, dtype);
    b.freeze()
}

fn put_values(b: &mut BytesMut, v: &[f32], dtype: Dtype) {
    match dtype {
        Dtype::F32 => v.iter().for_each(|x| b.put_f32_le(*x)),
        Dtype::Bf16 => v
            .iter()
            .for_each(|x| b.put_u16_le(half::bf16::from_f32(*x).to_bits())),
    }
}

/// Values written as `dtype` (a trailing partial value is ignored; callers check lengths).
pub fn values(b: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => f32s(b),
        Dtype::Bf16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// `v` rounded to bf16 (what a bf16 request carries).
pub fn round_bf16(v: &mut [f32]) {
    v.iter_mut()
        .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed_requests() {
        let r = ExpertRequest {
            layer: 3,
            hidden: 2,
            groups: vec![(1, vec![0, 2]), (5, vec![1])],
            x: vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5],
            dtype: Dtype::F32,
        };
        let b = r.encode();
        assert_eq!(ExpertRequest::decode(&b).unwrap(), r);
        assert!(ExpertRequest::decode(&b[..b.len() - 1]).is_err());
        assert!(ExpertRequest::decode(&b[..10]).is_err());
        let mut bad = b.to_vec();
        bad[28..32].copy_from_slice(&9u32.to_le_bytes()); // row 9 of 3
        assert!(ExpertRequest::decode(&bad).unwrap_err().contains("row 9"));
        let empty = ExpertRequest {
            groups: vec![(1, vec![])],
            ..r.clone()
        };
        assert!(
            ExpertRequest::decode(&empty.encode())
                .unwrap_err()
                .contains("no rows")
        );
        let mut bad = b.to_vec();
        bad[16..20].copy_from_slice(&7u32.to_le_bytes());
        assert!(
            ExpertRequest::decode(&bad)
                .unwrap_err()
                .contains("unknown value type 7")
        );
    }

    #[test]
    fn bf16_requests_halve_the_values_and_round_to_nearest_even() {
        let mut x = vec![
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.3e-3,
            65504.0,
            0.1,
        ];
        let f32_len = ExpertRequest {
            layer: 0,
            hidden: 3,
            groups: vec![(2, vec![0, 1])],
            x: x.clone(),
            dtype: Dtype::F32,
        }
        .encode()
        .len();
        round_bf16(&mut x);
        // Ties go to even: 1 + 2^-8 -> 1, 1 + 3·2^-8 -> 1 + 2^-6.
        assert_eq!((x[1], x[2]), (1.0, 1.0 + 4.0 / 256.0));
        let r = ExpertRequest {
            layer: 0,
            hidden: 3,
            groups: vec![(2, vec![0, 1])],
            x: x.clone(),
            dtype: Dtype::Bf16,
        };
        let b = r.encode();
        assert_eq!(f32_len - b.len(), 2 * x.len());
        assert_eq!(ExpertRequest::decode(&b).unwrap(), r);
        assert_eq!(values(&value_bytes(&x, Dtype::Bf16), Dtype::Bf16), x);
        assert!(ExpertRequest::decode(&b[..b.len() - 1]).is_err());
    }
}
