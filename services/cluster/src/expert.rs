//! The expert worker: holds the experts the plan gives it, serves layer steps on the data
//! plane, loads shards ahead of an epoch (keeping the old ones until the epoch is active), and
//! drains on SIGTERM (asks the coordinator to move its experts, then exits).

use crate::Health;
use crate::plan::{Plan, Slot};
use crate::store::{EtcdStore, Store};
use crate::wire::{ExpertRequest, value_bytes};
use crate::{ClusterError, CommonArgs, bind, bind_data, connect_membership, wait_for_signal};
use bytes::Bytes;
use clap::Args;
use futures::future::BoxFuture;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, ExpertGroup, OnBackend, WeightFormat};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::scheduler::panic_message;
use ringbolt_model::{Checkpoint, Expert, ModelConfig};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use ringbolt_transport::exchange::{Handler, Refusal, serve_with};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

#[derive(Args, Clone, Debug)]
pub struct ExpertWorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where the data plane (expert steps) listens (default: the --listen host, any port).
    #[arg(long, env = "RINGBOLT_DATA_LISTEN")]
    pub data_listen: Option<SocketAddr>,
    /// Memory offered for experts (0: unlimited). The planner never places more here.
    #[arg(long, env = "RINGBOLT_MEMORY_BYTES", default_value_t = 0)]
    pub memory_bytes: u64,
    /// Longest a drain (SIGTERM) waits for the experts to move before exiting anyway.
    #[arg(long, env = "RINGBOLT_DRAIN_TIMEOUT_SECS", default_value_t = 120)]
    pub drain_timeout_secs: u64,
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
}

/// Bytes one expert of `ckpt` takes on `backend` held as `weights`: int8 takes a byte per
/// weight and a scale per output channel on any backend; otherwise the CPU keeps bf16
/// checkpoints bf16 (2 bytes per weight) and widens anything else to f32 (4), and a GPU holds
/// bf16 whatever the checkpoint.
pub fn expert_bytes<B: Backend>(ckpt: &Checkpoint, backend: &B, weights: WeightFormat) -> u64 {
    if weights.int8_experts() {
        return ringbolt_planner::placement::int8_expert_bytes(ckpt.config());
    }
    let w1 = ringbolt_model::weights::expert_name(0, 0, "w1");
    let bf16 = ckpt.dtype(&w1).as_deref() == Some("BF16");
    ringbolt_planner::placement::expert_bytes(ckpt.config(), backend.bytes_per_weight(bf16))
}

/// Requests waiting for the engine thread; senders wait when it is full.
const ENGINE_QUEUE: usize = 256;
/// Most requests served as one batch.
const MAX_BATCH: usize = 64;

/// A request in the engine thread's queue.
struct Queued {
    epoch: u64,
    data: Bytes,
    reply: tokio::sync::oneshot::Sender<Result<Bytes, Refusal>>,
}

/// A request checked against the experts held: its rows and the experts it names, in order.
struct Prepared<B: Backend> {
    req: ExpertRequest,
    experts: Vec<Arc<Expert<B>>>,
}

/// The experts held by one worker, and the data-plane handler.
pub struct ExpertHost<B: Backend = Cpu> {
    backend: B,
    id: String,
    ckpt: Arc<Checkpoint>,
    cfg: ModelConfig,
    /// How the experts are held.
    weights: WeightFormat,
    held: RwLock<HashMap<Slot, Arc<Expert<B>>>>,
    /// Experts loaded for epochs not active yet.
    pending: Mutex<BTreeMap<u64, HashSet<Slot>>>,
    active: AtomicU64,
    load: Mutex<HashMap<Slot, u64>>,
    inflight: AtomicUsize,
}

impl ExpertHost<Cpu> {
    /// A host computing on the CPU.
    pub fn new(id: String, ckpt: Checkpoint) -> Self {
        Self::on(Cpu::default(), id, ckpt)
    }
}

impl<B: Backend> ExpertHost<B> {
    /// A host whose experts live and compute on `backend`.
    pub fn on(backend: B, id: String, ckpt: Checkpoint) -> Self {
        ExpertHost {
            backend,
            id,
            cfg: ckpt.config().clone(),
            ckpt: Arc::new(ckpt),
            weights: WeightFormat::Bf16,
            held: RwLock::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            active: AtomicU64::new(0),
            load: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
        }
    }

