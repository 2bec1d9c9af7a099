//! Bytes from a hostile peer on one stream: the frame decoder fed in pieces, every frame
//! handed to a step's transfer state machine whatever the order. Nothing may panic or
//! allocate beyond the frame limit, and every message that decodes must encode and decode
//! back to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zq_proto::{decode, encode, Frame, StepDecoder};

fuzz_target!(|input: &[u8]| {
    // The first byte picks how the bytes arrive (in pieces of 1 to 128 bytes, as QUIC may
    // deliver them) and whether data frames get their true hash, so that the transfer
    // state machine is driven past its checksum check too.
    let Some((&first, bytes)) = input.split_first() else {
        return;
    };
    let piece = usize::from(first & 0x7f) + 1;
    let true_hashes = first & 0x80 != 0;
    let mut buf = BytesMut::new();
    // A step that announced zstd: compressed frames reach the decompressor too.
    let Ok(mut step) = StepDecoder::with_zstd() else {
        return;
    };
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Frame::Message(m) = &frame {
                        let mut again = BytesMut::new();
                        encode(m, &mut again).expect("a decoded message encodes");
                        assert_eq!(decode(&mut again), Ok(Some(frame.clone())));
                        assert!(again.is_empty());
                    }
                    let frame = match frame {
                        Frame::Data { data, .. } if true_hashes => Frame::Data {
                            hash: *blake3::hash(&data).as_bytes(),
                            data,
                        },
                        other => other,
                    };
                    let _ = step.on_frame(frame);
                }
                Ok(None) => break,
                // The receiver drops the stream at the first bad frame.
                Err(_) => return,
            }
        }
    }
    let _ = zq_proto::codec::finish(&buf);
    let _ = step.on_eof();
});
