//! The expert worker: holds the experts the plan gives it, serves layer steps on the data
//! plane, loads shards ahead of an epoch (keeping the old ones until the epoch is active), and
//! drains on SIGTERM (asks the coordinator to move its experts, then exits).

use crate::etcd::{PlanView, drain_prefix};
use crate::plan::{Plan, Slot};
use crate::wire::{ExpertRequest, f32_bytes};
use crate::{ClusterError, CommonArgs, bind, connect_membership, wait_for_signal};
use bytes::Bytes;
use clap::Args;
use futures::future::BoxFuture;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, Device, OnBackend};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::{Checkpoint, Expert, ModelConfig};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use ringbolt_transport::exchange::{Handler, Refusal, serve};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

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
    /// Where the experts compute: `cpu`, or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "RINGBOLT_DEVICE", default_value = "cpu")]
    pub device: Device,
}

/// Bytes one expert of `ckpt` takes in the CPU backend's memory: bf16 checkpoints stay bf16
/// (2 bytes per weight), anything else becomes f32 (4).
pub fn expert_bytes(ckpt: &Checkpoint) -> u64 {
    let w1 = ringbolt_model::weights::expert_name(0, 0, "w1");
    // f16 on disk is widened to f32; only bf16 is kept as is.
    let per = if ckpt.dtype(&w1).as_deref() == Some("BF16") {
        2
    } else {
        4
    };
    ringbolt_planner::placement::expert_bytes(ckpt.config(), per)
}

/// The experts held by one worker, and the data-plane handler.
pub struct ExpertHost<B: Backend = Cpu> {
    backend: B,
    id: String,
    ckpt: Arc<Checkpoint>,
    cfg: ModelConfig,
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
        Self::on(Cpu, id, ckpt)
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
            held: RwLock::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            active: AtomicU64::new(0),
            load: Mutex::new(HashMap::new()),
            inflight: AtomicUsize::new(0),
        }
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
            let ex = Expert::load(&self.ckpt, &self.backend, l as usize, e as usize)
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
        Ok((loaded, loaded as u64 * expert_bytes(&self.ckpt)))
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

    /// Serves one layer step (blocking: compute).
    fn step(&self, epoch: u64, data: &[u8]) -> Result<Bytes, Refusal> {
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
        let i = self.cfg.intermediate_size;
        let mut out = Vec::new();
        {
            let mut load = self.load.lock().unwrap_or_else(|p| p.into_inner());
            for (e, ids) in &req.groups {
                *load.entry((req.layer, *e)).or_default() += ids.len() as u64;
            }
        }
        for ((_, ids), ex) in req.groups.iter().zip(&experts) {
            let mut xs = Vec::with_capacity(ids.len() * h);
            for &r in ids {
                xs.extend_from_slice(&req.x[r as usize * h..(r as usize + 1) * h]);
            }
            let b = &self.backend;
            let y = ex.forward(b, &b.upload_owned(xs), ids.len(), h, i);
            out.extend_from_slice(&b.host_view(&y));
        }
        Ok(f32_bytes(&out))
    }

    pub fn handler(self: &Arc<Self>) -> Handler {
        let host = self.clone();
        Arc::new(move |epoch, data: Bytes| {
            let host = host.clone();
            Box::pin(async move {
                host.inflight.fetch_add(1, Ordering::SeqCst);
                let h2 = host.clone();
                let r = tokio::task::spawn_blocking(move || h2.step(epoch, &data))
                    .await
                    .unwrap_or_else(|e| Err(Refusal::Failed(format!("expert step panicked: {e}"))));
                host.inflight.fetch_sub(1, Ordering::SeqCst);
                r
            })
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
        let held = self.0.held().len() as u64 * expert_bytes(&self.0.ckpt);
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
    let device = a.device;
    // Experts are loaded later, as plans place them; here the device's backend is opened.
    let serve = tokio::task::spawn_blocking(move || {
        device
            .open(None, Open { a, ckpt })
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
    let membership = connect_membership(c).await?;
    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let data_listen = a
        .data_listen
        .unwrap_or_else(|| SocketAddr::new(c.listen.ip(), 0));
    let (data_listener, data_address) = bind(data_listen, None).await?;
    let data_address = match &c.advertise {
        // Same host as the advertised control address, the data port.
        Some(adv) => match adv.rsplit_once(':') {
            Some((host, _)) => format!("{host}:{}", data_address.rsplit(':').next().unwrap_or("0")),
            None => data_address,
        },
        None => data_address,
    };
    let id = c.member_id("expert", &address);
    let host = Arc::new(ExpertHost::on(backend, id.clone(), ckpt));
    let stop = CancellationToken::new();
    let data_task = serve(data_listener, host.handler());

    let view = PlanView::follow(membership.client(), &c.cluster, stop.clone()).await?;
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

    let server_stop = stop.clone();
    let svc = ExpertWorkerServer::new(Control(host.clone()));
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                server_stop.cancelled_owned(),
            ),
    );

    let reg = membership
        .register(
            Member {
                id: id.clone(),
                role: Role::ExpertWorker,
                address: address.clone(),
                data_address: data_address.clone(),
                capacity_bytes: a.memory_bytes,
            },
            c.lease_ttl(),
        )
        .await
        .map_err(|e| ClusterError::Etcd(e.to_string()))?;
    eprintln!("ringbolt expert-worker {id} listening on {address} (data plane {data_address})");
    let mut lost = reg.lost();
    tokio::select! {
        _ = lost.wait_for(|l| *l) => {
            stop.cancel();
            return Err(ClusterError::Etcd("membership lease lost: etcd unreachable".into()));
        }
        _ = wait_for_signal() => {}
    }

    // Drain: ask for a plan without this worker, wait until it is active, then leave.
    tracing::info!(%id, "draining: asking the coordinator to move this worker's experts");
    let mut client = membership.client();
    let drain_key = format!("{}{id}", drain_prefix(&c.cluster));
    let _ = client.put(drain_key.clone(), "draining", None).await;
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
    let _ = reg.leave().await;
    let _ = client.delete(drain_key, None).await;
    stop.cancel();
    data_task.abort();
    let _ = grpc.await;
    eprintln!("ringbolt expert-worker {id} drained");
    Ok(())
}