    /// The host with its experts held as `weights` (`--weights`).
    pub fn with_weights(mut self, weights: WeightFormat) -> Self {
        self.weights = weights;
        self
    }

    /// Bytes one expert takes here.
    pub fn expert_bytes(&self) -> u64 {
        expert_bytes(&self.ckpt, &self.backend, self.weights)
    }

    pub fn active_epoch(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
    }

    pub fn held(&self) -> Vec<Slot> {
        let mut v: Vec<Slot> = self
            .held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort();
        v
    }

    /// Loads `slots` for `epoch` (those not held yet). Returns (loaded, bytes loaded).
    pub fn load_shards(&self, epoch: u64, slots: &[Slot]) -> Result<(u32, u64), ClusterError> {
        let (layers, experts) = (self.cfg.num_layers() as u32, self.cfg.num_experts as u32);
        if let Some(bad) = slots.iter().find(|(l, e)| *l >= layers || *e >= experts) {
            return Err(ClusterError::Invalid(format!(
                "expert {} of layer {} is outside the model ({layers} layers × {experts} experts)",
                bad.1, bad.0
            )));
        }
        let missing: Vec<Slot> = {
            let held = self.held.read().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .filter(|s| !held.contains_key(s))
                .copied()
                .collect()
        };
        let mut loaded = 0;
        for &(l, e) in &missing {
            let ex = Expert::load(
                &self.ckpt,
                &self.backend,
                l as usize,
                e as usize,
                self.weights,
            )
            .map_err(|e| ClusterError::Model(e.to_string()))?;
            self.held
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert((l, e), Arc::new(ex));
            loaded += 1;
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(epoch, slots.iter().copied().collect());
        tracing::info!(epoch, loaded, wanted = slots.len(), "shards loaded");
        Ok((loaded, loaded as u64 * self.expert_bytes()))
    }

    /// `plan` is now active: refuse older epochs, drop experts nobody wants any more.
    pub fn activate(&self, plan: &Plan) {
        let prev = self.active.fetch_max(plan.epoch, Ordering::SeqCst);
        if plan.epoch < prev {
            return;
        }
        let mut keep: HashSet<Slot> = plan
            .workers
            .get(&self.id)
            .map(|w| w.experts.iter().copied().collect())
            .unwrap_or_default();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|&e, _| e > plan.epoch);
            for s in pending.values() {
                keep.extend(s.iter().copied());
            }
        }
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        let before = held.len();
        held.retain(|s, _| keep.contains(s));
        tracing::info!(
            epoch = plan.epoch,
            held = held.len(),
            dropped = before - held.len(),
            "plan epoch active"
        );
    }

    /// Checks one request against what this worker holds now: the epoch, the shape and the
    /// experts it names.
    fn prepare(&self, epoch: u64, data: &[u8]) -> Result<Prepared<B>, Refusal> {
        let current = self.active_epoch();
        if epoch < current {
            return Err(Refusal::StaleEpoch { current });
        }
        let req = ExpertRequest::decode(data).map_err(Refusal::Failed)?;
        let h = self.cfg.hidden_size;
        if req.hidden as usize != h {
            return Err(Refusal::Failed(format!(
                "hidden size {} does not match the model's {h}",
                req.hidden
            )));
        }
        let experts: Vec<Arc<Expert<B>>> = {
            let held = self.held.read().unwrap_or_else(|p| p.into_inner());
            req.groups
                .iter()
                .map(|(e, _)| {
                    held.get(&(req.layer, *e)).cloned().ok_or_else(|| {
                        Refusal::Failed(format!(
                            "worker {} does not hold expert {e} of layer {} (epoch {current})",
                            self.id, req.layer
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        Ok(Prepared { req, experts })
    }

    /// Serves the layer steps that waited together: requests for the same layer (from any
    /// attention worker) run as one MoE call, each expert once over the rows of every request
    /// routed to it; each request then gets its own groups' outputs, in its group order.
    fn serve_batch(&self, batch: Vec<(u64, Bytes)>) -> Vec<Result<Bytes, Refusal>> {
        let mut answers: Vec<Option<Result<Bytes, Refusal>>> = Vec::with_capacity(batch.len());
        let mut by_layer: BTreeMap<u32, Vec<(usize, Prepared<B>)>> = BTreeMap::new();
        for (i, (epoch, data)) in batch.iter().enumerate() {
            match self.prepare(*epoch, data) {
                Ok(p) => {
                    answers.push(None);
                    by_layer.entry(p.req.layer).or_default().push((i, p));
                }
                Err(r) => answers.push(Some(Err(r))),
            }
        }
        for (layer, reqs) in &by_layer {
            // A failure (a panic in compute) fails this layer's requests only.
            let served =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.layer_step(reqs)));
            match served {
                Ok(outs) => {
                    let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
                    for (_, p) in reqs {
                        for (e, ids) in &p.req.groups {
                            *load.entry((*layer, *e)).or_default() += ids.len() as u64;
                        }
                    }
                    for (i, out) in outs {
                        answers[i] = Some(Ok(out));
                    }
                }
                Err(e) => {
                    let msg = panic_message(&*e);
                    tracing::error!(layer, %msg, "expert step failed");
                    for (i, _) in reqs {
                        answers[*i] = Some(Err(Refusal::Failed(format!(
                            "expert step of layer {layer} failed: {msg}"
                        ))));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Refusal::Failed("request was not served".into()))))
            .collect()
    }

    /// One MoE call for the requests of one layer. Returns (request index, answer).
    fn layer_step(&self, reqs: &[(usize, Prepared<B>)]) -> Vec<(usize, Bytes)> {
        let (h, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        // Every (request, group), ordered by expert: each expert's rows are contiguous.
        let mut parts: Vec<(u32, usize, usize)> = reqs
            .iter()
            .enumerate()
            .flat_map(|(r, (_, p))| {
                p.req
                    .groups
                    .iter()
                    .enumerate()
                    .map(move |(g, (e, _))| (*e, r, g))
            })
            .collect();
        parts.sort_unstable();
        let rows: usize = parts
            .iter()
            .map(|&(_, r, g)| reqs[r].1.req.groups[g].1.len())
            .sum();
        let mut x = Vec::with_capacity(rows * h);
        // Where each (request, group) starts in the stacked rows.
        let mut at: HashMap<(usize, usize), usize> = HashMap::with_capacity(parts.len());
        // (expert, its weights, first row, row count), one per expert.
        let mut spans: Vec<(u32, &Expert<B>, usize, usize)> = Vec::new();
        for &(e, r, g) in &parts {
            let p = &reqs[r].1;
            let ids = &p.req.groups[g].1;
            let start = x.len() / h;
            at.insert((r, g), start);
            for &row in ids {
                x.extend_from_slice(&p.req.x[row as usize * h..(row as usize + 1) * h]);
            }
            match spans.last_mut() {
                Some((last, _, _, n)) if *last == e => *n += ids.len(),
                _ => spans.push((e, &p.experts[g], start, ids.len())),
            }
        }
        let ids: Vec<u32> = (0..rows as u32).collect();
        let ones = vec![1f32; rows];
        let groups: Vec<ExpertGroup<'_, B>> = spans
            .iter()
            .filter(|(_, _, _, n)| *n > 0)
            .map(|(_, ex, s, n)| ExpertGroup {
                ids: &ids[*s..s + n],
                weights: &ones[*s..s + n],
                w13: &ex.w13,
                w2: &ex.w2,
            })
            .collect();
        let b = &self.backend;
        let t0 = std::time::Instant::now();
        let y = b.moe_experts(&b.upload_owned(x), rows, h, inter, &groups);
        let y = b.host_view(&y);
        metrics::histogram!("ringbolt_expert_compute_seconds").record(t0.elapsed().as_secs_f64());
        for (_, p) in reqs {
            for (e, ids) in &p.req.groups {
                metrics::counter!(
                    "ringbolt_expert_rows_total",
                    "layer" => p.req.layer.to_string(),
                    "expert" => e.to_string()
                )
                .increment(ids.len() as u64);
            }
        }
        reqs.iter()
            .enumerate()
            .map(|(r, (i, p))| {
                let mut out =
                    Vec::with_capacity(p.req.groups.iter().map(|g| g.1.len()).sum::<usize>() * h);
                for (g, (_, ids)) in p.req.groups.iter().enumerate() {
                    let s = at[&(r, g)];
                    out.extend_from_slice(&y[s * h..(s + ids.len()) * h]);
                }
                (*i, value_bytes(&out, p.req.dtype))
            })
            .collect()
    }

    /// The data-plane handler. Starts an engine thread: the one thread that computes on the
    /// backend (a GPU's context has one owner), so a worker calls this once. Requests queue to
    /// it (bounded: senders wait); it takes everything that waits and serves it as one batch.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(ENGINE_QUEUE);
        let host = self.clone();
        let spawned = std::thread::Builder::new()
            .name("expert-engine".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut queued = vec![first];
                    while queued.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(q) => queued.push(q),
                            Err(_) => break,
                        }
                    }
                    let (batch, replies): (Vec<_>, Vec<_>) = queued
                        .into_iter()
                        .map(|q| ((q.epoch, q.data), q.reply))
                        .unzip();
                    let n = batch.len();
                    let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        host.serve_batch(batch)
                    }))
                    .unwrap_or_else(|e| {
                        let msg = panic_message(&*e);
                        tracing::error!(%msg, "expert step failed");
                        (0..n)
                            .map(|_| Err(Refusal::Failed(format!("expert step failed: {msg}"))))
                            .collect()
                    });
                    if n > 1 {
                        tracing::debug!(requests = n, "expert requests served as one batch");
                    }
                    for (reply, a) in replies.into_iter().zip(answers) {
                        let _ = reply.send(a);
                    }
                }
            });
        if let Err(e) = &spawned {
            tracing::error!(error = %e, "cannot start the expert engine thread");
        }
        let host = self.clone();
        Arc::new(move |epoch, data: Bytes, trace: Option<String>| {
            let host = host.clone();
            let tx = tx.clone();
            let span = tracing::info_span!("expert_request", epoch, bytes = data.len());
            if let Some(t) = &trace {
                ringbolt_shell::telemetry::set_remote_parent(&span, t);
            }
            Box::pin(
                async move {
                    host.inflight.fetch_add(1, Ordering::SeqCst);
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    let r = match tx.send(Queued { epoch, data, reply }).await {
                        Ok(()) => rx.await.unwrap_or_else(|_| {
                            Err(Refusal::Failed("the expert engine stopped".into()))
                        }),
                        Err(_) => Err(Refusal::Failed("the expert engine is not running".into())),
                    };
                    host.inflight.fetch_sub(1, Ordering::SeqCst);
                    r
                }
                .instrument(span),
            )
        })
    }

    fn load_stats(&self) -> Vec<ipb::ExpertLoad> {
        let load = self.load.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<ipb::ExpertLoad> = load
            .iter()
            .map(|(&(layer, expert), &rows)| ipb::ExpertLoad {
                layer,
                expert,
                rows,
            })
            .collect();
        v.sort_by_key(|x| (x.layer, x.expert));
        v
    }
}

