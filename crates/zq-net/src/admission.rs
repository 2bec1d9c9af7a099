//! Admission of new connections on a server's open port (`zq-recv serve`, `zq-send
//! serve`): when to make a client prove its address with a QUIC Retry before the server
//! spends a TLS handshake on it.
//!
//! A handshake costs the server a key exchange and a signature, and the first packet a
//! client sends can come from a spoofed address. A Retry answers it with a token the client
//! must echo from its real address, at the cost of one more round trip. zq needs reconnects
//! to cost one round trip (0-RTT), so by default it asks for a Retry only while many
//! handshakes are in progress at once, which a fleet reconnecting after an outage does not
//! reach but a flood does; `always` makes every new connection prove its address.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Handshakes in progress on one endpoint above which [`AddressValidation::Auto`] asks
/// new clients for a Retry.
pub const RETRY_ABOVE: usize = 64;

/// When a server asks a new client for a QUIC Retry (address validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressValidation {
    /// While more than [`RETRY_ABOVE`] handshakes are in progress.
    #[default]
    Auto,
    /// For every new connection: one more round trip each, no 0-RTT reconnects.
    Always,
}

impl std::str::FromStr for AddressValidation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AddressValidation::Auto),
            "always" => Ok(AddressValidation::Always),
            other => Err(format!("{other:?}: address validation is auto or always")),
        }
    }
}

impl std::fmt::Display for AddressValidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressValidation::Auto => "auto",
            AddressValidation::Always => "always",
        })
    }
}

/// Whether a client must first prove its address: never once it did (it echoed a Retry
/// token), and never where QUIC forbids a second Retry.
pub fn needs_retry(
    mode: AddressValidation,
    validated: bool,
    may_retry: bool,
    in_progress: usize,
) -> bool {
    !validated
        && may_retry
        && match mode {
            AddressValidation::Always => true,
            AddressValidation::Auto => in_progress >= RETRY_ABOVE,
        }
}

/// Counts one endpoint's handshakes in progress and decides each new connection's fate.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    mode: AddressValidation,
    in_progress: Arc<AtomicUsize>,
}

/// One handshake in progress, counted until dropped.
#[derive(Debug)]
pub struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// Admission under `mode`.
    pub fn new(mode: AddressValidation) -> Self {
        Admission {
            mode,
            in_progress: Arc::default(),
        }
    }

    /// The connection back with its handshake counted (keep the guard until the handshake
    /// ends), or `None` when the client was asked for a Retry instead: it comes back with
    /// a token from its real address, as a new incoming connection.
    pub fn admit(&self, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Handshaking)> {
        let in_progress = self.in_progress.load(Ordering::Relaxed);
        if needs_retry(
            self.mode,
            incoming.remote_address_validated(),
            incoming.may_retry(),
            in_progress,
        ) {
            tracing::debug!(remote = %incoming.remote_address(), in_progress, "asking for a Retry (address validation)");
            // Fails only if a Retry is not allowed, which may_retry ruled out.
            let _ = incoming.retry();
            return None;
        }
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        Some((incoming, Handshaking(self.in_progress.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_asked_for_under_load_or_always_but_never_twice() {
        use AddressValidation::*;
        assert!(!needs_retry(Auto, false, true, 0));
        assert!(!needs_retry(Auto, false, true, RETRY_ABOVE - 1));
        assert!(needs_retry(Auto, false, true, RETRY_ABOVE));
        assert!(needs_retry(Always, false, true, 0));
        // A client that echoed a token, or one QUIC lets no more Retries, goes on.
        assert!(!needs_retry(Always, true, true, 0));
        assert!(!needs_retry(Always, false, false, 0));
        assert_eq!("always".parse(), Ok(Always));
        assert_eq!(Auto.to_string(), "auto");
        assert!("never"
            .parse::<AddressValidation>()
            .unwrap_err()
            .contains("auto or always"));
    }

    /// Over loopback QUIC: with `always` the first attempt gets a Retry, the client echoes
    /// the token at once (quinn does it by itself), and the second attempt is admitted
    /// with its address validated; the handshake count falls back to zero.
    #[tokio::test]
    async fn always_retries_once_then_admits_the_validated_client() {
        use crate::{server, Client, Identity, Tuning};
        let dir = tempfile::tempdir().unwrap();
        let recv_fp = Identity::generate(dir.path(), "zq-recv").unwrap();
        let send_fp = Identity::generate(dir.path(), "zq-send").unwrap();
        let recv_id = Identity::load(dir.path(), "zq-recv").unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let endpoint = server(recv_id, [send_fp], listen, &Tuning::default()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let admission = Admission::new(AddressValidation::Always);
        let counted = admission.in_progress.clone();
        let accept = tokio::spawn(async move {
            let mut retried = 0;
            loop {
                let incoming = endpoint.accept().await.unwrap();
                let validated = incoming.remote_address_validated();
                match admission.admit(incoming) {
                    None => retried += 1,
                    Some((incoming, handshaking)) => {
                        assert!(validated);
                        let conn = incoming.await.unwrap();
                        drop(handshaking);
                        return (retried, conn);
                    }
                }
            }
        });
        let send_id = Identity::load(dir.path(), "zq-send").unwrap();
        let client = Client::new(send_id, recv_fp, addr, &Tuning::default()).unwrap();
        let _conn = client.connect(addr).await.unwrap();
        let (retried, _server_side) = accept.await.unwrap();
        assert_eq!(retried, 1);
        assert_eq!(counted.load(Ordering::Relaxed), 0);
    }
}
