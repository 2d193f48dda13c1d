//! The expert request on the data plane: one MoE layer step's rows for one expert worker.
//!
//! Request (little-endian): `layer u32, rows u32, hidden u32, groups u32`, then per group
//! `expert u32, n u32, n × row u32` (rows index the request's rows), then `rows × hidden` f32.
//! Answer: each group's expert output, `n × hidden` f32, in group order.

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRequest {
    pub layer: u32,
    pub hidden: u32,
    /// (expert, rows of `x` routed to it).
    pub groups: Vec<(u32, Vec<u32>)>,
    /// `[rows, hidden]`.
    pub x: Vec<f32>,
}

impl ExpertRequest {
    pub fn rows(&self) -> usize {
        self.x.len() / self.hidden.max(1) as usize
    }

    pub fn encode(&self) -> Bytes {
        let ids: usize = self.groups.iter().map(|g| 2 + g.1.len()).sum();
        let mut b = BytesMut::with_capacity(16 + 4 * ids + 4 * self.x.len());
        b.put_u32_le(self.layer);
        b.put_u32_le(self.rows() as u32);
        b.put_u32_le(self.hidden);
        b.put_u32_le(self.groups.len() as u32);
        for (e, rows) in &self.groups {
            b.put_u32_le(*e);
            b.put_u32_le(rows.len() as u32);
            for r in rows {
                b.put_u32_le(*r);
            }
        }
        for v in &self.x {
            b.put_f32_le(*v);
        }
        b.freeze()
    }

    pub fn decode(data: &[u8]) -> Result<Self, String> {
        let mut r = Reader { data, at: 0 };
        let layer = r.u32()?;
        let rows = r.u32()? as usize;
        let hidden = r.u32()?;
        let n = r.u32()? as usize;
        let mut groups = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let e = r.u32()?;
            let k = r.u32()? as usize;
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
        if rest.len() != want * 4 {
            return Err(format!(
                "expected {want} values ({rows} rows × {hidden}), got {} bytes",
                rest.len()
            ));
        }
        Ok(ExpertRequest {
            layer,
            hidden,
            groups,
            x: f32s(rest),
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
    let mut b = BytesMut::with_capacity(v.len() * 4);
    for x in v {
        b.put_f32_le(*x);
    }
    b.freeze()
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
        };
        let b = r.encode();
        assert_eq!(ExpertRequest::decode(&b).unwrap(), r);
        assert!(ExpertRequest::decode(&b[..b.len() - 1]).is_err());
        assert!(ExpertRequest::decode(&b[..10]).is_err());
        let mut bad = b.to_vec();
        bad[24..28].copy_from_slice(&9u32.to_le_bytes()); // row 9 of 3
        assert!(ExpertRequest::decode(&bad).unwrap_err().contains("row 9"));
    }
}