struct Control<B: Backend>(Arc<ExpertHost<B>>);

#[tonic::async_trait]
impl<B: Backend> ExpertWorker for Control<B> {
    async fn load_shards(
        &self,
        request: Request<ipb::LoadShardsRequest>,
    ) -> Result<Response<ipb::LoadShardsResponse>, Status> {
        let r = request.into_inner();
        let slots: Vec<Slot> = r.experts.iter().map(|s| (s.layer, s.expert)).collect();
        let host = self.0.clone();
        let (loaded, bytes) =
            tokio::task::spawn_blocking(move || host.load_shards(r.epoch, &slots))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Status::from)?;
        let held = self.0.held().len() as u64 * self.0.expert_bytes();
        Ok(Response::new(ipb::LoadShardsResponse {
            loaded,
            loaded_bytes: bytes,
            held_bytes: held,
        }))
    }

    async fn expert_load(
        &self,
        _request: Request<ipb::ExpertLoadRequest>,
    ) -> Result<Response<ipb::ExpertLoadResponse>, Status> {
        Ok(Response::new(ipb::ExpertLoadResponse {
            experts: self.0.load_stats(),
        }))
    }
}

/// `ringbolt expert-worker`.
pub async fn run(a: ExpertWorkerArgs) -> Result<(), ClusterError> {
    let ckpt =
        Checkpoint::open(&a.common.checkpoint).map_err(|e| ClusterError::Model(e.to_string()))?;
    let compute = a.compute;
    // Experts are loaded later, as plans place them; here the device's backend is opened.
    let serve = tokio::task::spawn_blocking(move || {
        compute
            .open(Open { a, ckpt })
            .map_err(|e| ClusterError::Model(e.to_string()))
    })
    .await
    .map_err(|e| ClusterError::Model(e.to_string()))??;
    serve.await
}

