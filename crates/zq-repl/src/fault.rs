//! Fault injection for the end-to-end tests, compiled into debug builds only (the binaries
//! `cargo test` runs); release builds have no such code path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;

/// With `ZQ_TEST_CORRUPT_ONCE` set, flips one bit of the first chunk after a stream's BEGIN
/// record that this process sends, after it was hashed: data damaged between `zfs send`
/// and `zfs receive`, which the receiver must catch.
pub(crate) fn corrupt_once(chunk: Bytes) -> Bytes {
    static ON: OnceLock<bool> = OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);
    // The environment is read once, not per chunk.
    let on = *ON.get_or_init(|| std::env::var_os("ZQ_TEST_CORRUPT_ONCE").is_some());
    if !on || chunk.is_empty() || DONE.swap(true, Ordering::SeqCst) {
        return chunk;
    }
    let mut bytes = chunk.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    tracing::warn!("fault injection: flipped a bit of a chunk after hashing it");
    Bytes::from(bytes)
}
