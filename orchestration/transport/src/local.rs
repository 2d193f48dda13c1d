//! In-process transport: every rank's mailbox is shared memory; a send is a hand-over of
//! `Bytes` (no copy).

use crate::{Mailbox, Result, Transport, TransportError};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

pub struct LocalTransport {
    rank: usize,
    epoch: u64,
    boxes: Arc<Vec<Mailbox>>,
}

/// Builds the `size` ranks of an in-process group for plan `epoch`.
pub struct LocalGroup;

impl LocalGroup {
    pub fn ranks(size: usize, epoch: u64, timeout: Duration) -> Vec<LocalTransport> {
        let boxes = Arc::new(
            (0..size)
                .map(|_| Mailbox::new(epoch, timeout))
                .collect::<Vec<_>>(),
        );
        (0..size)
            .map(|rank| LocalTransport {
                rank,
                epoch,
                boxes: boxes.clone(),
            })
            .collect()
    }
}

impl LocalTransport {
    /// The same rank, stamping its messages with another epoch (a peer that missed a plan
    /// change; for tests).
    pub fn stamped(&self, epoch: u64) -> LocalTransport {
        LocalTransport {
            rank: self.rank,
            epoch,
            boxes: self.boxes.clone(),
        }
    }

    fn check(&self, r: usize) -> Result<()> {
        if r >= self.boxes.len() {
            return Err(TransportError::BadRank {
                rank: r,
                size: self.boxes.len(),
            });
        }
        Ok(())
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.boxes.len()
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn send(&self, to: usize, tag: u64, data: Bytes) -> Result<()> {
        self.check(to)?;
        self.boxes[to].deliver(self.rank, self.epoch, tag, data);
        Ok(())
    }

    async fn recv(&self, from: usize, tag: u64) -> Result<Bytes> {
        self.check(from)?;
        self.boxes[self.rank].take(from, tag).await
    }
}
