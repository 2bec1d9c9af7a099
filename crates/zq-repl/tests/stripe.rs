//! Striping over real QUIC connections on loopback, without ZFS: a step's chunks spread
//! over several connections come back in order, and a sender that breaks the stripe rules
//! is refused with an error naming what it did.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use zq_net::{Fingerprint, FramedRecv, FramedSend};
use zq_proto::{Frame, Message, StepAbort, StepEncoder, StripeJoin, Stripes};
use zq_repl::stripe::{StepFrames, StripeRegistry, StripeSender};

type MainStream = (Frame, FramedRecv);

/// Identities, a server endpoint admitting the sender, and `n` connections to it. The
/// server accepts every stream of every connection: stripe streams go to the registry,
/// others to `mains`.
struct Link {
    _dir: tempfile::TempDir,
    conns: Vec<quinn::Connection>,
    mains: tokio::sync::mpsc::UnboundedReceiver<MainStream>,
    registry: Arc<StripeRegistry>,
    send_fp: Fingerprint,
    accept: tokio::task::JoinHandle<()>,
}

async fn link(n: usize) -> Link {
    let common::Pair {
        dir,
        endpoint,
        client,
        send_fp,
    } = common::pair();
    let addr = endpoint.local_addr().unwrap();
    let registry = Arc::new(StripeRegistry::default());
    let (main_tx, mains) = tokio::sync::mpsc::unbounded_channel();
    let reg = registry.clone();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let (registry, main_tx) = (reg.clone(), main_tx.clone());
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                while let Ok((_send, recv)) = conn.accept_bi().await {
                    let mut recv = FramedRecv::new(recv);
                    match recv.next().await {
                        Ok(Some(Frame::Message(Message::StripeJoin(j)))) => {
                            registry.deliver(send_fp, j, recv).unwrap()
                        }
                        Ok(Some(first)) => {
                            let _ = main_tx.send((first, recv));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(client.connect(addr).await.unwrap());
    }
    Link {
        _dir: dir,
        conns,
        mains,
        registry,
        send_fp,
        accept,
    }
}

/// The receiving side of the first step stream, read through [`StepFrames`]: the step's
/// bytes, or the error that stopped it.
async fn receive(
    mut mains: tokio::sync::mpsc::UnboundedReceiver<MainStream>,
    registry: Arc<StripeRegistry>,
    peer: Fingerprint,
) -> Result<Vec<u8>, String> {
    let (first, mut recv) = mains.recv().await.unwrap();
    let mut frames = StepFrames::new(&mut recv, Some((registry, peer)));
    let mut next = match first {
        Frame::Message(Message::Stripes(set)) => {
            frames.stripe(set)?;
            frames.next().await?
        }
        other => Some(other),
    };
    let mut data = Vec::new();
    loop {
        match next {
            Some(Frame::Data { data: d, hash }) => {
                assert_eq!(blake3::hash(&d).as_bytes(), &hash);
                data.extend_from_slice(&d);
            }
            Some(Frame::Message(Message::StepEnd(_))) => return Ok(data),
            Some(Frame::Message(Message::StepAbort(a))) => return Err(a.reason),
            Some(other) => return Err(format!("unexpected {}", other.name())),
            None => return Err("no StepEnd".into()),
        }
        next = frames.next().await?;
    }
}

/// Distinct chunks: chunk `i` holds `i` in every byte, with lengths that vary.
fn chunks(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(vec![i as u8; 1000 + (i * 7919) % 60_000]))
        .collect()
}

#[tokio::test]
async fn chunks_over_three_connections_arrive_in_order() {
    let l = link(3).await;
    let recv = tokio::spawn(receive(l.mains, l.registry.clone(), l.send_fp));
    let source = chunks(300);
    let (s, _r) = l.conns[0].open_bi().await.unwrap();
    let mut main = FramedSend::new(s);
    let mut encoder = StepEncoder::new();
    // A few chunks on the step's stream first, as zq-send does before a step turns bulk.
    for c in &source[..5] {
        let hash = encoder.chunk(c);
        main.send_data(&hash, c.clone()).await.unwrap();
    }
    let set = Stripes { id: 7, count: 3 };
    main.send(&Message::Stripes(set)).await.unwrap();
    let mut stripes = StripeSender::open(&l.conns, set).await.unwrap();
    for c in &source[5..] {
        let hash = encoder.chunk(c);
        stripes
            .send(hash, zq_proto::Payload::Raw(c.clone()))
            .await
            .unwrap();
    }
    stripes.finish().await.unwrap();
    main.send(&Message::StepEnd(encoder.end())).await.unwrap();
    main.finish().unwrap();
    let got = recv.await.unwrap().unwrap();
    assert_eq!(got, source.concat());
    l.accept.abort();
}

/// Sends a step whose stripe streams carry what `stripes` says: (stripe index, chunk
/// numbers in the order written); returns the receiver's error.
async fn broken(count: u8, stripes: &[(u8, &[u64])], end: Message) -> String {
    let l = link(1).await;
    let recv = tokio::spawn(receive(l.mains, l.registry.clone(), l.send_fp));
    let conn = &l.conns[0];
    let (s, _r) = conn.open_bi().await.unwrap();
    let mut main = FramedSend::new(s);
    let set = Stripes { id: 9, count };
    main.send(&Message::Stripes(set)).await.unwrap();
    for (index, seqs) in stripes {
        let (s, _r) = conn.open_bi().await.unwrap();
        let mut s = FramedSend::new(s);
        s.send(&Message::StripeJoin(StripeJoin {
            id: set.id,
            index: *index,
        }))
        .await
        .unwrap();
        for seq in *seqs {
            let data = Bytes::from(vec![*seq as u8; 100]);
            s.send(&Message::StripeChunk(*seq)).await.unwrap();
            s.send_data(blake3::hash(&data).as_bytes(), data)
                .await
                .unwrap();
        }
        s.finish().unwrap();
    }
    main.send(&end).await.unwrap();
    main.finish().unwrap();
    let e = recv.await.unwrap().unwrap_err();
    l.accept.abort();
    e
}

fn end() -> Message {
    Message::StepEnd(zq_proto::StepEnd {
        total_len: 0,
        hash: [0; 32],
    })
}

#[tokio::test]
async fn a_chunk_sent_twice_is_refused() {
    let e = broken(2, &[(0, &[0, 1]), (1, &[1, 2])], end()).await;
    assert!(e.contains("chunk 1 came twice"), "{e}");
}

#[tokio::test]
async fn a_missing_chunk_is_refused() {
    let e = broken(2, &[(0, &[0, 1]), (1, &[3])], end()).await;
    assert!(e.contains("ended without chunk 2"), "{e}");
}

#[tokio::test]
async fn a_stripe_index_outside_the_set_is_refused() {
    let e = broken(2, &[(0, &[0]), (2, &[1])], end()).await;
    assert!(e.contains("does not exist"), "{e}");
}

#[tokio::test]
async fn an_abort_on_the_step_stream_ends_the_merge() {
    let abort = Message::StepAbort(StepAbort {
        reason: "zfs send failed".into(),
    });
    // Stripe 1 never comes: the abort must not wait for it.
    let e = broken(2, &[(0, &[0])], abort).await;
    assert_eq!(e, "zfs send failed");
}
