//! Fault injection for the end-to-end tests, compiled into debug builds only (the binaries
//! `cargo test` runs); release builds have no such code path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;

/// With `ZQ_TEST_CORRUPT_ONCE=OFFSET` set, flips one bit of the first chunk this process
/// sends at or after stream offset OFFSET (`1`: the first after the BEGIN record), after it
/// was hashed: data damaged between `zfs send` and `zfs receive`, which the receiver must
/// catch.
pub(crate) fn corrupt_once(chunk: Bytes, offset: u64) -> Bytes {
    static FROM: OnceLock<Option<u64>> = OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    // The environment is read once, not per chunk.
    let from = *FROM.get_or_init(|| {
        std::env::var("ZQ_TEST_CORRUPT_ONCE")
            .ok()
            .map(|v| v.parse().unwrap_or(1))
    });
    if from.is_none_or(|f| offset < f.max(1))
        || chunk.is_empty()
        || DONE.swap(true, Ordering::SeqCst)
    {
        return chunk;
    }
    let mut bytes = chunk.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    tracing::warn!("fault injection: flipped a bit of a chunk after hashing it");
    Bytes::from(bytes)
}

/// With `ZQ_TEST_STALL_ONCE=SECONDS` set, the first step whose stream passes 8 MiB in this
/// process stops reading it for that long while everything else carries on (the
/// connection stays alive): a receiver that stops reading.
pub(crate) async fn stall_once(total: u64) {
    static SECONDS: OnceLock<Option<u64>> = OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    let Some(secs) = *SECONDS.get_or_init(|| {
        std::env::var("ZQ_TEST_STALL_ONCE")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    if total < 8 << 20 || DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(secs, "fault injection: this step stops reading its stream");
    tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
}
