//! The coordinator: wins the etcd election (a standby waits in it), serves the public job API
//! with job records in etcd and prompts in its spool, places experts in plan epochs as expert
//! workers come and go, and drives each job on an attention worker by control messages —
//! re-running it elsewhere when that worker is lost, so the client sees every token once.

use crate::attention::MAX_CONTROL_MESSAGE;
use crate::etcd::{Fence, PlanView};
use crate::expert::expert_bytes;
use crate::group::{IdSource, gpu_workers};
use crate::plan::{Candidate, DataGroup, Plan, Slot, WorkerPlace, assign};
use crate::store::{EtcdStore, Request, Store};
use crate::{ClusterError, CommonArgs, bind, connect_membership, wait_for_signal};
use clap::Args;
use futures::StreamExt;
use ringbolt_jobs::grpc::{JobsService, StatusSource, serve_service};
use ringbolt_jobs::{
    Completion, Executor, FinishReason, JobManager, JobStore, LiveJob, Outcome, Timings,
};
use ringbolt_membership::{Member, MemberEvent, Membership, Role};
use ringbolt_model::{Checkpoint, ModelConfig};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::attention_worker_client::AttentionWorkerClient;
use ringbolt_proto::internal::expert_worker_client::ExpertWorkerClient;
use ringbolt_proto::v1 as pb;
use ringbolt_shell::Dial;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Args, Clone, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where spooled prompts are kept (shared storage when a standby coordinator runs).
    #[arg(long, env = "RINGBOLT_DATA_DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub limits: crate::JobLimitArgs,
    /// Prompt tokens per prefill chunk on the attention workers (the context cache's block;
    /// the ranks of a context-parallel group cut the prompt by it).
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill_chunk: u32,
    /// Times a job is re-run on another attention worker before it fails.
    #[arg(long, env = "RINGBOLT_JOB_ATTEMPTS", default_value_t = 5)]
    pub job_attempts: u32,
    /// How long a job waits for an attention worker to exist.
    #[arg(long, env = "RINGBOLT_WORKER_WAIT_SECS", default_value_t = 120)]
    pub worker_wait_secs: u64,
    /// Most attention workers one job's context may be split among (its `context_parallel`;
    /// more is FAILED_PRECONDITION).
    #[arg(long, env = "RINGBOLT_MAX_CONTEXT_PARALLEL", default_value_t = 64)]
    pub max_context_parallel: u32,
    #[command(flatten)]
    pub auth: crate::AuthArgs,
    #[command(flatten)]
    pub http: ringbolt_openai::HttpArgs,
}

/// What the coordinator knows of the cluster: members and the plan (for `Status` and for
/// choosing attention workers).
/// Prompt blocks the coordinator remembers (which worker prefilled them), at most.
const MAX_PREFIX_BLOCKS: usize = 1 << 20;

pub struct ClusterView {
    members: RwLock<Vec<Member>>,
    plan: PlanView,
    /// Jobs running per attention worker.
    running: Mutex<HashMap<String, usize>>,
    /// Bytes of one expert's weights in a worker's memory, for workers that do not say.
    expert_bytes: u64,
    /// What one job's context costs an attention worker.
    cache: ringbolt_planner::ContextCost,
    /// Which attention worker prefilled each prompt block (keyed as the context cache keys
    /// them), for cache-aware routing.
    prefixes: Mutex<Prefixes>,
}

#[derive(Default)]
struct Prefixes {
    /// Prefix key → who prefilled it (a worker, or a context-parallel group's workers in rank
    /// order; the latest of each size first) and when it was noted.
    map: HashMap<ringbolt_model::prefix::Key, (Vec<Vec<String>>, u64)>,
    clock: u64,
}

