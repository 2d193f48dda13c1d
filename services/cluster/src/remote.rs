//! An attention worker's MoE layers, run on the expert workers: each layer step sends every
//! expert worker the rows routed to the experts it holds (all workers at once), then combines
//! the answers in expert order — the same arithmetic as the standalone engine, whatever the
//! placement. When a worker is lost or refuses the step (stale epoch, expert moved), the step
//! waits for the next plan epoch and is re-sent; only that layer step is repeated.
//!
//! A step is dispatched (its requests sent by the runtime's tasks) and waited for separately,
//! so the engine computes another micro-batch's attention while the experts work.

use crate::etcd::PlanView;
use crate::wire::{Dtype, ExpertRequest, values};
use bytes::Bytes;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, Routing};
use ringbolt_model::{ExpertExecutor, ModelError, PendingExperts};
use ringbolt_transport::exchange::{ExchangeClient, ExchangeError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

pub struct RemoteExperts {
    plan: PlanView,
    client: Arc<ExchangeClient>,
    rt: tokio::runtime::Handle,
    experts: usize,
    hidden: usize,
    /// How long one layer step may wait for a plan that can serve it.
    resend_window: Duration,
    rr: AtomicUsize,
    steps: AtomicU64,
    resent: AtomicU64,
}

/// Counters of one executor: layer steps run (one per layer of a forward pass), and exchanges
/// re-sent after a failure (a pipelined layer step sends one exchange per micro-batch, so one
/// refused layer step may count more than once here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub steps: u64,
    pub resent: u64,
}

impl RemoteExperts {
    /// `timeout` bounds each data-plane exchange; `resend_window` bounds how long a layer step
    /// waits for a new plan after failures. Connections to expert workers open with the
    /// data-plane handshake `guard` asks for.
    pub fn new(
        plan: PlanView,
        rt: tokio::runtime::Handle,
        experts: usize,
        hidden: usize,
        timeout: Duration,
        resend_window: Duration,
        guard: ringbolt_transport::guard::Guard,
    ) -> Self {
        RemoteExperts {
            plan,
            client: Arc::new(ExchangeClient::new(timeout).with_guard(guard)),
            rt,
            experts,
            hidden,
            resend_window,
            rr: AtomicUsize::new(0),
            steps: AtomicU64::new(0),
            resent: AtomicU64::new(0),
        }
    }

    pub fn counts(&self) -> StepCounts {
        StepCounts {
            steps: self.steps.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
        }
    }

