//! The receiver's refusals over real QUIC on loopback, without ZFS: its `zfs` program does
//! not exist, so every refusal below also proves that no `zfs` command was attempted.

mod common;

use std::net::SocketAddr;

use common::{pair, Pair};
use zq_net::{Client, FramedRecv, FramedSend};
use zq_proto::{
    Capabilities, ErrorKind, ForceAction, Message, RefusalReason, SnapRef, StepHeader, Verdict,
};
use zq_repl::{Policy, Receiver};
use zq_store::{DatasetName, Zfs};

struct Setup {
    _dir: tempfile::TempDir,
    client: Client,
    addr: SocketAddr,
}

/// A receiver allowing one sender into `backup/a`, and a client with that sender's key.
async fn setup() -> Setup {
    let p = pair();
    let mut policy = Policy::default();
    policy
        .allow(p.send_fp, DatasetName::parse("backup/a").unwrap())
        .unwrap();
    let addr = p.endpoint.local_addr().unwrap();
    let zfs = Zfs::with_capabilities("/nonexistent/zfs", Default::default());
    let receiver = Receiver::new(zfs, policy, Capabilities::current("test-recv"));
    tokio::spawn(receiver.serve(p.endpoint, zq_net::Admission::default()));
    Setup {
        _dir: p.dir,
        client: p.client,
        addr,
    }
}

/// Sends `first` on a new stream and returns the receiver's answer.
async fn exchange(conn: &quinn::Connection, first: &Message) -> Message {
    let (s, r) = conn.open_bi().await.unwrap();
    let (mut s, mut r) = (FramedSend::new(s), FramedRecv::new(r));
    s.send(first).await.unwrap();
    let _ = s.finish();
    r.message("answer").await.unwrap()
}

async fn handshaken(setup: &Setup) -> quinn::Connection {
    let conn = setup.client.connect(setup.addr).await.unwrap();
    let hello = Capabilities::current("test-send").hello();
    assert!(matches!(
        exchange(&conn, &Message::Hello(hello)).await,
        Message::Welcome(_)
    ));
    conn
}

fn header(target: &str) -> Message {
    Message::StepHeader(StepHeader {
        source: "tank/x".into(),
        target: target.into(),
        from: None,
        to: SnapRef {
            name: "s1".into(),
            guid: 7,
        },
        intermediates: false,
        force: ForceAction::None,
        compression: "none".into(),
    })
}

#[tokio::test]
async fn unknown_protocol_version_is_refused_with_both_ranges() {
    let setup = setup().await;
    let conn = setup.client.connect(setup.addr).await.unwrap();
    let mut hello = Capabilities::current("test-send").hello();
    hello.min_version = 50;
    hello.max_version = 60;
    match exchange(&conn, &Message::Hello(hello)).await {
        Message::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::VersionMismatch);
            assert!(r.message.contains("50..=60"), "{}", r.message);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The receiver then closes the connection.
    conn.closed().await;
}

