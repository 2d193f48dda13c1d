//! The data group of a plan epoch (design.md §5): every attention and expert worker on a GPU,
//! ranked as the plan lists them ([`DataGroup`]), joined into one NCCL communicator built from
//! the unique id the coordinator made for that epoch.
//!
//! A worker follows the plan: when the epoch changes it drops its communicator first (nothing
//! may travel on a group whose membership is gone), joins the new epoch's on a blocking thread
//! (NCCL's init waits for every rank), then checks it with an all-gather of the member ids, so
//! a rank that joined with another epoch's id or the wrong rank fails here and not in the
//! middle of a job. A join that fails or times out leaves the worker without a group for that
//! epoch; the next epoch tries again.
//!
//! The group is the GPU data plane's communicator. The expert exchange itself still travels
//! over TCP (`ringbolt_transport::exchange`); docs/CUDA.md says what moving it needs.

use crate::etcd::PlanView;
use crate::plan::{DataGroup, Plan};
use bytes::Bytes;
use ringbolt_kernels::Device;
use ringbolt_membership::{Member, Role};
use ringbolt_transport::{Transport, TransportError};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Tag of the all-gather that checks a freshly joined group.
const CHECK_TAG: u64 = u64::MAX - 1;

/// How a member joins one epoch's group. Blocking: NCCL's init returns once every rank joined.
pub trait Join: Send + Sync + 'static {
    type T: Transport + 'static;
    fn join(
        &self,
        epoch: u64,
        rank: usize,
        size: usize,
        id: &str,
    ) -> Result<Self::T, TransportError>;
}

/// This worker's communicator for one epoch, checked.
pub struct Joined<T> {
    pub epoch: u64,
    pub rank: usize,
    /// Member ids in rank order.
    pub members: Vec<String>,
    pub transport: T,
}

/// A worker's place in the data group, rebuilt as plans change.
pub struct GroupMember<T> {
    rx: watch::Receiver<Option<Arc<Joined<T>>>>,
}

impl<T: Transport + 'static> GroupMember<T> {
    /// Follows `plan` as member `me` until `stop`; each join and its check may take `timeout`.
    pub fn follow<J: Join<T = T>>(
        me: String,
        plan: &PlanView,
        join: J,
        timeout: Duration,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        let mut plans = plan.subscribe();
        let join = Arc::new(join);
        tokio::spawn(async move {
            let mut seen: Option<u64> = None;
            loop {
                let p: Arc<Plan> = plans.borrow_and_update().clone();
                if seen != Some(p.epoch) {
                    seen = Some(p.epoch);
                    // The previous epoch's communicator goes first.
                    tx.send_replace(None);
                    if let Some(g) = p.data_group.as_ref()
                        && let Some(rank) = g.rank_of(&me)
                    {
                        let joining = join_epoch(&me, p.epoch, rank, g, join.clone(), timeout);
                        let r = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = joining => r,
                        };
                        match r {
                            Ok(j) => {
                                tracing::info!(
                                    epoch = p.epoch,
                                    rank,
                                    size = g.ranks.len(),
                                    "joined the data group"
                                );
                                tx.send_replace(Some(Arc::new(j)));
                            }
                            Err(e) => tracing::warn!(
                                epoch = p.epoch,
                                rank,
                                error = %e,
                                "cannot join the data group this epoch; tensors go over TCP"
                            ),
                        }
                        // A newer plan that came while joining is taken up now.
                        continue;
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = plans.changed() => if r.is_err() { return },
                }
            }
        });
        GroupMember { rx }
    }

    /// The group of the current epoch, if this worker is in one and joined it.
    pub fn current(&self) -> Option<Arc<Joined<T>>> {
        self.rx.borrow().clone()
    }

    /// Waits (at most `timeout`) until a group of epoch `epoch` or later is joined.
    pub async fn joined(&self, epoch: u64, timeout: Duration) -> Option<Arc<Joined<T>>> {
        let mut rx = self.rx.clone();
        let r = tokio::time::timeout(
            timeout,
            rx.wait_for(|j| j.as_ref().is_some_and(|j| j.epoch >= epoch)),
        )
        .await;
        match r {
            Ok(Ok(j)) => j.clone(),
            _ => None,
        }
    }
}

async fn join_epoch<J: Join>(
    me: &str,
    epoch: u64,
    rank: usize,
    g: &DataGroup,
    join: Arc<J>,
    timeout: Duration,
) -> Result<Joined<J::T>, String> {
    let size = g.ranks.len();
    let id = g.nccl_id.clone();
    let t = tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || join.join(epoch, rank, size, &id)),
    )
    .await
    .map_err(|_| format!("the communicator did not come up within {timeout:?}"))?
    .map_err(|e| format!("the joining thread failed: {e}"))?
    .map_err(|e| e.to_string())?;
    let all = tokio::time::timeout(
        timeout,
        t.all_gather(CHECK_TAG, Bytes::copy_from_slice(me.as_bytes())),
    )
    .await
    .map_err(|_| format!("the check all-gather did not finish within {timeout:?}"))?
    .map_err(|e| format!("the check all-gather failed: {e}"))?;
    for (r, (got, want)) in all.iter().zip(&g.ranks).enumerate() {
        if got.as_ref() != want.as_bytes() {
            return Err(format!(
                "rank {r} answered as `{}`, the plan of epoch {epoch} says `{want}`",
                String::from_utf8_lossy(got)
            ));
        }
    }
    Ok(Joined {
        epoch,
        rank,
        members: g.ranks.clone(),
        transport: t,
    })
}

