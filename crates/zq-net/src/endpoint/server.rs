//! The accepting side: a server that admits only pinned peers (zq-recv serve), and the
//! pull-mode listener that waits for one receiver (zq-send serve), with address
//! validation under load and restart-stable connection IDs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;

use super::socket::{route_udp_payload, ETHERNET_UDP_PAYLOAD, MAX_UDP_PAYLOAD, MTU_SEARCH_CAP};
use super::tuning::Tuning;
use super::{provider, NetError, ALPN};
use crate::identity::{Fingerprint, Identity};
use crate::pin::PinnedClients;

use super::socket::size_buffers;

/// The receiver's endpoint on `listen`, admitting only senders whose key is in `allowed`.
pub fn server(
    identity: Identity,
    allowed: impl IntoIterator<Item = Fingerprint>,
    listen: SocketAddr,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, NetError> {
    let socket = std::net::UdpSocket::bind(listen).map_err(|source| NetError::Bind {
        addr: listen,
        source,
    })?;
    server_on(identity, allowed, socket, tuning)
}

/// The receiver's endpoint on a UDP socket bound by someone else: systemd socket
/// activation (`ListenDatagram=`), where the service needs no privilege to bind port 7446
/// and the socket outlives restarts. Its buffers are sized as [`server`]'s.
pub fn server_on(
    identity: Identity,
    allowed: impl IntoIterator<Item = Fingerprint>,
    socket: std::net::UdpSocket,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, NetError> {
    server_parts(identity, allowed, socket, tuning).map(|(endpoint, _)| endpoint)
}

/// [`server_on`]'s endpoint and the server configuration it uses (whose transport a
/// [`Listener`] adjusts per connection).
pub(super) fn server_parts(
    identity: Identity,
    allowed: impl IntoIterator<Item = Fingerprint>,
    socket: std::net::UdpSocket,
    tuning: &Tuning,
) -> Result<(quinn::Endpoint, quinn::ServerConfig), NetError> {
    let listen = socket.local_addr().map_err(|source| NetError::Bind {
        addr: (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        source,
    })?;
    size_buffers(&socket, tuning);
    let (reset_key, cid_key) = restart_keys(&identity.key);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(PinnedClients::new(allowed)))
        .with_single_cert(vec![identity.cert], identity.key)
        .map_err(|e| NetError::Config(format!("our identity: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Accept 0-RTT from resumed senders (QUIC allows only 0 or u32::MAX here). The server
    // answers only the Hello before the handshake completes; see `Receiver::serve`.
    tls.max_early_data_size = u32::MAX;
    // Sessions stay in memory (rustls accepts 0-RTT only from its session store, not from
    // stateless tickets, which also keeps 0-RTT single-use); room for a fleet of senders,
    // each holding two tickets.
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(8192);
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    // The receiver sends little but acknowledgements; its own packets stay Ethernet-sized.
    config.transport_config(Arc::new(tuning.transport(ETHERNET_UDP_PAYLOAD)?));
    let bind_err = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| NetError::Config("no async runtime for quinn".into()))?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Accept datagrams as large as senders' MTU discovery finds (quinn's default, 1472,
    // would cap every sender at Ethernet size). quinn sizes its receive buffer from this,
    // but only the bytes of datagrams actually received are ever touched.
    endpoint_config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| NetError::Config(format!("max UDP payload: {e}")))?;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = super::gso::endpoint(endpoint_config, Some(config.clone()), socket, runtime)
        .map_err(bind_err)?;
    Ok((endpoint, config))
}

/// The sender's endpoint in pull mode (`zq-send serve`): it listens and the receiver, whose
/// key is pinned, dials in (a backup server behind NAT or a firewall). The data still flow
/// from the sender, so each connection gets a transport whose MTU search reaches as far as
/// the route to that receiver allows, like [`Client`](super::Client)'s. A task accepts connections as they
/// come and completes their handshakes; [`Listener::next`] hands out the newest. A receiver
/// keeps one connection: when it dials again (it restarted, or its side timed out), the
/// connection handed out before is closed, so the sender moves to the new one at once
/// instead of waiting out the idle timeout.
#[derive(Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    ready: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<quinn::Connection>>,
    /// The connection last handed out.
    current: Arc<Mutex<Option<quinn::Connection>>>,
    local: SocketAddr,
}

impl Listener {
    /// Listens on `listen` for the receiver whose key is `peer`.
    pub fn bind(
        identity: Identity,
        peer: Fingerprint,
        listen: SocketAddr,
        tuning: &Tuning,
    ) -> Result<Self, NetError> {
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| NetError::Bind {
            addr: listen,
            source,
        })?;
        let local = socket.local_addr().map_err(|source| NetError::Bind {
            addr: listen,
            source,
        })?;
        let (endpoint, config) = server_parts(identity, [peer], socket, tuning)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let current = Arc::new(Mutex::new(None));
        tokio::spawn(accept_loop(
            endpoint.clone(),
            config,
            tuning.clone(),
            tx,
            current.clone(),
        ));
        Ok(Listener {
            endpoint,
            ready: tokio::sync::Mutex::new(rx),
            current,
            local,
        })
    }

    /// The address it listens on (the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The newest established connection from the receiver, waiting up to `wait` (forever
    /// with `None`) for one; older ones not taken yet are closed.
    pub async fn next(&self, wait: Option<Duration>) -> Option<quinn::Connection> {
        let mut ready = self.ready.lock().await;
        let first = match wait {
            Some(w) => tokio::time::timeout(w, ready.recv()).await.ok()??,
            None => ready.recv().await?,
        };
        let mut newest = first;
        while let Ok(newer) = ready.try_recv() {
            newest.close(VarInt::from_u32(0), b"superseded by a newer connection");
            newest = newer;
        }
        // One that died while waiting is of no use.
        if newest.close_reason().is_some() {
            return None;
        }
        if let Ok(mut current) = self.current.lock() {
            *current = Some(newest.clone());
        }
        Some(newest)
    }

    /// Closes the endpoint so the receiver learns of it at once.
    pub async fn shutdown(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(5), self.endpoint.wait_idle()).await;
    }
}

