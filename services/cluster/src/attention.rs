//! The attention worker: the model without its experts. A job step (`RunJob`) prefills the
//! segment of the context it names, then decodes; every MoE layer goes to the expert workers
//! of the current plan epoch.

use crate::etcd::PlanView;
use crate::remote::RemoteExperts;
use crate::{ClusterError, CommonArgs, bind, connect_membership, wait_for_signal};
use clap::Args;
use futures::future::BoxFuture;
use ringbolt_kernels::{Backend, Device, OnBackend};
use ringbolt_membership::{Member, Membership, Role};
use ringbolt_model::{Checkpoint, Logits, Model, Sampler, SamplingParams};
use ringbolt_proto::internal as ipb;
use ringbolt_proto::internal::attention_worker_server::{AttentionWorker, AttentionWorkerServer};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Largest control message (a 4M-token prompt is 16 MiB packed).
pub const MAX_CONTROL_MESSAGE: usize = 64 << 20;

#[derive(Args, Clone, Debug)]
pub struct AttentionWorkerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt tokens per prefill chunk.
    #[arg(long, env = "RINGBOLT_PREFILL_CHUNK", default_value_t = 4096)]
    pub prefill_chunk: usize,
    /// Bound on one expert exchange on the data plane.
    #[arg(long, env = "RINGBOLT_DATA_TIMEOUT_SECS", default_value_t = 60)]
    pub data_timeout_secs: u64,
    /// How long a layer step waits for a plan that can serve it after a failure.
    #[arg(long, env = "RINGBOLT_RESEND_WINDOW_SECS", default_value_t = 120)]
    pub resend_window_secs: u64,
    /// Where attention computes: `cpu`, or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "RINGBOLT_DEVICE", default_value = "cpu")]
    pub device: Device,
}

pub struct AttentionHost<B: Backend> {
    model: Model<B>,
    experts: RemoteExperts,
    prefill_chunk: usize,
}

impl<B: Backend> AttentionHost<B> {
    pub fn new(model: Model<B>, experts: RemoteExperts, prefill_chunk: usize) -> Self {
        AttentionHost {
            model,
            experts,
            prefill_chunk: prefill_chunk.max(1),
        }
    }

    pub fn experts(&self) -> &RemoteExperts {
        &self.experts
    }

    /// Runs a job step to the end, sending events on `tx` (a send failing means the
    /// coordinator dropped the stream: the step is aborted).
    fn run_job(
        &self,
        req: ipb::RunJobRequest,
        tx: &mpsc::Sender<Result<ipb::JobStep, Status>>,
    ) -> Result<Option<ipb::StepDone>, Status> {
        let prompt = ringbolt_proto::unpack_tokens(&req.prompt)
            .ok_or_else(|| Status::invalid_argument("prompt bytes are not a multiple of 4"))?;
        if prompt.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        let seg = req.segment.unwrap_or_default();
        if seg.start != 0 || seg.end != prompt.len() as u64 {
            return Err(Status::unimplemented(format!(
                "segment [{}, {}) of a {}-token context: this worker runs whole contexts \
                 (context parallelism across attention workers is not implemented yet)",
                seg.start,
                seg.end,
                prompt.len()
            )));
        }
        if req.max_new_tokens == 0 {
            return Err(Status::invalid_argument("max_new_tokens must be positive"));
        }
        self.model
            .check_tokens(0, &prompt)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut sampler = Sampler::new(SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let send = |ev: ipb::job_step::Event| -> bool {
            tx.blocking_send(Ok(ipb::JobStep { event: Some(ev) }))
                .is_ok()
        };
        let chunk = if req.prefill_chunk > 0 {
            req.prefill_chunk as usize
        } else {
            self.prefill_chunk
        };
        let experts = self.experts.for_job();
        let forward = |state: &mut ringbolt_model::SequenceState<B>,
                       toks: &[u32],
                       logits: Logits|
         -> Result<Vec<f32>, Status> {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.model
                    .forward_batch_with(&mut [(state, toks)], logits, Some(&experts))
            }));
            match r {
                Ok(Ok(mut v)) => Ok(v.pop().unwrap_or_default()),
                Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
                Err(_) => Err(Status::internal("the forward pass panicked")),
            }
        };
        let t0 = Instant::now();
        let mut state = self.model.new_state();
        let mut done = 0;
        let mut logits = Vec::new();
        while done < prompt.len() {
            let end = (done + chunk).min(prompt.len());
            let last = end == prompt.len();
            logits = forward(
                &mut state,
                &prompt[done..end],
                if last { Logits::Last } else { Logits::None },
            )?;
            done = end;
            let tps = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            if !send(ipb::job_step::Event::Progress(ipb::StepProgress {
                phase: 1,
                tokens_done: done as u64,
                tokens_per_second: tps,
            })) {
                return Ok(None);
            }
        }
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut n = 0u32;
        let reason = loop {
            let t = sampler.sample(&logits);
            if !send(ipb::job_step::Event::Token(ipb::StepToken {
                index: n,
                token: t,
            })) {
                return Ok(None);
            }
            n += 1;
            if req.stop_tokens.contains(&t) {
                break "stop";
            }
            if n >= req.max_new_tokens {
                break "length";
            }
            logits = forward(&mut state, &[t], Logits::Last)?;
        };
        let c = experts.counts();
        Ok(Some(ipb::StepDone {
            finish_reason: reason.into(),
            prefill_seconds,
            decode_seconds: t1.elapsed().as_secs_f64(),
            layer_steps: c.steps,
            layer_steps_resent: c.resent,
        }))
    }
}