struct Open {
    a: ExpertWorkerArgs,
    ckpt: Checkpoint,
}

impl OnBackend for Open {
    type Output = BoxFuture<'static, Result<(), ClusterError>>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        tracing::info!(backend = %backend.name(), "expert worker backend open");
        Box::pin(serve_on(self.a, self.ckpt, backend))
    }
}

async fn serve_on<B: Backend>(
    a: ExpertWorkerArgs,
    ckpt: Checkpoint,
    backend: B,
) -> Result<(), ClusterError> {
    let c = &a.common;
    let stop = CancellationToken::new();
    let shell = c.shell("expert-worker", c.listen, stop.clone())?;
    let membership = connect_membership(c).await?;
    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let (data_listener, data_address, guard) = bind_data(a.data_listen, c).await?;
    let id = c.member_id("expert", &address);
    let host = Arc::new(ExpertHost::on(backend, id.clone(), ckpt).with_weights(a.compute.weights));
    let data = serve_with(data_listener, host.handler(), shell.limits(), guard);

    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(membership.client(), &c.cluster));
    let view = store.follow_plan(stop.clone()).await?;
    let _group = crate::group::follow_on(a.compute.device, &id, &view, store.clone(), stop.clone());
    {
        let host = host.clone();
        let mut rx = view.subscribe();
        host.activate(&rx.borrow_and_update());
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
                let p = rx.borrow_and_update().clone();
                host.activate(&p);
            }
        });
    }

    let health = Health::start(&[<ExpertWorkerServer<Control<B>> as NamedService>::NAME]).await;
    let svc = ExpertWorkerServer::new(Control(host.clone()));
    let router = shell
        .server()
        .add_service(health.service())
        .add_service(svc);
    let grpc = shell.spawn(router, listener, stop.clone());

    let me = Member {
        id: id.clone(),
        role: Role::ExpertWorker,
        address: address.clone(),
        data_address: data_address.clone(),
        capacity_bytes: a.memory_bytes,
        expert_bytes: host.expert_bytes(),
        device: a.compute.device.to_string(),
    };
    let register = || async {
        membership
            .register(me.clone(), c.lease_ttl())
            .await
            .map_err(|e| ClusterError::Etcd(e.to_string()))
    };
    let mut reg = Some(register().await?);
    health.set(true).await;
    eprintln!("ringbolt expert-worker {id} listening on {address} (data plane {data_address})");
    // Serving while the data plane accepts: a worker that cannot take expert steps leaves the
    // plan (its experts move to others) and says it is not ready, until it accepts again.
    let mut accepting = data.healthy();
    loop {
        let mut lost = reg.as_ref().map(|r| r.lost());
        let lease_lost = async {
            match lost.as_mut() {
                Some(l) => {
                    let _ = l.wait_for(|l| *l).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = lease_lost => {
                stop.cancel();
                return Err(ClusterError::Etcd("membership lease lost: etcd unreachable".into()));
            }
            r = accepting.changed() => {
                let up = r.is_ok() && *accepting.borrow_and_update();
                if !up && let Some(r) = reg.take() {
                    tracing::error!("the data plane is not accepting connections: leaving the plan until it does");
                    health.set(false).await;
                    let _ = r.leave().await;
                } else if up && reg.is_none() {
                    reg = Some(register().await?);
                    health.set(true).await;
                    tracing::warn!("the data plane accepts again: rejoined");
                }
                if r.is_err() {
                    stop.cancel();
                    return Err(ClusterError::Io("the data-plane server stopped".into()));
                }
            }
            _ = wait_for_signal() => break,
        }
    }

    // Drain: ask for a plan without this worker, wait until it is active, then leave.
    tracing::info!(%id, "draining: asking the coordinator to move this worker's experts");
    if let Err(e) = store.set_drain(&id, true).await {
        tracing::warn!(error = %e, "cannot ask for a drain");
    }
    let deadline = Duration::from_secs(a.drain_timeout_secs);
    let moved = tokio::time::timeout(deadline, async {
        let mut rx = view.subscribe();
        let _ = rx
            .wait_for(|p| p.epoch > 0 && p.workers.get(&id).is_none_or(|w| w.experts.is_empty()))
            .await;
    })
    .await;
    if moved.is_err() {
        tracing::warn!("drain timed out: exiting with experts still placed here");
    }
    // Steps in flight finish (bounded).
    let t0 = Instant::now();
    while host.inflight.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    health.set(false).await;
    if let Some(reg) = reg {
        let _ = reg.leave().await;
    }
    let _ = store.set_drain(&id, false).await;
    stop.cancel();
    data.abort();
    let _ = grpc.await;
    eprintln!("ringbolt expert-worker {id} drained");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::WorkerPlace;
    use crate::wire::f32s;
    use ringbolt_model::{Preset, WeightDtype, write_random_checkpoint};

    fn request(
        layer: u32,
        h: usize,
        groups: Vec<(u32, Vec<u32>)>,
        rows: usize,
        seed: u32,
    ) -> Bytes {
        let x = (0..rows * h)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        ExpertRequest {
            layer,
            hidden: h as u32,
            groups,
            x,
            dtype: crate::wire::Dtype::F32,
        }
        .encode()
    }

    /// Each group's rows through its expert alone (two GEMMs, nothing batched).
    fn one_by_one(host: &ExpertHost, data: &[u8]) -> Vec<f32> {
        let req = ExpertRequest::decode(data).unwrap();
        let (h, i) = (host.cfg.hidden_size, host.cfg.intermediate_size);
        let mut out = Vec::new();
        for (e, ids) in &req.groups {
            let ex = host.held.read().unwrap()[&(req.layer, *e)].clone();
            let mut xs = Vec::new();
            for &r in ids {
                xs.extend_from_slice(&req.x[r as usize * h..(r as usize + 1) * h]);
            }
            out.extend(ex.forward(&Cpu::default(), &xs, ids.len(), h, i));
        }
        out
    }

    #[test]
    fn requests_served_together_get_the_answers_they_get_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Preset::Tiny.config();
        write_random_checkpoint(&cfg, 5, WeightDtype::F32, dir.path(), None).unwrap();
        let host = ExpertHost::new("w".into(), Checkpoint::open(dir.path()).unwrap());
        let slots: Vec<Slot> = (0..2).flat_map(|l| (0..4).map(move |e| (l, e))).collect();
        host.load_shards(1, &slots).unwrap();
        host.activate(&Plan {
            epoch: 1,
            workers: [(
                "w".to_string(),
                WorkerPlace {
                    address: String::new(),
                    data_address: String::new(),
                    experts: slots,
                    device: String::new(),
                },
            )]
            .into(),
            data_group: None,
        });
        let h = cfg.hidden_size;
        let batch = vec![
            // Two attention workers' steps of layer 0 sharing expert 3, rows in any order.
            (1, request(0, h, vec![(1, vec![0, 2]), (3, vec![1])], 3, 1)),
            (
                1,
                request(0, h, vec![(3, vec![1, 0]), (0, vec![2, 1])], 3, 2),
            ),
            (1, request(1, h, vec![(2, vec![0])], 1, 3)),
            // Not held: refused on its own.
            (1, request(0, h, vec![(7, vec![0])], 1, 4)),
            // An older epoch than the active one.
            (0, request(0, h, vec![(1, vec![0])], 1, 5)),
        ];
        let together = host.serve_batch(batch.clone());
        assert_eq!(together.len(), batch.len());
        // Routing load counts the rows of the requests served (refused ones add nothing).
        let load: HashMap<Slot, u64> = host
            .load_stats()
            .into_iter()
            .map(|l| ((l.layer, l.expert), l.rows))
            .collect();
        assert_eq!(load[&(0, 3)], 3);
        assert_eq!(load[&(0, 1)], 2);
        assert_eq!(load[&(1, 2)], 1);
        for (k, ((epoch, data), got)) in batch.iter().zip(&together).enumerate() {
            match (k, got) {
                (0..=2, Ok(ans)) => {
                    let want = one_by_one(&host, data);
                    let got = f32s(ans);
                    assert_eq!(got.len(), want.len(), "request {k}");
                    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(err <= 1e-5 * max, "request {k}: error {err} of {max}");
                    let alone = host.serve_batch(vec![(*epoch, data.clone())]);
                    assert_eq!(f32s(alone[0].as_ref().unwrap()), got, "request {k} alone");
                }
                (3, Err(Refusal::Failed(msg))) => {
                    assert!(msg.contains("expert 7 of layer 0"), "{msg}")
                }
                (4, Err(Refusal::StaleEpoch { current })) => assert_eq!(*current, 1),
                _ => panic!("request {k}: unexpected answer {got:?}"),
            }
        }
    }
}