/// Lets an event through at most once per period; counts the others.
#[derive(Debug)]
pub(super) struct Throttle {
    period: Duration,
    /// When one last went through, and how many did not since.
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    fn new(period: Duration) -> Self {
        Throttle {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(events held back since the last one let through)` if this one may go.
    fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                let held = state.1;
                *state = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// Accepts the receiver's connections for a [`Listener`] until the endpoint closes.
pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    config: quinn::ServerConfig,
    tuning: Tuning,
    ready: tokio::sync::mpsc::Sender<quinn::Connection>,
    current: Arc<Mutex<Option<quinn::Connection>>>,
) {
    // The port is open to anyone: a scanner's failed handshakes are logged at most every
    // 10 s, with how many went unlogged.
    let refused = Arc::new(Throttle::new(Duration::from_secs(10)));
    let admission = crate::Admission::new(tuning.address_validation);
    while let Some(incoming) = endpoint.accept().await {
        let Some((incoming, handshaking)) = admission.admit(incoming) else {
            continue;
        };
        let remote = incoming.remote_address();
        let mtu_bound = route_udp_payload(remote)
            .unwrap_or(ETHERNET_UDP_PAYLOAD)
            .min(MTU_SEARCH_CAP);
        let mut config = config.clone();
        match tuning.transport(mtu_bound) {
            Ok(t) => {
                config.transport_config(Arc::new(t));
            }
            Err(e) => tracing::warn!(error = %e, "keeping the default transport"),
        }
        let connecting = match incoming.accept_with(Arc::new(config)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "cannot accept connection");
                continue;
            }
        };
        let ready = ready.clone();
        let current = current.clone();
        let refused = refused.clone();
        let timeout = tuning.connect_timeout;
        tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, connecting).await;
            drop(handshaking);
            match result {
                Ok(Ok(conn)) => {
                    tracing::info!(%remote, "the receiver connected");
                    let old = current.lock().ok().and_then(|mut c| c.take());
                    if let Some(old) = old {
                        old.close(VarInt::from_u32(0), b"the receiver connected again");
                    }
                    let _ = ready.send(conn).await;
                }
                Ok(Err(e)) => {
                    if let Some(unlogged) = refused.allow() {
                        tracing::warn!(%remote, error = %e, unlogged, "connection refused or failed during handshake (not the pinned receiver's key?)")
                    }
                }
                Err(_) => {
                    if let Some(unlogged) = refused.allow() {
                        tracing::warn!(%remote, unlogged, "handshake did not complete within {timeout:?}")
                    }
                }
            }
        });
    }
}

/// Keys that survive a restart, derived from the receiver's private key: the stateless-reset
/// key and the key that signs connection IDs. With both, a restarted receiver recognizes
/// its predecessor's connection IDs and answers their packets with a valid stateless reset,
/// so senders reconnect at once instead of waiting out the idle timeout. (quinn's defaults
/// are random per endpoint, and it drops packets whose CID it did not sign.)
pub(super) fn restart_keys(key: &rustls_pki_types::PrivateKeyDer<'_>) -> (ring::hmac::Key, u64) {
    use sha2::Digest;
    let derive = |label: &[u8]| {
        let mut h = sha2::Sha256::new();
        h.update(label);
        h.update(key.secret_der());
        h.finalize()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(b"zq stateless reset v1\0"));
    let cid = derive(b"zq connection id v1\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid[..8]);
    (reset, u64::from_le_bytes(cid_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_millis(50));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.allow(), Some(2));
    }
}
