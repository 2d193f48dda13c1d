//! The attention side's remote MoE against the standalone engine, over the real TCP data
//! plane with expert hosts in this process: same logits (1e-5 relative), whatever the
//! placement; a stale epoch is refused and the layer step is re-sent under the new plan.

use ringbolt_cluster::etcd::PlanView;
use ringbolt_cluster::expert::ExpertHost;
use ringbolt_cluster::plan::{Plan, Slot, WorkerPlace};
use ringbolt_cluster::remote::RemoteExperts;
use ringbolt_kernels::cpu::Cpu;
use ringbolt_model::{Checkpoint, Logits, Model, Preset, WeightDtype, write_random_checkpoint};
use ringbolt_transport::exchange::{ExchangeClient, ExchangeError, serve_with};
use ringbolt_transport::guard::Guard;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The hosts' data plane admits only holders of this secret.
fn guard() -> Guard {
    Guard::secret(b"a cluster secret of at least 32 bytes")
}

struct Host {
    id: String,
    host: Arc<ExpertHost>,
    data: String,
}

async fn start_host(dir: &std::path::Path, id: &str) -> Host {
    let host = Arc::new(ExpertHost::new(id.into(), Checkpoint::open(dir).unwrap()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let data = l.local_addr().unwrap().to_string();
    serve_with(l, host.handler(), Default::default(), guard());
    Host {
        id: id.into(),
        host,
        data,
    }
}

/// Loads `assign` on the hosts and makes it plan `epoch`.
async fn place(hosts: &[Host], epoch: u64, assign: &BTreeMap<String, Vec<Slot>>) -> Plan {
    let mut plan = Plan {
        epoch,
        workers: BTreeMap::new(),
        data_group: None,
    };
    for h in hosts {
        let slots = assign.get(&h.id).cloned().unwrap_or_default();
        let (host, s2) = (h.host.clone(), slots.clone());
        tokio::task::spawn_blocking(move || host.load_shards(epoch, &s2).unwrap())
            .await
            .unwrap();
        plan.workers.insert(
            h.id.clone(),
            WorkerPlace {
                address: String::new(),
                data_address: h.data.clone(),
                experts: slots,
                device: String::new(),
            },
        );
    }
    for h in hosts {
        h.host.activate(&plan);
    }
    plan
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let max = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_experts_match_the_engine_and_resend_after_a_plan_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Preset::Tiny.config();
    write_random_checkpoint(&cfg, 11, WeightDtype::F32, dir.path(), None).unwrap();
    let layers = cfg.num_layers() as u32;
    let experts = cfg.num_experts as u32;
    let hosts = vec![
        start_host(dir.path(), "a").await,
        start_host(dir.path(), "b").await,
    ];
    // Epoch 1: experts alternate between the workers; expert 0 of every layer on both.
    let mut a1: BTreeMap<String, Vec<Slot>> = BTreeMap::new();
    for l in 0..layers {
        for e in 0..experts {
            let w = if e % 2 == 0 { "a" } else { "b" };
            a1.entry(w.into()).or_default().push((l, e));
        }
        a1.entry("b".into()).or_default().push((l, 0));
    }
    let plan1 = place(&hosts, 1, &a1).await;
    let (tx, view) = PlanView::channel(plan1.clone());

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let full = Model::load(&ckpt, Cpu::default()).unwrap();
    let attn = Model::load_parts(
        &ckpt,
        Cpu::default(),
        false,
        ringbolt_kernels::WeightFormat::Bf16,
    )
    .unwrap();
    assert!(!attn.has_experts());
    let remote = RemoteExperts::new(
        view,
        tokio::runtime::Handle::current(),
        cfg.num_experts,
        cfg.hidden_size,
        Duration::from_secs(10),
        Duration::from_secs(20),
        guard(),
    );
    let prompt: Vec<u32> = (0..130).map(|i| (i * 37 % 500) as u32).collect();
    let (full, attn, remote) = (Arc::new(full), Arc::new(attn), Arc::new(remote));

    // Prefill in two chunks and three decode steps: logits of every step. The first chunk has
    // enough rows to run pipelined (two micro-batches, the second continuing the first's
    // caches); the others run whole.
    const { assert!(100 >= ringbolt_model::PIPELINE_MIN_ROWS && 30 < ringbolt_model::PIPELINE_MIN_ROWS) };
    let run = |m: Arc<Model<Cpu>>, r: Option<Arc<RemoteExperts>>, steps: Vec<Vec<u32>>| {
        tokio::task::spawn_blocking(move || {
            let mut st = m.new_state();
            let mut out = Vec::new();
            for s in &steps {
                let ex = r
                    .as_deref()
                    .map(|x| x as &dyn ringbolt_model::ExpertExecutor<Cpu>);
                out.push(
                    m.forward_batch_with(&mut [(&mut st, &s[..])], Logits::All, ex)
                        .unwrap()
                        .pop()
                        .unwrap(),
                );
            }
            out
        })
    };
    let steps = vec![
        prompt[..100].to_vec(),
        prompt[100..].to_vec(),
        vec![5],
        vec![17],
        vec![3],
    ];
    let want = run(full.clone(), None, steps.clone()).await.unwrap();
    let got = run(attn.clone(), Some(remote.clone()), steps.clone())
        .await
        .unwrap();
    for (g, w) in got.iter().zip(&want) {
        let e = rel_err(g, w);
        assert!(e <= 1e-5, "remote logits differ from the engine's by {e}");
    }
    let c = remote.counts();
    assert_eq!(
        c.steps,
        5 * layers as u64,
        "a layer step per layer of each forward pass"
    );
    assert_eq!(c.resent, 0);

    // Several sequences in one pass (a decode batch, or prefills together) with enough rows to
    // be pipelined by sequence: each sequence's logits as the engine computes them.
    let batch = |m: Arc<Model<Cpu>>, r: Option<Arc<RemoteExperts>>| {
        tokio::task::spawn_blocking(move || {
            let toks: Vec<Vec<u32>> = vec![
                (0..30).map(|i| (i * 11 % 500) as u32).collect(),
                (0..25).map(|i| (i * 13 % 500) as u32).collect(),
                (0..20).map(|i| (i * 17 % 500) as u32).collect(),
            ];
            let mut states: Vec<_> = toks.iter().map(|_| m.new_state()).collect();
            let mut seqs: Vec<(&mut ringbolt_model::SequenceState<Cpu>, &[u32])> = states
                .iter_mut()
                .zip(&toks)
                .map(|(st, t)| (st, t.as_slice()))
                .collect();
            let ex = r
                .as_deref()
                .map(|x| x as &dyn ringbolt_model::ExpertExecutor<Cpu>);
            let out = m.forward_batch_with(&mut seqs, Logits::All, ex).unwrap();
            let pos: Vec<usize> = states.iter().map(|s| s.pos).collect();
            (out, pos)
        })
    };
    let (want_b, want_pos) = batch(full.clone(), None).await.unwrap();
    let (got_b, got_pos) = batch(attn.clone(), Some(remote.clone())).await.unwrap();
    assert_eq!(got_pos, want_pos);
    for (i, (g, w)) in got_b.iter().zip(&want_b).enumerate() {
        let e = rel_err(g, w);
        assert!(e <= 1e-5, "sequence {i} of the batch: logits differ by {e}");
    }
    let c = remote.counts();
    assert_eq!(c.steps, 6 * layers as u64);

    // Without experts and without an executor: a clear error, not a panic.
    let err = attn
        .forward(&mut attn.new_state(), &[1, 2], Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("without experts"), "{err}");

    // Epoch 2 moves every expert to worker a; b drops its copies when it sees epoch 2.
    let a2: BTreeMap<String, Vec<Slot>> = [(
        "a".to_string(),
        (0..layers)
            .flat_map(|l| (0..experts).map(move |e| (l, e)))
            .collect(),
    )]
    .into();
    let plan2 = place(&hosts, 2, &a2).await;
    assert!(hosts[1].host.held().is_empty());
    assert_eq!(hosts[0].host.active_epoch(), 2);

    // A peer without the secret is refused before its request is read; one with it is
    // served (a message of epoch 1 is refused by a worker at epoch 2).
    let addr = hosts[0].data.parse().unwrap();
    let stranger = ExchangeClient::new(Duration::from_secs(5));
    match stranger.call(addr, 2, b"anything").await {
        Err(ExchangeError::Peer { .. }) => {}
        other => panic!("want the connection refused, got {other:?}"),
    }
    let wrong = ExchangeClient::new(Duration::from_secs(5))
        .with_guard(Guard::secret(b"another secret, also 32 bytes or more"));
    match wrong.call(addr, 2, b"anything").await {
        Err(ExchangeError::Peer { msg, .. }) => assert!(msg.contains("handshake"), "{msg}"),
        other => panic!("want the handshake refused, got {other:?}"),
    }
    let client = ExchangeClient::new(Duration::from_secs(5)).with_guard(guard());
    match client.call(addr, 1, b"anything").await {
        Err(ExchangeError::StaleEpoch {
            sent: 1,
            current: 2,
            ..
        }) => {}
        other => panic!("want a stale-epoch refusal, got {other:?}"),
    }

    // The attention side still has plan 1: its first layer step is refused, it waits for the
    // new plan (published a moment later), re-sends that step only, and the logits still match.
    let tx2 = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx2.send_replace(Arc::new(plan2));
    });
    let got = run(attn.clone(), Some(remote.clone()), steps.clone())
        .await
        .unwrap();
    for (g, w) in got.iter().zip(&want) {
        let e = rel_err(g, w);
        assert!(e <= 1e-5, "logits after the plan change differ by {e}");
    }
    let c2 = remote.counts();
    assert_eq!(
        c2.steps - c.steps,
        5 * layers as u64,
        "no layer step repeated"
    );
    // The first layer step (two micro-batches) is refused once per micro-batch at most.
    let resent = c2.resent - c.resent;
    assert!(
        (1..=ringbolt_model::PIPELINE_PARTS as u64).contains(&resent),
        "the refused step was re-sent once per micro-batch, counted once: {resent}"
    );
    drop(plan1);
}

