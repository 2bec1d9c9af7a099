//! QUIC endpoints: a client that pins the receiver's key and a server that admits only
//! pinned senders, both TLS 1.3 over quinn with keep-alive so one connection lives through
//! idle periods and is reused for every dataset and step.
//!
//! - [`tuning`]: windows, congestion control and buffers from a path's BDP;
//! - [`socket`]: the UDP socket, its buffers and the route's datagram size;
//! - [`gso`]: quinn's socket, with GSO batches under the kernel's 64 KiB;
//! - [`client`]: the sender's side, dialing a pinned receiver;
//! - [`server`](mod@server): servers and the pull-mode listener, admitting pinned peers.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::identity::Fingerprint;

pub mod client;
pub mod gso;
pub mod server;
pub mod socket;
pub mod tuning;

pub use client::{Client, Dialed};
pub use server::{server, server_on, Listener};
pub use socket::{
    route_udp_payload, udp_payload_for_mtu, SocketBuffers, ETHERNET_UDP_PAYLOAD, MAX_UDP_PAYLOAD,
    MTU_SEARCH_CAP,
};
pub use tuning::{Congestion, Tuning, DEFAULT_BDP, DEFAULT_UDP_BUFFER};

/// ALPN of protocol family 1; the in-band handshake negotiates the exact version.
pub const ALPN: &[u8] = b"zq/1";

/// Name sent as SNI. Certificates are pinned by key, so it carries no meaning.
const SERVER_NAME: &str = "zq";

/// A transport-level failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Binding or configuring the UDP socket failed.
    #[error("cannot use UDP socket {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS or QUIC configuration was rejected (a bug or an unusable key).
    #[error("invalid TLS/QUIC configuration: {0}")]
    Config(String),
    /// The address could not be resolved.
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    /// The receiver presented a key other than the pinned one.
    #[error(
        "receiver at {addr} presented key {got}, but --peer pins {expected}: refusing to connect"
    )]
    WrongPeerKey {
        /// Where.
        addr: SocketAddr,
        /// `--peer`.
        expected: Fingerprint,
        /// What it presented.
        got: Fingerprint,
    },
    /// No answer within the connect timeout.
    #[error("no answer from {addr} within {secs} s (is zq-recv running there, and is UDP port {} reachable?)", addr.port())]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The timeout.
        secs: u64,
    },
    /// The connection could not be established or was lost.
    #[error("connection to {addr} failed")]
    Connection {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectionError,
    },
}

impl NetError {
    /// Whether retrying later can help (network trouble) or not (keys, configuration).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            NetError::Connection { .. } | NetError::Resolve(..) | NetError::Timeout { .. }
        )
    }
}

/// Resolves `host:port` (names, IPv4, `[IPv6]:port`) to the first address.
pub async fn resolve(target: &str) -> Result<SocketAddr, NetError> {
    tokio::net::lookup_host(target)
        .await
        .map_err(|e| NetError::Resolve(target.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| NetError::Resolve(target.to_string(), "no address".into()))
}

/// True if `conn` was closed by the peer during or right after the TLS handshake with a
/// TLS alert: for a zq sender, the receiver refused our key.
pub fn closed_by_tls_alert(conn: &quinn::Connection) -> bool {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ConnectionClosed(c)) => {
            // QUIC carries TLS alerts as CRYPTO_ERROR codes 0x0100..=0x01ff.
            (0x100..0x200).contains(&u64::from(c.error_code))
        }
        _ => false,
    }
}

/// The fingerprint of the key the peer authenticated with.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_certificate(certs.first()?).ok()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
