//! The sender's side: one endpoint per receiver, its key pinned, and connections opened
//! in 0-RTT when a TLS session can be resumed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::VarInt;

use super::socket::{route_udp_payload, ETHERNET_UDP_PAYLOAD, MTU_SEARCH_CAP};
use super::tuning::Tuning;
use super::{provider, NetError, ALPN, SERVER_NAME};
use crate::identity::{Fingerprint, Identity};
use crate::pin::PinnedServer;

use super::socket::bind_udp;

/// The sender's side: connects to one receiver whose key is pinned.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    /// TLS and transport settings; each connection gets its own MTU search bound.
    config: quinn::ClientConfig,
    tuning: Tuning,
    peer: Fingerprint,
    seen: Arc<Mutex<Option<Fingerprint>>>,
    connect_timeout: Duration,
}

impl Client {
    /// A client endpoint for a receiver at an address of `family_of`'s family.
    pub fn new(
        identity: Identity,
        peer: Fingerprint,
        family_of: SocketAddr,
        tuning: &Tuning,
    ) -> Result<Self, NetError> {
        let seen = Arc::new(Mutex::new(None));
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer::new(peer, seen.clone())))
            .with_client_auth_cert(vec![identity.cert], identity.key)
            .map_err(|e| NetError::Config(format!("our identity: {e}")))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Resumed connections send the (replay-safe) Hello in 0-RTT: a reconnect then costs
        // one round trip. See `Client::dial`.
        tls.enable_early_data = true;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Config(e.to_string()))?;
        let config = quinn::ClientConfig::new(Arc::new(quic));
        // Checked here so that connecting later cannot fail on it.
        tuning.transport(ETHERNET_UDP_PAYLOAD)?;
        let bind = if family_of.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let socket = bind_udp(bind, tuning)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| NetError::Config("no async runtime for quinn".into()))?;
        let endpoint =
            super::gso::endpoint(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(|source| NetError::Bind { addr: bind, source })?;
        Ok(Client {
            endpoint,
            config,
            tuning: tuning.clone(),
            peer,
            seen,
            connect_timeout: tuning.connect_timeout,
        })
    }

    /// Opens a connection to `addr` and checks the receiver's key.
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection, NetError> {
        let connecting = self.start(addr)?;
        self.finish(addr, connecting).await
    }

    /// Opens a connection to `addr` and returns as soon as data can be sent: at once, in
    /// 0-RTT, when a TLS session with this receiver can be resumed; otherwise after the
    /// handshake, like [`Client::connect`]. Only replay-safe requests may be sent before
    /// [`Dialed::established`] returns.
    pub async fn dial(&self, addr: SocketAddr) -> Result<Dialed, NetError> {
        match self.start(addr)?.into_0rtt() {
            Ok((conn, accepted)) => Ok(Dialed {
                conn,
                early: Some(Early {
                    accepted,
                    check: self.check(addr),
                    timeout: self.connect_timeout,
                }),
            }),
            Err(connecting) => Ok(Dialed {
                conn: self.finish(addr, connecting).await?,
                early: None,
            }),
        }
    }

    fn check(&self, addr: SocketAddr) -> PeerCheck {
        PeerCheck {
            addr,
            peer: self.peer,
            seen: self.seen.clone(),
        }
    }

    fn start(&self, addr: SocketAddr) -> Result<quinn::Connecting, NetError> {
        let mtu_bound = route_udp_payload(addr)
            .unwrap_or(ETHERNET_UDP_PAYLOAD)
            .min(MTU_SEARCH_CAP);
        tracing::debug!(%addr, mtu_bound, "path MTU discovery searches up to this UDP payload");
        let mut config = self.config.clone();
        config.transport_config(Arc::new(self.tuning.transport(mtu_bound)?));
        self.endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| NetError::Config(format!("connect to {addr}: {e}")))
    }

    async fn finish(
        &self,
        addr: SocketAddr,
        connecting: quinn::Connecting,
    ) -> Result<quinn::Connection, NetError> {
        let check = self.check(addr);
        tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| check.timeout(self.connect_timeout))?
            .map_err(|source| check.failed(source))
    }

    /// Closes the endpoint so the receiver learns of it at once.
    ///
    /// CONNECTION_CLOSE goes out as soon as the endpoint driver runs after `close`; a few
    /// milliseconds let it do so. Waiting for `wait_idle` to finish would sit out the whole
    /// draining period (3 PTO, about 80 ms even on loopback), which only absorbs late
    /// packets and is of no use to a process about to exit.
    pub async fn shutdown(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(5), self.endpoint.wait_idle()).await;
    }
}

