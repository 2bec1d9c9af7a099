//! What the QUIC windows, congestion control and socket buffers are sized for: a path's
//! bandwidth-delay product, shared by parallel connections.

use std::sync::Arc;
use std::time::Duration;

use quinn::{TransportConfig, VarInt};

use super::NetError;

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
    pub(crate) fn transport(&self, mtu_upper_bound: u16) -> Result<TransportConfig, NetError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::MAX_UDP_PAYLOAD;

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
}
