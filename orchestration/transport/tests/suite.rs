//! One suite for every transport: in-process, and TCP on 127.0.0.1.

use bytes::Bytes;
use ringbolt_transport::guard::Guard;
use ringbolt_transport::local::LocalGroup;
use ringbolt_transport::tcp::{TcpHub, TcpTransport};
use ringbolt_transport::{Transport, TransportError};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn tcp_group(size: usize, epoch: u64) -> Vec<TcpTransport> {
    tcp_group_at(size, epoch).await.0
}

async fn tcp_group_at(size: usize, epoch: u64) -> (Vec<TcpTransport>, Vec<std::net::SocketAddr>) {
    TcpTransport::loopback_group(size, epoch, TIMEOUT, Default::default())
        .await
        .unwrap()
}

/// Runs `f` on every rank at once; returns their results in rank order.
async fn on_all<T, R, F, Fut>(group: Vec<T>, f: F) -> Vec<R>
where
    T: Transport + 'static,
    R: Send + 'static,
    F: Fn(Arc<T>) -> Fut,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let hs: Vec<_> = group
        .into_iter()
        .map(|t| tokio::spawn(f(Arc::new(t))))
        .collect();
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

fn payload(from: usize, to: usize) -> Bytes {
    // Sizes differ per pair, one pair sends nothing, one sends 3 MB.
    let n = match (from, to) {
        (0, 1) => 0,
        (1, 2) => 3 << 20,
        _ => 10 * from + to + 1,
    };
    Bytes::from(
        (0..n)
            .map(|i| (i + 7 * from + 13 * to) as u8)
            .collect::<Vec<u8>>(),
    )
}

async fn point_to_point_keeps_order_per_tag<T: Transport + 'static>(g: Vec<T>) {
    on_all(g, |t| async move {
        let (me, n) = (t.rank(), t.size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        for i in 0..5u8 {
            t.send(next, 1, Bytes::from(vec![me as u8, i]))
                .await
                .unwrap();
        }
        t.send(next, 2, Bytes::from_static(b"other tag"))
            .await
            .unwrap();
        // Tag 2 can be received first; tag 1 arrives in send order.
        assert_eq!(&t.recv(prev, 2).await.unwrap()[..], b"other tag");
        for i in 0..5u8 {
            assert_eq!(&t.recv(prev, 1).await.unwrap()[..], &[prev as u8, i]);
        }
    })
    .await;
}

