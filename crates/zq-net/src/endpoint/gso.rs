//! quinn's UDP socket with GSO batches kept under the kernel's 64 KiB limit.
//!
//! quinn lets a batch hold up to its segment count of datagrams whatever their size. One
//! GSO batch is one UDP send, which Linux refuses above 64 KiB with EMSGSIZE, and
//! quinn-udp drops such a send silently (it expects EMSGSIZE only from MTU probes). Once
//! MTU discovery raised datagrams above 6.5 KB (zq searches up to the route's MTU:
//! loopback, jumbo-frame LANs), whole batches vanished and loss recovery fell back to
//! 1200-byte packets. This wrapper sends such a batch as several, each a whole number of
//! datagrams under the limit, and leaves every other batch alone, so standard-MTU paths
//! keep their full batches. (zq carried this in a fork of quinn-proto before.)

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The largest UDP payload one send may carry: 65535 bytes of IPv4 packet less its
/// 20-byte IP and 8-byte UDP headers.
pub const MAX_GSO_BATCH_BYTES: usize = 65_507;

/// A socket whose GSO batches stay at or under [`MAX_GSO_BATCH_BYTES`].
pub struct CappedGso {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl CappedGso {
    /// Wraps quinn's socket for `socket` (from the endpoint's runtime).
    pub fn wrap(inner: Arc<dyn AsyncUdpSocket>) -> Arc<dyn AsyncUdpSocket> {
        Arc::new(CappedGso { inner })
    }
}

/// `quinn::Endpoint::new` on `socket`, through [`CappedGso`].
pub fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
    runtime: Arc<dyn quinn::Runtime>,
) -> io::Result<quinn::Endpoint> {
    let socket = CappedGso::wrap(runtime.wrap_udp_socket(socket)?);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

impl fmt::Debug for CappedGso {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CappedGso")
            .field("inner", &self.inner)
            .finish()
    }
}

/// The sends `contents` (datagrams of `segment` bytes, the last maybe shorter) goes out
/// as: byte ranges of at most [`MAX_GSO_BATCH_BYTES`], each a whole number of datagrams
/// (one, if a single datagram is larger).
fn batches(len: usize, segment: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (MAX_GSO_BATCH_BYTES / segment.max(1)).max(1) * segment.max(1);
    (0..len)
        .step_by(per)
        .map(move |start| start..(start + per).min(len))
}

impl AsyncUdpSocket for CappedGso {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    /// Sends `transmit`, in several sends if it is a batch over the limit. If a later
    /// send would block, the error goes back to quinn, which retries the whole transmit
    /// when the socket is writable: the datagrams already sent then arrive twice, which
    /// QUIC discards as duplicates.
    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(s) if transmit.contents.len() > MAX_GSO_BATCH_BYTES => s,
            _ => return self.inner.try_send(transmit),
        };
        for range in batches(transmit.contents.len(), segment) {
            let contents = &transmit.contents[range];
            self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_under_64k_in_whole_datagrams() {
        // Ten jumbo datagrams of 16 KiB (loopback's MTU search): 3 per send.
        let got: Vec<_> = batches(10 * 16384, 16384).collect();
        assert_eq!(got.len(), 4);
        assert!(got
            .iter()
            .all(|r| r.len() <= MAX_GSO_BATCH_BYTES && r.len() % 16384 == 0));
        assert_eq!(got.last(), Some(&(9 * 16384..10 * 16384)));
        // A short last datagram goes with the last batch.
        let got: Vec<_> = batches(4 * 9000 + 100, 9000).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0], 0..36100);
        let got: Vec<_> = batches(8 * 9000 + 100, 9000).collect();
        assert_eq!(got, [0..63000, 63000..72100]);
        // Datagrams larger than a send: one each (the kernel refuses them alike).
        assert_eq!(batches(3 * 65527, 65527).count(), 3);
    }
}
