//! A cluster on this machine as child processes (for `demo --cluster` and `bench cluster`):
//! a real etcd (the one given, or `etcd` from the PATH in a temporary directory), one
//! coordinator, attention workers and expert workers, each logging to a file.

use anyhow::{Context, Result, bail};
use ringbolt_proto::v1 as pb;
use ringbolt_proto::v1::cluster_client::ClusterClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Kid {
    name: String,
    child: Child,
}

pub struct LocalCluster {
    kids: Vec<Kid>,
    etcd: Option<Child>,
    pub endpoint: String,
    pub logs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for k in self.kids.iter_mut().rev() {
            let _ = k.child.kill();
            let _ = k.child.wait();
        }
        if let Some(e) = self.etcd.as_mut() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

fn spawn(exe: &Path, name: &str, args: &[String], logs: &Path) -> Result<Kid> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Kid {
        name: name.into(),
        child,
    })
}

/// Starts etcd from the PATH on free ports; its client URL.
fn start_etcd(dir: &Path, logs: &Path) -> Result<(Child, String)> {
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(logs.join("etcd.log"))?;
    let child = Command::new("etcd")
        .args(["--name", "demo", "--data-dir"])
        .arg(dir.join("etcd"))
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
        .args(["--initial-cluster", &format!("demo={peer_url}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "a local cluster needs etcd: install it (Debian: apt-get install etcd-server) \
                 or pass --etcd URL ({e})"
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        if Instant::now() > deadline {
            bail!("etcd did not start within 30 s (log: {})", logs.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, url))
}

impl LocalCluster {
    /// Starts the cluster and waits until every expert is placed.
    pub async fn start(
        ckpt: &Path,
        etcd: Option<String>,
        attention_workers: usize,
        expert_workers: usize,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let exe = std::env::current_exe()?;
        let (etcd_child, url) = match etcd {
            Some(u) => (None, u),
            None => {
                let (c, u) = start_etcd(dir.path(), &logs)?;
                (Some(c), u)
            }
        };
        let mut me = LocalCluster {
            kids: Vec::new(),
            etcd: etcd_child,
            endpoint: String::new(),
            logs: logs.clone(),
            _dir: dir,
        };
        let cluster = format!("local-{}", std::process::id());
        let common = |role: &str| -> Vec<String> {
            [
                role,
                "--checkpoint",
                ckpt.to_str().unwrap_or_default(),
                "--etcd",
                &url,
                "--cluster",
                &cluster,
                "--lease-ttl-secs",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let port = free_port()?;
        let mut a = common("coordinator");
        a.extend([
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            me._dir.path().join("data").to_string_lossy().into_owned(),
        ]);
        me.kids.push(spawn(&exe, "coordinator", &a, &logs)?);
        for i in 0..attention_workers {
            let mut a = common("attention-worker");
            a.extend(["--listen".into(), "127.0.0.1:0".into()]);
            me.kids
                .push(spawn(&exe, &format!("attention-worker-{i}"), &a, &logs)?);
        }
        for i in 0..expert_workers {
            let mut a = common("expert-worker");
            a.extend(["--listen".into(), "127.0.0.1:0".into()]);
            me.kids
                .push(spawn(&exe, &format!("expert-worker-{i}"), &a, &logs)?);
        }
        me.endpoint = format!("http://127.0.0.1:{port}");
        me.wait_ready(attention_workers, expert_workers).await?;
        Ok(me)
    }

    fn check_alive(&mut self) -> Result<()> {
        for k in &mut self.kids {
            if let Some(st) = k.child.try_wait()? {
                bail!(
                    "{} exited ({st}); see {}",
                    k.name,
                    self.logs.join(format!("{}.log", k.name)).display()
                );
            }
        }
        Ok(())
    }

    pub async fn status(&self) -> Result<pb::ClusterStatus> {
        let ch = ringbolt_shell::Dial::default()
            .connect(&self.endpoint, Duration::from_secs(5))
            .await?;
        Ok(ClusterClient::new(ch)
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }

    async fn wait_ready(&mut self, attention: usize, experts: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.check_alive()?;
            if let Ok(s) = self.status().await {
                let count = |r: &str| s.members.iter().filter(|m| m.role == r).count();
                let placed: std::collections::HashSet<(u32, u32)> = s
                    .members
                    .iter()
                    .flat_map(|m| m.experts.iter().map(|e| (e.layer, e.expert)))
                    .collect();
                let want = count("attention-worker") == attention
                    && count("expert-worker") == experts
                    && s.epoch > 0
                    && placed.len() == self.expected_slots(&s);
                if want {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the local cluster was not ready within 300 s (logs: {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// layers × experts, from the status line `N layers, hidden H, E experts top-K, ...`.
    fn expected_slots(&self, s: &pb::ClusterStatus) -> usize {
        let nums: Vec<usize> = s
            .model
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .collect();
        match nums.as_slice() {
            [layers, _hidden, experts, ..] => layers * experts,
            _ => usize::MAX,
        }
    }

    /// Prints members and placement.
    pub async fn print_status(&self) -> Result<()> {
        let s = self.status().await?;
        eprintln!("cluster: plan epoch {}, model {}", s.epoch, s.model);
        for m in &s.members {
            let ex = if m.role == "expert-worker" {
                format!("  {} experts", m.experts.len())
            } else {
                String::new()
            };
            eprintln!("  {:<18} {:<40} {}{ex}", m.role, m.id, m.address);
        }
        eprintln!("  logs: {}", self.logs.display());
        Ok(())
    }
}

/// `ringbolt standalone` as a child process (a baseline for `bench cluster`).
pub struct StandaloneChild {
    kid: Kid,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for StandaloneChild {
    fn drop(&mut self) {
        let _ = self.kid.child.kill();
        let _ = self.kid.child.wait();
    }
}

impl StandaloneChild {
    pub async fn start(ckpt: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let args: Vec<String> = vec![
            "standalone".into(),
            "--checkpoint".into(),
            ckpt.to_string_lossy().into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            dir.path().join("data").to_string_lossy().into_owned(),
        ];
        let kid = spawn(&std::env::current_exe()?, "standalone", &args, dir.path())?;
        let me = StandaloneChild {
            kid,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("standalone did not start within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(me)
    }
}