/// Expert workers on a GPU get bf16 rows and answer in bf16 (they round GEMM inputs to bf16
/// anyway). Stood in for here by a CPU host that the plan says is on `cuda:0`: the logits then
/// differ from the f32 engine by the bf16 rounding of the experts' inputs and outputs, where
/// the f32 exchange matches it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_expert_workers_exchange_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Preset::Tiny.config();
    write_random_checkpoint(&cfg, 12, WeightDtype::F32, dir.path(), None).unwrap();
    let (layers, experts) = (cfg.num_layers() as u32, cfg.num_experts as u32);
    let hosts = vec![start_host(dir.path(), "g").await];
    let all: BTreeMap<String, Vec<Slot>> = [(
        "g".to_string(),
        (0..layers)
            .flat_map(|l| (0..experts).map(move |e| (l, e)))
            .collect(),
    )]
    .into();
    let f32_plan = place(&hosts, 1, &all).await;
    let mut plan = f32_plan.clone();
    for w in plan.workers.values_mut() {
        w.device = "cuda:0".into();
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let full = Arc::new(Model::load(&ckpt, Cpu::default()).unwrap());
    let attn = Arc::new(
        Model::load_parts(
            &ckpt,
            Cpu::default(),
            false,
            ringbolt_kernels::WeightFormat::Bf16,
        )
        .unwrap(),
    );
    let executor = |p: Plan| {
        Arc::new(RemoteExperts::new(
            PlanView::fixed(p),
            tokio::runtime::Handle::current(),
            cfg.num_experts,
            cfg.hidden_size,
            Duration::from_secs(10),
            Duration::from_secs(20),
            guard(),
        ))
    };
    let (remote, remote_f32) = (executor(plan), executor(f32_plan));
    let prompt: Vec<u32> = (0..40).map(|i| (i * 29 % 500) as u32).collect();
    let run = |m: Arc<Model<Cpu>>, r: Option<Arc<RemoteExperts>>, p: Vec<u32>| {
        tokio::task::spawn_blocking(move || {
            let ex = r
                .as_deref()
                .map(|x| x as &dyn ringbolt_model::ExpertExecutor<Cpu>);
            m.forward_batch_with(&mut [(&mut m.new_state(), &p[..])], Logits::All, ex)
                .unwrap()
                .pop()
                .unwrap()
        })
    };
    let want = run(full, None, prompt.clone()).await.unwrap();
    let f32s = run(attn.clone(), Some(remote_f32), prompt.clone())
        .await
        .unwrap();
    let got = run(attn, Some(remote.clone()), prompt).await.unwrap();
    // The f32 exchange computes exactly what the engine does; bf16 differs (it ran), a little.
    assert_eq!(rel_err(&f32s, &want), 0.0);
    let e = rel_err(&got, &want);
    assert!(
        e > 0.0 && e <= 3e-2,
        "bf16 exchange: logits differ from the engine's by {e}"
    );
    assert_eq!(remote.counts().steps, layers as u64);
}