impl ClusterView {
    fn set_members(&self, m: Vec<Member>) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = m;
        self.count_members();
    }

    /// The members-by-role gauges.
    fn count_members(&self) {
        let members = self.members();
        for role in [Role::Coordinator, Role::AttentionWorker, Role::ExpertWorker] {
            let n = members.iter().filter(|m| m.role == role).count();
            metrics::gauge!("ringbolt_members", "member_role" => role.as_str()).set(n as f64);
        }
    }

    fn members(&self) -> Vec<Member> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn apply(&self, ev: &MemberEvent) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        match ev {
            MemberEvent::Joined(x) => {
                m.retain(|y| !(y.id == x.id && y.role == x.role));
                m.push(x.clone());
            }
            MemberEvent::Left { role, id } => m.retain(|y| !(y.id == *id && y.role == *role)),
        }
        drop(m);
        self.count_members();
    }

    fn attention_workers(&self) -> Vec<Member> {
        self.members()
            .into_iter()
            .filter(|m| m.role == Role::AttentionWorker)
            .collect()
    }

    /// The attention worker (`n` = 1) or group of `n` (in rank order) that prefilled the
    /// longest prefix of `prompt` (in whole chunks ending before its last token), as far as
    /// this coordinator sent it jobs. A group takes its prefix only when the rest is no more
    /// work for one rank than its part of a whole prefill, so shorter ones are not asked for.
    fn prefix_holder(&self, chunk: usize, prompt: &[u32], n: usize) -> Option<Vec<String>> {
        let root = ringbolt_model::prefix::root(b"coordinator", chunk);
        let keys = ringbolt_model::prefix::prefix_keys(
            root,
            prompt,
            chunk,
            prompt.len().saturating_sub(1),
        );
        let min = if n > 1 {
            prompt.len() - prompt.len() / n
        } else {
            0
        };
        let prefixes = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .rev()
            .take_while(|(end, _)| *end >= min)
            .find_map(|(_, k)| {
                let (holders, _) = prefixes.map.get(k)?;
                holders.iter().find(|h| h.len() == n).cloned()
            })
    }

    /// Notes that `workers` prefill `prompt`: one worker keeps every whole chunk of it in its
    /// context cache; a group (in rank order) keeps its shares of the whole of it.
    fn record_prefix(&self, chunk: usize, prompt: &[u32], workers: &[String]) {
        let root = ringbolt_model::prefix::root(b"coordinator", chunk);
        let mut keys = ringbolt_model::prefix::prefix_keys(root, prompt, chunk, prompt.len());
        if workers.len() > 1 {
            keys.retain(|(end, _)| *end == prompt.len());
        }
        let mut p = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        for (_, k) in keys {
            p.clock += 1;
            let stamp = p.clock;
            let (holders, when) = p.map.entry(k).or_default();
            holders.retain(|h| h.len() != workers.len());
            holders.insert(0, workers.to_vec());
            holders.truncate(4);
            *when = stamp;
        }
        // Bounded: the older half goes when it is full (workers evict too; a stale entry
        // only costs a miss).
        if p.map.len() > MAX_PREFIX_BLOCKS {
            let cut = p.clock - (MAX_PREFIX_BLOCKS / 2) as u64;
            p.map.retain(|_, (_, s)| *s > cut);
        }
    }

    /// `n` distinct attention workers with the fewest running jobs, avoiding those in `avoid`
    /// where enough others exist; None while fewer than `n` are registered. A worker that
    /// offers no context data plane cannot be a rank of a group (n > 1). Given the `preferred`
    /// ones (a worker or group, in rank order, holding the job's prefix) and `n` of them,
    /// those, in that order, unless one of them is to be avoided or runs more than one job
    /// beyond the least busy.
    fn pick_attention(
        &self,
        n: usize,
        avoid: &HashSet<String>,
        preferred: Option<&[String]>,
    ) -> Option<Vec<Member>> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Member> = self
            .attention_workers()
            .into_iter()
            .filter(|m| n == 1 || !m.data_address.is_empty())
            .collect();
        if all.len() < n {
            return None;
        }
        let busy = |m: &Member| running.get(&m.id).copied().unwrap_or(0);
        let least = all.iter().map(busy).min().unwrap_or(0);
        if let Some(ids) = preferred.filter(|p| p.len() == n) {
            let held: Vec<Member> = ids
                .iter()
                .filter_map(|id| all.iter().find(|m| &m.id == id).cloned())
                .collect();
            if held.len() == n
                && held
                    .iter()
                    .all(|m| !avoid.contains(&m.id) && busy(m) <= least + 1)
            {
                return Some(held);
            }
        }
        // Fresh workers first, then the least loaded.
        all.sort_by_key(|m| (avoid.contains(&m.id), busy(m), m.id.clone()));
        all.truncate(n);
        Some(all)
    }

    /// The context-parallel degree for a job of `tokens` prompt tokens that asked for
    /// `asked` (0: choose): the smallest degree whose per-rank context cache fits every
    /// attention worker's offered memory, at most the number of workers (planner's rule,
    /// [`ringbolt_planner::context_degree`]).
    fn context_degree(&self, asked: u32, tokens: u64) -> usize {
        if asked > 0 {
            return asked as usize;
        }
        let workers = self.attention_workers();
        let capacity = workers
            .iter()
            .map(|w| w.capacity_bytes)
            .filter(|c| *c > 0)
            .min();
        match capacity {
            None => 1,
            Some(c) => ringbolt_planner::context_degree(&self.cache, tokens, c, workers.len()),
        }
    }
}