async fn all_to_all_v_and_all_gather<T: Transport + 'static>(g: Vec<T>) {
    on_all(g, |t| async move {
        let (me, n) = (t.rank(), t.size());
        let got = t
            .all_to_all_v(7, (0..n).map(|to| payload(me, to)).collect())
            .await
            .unwrap();
        for (from, b) in got.iter().enumerate() {
            assert_eq!(b, &payload(from, me), "rank {me} from {from}");
        }
        let all = t
            .all_gather(8, Bytes::from(format!("rank {me}")))
            .await
            .unwrap();
        assert_eq!(
            all,
            (0..n)
                .map(|r| Bytes::from(format!("rank {r}")))
                .collect::<Vec<_>>()
        );
        assert!(matches!(
            t.all_to_all_v(9, vec![Bytes::new()]).await,
            Err(TransportError::Parts { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn local_point_to_point() {
    point_to_point_keeps_order_per_tag(LocalGroup::ranks(3, 1, TIMEOUT)).await;
}

#[tokio::test]
async fn local_collectives() {
    all_to_all_v_and_all_gather(LocalGroup::ranks(3, 1, TIMEOUT)).await;
}

#[tokio::test]
async fn tcp_point_to_point() {
    point_to_point_keeps_order_per_tag(tcp_group(3, 1).await).await;
}

#[tokio::test]
async fn tcp_collectives() {
    all_to_all_v_and_all_gather(tcp_group(3, 1).await).await;
}

#[tokio::test]
async fn stale_epoch_messages_are_refused() {
    let g = LocalGroup::ranks(2, 5, TIMEOUT);
    let stale = g[0].stamped(4);
    stale.send(1, 1, Bytes::from_static(b"old")).await.unwrap();
    let err = g[1].recv(0, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::StaleEpoch {
                from: 0,
                got: 4,
                want: 5
            }
        ),
        "{err}"
    );
    // Over TCP too: a rank still on epoch 4 talking to a group of epoch 5.
    let (new, addrs) = tcp_group_at(2, 5).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = l.local_addr().unwrap();
    let old = TcpTransport::start(0, 4, l, vec![own, addrs[1]], TIMEOUT).unwrap();
    old.send(1, 3, Bytes::from_static(b"old")).await.unwrap();
    let err = new[1].recv(0, 3).await.unwrap_err();
    assert!(err.to_string().contains("epoch 4"), "{err}");
}

#[tokio::test]
async fn nothing_to_receive_is_a_bounded_wait_and_a_dead_peer_an_error() {
    let g = LocalGroup::ranks(2, 1, Duration::from_millis(200));
    assert!(matches!(
        g[0].recv(1, 1).await,
        Err(TransportError::Timeout { .. })
    ));
    assert!(matches!(
        g[0].send(5, 1, Bytes::new()).await,
        Err(TransportError::BadRank { .. })
    ));
    // A TCP peer that is not there: the send fails within the timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = {
        let d = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        d.local_addr().unwrap()
    };
    let t = TcpTransport::start(
        0,
        1,
        l,
        vec!["127.0.0.1:1".parse().unwrap(), dead],
        Duration::from_millis(500),
    )
    .unwrap();
    let err = t.send(1, 1, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, TransportError::Peer { peer: 1, .. }), "{err}");
}

#[tokio::test]
async fn an_emulated_link_takes_its_time() {
    use ringbolt_transport::Link;
    let link = Link {
        bytes_per_second: Some(10e6),
        latency: Duration::from_millis(5),
    };
    // 1 MB at 10 MB/s: at least 100 ms (plus the latency) per message.
    assert!(link.time(1_000_000) >= Duration::from_millis(105));
    let (g, _) = TcpTransport::loopback_group(2, 1, TIMEOUT, link)
        .await
        .unwrap();
    let data = Bytes::from(vec![7u8; 1_000_000]);
    let t0 = std::time::Instant::now();
    g[0].send(1, 9, data.clone()).await.unwrap();
    g[0].send(1, 9, data.clone()).await.unwrap();
    assert_eq!(g[1].recv(0, 9).await.unwrap(), data);
    assert_eq!(g[1].recv(0, 9).await.unwrap(), data);
    // Two messages queue on the link: a lower bound, never an upper one.
    assert!(
        t0.elapsed() >= Duration::from_millis(210),
        "{:?}",
        t0.elapsed()
    );
}

/// Groups of three hubs: rank r of every group is on hub r.
async fn hub_groups(hubs: &[TcpHub], groups: &[u64]) -> Vec<Vec<TcpTransport>> {
    let addrs: Vec<_> = hubs.iter().map(|h| h.address()).collect();
    groups
        .iter()
        .map(|g| {
            hubs.iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join(
                        *g,
                        r,
                        addrs.clone(),
                        Duration::from_secs(5),
                        Default::default(),
                    )
                    .unwrap()
                })
                .collect()
        })
        .collect()
}

async fn hubs(n: usize) -> Vec<TcpHub> {
    hubs_with(n, Guard::open()).await
}

/// `n` hubs on 127.0.0.1 admitting the peers `guard` admits.
async fn hubs_with(n: usize, guard: Guard) -> Vec<TcpHub> {
    let mut out = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        out.push(TcpHub::start(l, Duration::from_secs(5), guard.clone()).unwrap());
    }
    out
}

/// Ranks 0 and 1 of group `group` on the first two of `hs`.
fn pair(hs: &[TcpHub], group: u64) -> (TcpTransport, TcpTransport) {
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let join = |h: &TcpHub, rank| {
        h.join(
            group,
            rank,
            addrs.clone(),
            Duration::from_secs(1),
            Default::default(),
        )
        .unwrap()
    };
    (join(&hs[0], 0), join(&hs[1], 1))
}

