//! zq's transport: QUIC (quinn) with TLS 1.3 (rustls), self-signed identities pinned by
//! public-key fingerprint on both sides, and zq frames over QUIC streams.

// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod address;
pub mod admission;
pub mod endpoint;
pub mod framed;
pub mod identity;
pub mod pin;
pub mod rate;

pub use address::HostPort;
pub use admission::{AddressValidation, Admission};
pub use endpoint::{
    closed_by_tls_alert, peer_fingerprint, resolve, server, server_on, Client, Congestion, Dialed,
    Listener, NetError, Tuning, DEFAULT_BDP,
};
pub use framed::{FramedRecv, FramedSend, StreamError};
pub use identity::{Fingerprint, Identity, IdentityError};
pub use rate::RateLimit;