struct Service<B: Backend>(Arc<AttentionHost<B>>);

impl<B: Backend> Clone for Service<B> {
    fn clone(&self) -> Self {
        Service(self.0.clone())
    }
}

#[tonic::async_trait]
impl<B: Backend> AttentionWorker for Service<B> {
    type RunJobStream = ReceiverStream<Result<ipb::JobStep, Status>>;

    async fn run_job(
        &self,
        request: Request<ipb::RunJobRequest>,
    ) -> Result<Response<Self::RunJobStream>, Status> {
        let req = request.into_inner();
        let job = req.job_id.clone();
        let (tx, rx) = mpsc::channel(256);
        let host = self.0.clone();
        std::thread::Builder::new()
            .name(format!("job-{job}"))
            .spawn(move || {
                let _span = tracing::info_span!("job step", job = %job).entered();
                tracing::info!("job step started");
                match host.run_job(req, &tx) {
                    Ok(Some(done)) => {
                        tracing::info!(
                            layer_steps = done.layer_steps,
                            resent = done.layer_steps_resent,
                            "job step finished"
                        );
                        let _ = tx.blocking_send(Ok(ipb::JobStep {
                            event: Some(ipb::job_step::Event::Done(done)),
                        }));
                    }
                    Ok(None) => tracing::info!("job step aborted: the coordinator went away"),
                    Err(s) => {
                        tracing::warn!(status = %s, "job step failed");
                        let _ = tx.blocking_send(Err(s));
                    }
                }
            })
            .map_err(|e| Status::resource_exhausted(format!("cannot start a job thread: {e}")))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// `ringbolt attention-worker`.
pub async fn run(a: AttentionWorkerArgs) -> Result<(), ClusterError> {
    let device = a.device;
    // The device's backend is opened and the model loaded on a blocking thread; what comes back
    // is the worker, typed by its backend, ready to serve.
    let serve = tokio::task::spawn_blocking(move || {
        device
            .open(None, Load { a })
            .map_err(|e| ClusterError::Model(e.to_string()))?
    })
    .await
    .map_err(|e| ClusterError::Model(e.to_string()))??;
    serve.await
}

/// Loads the attention weights onto the opened backend.
struct Load {
    a: AttentionWorkerArgs,
}

impl OnBackend for Load {
    type Output = Result<BoxFuture<'static, Result<(), ClusterError>>, ClusterError>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let ckpt = Checkpoint::open(&self.a.common.checkpoint)
            .map_err(|e| ClusterError::Model(e.to_string()))?;
        let model = Model::load_parts(&ckpt, backend, false)
            .map_err(|e| ClusterError::Model(e.to_string()))?;
        tracing::info!(backend = %model.backend().name(), "attention weights loaded");
        Ok(Box::pin(serve(self.a, model)))
    }
}

async fn serve<B: Backend>(a: AttentionWorkerArgs, model: Model<B>) -> Result<(), ClusterError> {
    let c = &a.common;
    let membership = connect_membership(c).await?;
    let (listener, address) = bind(c.listen, c.advertise.as_deref()).await?;
    let id = c.member_id("attention", &address);
    let stop = CancellationToken::new();
    let view = PlanView::follow(membership.client(), &c.cluster, stop.clone()).await?;
    let cfg = model.config().clone();
    let experts = RemoteExperts::new(
        view,
        tokio::runtime::Handle::current(),
        cfg.num_experts,
        cfg.hidden_size,
        Duration::from_secs(a.data_timeout_secs.max(1)),
        Duration::from_secs(a.resend_window_secs.max(1)),
    );
    let host = Arc::new(AttentionHost::new(model, experts, a.prefill_chunk));
    let svc = AttentionWorkerServer::new(Service(host))
        .max_decoding_message_size(MAX_CONTROL_MESSAGE)
        .max_encoding_message_size(MAX_CONTROL_MESSAGE);
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let reg = membership
        .register(
            Member {
                id: id.clone(),
                role: Role::AttentionWorker,
                address: address.clone(),
                data_address: String::new(),
                capacity_bytes: 0,
            },
            c.lease_ttl(),
        )
        .await
        .map_err(|e| ClusterError::Etcd(e.to_string()))?;
    eprintln!("ringbolt attention-worker {id} listening on {address}");
    let mut lost = reg.lost();
    let result = tokio::select! {
        _ = lost.wait_for(|l| *l) => {
            Err(ClusterError::Etcd("membership lease lost: etcd unreachable".into()))
        }
        _ = wait_for_signal() => Ok(()),
    };
    let _ = reg.leave().await;
    stop.cancel();
    let _ = grpc.await;
    result
}
