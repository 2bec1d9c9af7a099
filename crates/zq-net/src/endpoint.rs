//! QUIC endpoints: a client that pins the receiver's key and a server that admits only
//! pinned senders, both TLS 1.3 over quinn with keep-alive so one connection lives through
//! idle periods and is reused for every dataset and step.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;

use crate::identity::{Fingerprint, Identity};
use crate::pin::{PinnedClients, PinnedServer};

/// ALPN of protocol family 1; the in-band handshake negotiates the exact version.
pub const ALPN: &[u8] = b"zq/1";

/// Name sent as SNI. Certificates are pinned by key, so it carries no meaning.
const SERVER_NAME: &str = "zq";

/// Congestion controller of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438): loss-based, fair to TCP on shared links. The default.
    #[default]
    Cubic,
    /// BBR: model-based, keeps long lossy paths full where CUBIC backs off on every loss
    /// (quinn marks its BBR experimental).
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!("{s:?}: expected cubic or bbr")),
        }
    }
}

/// Default bandwidth-delay product the windows are sized for: 1 Gbit/s at 100 ms, or
/// 10 Gbit/s at 10 ms.
pub const DEFAULT_BDP: u64 = 12_500_000;

/// UDP socket buffers asked for by default (each direction).
pub const DEFAULT_UDP_BUFFER: usize = 32 * 1024 * 1024;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Per-stream receive window (bytes): what one step may have in flight, and what the
    /// receiver buffers at most for a step whose `zfs receive` does not keep up.
    pub stream_window: u32,
    /// Per-connection receive window (bytes): all steps together.
    pub connection_window: u32,
    /// Unacknowledged bytes the sender keeps in flight (and in memory) per connection.
    pub send_window: u64,
    /// Congestion controller.
    pub congestion: Congestion,
    /// UDP socket send and receive buffers to ask the kernel for.
    pub udp_buffer: usize,
    /// How often an idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// How long without any packet before a connection is considered dead.
    pub idle_timeout: Duration,
    /// How long to wait for a receiver to answer a new connection.
    pub connect_timeout: Duration,
    /// Servers: when a new client must first prove its address ([`crate::admission`]).
    pub address_validation: crate::AddressValidation,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::for_bdp(DEFAULT_BDP)
    }
}

impl Tuning {
    /// Windows sized for a path whose bandwidth-delay product is `bdp` bytes (e.g. 1 Gbit/s
    /// at 50 ms is 6.25 MB). One step may fill the path twice over (a window must cover
    /// the BDP plus the time an acknowledgement and window update take to come back, and
    /// loss recovery), the connection four times, so that two bulk steps and the small
    /// ones beside them never wait for a window update. Never below 16 MiB per stream and
    /// 64 MiB per connection, which cost nothing where the path is shorter: a window is a
    /// limit, not an allocation.
    pub fn for_bdp(bdp: u64) -> Self {
        const MIB: u64 = 1024 * 1024;
        // QUIC windows are varints; u32 keeps them (and the memory bound) sane.
        let cap = |v: u64| u32::try_from(v.min(u64::from(u32::MAX / 2))).unwrap_or(u32::MAX / 2);
        let stream_window = cap(bdp.saturating_mul(2).max(16 * MIB));
        let connection_window = cap(bdp.saturating_mul(4).max(64 * MIB));
        Tuning {
            stream_window,
            connection_window,
            send_window: u64::from(connection_window),
            congestion: Congestion::default(),
            udp_buffer: DEFAULT_UDP_BUFFER,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            address_validation: crate::AddressValidation::Auto,
        }
    }

    /// The settings of each of `connections` parallel connections to one receiver (`zq-send
    /// --connections`): they share the send window, 1/N each (at least 4 MiB), so that
    /// together they keep no more in flight than one connection would. Measured on an
    /// emulated 1 Gbit/s, 50 ms link with a one-BDP tail-drop queue: 4 connections with the
    /// whole window each overshot it in slow start and moved 821-842 Mbit/s, one
    /// connection 906, 4 sharing it 915-918 (docs/benchmarks.md).
    pub fn shared_by(mut self, connections: u8) -> Self {
        const FLOOR: u64 = 4 * 1024 * 1024;
        if connections > 1 {
            self.send_window = (self.send_window / u64::from(connections)).max(FLOOR);
        }
        self
    }

    /// Transport settings of a connection whose path MTU discovery searches up to UDP
    /// payloads of `mtu_upper_bound` bytes.
    fn transport(&self, mtu_upper_bound: u16) -> Result<TransportConfig, NetError> {
        let mut t = TransportConfig::default();
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(mtu_upper_bound);
        t.stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(self.idle_timeout.try_into().map_err(|_| {
                NetError::Config(format!("idle timeout {:?} too large", self.idle_timeout))
            })?))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            // Bulk throughput depends on both: path MTU discovery (packets as large as the
            // path carries instead of 1200 bytes: most of the CPU cost is per packet) and
            // GSO/GRO (one syscall per batch of packets).
            .mtu_discovery_config(Some(mtud))
            .enable_segmentation_offload(true);
        match self.congestion {
            Congestion::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        Ok(t)
    }
}

