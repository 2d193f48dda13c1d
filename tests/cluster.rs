//! Cross-process tests of the cluster roles on 127.0.0.1 with a real etcd (Debian's
//! `etcd-server`, installed by scripts/test.sh): coordinator, attention workers and expert
//! workers as separate `ringbolt` processes, driven by the real client. Every job's tokens must
//! equal `ringbolt generate` on the same checkpoint, whatever is killed along the way.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ringbolt");
/// Lease TTL of every member in these tests: a crash is noticed within about this long.
const TTL: &str = "2";

/// A port free now, for a process started later (etcd, a coordinator that binds only once
/// elected). Chosen below the kernel's ephemeral range: a port from that range can be taken
/// meanwhile by any outgoing connection's local end (seen: a coordinator that lost its port to
/// one while campaigning).
fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_low.clamp(10_001, 32768));
    for _ in 0..1000 {
        let p = rand::random_range(lo..hi);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in {lo}..{hi}")
}

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd() -> Etcd {
    etcd_with(None)
}

/// An etcd; with `tls`, its client port speaks TLS and requires client certificates its CA
/// signed.
fn etcd_with(tls: Option<&ringbolt_shell::testing::CertFiles>) -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    if let Some(f) = tls {
        cmd.args(["--cert-file", f.cert.to_str().unwrap()])
            .args(["--key-file", f.key.to_str().unwrap()])
            .args(["--trusted-ca-file", f.ca.to_str().unwrap()])
            .arg("--client-cert-auth");
    }
    let child = cmd
        .args(["--name", "t", "--data-dir", dir.path().to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed (scripts/test.sh installs Debian's etcd-server)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Etcd {
        child,
        url,
        _dir: dir,
    }
}

/// A `ringbolt` role process; its stderr is kept for the test to read.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(args: &[String]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        Proc::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start ringbolt");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line);
            }
        });
        Proc { child, log }
    }

    fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits for a line containing `needle`; returns what follows it.
    fn wait_for(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines(needle).first() {
                return l[l.find(needle).unwrap() + needle.len()..].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` within {within:?}; log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits (bounded) for the process to exit; its status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "process still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    etcd: Etcd,
    ckpt: PathBuf,
    data: PathBuf,
    name: String,
}

impl Cluster {
    fn common(&self) -> Vec<String> {
        [
            "--checkpoint",
            self.ckpt.to_str().unwrap(),
            "--etcd",
            &self.etcd.url,
            "--cluster",
            &self.name,
            "--lease-ttl-secs",
            TTL,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A coordinator on `port`; waits until it serves unless it is a standby.
    fn coordinator(&self, port: u16, wait: bool) -> Proc {
        self.coordinator_with(port, wait, &[])
    }

    /// [`coordinator`](Self::coordinator) with more flags.
    fn coordinator_with(&self, port: u16, wait: bool, extra: &[&str]) -> Proc {
        let mut a = vec!["coordinator".to_string()];
        a.extend(self.common());
        a.extend(
            [
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                self.data.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::start(&a);
        if wait {
            p.wait_for("listening on ", Duration::from_secs(60));
        }
        p
    }

    /// A leading coordinator (serving when this returns) and a standby, with their endpoints.
    fn leader_and_standby(&self) -> (Proc, Proc, String, String) {
        let (p1, p2) = (free_port(), free_port());
        let leader = self.coordinator(p1, true);
        let standby = self.coordinator(p2, false);
        (
            leader,
            standby,
            format!("http://127.0.0.1:{p1}"),
            format!("http://127.0.0.1:{p2}"),
        )
    }

    fn worker(&self, role: &str) -> (Proc, String) {
        self.worker_at(role, &["--listen", "127.0.0.1:0"])
    }

    fn worker_at(&self, role: &str, extra: &[&str]) -> (Proc, String) {
        let mut a = vec![role.to_string()];
        a.extend(self.common());
        a.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::start(&a);
        let rest = p.wait_for(&format!("ringbolt {role} "), Duration::from_secs(60));
        let id = rest.split_whitespace().next().unwrap().to_string();
        (p, id)
    }
}

fn setup(name: &str, dir: &Path) -> Cluster {
    setup_preset(name, dir, "tiny")
}

/// A cluster of a checkpoint `init-checkpoint --preset PRESET` writes.
fn setup_preset(name: &str, dir: &Path, preset: &str) -> Cluster {
    let ckpt = dir.join("ckpt");
    let (ok, _, err) = run(&[
        "init-checkpoint",
        "--preset",
        preset,
        "--seed",
        "5",
        "--dtype",
        "f32",
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    Cluster {
        etcd: etcd(),
        ckpt,
        data: dir.join("data"),
        name: name.into(),
    }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run ringbolt");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok_json(args: &[&str]) -> Value {
    let (ok, out, err) = run(args);
    assert!(ok, "{args:?} failed: {err}");
    serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn tokens(v: &Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

fn prompt(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| ((i * 31 + seed * 7) % 500).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn generate(ckpt: &Path, p: &str, n: u32) -> Vec<u64> {
    tokens(&ok_json(&[
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--tokens",
        p,
        "--max-new-tokens",
        &n.to_string(),
    ]))
}

fn status(endpoint: &str) -> Value {
    ok_json(&["status", "--endpoint", endpoint, "--json"])
}

/// Waits until the cluster's status satisfies `pred`; returns it.
fn wait_status(endpoint: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(endpoint);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never reached: {what}; last {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Expert workers and how many experts each holds.
fn expert_counts(s: &Value) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "expert-worker")
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["experts"].as_array().map(|a| a.len()).unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

/// Every (layer, expert) of the tiny model (8 layers × 4 experts) is held somewhere.
fn covers_all(s: &Value) -> bool {
    covers(s, 32)
}

fn covers(s: &Value, slots: usize) -> bool {
    let mut seen = std::collections::HashSet::new();
    for m in s["members"].as_array().unwrap() {
        for e in m["experts"].as_array().into_iter().flatten() {
            seen.insert((e[0].as_u64().unwrap(), e[1].as_u64().unwrap()));
        }
    }
    seen.len() == slots
}

fn epoch(s: &Value) -> u64 {
    s["epoch"].as_u64().unwrap()
}

/// Submits detached; returns the job id.
fn submit(endpoint: &str, p: &str, n: u32) -> String {
    submit_with(endpoint, p, n, &[])
}

/// [`submit`] with more flags.
fn submit_with(endpoint: &str, p: &str, n: u32, extra: &[&str]) -> String {
    let n = n.to_string();
    let mut args = vec![
        "submit",
        "--endpoint",
        endpoint,
        "--tokens",
        p,
        "--max-new-tokens",
        &n,
        "--detach",
        "--json",
    ];
    args.extend(extra);
    let v = ok_json(&args);
    v["job_id"].as_str().unwrap().to_string()
}

/// Follows a job to its end in the background (`jobs wait`): the tokens the client saw.
fn follow(endpoint: &str, id: &str) -> std::thread::JoinHandle<Value> {
    let (e, id) = (endpoint.to_string(), id.to_string());
    std::thread::spawn(move || {
        let out = Command::new(BIN)
            .args(["jobs", "wait", "--endpoint", &e, &id, "--json"])
            .env("RINGBOLT_CONNECT_TIMEOUT_SECS", "60")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "jobs wait failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(text.trim().lines().last().unwrap_or("")).unwrap()
    })
}

/// Waits until job `id` has at least `n` tokens (so a kill lands mid-job).
fn wait_tokens(endpoint: &str, id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = ok_json(&["jobs", "get", "--endpoint", endpoint, id, "--json"]);
        let have = j["tokens"].as_array().map(|a| a.len()).unwrap_or(0);
        if have >= n {
            assert_ne!(
                j["state"], "succeeded",
                "the job ended before the kill: {j}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "job {id} stuck at {have} tokens");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `job step finished layer_steps=N resent=M` of the attention worker's log, for every step.
fn step_counts(p: &Proc) -> Vec<(u64, u64)> {
    let num = |l: &str, key: &str| -> u64 {
        let clean: String = strip_ansi(l);
        let at = clean.find(key).unwrap() + key.len();
        clean[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    p.lines("job step finished")
        .iter()
        .map(|l| (num(l, "layer_steps="), num(l, "resent=")))
        .collect()
}

/// [`step_counts`] once the attention worker has logged at least `n` finished steps: its log
/// is read by another thread, so a step's line can trail the job's end by a moment.
fn wait_step_counts(p: &Proc, n: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = step_counts(p);
        if c.len() >= n || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            if c.is_ascii_alphabetic() {
                esc = false;
            }
        } else if c == '\u{1b}' {
            esc = true;
        } else {
            out.push(c);
        }
    }
    out
}

const LAYERS: u64 = 8;
const LONG: u32 = 1500;

#[test]
fn cluster_equals_standalone_through_scale_out_drain_and_an_expert_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("scale", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let (att, _) = c.worker("attention-worker");
    let (mut e1, id1) = c.worker("expert-worker");
    let s = wait_status(&ep, "one expert worker holds every expert", covers_all);
    assert_eq!(expert_counts(&s), vec![(id1.clone(), 32)]);
    let roles: Vec<&str> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    for r in ["coordinator", "attention-worker", "expert-worker"] {
        assert!(roles.contains(&r), "{s}");
    }
    for m in s["members"].as_array().unwrap() {
        assert!(m["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    }

    // Same tokens as the engine in one process, for jobs at once.
    let prompts: Vec<String> = (0..3).map(|i| prompt(100 + 50 * i, i)).collect();
    let want: Vec<Vec<u64>> = prompts.iter().map(|p| generate(&c.ckpt, p, 24)).collect();
    let ids: Vec<String> = prompts.iter().map(|p| submit(&ep, p, 24)).collect();
    for (id, w) in ids.iter().zip(&want) {
        assert_eq!(&tokens(&follow(&ep, id).join().unwrap()), w);
    }
    // Each prefill chunk and decode step is one layer step per layer; nothing re-sent.
    let counts = wait_step_counts(&att, ids.len());
    assert_eq!(counts.len(), ids.len());
    for (steps, resent) in counts {
        assert_eq!(steps, LAYERS * 24);
        assert_eq!(resent, 0);
    }

    // Scale out: a new expert worker gets experts in a new epoch.
    let e0 = epoch(&s);
    let (_e2, id2) = c.worker("expert-worker");
    let s = wait_status(&ep, "two expert workers share the experts", |s| {
        let n = expert_counts(s);
        epoch(s) > e0 && n.len() == 2 && n.iter().all(|(_, k)| *k > 0) && covers_all(s)
    });
    let e1_epoch = epoch(&s);

    // Drain e1 (SIGTERM) mid-job: its experts move, it exits, the job is unaffected.
    let p = prompt(200, 9);
    let want = generate(&c.ckpt, &p, LONG);
    let id = submit(&ep, &p, LONG);
    let watcher = follow(&ep, &id);
    wait_tokens(&ep, &id, 50);
    e1.sigterm();
    let st = e1.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "a drained expert worker exits cleanly: {st}");
    assert_eq!(e1.count("drained"), 1);
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    let s = wait_status(&ep, "the drained worker's experts moved", |s| {
        epoch(s) > e1_epoch && expert_counts(s) == vec![(id2.clone(), 32)]
    });

    // Kill -9 of an expert worker mid-job: the survivors take its experts in a new epoch,
    // the interrupted layer step is re-sent, no finished layer step is repeated.
    let (_e3, _) = c.worker("expert-worker");
    let e2_epoch = epoch(&s);
    wait_status(&ep, "the third worker got experts", |s| {
        epoch(s) > e2_epoch && expert_counts(s).iter().all(|(_, k)| *k > 0) && covers_all(s)
    });
    let mut e2 = _e2;
    // The three jobs and the drained one.
    let before = wait_step_counts(&att, ids.len() + 1).len();
    assert_eq!(before, ids.len() + 1);
    let p = prompt(300, 4);
    let want = generate(&c.ckpt, &p, LONG);
    let id = submit(&ep, &p, LONG);
    let watcher = follow(&ep, &id);
    wait_tokens(&ep, &id, 50);
    e2.kill9();
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    let counts = wait_step_counts(&att, before + 1);
    assert_eq!(counts.len(), before + 1);
    let (steps, resent) = counts[before];
    assert_eq!(steps, LAYERS * LONG as u64, "no layer step ran twice");
    assert!(resent >= 1, "the interrupted step was re-sent");
    let s = status(&ep);
    assert!(covers_all(&s), "{s}");
    assert_eq!(expert_counts(&s).len(), 1, "{s}");
}

#[test]
fn attention_worker_and_leader_crashes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("crash", dir.path());
    let (mut leader, standby, ep1, ep2) = c.leader_and_standby();
    let both = format!("{ep1},{ep2}");
    let (mut a1, _) = c.worker("attention-worker");
    let (mut a2, _) = c.worker("attention-worker");
    let (_e, _) = c.worker("expert-worker");
    wait_status(&ep1, "experts placed", covers_all);

    // Kill -9 of the attention worker running a job: it re-runs on the other one and the
    // client sees each token once, in order.
    let p = prompt(250, 3);
    let want = generate(&c.ckpt, &p, LONG);
    let id = submit(&ep1, &p, LONG);
    let watcher = follow(&ep1, &id);
    wait_tokens(&ep1, &id, 100);
    let (victim, other) = if a1.count("job step started") > 0 {
        (&mut a1, &a2)
    } else {
        (&mut a2, &a1)
    };
    victim.kill9();
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    assert_eq!(other.count("job step finished"), 1);
    let job = ok_json(&["jobs", "get", "--endpoint", &ep1, &id, "--json"]);
    assert_eq!(job["state"], "succeeded");

    // Kill -9 of the leading coordinator mid-job: the standby takes over, resumes the job from
    // the records in etcd, and the client (given both endpoints) sees each token once.
    let p = prompt(150, 8);
    let want = generate(&c.ckpt, &p, LONG);
    let id = submit(&both, &p, LONG);
    let watcher = follow(&both, &id);
    wait_tokens(&ep1, &id, 100);
    leader.kill9();
    standby.wait_for("listening on ", Duration::from_secs(60));
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    let job = ok_json(&["jobs", "get", "--endpoint", &ep2, &id, "--json"]);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(tokens(&job), want);
    // Jobs finished under the old leader are still there.
    let list = ok_json(&["jobs", "list", "--endpoint", &ep2, "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    // New jobs run on the new leader.
    let p = prompt(60, 1);
    let id = submit(&ep2, &p, 16);
    assert_eq!(
        tokens(&follow(&ep2, &id).join().unwrap()),
        generate(&c.ckpt, &p, 16)
    );
}

#[test]
fn workers_that_cannot_reach_etcd_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("noetcd", dir.path());
    let dead = format!("http://127.0.0.1:{}", free_port());
    for role in ["attention-worker", "expert-worker", "coordinator"] {
        let mut args = vec![
            role,
            "--checkpoint",
            c.ckpt.to_str().unwrap(),
            "--etcd",
            &dead,
            "--listen",
            "127.0.0.1:0",
            "--etcd-timeout-secs",
            "2",
        ];
        let data = c.data.to_str().unwrap().to_string();
        if role == "coordinator" {
            args.extend(["--data-dir", &data]);
        }
        let t0 = Instant::now();
        let (ok, _, err) = run(&args);
        assert!(!ok, "{role} started without etcd");
        assert!(err.contains("cannot reach etcd"), "{role}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(30), "bounded");
    }
    // A running worker whose etcd goes away loses its lease and exits with an error.
    let (mut w, _) = c.worker("expert-worker");
    drop(c.etcd);
    let st = w.wait_exit(Duration::from_secs(60));
    assert!(!st.success());
    assert!(w.count("lease lost") >= 1);
}

/// Anonymous resident memory of a process (its heap: the weights it converted and holds),
/// less pages the allocator already freed that the kernel has not taken back yet (LazyFree).
fn rss_anon(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kb = |key: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kb("Anonymous:").saturating_sub(kb("LazyFree:"))) * 1024
}

#[test]
fn planned_expert_memory_matches_what_the_workers_hold() {
    // Experts big enough to dominate a worker's memory: 8 layers × 8 experts of 3·64·4096 f32
    // weights (3 MiB each, 192 MiB in all), split over two workers by the planner.
    planned_memory("f32", &[], 4096, 3 * 64 * 4096 * 4, 0.10);
    // Experts quantized at load (`--weights int8`) from a bf16 checkpoint, 4 times as wide so
    // that they hold as much (3 MiB each): a byte per weight and an f32 scale per output channel
    // (w1, w3: 16384 each; w2: 64), within 5% of what the planner counts.
    planned_memory(
        "int8",
        &["--weights", "int8"],
        16384,
        3 * 64 * 16384 + (2 * 16384 + 64) * 4,
        0.05,
    );
}

/// Starts two expert workers (with `flags`) and a coordinator on a checkpoint with experts of
/// `intermediate` features, and checks that what each worker holds once the planner placed the
/// experts is the planner's figure (`per_expert` bytes per expert), within `tolerance`.
fn planned_memory(name: &str, flags: &[&str], intermediate: u64, per_expert: u64, tolerance: f64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let (ok, _, err) = run(&[
        "init-checkpoint",
        "--preset",
        "tiny",
        "--seed",
        "1",
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = intermediate.into();
    cfg["num_local_experts"] = 8.into();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let ckpt = dir.path().join("ckpt");
    let (ok, _, err) = run(&[
        "init-checkpoint",
        "--config",
        cfg_path.to_str().unwrap(),
        "--seed",
        "2",
        "--dtype",
        if flags.is_empty() { "f32" } else { "bf16" },
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let c = Cluster {
        etcd: etcd(),
        ckpt,
        data: dir.path().join("data"),
        name: format!("memory-{name}"),
    };
    // Workers first, with nothing placed yet: their memory before any expert.
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let workers: Vec<(Proc, String)> = (0..2)
        .map(|_| c.worker_at("expert-worker", &args))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = workers
        .iter()
        .map(|(p, _)| rss_anon(p.child.id()))
        .collect();
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let s = wait_status(&ep, "64 experts placed on two workers", |s| {
        covers(s, 64) && expert_counts(s).iter().all(|(_, k)| *k > 0)
    });
    std::thread::sleep(Duration::from_millis(500));
    for ((p, id), b) in workers.iter().zip(&before) {
        let m = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap();
        let predicted = m["weight_bytes"].as_u64().unwrap();
        let held = m["experts"].as_array().unwrap().len() as u64;
        assert_eq!(predicted, held * per_expert, "{m}");
        let measured = rss_anon(p.child.id()).saturating_sub(*b);
        let err = (measured as f64 - predicted as f64).abs() / predicted as f64;
        eprintln!(
            "{name}, {id}: predicted {predicted} bytes, measured {measured} bytes ({:.1}%)",
            err * 100.0
        );
        assert!(
            err <= tolerance,
            "{id}: predicted {predicted} bytes, measured {measured} (off by {:.1}%)",
            err * 100.0
        );
    }
}

#[test]
fn an_expert_worker_restarted_in_place_gets_its_experts_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("restart", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let (_att, _) = c.worker("attention-worker");
    let listen = format!("127.0.0.1:{}", free_port());
    let data = format!("127.0.0.1:{}", free_port());
    let at = [
        "--listen",
        &listen,
        "--data-listen",
        &data,
        "--id",
        "steady",
    ];
    let (mut e, _) = c.worker_at("expert-worker", &at);
    let s = wait_status(&ep, "experts placed", covers_all);
    // Same id, same addresses, back before its old lease ran out: the membership looks the
    // same, but the new process holds nothing until the coordinator re-places the experts.
    e.kill9();
    let (_e2, _) = c.worker_at("expert-worker", &at);
    wait_status(&ep, "a new epoch after the restart", |x| {
        epoch(x) > epoch(&s)
    });
    let p = prompt(80, 2);
    let id = submit(&ep, &p, 24);
    assert_eq!(
        tokens(&follow(&ep, &id).join().unwrap()),
        generate(&c.ckpt, &p, 24)
    );
}

/// GPU workers' ranks in the epoch's data group, by member id (from `status`).
#[cfg(feature = "cuda")]
fn data_group(s: &Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            Some((
                m["id"].as_str()?.to_string(),
                m["data_group_rank"].as_u64()?,
            ))
        })
        .collect();
    v.sort_by_key(|(_, r)| *r);
    v
}

/// The coordinator hands the GPU workers of every plan epoch a fresh NCCL unique id
/// (`ncclGetUniqueId` needs libnccl, not a GPU). GPU workers cannot start without a GPU, so
/// stand-ins register member records with `device: cuda:0` (on different hosts) and report a
/// failed join as a real one does; the expert worker is a real one on the CPU and stays out.
#[cfg(feature = "cuda")]
#[test]
fn gpu_workers_get_a_fresh_nccl_id_every_plan_epoch() {
    use ringbolt_cluster::etcd::{PlanView, group_failed_prefix};
    use ringbolt_membership::{EtcdMembership, Member, Membership, Role};
    if ringbolt_cluster::group::nccl_ids().is_none() {
        // scripts/test.sh installs NCCL and says so: there this must not pass by skipping.
        assert!(
            std::env::var_os("RINGBOLT_REQUIRE_NCCL").is_none(),
            "libnccl.so cannot be loaded: is it on LD_LIBRARY_PATH?"
        );
        eprintln!("skipped: libnccl.so cannot be loaded here (scripts/test.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = setup("group", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let (_e, expert) = c.worker("expert-worker");
    wait_status(&ep, "experts placed", covers_all);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt
        .block_on(EtcdMembership::connect(
            std::slice::from_ref(&c.etcd.url),
            &c.name,
            Duration::from_secs(5),
        ))
        .unwrap();
    let plans = rt
        .block_on(PlanView::follow(
            m.client(),
            &c.name,
            tokio_util::sync::CancellationToken::new(),
        ))
        .unwrap();
    // The data group's NCCL id of epoch `e`, from etcd.
    let id_of = |e: u64| {
        let p = rt
            .block_on(plans.newer_than(e - 1, Duration::from_secs(10)))
            .unwrap();
        assert_eq!(p.epoch, e);
        let id = p.data_group.clone().unwrap().nccl_id;
        assert_eq!(id.len(), 256, "{id}");
        id
    };
    let gpu = |id: &str, host: u8| Member {
        id: id.into(),
        role: Role::AttentionWorker,
        address: format!("10.0.0.{host}:7100"),
        data_address: String::new(),
        capacity_bytes: 0,
        expert_bytes: 0,
        device: "cuda:0".into(),
    };
    // Leases long enough that only what the test does changes the membership.
    let ttl = Duration::from_secs(30);
    let g1 = rt.block_on(m.register(gpu("gpu-a", 1), ttl)).unwrap();
    let _g2 = rt.block_on(m.register(gpu("gpu-b", 2), ttl)).unwrap();
    let s1 = wait_status(&ep, "a data group of the two GPU workers", |s| {
        data_group(s).len() == 2
    });
    assert_eq!(
        data_group(&s1),
        [("gpu-a".to_string(), 0), ("gpu-b".to_string(), 1)]
    );
    let e = s1["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == expert.as_str())
        .unwrap();
    assert_eq!(e["device"], "cpu");
    assert!(e.get("data_group_rank").is_none(), "{e}");
    let id1 = id_of(epoch(&s1));

    // A member reports that it could not join: a new epoch, same ranks, a fresh id, and the
    // experts stay where they were.
    let mut client = m.client();
    let key = format!("{}gpu-b", group_failed_prefix(&c.name));
    rt.block_on(client.put(key, epoch(&s1).to_string(), None))
        .unwrap();
    let s2 = wait_status(&ep, "a new epoch after a failed join", |s| {
        epoch(s) > epoch(&s1)
    });
    assert_eq!(data_group(&s2), data_group(&s1));
    assert_eq!(expert_counts(&s2), expert_counts(&s1));
    let id2 = id_of(epoch(&s2));
    assert_ne!(id1, id2, "every epoch gets its own NCCL id");

    // Nothing changes: no new epoch (the planner looks every 5 s).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(epoch(&status(&ep)), epoch(&s2), "epochs churn");

    // gpu-a leaves: one GPU worker is no group.
    rt.block_on(g1.leave()).unwrap();
    let s3 = wait_status(&ep, "no data group with one GPU worker", |s| {
        epoch(s) > epoch(&s2) && data_group(s).is_empty()
    });
    // gpu-c joins on gpu-b's host and GPU: still no group (NCCL refuses one GPU twice).
    let _g3 = rt.block_on(m.register(gpu("gpu-c", 2), ttl)).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    assert!(data_group(&status(&ep)).is_empty());
    // gpu-d on its own host: a group again, ranks by member id.
    let _g4 = rt.block_on(m.register(gpu("gpu-d", 4), ttl)).unwrap();
    let s4 = wait_status(&ep, "a data group with gpu-d", |s| {
        epoch(s) > epoch(&s3) && data_group(s).len() == 2
    });
    assert_eq!(
        data_group(&s4),
        [("gpu-b".to_string(), 0), ("gpu-d".to_string(), 1)]
    );
    let id4 = id_of(epoch(&s4));
    assert!(id4 != id1 && id4 != id2);
    // gpu-b restarts in place (registers again): it holds no communicator, so a new epoch.
    let _g2again = rt.block_on(m.register(gpu("gpu-b", 2), ttl)).unwrap();
    let s5 = wait_status(&ep, "a new epoch after a GPU worker restarted", |s| {
        epoch(s) > epoch(&s4)
    });
    assert_eq!(data_group(&s5), data_group(&s4));
    assert_ne!(id_of(epoch(&s5)), id4);
}

/// The gRPC health status of `service` at `address` (host:port).
fn health(address: &str, service: &str) -> Option<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        Some(r.into_inner().status)
    })
}

#[test]
fn an_expert_worker_out_of_file_descriptors_leaves_the_plan_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("fds", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let (att, _) = c.worker("attention-worker");
    let att_addr = att.wait_for("listening on ", Duration::from_secs(5));
    // An expert worker allowed 128 file descriptors.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=128:128", "--", BIN, "expert-worker"])
        .args(c.common())
        .args(["--listen", "127.0.0.1:0"]);
    let ex = Proc::spawn(cmd);
    let rest = ex.wait_for("listening on ", Duration::from_secs(60));
    let (addr, data) = rest.split_once(" (data plane ").unwrap();
    let data: std::net::SocketAddr = data.trim_end_matches(')').parse().unwrap();
    wait_status(&ep, "experts placed", covers_all);
    assert_eq!(health(addr, "ringbolt.internal.v1.ExpertWorker"), Some(1));
    assert_eq!(
        health(&att_addr, "ringbolt.internal.v1.AttentionWorker"),
        Some(1)
    );
    assert_eq!(health(&att_addr, ""), Some(1));

    // A burst of connections takes every descriptor the worker has, and they stay open.
    let held: Vec<std::net::TcpStream> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&data, Duration::from_secs(1)).ok())
        .collect();
    assert!(held.len() > 128, "only {} connections", held.len());
    // It cannot take expert steps: it leaves the plan rather than hold experts it cannot serve.
    wait_status(&ep, "the worker left the plan", |s| {
        expert_counts(s).is_empty()
    });
    assert!(ex.count("not accepting connections") > 0);
    drop(held);
    // Once it accepts again, it comes back and gets experts; jobs run and are right.
    wait_status(&ep, "the worker came back", covers_all);
    let p = prompt(120, 4);
    let id = submit(&ep, &p, 16);
    assert_eq!(
        tokens(&follow(&ep, &id).join().unwrap()),
        generate(&c.ckpt, &p, 16)
    );
    assert_eq!(health(addr, "ringbolt.internal.v1.ExpertWorker"), Some(1));

    // An attention worker checks what it is sent, whoever sends it.
    use ringbolt_proto::internal as ipb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let mut w = ipb::attention_worker_client::AttentionWorkerClient::connect(format!(
            "http://{att_addr}"
        ))
        .await
        .unwrap();
        let ids: Vec<u32> = vec![1, 2, 3];
        let req = ipb::RunJobRequest {
            job_id: "direct".into(),
            segment: Some(ipb::Segment { start: 0, end: 3 }),
            prompt: ringbolt_proto::pack_tokens(&ids),
            max_new_tokens: u32::MAX,
            top_p: 1.0,
            ..Default::default()
        };
        match w.run_job(req).await {
            Err(e) => e,
            Ok(s) => s.into_inner().message().await.expect_err("refused"),
        }
    });
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_new_tokens"), "{err:?}");
}

/// `ringbolt ARGS` with a long reconnect window (a client rides out a coordinator's failover).
fn client_run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RINGBOLT_CONNECT_TIMEOUT_SECS", "60")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Chaos: a steady stream of jobs from three clients into two coordinators, two attention
/// workers and three expert workers, while a driver `kill -9`s a random role every 15–30 s and
/// restarts it. In the end every accepted job finished exactly once, each client saw each
/// token once (the client checks indices), and every job's tokens equal `generate`. It runs for
/// `RINGBOLT_CHAOS_SECS` (60 here; `scripts/chaos.sh` runs it longer) and prints a summary.
#[test]
fn chaos_kill_9_of_random_roles_loses_and_repeats_nothing() {
    let secs: u64 = std::env::var("RINGBOLT_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let c = setup("chaos", dir.path());
    let ports = [free_port(), free_port()];
    let eps: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let both = eps.join(",");
    // Roles by slot: 0-1 coordinators, 2-3 attention workers, 4-6 expert workers.
    let mut roles: Vec<Proc> = vec![
        c.coordinator(ports[0], true),
        c.coordinator(ports[1], false),
    ];
    for r in ["attention-worker", "attention-worker"] {
        roles.push(c.worker(r).0);
    }
    for _ in 0..3 {
        roles.push(c.worker("expert-worker").0);
    }
    wait_status(&eps[0], "experts placed", covers_all);

    let prompts: Vec<String> = (0..4).map(|k| prompt(60 + 50 * k, k + 20)).collect();
    let new_tokens = 48;
    let want: Vec<Vec<u64>> = prompts
        .iter()
        .map(|p| generate(&c.ckpt, p, new_tokens))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);

    // Clients: each submits under its own idempotency keys and follows the job; a submission
    // or watch that fails (its coordinator died) is retried with the same key.
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (both, prompts) = (both.clone(), prompts.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                let mut seq = 0;
                while Instant::now() < deadline {
                    let k = (client + seq) % prompts.len();
                    let key = format!("client{client}-{seq}");
                    let n = new_tokens.to_string();
                    let mut tries = 0;
                    loop {
                        let (ok, out, err) = client_run(&[
                            "submit",
                            "--endpoint",
                            &both,
                            "--tokens",
                            &prompts[k],
                            "--max-new-tokens",
                            &n,
                            "--idempotency-key",
                            &key,
                            "--json",
                        ]);
                        if ok {
                            let v: Value = serde_json::from_str(out.trim()).unwrap();
                            done.push((key.clone(), k, v));
                            break;
                        }
                        tries += 1;
                        assert!(
                            !err.contains("DataLoss") && !err.contains("changed"),
                            "client {client}: {err}"
                        );
                        assert!(tries < 20, "client {client} gave up on {key}: {err}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    seq += 1;
                }
                done
            })
        })
        .collect();

    // The driver.
    let mut kills = Vec::new();
    while Instant::now() + Duration::from_secs(15) < deadline {
        std::thread::sleep(
            Duration::from_secs(rand::random_range(15..=30))
                .min(deadline.saturating_duration_since(Instant::now())),
        );
        let slot = rand::random_range(0..roles.len());
        roles[slot].kill9();
        let name = match slot {
            0 | 1 => "coordinator",
            2 | 3 => "attention-worker",
            _ => "expert-worker",
        };
        kills.push(name);
        std::thread::sleep(Duration::from_millis(500));
        roles[slot] = match slot {
            0 | 1 => c.coordinator(ports[slot], false),
            _ => c.worker(name).0,
        };
    }
    let results: Vec<(String, usize, Value)> = clients
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();

    // Every job a client saw finish has the right tokens, and the cluster holds each accepted
    // job exactly once, finished, with those tokens.
    let live = eps
        .iter()
        .find(|e| client_run(&["status", "--endpoint", e, "--json"]).0)
        .unwrap()
        .clone();
    let (ok, out, err) = client_run(&[
        "jobs",
        "list",
        "--endpoint",
        &live,
        "--limit",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let listed: Vec<Value> = serde_json::from_str::<Value>(out.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    let mut jobs_by_id = std::collections::HashMap::new();
    for j in &listed {
        assert!(
            jobs_by_id
                .insert(j["job_id"].as_str().unwrap().to_string(), j.clone())
                .is_none(),
            "job listed twice"
        );
    }
    let mut ids = std::collections::HashSet::new();
    for (key, k, v) in &results {
        assert_eq!(tokens(v), want[*k], "{key}: the client's tokens");
        let id = v["job_id"].as_str().unwrap();
        assert!(ids.insert(id.to_string()), "{key}: two keys, one job");
        let j = &jobs_by_id[id];
        assert_eq!(j["state"], "succeeded", "{key}: {j}");
        assert_eq!(tokens(j), want[*k], "{key}: the stored tokens");
    }
    // Nothing accepted beyond what the clients saw: one job per key.
    assert_eq!(listed.len(), results.len(), "{listed:?}");
    assert!(results.len() >= 3, "only {} jobs ran", results.len());
    eprintln!(
        "chaos: {secs} s, {} jobs finished exactly once with the right tokens, {} kills: {kills:?}",
        results.len(),
        kills.len()
    );
}

/// Context parallelism across processes: a job's prompt split among attention workers (ranks
/// exchanging lightning states and keys and values over their context data planes) gives the
/// tokens of one worker; a rank killed mid-prefill re-runs the job on a new group.
#[test]
fn context_parallel_jobs_across_attention_workers_equal_one_worker_and_survive_a_rank_kill() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("context", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator(port, true);
    let mut workers: Vec<(Proc, String)> = (0..4).map(|_| c.worker("attention-worker")).collect();
    let (_e, _) = c.worker("expert-worker");
    wait_status(&ep, "experts placed", covers_all);

    for (p, n) in [(2usize, 301usize), (3, 157), (4, 40)] {
        let prompt = prompt(n, p);
        let want = generate(&c.ckpt, &prompt, 24);
        let id = submit_with(&ep, &prompt, 24, &["--context-parallel", &p.to_string()]);
        assert_eq!(tokens(&follow(&ep, &id).join().unwrap()), want, "P = {p}");
        let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
        assert_eq!(job["context_parallel"], p as u64, "{job}");
        let per_rank = job["cache_bytes_per_rank"].as_array().unwrap();
        assert_eq!(per_rank.len(), p, "{job}");
        assert!(per_rank.iter().all(|b| b.as_u64().unwrap() > 0), "{job}");
    }
    let ranks: usize = workers
        .iter()
        .map(|(w, _)| w.count("context-parallel rank started"))
        .sum();
    assert_eq!(ranks, 2 + 3 + 4);

    // Kill -9 one rank mid-prefill: the job re-runs on a new group of the others and the
    // client sees each token once.
    let prompt = prompt(20_000, 9);
    let want = generate(&c.ckpt, &prompt, 16);
    let before: Vec<usize> = workers
        .iter()
        .map(|(w, _)| w.count("context-parallel rank started"))
        .collect();
    let id = submit_with(&ep, &prompt, 16, &["--context-parallel", "2"]);
    let watcher = follow(&ep, &id);
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        if let Some(i) = (0..workers.len())
            .find(|&i| workers[i].0.count("context-parallel rank started") > before[i])
        {
            break i;
        }
        assert!(Instant::now() < deadline, "no rank started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // `status` lists the running job with its degree.
    let st = status(&ep);
    assert!(
        st["running"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["job_id"] == id.as_str() && j["context_parallel"] == 2),
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
    assert!(
        job["tokens"].as_array().is_none_or(|t| t.is_empty()),
        "the prefill ended before the kill: {job}"
    );
    workers[victim].0.kill9();
    let done = watcher.join().unwrap();
    assert_eq!(tokens(&done), want);
    let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["context_parallel"], 2, "{job}");
    // The re-run went to a group without the killed worker.
    let reruns: usize = workers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(i, (w, _))| w.count("context-parallel rank started") - before[i])
        .sum();
    assert!(reruns >= 3, "{reruns} ranks started on the survivors");

    // Kill -9 mid-decode of a rank that holds keys but does not decode: the decoding rank's
    // attention needs it, so the job re-runs on a new group; the client sees each token once.
    let long = self::prompt(3_000, 4);
    let want = generate(&c.ckpt, &long, 400);
    assert!(
        want.len() >= 200,
        "the reference stops early: {}",
        want.len()
    );
    let serving = "serving its keys and values";
    let before: Vec<usize> = workers.iter().map(|(w, _)| w.count(serving)).collect();
    let id = submit_with(&ep, &long, 400, &["--context-parallel", "2"]);
    let watcher = follow(&ep, &id);
    wait_tokens(&ep, &id, 20);
    let victim = (0..workers.len())
        .find(|&i| i != victim && workers[i].0.count(serving) > before[i])
        .expect("a rank serves its keys while the other decodes");
    workers[victim].0.kill9();
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// Prometheus text from `/metrics` on 127.0.0.1:`port`.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The sum of the samples of metric `name` whose labels include each of `labels`
/// (`key="value"`).
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 16: every cluster role serves Prometheus metrics at --metrics-listen, and a job moves
/// the series an operator watches.
#[test]
fn every_role_serves_metrics_that_a_job_moves() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("metrics", dir.path());
    let (port, mc, ma, me) = (free_port(), free_port(), free_port(), free_port());
    let ep = format!("http://127.0.0.1:{port}");
    let at = |p: u16| format!("127.0.0.1:{p}");
    let http = free_port();
    let _coord = c.coordinator_with(
        port,
        true,
        &["--metrics-listen", &at(mc), "--http-listen", &at(http)],
    );
    let (_a, _) = c.worker_at(
        "attention-worker",
        &["--listen", "127.0.0.1:0", "--metrics-listen", &at(ma)],
    );
    let (_e, _) = c.worker_at(
        "expert-worker",
        &["--listen", "127.0.0.1:0", "--metrics-listen", &at(me)],
    );
    wait_status(&ep, "experts placed", covers_all);
    let before = scrape(mc);
    assert_eq!(metric(&before, "ringbolt_generated_tokens_total", &[]), 0.0);
    let p = prompt(400, 2);
    let want = generate(&c.ckpt, &p, 24);
    let id = submit(&ep, &p, 24);
    assert_eq!(tokens(&follow(&ep, &id).join().unwrap()), want);
    std::thread::sleep(Duration::from_millis(1500));
    let (coord, att, exp) = (scrape(mc), scrape(ma), scrape(me));
    let moved = |text: &str, series: &str| {
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}').split(',').collect::<Vec<_>>()),
            None => (series, Vec::new()),
        };
        let v = metric(text, name, &labels);
        assert!(v > 0.0, "{series} is {v}:\n{text}");
        v
    };
    assert_eq!(
        moved(&coord, "ringbolt_generated_tokens_total"),
        want.len() as f64
    );
    assert_eq!(moved(&coord, "ringbolt_prompt_tokens_total"), 400.0);
    moved(&coord, "ringbolt_jobs_accepted_total");
    moved(&coord, "ringbolt_jobs_finished_total{state=\"succeeded\"}");
    moved(&coord, "ringbolt_time_to_first_token_seconds_count");
    moved(&coord, "ringbolt_prefill_tokens_per_second_count");
    moved(&coord, "ringbolt_plan_epoch");
    for role in ["coordinator", "attention-worker", "expert-worker"] {
        let label = format!("member_role=\"{role}\"");
        assert_eq!(
            metric(&coord, "ringbolt_members", &[&label]),
            1.0,
            "{coord}"
        );
    }
    for text in [&coord, &att, &exp] {
        moved(text, "ringbolt_process_resident_bytes");
        moved(text, "ringbolt_etcd_lease_renew_seconds_count");
    }
    moved(&att, "ringbolt_layer_steps_total");
    moved(&att, "ringbolt_expert_wait_seconds_count");
    moved(&att, "ringbolt_layer_attention_seconds_count");
    moved(&att, "ringbolt_data_plane_bytes_total");
    moved(&exp, "ringbolt_expert_rows_total");
    moved(&exp, "ringbolt_expert_compute_seconds_count");
    moved(&exp, "ringbolt_data_plane_bytes_total");

    // The coordinator's HTTP API runs the same job through the cluster, visible by id.
    let ids: Vec<u64> = p.split(',').map(|t| t.parse().unwrap()).collect();
    let body = serde_json::json!({
        "model": c.ckpt.file_name().unwrap().to_str().unwrap(),
        "prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
    });
    let answer = http_post(http, "/v1/completions", &body.to_string());
    let (status, reply) = answer.split_once("\r\n\r\n").unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{answer}");
    let reply: Value = serde_json::from_str(reply).unwrap();
    let id = reply["id"].as_str().unwrap().trim_start_matches("cmpl-");
    let job = ok_json(&["jobs", "get", id, "--endpoint", &ep, "--json"]);
    assert_eq!(tokens(&job), want);
    assert_eq!(job["text"], reply["choices"][0]["text"]);
    assert_eq!(reply["usage"]["completion_tokens"], want.len());
}

/// One HTTP/1.1 POST of JSON `body` to 127.0.0.1:`port`; the whole answer.
fn http_post(port: u16, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Issue 16: a leading coordinator paused (SIGSTOP) past its lease, while the standby takes
/// over, is fenced when it resumes (SIGCONT): its plan and record writes are conditioned on
/// its election key, it steps down (exits), and the job finishes once with the same tokens.
#[test]
fn a_paused_leader_that_resumes_is_fenced_and_steps_down() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("fence", dir.path());
    let (mut leader, standby, ep1, ep2) = c.leader_and_standby();
    let both = format!("{ep1},{ep2}");
    let (_a, _) = c.worker("attention-worker");
    let (_e, _) = c.worker("expert-worker");
    wait_status(&ep1, "experts placed", covers_all);
    let p = prompt(150, 8);
    let want = generate(&c.ckpt, &p, LONG);
    let id = submit(&both, &p, LONG);
    let watcher = follow(&both, &id);
    wait_tokens(&ep1, &id, 50);
    let signal = |sig: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    let pid = leader.child.id();
    signal("-STOP", pid);
    standby.wait_for("listening on ", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    signal("-CONT", pid);
    // The old leader finds its lease gone or its writes refused, and steps down.
    leader.wait_exit(Duration::from_secs(60));
    let stepped_down = leader.count("stepping down") + leader.count("deposed");
    assert!(
        stepped_down > 0,
        "{}",
        leader.log.lock().unwrap().join("\n")
    );
    assert_eq!(tokens(&watcher.join().unwrap()), want);
    let job = ok_json(&["jobs", "get", "--endpoint", &ep2, &id, "--json"]);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(tokens(&job), want);
}

/// The fence itself: a write under a leader's election key lands while it leads, and is
/// refused (and marks it deposed) once another coordinator won the key — what keeps a leader
/// that was paused past its lease from writing when it resumes.
#[test]
fn writes_under_a_lost_election_key_are_refused() {
    use etcd_client::TxnOp;
    use ringbolt_cluster::etcd::Fence;
    let etcd = etcd();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url.as_str()], None)
            .await
            .unwrap();
        let l1 = c.lease_grant(5, None).await.unwrap().id();
        let won = c.campaign("/t/leader", "a", l1).await.unwrap();
        let k = won.leader().unwrap();
        let fence = Fence::new(k.key(), k.rev());
        fence
            .write(&c, vec![TxnOp::put("/t/plan", "1", None)])
            .await
            .unwrap();
        assert!(!fence.deposed.is_cancelled());
        // a's lease ends (revoked here, as a pause past its TTL lets it expire); b wins.
        c.lease_revoke(l1).await.unwrap();
        let l2 = c.lease_grant(5, None).await.unwrap().id();
        c.campaign("/t/leader", "b", l2).await.unwrap();
        let refused = fence
            .write(&c, vec![TxnOp::put("/t/plan", "2", None)])
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("no longer the leader"),
            "{refused}"
        );
        assert!(fence.deposed.is_cancelled());
        let v = c.get("/t/plan", None).await.unwrap();
        assert_eq!(v.kvs()[0].value(), b"1");
    });
}

/// Issue 16: a cluster whose roles speak mutual TLS to each other, TLS and tokens to clients,
/// and prove the cluster's secret on the data plane. Plain-text clients and token-less or
/// wrong-token requests are refused; a stranger on an expert worker's data plane is refused
/// and the worker goes on serving the attention worker that holds the secret.
#[test]
fn a_cluster_with_tls_tokens_and_a_data_secret_serves_only_credentialed_peers() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("tls", dir.path());
    let f = ringbolt_shell::testing::write_certs(dir.path());
    let secret = dir.path().join("data-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-cluster\n").unwrap();
    let tokens_file = dir.path().join("tokens");
    let token = "a-client-token-of-some-length";
    std::fs::write(&tokens_file, format!("{token}\n")).unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let (cert, key, ca, sec) = (p(&f.cert), p(&f.key), p(&f.ca), p(&secret));
    let role_tls = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--data-secret-file",
        &sec,
    ];
    // Workers require client certificates; the coordinator's public port takes tokens.
    let mut worker_flags = vec!["--listen", "127.0.0.1:0", "--tls-client-ca", &ca];
    worker_flags.extend(role_tls);
    let (port, data_port, metrics_port) = (free_port(), free_port(), free_port());
    let mut coord_flags = vec!["--auth-tokens-file", tokens_file.to_str().unwrap()];
    coord_flags.extend(role_tls);
    let _coord = c.coordinator_with(port, true, &coord_flags);
    let (_a, _) = c.worker_at("attention-worker", &worker_flags);
    let (data, metrics) = (
        format!("127.0.0.1:{data_port}"),
        format!("127.0.0.1:{metrics_port}"),
    );
    let mut expert_flags = worker_flags.clone();
    expert_flags.extend(["--data-listen", &data, "--metrics-listen", &metrics]);
    let (_e, _) = c.worker_at("expert-worker", &expert_flags);

    let ep = format!("127.0.0.1:{port}");
    let secure = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend([
            "--endpoint",
            &ep,
            "--tls-ca",
            &ca,
            "--token",
            token,
            "--json",
        ]);
        run(&a)
    };
    // Plain text, no token, a wrong token: refused, each saying why.
    let (ok, _, err) = run(&["status", "--endpoint", &format!("http://{ep}")]);
    assert!(
        !ok && err.contains("https://"),
        "a plain-text client was served: {err}"
    );
    let (ok, _, err) = run(&["status", "--endpoint", &ep, "--tls-ca", &ca]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = run(&[
        "status",
        "--endpoint",
        &ep,
        "--tls-ca",
        &ca,
        "--token",
        "not-the-token-at-all",
    ]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    // The workers' gRPC refuses a client without a certificate.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (ok, out, err) = secure(&["status"]);
        assert!(ok, "{err}");
        let s: Value = serde_json::from_str(out.trim()).unwrap();
        if covers_all(&s) {
            break s;
        }
        assert!(Instant::now() < deadline, "experts never placed: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for m in status["members"].as_array().unwrap() {
        if m["role"] != "coordinator" {
            let addr = m["address"].as_str().unwrap();
            assert_eq!(health(addr, ""), None, "{addr} served a plain-text client");
        }
    }

    // A stranger on the expert's data plane sends a request frame; it is refused.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&data).unwrap();
        let mut frame = vec![0u8; 64];
        frame[..4].copy_from_slice(&1u32.to_le_bytes());
        let _ = s.write_all(&frame);
        std::thread::sleep(Duration::from_millis(300));
    }
    let scraped = scrape(metrics_port);
    assert_eq!(
        metric(&scraped, "ringbolt_data_plane_refused_total", &[]),
        1.0,
        "{scraped}"
    );
    // Jobs run through every credentialed link (coordinator → attention worker over mTLS,
    // attention ↔ expert data plane with the secret) and equal the reference.
    let pr = prompt(300, 7);
    let want = generate(&c.ckpt, &pr, 16);
    let (ok, out, err) = secure(&["submit", "--tokens", &pr, "--max-new-tokens", "16"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(tokens(&v), want);
}

/// Issue 16: etcd with TLS and client-certificate authentication: the roles reach it with
/// --etcd-ca/--etcd-cert/--etcd-key and a job runs; a worker without a client certificate is
/// refused and says so.
#[test]
fn roles_reach_an_etcd_that_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let f = ringbolt_shell::testing::write_certs(dir.path());
    let mut c = setup("etcdtls", dir.path());
    c.etcd = etcd_with(Some(&f));
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let (ca, cert, key) = (p(&f.ca), p(&f.cert), p(&f.key));
    let etcd_tls = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];
    let port = free_port();
    let _coord = c.coordinator_with(port, true, &etcd_tls);
    let mut worker = vec!["--listen", "127.0.0.1:0"];
    worker.extend(etcd_tls);
    let (_a, _) = c.worker_at("attention-worker", &worker);
    let (_e, _) = c.worker_at("expert-worker", &worker);
    let ep = format!("http://127.0.0.1:{port}");
    wait_status(&ep, "experts placed", covers_all);
    let pr = prompt(200, 3);
    let want = generate(&c.ckpt, &pr, 8);
    let id = submit(&ep, &pr, 8);
    assert_eq!(tokens(&follow(&ep, &id).join().unwrap()), want);
    // Without a client certificate etcd refuses the connection: the worker exits, saying so.
    let mut a = vec!["expert-worker".to_string()];
    a.extend(c.common());
    a.extend(
        [
            "--listen",
            "127.0.0.1:0",
            "--etcd-ca",
            &ca,
            "--etcd-timeout-secs",
            "3",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut lone = Proc::start(&a);
    assert!(!lone.wait_exit(Duration::from_secs(60)).success());
    assert!(lone.count("cannot reach etcd") > 0, "{:?}", lone.lines(""));
}

/// The spans an OTLP collector stand-in received: (service name, trace id, span name,
/// attributes as `key=value`).
type Received = Arc<Mutex<Vec<(String, Vec<u8>, String, Vec<String>)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(V::StringValue(s)) => s.clone(),
            Some(V::IntValue(i)) => i.to_string(),
            other => format!("{other:?}"),
        };
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for sp in ss.spans {
                    let attrs = sp
                        .attributes
                        .iter()
                        .map(|a| format!("{}={}", a.key, text(&a.value)))
                        .collect();
                    got.push((service.clone(), sp.trace_id.clone(), sp.name.clone(), attrs));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Issue 16: with --otlp-endpoint on every role, one job is one trace: the coordinator's job
/// span, the attention worker's job step, engine steps and layer steps, and the expert
/// worker's requests share the trace id (context through gRPC metadata and the data plane).
#[test]
fn one_job_is_one_trace_across_coordinator_attention_and_expert_workers() {
    let received: Received = Default::default();
    let collector_port = free_port();
    {
        let received = received.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(Collector(received)))
                    .serve(format!("127.0.0.1:{collector_port}").parse().unwrap())
                    .await
                    .unwrap();
            });
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let c = setup("traces", dir.path());
    let otlp = format!("http://127.0.0.1:{collector_port}");
    let flags = ["--listen", "127.0.0.1:0", "--otlp-endpoint", &otlp];
    let port = free_port();
    let _coord = c.coordinator_with(port, true, &flags[2..]);
    let (_a, _) = c.worker_at("attention-worker", &flags);
    let (_e, _) = c.worker_at("expert-worker", &flags);
    let ep = format!("http://127.0.0.1:{port}");
    wait_status(&ep, "experts placed", covers_all);
    let pr = prompt(300, 4);
    let want = generate(&c.ckpt, &pr, 8);
    let id = submit(&ep, &pr, 8);
    assert_eq!(tokens(&follow(&ep, &id).join().unwrap()), want);
    // Spans are exported in batches (every 5 s by default).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = received.lock().unwrap().clone();
        let job = got
            .iter()
            .find(|(s, _, name, attrs)| {
                s == "ringbolt-coordinator" && name == "job" && attrs.contains(&format!("job={id}"))
            })
            .map(|(_, t, _, _)| t.clone());
        if let Some(trace) = job {
            let in_trace: Vec<(&str, &str)> = got
                .iter()
                .filter(|(_, t, _, _)| *t == trace)
                .map(|(s, _, n, _)| (s.as_str(), n.as_str()))
                .collect();
            let has = |s: &str, n: &str| in_trace.contains(&(s, n));
            if has("ringbolt-attention-worker", "job_step")
                && has("ringbolt-attention-worker", "layer_step")
                && has("ringbolt-expert-worker", "expert_request")
            {
                assert!(has("ringbolt-attention-worker", "step"), "{in_trace:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the job's trace never spanned every role: {in_trace:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "no job span for {id} among {} spans",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Issue 18: attention workers keep a context cache, and the coordinator routes a job to the
/// worker that holds its prompt's longest prefix: a second question about the same document
/// starts after the document's cached chunks there, with the tokens of a run without the cache.
#[test]
fn jobs_sharing_a_prefix_go_to_the_worker_that_cached_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup("prefix", dir.path());
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator_with(port, true, &["--prefill-chunk", "16"]);
    let cache = [
        "--listen",
        "127.0.0.1:0",
        "--context-cache-bytes",
        "100000000",
    ];
    let (a1, _) = c.worker_at("attention-worker", &cache);
    let (a2, _) = c.worker_at("attention-worker", &cache);
    let (_e, _) = c.worker("expert-worker");
    wait_status(&ep, "experts placed", covers_all);
    let doc = prompt(100, 4);
    let (q1, q2) = (format!("{doc},7,8,9"), format!("{doc},3,1,4,1,5"));
    let sampled = ["--temperature", "0.8", "--seed", "3"];
    let done = |id: &str| {
        follow(&ep, id).join().unwrap();
        ok_json(&["jobs", "get", "--endpoint", &ep, id, "--json"])
    };
    let first = done(&submit_with(&ep, &q1, 8, &sampled));
    assert_eq!(first["cached_tokens"], 0);
    let holder = if a1.count("job step started") == 1 {
        &a1
    } else {
        &a2
    };
    let warm = done(&submit_with(&ep, &q2, 8, &sampled));
    // 100 shared tokens: six whole chunks of 16 before them, on the worker that has them.
    assert_eq!(warm["cached_tokens"], 96, "{warm}");
    assert_eq!(holder.count("job step started"), 2);
    let mut cold_args = sampled.to_vec();
    cold_args.push("--no-context-cache");
    let cold = done(&submit_with(&ep, &q2, 8, &cold_args));
    assert_eq!(cold["cached_tokens"], 0);
    assert_eq!(tokens(&warm), tokens(&cold));

    // Context-parallel: the group of both workers prefills the first 96 positions and each
    // keeps its share; the next question goes to the same group in the same rank order, which
    // agrees on the shares all of them hold and starts there.
    let mut group = sampled.to_vec();
    group.extend(["--context-parallel", "2"]);
    let first = done(&submit_with(&ep, &q1, 8, &group));
    assert_eq!(first["cached_tokens"], 0, "{first}");
    let warm = done(&submit_with(&ep, &q2, 8, &group));
    assert_eq!(warm["cached_tokens"], 96, "{warm}");
    assert_eq!(warm["context_parallel"], 2, "{warm}");
    group.push("--no-context-cache");
    let cold = done(&submit_with(&ep, &q2, 8, &group));
    assert_eq!(cold["cached_tokens"], 0);
    assert_eq!(tokens(&warm), tokens(&cold));
    // Greedy, the group's tokens are one worker's.
    let q3 = format!("{doc},2,7,1,8,2,8,1,8,2,8");
    let want = generate(&c.ckpt, &q3, 8);
    let id = submit_with(&ep, &q3, 8, &["--context-parallel", "2"]);
    let got = done(&id);
    assert_eq!(got["cached_tokens"], 96, "{got}");
    assert_eq!(tokens(&got), want);
}

#[test]
fn jobs_with_images_run_the_vision_tower_on_their_attention_workers_alone_or_split() {
    let dir = tempfile::tempdir().unwrap();
    let c = setup_preset("vision", dir.path(), "vl-tiny");
    let port = free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let _coord = c.coordinator_with(port, true, &["--max-image-pixels", "3100"]);
    let (attention, _) = c.worker("attention-worker");
    let (_e, _) = c.worker("expert-worker");
    wait_status(&ep, "experts placed", covers_all);

    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(c.ckpt.join("config.json")).unwrap())
            .unwrap();
    let img = cfg["image_token_index"].as_u64().unwrap().to_string();
    let p = format!("5,{img},6,7,{img},8");
    let images =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/vl/images");
    let (d, b, a) = (
        images.join("d.jpg"),
        images.join("b.png"),
        images.join("a.png"),
    );
    let (d, b, a) = (
        d.to_str().unwrap(),
        b.to_str().unwrap(),
        a.to_str().unwrap(),
    );
    let want = ok_json(&[
        "generate",
        "--checkpoint",
        c.ckpt.to_str().unwrap(),
        "--tokens",
        &p,
        "--image",
        d,
        "--image",
        b,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ]);
    let id = submit_with(&ep, &p, 8, &["--image", d, "--image", b, "--ignore-eos"]);
    let got = follow(&ep, &id).join().unwrap();
    assert_eq!(tokens(&got), tokens(&want), "{got}");
    let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
    assert_eq!(job["images"], 2, "{job}");
    assert_eq!(job["prompt_tokens"], want["prompt_tokens"], "{job}");
    assert_eq!(attention.count("job step started"), 1);

    // Split between two attention workers: each runs the tower and takes its chunks' features.
    let (second, _) = c.worker("attention-worker");
    wait_status(&ep, "two attention workers", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "attention-worker")
            .count()
            == 2
    });
    let id = submit_with(
        &ep,
        &p,
        8,
        &[
            "--image",
            d,
            "--image",
            b,
            "--ignore-eos",
            "--context-parallel",
            "2",
        ],
    );
    let got = follow(&ep, &id).join().unwrap();
    assert_eq!(tokens(&got), tokens(&want), "{got}");
    let job = ok_json(&["jobs", "get", "--endpoint", &ep, &id, "--json"]);
    assert_eq!(job["context_parallel"], 2, "{job}");
    for w in [&attention, &second] {
        assert_eq!(w.count("context-parallel rank started"), 1);
    }

    // A bad image is refused by the coordinator, with the reason; nothing runs.
    let (ok, _, err) = run(&[
        "submit",
        "--endpoint",
        &ep,
        "--tokens",
        &format!("5,{img}"),
        "--image",
        a,
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("3100 pixels"),
        "{err}"
    );
    let list = ok_json(&["jobs", "list", "--endpoint", &ep, "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(attention.count("job step started"), 1);
}
