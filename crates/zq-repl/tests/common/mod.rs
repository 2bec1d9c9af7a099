//! What the tests of this crate share.

use zq_net::{Client, Fingerprint, Identity, Tuning};

/// Fresh identities, a receiver endpoint on loopback admitting the sender's key, and a
/// client with that key pinning the receiver's.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub endpoint: quinn::Endpoint,
    pub client: Client,
    pub send_fp: Fingerprint,
}

pub fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let recv_fp = Identity::generate(dir.path(), "zq-recv").unwrap();
    let send_fp = Identity::generate(dir.path(), "zq-send").unwrap();
    let endpoint = zq_net::server(
        Identity::load(dir.path(), "zq-recv").unwrap(),
        [send_fp],
        "127.0.0.1:0".parse().unwrap(),
        &Tuning::default(),
    )
    .unwrap();
    let client = Client::new(
        Identity::load(dir.path(), "zq-send").unwrap(),
        recv_fp,
        endpoint.local_addr().unwrap(),
        &Tuning::default(),
    )
    .unwrap();
    Pair {
        dir,
        endpoint,
        client,
        send_fp,
    }
}
