//! Key pinning over real QUIC on loopback, both directions, without ZFS.

use std::net::SocketAddr;

use zq_net::{closed_by_tls_alert, peer_fingerprint, server, Client, Identity, NetError, Tuning};

fn identity(dir: &tempfile::TempDir, role: &str) -> Identity {
    Identity::generate(dir.path(), role).unwrap();
    Identity::load(dir.path(), role).unwrap()
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn pinned_peers_connect_and_see_each_others_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (recv_id, send_id) = (identity(&dir, "zq-recv"), identity(&dir, "zq-send"));
    let (recv_fp, send_fp) = (recv_id.fingerprint, send_id.fingerprint);
    let endpoint = server(recv_id, [send_fp], loopback(), &Tuning::default()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        peer_fingerprint(&conn)
    });
    let client = Client::new(send_id, recv_fp, addr, &Tuning::default()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    assert_eq!(peer_fingerprint(&conn), Some(recv_fp));
    assert_eq!(accept.await.unwrap(), Some(send_fp));
}

#[tokio::test]
async fn sender_refuses_a_receiver_with_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let (recv_id, send_id) = (identity(&dir, "zq-recv"), identity(&dir, "zq-send"));
    let other = tempfile::tempdir().unwrap();
    let expected = Identity::generate(other.path(), "zq-recv").unwrap();
    let real = recv_id.fingerprint;
    let endpoint = server(
        recv_id,
        [send_id.fingerprint],
        loopback(),
        &Tuning::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        if let Some(incoming) = endpoint.accept().await {
            let _ = incoming.await;
        }
    });
    let client = Client::new(send_id, expected, addr, &Tuning::default()).unwrap();
    match client.connect(addr).await {
        Err(NetError::WrongPeerKey {
            expected: e, got, ..
        }) => {
            assert_eq!(e, expected);
            assert_eq!(got, real);
        }
        other => panic!("expected WrongPeerKey, got {other:?}"),
    }
}

#[tokio::test]
async fn receiver_refuses_an_unknown_sender_key() {
    let dir = tempfile::tempdir().unwrap();
    let (recv_id, send_id) = (identity(&dir, "zq-recv"), identity(&dir, "zq-send"));
    let other = tempfile::tempdir().unwrap();
    let allowed = Identity::generate(other.path(), "zq-send").unwrap();
    let recv_fp = recv_id.fingerprint;
    let endpoint = server(recv_id, [allowed], loopback(), &Tuning::default()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accept = tokio::spawn(async move { endpoint.accept().await.unwrap().await.is_ok() });
    let client = Client::new(send_id, recv_fp, addr, &Tuning::default()).unwrap();
    // With TLS 1.3 the client may finish its side before the server checks its certificate;
    // either the connect fails, or the connection is closed with a TLS alert right after.
    if let Ok(conn) = client.connect(addr).await {
        let _ = conn.open_bi().await.map(|(mut s, _)| s.finish());
        let _ = conn.closed().await;
        assert!(closed_by_tls_alert(&conn), "{:?}", conn.close_reason());
    }
    assert!(
        !accept.await.unwrap(),
        "the receiver must not accept the connection"
    );
}

#[tokio::test]
async fn nobody_listening_times_out_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let send_id = identity(&dir, "zq-send");
    let fp = send_id.fingerprint;
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let tuning = Tuning {
        connect_timeout: std::time::Duration::from_millis(300),
        ..Tuning::default()
    };
    let client = Client::new(send_id, fp, addr, &tuning).unwrap();
    let e = client.connect(addr).await.unwrap_err();
    assert!(matches!(e, NetError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("is zq-recv running"), "{e}");
}
