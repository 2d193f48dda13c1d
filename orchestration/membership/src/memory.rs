//! Membership in one process: the same leases, expiry and watch order as etcd.

use crate::{Member, MemberEvent, Membership, Registration, Result, Role, validate};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct State {
    members: BTreeMap<(Role, String), (Member, u64)>,
    watchers: Vec<mpsc::Sender<MemberEvent>>,
    next_lease: u64,
}

impl State {
    fn emit(&mut self, e: MemberEvent) {
        // A watcher that stopped reading (or whose buffer is full) is dropped; it re-watches.
        self.watchers.retain(|w| w.try_send(e.clone()).is_ok());
    }

    /// Removes the member if it is still held by `lease`.
    fn expire(&mut self, role: Role, id: &str, lease: u64) {
        let key = (role, id.to_string());
        if self.members.get(&key).is_some_and(|(_, l)| *l == lease) {
            self.members.remove(&key);
            self.emit(MemberEvent::Left {
                role,
                id: id.to_string(),
            });
        }
    }
}

#[derive(Clone, Default)]
pub struct MemoryMembership {
    state: Arc<Mutex<State>>,
}

impl MemoryMembership {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Membership for MemoryMembership {
    async fn register(&self, member: Member, ttl: Duration) -> Result<Registration> {
        validate(&member, ttl)?;
        let (role, id) = (member.role, member.id.clone());
        let lease = {
            let mut s = self.lock();
            s.next_lease += 1;
            let lease = s.next_lease;
            s.members
                .insert((role, id.clone()), (member.clone(), lease));
            s.emit(MemberEvent::Joined(member));
            lease
        };
        let keepalive = CancellationToken::new();
        let (_lost_tx, lost) = watch::channel(false);
        // When the keep-alive stops without a revoke (a crash), the lease runs out.
        let token = keepalive.clone();
        let me = self.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(ttl).await;
            me.lock().expire(role, &id2, lease);
        });
        let me = self.clone();
        Ok(Registration {
            keepalive,
            lost,
            revoke: Some(Box::new(move || {
                Box::pin(async move {
                    me.lock().expire(role, &id, lease);
                    Ok(())
                })
            })),
        })
    }

    async fn members(&self) -> Result<Vec<Member>> {
        Ok(self
            .lock()
            .members
            .values()
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn watch(&self) -> Result<(Vec<Member>, mpsc::Receiver<MemberEvent>)> {
        let (tx, rx) = mpsc::channel(1024);
        let mut s = self.lock();
        s.watchers.push(tx);
        Ok((s.members.values().map(|(m, _)| m.clone()).collect(), rx))
    }
}