impl StatusSource for ClusterView {
    fn status(&self) -> pb::ClusterStatus {
        let plan = self.plan.current();
        let mut members: Vec<pb::Member> = self
            .members()
            .into_iter()
            .map(|m| {
                let experts = if m.role == Role::ExpertWorker {
                    plan.workers
                        .get(&m.id)
                        .map(|w| {
                            w.experts
                                .iter()
                                .map(|&(layer, expert)| pb::ExpertSlot { layer, expert })
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let data_group_rank = plan
                    .data_group
                    .as_ref()
                    .and_then(|g| g.rank_of(&m.id))
                    .map(|r| r as u32);
                pb::Member {
                    data_group_rank,
                    device: match (m.role, m.device.as_str()) {
                        (Role::Coordinator, _) => String::new(),
                        (_, "") => "cpu".into(),
                        (_, d) => d.into(),
                    },
                    id: m.id,
                    role: m.role.as_str().into(),
                    address: m.address,
                    weight_bytes: experts.len() as u64
                        * if m.expert_bytes > 0 {
                            m.expert_bytes
                        } else {
                            self.expert_bytes
                        },
                    experts,
                }
            })
            .collect();
        members.sort_by(|a, b| (&a.role, &a.id).cmp(&(&b.role, &b.id)));
        pb::ClusterStatus {
            mode: "cluster".into(),
            epoch: plan.epoch,
            members,
            ..Default::default()
        }
    }
}

/// Places experts whenever expert workers join, leave or ask to drain.
struct Planner<M: Membership> {
    store: Arc<dyn Store>,
    membership: M,
    view: Arc<ClusterView>,
    layers: u32,
    experts: u32,
    expert_bytes: u64,
    /// Makes each epoch's NCCL id for the GPU workers' data group (`None`: no NCCL here).
    ids: Option<IdSource>,
    /// Ids are not asked for before this (after one could not be made).
    ids_paused_until: Mutex<Option<Instant>>,
    /// Plan writes hold only while this coordinator leads.
    fence: Fence,
    /// How workers are dialed.
    dial: Dial,
}

/// Least time between two epochs made only to rebuild a data group that failed to form.
const REGROUP_INTERVAL: Duration = Duration::from_secs(30);
/// How long the coordinator stops asking for NCCL ids after one could not be made.
const IDS_PAUSE: Duration = Duration::from_secs(600);

impl<M: Membership> Planner<M> {
    async fn run(self, stop: CancellationToken) {
        let (snapshot, mut events) = loop {
            match self.membership.watch().await {
                Ok(x) => break x,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch membership; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        self.view.set_members(snapshot);
        let mut requests = self.store.requests().await.ok();
        // An expert worker of the plan that registers again was restarted and holds nothing:
        // the next round re-places (and re-loads) even if the membership looks the same. A
        // GPU worker of the data group that restarted, or one that could not join, needs a new
        // epoch with a fresh id (`regroup`), at most one per REGROUP_INTERVAL for failures.
        let (mut force, mut regroup, mut retry_group) = (false, false, false);
        let mut last_retry: Option<Instant> = None;
        loop {
            if retry_group && last_retry.is_none_or(|t| t.elapsed() >= REGROUP_INTERVAL) {
                (regroup, retry_group) = (true, false);
                last_retry = Some(Instant::now());
            }
            match self.replan(force, regroup).await {
                Ok(()) => (force, regroup) = (false, false),
                Err(e) => tracing::warn!(error = %e, "placement not updated; will retry"),
            }
            let mut pending = false;
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = events.recv() => match ev {
                    Some(ev) => {
                        force |= self.rejoined(&ev);
                        regroup |= self.regrouped(&ev);
                        self.view.apply(&ev);
                        pending = true;
                    }
                    None => return,
                },
                r = async {
                    match requests.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => match r {
                    Some(Request::Drain { .. }) => pending = true,
                    Some(Request::GroupFailed { epoch, .. }) => {
                        // Reports of the current epoch's group only: an older one was already
                        // replaced.
                        let plan = self.view.plan.current();
                        if epoch == plan.epoch && plan.data_group.is_some() {
                            tracing::warn!(
                                epoch = plan.epoch,
                                "a GPU worker could not join the data group; a new epoch will \
                                 carry a fresh id"
                            );
                            retry_group = true;
                        }
                    }
                    // The connection to the store broke: watch again, after a pause.
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        requests = self.store.requests().await.ok();
                    }
                },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            if pending {
                // Let a burst of changes settle into one epoch.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while let Ok(ev) = events.try_recv() {
                    force |= self.rejoined(&ev);
                    regroup |= self.regrouped(&ev);
                    self.view.apply(&ev);
                }
            }
        }
    }

    async fn measured_load(&self, workers: &[Member]) -> HashMap<Slot, u64> {
        let mut load = HashMap::new();
        for w in workers {
            let r = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = ExpertWorkerClient::new(
                    self.dial
                        .connect(&w.address, Duration::from_secs(2))
                        .await?,
                );
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    c.expert_load(ipb::ExpertLoadRequest {}).await?.into_inner(),
                )
            })
            .await;
            if let Ok(Ok(r)) = r {
                for x in r.experts {
                    *load.entry((x.layer, x.expert)).or_default() += x.rows;
                }
            }
        }
        load
    }

    /// Whether `ev` is an expert worker of the current plan registering again: a process
    /// registers once, so that is a restart (it holds nothing, whatever the plan says).
    fn rejoined(&self, ev: &MemberEvent) -> bool {
        match ev {
            MemberEvent::Joined(m) if m.role == Role::ExpertWorker => {
                self.view.plan.current().workers.contains_key(&m.id)
            }
            _ => false,
        }
    }

    /// Whether `ev` is a GPU worker of the current data group registering again: restarted,
    /// it holds no communicator, and the group needs a new epoch (and id) to take it back.
    fn regrouped(&self, ev: &MemberEvent) -> bool {
        match ev {
            MemberEvent::Joined(m) => self
                .view
                .plan
                .current()
                .data_group
                .as_ref()
                .is_some_and(|g| g.rank_of(&m.id).is_some()),
            _ => false,
        }
    }

    /// The NCCL id source, unless it failed lately.
    fn ids(&self) -> Option<&IdSource> {
        let paused = self
            .ids_paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *paused {
            Some(t) if Instant::now() < t => None,
            _ => self.ids.as_ref(),
        }
    }

    /// Places the experts on `workers`, from the measured load and what each held before.
    async fn place(
        &self,
        workers: &[Member],
        prev: &Plan,
    ) -> Result<BTreeMap<String, Vec<Slot>>, ClusterError> {
        let load = self.measured_load(workers).await;
        let cands: Vec<Candidate> = workers
            .iter()
            .map(|w| Candidate {
                id: w.id.clone(),
                capacity_bytes: w.capacity_bytes,
                expert_bytes: w.expert_bytes,
            })
            .collect();
        // Only workers still present count as previous holders.
        let previous: BTreeMap<String, Vec<Slot>> = prev
            .assignment()
            .into_iter()
            .filter(|(id, _)| workers.iter().any(|w| &w.id == id))
            .collect();
        assign(
            self.layers,
            self.experts,
            self.expert_bytes,
            &cands,
            &load,
            &previous,
        )
        .map_err(|e| ClusterError::Unavailable(e.to_string()))
    }

    /// Makes a new plan epoch when the expert workers or the data group changed. `force`
    /// re-places the experts (a holder restarted); `regroup` makes a new epoch for the data
    /// group alone (a fresh id), keeping the placement.
    async fn replan(&self, force: bool, regroup: bool) -> Result<(), ClusterError> {
        let members = self
            .membership
            .members()
            .await
            .map_err(|e| ClusterError::Etcd(e.to_string()))?;
        self.view.set_members(members.clone());
        let draining: HashSet<String> = self.store.drains().await?.into_iter().collect();
        // The data group a new epoch would have (none without NCCL ids or a second GPU).
        let mut group = gpu_workers(&members, &draining);
        let ids = self.ids().cloned();
        if ids.is_none() || group.len() < 2 {
            group.clear();
        }
        let mut workers: Vec<Member> = members
            .into_iter()
            .filter(|m| m.role == Role::ExpertWorker && !draining.contains(&m.id))
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let prev = self.view.plan.current();
        let same_workers = prev.workers.len() == workers.len()
            && workers.iter().all(|w| {
                prev.workers
                    .get(&w.id)
                    .is_some_and(|p| p.data_address == w.data_address && p.address == w.address)
            });
        let same_group = prev
            .data_group
            .as_ref()
            .map_or(group.is_empty(), |g| g.ranks == group);
        let same_placement = same_workers && prev.complete(self.layers, self.experts);
        let regroup = regroup && !group.is_empty();
        if !force && !regroup && same_placement && same_group {
            return Ok(());
        }
        if workers.is_empty() {
            return Err(ClusterError::Unavailable(
                "no expert worker to place the experts on".into(),
            ));
        }
        let a = if !force && same_placement {
            // Only the data group changed: the experts stay where they are.
            prev.assignment()
        } else {
            self.place(&workers, &prev).await?
        };
        let epoch = prev.epoch + 1;
        // Phase 1: every worker loads its shards for the new epoch (keeping the old ones).
        let loads = workers.iter().map(|w| {
            let slots = a.get(&w.id).cloned().unwrap_or_default();
            let addr = w.address.clone();
            let dial = self.dial.clone();
            async move {
                let req = ipb::LoadShardsRequest {
                    epoch,
                    experts: slots
                        .iter()
                        .map(|&(layer, expert)| ipb::ExpertSlot { layer, expert })
                        .collect(),
                };
                let r = tokio::time::timeout(Duration::from_secs(600), async {
                    let mut c = ExpertWorkerClient::new(
                        dial.connect(&addr, Duration::from_secs(10))
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                    c.load_shards(req)
                        .await
                        .map_err(|e| e.message().to_string())
                })
                .await
                .map_err(|_| "no answer within 600 s".to_string())
                .and_then(|r| r);
                r.map_err(|e| ClusterError::Unavailable(format!("loading shards on {addr}: {e}")))
            }
        });
        for r in futures::future::join_all(loads).await {
            r?;
        }
        let data_group = match ids.filter(|_| !group.is_empty()).map(|make| make()) {
            Some(Ok(nccl_id)) => Some(DataGroup {
                nccl_id,
                ranks: group,
            }),
            Some(Err(e)) => {
                // Not again for a while: without ids every round would publish another epoch.
                tracing::warn!(
                    error = %e,
                    pause = ?IDS_PAUSE,
                    "cannot make an NCCL id; GPU workers get no data group"
                );
                *self
                    .ids_paused_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + IDS_PAUSE);
                None
            }
            None => None,
        };
        // Phase 2: publish; workers switch when they see it.
        let plan = Plan {
            data_group,
            epoch,
            workers: workers
                .iter()
                .map(|w| {
                    (
                        w.id.clone(),
                        WorkerPlace {
                            address: w.address.clone(),
                            data_address: w.data_address.clone(),
                            experts: a.get(&w.id).cloned().unwrap_or_default(),
                            device: w.device.clone(),
                        },
                    )
                })
                .collect(),
        };
        self.store.put_plan(&self.fence, &plan).await?;
        tracing::info!(
            epoch,
            workers = plan.workers.len(),
            replicas = plan
                .workers
                .values()
                .map(|w| w.experts.len())
                .sum::<usize>(),
            "placement plan published"
        );
        // Wait (bounded) for the view to show it, so the next round starts from it.
        let _ = self
            .view
            .plan
            .newer_than(epoch - 1, Duration::from_secs(5))
            .await;
        Ok(())
    }
}

/// Runs jobs on attention workers.
struct ClusterExecutor {
    rt: tokio::runtime::Handle,
    view: Arc<ClusterView>,
    prefill_chunk: u32,
    attempts: u32,
    worker_wait: Duration,
    dial: Dial,
}

impl Executor for ClusterExecutor {
    fn run(
        self: Box<Self>,
        jobs: std::sync::mpsc::Receiver<Arc<LiveJob>>,
        done: mpsc::Sender<Completion>,
        store: Arc<JobStore>,
    ) {
        let me = Arc::new(*self);
        while let Ok(job) = jobs.recv() {
            let (me2, done, store) = (me.clone(), done.clone(), store.clone());
            let span = tracing::info_span!("job", job = %job.id);
            me.rt.spawn(
                async move {
                    let c = me2.drive(job, store).await;
                    let _ = done.send(c).await;
                }
                .instrument(span),
            );
        }
    }
}

fn retryable(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
            | tonic::Code::Unimplemented
            | tonic::Code::PermissionDenied
    )
}

