//! The cluster's state in etcd, besides membership (the plan, drains and group failures are
//! reached through [`crate::store::Store`]):
//! `/{cluster}/plan` (the placement plan), `/{cluster}/jobs/{id}` (job records),
//! `/{cluster}/idempotency/{key}` (job id), `/{cluster}/drain/{id}` (an expert worker asking to
//! be drained), `/{cluster}/leader` (the coordinators' election).

use crate::ClusterError;
use crate::plan::Plan;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use ringbolt_jobs::{JobRecord, RecordBackend};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub fn plan_key(cluster: &str) -> String {
    format!("/{cluster}/plan")
}
pub fn jobs_prefix(cluster: &str) -> String {
    format!("/{cluster}/jobs/")
}
pub fn idempotency_key(cluster: &str, key: &str) -> String {
    format!("/{cluster}/idempotency/{key}")
}
pub fn drain_prefix(cluster: &str) -> String {
    format!("/{cluster}/drain/")
}
/// Where a GPU worker says it could not join an epoch's data group: `{prefix}{member id}`,
/// value the epoch. The coordinator answers with a new epoch (a fresh NCCL id).
pub fn group_failed_prefix(cluster: &str) -> String {
    format!("/{cluster}/data-group-failed/")
}
pub fn leader_key(cluster: &str) -> String {
    format!("/{cluster}/leader")
}

pub(crate) fn etcd_err(e: etcd_client::Error) -> ClusterError {
    ClusterError::Etcd(e.to_string())
}

/// The plan stored in etcd (epoch 0 and no workers when none was published yet).
pub async fn load_plan(client: &Client, cluster: &str) -> Result<Plan, ClusterError> {
    let resp = client
        .clone()
        .get(plan_key(cluster), None)
        .await
        .map_err(etcd_err)?;
    match resp.kvs().first() {
        Some(kv) => serde_json::from_slice(kv.value())
            .map_err(|e| ClusterError::Etcd(format!("malformed plan in etcd: {e}"))),
        None => Ok(Plan::default()),
    }
}

/// The leading coordinator's election key: every plan and job-record write is a transaction
/// conditioned on it still being the key that won (its create revision). A coordinator that
/// was paused past its lease and resumed finds every write refused; the first refusal cancels
/// `deposed`, and the coordinator steps down.
#[derive(Clone)]
pub struct Fence {
    key: Vec<u8>,
    rev: i64,
    pub deposed: CancellationToken,
}

impl Fence {
    /// The fence of the election key `key` created at revision `rev`.
    pub fn new(key: impl Into<Vec<u8>>, rev: i64) -> Self {
        Fence {
            key: key.into(),
            rev,
            deposed: CancellationToken::new(),
        }
    }

    fn holds(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.rev)
    }

    /// The election key and the revision that won it.
    pub(crate) fn claim(&self) -> (Vec<u8>, i64) {
        (self.key.clone(), self.rev)
    }

    /// What a refused write says (and the step down it starts).
    pub(crate) fn refused(&self) -> String {
        if !self.deposed.is_cancelled() {
            tracing::error!("a write was refused: another coordinator leads; stepping down");
        }
        self.deposed.cancel();
        "this coordinator is no longer the leader: its writes are refused".into()
    }

    /// Runs `ops` if the election key is still ours.
    pub async fn write(&self, client: &Client, ops: Vec<TxnOp>) -> Result<(), ClusterError> {
        let txn = Txn::new().when([self.holds()]).and_then(ops);
        let resp = client.clone().txn(txn).await.map_err(etcd_err)?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::Etcd(self.refused()))
        }
    }
}

/// A live view of the plan: the current one, updated from an etcd watch.
#[derive(Clone)]
pub struct PlanView {
    rx: watch::Receiver<Arc<Plan>>,
}