    /// Sends one attempt of a layer step under `plan`: each expert worker's requests go out on
    /// the runtime's tasks at once.
    fn start(
        &self,
        plan: &crate::plan::Plan,
        layer: usize,
        x: &[f32],
        buckets: &[(Vec<u32>, Vec<f32>)],
    ) -> Result<Attempt, ExchangeError> {
        let h = self.hidden;
        let holders = plan.holders();
        // worker id -> experts it computes here.
        let mut per_worker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (e, (ids, _)) in buckets.iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let hs = holders
                .get(&(layer as u32, e as u32))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ExchangeError::Remote {
                    peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                    msg: format!(
                        "no expert worker holds expert {e} of layer {layer} in plan epoch {}",
                        plan.epoch
                    ),
                })?;
            let pick = hs[self.rr.fetch_add(1, Ordering::Relaxed) % hs.len()];
            per_worker.entry(pick).or_default().push(e);
        }
        let mut calls = Vec::new();
        for (id, experts) in &per_worker {
            let place = &plan.workers[*id];
            let addr: SocketAddr = place
                .data_address
                .parse()
                .map_err(|e| ExchangeError::Peer {
                    peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                    msg: format!("bad data address `{}`: {e}", place.data_address),
                })?;
            // The rows this worker needs, once each.
            let mut rows: Vec<u32> = experts
                .iter()
                .flat_map(|&e| buckets[e].0.iter().copied())
                .collect();
            rows.sort_unstable();
            rows.dedup();
            let local = |r: u32| rows.binary_search(&r).unwrap_or(0) as u32;
            let groups = experts
                .iter()
                .map(|&e| (e as u32, buckets[e].0.iter().map(|&r| local(r)).collect()))
                .collect();
            let mut xs = Vec::with_capacity(rows.len() * h);
            for &r in &rows {
                xs.extend_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
            }
            let req = ExpertRequest {
                layer: layer as u32,
                hidden: h as u32,
                groups,
                x: xs,
                dtype: Dtype::for_device(&place.device),
            };
            calls.push((addr, experts.clone(), req.dtype, req.encode()));
        }
        let epoch = plan.epoch;
        // The layer step's span lasts until its answers are in (it lives in the attempt); the
        // expert workers' work joins its trace.
        let span = tracing::info_span!("layer_step", layer, workers = calls.len());
        let trace = ringbolt_shell::telemetry::traceparent(&span);
        Ok(Attempt {
            calls: calls
                .into_iter()
                .map(
                    |(addr, experts, dtype, body): (SocketAddr, Vec<usize>, Dtype, Bytes)| {
                        let client = self.client.clone();
                        let trace = trace.clone();
                        let task = self.rt.spawn(async move {
                            client
                                .call_traced(addr, epoch, &body, trace.as_deref())
                                .await
                        });
                        (addr, experts, dtype, task)
                    },
                )
                .collect(),
            _span: span,
        })
    }

    /// Waits for an attempt's answers: each expert's outputs, in expert order.
    fn finish(
        &self,
        attempt: Attempt,
        buckets: &[(Vec<u32>, Vec<f32>)],
    ) -> Result<Vec<Vec<f32>>, ExchangeError> {
        let h = self.hidden;
        let (meta, tasks): (Vec<_>, Vec<_>) = attempt
            .calls
            .into_iter()
            .map(|(addr, experts, dtype, task)| ((addr, experts, dtype), task))
            .unzip();
        let answers = self.rt.block_on(futures::future::join_all(tasks));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); buckets.len()];
        for ((addr, experts, dtype), ans) in meta.iter().zip(answers) {
            let ans = ans.map_err(|e| ExchangeError::Peer {
                peer: *addr,
                msg: format!("the request task failed: {e}"),
            })??;
            let want: usize = experts.iter().map(|&e| buckets[e].0.len() * h).sum();
            if ans.len() != want * dtype.size() {
                return Err(ExchangeError::Peer {
                    peer: *addr,
                    msg: format!(
                        "answered {} bytes, expected {want} {dtype:?} values",
                        ans.len()
                    ),
                });
            }
            let vals = values(&ans, *dtype);
            let mut at = 0;
            for &e in experts {
                let n = buckets[e].0.len() * h;
                out[e] = vals[at..at + n].to_vec();
                at += n;
            }
        }
        Ok(out)
    }
}

/// The requests of one attempt at a layer step, in flight: (peer, its experts, how the values
/// travel, the call).
struct Attempt {
    _span: tracing::Span,
    #[allow(clippy::type_complexity)]
    calls: Vec<(
        SocketAddr,
        Vec<usize>,
        Dtype,
        JoinHandle<Result<Bytes, ExchangeError>>,
    )>,
}

/// One job's view of a [`RemoteExperts`]: counts that job's layer steps on their own.
pub struct JobExperts<'a> {
    inner: &'a RemoteExperts,
    steps: AtomicU64,
    resent: AtomicU64,
}

impl JobExperts<'_> {
    pub fn counts(&self) -> StepCounts {
        StepCounts {
            steps: self.steps.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
        }
    }
}

impl<B: Backend> ExpertExecutor<B> for JobExperts<'_> {
    fn dispatch<'a>(
        &'a self,
        backend: &B,
        layer: usize,
        part: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> ringbolt_model::Result<Box<dyn PendingExperts<B> + 'a>> {
        if part == 0 {
            self.steps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Box::new(self.inner.dispatch_step(
            layer,
            part,
            backend.host_view(x).into_owned(),
            rows,
            routing,
            Some(&self.resent),
        )))
    }
}

impl RemoteExperts {
    /// A counter of one job's layer steps.
    pub fn for_job(&self) -> JobExperts<'_> {
        JobExperts {
            inner: self,
            steps: AtomicU64::new(0),
            resent: AtomicU64::new(0),
        }
    }
}

impl<B: Backend> ExpertExecutor<B> for RemoteExperts {
    fn dispatch<'a>(
        &'a self,
        backend: &B,
        layer: usize,
        part: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> ringbolt_model::Result<Box<dyn PendingExperts<B> + 'a>> {
        Ok(Box::new(self.dispatch_step(
            layer,
            part,
            backend.host_view(x).into_owned(),
            rows,
            routing,
            None,
        )))
    }
}