impl ClusterExecutor {
    async fn drive(&self, job: Arc<LiveJob>, store: Arc<JobStore>) -> Completion {
        let rec = job.record();
        let fail = |job: Arc<LiveJob>, code: tonic::Code, msg: String, t: Timings| Completion {
            job,
            outcome: Outcome::Failed(code as i32, msg),
            timings: t,
        };
        let r = rec.clone();
        let (prompt, images) =
            match tokio::task::spawn_blocking(move || store.read_prompt(&r)).await {
                Ok(Ok(p)) => (p.tokens, p.images),
                Ok(Err(e)) => {
                    return fail(job, e.status().code(), e.to_string(), Timings::default());
                }
                Err(e) => {
                    return fail(
                        job,
                        tonic::Code::Internal,
                        e.to_string(),
                        Timings::default(),
                    );
                }
            };
        let packed = ringbolt_proto::pack_tokens(&prompt);
        let created = rec.created_unix_ms;
        let queued = ringbolt_jobs::record::now_unix_ms().saturating_sub(created) as f64 / 1e3;
        // The attention worker(s) that run the job run its images through the vision tower
        // (every rank of a group: each takes its chunks' features). The context's length
        // counts each image's features.
        let degree = self
            .view
            .context_degree(rec.context_parallel, rec.prompt_tokens);
        let mut avoid = HashSet::new();
        let mut failures = 0u32;
        let mut ttft = 0.0;
        loop {
            if job.is_cancelled() {
                return Completion {
                    job,
                    outcome: Outcome::Finished(FinishReason::Cancelled),
                    timings: Timings::default(),
                };
            }
            let waited = Instant::now();
            // Cache-aware: the worker whose context cache holds the longest prefix of this
            // prompt, when it is not much busier than the others.
            let routed = !rec.no_context_cache && images.is_empty();
            let holder = routed
                .then(|| {
                    self.view
                        .prefix_holder(self.prefill_chunk as usize, &prompt, degree)
                })
                .flatten();
            let workers = loop {
                if let Some(w) = self.view.pick_attention(degree, &avoid, holder.as_deref()) {
                    break Some(w);
                }
                if waited.elapsed() > self.worker_wait || job.is_cancelled() {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let Some(workers) = workers else {
                if job.is_cancelled() {
                    continue;
                }
                let have = self.view.attention_workers().len();
                return fail(
                    job,
                    tonic::Code::Unavailable,
                    format!(
                        "the job needs {degree} attention worker(s); {have} registered within {:?}",
                        self.worker_wait
                    ),
                    Timings::default(),
                );
            };
            job.set_running(degree as u32);
            let _guards: Vec<RunningGuard> = workers
                .iter()
                .map(|w| RunningGuard::new(&self.view, &w.id))
                .collect();
            let ids: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
            tracing::info!(workers = ?ids, attempt = failures + 1, prefix_holder = ?holder, "job sent to attention worker(s)");
            if routed {
                // A group keeps its shares of the part of the prompt it prefills.
                let chunk = self.prefill_chunk as usize;
                let part = match degree {
                    1 => prompt.len(),
                    _ => ringbolt_model::context::group_prefix(prompt.len(), chunk),
                };
                let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
                self.view.record_prefix(chunk, &prompt[..part], &ids);
            }
            let req = ipb::RunJobRequest {
                job_id: rec.id.clone(),
                epoch: self.view.plan.current().epoch,
                segment: Some(ipb::Segment {
                    start: 0,
                    end: prompt.len() as u64,
                }),
                prompt: packed.clone(),
                max_new_tokens: rec.max_new_tokens,
                temperature: rec.sampling.temperature,
                top_p: rec.sampling.top_p,
                seed: rec.sampling.seed,
                stop_tokens: rec.sampling.stop_tokens.clone(),
                prefill_chunk: self.prefill_chunk,
                ignore_eos: rec.ignore_eos,
                context: None,
                no_context_cache: rec.no_context_cache,
                images: images.clone(),
            };
            let outcome = self.attempt(&job, &workers, req, &mut ttft).await;
            drop(_guards);
            match outcome {
                Ok(done) => {
                    let reason = if done.finish_reason == "stop" {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    };
                    tracing::info!(
                        layer_steps = done.layer_steps,
                        resent = done.layer_steps_resent,
                        cached_tokens = done.cached_tokens,
                        "job finished on the cluster"
                    );
                    job.set_cached_tokens(done.cached_tokens);
                    return Completion {
                        job,
                        outcome: Outcome::Finished(reason),
                        timings: Timings {
                            queued_seconds: queued,
                            prefill_seconds: done.prefill_seconds,
                            decode_seconds: done.decode_seconds,
                            time_to_first_token_seconds: ttft,
                        },
                    };
                }
                Err(Attempt::Cancelled) => continue,
                Err(Attempt::Fatal(code, msg)) => {
                    return fail(job, code, msg, Timings::default());
                }
                Err(Attempt::Lost { msg, blame }) => {
                    failures += 1;
                    tracing::warn!(blame = ?blame, error = %msg, failures, "the job's attention worker(s) lost it; re-running it");
                    avoid.extend(blame);
                    if failures >= self.attempts {
                        return fail(
                            job,
                            tonic::Code::Unavailable,
                            format!(
                                "job failed {failures} times on attention workers; last: {msg}"
                            ),
                            Timings::default(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200 * failures as u64)).await;
                }
            }
        }
    }

    /// Runs one attempt of a job on `workers`: one job step, or with several workers one
    /// context-parallel rank on each (a fresh group). Tokens the client already has are not
    /// streamed again.
    async fn attempt(
        &self,
        job: &Arc<LiveJob>,
        workers: &[Member],
        req: ipb::RunJobRequest,
        ttft: &mut f64,
    ) -> Result<ipb::StepDone, Attempt> {
        let p = workers.len();
        let group = (p > 1).then(|| ipb::ContextGroup {
            // The random half of a v7 id.
            group: uuid::Uuid::now_v7().as_u64_pair().1,
            rank: 0,
            peers: workers.iter().map(|w| w.data_address.clone()).collect(),
        });
        // Every rank's stream, its events tagged with the rank.
        let mut streams = futures::stream::SelectAll::new();
        let opened = futures::future::join_all(workers.iter().enumerate().map(|(r, w)| {
            let mut req = req.clone();
            if let Some(g) = &group {
                req.context = Some(ipb::ContextGroup {
                    rank: r as u32,
                    ..g.clone()
                });
            }
            open_step(&self.dial, w, req)
        }))
        .await;
        for (r, o) in opened.into_iter().enumerate() {
            // Each message with its rank; the stream's end (or error) once, as a message.
            let s = futures::stream::unfold(Some(o?), move |s| async move {
                let mut s = s?;
                let m = s.message().await;
                let more = matches!(m, Ok(Some(_)));
                Some(((r, m), more.then_some(s)))
            });
            streams.push(s.boxed());
        }
        let mut cache = vec![None; p];
        let mut prefilled = vec![false; p];
        // Ranks that stopped because another failed: the one to blame may still report.
        let mut aborted: Option<(String, tokio::time::Instant)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let (r, msg) = tokio::select! {
                m = streams.next() => match m {
                    Some(m) => m,
                    None => {
                        return Err(Attempt::Lost {
                            msg: aborted.map(|a| a.0).unwrap_or_else(|| {
                                "every rank's stream ended without a result".into()
                            }),
                            blame: None,
                        });
                    }
                },
                _ = tick.tick() => {
                    if job.is_cancelled() {
                        return Err(Attempt::Cancelled);
                    }
                    if let Some((msg, since)) = &aborted
                        && since.elapsed() > Duration::from_secs(3)
                    {
                        return Err(Attempt::Lost { msg: msg.clone(), blame: None });
                    }
                    continue;
                }
            };
            let w = &workers[r];
            let lost = |e: String| Attempt::Lost {
                msg: format!("{}: {e}", w.address),
                blame: Some(w.id.clone()),
            };
            let step = match msg {
                Ok(Some(s)) => s,
                Ok(None) if prefilled[r] => continue,
                Ok(None) => return Err(lost("the job stream ended without a result".into())),
                Err(s) if s.code() == tonic::Code::Aborted && p > 1 => {
                    tracing::info!(worker = %w.id, status = %s, "a rank stopped for another");
                    aborted.get_or_insert((
                        format!("{}: {}", w.address, s.message()),
                        tokio::time::Instant::now(),
                    ));
                    continue;
                }
                Err(s) => return Err(status_outcome(s, w)),
            };
            match step.event {
                Some(ipb::job_step::Event::Progress(pr)) => {
                    let phase = if pr.phase == 2 {
                        pb::Phase::Decode
                    } else {
                        pb::Phase::Prefill
                    };
                    job.progress(phase, pr.tokens_done, pr.tokens_per_second);
                }
                Some(ipb::job_step::Event::Context(c)) => {
                    if let Some(slot) = cache.get_mut(c.rank as usize) {
                        *slot = Some(c.cache_bytes);
                    }
                    if cache.iter().all(Option::is_some) {
                        let per_rank: Vec<u64> = cache.iter().flatten().copied().collect();
                        job.set_cache_bytes(&per_rank);
                    }
                }
                Some(ipb::job_step::Event::Token(t)) => {
                    let have = job.lock().record.tokens.len() as u32;
                    if t.index < have {
                        // A re-run repeats tokens the client already has: skip them.
                        let old = job.lock().record.tokens[t.index as usize];
                        if old != t.token {
                            tracing::warn!(
                                index = t.index,
                                old,
                                new = t.token,
                                "a re-run produced a different token; keeping the first"
                            );
                        }
                    } else if t.index == have {
                        if have == 0 {
                            *ttft = ringbolt_jobs::record::now_unix_ms()
                                .saturating_sub(job.lock().record.created_unix_ms)
                                as f64
                                / 1e3;
                        }
                        job.token(t.token);
                    } else {
                        return Err(lost(format!(
                            "token {} arrived before token {have}",
                            t.index
                        )));
                    }
                }
                Some(ipb::job_step::Event::Done(d)) if d.finish_reason == "prefilled" => {
                    prefilled[r] = true;
                }
                Some(ipb::job_step::Event::Done(d)) => return Ok(d),
                None => {}
            }
        }
    }
}

/// Opens a job step's stream on attention worker `w`.
async fn open_step(
    dial: &Dial,
    w: &Member,
    req: ipb::RunJobRequest,
) -> Result<tonic::Streaming<ipb::JobStep>, Attempt> {
    let channel = dial
        .connect(&w.address, Duration::from_secs(5))
        .await
        .map_err(|e| Attempt::Lost {
            msg: e.to_string(),
            blame: Some(w.id.clone()),
        })?;
    let mut client = AttentionWorkerClient::new(channel)
        .max_decoding_message_size(MAX_CONTROL_MESSAGE)
        .max_encoding_message_size(MAX_CONTROL_MESSAGE);
    Ok(client
        .run_job(req)
        .await
        .map_err(|s| status_outcome(s, w))?
        .into_inner())
}

enum Attempt {
    Cancelled,
    /// Another try may succeed; `blame` is the worker that failed (None: unknown).
    Lost {
        msg: String,
        blame: Option<String>,
    },
    Fatal(tonic::Code, String),
}

fn status_outcome(s: tonic::Status, w: &Member) -> Attempt {
    if retryable(s.code()) {
        Attempt::Lost {
            msg: format!("{}: {}", w.address, s.message()),
            blame: Some(w.id.clone()),
        }
    } else {
        Attempt::Fatal(s.code(), s.message().to_string())
    }
}

struct RunningGuard<'a> {
    view: &'a ClusterView,
    id: String,
}

impl<'a> RunningGuard<'a> {
    fn new(view: &'a ClusterView, id: &str) -> Self {
        *view
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default() += 1;
        RunningGuard {
            view,
            id: id.to_string(),
        }
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Some(n) = self
            .view
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.id)
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// `ringbolt coordinator`.
pub async fn run(a: CoordinatorArgs) -> Result<(), ClusterError> {
    let c = &a.common;
    let stop = CancellationToken::new();
    let shell = c.shell("coordinator", c.listen, stop.clone())?;
    let membership = connect_membership(c).await?;
    let client = membership.client();
    let ckpt = Checkpoint::open(&c.checkpoint).map_err(|e| ClusterError::Model(e.to_string()))?;
    let cfg: ModelConfig = ckpt.config().clone();
    let vision = ckpt.vision().cloned();
    // For workers that do not say what an expert takes on their device: the CPU's figure.
    let per_expert = expert_bytes(
        &ckpt,
        &ringbolt_kernels::cpu::Cpu::default(),
        ringbolt_kernels::WeightFormat::Bf16,
    );
    // The listener is bound only once elected: with port 0 the id cannot name the port.
    let id = match (&c.id, &c.advertise) {
        (Some(id), _) => id.clone(),
        (None, Some(adv)) => c.member_id("coordinator", adv),
        (None, None) if c.listen.port() == 0 => {
            format!(
                "coordinator-{}",
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            )
        }
        (None, None) => c.member_id("coordinator", &c.listen.to_string()),
    };

    // Leadership: a standby waits here until the leader's lease ends.
    let kept = ringbolt_membership::keep_lease(&client, c.lease_ttl())
        .await
        .map_err(|e| ClusterError::Etcd(e.to_string()))?;
    let lease = kept.id;
    let _keepalive = kept.keepalive.drop_guard();
    let mut lease_lost = kept.lost;
    eprintln!(
        "ringbolt coordinator {id}: campaigning for leadership of cluster `{}`",
        c.cluster
    );
    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(client.clone(), &c.cluster));
    let campaign = store.campaign(&id, lease);
    let fence = tokio::select! {
        f = campaign => f?,
        _ = lease_lost.wait_for(|l| *l) => {
            return Err(ClusterError::Etcd("lost the election lease while standing by".into()));
        }
        _ = wait_for_signal() => { stop.cancel(); return Ok(()); }
    };
    tracing::info!(%id, "elected leader");

    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let reg = membership
        .register(
            Member {
                id: id.clone(),
                role: Role::Coordinator,
                address: address.clone(),
                data_address: String::new(),
                capacity_bytes: 0,
                expert_bytes: 0,
                device: String::new(),
            },
            c.lease_ttl(),
        )
        .await
        .map_err(|e| ClusterError::Etcd(e.to_string()))?;
    let plan = store.follow_plan(stop.clone()).await?;
    let view = Arc::new(ClusterView {
        members: RwLock::new(Vec::new()),
        plan,
        running: Mutex::new(HashMap::new()),
        expert_bytes: per_expert,
        // Attention workers keep keys and values in f32 (the CPU backend's cache).
        cache: ringbolt_planner::ContextCost::of(&cfg, 4),
        prefixes: Default::default(),
    });
    let planner = Planner {
        store: store.clone(),
        membership: membership.clone(),
        view: view.clone(),
        layers: cfg.num_layers() as u32,
        experts: cfg.num_experts as u32,
        expert_bytes: per_expert,
        ids: crate::group::nccl_ids(),
        ids_paused_until: Mutex::new(None),
        fence: fence.clone(),
        dial: c.dial(),
    };
    tokio::spawn(planner.run(stop.clone()));

