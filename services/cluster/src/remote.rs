//! An attention worker's MoE layers, run on the expert workers: each layer step sends every
//! expert worker the rows routed to the experts it holds (all workers at once), then combines
//! the answers in expert order — the same arithmetic as the standalone engine, whatever the
//! placement. When a worker is lost or refuses the step (stale epoch, expert moved), the step
//! waits for the next plan epoch and is re-sent; only that layer step is repeated.

use crate::etcd::PlanView;
use crate::wire::{ExpertRequest, f32s};
use ringbolt_kernels::cpu::Cpu;
use ringbolt_kernels::{Backend, Routing};
use ringbolt_model::{ExpertExecutor, ModelError};
use ringbolt_transport::exchange::{ExchangeClient, ExchangeError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct RemoteExperts {
    plan: PlanView,
    client: ExchangeClient,
    rt: tokio::runtime::Handle,
    experts: usize,
    hidden: usize,
    /// How long one layer step may wait for a plan that can serve it.
    resend_window: Duration,
    rr: AtomicUsize,
    steps: AtomicU64,
    resent: AtomicU64,
}

/// Counters of one executor (layer steps run, and re-sent after a failure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub steps: u64,
    pub resent: u64,
}

impl RemoteExperts {
    /// `timeout` bounds each data-plane exchange; `resend_window` bounds how long a layer step
    /// waits for a new plan after failures.
    pub fn new(
        plan: PlanView,
        rt: tokio::runtime::Handle,
        experts: usize,
        hidden: usize,
        timeout: Duration,
        resend_window: Duration,
    ) -> Self {
        RemoteExperts {
            plan,
            client: ExchangeClient::new(timeout),
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

    fn try_once(
        &self,
        plan: &crate::plan::Plan,
        layer: usize,
        x: &[f32],
        buckets: &[(Vec<u32>, Vec<f32>)],
    ) -> Result<Vec<Vec<f32>>, ExchangeError> {
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
            };
            calls.push((addr, experts.clone(), req.encode()));
        }
        let answers = self.rt.block_on(futures::future::join_all(
            calls
                .iter()
                .map(|(addr, _, body)| self.client.call(*addr, plan.epoch, body)),
        ));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); buckets.len()];
        for ((addr, experts, _), ans) in calls.iter().zip(answers) {
            let ans = ans?;
            let vals = f32s(&ans);
            let want: usize = experts.iter().map(|&e| buckets[e].0.len() * h).sum();
            if vals.len() != want {
                return Err(ExchangeError::Peer {
                    peer: *addr,
                    msg: format!("answered {} values, expected {want}", vals.len()),
                });
            }
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
    fn experts(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> ringbolt_model::Result<B::Buf> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        let out = self
            .inner
            .step(layer, &backend.host_view(x), rows, routing, &self.resent)?;
        Ok(backend.upload_owned(out))
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
    fn experts(
        &self,
        backend: &B,
        layer: usize,
        x: &B::Buf,
        rows: usize,
        routing: &Routing,
    ) -> ringbolt_model::Result<B::Buf> {
        self.for_job().experts(backend, layer, x, rows, routing)
    }
}

impl RemoteExperts {
    /// One layer step, re-sent under newer plans until it succeeds or the window ends.
    fn step(
        &self,
        layer: usize,
        x: &[f32],
        rows: usize,
        routing: &Routing,
        resent: &AtomicU64,
    ) -> ringbolt_model::Result<Vec<f32>> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        let buckets = routing.by_expert(self.experts);
        let deadline = Instant::now() + self.resend_window;
        loop {
            let plan = self.plan.current();
            match self.try_once(&plan, layer, x, &buckets) {
                Ok(ys) => {
                    let mut out = vec![0f32; rows * self.hidden];
                    for (e, (ids, ws)) in buckets.iter().enumerate() {
                        if !ids.is_empty() {
                            Cpu.scatter_add_rows(&mut out, &ys[e], ids, ws, self.hidden);
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
                        epoch = plan.epoch,
                        error = %err,
                        "layer step failed; re-sending it under the next plan epoch"
                    );
                    self.resent.fetch_add(1, Ordering::Relaxed);
                    resent.fetch_add(1, Ordering::Relaxed);
                    if let ExchangeError::Peer { peer, .. } | ExchangeError::Timeout { peer, .. } =
                        &err
                    {
                        self.client.forget(*peer);
                    }
                    // A refusal for a stale epoch means a newer plan exists; anything else
                    // waits for the coordinator to publish one.
                    let newer = self.rt.block_on(self.plan.newer_than(plan.epoch, left));
                    if newer.is_none() {
                        return Err(ModelError::Experts(format!(
                            "layer {layer}: {err}; no newer plan than epoch {} within {:?}",
                            plan.epoch, self.resend_window
                        )));
                    }
                }
            }
        }
    }
}