/// The workers a new epoch's data group holds: attention and expert workers on a GPU that are
/// not draining, by member id.
pub fn gpu_workers(members: &[Member], draining: &HashSet<String>) -> Vec<String> {
    let mut ids: Vec<String> = members
        .iter()
        .filter(|m| m.role != Role::Coordinator && m.on_gpu() && !draining.contains(&m.id))
        .map(|m| m.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Makes a fresh NCCL unique id, as hex.
pub type IdSource = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The coordinator's source of NCCL unique ids: `None` when this build has no NCCL (built
/// without `cuda`) or the library cannot be loaded; GPU workers then exchange over TCP only.
pub fn nccl_ids() -> Option<IdSource> {
    #[cfg(feature = "cuda")]
    {
        let make: IdSource = Arc::new(|| {
            ringbolt_transport::nccl::unique_id()
                .map(|id| id.iter().map(|&b| format!("{:02x}", b as u8)).collect())
                .map_err(|e| e.to_string())
        });
        match make() {
            Ok(_) => Some(make),
            Err(e) => {
                tracing::warn!(error = %e, "no NCCL here: GPU workers get no data group");
                None
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// How long joining a group and each call on it may take.
pub const GROUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts following the data group for a worker computing on `device`: GPU workers of a
/// `cuda` build join each epoch's NCCL group; anything else has none. Keep what it returns for
/// as long as the worker runs.
pub fn follow_on(
    device: Device,
    me: &str,
    plan: &PlanView,
    stop: CancellationToken,
) -> Option<Box<dyn std::any::Any + Send + Sync>> {
    match device {
        Device::Cpu => None,
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Some(Box::new(GroupMember::follow(
            me.to_string(),
            plan,
            NcclJoin {
                ordinal,
                timeout: GROUP_TIMEOUT,
            },
            GROUP_TIMEOUT,
            stop,
        ))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (me, plan, stop);
            None
        }
    }
}

/// Joins NCCL communicators on GPU `ordinal` (the worker's `--device cuda:N`).
#[cfg(feature = "cuda")]
pub struct NcclJoin {
    pub ordinal: usize,
    /// Bounds each NCCL call of the joined transport.
    pub timeout: Duration,
}

#[cfg(feature = "cuda")]
impl Join for NcclJoin {
    type T = ringbolt_transport::nccl::NcclTransport;
    fn join(
        &self,
        epoch: u64,
        rank: usize,
        size: usize,
        id: &str,
    ) -> Result<Self::T, TransportError> {
        let raw = parse_id(id).ok_or_else(|| TransportError::Peer {
            peer: rank,
            msg: format!("the plan's NCCL id is not 128 bytes of hex: `{id}`"),
        })?;
        ringbolt_transport::nccl::NcclTransport::start(
            self.ordinal,
            rank,
            size,
            epoch,
            raw,
            self.timeout,
        )
    }
}

/// The 128 bytes of an NCCL unique id written as hex.
pub fn parse_id(hex: &str) -> Option<[std::ffi::c_char; 128]> {
    if hex.len() != 256 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0 as std::ffi::c_char; 128];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()? as std::ffi::c_char;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::PlanView;
    use ringbolt_transport::local::{LocalGroup, LocalTransport};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Joins in-process groups: the first member to join an id makes every rank of it.
    /// `skew` shifts the rank a member gets (a member that joined the wrong rank).
    #[derive(Clone, Default)]
    struct LocalJoin {
        groups: Arc<Mutex<HashMap<String, Vec<Option<LocalTransport>>>>>,
        skew: usize,
        fail: bool,
    }

    impl Join for LocalJoin {
        type T = LocalTransport;
        fn join(
            &self,
            epoch: u64,
            rank: usize,
            size: usize,
            id: &str,
        ) -> Result<LocalTransport, TransportError> {
            if self.fail {
                return Err(TransportError::Closed);
            }
            let mut g = self.groups.lock().unwrap();
            let ranks = g.entry(id.to_string()).or_insert_with(|| {
                LocalGroup::ranks(size, epoch, Duration::from_secs(2))
                    .into_iter()
                    .map(Some)
                    .collect()
            });
            Ok(ranks[(rank + self.skew) % size].take().unwrap())
        }
    }

    fn plan(epoch: u64, group: Option<(&str, &[&str])>) -> Plan {
        Plan {
            epoch,
            data_group: group.map(|(id, ranks)| DataGroup {
                nccl_id: id.into(),
                ranks: ranks.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn members_rebuild_their_group_each_epoch() {
        let (tx, view) = PlanView::channel(plan(1, Some(("id1", &["a", "b", "c"]))));
        let stop = CancellationToken::new();
        let join = LocalJoin::default();
        let m: Vec<GroupMember<LocalTransport>> = ["a", "b", "c"]
            .iter()
            .map(|id| GroupMember::follow(id.to_string(), &view, join.clone(), WAIT, stop.clone()))
            .collect();
        for (r, g) in m.iter().enumerate() {
            let j = g.joined(1, WAIT).await.expect("joined epoch 1");
            assert_eq!((j.epoch, j.rank, j.transport.epoch()), (1, r, 1));
            assert_eq!(j.members, ["a", "b", "c"]);
        }
        // b leaves: a and c rebuild as ranks 0 and 1 of epoch 2; b holds no group.
        tx.send_replace(Arc::new(plan(2, Some(("id2", &["a", "c"])))));
        let a = m[0].joined(2, WAIT).await.expect("a joined epoch 2");
        let c = m[2].joined(2, WAIT).await.expect("c joined epoch 2");
        assert_eq!((a.rank, c.rank, c.transport.size()), (0, 1, 2));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(m[1].current().is_none(), "b is not in epoch 2's group");
        // The new group carries tensors between its ranks.
        a.transport
            .send(1, 7, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(&c.transport.recv(0, 7).await.unwrap()[..], b"x");
        // An epoch without a group: everyone drops theirs.
        tx.send_replace(Arc::new(plan(3, None)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(m.iter().all(|g| g.current().is_none()));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_group_joined_with_wrong_ranks_is_refused() {
        let (_tx, view) = PlanView::channel(plan(4, Some(("id", &["a", "b"]))));
        let stop = CancellationToken::new();
        let join = LocalJoin {
            skew: 1,
            ..Default::default()
        };
        let short = Duration::from_millis(300);
        let m: Vec<GroupMember<LocalTransport>> = ["a", "b"]
            .iter()
            .map(|id| GroupMember::follow(id.to_string(), &view, join.clone(), short, stop.clone()))
            .collect();
        for g in &m {
            assert!(g.joined(4, Duration::from_secs(1)).await.is_none());
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_failed_join_leaves_no_group_and_the_next_epoch_retries() {
        let (tx, view) = PlanView::channel(plan(1, Some(("x", &["a"]))));
        let stop = CancellationToken::new();
        let failing = GroupMember::follow(
            "a".into(),
            &view,
            LocalJoin {
                fail: true,
                ..Default::default()
            },
            WAIT,
            stop.clone(),
        );
        assert!(
            failing
                .joined(1, Duration::from_millis(300))
                .await
                .is_none()
        );
        let ok = GroupMember::follow("a".into(), &view, LocalJoin::default(), WAIT, stop.clone());
        assert!(ok.joined(1, WAIT).await.is_some());
        tx.send_replace(Arc::new(plan(2, Some(("y", &["a"])))));
        assert_eq!(ok.joined(2, WAIT).await.map(|j| j.epoch), Some(2));
        stop.cancel();
    }

    #[test]
    fn gpu_workers_are_the_data_group() {
        let m = |id: &str, role, device: &str| Member {
            id: id.into(),
            role,
            address: String::new(),
            data_address: String::new(),
            capacity_bytes: 0,
            expert_bytes: 0,
            device: device.into(),
        };
        let members = [
            m("x2", Role::ExpertWorker, "cuda:1"),
            m("c", Role::Coordinator, "cuda:0"),
            m("a1", Role::AttentionWorker, "cuda:0"),
            m("x1", Role::ExpertWorker, "cpu"),
            m("x3", Role::ExpertWorker, ""),
            m("x4", Role::ExpertWorker, "cuda:0"),
        ];
        let draining: HashSet<String> = ["x4".to_string()].into();
        assert_eq!(gpu_workers(&members, &draining), ["a1", "x2"]);
    }

    /// The coordinator's ids, from the real NCCL where the library loads (it needs no GPU).
    #[cfg(feature = "cuda")]
    #[test]
    fn nccl_ids_are_fresh_hex_ids() {
        let Some(make) = nccl_ids() else {
            // scripts/test.sh installs NCCL and says so: there this must not pass by skipping.
            assert!(
                std::env::var_os("RINGBOLT_REQUIRE_NCCL").is_none(),
                "libnccl.so cannot be loaded: is it on LD_LIBRARY_PATH?"
            );
            eprintln!("skipped: libnccl.so cannot be loaded here");
            return;
        };
        let (a, b) = (make().unwrap(), make().unwrap());
        assert!(parse_id(&a).is_some() && parse_id(&b).is_some(), "{a}");
        assert_ne!(a, b, "each epoch gets its own id");
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let hex: String = (0..128u32)
            .map(|i| format!("{:02x}", (i * 7) as u8))
            .collect();
        let raw = parse_id(&hex).unwrap();
        assert_eq!(raw[1] as u8, 7);
        assert_eq!(raw[127] as u8, (127 * 7) as u8);
        assert!(parse_id("zz").is_none());
        assert!(parse_id(&"g".repeat(256)).is_none());
    }
}