    let records = store.records(fence.clone()).await?;
    std::fs::create_dir_all(&a.data_dir)
        .map_err(|e| ClusterError::Io(format!("{}: {e}", a.data_dir.display())))?;
    // Opening checks the spool against the records and may write to etcd: blocking calls.
    let dir = a.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || JobStore::with_records(&dir, records))
        .await
        .map_err(|e| ClusterError::Io(e.to_string()))?
        .map_err(|e| ClusterError::Io(format!("{}: {e}", a.data_dir.display())))?;
    let limits = a.limits.limits(a.max_context_parallel, &a.auth);
    let exec = ClusterExecutor {
        rt: tokio::runtime::Handle::current(),
        view: view.clone(),
        prefill_chunk: a.prefill_chunk,
        attempts: a.job_attempts.max(1),
        worker_wait: Duration::from_secs(a.worker_wait_secs),
        dial: c.dial(),
    };
    let text = ringbolt_text::Text::load(&c.checkpoint, None)
        .map_err(|e| ClusterError::Model(e.to_string()))?
        .map(Arc::new);
    let mgr = JobManager::start_with(
        Box::new(exec),
        (cfg, vision),
        store,
        limits,
        text,
        stop.clone(),
    )
    .map_err(|e| ClusterError::Io(e.to_string()))?;
    let tokens = a.auth.tokens()?;
    let http = ringbolt_openai::start(
        &a.http,
        "coordinator",
        &c.checkpoint,
        mgr.clone(),
        tokens.clone(),
        &shell,
        stop.clone(),
    )
    .await
    .map_err(|e| ClusterError::Io(e.to_string()))?;
    let svc = JobsService::new(mgr, address.clone())
        .with_status(view.clone())
        .with_tokens(tokens);
    eprintln!("ringbolt coordinator {id} listening on {address}");
    let mut lost = reg.lost();
    let stop2 = stop.clone();
    let deposed = fence.deposed.clone();
    let shutdown = async move {
        tokio::select! {
            _ = wait_for_signal() => {}
            _ = lease_lost.wait_for(|l| *l) => {
                tracing::error!("leadership lease lost (etcd unreachable): stepping down");
            }
            _ = lost.wait_for(|l| *l) => {
                tracing::error!("membership lease lost (etcd unreachable): stepping down");
            }
            _ = deposed.cancelled() => {
                tracing::error!("deposed: another coordinator leads; stepping down");
            }
        }
        stop2.cancel();
    };
    serve_service(svc, shell, listener, shutdown)
        .await
        .map_err(|e| ClusterError::Io(e.to_string()))?;
    stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    let _ = reg.leave().await;
    let _ = client.clone().lease_revoke(lease).await;
    if fence.deposed.is_cancelled() {
        // Exiting non-zero: a supervisor restarts it, as a standby.
        return Err(ClusterError::Etcd(
            "deposed: another coordinator leads, and this one's writes were refused".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The placement logic against the in-memory store and membership, in one process: the
    //! expert workers are stand-ins that accept every load.
    use super::*;
    use crate::store::MemoryStore;
    use ringbolt_membership::MemoryMembership;
    use ringbolt_proto::internal::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
    use tonic::{Request, Response, Status};

    struct StandIn;

    #[tonic::async_trait]
    impl ExpertWorker for StandIn {
        async fn load_shards(
            &self,
            r: Request<ipb::LoadShardsRequest>,
        ) -> Result<Response<ipb::LoadShardsResponse>, Status> {
            Ok(Response::new(ipb::LoadShardsResponse {
                loaded: r.into_inner().experts.len() as u32,
                ..Default::default()
            }))
        }
        async fn expert_load(
            &self,
            _: Request<ipb::ExpertLoadRequest>,
        ) -> Result<Response<ipb::ExpertLoadResponse>, Status> {
            Ok(Response::new(Default::default()))
        }
    }

    async fn stand_in() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExpertWorkerServer::new(StandIn))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        addr
    }

    fn expert(id: &str, address: &str) -> Member {
        Member {
            id: id.into(),
            role: Role::ExpertWorker,
            address: address.into(),
            data_address: "127.0.0.1:1".into(),
            capacity_bytes: 0,
            expert_bytes: 1,
            device: "cpu".into(),
        }
    }

    /// Waits for a plan that `pred` accepts.
    async fn plan_where(view: &PlanView, what: &str, pred: impl Fn(&Plan) -> bool) -> Arc<Plan> {
        let mut rx = view.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| pred(p))).await;
        match r {
            Ok(Ok(p)) => p.clone(),
            _ => panic!("never: {what}; last {:?}", view.current()),
        }
    }

    /// Cache-aware routing: a job goes to the worker, or the group in rank order, that
    /// prefilled the longest prefix of its prompt, unless one of them is busy; a group is
    /// found only for a prefix it keeps whole and would take.
    #[tokio::test]
    async fn jobs_are_routed_to_the_worker_or_group_holding_their_prefix() {
        let cfg = ringbolt_model::Preset::Tiny.config();
        let stop = CancellationToken::new();
        let view = ClusterView {
            members: RwLock::new(Vec::new()),
            plan: MemoryStore::default()
                .follow_plan(stop.clone())
                .await
                .unwrap(),
            running: Mutex::new(HashMap::new()),
            expert_bytes: 1,
            cache: ringbolt_planner::ContextCost::of(&cfg, 4),
            prefixes: Default::default(),
        };
        let attention = |id: &str| Member {
            role: Role::AttentionWorker,
            ..expert(id, "127.0.0.1:2")
        };
        view.set_members(["a", "b", "c"].map(attention).to_vec());
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let doc: Vec<u32> = (0..100).collect();
        let ask = |tail: &[u32]| doc.iter().chain(tail).copied().collect::<Vec<u32>>();
        // One worker prefilled the document and a question: its whole chunks are its.
        view.record_prefix(16, &ask(&[1, 2, 3]), &ids(&["b"]));
        assert_eq!(view.prefix_holder(16, &ask(&[7]), 1), Some(ids(&["b"])));
        assert_eq!(view.prefix_holder(16, &ask(&[7]), 2), None);
        // A group (rank order c, a) keeps its part, the first 96 positions, whole.
        view.record_prefix(16, &doc[..96], &ids(&["c", "a"]));
        let group = view.prefix_holder(16, &ask(&[7, 8]), 2);
        assert_eq!(group, Some(ids(&["c", "a"])));
        assert_eq!(view.prefix_holder(16, &ask(&[7]), 1), Some(ids(&["b"])));
        // Not for a prompt sharing only its first 64: too short for a group to take.
        let mut other = doc[..64].to_vec();
        other.extend(500..540);
        assert_eq!(view.prefix_holder(16, &other, 2), None);
        assert_eq!(view.prefix_holder(16, &other, 1), Some(ids(&["b"])));
        // The group is picked in its rank order, unless a member is busier than the least busy
        // by more than one job, or to be avoided.
        let picked = |avoid: &[&str]| {
            let avoid: HashSet<String> = avoid.iter().map(|s| s.to_string()).collect();
            let got = view.pick_attention(2, &avoid, group.as_deref()).unwrap();
            got.into_iter().map(|m| m.id).collect::<Vec<_>>()
        };
        assert_eq!(picked(&[]), ids(&["c", "a"]));
        view.running.lock().unwrap().insert("c".into(), 2);
        assert_eq!(picked(&[]), ids(&["a", "b"]));
        view.running.lock().unwrap().clear();
        assert_eq!(picked(&["a"]), ids(&["b", "c"]));
        stop.cancel();
    }

    #[tokio::test]
    async fn places_drains_and_stops_writing_once_another_leads() {
        let cfg = ringbolt_model::Preset::Tiny.config();
        let (layers, experts) = (cfg.num_layers() as u32, cfg.num_experts as u32);
        let slots = (layers * experts) as usize;
        let store = MemoryStore::default();
        let fence = store.elect();
        let membership = MemoryMembership::new();
        let stop = CancellationToken::new();
        let view_plan = store.follow_plan(stop.clone()).await.unwrap();
        let view = Arc::new(ClusterView {
            members: RwLock::new(Vec::new()),
            plan: view_plan.clone(),
            running: Mutex::new(HashMap::new()),
            expert_bytes: 1,
            cache: ringbolt_planner::ContextCost::of(&cfg, 4),
            prefixes: Default::default(),
        });
        let mut regs = Vec::new();
        for id in ["e0", "e1"] {
            let m = expert(id, &stand_in().await);
            regs.push(
                membership
                    .register(m, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
        let planner = Planner {
            store: Arc::new(store.clone()),
            membership: membership.clone(),
            view: view.clone(),
            layers,
            experts,
            expert_bytes: 1,
            ids: None,
            ids_paused_until: Mutex::new(None),
            fence: fence.clone(),
            dial: Dial::default(),
        };
        tokio::spawn(planner.run(stop.clone()));
        let held = |p: &Plan, id: &str| p.workers.get(id).map_or(0, |w| w.experts.len());
        // Every expert placed, on both workers.
        let p = plan_where(&view_plan, "every expert placed on e0 and e1", |p| {
            held(p, "e0") + held(p, "e1") >= slots && held(p, "e0") > 0 && held(p, "e1") > 0
        })
        .await;
        assert_eq!(p.assignment().values().map(Vec::len).sum::<usize>(), slots);
        // e1 asks to be drained: a plan without it, e0 holding everything.
        store.set_drain("e1", true).await.unwrap();
        plan_where(&view_plan, "e1 drained", |p| {
            held(p, "e1") == 0 && held(p, "e0") == slots
        })
        .await;
        let epoch = view_plan.current().epoch;
        // Job records go through the same fence.
        let records = store.records(fence.clone()).await.unwrap();
        let rec: ringbolt_jobs::JobRecord = serde_json::from_value(serde_json::json!({
            "id": "j1", "state": "queued", "prompt_tokens": 3, "max_new_tokens": 2,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": 0, "stop_tokens": []},
            "idempotency_key": "k1", "context_parallel": 1, "created_unix_ms": 1,
            "finished_unix_ms": null, "tokens": [], "finish_reason": null, "error": null,
            "timings": {"queued_seconds": 0.0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                "time_to_first_token_seconds": 0.0},
        }))
        .unwrap();
        assert_eq!(records.commit(&rec).unwrap(), Ok(()));
        assert_eq!(records.commit(&rec).unwrap(), Err("j1".to_string()));
        // Another coordinator is elected: this one's next plan (for a new worker) and record
        // writes are refused, and it knows it is deposed.
        let newer = store.campaign("c2", 0).await.unwrap();
        assert!(matches!(
            records.put(&rec),
            Err(ringbolt_jobs::JobError::NotLeader(_))
        ));
        let theirs = store.records(newer).await.unwrap();
        assert_eq!(theirs.get("j1").unwrap().unwrap().id, "j1");
        theirs.put(&rec).unwrap();
        let m = expert("e2", &stand_in().await);
        regs.push(
            membership
                .register(m, Duration::from_secs(5))
                .await
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(20), fence.deposed.cancelled())
            .await
            .expect("a deposed leader's plan write is refused");
        assert_eq!(
            view_plan.current().epoch,
            epoch,
            "a refused plan was published"
        );
        stop.cancel();
    }
}
