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

/// Told when this worker could not join an epoch's group: (epoch, why). The cluster's report
/// asks the coordinator for a new epoch (a fresh id), which every member joins again.
pub type Report = Arc<dyn Fn(u64, String) + Send + Sync>;

impl<T: Transport + 'static> GroupMember<T> {
    /// Follows `plan` as member `me` until `stop`; each join, and the check after it, may take
    /// `timeout`. A join still running when a newer plan arrives is abandoned for it.
    pub fn follow<J: Join<T = T>>(
        me: String,
        plan: &PlanView,
        join: J,
        timeout: Duration,
        report: Report,
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
                            // Peers have moved on: this epoch's group cannot form. (A NCCL
                            // init already under way keeps its thread until its own timeout;
                            // what it builds is dropped.)
                            c = plans.changed() => {
                                if c.is_err() { return }
                                tracing::info!(epoch = p.epoch, "a newer plan came while joining");
                                continue;
                            }
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
                                // Not when a newer plan came meanwhile (taken up next).
                                if plans.borrow().epoch == p.epoch {
                                    tx.send_replace(Some(Arc::new(j)));
                                }
                            }
                            Err(e) => {
                                tracing::warn!(
                                    epoch = p.epoch,
                                    rank,
                                    error = %e,
                                    "cannot join the data group this epoch; tensors go over TCP"
                                );
                                report(p.epoch, e);
                            }
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
/// not draining, by member id. NCCL refuses two ranks on one GPU, so of the workers that name
/// the same device on the same host (their control address's host) only the first by id is
/// in the group; an id registered under two roles (two processes) is left out.
pub fn gpu_workers(members: &[Member], draining: &HashSet<String>) -> Vec<String> {
    let mut gpu: Vec<&Member> = members
        .iter()
        .filter(|m| m.role != Role::Coordinator && m.on_gpu() && !draining.contains(&m.id))
        .collect();
    gpu.sort_by(|a, b| a.id.cmp(&b.id));
    let twice: HashSet<&str> = gpu
        .windows(2)
        .filter(|w| w[0].id == w[1].id)
        .map(|w| w[0].id.as_str())
        .collect();
    for id in &twice {
        tracing::warn!(member = %id, "one id under two roles: left out of the data group");
    }
    gpu.retain(|m| !twice.contains(m.id.as_str()));
    let host = |m: &Member| {
        m.address
            .rsplit_once(':')
            .map_or(m.address.clone(), |(h, _)| h.to_string())
    };
    let mut devices = HashSet::new();
    let mut ids: Vec<String> = Vec::new();
    for m in gpu {
        if !devices.insert((host(m), m.device.clone())) {
            tracing::warn!(
                member = %m.id,
                device = %m.device,
                "another worker on this host uses this GPU: left out of the data group"
            );
            continue;
        }
        ids.push(m.id.clone());
    }
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
        // Probed without making an id: each id starts a bootstrap listener in this process
        // that waits for its ranks.
        if ringbolt_transport::nccl::available() {
            Some(make)
        } else {
            tracing::warn!("libnccl.so cannot be loaded: GPU workers get no data group");
            None
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
/// A join that failed is reported to the coordinator through `store`.
pub fn follow_on(
    device: Device,
    me: &str,
    plan: &PlanView,
    store: Arc<dyn crate::store::Store>,
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
            report_to(store, me),
            stop,
        ))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (me, plan, store, stop);
            None
        }
    }
}

