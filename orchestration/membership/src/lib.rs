//! Cluster membership (design.md §5): each process registers `/{cluster}/members/{role}/{id}`
//! under a lease it keeps alive; the coordinator lists and watches the prefix. [`EtcdMembership`]
//! is the real implementation; [`MemoryMembership`] has the same behaviour in one process
//! (standalone, tests). One test suite runs against both.

mod etcd;
mod memory;

pub use etcd::{EtcdMembership, KeptLease, keep_lease};
pub use memory::MemoryMembership;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Coordinator,
    AttentionWorker,
    ExpertWorker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::AttentionWorker => "attention-worker",
            Role::ExpertWorker => "expert-worker",
        }
    }
}

/// What a member announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub role: Role,
    /// gRPC control address.
    pub address: String,
    /// Data-plane address (tensors).
    pub data_address: String,
    /// Memory it offers for weights and caches.
    pub capacity_bytes: u64,
    /// Bytes one expert's weights take on this worker's device (expert workers; 0: not said,
    /// the coordinator's figure from the checkpoint applies).
    #[serde(default)]
    pub expert_bytes: u64,
    /// The device it computes on: `cpu` or `cuda:N` (empty: `cpu`, as written before this
    /// field existed). GPU workers of a plan epoch form its NCCL data group.
    #[serde(default)]
    pub device: String,
}

impl Member {
    /// Whether it computes on a GPU (and so joins the epoch's NCCL data group).
    pub fn on_gpu(&self) -> bool {
        self.device.starts_with("cuda")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Joined(Member),
    /// Left gracefully, or its lease expired.
    Left {
        role: Role,
        id: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("membership store unavailable: {0}")]
    Unavailable(String),
    #[error("malformed membership record `{key}`: {msg}")]
    Codec { key: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = MembershipError> = std::result::Result<T, E>;

/// Revokes a registration's lease.
type Revoke =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send>;

/// A live registration. Its lease is kept alive by a background task until [`leave`] (revokes
/// the lease: others see the member leave at once) or [`abandon`] (stops the keep-alive, as a
/// crash would: the lease expires after its TTL).
///
/// [`leave`]: Registration::leave
/// [`abandon`]: Registration::abandon
pub struct Registration {
    keepalive: CancellationToken,
    lost: watch::Receiver<bool>,
    revoke: Option<Revoke>,
}

impl Registration {
    /// Becomes true when the lease is lost (expired, or the store unreachable past its TTL).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    pub async fn leave(mut self) -> Result<()> {
        self.keepalive.cancel();
        match self.revoke.take() {
            Some(r) => r().await,
            None => Ok(()),
        }
    }

    pub fn abandon(mut self) {
        self.revoke = None;
        self.keepalive.cancel();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.keepalive.cancel();
    }
}

/// Membership of one cluster.
pub trait Membership: Clone + Send + Sync + 'static {
    /// Registers `member` under a lease of `ttl` (etcd's minimum is 2 s).
    fn register(
        &self,
        member: Member,
        ttl: Duration,
    ) -> impl Future<Output = Result<Registration>> + Send;
    /// Every live member.
    fn members(&self) -> impl Future<Output = Result<Vec<Member>>> + Send;
    /// The live members now, then every change after that snapshot, in order.
    fn watch(
        &self,
    ) -> impl Future<Output = Result<(Vec<Member>, mpsc::Receiver<MemberEvent>)>> + Send;
}

pub(crate) fn member_key(cluster: &str, role: Role, id: &str) -> String {
    format!("/{cluster}/members/{}/{id}", role.as_str())
}

pub(crate) fn members_prefix(cluster: &str) -> String {
    format!("/{cluster}/members/")
}

/// (role, id) from a member key.
pub(crate) fn parse_key(prefix: &str, key: &str) -> Option<(Role, String)> {
    let rest = key.strip_prefix(prefix)?;
    let (role, id) = rest.split_once('/')?;
    let role = match role {
        "coordinator" => Role::Coordinator,
        "attention-worker" => Role::AttentionWorker,
        "expert-worker" => Role::ExpertWorker,
        _ => return None,
    };
    Some((role, id.to_string()))
}

pub(crate) fn validate(m: &Member, ttl: Duration) -> Result<()> {
    if m.id.is_empty() || m.id.contains('/') {
        return Err(MembershipError::Invalid(format!(
            "member id `{}` must be non-empty and have no `/`",
            m.id
        )));
    }
    if ttl < Duration::from_secs(1) {
        return Err(MembershipError::Invalid(format!(
            "lease TTL {ttl:?} is below 1 s"
        )));
    }
    Ok(())
}
