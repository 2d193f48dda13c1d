//! One test suite, run against the in-memory membership and against a real etcd that the tests
//! start on 127.0.0.1 (Debian's `etcd-server`, installed by scripts/test.sh).

use ringbolt_membership::{
    EtcdMembership, Member, MemberEvent, Membership, MemoryMembership, Role,
};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn member(id: &str, role: Role) -> Member {
    Member {
        id: id.into(),
        role,
        address: format!("127.0.0.1:1{}", id.len()),
        data_address: "127.0.0.1:2000".into(),
        capacity_bytes: 1 << 30,
        expert_bytes: 0,
        device: String::new(),
    }
}

const TTL: Duration = Duration::from_secs(2);

async fn next(rx: &mut tokio::sync::mpsc::Receiver<MemberEvent>) -> MemberEvent {
    // Bounded: an expiry is seen about TTL + 0.3 s after the last keep-alive.
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event within 20 s")
        .expect("watch open")
}

async fn register_list_leave<M: Membership>(m: M) {
    let a = m
        .register(member("a1", Role::ExpertWorker), TTL)
        .await
        .unwrap();
    let b = m
        .register(member("b1", Role::AttentionWorker), TTL)
        .await
        .unwrap();
    let mut ids: Vec<String> = m
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a1", "b1"]);
    // Keep-alives hold the members past their TTL.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(m.members().await.unwrap().len(), 2);
    assert!(!*a.lost().borrow());
    a.leave().await.unwrap();
    let left: Vec<Member> = m.members().await.unwrap();
    assert_eq!(left, vec![member("b1", Role::AttentionWorker)]);
    b.leave().await.unwrap();
    assert!(m.members().await.unwrap().is_empty());
}

async fn watch_sees_joins_leaves_and_expiry<M: Membership>(m: M) {
    let first = m
        .register(member("c1", Role::Coordinator), TTL)
        .await
        .unwrap();
    let (snapshot, mut rx) = m.watch().await.unwrap();
    assert_eq!(snapshot, vec![member("c1", Role::Coordinator)]);
    let w = m
        .register(member("e1", Role::ExpertWorker), TTL)
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        MemberEvent::Joined(member("e1", Role::ExpertWorker))
    );
    // A crash: the keep-alive stops, the lease runs out, watchers see it leave.
    w.abandon();
    assert_eq!(
        next(&mut rx).await,
        MemberEvent::Left {
            role: Role::ExpertWorker,
            id: "e1".into()
        }
    );
    // A graceful leave is seen too.
    first.leave().await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        MemberEvent::Left {
            role: Role::Coordinator,
            id: "c1".into()
        }
    );
}

async fn bad_registrations_are_refused<M: Membership>(m: M) {
    assert!(
        m.register(member("", Role::ExpertWorker), TTL)
            .await
            .is_err()
    );
    assert!(
        m.register(member("a/b", Role::ExpertWorker), TTL)
            .await
            .is_err()
    );
    assert!(
        m.register(member("ok", Role::ExpertWorker), Duration::from_millis(10))
            .await
            .is_err()
    );
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn etcd(cluster: &str) -> (Etcd, EtcdMembership) {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
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
    let e = Etcd {
        child,
        url,
        _dir: dir,
    };
    for _ in 0..100 {
        if let Ok(m) = EtcdMembership::connect(
            std::slice::from_ref(&e.url),
            cluster,
            Duration::from_secs(2),
        )
        .await
            && m.members().await.is_ok()
        {
            return (e, m);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not start");
}

#[tokio::test]
async fn memory_register_list_leave() {
    register_list_leave(MemoryMembership::new()).await;
}

#[tokio::test]
async fn memory_watch() {
    watch_sees_joins_leaves_and_expiry(MemoryMembership::new()).await;
}

#[tokio::test]
async fn memory_bad_registrations() {
    bad_registrations_are_refused(MemoryMembership::new()).await;
}

#[tokio::test]
async fn etcd_register_list_leave() {
    let (_e, m) = etcd("c1").await;
    register_list_leave(m).await;
}

#[tokio::test]
async fn etcd_watch() {
    let (_e, m) = etcd("c2").await;
    watch_sees_joins_leaves_and_expiry(m).await;
}

#[tokio::test]
async fn etcd_bad_registrations() {
    let (_e, m) = etcd("c3").await;
    bad_registrations_are_refused(m).await;
}

#[tokio::test]
async fn clusters_do_not_see_each_other() {
    let (e, m1) = etcd("one").await;
    let m2 = EtcdMembership::connect(std::slice::from_ref(&e.url), "two", Duration::from_secs(2))
        .await
        .unwrap();
    let _r = m1
        .register(member("x", Role::ExpertWorker), TTL)
        .await
        .unwrap();
    assert_eq!(m1.members().await.unwrap().len(), 1);
    assert!(m2.members().await.unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_etcd_is_a_clear_error_not_a_hang() {
    let port = free_port();
    let r = EtcdMembership::connect(
        &[format!("http://127.0.0.1:{port}")],
        "c",
        Duration::from_secs(2),
    )
    .await;
    let err = match r {
        Err(e) => e.to_string(),
        Ok(m) => m
            .members()
            .await
            .expect_err("nothing listens there")
            .to_string(),
    };
    assert!(err.contains("unavailable"), "{err}");
}

#[tokio::test]
async fn lost_lease_is_reported_when_etcd_goes_away() {
    let (mut e, m) = etcd("c4").await;
    let r = m
        .register(member("w", Role::ExpertWorker), TTL)
        .await
        .unwrap();
    let mut lost = r.lost();
    let _ = e.child.kill();
    let _ = e.child.wait();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !*lost.borrow() {
            lost.changed().await.unwrap();
        }
    })
    .await
    .expect("the registration reports its lease lost within 30 s");
}