impl PlanView {
    /// Loads the plan and follows it until `stop`.
    pub async fn follow(
        client: Client,
        cluster: &str,
        stop: CancellationToken,
    ) -> Result<Self, ClusterError> {
        let first = load_plan(&client, cluster).await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let key = plan_key(cluster);
        tokio::spawn(async move {
            // Re-establishes the watch (with a fresh read) whenever it breaks.
            loop {
                let mut c = client.clone();
                let resp = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = c.get(key.clone(), None) => r,
                };
                if let Ok(resp) = resp {
                    if let Some(kv) = resp.kvs().first()
                        && let Ok(p) = serde_json::from_slice::<Plan>(kv.value())
                    {
                        publish(&tx, p);
                    }
                    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                    let opts = WatchOptions::new().with_start_revision(rev + 1);
                    if let Ok(mut stream) = c.watch(key.clone(), Some(opts)).await {
                        loop {
                            let msg = tokio::select! {
                                _ = stop.cancelled() => return,
                                m = stream.message() => m,
                            };
                            let Ok(Some(resp)) = msg else { break };
                            for ev in resp.events() {
                                if ev.event_type() == EventType::Put
                                    && let Some(kv) = ev.kv()
                                    && let Ok(p) = serde_json::from_slice::<Plan>(kv.value())
                                {
                                    publish(&tx, p);
                                }
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        Ok(PlanView { rx })
    }

    /// A view of what `rx` receives.
    pub fn from_receiver(rx: watch::Receiver<Arc<Plan>>) -> Self {
        PlanView { rx }
    }

    /// A view that never changes (tests, standalone-like setups).
    pub fn fixed(plan: Plan) -> Self {
        let (tx, rx) = watch::channel(Arc::new(plan));
        // Keep the sender alive for the life of the process: the view must not close.
        std::mem::forget(tx);
        PlanView { rx }
    }

    /// A view fed by the returned sender.
    pub fn channel(plan: Plan) -> (watch::Sender<Arc<Plan>>, Self) {
        let (tx, rx) = watch::channel(Arc::new(plan));
        (tx, PlanView { rx })
    }

    pub fn current(&self) -> Arc<Plan> {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Plan>> {
        self.rx.clone()
    }

    /// Waits until the plan's epoch is above `epoch`, for at most `timeout`.
    pub async fn newer_than(&self, epoch: u64, timeout: Duration) -> Option<Arc<Plan>> {
        let mut rx = self.rx.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|p| p.epoch > epoch)).await;
        match r {
            Ok(Ok(p)) => Some(p.clone()),
            _ => None,
        }
    }
}

/// Makes `p` the plan of `tx` if it is newer.
pub(crate) fn publish(tx: &watch::Sender<Arc<Plan>>, p: Plan) {
    tx.send_if_modified(|cur| {
        if p.epoch > cur.epoch {
            metrics::gauge!("ringbolt_plan_epoch").set(p.epoch as f64);
            *cur = Arc::new(p);
            true
        } else {
            false
        }
    });
}

/// Job records in etcd for the leading coordinator: reads from memory (it is the only
/// writer), writes through to etcd before returning.
pub struct EtcdRecords {
    client: Client,
    cluster: String,
    fence: Fence,
    rt: tokio::runtime::Handle,
    cache: Mutex<(BTreeMap<String, JobRecord>, HashMap<String, String>)>,
}

impl EtcdRecords {
    /// Loads every record and idempotency key of `cluster`; writes go through `fence`.
    pub async fn load(client: Client, cluster: &str, fence: Fence) -> Result<Self, ClusterError> {
        let mut c = client.clone();
        let jobs = c
            .get(jobs_prefix(cluster), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
        let mut records = BTreeMap::new();
        for kv in jobs.kvs() {
            match serde_json::from_slice::<JobRecord>(kv.value()) {
                Ok(r) => {
                    records.insert(r.id.clone(), r);
                }
                Err(e) => tracing::error!(
                    key = %String::from_utf8_lossy(kv.key()),
                    error = %e,
                    "skipping a malformed job record"
                ),
            }
        }
        let ikp = idempotency_key(cluster, "");
        let keys = c
            .get(ikp.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err)?;
        let mut idem = HashMap::new();
        for kv in keys.kvs() {
            let k = String::from_utf8_lossy(kv.key());
            if let Some(key) = k.strip_prefix(&ikp) {
                idem.insert(key.to_string(), String::from_utf8_lossy(kv.value()).into());
            }
        }
        Ok(EtcdRecords {
            client,
            cluster: cluster.to_string(),
            fence,
            rt: tokio::runtime::Handle::current(),
            cache: Mutex::new((records, idem)),
        })
    }

    fn cache(
        &self,
    ) -> std::sync::MutexGuard<'_, (BTreeMap<String, JobRecord>, HashMap<String, String>)> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}{id}", jobs_prefix(&self.cluster))
    }

    /// Runs `ops` under the fence (refused: this coordinator no longer leads).
    fn fenced(&self, ops: Vec<TxnOp>) -> ringbolt_jobs::error::Result<()> {
        let (fence, client) = (self.fence.clone(), self.client.clone());
        let r = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), fence.write(&client, ops))
                .await
                .map_err(|_| "etcd did not answer within 10 s".to_string())?
                .map_err(|e| e.to_string())
        });
        match r {
            Ok(()) => Ok(()),
            Err(e) if self.fence.deposed.is_cancelled() => {
                Err(ringbolt_jobs::JobError::NotLeader(e))
            }
            Err(e) => Err(ringbolt_jobs::JobError::Store(format!("etcd: {e}"))),
        }
    }

    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> ringbolt_jobs::error::Result<T> {
        // Called from blocking threads (the manager runs writes on them).
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), f)
                    .await
                    .map_err(|_| "etcd did not answer within 10 s".to_string())?
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| ringbolt_jobs::JobError::Store(format!("etcd: {e}")))
    }
}

