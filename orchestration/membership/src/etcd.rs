//! Membership in etcd: a lease per member, kept alive by a task; a prefix watch.

use crate::{
    Member, MemberEvent, Membership, MembershipError, Registration, Result, member_key,
    members_prefix, parse_key, validate,
};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct EtcdMembership {
    client: Client,
    cluster: String,
}

fn unavailable(e: etcd_client::Error) -> MembershipError {
    MembershipError::Unavailable(e.to_string())
}

fn decode(key: &[u8], value: &[u8]) -> Result<Member> {
    serde_json::from_slice(value).map_err(|e| MembershipError::Codec {
        key: String::from_utf8_lossy(key).into_owned(),
        msg: e.to_string(),
    })
}

impl EtcdMembership {
    /// Connects to etcd (every request bounded by `timeout`).
    pub async fn connect(endpoints: &[String], cluster: &str, timeout: Duration) -> Result<Self> {
        Self::connect_with(endpoints, cluster, timeout, None).await
    }

    /// [`connect`](Self::connect) over TLS with `tls` (the CA etcd's certificate is checked
    /// against, and this process's client certificate for an etcd with client-cert-auth).
    pub async fn connect_with(
        endpoints: &[String],
        cluster: &str,
        timeout: Duration,
        tls: Option<etcd_client::TlsOptions>,
    ) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        if let Some(t) = tls {
            opts = opts.with_tls(t);
        }
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| {
                MembershipError::Unavailable(format!(
                    "no answer from etcd at {endpoints:?} within {timeout:?}"
                ))
            })?
            .map_err(unavailable)?;
        Ok(EtcdMembership {
            client,
            cluster: cluster.to_string(),
        })
    }

    /// The etcd client (for the cluster's other keys: plan, jobs, leadership).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

/// An etcd lease kept alive by a background task until `keepalive` is cancelled. `lost` turns
/// true when the lease could not be renewed for a whole TTL (it has expired, or etcd is gone).
pub struct KeptLease {
    pub id: i64,
    pub keepalive: CancellationToken,
    pub lost: watch::Receiver<bool>,
}

/// Grants a lease of `ttl` (at least 2 s, etcd's minimum) and keeps it alive.
pub async fn keep_lease(client: &Client, ttl: Duration) -> Result<KeptLease> {
    let ttl_s = ttl.as_secs().max(2) as i64;
    let lease = client
        .clone()
        .lease_grant(ttl_s, None)
        .await
        .map_err(unavailable)?
        .id();
    let keepalive = CancellationToken::new();
    let (lost_tx, lost) = watch::channel(false);
    let token = keepalive.clone();
    let mut kc = client.clone();
    let period = Duration::from_secs(ttl_s as u64) / 3;
    tokio::spawn(async move {
        let mut last_ok = Instant::now();
        let mut keeper = None;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            if keeper.is_none() {
                keeper = kc.lease_keep_alive(lease).await.ok();
            }
            let renew = Instant::now();
            let ok = match keeper.as_mut() {
                Some((k, stream)) => match k.keep_alive().await {
                    Ok(()) => matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0),
                    Err(_) => false,
                },
                None => false,
            };
            if ok {
                last_ok = Instant::now();
                metrics::histogram!("ringbolt_etcd_lease_renew_seconds")
                    .record(renew.elapsed().as_secs_f64());
            } else {
                metrics::counter!("ringbolt_etcd_lease_renew_failures_total").increment(1);
                keeper = None;
                if last_ok.elapsed() >= Duration::from_secs(ttl_s as u64) {
                    tracing::warn!(lease, "lease lost");
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        }
    });
    Ok(KeptLease {
        id: lease,
        keepalive,
        lost,
    })
}

impl Membership for EtcdMembership {
    async fn register(&self, member: Member, ttl: Duration) -> Result<Registration> {
        validate(&member, ttl)?;
        let kept = keep_lease(&self.client, ttl).await?;
        let lease = kept.id;
        let mut c = self.client.clone();
        let key = member_key(&self.cluster, member.role, &member.id);
        let value =
            serde_json::to_vec(&member).map_err(|e| MembershipError::Invalid(e.to_string()))?;
        c.put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(unavailable)?;
        let (keepalive, lost) = (kept.keepalive, kept.lost);
        let mut rc = self.client.clone();
        Ok(Registration {
            keepalive,
            lost,
            revoke: Some(Box::new(move || {
                Box::pin(async move {
                    rc.lease_revoke(lease).await.map_err(unavailable)?;
                    Ok(())
                })
            })),
        })
    }

    async fn members(&self) -> Result<Vec<Member>> {
        let mut c = self.client.clone();
        let resp = c
            .get(
                members_prefix(&self.cluster),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(unavailable)?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    async fn watch(&self) -> Result<(Vec<Member>, mpsc::Receiver<MemberEvent>)> {
        let mut c = self.client.clone();
        let prefix = members_prefix(&self.cluster);
        let resp = c
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let snapshot = resp
            .kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect::<Result<Vec<_>>>()?;
        let mut stream = c
            .watch(
                prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            )
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let event = match ev.event_type() {
                        EventType::Put => match decode(kv.key(), kv.value()) {
                            Ok(m) => MemberEvent::Joined(m),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping a malformed member record");
                                continue;
                            }
                        },
                        EventType::Delete => {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let Some((role, id)) = parse_key(&prefix, &key) else {
                                continue;
                            };
                            MemberEvent::Left { role, id }
                        }
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok((snapshot, rx))
    }
}