/// A group frame's header (sender rank, group, tag, length) and payload, as the wire carries
/// them after a connection's preamble.
fn raw_frame(from: u32, group: u64, tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&from.to_le_bytes());
    f.extend_from_slice(&group.to_le_bytes());
    f.extend_from_slice(&tag.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn groups_sharing_hubs_keep_their_messages_apart() {
    let hs = hubs(3).await;
    let mut gs = hub_groups(&hs, &[7, 8]).await;
    let (b, a) = (gs.pop().unwrap(), gs.pop().unwrap());
    // Both groups use the same tags at the same time: each sees only its own.
    let (x, y) = tokio::join!(
        all_to_all_v_and_all_gather(a),
        point_to_point_keeps_order_per_tag(b)
    );
    let _ = (x, y);
    // A group joined twice on one hub is refused.
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let _g = hs[0]
        .join(
            9,
            0,
            addrs.clone(),
            Duration::from_secs(5),
            Default::default(),
        )
        .unwrap();
    assert!(
        hs[0]
            .join(9, 0, addrs, Duration::from_secs(5), Default::default())
            .is_err()
    );
}

#[tokio::test]
async fn frames_sent_before_a_peer_joins_wait_for_it() {
    let hs = hubs(2).await;
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let a = hs[0]
        .join(
            3,
            0,
            addrs.clone(),
            Duration::from_secs(5),
            Default::default(),
        )
        .unwrap();
    a.send(1, 5, Bytes::from_static(b"early")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = hs[1]
        .join(3, 1, addrs, Duration::from_secs(5), Default::default())
        .unwrap();
    assert_eq!(&b.recv(0, 5).await.unwrap()[..], b"early");
    // After the group is left, its rank can be joined again (a fresh mailbox).
    drop(b);
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let b = hs[1]
        .join(3, 1, addrs, Duration::from_secs(1), Default::default())
        .unwrap();
    assert!(matches!(
        b.recv(0, 5).await,
        Err(TransportError::Timeout { .. })
    ));
}

#[tokio::test]
async fn hubs_with_a_secret_admit_only_its_holders() {
    use tokio::io::AsyncWriteExt;
    let hs = hubs_with(
        2,
        Guard::secret(b"the cluster's data-plane secret, 32+ bytes"),
    )
    .await;
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let (a, b) = pair(&hs, 4);
    // A stranger writes a well-formed frame for rank 1 of group 4 (from "rank 0", tag 6):
    // it is refused before the frame is read, so nothing arrives.
    let mut s = tokio::net::TcpStream::connect(addrs[1]).await.unwrap();
    let mut frame = b"RBTG\x01\x00\x00\x00".to_vec();
    frame.extend(raw_frame(0, 4, 6, b"forged"));
    let _ = s.write_all(&frame).await;
    assert!(matches!(
        b.recv(0, 6).await,
        Err(TransportError::Timeout { .. })
    ));
    // A hub with another secret cannot reach the group either; holders of the secret can.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = TcpHub::start(l, Duration::from_secs(5), Guard::secret(&[9u8; 40])).unwrap();
    let mut o_addrs = addrs.clone();
    o_addrs[0] = other.address();
    let o = other
        .join(4, 0, o_addrs, Duration::from_secs(1), Default::default())
        .unwrap();
    assert!(o.send(1, 7, Bytes::from_static(b"x")).await.is_err());
    a.send(1, 8, Bytes::from_static(b"welcome")).await.unwrap();
    assert_eq!(&b.recv(0, 8).await.unwrap()[..], b"welcome");
}

#[tokio::test]
async fn a_peer_of_another_frame_version_is_refused_not_misread() {
    use tokio::io::AsyncWriteExt;
    let hs = hubs(2).await;
    let addrs: Vec<_> = hs.iter().map(|h| h.address()).collect();
    let (a, b) = pair(&hs, 5);
    // The previous layout: a bare 28-byte header (rank 0, group 5, tag 6, 2 bytes), no preamble.
    let mut s = tokio::net::TcpStream::connect(addrs[1]).await.unwrap();
    let _ = s.write_all(&raw_frame(0, 5, 6, b"hi")).await;
    assert!(matches!(
        b.recv(0, 6).await,
        Err(TransportError::Timeout { .. })
    ));
    a.send(1, 6, Bytes::from_static(b"ok")).await.unwrap();
    assert_eq!(&b.recv(0, 6).await.unwrap()[..], b"ok");
}