/// A layer step in flight: its first attempt, and what a re-send needs.
pub struct PendingStep<'a> {
    inner: &'a RemoteExperts,
    layer: usize,
    rows: usize,
    x: Vec<f32>,
    buckets: Vec<(Vec<u32>, Vec<f32>)>,
    epoch: u64,
    first: Result<Attempt, ExchangeError>,
    /// The job's count of re-sent exchanges, besides this executor's own.
    resent: Option<&'a AtomicU64>,
}

impl<B: Backend> PendingExperts<B> for PendingStep<'_> {
    fn wait(self: Box<Self>, backend: &B) -> ringbolt_model::Result<B::Buf> {
        Ok(backend.upload_owned(self.inner.complete(*self)?))
    }
}

impl RemoteExperts {
    /// Sends a layer step's first attempt under the current plan and returns at once.
    fn dispatch_step<'a>(
        &'a self,
        layer: usize,
        part: usize,
        x: Vec<f32>,
        rows: usize,
        routing: &Routing,
        resent: Option<&'a AtomicU64>,
    ) -> PendingStep<'a> {
        if part == 0 {
            self.steps.fetch_add(1, Ordering::Relaxed);
        }
        let buckets = routing.by_expert(self.experts);
        let plan = self.plan.current();
        let first = self.start(&plan, layer, &x, &buckets);
        PendingStep {
            inner: self,
            layer,
            rows,
            x,
            buckets,
            epoch: plan.epoch,
            first,
            resent,
        }
    }

    /// Waits for a step's answers and combines them; a failed attempt is re-sent under newer
    /// plans until one succeeds or the re-send window ends.
    fn complete(&self, p: PendingStep<'_>) -> ringbolt_model::Result<Vec<f32>> {
        // The time the engine waits here is the part of the exchange its compute did not hide.
        let waited = Instant::now();
        let r = self.complete_step(p);
        metrics::histogram!("ringbolt_expert_wait_seconds").record(waited.elapsed().as_secs_f64());
        metrics::counter!("ringbolt_layer_steps_total").increment(1);
        r
    }

    fn complete_step(&self, p: PendingStep<'_>) -> ringbolt_model::Result<Vec<f32>> {
        let PendingStep {
            layer,
            rows,
            x,
            buckets,
            mut epoch,
            first,
            resent,
            ..
        } = p;
        // The window runs from when the step's answers are waited for (the caller computed
        // another micro-batch in between).
        let deadline = Instant::now() + self.resend_window;
        let mut result = first.and_then(|a| self.finish(a, &buckets));
        loop {
            match result {
                Ok(ys) => {
                    let mut out = vec![0f32; rows * self.hidden];
                    for (e, (ids, ws)) in buckets.iter().enumerate() {
                        if !ids.is_empty() {
                            Cpu::default().scatter_add_rows(&mut out, &ys[e], ids, ws, self.hidden);
                        }
                    }
                    return Ok(out);
                }
                Err(err) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ModelError::Experts(format!(
                            "layer {layer}: {err}; no plan could serve the step within {:?}",
                            self.resend_window
                        )));
                    }
                    tracing::warn!(
                        layer,
                        epoch,
                        error = %err,
                        "layer step failed; re-sending it under the next plan epoch"
                    );
                    self.resent.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ringbolt_layer_steps_resent_total").increment(1);
                    if let Some(r) = resent {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    if let ExchangeError::Peer { peer, .. } | ExchangeError::Timeout { peer, .. } =
                        &err
                    {
                        self.client.forget(*peer);
                    }
                    // A refusal for a stale epoch means a newer plan exists; anything else
                    // waits for the coordinator to publish one.
                    let newer = self.rt.block_on(self.plan.newer_than(epoch, left));
                    if newer.is_none() {
                        return Err(ModelError::Experts(format!(
                            "layer {layer}: {err}; no newer plan than epoch {epoch} within {:?}",
                            self.resend_window
                        )));
                    }
                    let plan = self.plan.current();
                    epoch = plan.epoch;
                    result = self
                        .start(&plan, layer, &x, &buckets)
                        .and_then(|a| self.finish(a, &buckets));
                }
            }
        }
    }
}