fn to_json(r: &JobRecord) -> ringbolt_jobs::error::Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| ringbolt_jobs::JobError::Store(e.to_string()))
}

impl RecordBackend for EtcdRecords {
    fn commit(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<Result<(), String>> {
        let v = to_json(record)?;
        let job_key = self.job_key(&record.id);
        let mut c = self.client.clone();
        match &record.idempotency_key {
            None => {
                self.fenced(vec![TxnOp::put(job_key, v, None)])?;
            }
            Some(key) => {
                let ik = idempotency_key(&self.cluster, key);
                let txn = Txn::new()
                    .when([
                        self.fence.holds(),
                        Compare::version(ik.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(ik.clone(), record.id.clone(), None),
                        TxnOp::put(job_key, v, None),
                    ])
                    .or_else([
                        TxnOp::get(ik, None),
                        TxnOp::get(self.fence.key.clone(), None),
                    ]);
                let resp = self.block(c.txn(txn))?;
                if !resp.succeeded() {
                    // Which condition failed: the fence, or the key being known.
                    let leads = resp.op_responses().into_iter().any(|r| match r {
                        TxnOpResponse::Get(g) => g.kvs().first().is_some_and(|kv| {
                            kv.key() == self.fence.key.as_slice()
                                && kv.create_revision() == self.fence.rev
                        }),
                        _ => false,
                    });
                    if !leads {
                        return Err(ringbolt_jobs::JobError::NotLeader(self.fence.refused()));
                    }
                    let existing = resp
                        .op_responses()
                        .into_iter()
                        .find_map(|r| match r {
                            TxnOpResponse::Get(g) => g
                                .kvs()
                                .first()
                                .filter(|kv| kv.key() != self.fence.key.as_slice())
                                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    return Ok(Err(existing));
                }
                self.cache().1.insert(key.clone(), record.id.clone());
            }
        }
        self.cache().0.insert(record.id.clone(), record.clone());
        Ok(Ok(()))
    }

    fn lookup_key(&self, key: &str) -> ringbolt_jobs::error::Result<Option<String>> {
        Ok(self.cache().1.get(key).cloned())
    }

    fn put(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<()> {
        let v = to_json(record)?;
        self.fenced(vec![TxnOp::put(self.job_key(&record.id), v, None)])?;
        self.cache().0.insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn get(&self, id: &str) -> ringbolt_jobs::error::Result<Option<JobRecord>> {
        Ok(self.cache().0.get(id).cloned())
    }

    fn all(&self) -> ringbolt_jobs::error::Result<Vec<JobRecord>> {
        Ok(self.cache().0.values().cloned().collect())
    }

    fn delete(&self, record: &JobRecord) -> ringbolt_jobs::error::Result<()> {
        let mut ops = vec![TxnOp::delete(
            self.job_key(&record.id),
            None::<DeleteOptions>,
        )];
        if let Some(key) = &record.idempotency_key {
            ops.push(TxnOp::delete(idempotency_key(&self.cluster, key), None));
        }
        self.fenced(ops)?;
        if let Some(key) = &record.idempotency_key {
            self.cache().1.remove(key);
        }
        self.cache().0.remove(&record.id);
        Ok(())
    }
}
