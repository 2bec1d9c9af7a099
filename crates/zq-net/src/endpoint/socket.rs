//! The UDP socket under an endpoint: its buffers (asked for, granted or capped) and the
//! largest datagram the route to a peer carries (the MTU search's bound).

use std::net::SocketAddr;

use super::tuning::Tuning;
use super::NetError;

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
pub(super) fn route_mtu(socket: &std::net::UdpSocket, ipv6: bool) -> Option<u32> {
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
pub(super) fn route_mtu(_socket: &std::net::UdpSocket, _ipv6: bool) -> Option<u32> {
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
pub(super) fn bind_udp(addr: SocketAddr, tuning: &Tuning) -> Result<std::net::UdpSocket, NetError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
    size_buffers(&socket, tuning);
    Ok(socket)
}

/// Asks for `tuning.udp_buffer` in each direction on `socket`, warning when capped.
pub(super) fn size_buffers(socket: &std::net::UdpSocket, tuning: &Tuning) {
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
pub(super) fn set_buffers(socket: &std::net::UdpSocket, size: usize) -> SocketBuffers {
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
pub(super) fn set_buffers(_socket: &std::net::UdpSocket, size: usize) -> SocketBuffers {
    SocketBuffers {
        recv: size,
        send: size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
