//! The cluster's control state behind one interface: the coordinators' election (the leader
//! gets a [`Fence`]), the placement plan and the job records (written only under that fence),
//! the expert workers' drain requests and the GPU workers' reports of a data group they could
//! not join. [`EtcdStore`] keeps it in etcd (`crate::etcd` names the
//! keys); [`MemoryStore`] in this process, so the coordinator's placement logic can be tested
//! without etcd.

use crate::ClusterError;
use crate::etcd::{
    EtcdRecords, Fence, PlanView, drain_prefix, etcd_err, group_failed_prefix, leader_key,
    load_plan,
};
use crate::plan::Plan;
use etcd_client::{Client, EventType, GetOptions, TxnOp, WatchOptions};
use futures::future::BoxFuture;
use ringbolt_jobs::{JobRecord, RecordBackend};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What workers ask of the coordinator through the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// An expert worker asks for (or withdraws, when false) a plan without it.
    Drain { member: String, on: bool },
    /// A GPU worker could not join the data group of plan `epoch`.
    GroupFailed { member: String, epoch: u64 },
}

/// The cluster's control state (see the module's docs).
pub trait Store: Send + Sync + 'static {
    /// The current plan (epoch 0 and no workers before the first).
    fn load_plan(&self) -> BoxFuture<'_, Result<Plan, ClusterError>>;
    /// A live view of the plan until `stop`.
    fn follow_plan(&self, stop: CancellationToken)
    -> BoxFuture<'_, Result<PlanView, ClusterError>>;
    /// Publishes `plan` if `fence` still holds (a refusal cancels `fence.deposed`).
    fn put_plan<'a>(
        &'a self,
        fence: &'a Fence,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// The members that asked to be drained.
    fn drains(&self) -> BoxFuture<'_, Result<BTreeSet<String>, ClusterError>>;
    /// Asks for (`on`) or withdraws a drain of `member`.
    fn set_drain<'a>(
        &'a self,
        member: &'a str,
        on: bool,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// Says `member` could not join the data group of plan `epoch`.
    fn report_group_failure<'a>(
        &'a self,
        member: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
    /// Requests from now on, until the receiver is dropped. A lost connection ends the stream
    /// (the caller watches again).
    fn requests(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Request>, ClusterError>>;
    /// Stands as `id` (under `lease`, which ends the candidacy or leadership with it) until
    /// elected; the fence every write of the leader is conditioned on.
    fn campaign<'a>(
        &'a self,
        id: &'a str,
        lease: i64,
    ) -> BoxFuture<'a, Result<Fence, ClusterError>>;
    /// The job records, written under `fence`.
    fn records(&self, fence: Fence) -> BoxFuture<'_, Result<Box<dyn RecordBackend>, ClusterError>>;
}

/// The store in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    cluster: String,
}

impl EtcdStore {
    pub fn new(client: Client, cluster: &str) -> Self {
        EtcdStore {
            client,
            cluster: cluster.to_string(),
        }
    }

    /// Forwards the events of a prefix watch as requests until `tx` closes, the watch ends or
    /// `done` is cancelled; then cancels `done` (so one broken watch ends the whole stream).
    async fn forward(
        mut client: Client,
        prefix: String,
        tx: mpsc::Sender<Request>,
        done: CancellationToken,
        make: fn(String, Option<&[u8]>) -> Option<Request>,
    ) {
        let _done = done.clone().drop_guard();
        let Ok(mut stream) = client
            .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
            .await
        else {
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                _ = done.cancelled() => return,
                m = stream.message() => m,
            };
            let Ok(Some(resp)) = msg else { return };
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let Some(member) = key.strip_prefix(&prefix) else {
                    continue;
                };
                let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                if let Some(r) = make(member.to_string(), value)
                    && tx.send(r).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

impl Store for EtcdStore {
    fn load_plan(&self) -> BoxFuture<'_, Result<Plan, ClusterError>> {
        Box::pin(load_plan(&self.client, &self.cluster))
    }

    fn follow_plan(
        &self,
        stop: CancellationToken,
    ) -> BoxFuture<'_, Result<PlanView, ClusterError>> {
        Box::pin(PlanView::follow(self.client.clone(), &self.cluster, stop))
    }