#[tokio::test]
async fn a_request_before_the_handshake_is_refused() {
    let setup = setup().await;
    let conn = setup.client.connect(setup.addr).await.unwrap();
    match exchange(&conn, &header("backup/a/x")).await {
        Message::Refused(r) => assert_eq!(r.reason, RefusalReason::BadHello),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn targets_outside_the_root_are_refused_before_any_zfs_command() {
    let setup = setup().await;
    let conn = handshaken(&setup).await;
    for (target, kind) in [
        ("backup/b/x", ErrorKind::NotAuthorized),
        ("backup", ErrorKind::NotAuthorized),
        ("backup/ab", ErrorKind::NotAuthorized),
        ("other/a", ErrorKind::NotAuthorized),
        ("backup/a/../b", ErrorKind::InvalidName),
        ("/backup/a/x", ErrorKind::InvalidName),
        ("-o", ErrorKind::InvalidName),
        ("backup/a/x y", ErrorKind::InvalidName),
        ("backup/a/x;reboot", ErrorKind::InvalidName),
        ("backup/a/$(id)", ErrorKind::InvalidName),
    ] {
        match exchange(&conn, &header(target)).await {
            Message::Verdict(Verdict::Failed(e)) => assert_eq!(e.kind, kind, "{target}: {e}"),
            other => panic!("{target}: expected a failed verdict, got {other:?}"),
        }
    }
    // Listing outside the root is refused the same way.
    let list = Message::ListRequest(zq_proto::ListRequest {
        roots: vec![zq_proto::ListRoot {
            dataset: "backup/b".into(),
            recursive: true,
        }],
    });
    match exchange(&conn, &list).await {
        Message::Error(e) => assert_eq!(e.kind, ErrorKind::NotAuthorized),
        other => panic!("expected Error, got {other:?}"),
    }
}

/// A version 3 step start is checked before anything runs: the hold tag a sender may ask
/// for is only its own `zq_<job>_last`, and a resume needs a session that agreed on
/// spooling (this receiver spools nothing).
#[tokio::test]
async fn a_step_start_with_a_foreign_hold_tag_or_an_unagreed_resume_is_refused() {
    let setup = setup().await;
    let conn = handshaken(&setup).await;
    let Message::StepHeader(h) = header("backup/a/x") else {
        unreachable!()
    };
    let start = |last_tag: &str, resume| {
        Message::StepStart(zq_proto::StepStart {
            header: h.clone(),
            last_tag: last_tag.into(),
            hold_last: true,
            resume,
        })
    };
    let at = zq_proto::ResumeAt {
        offset: 1 << 20,
        prefix_hash: [0; 32],
    };
    for (msg, kind, why) in [
        (
            start("keep", None),
            ErrorKind::InvalidName,
            "not a zq hold tag",
        ),
        (
            start("zq_a b_last", None),
            ErrorKind::InvalidName,
            "not a zq hold tag",
        ),
        (
            start("zq_j_last", Some(at)),
            ErrorKind::Protocol,
            "did not agree on spooling",
        ),
    ] {
        match exchange(&conn, &msg).await {
            Message::Verdict(Verdict::Failed(e)) => {
                assert_eq!(e.kind, kind, "{e}");
                assert!(e.message.contains(why), "{e}");
            }
            other => panic!("expected a failed verdict, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_header_naming_an_invalid_snapshot_is_refused() {
    let setup = setup().await;
    let conn = handshaken(&setup).await;
    let mut h = header("backup/a/x");
    if let Message::StepHeader(h) = &mut h {
        h.to.name = "s1;rm".into();
    }
    match exchange(&conn, &h).await {
        Message::Verdict(Verdict::Failed(e)) => assert_eq!(e.kind, ErrorKind::InvalidName),
        other => panic!("expected a failed verdict, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_must_start_with_a_request() {
    let setup = setup().await;
    let conn = handshaken(&setup).await;
    let end = Message::StepEnd(zq_proto::StepEnd {
        total_len: 0,
        hash: [0; 32],
    });
    match exchange(&conn, &end).await {
        Message::Error(e) => assert_eq!(e.kind, ErrorKind::Protocol, "{e}"),
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_frame_is_refused_without_allocating_it() {
    let setup = setup().await;
    let conn = handshaken(&setup).await;
    let (mut s, r) = conn.open_bi().await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let _ = s.finish();
    match FramedRecv::new(r).message("answer").await.unwrap() {
        Message::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Protocol);
            assert!(e.message.contains("exceeds the maximum"), "{}", e.message);
        }
        other => panic!("expected Error, got {other:?}"),
    }
    // The connection survives a bad stream: the next request is still answered.
    assert!(matches!(
        exchange(&conn, &header("other/x")).await,
        Message::Verdict(Verdict::Failed(_))
    ));
}

/// A UDP relay on loopback that delays every datagram by `one_way`, for one client.
async fn delay_relay(server: SocketAddr, one_way: std::time::Duration) -> SocketAddr {
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, c) = (front.clone(), back.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            let (b, packet) = (b.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(one_way).await;
                let _ = b.send(&packet).await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap() else {
                continue;
            };
            let (f, packet) = (front.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(one_way).await;
                let _ = f.send_to(&packet, to).await;
            });
        }
    });
    addr
}

/// The first connection costs two round trips before the first step can go (QUIC+TLS,
/// then Hello/Welcome); a reconnect resumes the TLS session, sends the Hello in 0-RTT and
/// costs one. Timed across a relay adding 100 ms of round trip, so the margins are wide.
#[tokio::test]
async fn a_reconnect_costs_one_round_trip() {
    let rtt = std::time::Duration::from_millis(100);
    let setup = setup().await;
    let relay = delay_relay(setup.addr, rtt / 2).await;
    let caps = Capabilities::current("test-send");
    let zfs = || Zfs::with_capabilities("/nonexistent/zfs", Default::default());
    for round in 0..3 {
        let start = std::time::Instant::now();
        let dialed = setup.client.dial(relay).await.unwrap();
        assert_eq!(dialed.is_early(), round > 0, "round {round}");
        let sender = zq_repl::Sender::handshake(dialed, zfs(), &caps, Default::default())
            .await
            .unwrap();
        let took = start.elapsed();
        if round == 0 {
            assert!(took >= 2 * rtt, "first connection took {took:?}");
        } else {
            assert!(took >= rtt && took < rtt * 3 / 2, "reconnect took {took:?}");
        }
        // A request after the handshake is served (here: reaches `zfs`, which does not
        // exist), and meanwhile the session tickets arrive.
        let listed = sender
            .list_remote(&DatasetName::parse("backup/a/x").unwrap(), false)
            .await;
        assert!(
            matches!(&listed, Err(zq_repl::ReplError::Remote(e)) if e.kind == ErrorKind::Zfs),
            "{listed:?}"
        );
        drop(sender);
    }
}

/// A receiver that completes the TLS handshake but never answers the Hello (keeping the
/// connection alive) does not hang the sender: the handshake fails after 10 s, saying why.
#[tokio::test]
async fn a_receiver_that_never_answers_the_hello_is_given_up_on() {
    let Pair {
        dir: _dir,
        endpoint,
        client,
        ..
    } = pair();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(conn) = incoming.await {
                held.push(conn);
            }
        }
    });
    let dialed = client.dial(addr).await.unwrap();
    let start = std::time::Instant::now();
    let zfs = Zfs::with_capabilities("/nonexistent/zfs", Default::default());
    let err = zq_repl::Sender::handshake(
        dialed,
        zfs,
        &Capabilities::current("test-send"),
        Default::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no Welcome within 10s"), "{err}");
    assert!(start.elapsed() >= std::time::Duration::from_secs(9));
}
