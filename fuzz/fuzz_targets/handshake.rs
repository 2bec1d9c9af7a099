//! The handshake with a hostile peer: whatever first frame arrives, the receiver answers
//! without panicking, and a Welcome it gives picks only what both sides offered, so the
//! sender that sent that Hello accepts it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zq_proto::{decode, Capabilities, Frame, Message};

fuzz_target!(|input: &[u8]| {
    let mut buf = BytesMut::from(input);
    let Ok(Some(Frame::Message(msg))) = decode(&mut buf) else {
        return;
    };
    let receiver = Capabilities::current("fuzz-recv");
    match msg {
        Message::Hello(hello) => {
            if let Ok(welcome) = receiver.accept(&hello) {
                let sender = Capabilities {
                    min_version: hello.min_version,
                    max_version: hello.max_version,
                    compression: hello.compression.clone(),
                    checksums: hello.checksums.clone(),
                    resume: hello.resume.clone(),
                    software: hello.software.clone(),
                };
                let session = sender
                    .check_welcome(&welcome)
                    .expect("the sender accepts what the receiver picked from its Hello");
                assert!(session.version >= receiver.min_version);
                assert!(session.version <= receiver.max_version);
            }
        }
        Message::Welcome(welcome) => {
            let _ = Capabilities::current("fuzz-send").check_welcome(&welcome);
        }
        _ => {}
    }
});