    fn put_plan<'a>(
        &'a self,
        fence: &'a Fence,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let v = serde_json::to_vec(plan).map_err(|e| ClusterError::Etcd(e.to_string()))?;
            fence
                .write(
                    &self.client,
                    vec![TxnOp::put(crate::etcd::plan_key(&self.cluster), v, None)],
                )
                .await
        })
    }

    fn drains(&self) -> BoxFuture<'_, Result<BTreeSet<String>, ClusterError>> {
        Box::pin(async move {
            let p = drain_prefix(&self.cluster);
            let r = self
                .client
                .clone()
                .get(
                    p.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map_err(etcd_err)?;
            Ok(r.kvs()
                .iter()
                .filter_map(|kv| {
                    String::from_utf8_lossy(kv.key())
                        .strip_prefix(&p)
                        .map(String::from)
                })
                .collect())
        })
    }

    fn set_drain<'a>(
        &'a self,
        member: &'a str,
        on: bool,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let key = format!("{}{member}", drain_prefix(&self.cluster));
            let mut c = self.client.clone();
            if on {
                c.put(key, "draining", None).await.map_err(etcd_err)?;
            } else {
                c.delete(key, None).await.map_err(etcd_err)?;
            }
            Ok(())
        })
    }

    fn report_group_failure<'a>(
        &'a self,
        member: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let key = format!("{}{member}", group_failed_prefix(&self.cluster));
            self.client
                .clone()
                .put(key, epoch.to_string(), None)
                .await
                .map_err(etcd_err)?;
            Ok(())
        })
    }

    fn requests(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Request>, ClusterError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(64);
            let done = CancellationToken::new();
            tokio::spawn(Self::forward(
                self.client.clone(),
                drain_prefix(&self.cluster),
                tx.clone(),
                done.clone(),
                |member, v| {
                    Some(Request::Drain {
                        member,
                        on: v.is_some(),
                    })
                },
            ));
            tokio::spawn(Self::forward(
                self.client.clone(),
                group_failed_prefix(&self.cluster),
                tx,
                done,
                |member, v| {
                    let epoch = std::str::from_utf8(v?).ok()?.parse().ok()?;
                    Some(Request::GroupFailed { member, epoch })
                },
            ));
            Ok(rx)
        })
    }

    fn campaign<'a>(
        &'a self,
        id: &'a str,
        lease: i64,
    ) -> BoxFuture<'a, Result<Fence, ClusterError>> {
        Box::pin(async move {
            let mut c = self.client.clone();
            // Each request is bounded by the etcd timeout; campaigning again with the same
            // lease resumes the same candidacy.
            loop {
                match c.campaign(leader_key(&self.cluster), id, lease).await {
                    Ok(r) => match r.leader() {
                        Some(k) => return Ok(Fence::new(k.key(), k.rev())),
                        None => tracing::warn!("elected without a leader key; campaigning again"),
                    },
                    Err(e) => tracing::debug!(error = %e, "still standing by"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn records(&self, fence: Fence) -> BoxFuture<'_, Result<Box<dyn RecordBackend>, ClusterError>> {
        Box::pin(async move {
            let r = EtcdRecords::load(self.client.clone(), &self.cluster, fence).await?;
            Ok(Box::new(r) as Box<dyn RecordBackend>)
        })
    }
}

#[derive(Default)]
struct Memory {
    plan: Option<watch::Sender<Arc<Plan>>>,
    drains: BTreeSet<String>,
    failures: BTreeMap<String, u64>,
    /// Job records, and idempotency key → job id.
    records: BTreeMap<String, JobRecord>,
    keys: BTreeMap<String, String>,
    /// The fence plan writes must hold: (election key, revision) of the current leader.
    leader: Option<(Vec<u8>, i64)>,
}

/// The store in this process (tests; one-process clusters). Fences hold while
/// [`MemoryStore::elect`] has not elected another leader since.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<Memory>>,
    requests: broadcast::Sender<Request>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            state: Default::default(),
            requests: broadcast::channel(256).0,
        }
    }
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plan_tx(&self) -> watch::Sender<Arc<Plan>> {
        self.lock()
            .plan
            .get_or_insert_with(|| watch::channel(Arc::new(Plan::default())).0)
            .clone()
    }

    /// Makes a new leader: the fences of the ones before no longer hold.
    pub fn elect(&self) -> Fence {
        let mut m = self.lock();
        let rev = m.leader.as_ref().map_or(1, |l| l.1 + 1);
        m.leader = Some((b"leader".to_vec(), rev));
        Fence::new(b"leader".to_vec(), rev)
    }
}