/// Largest UDP payload QUIC allows (RFC 9000, `max_udp_payload_size`).
pub const MAX_UDP_PAYLOAD: u16 = 65527;

/// Where quinn's MTU discovery stops when the route's MTU is unknown: a 1500-byte Ethernet
/// frame less the IPv6 and UDP headers (quinn's default).
pub const ETHERNET_UDP_PAYLOAD: u16 = 1452;

/// Largest UDP payload zq's MTU discovery searches for, whatever the route allows. Above
/// it the gain reverses: on loopback (`zq-bench throughput`, 1 GiB, 2 cores) 1452-byte
/// payloads moved ~420 MB/s, 8952 ~810, 16384 ~840, but 65507 ~430, with the receiver
/// 30% idle and faulting in pages for 64 KiB buffers. 16384 covers jumbo-frame LANs.
pub const MTU_SEARCH_CAP: u16 = 16384;

/// The largest UDP payload the local route to `peer` can carry without fragmentation: the
/// kernel's MTU for that route (the outgoing interface's, or a smaller path MTU it has
/// learnt) less the IP and UDP headers. `None` where the kernel does not say.
///
/// zq searches up to this (at most [`MTU_SEARCH_CAP`]) instead of quinn's fixed 1452 bytes:
/// on loopback (MTU 65536) or a jumbo-frame LAN (9000) each packet then carries 6 to 11
/// times the data, and most of QUIC's CPU cost (encryption setup, acknowledgements,
/// pacing, syscalls) is per packet. The discovery itself (RFC 8899 probes, black-hole
/// detection) still finds what the whole path carries; this only bounds the search.
pub fn route_udp_payload(peer: SocketAddr) -> Option<u16> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    // connect() on UDP sends nothing: it only picks the route.
    let probe = std::net::UdpSocket::bind(bind).ok()?;
    probe.connect(peer).ok()?;
    let mtu = route_mtu(&probe, peer.is_ipv6())?;
    udp_payload_for_mtu(mtu, peer.is_ipv6())
}

/// The UDP payload an IP packet of `mtu` bytes carries (IPv4 20 + UDP 8, IPv6 40 + UDP 8
/// bytes of headers), at most [`MAX_UDP_PAYLOAD`]; `None` below QUIC's 1200-byte minimum.
pub fn udp_payload_for_mtu(mtu: u32, ipv6: bool) -> Option<u16> {
    let headers = if ipv6 { 48 } else { 28 };
    let payload = mtu.checked_sub(headers)?.min(u32::from(MAX_UDP_PAYLOAD));
    let payload = u16::try_from(payload).ok()?;
    (payload >= 1200).then_some(payload)
}

#[cfg(target_os = "linux")]
fn route_mtu(socket: &std::net::UdpSocket, ipv6: bool) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let (level, opt) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is a live, connected socket owned by `socket`; v and len are valid
    // for writes of their sizes.
    let ok = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    } == 0;
    ok.then(|| u32::try_from(v).ok()).flatten()
}

#[cfg(not(target_os = "linux"))]
fn route_mtu(_socket: &std::net::UdpSocket, _ipv6: bool) -> Option<u32> {
    None
}

/// What the kernel granted for a UDP socket's buffers, in the units asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Receive buffer.
    pub recv: usize,
    /// Send buffer.
    pub send: usize,
}

/// Binds a UDP socket for quinn and asks for `tuning.udp_buffer` in each direction. As root
/// (CAP_NET_ADMIN) the `*BUFFORCE` options get it whatever `net.core.rmem_max` says;
/// otherwise the kernel caps it, and a warning names the sysctl to raise: a 212 KiB default
/// buffer drops bursts at a few hundred Mbit/s.
fn bind_udp(addr: SocketAddr, tuning: &Tuning) -> Result<std::net::UdpSocket, NetError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
    size_buffers(&socket, tuning);
    Ok(socket)
}

/// Asks for `tuning.udp_buffer` in each direction on `socket`, warning when capped.
fn size_buffers(socket: &std::net::UdpSocket, tuning: &Tuning) {
    let got = set_buffers(socket, tuning.udp_buffer);
    let short = |v: usize| v < tuning.udp_buffer;
    if short(got.recv) || short(got.send) {
        tracing::warn!(
            wanted = tuning.udp_buffer,
            recv = got.recv,
            send = got.send,
            "the kernel capped the UDP socket buffers, which limits throughput on fast or long \
             paths; raise them with: sysctl -w net.core.rmem_max={0} net.core.wmem_max={0}",
            tuning.udp_buffer
        );
    } else {
        tracing::debug!(recv = got.recv, send = got.send, "UDP socket buffers");
    }
}