/// What turns a failed handshake into the error the user needs: was it the pinned key?
#[derive(Debug)]
pub(super) struct PeerCheck {
    addr: SocketAddr,
    peer: Fingerprint,
    seen: Arc<Mutex<Option<Fingerprint>>>,
}

impl PeerCheck {
    fn failed(&self, source: quinn::ConnectionError) -> NetError {
        let seen = self.seen.lock().ok().and_then(|s| *s);
        match seen {
            Some(got) if got != self.peer => NetError::WrongPeerKey {
                addr: self.addr,
                expected: self.peer,
                got,
            },
            _ => NetError::Connection {
                addr: self.addr,
                source,
            },
        }
    }

    fn timeout(&self, after: Duration) -> NetError {
        NetError::Timeout {
            addr: self.addr,
            secs: after.as_secs(),
        }
    }
}

pub(super) struct Early {
    accepted: quinn::ZeroRttAccepted,
    check: PeerCheck,
    timeout: Duration,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Early")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

/// A connection from [`Client::dial`], possibly still completing its handshake.
#[derive(Debug)]
pub struct Dialed {
    /// The connection. Until [`Dialed::established`] returns, what is sent on it travels
    /// as 0-RTT data, which an attacker can replay to the receiver.
    pub conn: quinn::Connection,
    early: Option<Early>,
}

impl From<quinn::Connection> for Dialed {
    /// An established connection.
    fn from(conn: quinn::Connection) -> Self {
        Dialed { conn, early: None }
    }
}

impl Dialed {
    /// Whether the handshake may still be running (data sent now is 0-RTT).
    pub fn is_early(&self) -> bool {
        self.early.is_some()
    }

    /// Waits until the handshake is complete; from then on, everything sent is protected
    /// against replay. Returns whether the receiver accepted the 0-RTT data: if not, it
    /// never saw what was sent early (its streams fail with `ZeroRttRejected`), and the
    /// caller must send it again.
    pub async fn established(&mut self) -> Result<bool, NetError> {
        let Some(early) = self.early.take() else {
            return Ok(true);
        };
        let accepted = tokio::time::timeout(early.timeout, early.accepted)
            .await
            .map_err(|_| early.check.timeout(early.timeout))?;
        match self.conn.close_reason() {
            Some(source) => Err(early.check.failed(source)),
            None => Ok(accepted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::server;

    /// A reconnect resumes the TLS session: the sender does not verify the receiver's
    /// certificate again (its pin check is not called), and the receiver still knows which
    /// sender it is talking to.
    #[tokio::test]
    async fn a_reconnect_resumes_the_tls_session() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate(dir.path(), "zq-recv").unwrap();
        Identity::generate(dir.path(), "zq-send").unwrap();
        let recv_id = Identity::load(dir.path(), "zq-recv").unwrap();
        let send_id = Identity::load(dir.path(), "zq-send").unwrap();
        let (recv_fp, send_fp) = (recv_id.fingerprint, send_id.fingerprint);
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let endpoint = server(recv_id, [send_fp], listen, &Tuning::default()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut peers = Vec::new();
            for _ in 0..2 {
                let conn = endpoint.accept().await.unwrap().await.unwrap();
                peers.push(crate::peer_fingerprint(&conn));
                // Answer one stream, so the client has read the session tickets.
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let _ = recv.read_to_end(16).await.unwrap();
                send.write_all(b"ok").await.unwrap();
                send.finish().unwrap();
                let _ = conn.closed().await;
            }
            peers
        });
        let client = Client::new(send_id, recv_fp, addr, &Tuning::default()).unwrap();
        for round in 0..2 {
            *client.seen.lock().unwrap() = None;
            let conn = client.connect(addr).await.unwrap();
            let verified = *client.seen.lock().unwrap();
            if round == 0 {
                assert_eq!(
                    verified,
                    Some(recv_fp),
                    "the first handshake checks the pin"
                );
            } else {
                assert_eq!(verified, None, "the second handshake was not resumed");
            }
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"hi").await.unwrap();
            send.finish().unwrap();
            assert_eq!(recv.read_to_end(16).await.unwrap(), b"ok");
            conn.close(VarInt::from_u32(0), b"done");
        }
        assert_eq!(accept.await.unwrap(), [Some(send_fp), Some(send_fp)]);
    }
}