impl Store for MemoryStore {
    fn load_plan(&self) -> BoxFuture<'_, Result<Plan, ClusterError>> {
        let p = (*self.plan_tx().borrow().clone()).clone();
        Box::pin(async move { Ok(p) })
    }

    fn follow_plan(
        &self,
        _stop: CancellationToken,
    ) -> BoxFuture<'_, Result<PlanView, ClusterError>> {
        let view = PlanView::from_receiver(self.plan_tx().subscribe());
        Box::pin(async move { Ok(view) })
    }

    fn put_plan<'a>(
        &'a self,
        fence: &'a Fence,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        let holds = self.lock().leader.as_ref() == Some(&fence.claim());
        let r = if holds {
            crate::etcd::publish(&self.plan_tx(), plan.clone());
            Ok(())
        } else {
            Err(ClusterError::Etcd(fence.refused()))
        };
        Box::pin(async move { r })
    }

    fn drains(&self) -> BoxFuture<'_, Result<BTreeSet<String>, ClusterError>> {
        let d = self.lock().drains.clone();
        Box::pin(async move { Ok(d) })
    }

    fn set_drain<'a>(
        &'a self,
        member: &'a str,
        on: bool,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        {
            let mut m = self.lock();
            if on {
                m.drains.insert(member.to_string());
            } else {
                m.drains.remove(member);
            }
        }
        let _ = self.requests.send(Request::Drain {
            member: member.to_string(),
            on,
        });
        Box::pin(async { Ok(()) })
    }

    fn report_group_failure<'a>(
        &'a self,
        member: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        self.lock().failures.insert(member.to_string(), epoch);
        let _ = self.requests.send(Request::GroupFailed {
            member: member.to_string(),
            epoch,
        });
        Box::pin(async { Ok(()) })
    }

    fn requests(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Request>, ClusterError>> {
        let mut sub = self.requests.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    _ = tx.closed() => return,
                    r = sub.recv() => r,
                };
                match r {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Box::pin(async move { Ok(rx) })
    }

    fn campaign<'a>(
        &'a self,
        _id: &'a str,
        _lease: i64,
    ) -> BoxFuture<'a, Result<Fence, ClusterError>> {
        let f = self.elect();
        Box::pin(async move { Ok(f) })
    }

    fn records(&self, fence: Fence) -> BoxFuture<'_, Result<Box<dyn RecordBackend>, ClusterError>> {
        let r = MemoryRecords {
            store: self.clone(),
            fence,
        };
        Box::pin(async move { Ok(Box::new(r) as Box<dyn RecordBackend>) })
    }
}

/// Job records in a [`MemoryStore`], written while the fence holds.
struct MemoryRecords {
    store: MemoryStore,
    fence: Fence,
}

impl MemoryRecords {
    /// Runs `f` on the store's state if the fence holds.
    fn fenced<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> ringbolt_jobs::error::Result<T> {
        let mut m = self.store.lock();
        if m.leader.as_ref() != Some(&self.fence.claim()) {
            return Err(ringbolt_jobs::JobError::NotLeader(self.fence.refused()));
        }
        Ok(f(&mut m))
    }
}

impl RecordBackend for MemoryRecords {
    fn commit(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<Result<(), String>> {
        self.fenced(|m| {
            if let Some(k) = &record.idempotency_key {
                if let Some(id) = m.keys.get(k) {
                    return Err(id.clone());
                }
                m.keys.insert(k.clone(), record.id.clone());
            }
            m.records.insert(record.id.clone(), record.clone());
            Ok(())
        })
    }

    fn lookup_key(&self, key: &str) -> ringbolt_jobs::error::Result<Option<String>> {
        Ok(self.store.lock().keys.get(key).cloned())
    }

    fn put(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<()> {
        self.fenced(|m| {
            m.records.insert(record.id.clone(), record.clone());
        })
    }

    fn get(&self, id: &str) -> ringbolt_jobs::error::Result<Option<JobRecord>> {
        Ok(self.store.lock().records.get(id).cloned())
    }

    fn all(&self) -> ringbolt_jobs::error::Result<Vec<JobRecord>> {
        Ok(self.store.lock().records.values().cloned().collect())
    }

    fn delete(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<()> {
        self.fenced(|m| {
            m.records.remove(&record.id);
            if let Some(k) = &record.idempotency_key {
                m.keys.remove(k);
            }
        })
    }
}