#[cfg(target_os = "linux")]
fn set_buffers(socket: &std::net::UdpSocket, size: usize) -> SocketBuffers {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    let set = |opt: libc::c_int| {
        // SAFETY: fd is a live socket owned by `socket`; the option value is a c_int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    let get = |opt: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as above; v and len are valid for writes of their sizes.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0;
        // Linux reports twice what it was asked for (its bookkeeping overhead).
        if ok {
            usize::try_from(v).unwrap_or(0) / 2
        } else {
            0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) {
        set(libc::SO_RCVBUF);
    }
    if !set(libc::SO_SNDBUFFORCE) {
        set(libc::SO_SNDBUF);
    }
    SocketBuffers {
        recv: get(libc::SO_RCVBUF),
        send: get(libc::SO_SNDBUF),
    }
}

#[cfg(not(target_os = "linux"))]
fn set_buffers(_socket: &std::net::UdpSocket, size: usize) -> SocketBuffers {
    SocketBuffers {
        recv: size,
        send: size,
    }
}

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
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
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
struct PeerCheck {
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

struct Early {
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
fn server_parts(
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
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(config.clone()), socket, runtime)
        .map_err(bind_err)?;
    Ok((endpoint, config))
}

/// The sender's endpoint in pull mode (`zq-send serve`): it listens and the receiver, whose
/// key is pinned, dials in (a backup server behind NAT or a firewall). The data still flow
/// from the sender, so each connection gets a transport whose MTU search reaches as far as
/// the route to that receiver allows, like [`Client`]'s. A task accepts connections as they
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
struct Throttle {
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
async fn accept_loop(
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
fn restart_keys(key: &rustls_pki_types::PrivateKeyDer<'_>) -> (ring::hmac::Key, u64) {
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

    #[test]
    fn windows_follow_the_bdp_with_floors_and_a_cap() {
        let lan = Tuning::for_bdp(125_000); // 1 Gbit/s at 1 ms
        assert_eq!(lan.stream_window, 16 << 20);
        assert_eq!(lan.connection_window, 64 << 20);
        let wan = Tuning::for_bdp(25_000_000); // 1 Gbit/s at 200 ms
        assert_eq!(wan.stream_window, 50_000_000);
        assert_eq!(wan.connection_window, 100_000_000);
        assert_eq!(wan.send_window, 100_000_000);
        let absurd = Tuning::for_bdp(u64::MAX);
        assert_eq!(absurd.connection_window, u32::MAX / 2);
        assert!(absurd.transport(MAX_UDP_PAYLOAD).is_ok());
        assert_eq!("bbr".parse(), Ok(Congestion::Bbr));
        assert!("reno"
            .parse::<Congestion>()
            .unwrap_err()
            .contains("cubic or bbr"));
    }

    #[test]
    fn parallel_connections_share_the_send_window() {
        let wan = Tuning::for_bdp(25_000_000);
        assert_eq!(wan.clone().shared_by(1).send_window, 100_000_000);
        assert_eq!(wan.clone().shared_by(4).send_window, 25_000_000);
        // Never below 4 MiB; the receive windows are the receiver's and stay.
        let many = wan.shared_by(16);
        assert_eq!(many.send_window, 6_250_000);
        assert_eq!(many.stream_window, 50_000_000);
        let lan = Tuning::for_bdp(125_000).shared_by(16);
        assert_eq!(lan.send_window, 4 << 20);
    }

    #[test]
    fn udp_payload_is_the_mtu_less_headers() {
        assert_eq!(udp_payload_for_mtu(1500, false), Some(1472));
        assert_eq!(udp_payload_for_mtu(1500, true), Some(1452));
        assert_eq!(udp_payload_for_mtu(9000, false), Some(8972));
        assert_eq!(udp_payload_for_mtu(65536, false), Some(65508));
        assert_eq!(udp_payload_for_mtu(u32::MAX, true), Some(MAX_UDP_PAYLOAD));
        // IPv6's minimum MTU still carries a QUIC packet; less does not.
        assert_eq!(udp_payload_for_mtu(1280, true), Some(1232));
        assert_eq!(udp_payload_for_mtu(1200, false), None);
        assert_eq!(udp_payload_for_mtu(0, false), None);
    }

    /// Loopback's MTU is 65536 on Linux: the search may go far beyond Ethernet's 1452.
    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_route_allows_jumbo_datagrams() {
        let v4 = route_udp_payload("127.0.0.1:9".parse().unwrap());
        assert!(v4.is_some_and(|p| p > 8000), "{v4:?}");
    }

    /// As root the buffers are granted whatever net.core.rmem_max says; otherwise the
    /// socket still binds, with what the kernel allows.
    #[test]
    fn udp_buffers_are_asked_for() {
        let tuning = Tuning {
            udp_buffer: 8 << 20,
            ..Tuning::default()
        };
        let socket = bind_udp("127.0.0.1:0".parse().unwrap(), &tuning).unwrap();
        let got = set_buffers(&socket, 8 << 20);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(got.recv >= 8 << 20 && got.send >= 8 << 20, "{got:?}");
        } else {
            assert!(got.recv > 0, "{got:?}");
        }
    }

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
