//! Micro-benchmarks of zq's data path without the network: frame encode/decode and the
//! chunk pipeline (BLAKE3 per chunk and per stream, zstd) per byte, on incompressible and
//! compressible data. `cargo bench -p zq-proto` prints GiB/s per case; docs/benchmarks.md
//! has the figures.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use zq_proto::{
    decode, encode, encode_data_header, encode_zstd_header, Compression, Compressor, ForceAction,
    Frame, Message, Payload, SnapRef, StepDecoder, StepEncoder, StepHeader,
};

const CHUNK: usize = 256 * 1024;

fn random(len: usize) -> Bytes {
    let mut b = vec![0u8; len];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut b);
    Bytes::from(b)
}

fn text(len: usize) -> Bytes {
    let words: &[&[u8]] = &[
        b"zfs ",
        b"snapshot ",
        b"send ",
        b"receive ",
        b"pool ",
        b"\n",
        b"0x1f ",
    ];
    let r = random(len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[r[i % len] as usize % words.len()]);
        i += 1;
    }
    out.truncate(len);
    Bytes::from(out)
}

fn header() -> Message {
    Message::StepHeader(StepHeader {
        source: "tank/home/alice".into(),
        target: "backup/hostA/home/alice".into(),
        from: Some(SnapRef {
            name: "zq_20261126T101010.123Z".into(),
            guid: 0x1234_5678_9abc_def0,
        }),
        to: SnapRef {
            name: "zq_20261126T101011.123Z".into(),
            guid: 0x0fed_cba9_8765_4321,
        },
        intermediates: true,
        force: ForceAction::None,
        compression: "none".into(),
    })
}

fn frames(c: &mut Criterion) {
    let msg = header();
    let mut g = c.benchmark_group("frame");
    g.bench_function("encode StepHeader", |b| {
        let mut out = BytesMut::with_capacity(512);
        b.iter(|| {
            out.clear();
            encode(&msg, &mut out).unwrap();
        })
    });
    let mut wire = BytesMut::new();
    encode(&msg, &mut wire).unwrap();
    let wire = wire.freeze();
    g.bench_function("decode StepHeader", |b| {
        b.iter(|| decode(&mut BytesMut::from(&wire[..])).unwrap().unwrap())
    });
    let data = random(CHUNK);
    let mut framed = BytesMut::from(&encode_data_header(&[1; 32], CHUNK)[..]);
    framed.extend_from_slice(&data);
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("decode 256 KiB data frame", |b| {
        b.iter_batched(
            || framed.clone(),
            |mut buf| decode(&mut buf).unwrap().unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What each side does to every chunk, in the order it does it.
fn chunk_pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk pipeline");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (kind, data) in [("random", random(CHUNK)), ("text", text(CHUNK))] {
        for mode in [Compression::None, Compression::Auto, Compression::Zstd(3)] {
            let id = format!("{kind}, {mode}");
            g.bench_with_input(BenchmarkId::new("send", &id), &data, |b, data| {
                let mut enc = StepEncoder::new();
                let mut comp = Compressor::new(mode);
                b.iter(|| {
                    let hash = enc.chunk(data);
                    (hash, comp.compress(data.clone()))
                })
            });
            // The receiver's side of the same chunk: decompress if needed, verify, hash.
            let mut enc = StepEncoder::new();
            let hash = enc.chunk(&data);
            let frame_bytes = match Compressor::new(mode).compress(data.clone()) {
                Payload::Raw(d) => {
                    let mut f = BytesMut::from(&encode_data_header(&hash, d.len())[..]);
                    f.extend_from_slice(&d);
                    f
                }
                Payload::Zstd { raw_len, data } => {
                    let mut f = BytesMut::from(&encode_zstd_header(&hash, raw_len, data.len())[..]);
                    f.extend_from_slice(&data);
                    f
                }
            };
            g.bench_with_input(BenchmarkId::new("receive", &id), &frame_bytes, |b, f| {
                let mut dec = StepDecoder::with_zstd().unwrap();
                b.iter_batched(
                    || f.clone(),
                    |mut buf| {
                        let frame: Frame = decode(&mut buf).unwrap().unwrap();
                        dec.on_frame(frame).unwrap()
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, frames, chunk_pipeline);
criterion_main!(benches);