/// Reports a failed join to the coordinator through `store`.
pub fn report_to(store: Arc<dyn crate::store::Store>, me: &str) -> Report {
    let me = me.to_string();
    let rt = tokio::runtime::Handle::current();
    Arc::new(move |epoch, _why| {
        let (store, me) = (store.clone(), me.clone());
        rt.spawn(async move {
            if let Err(e) = store.report_group_failure(&me, epoch).await {
                tracing::warn!(error = %e, "cannot report the failed join to the coordinator");
            }
        });
    })
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
        /// While set, every join fails.
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    type Told = Arc<Mutex<Vec<(u64, String)>>>;

    /// A report that keeps what it is told.
    fn reports() -> (Report, Told) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        (
            Arc::new(move |e, why| g.lock().unwrap().push((e, why))),
            got,
        )
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
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
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
        let (report, failed) = reports();
        let m: Vec<GroupMember<LocalTransport>> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                let (j, r, s) = (join.clone(), report.clone(), stop.clone());
                GroupMember::follow(id.to_string(), &view, j, WAIT, r, s)
            })
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
        assert!(
            failed.lock().unwrap().is_empty(),
            "{:?}",
            failed.lock().unwrap()
        );
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
        let (report, failed) = reports();
        let m: Vec<GroupMember<LocalTransport>> = ["a", "b"]
            .iter()
            .map(|id| {
                let (j, r, s) = (join.clone(), report.clone(), stop.clone());
                GroupMember::follow(id.to_string(), &view, j, short, r, s)
            })
            .collect();
        for g in &m {
            assert!(g.joined(4, Duration::from_secs(1)).await.is_none());
        }
        // Both joined (the transports came up) and the check refused them, saying why.
        let failed = failed.lock().unwrap().clone();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(
            failed
                .iter()
                .all(|(e, why)| *e == 4 && why.contains("the plan of epoch 4 says")),
            "{failed:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_failed_join_is_reported_and_the_next_epoch_joins() {
        let (tx, view) = PlanView::channel(plan(1, Some(("x", &["a"]))));
        let stop = CancellationToken::new();
        let join = LocalJoin::default();
        join.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let (report, failed) = reports();
        let a = GroupMember::follow("a".into(), &view, join.clone(), WAIT, report, stop.clone());
        assert!(a.joined(1, Duration::from_millis(300)).await.is_none());
        assert_eq!(failed.lock().unwrap().first().map(|f| f.0), Some(1));
        // The coordinator answers a report with a new epoch (a fresh id): the same member
        // joins it.
        join.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        tx.send_replace(Arc::new(plan(2, Some(("y", &["a"])))));
        assert_eq!(a.joined(2, WAIT).await.map(|j| j.epoch), Some(2));
        stop.cancel();
    }

    /// Joins whose group never forms for id `stuck` (a rank that never comes): they return
    /// only after 3 s. Other ids join in process.
    struct StuckOn(&'static str, LocalJoin);
    impl Join for StuckOn {
        type T = LocalTransport;
        fn join(
            &self,
            epoch: u64,
            rank: usize,
            size: usize,
            id: &str,
        ) -> Result<LocalTransport, TransportError> {
            if id == self.0 {
                std::thread::sleep(Duration::from_secs(3));
                return Err(TransportError::Closed);
            }
            self.1.join(epoch, rank, size, id)
        }
    }

    #[tokio::test]
    async fn a_newer_plan_abandons_a_join_under_way() {
        let (tx, view) = PlanView::channel(plan(1, Some(("x", &["a", "b"]))));
        let stop = CancellationToken::new();
        let (report, failed) = reports();
        let join = StuckOn("x", LocalJoin::default());
        let a = GroupMember::follow("a".into(), &view, join, WAIT, report, stop.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Epoch 2 replaces epoch 1 while `a` is still in epoch 1's init: it joins epoch 2
        // without waiting that out (3 s).
        tx.send_replace(Arc::new(plan(2, Some(("y", &["a"])))));
        let j = a.joined(2, Duration::from_millis(1500)).await;
        assert_eq!(j.map(|j| j.epoch), Some(2));
        assert!(
            failed.lock().unwrap().is_empty(),
            "an abandoned join is no failure"
        );
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
        // Same host, same GPU: the second by id is left out. Another host's cuda:0 is not.
        let at = |id: &str, role, device: &str, address: &str| Member {
            address: address.into(),
            ..m(id, role, device)
        };
        let shared = [
            at("b", Role::ExpertWorker, "cuda:0", "10.0.0.1:7200"),
            at("a", Role::AttentionWorker, "cuda:0", "10.0.0.1:7100"),
            at("c", Role::ExpertWorker, "cuda:0", "10.0.0.2:7200"),
            at("d", Role::ExpertWorker, "cuda:1", "10.0.0.1:7201"),
        ];
        assert_eq!(gpu_workers(&shared, &HashSet::new()), ["a", "c", "d"]);
        // One id under two roles (two processes) cannot be one rank.
        let twice = [
            at("x", Role::ExpertWorker, "cuda:0", "10.0.0.1:1"),
            at("x", Role::AttentionWorker, "cuda:1", "10.0.0.1:2"),
            at("y", Role::ExpertWorker, "cuda:0", "10.0.0.2:1"),
        ];
        assert_eq!(gpu_workers(&twice, &HashSet::new()), ["y"]);
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
