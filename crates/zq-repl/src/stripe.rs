//! Striping: one bulk step's chunks spread over streams on parallel connections
//! (`zq-send --connections N`, protocol version 5).
//!
//! One QUIC connection is one congestion controller: on a long or lossy path its window,
//! not the link, caps a single stream (quinn's CUBIC takes every random loss as
//! congestion). Several connections grow and recover their windows independently, as
//! parallel TCP streams do, so together they fill more of such a path.
//!
//! Once a step turns bulk, the sender says [`Stripes`] on the step's stream and opens one
//! stripe stream per connection (the step's own connection included), each starting with
//! a [`StripeJoin`]. Chunks are hashed and compressed in order as before; each then goes to
//! whichever stripe stream is free to take it ([`StripeSender`]), after a
//! [`Message::StripeChunk`] giving its number. The receiver ([`Merger`]) puts the chunks
//! back in order before they reach the step's decoder, so the checks and `zfs receive`
//! see exactly the stream a single connection would carry; `StepEnd` follows on the step's
//! stream once every stripe stream has ended.
//!
//! Memory: the sender queues at most one chunk per stripe beyond what the writers hold;
//! the receiver holds at most [`STRIPE_WINDOW`] chunks per stripe stream out of order
//! (each at most [`zq_proto::limits::MAX_FRAME_LEN`]), plus what QUIC's receive windows buffer. A
//! stripe stream whose chunk is next is always read (its earlier chunks were all taken),
//! so the merge cannot deadlock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::debug;
use zq_net::{Fingerprint, FramedRecv, FramedSend};
use zq_proto::limits::MAX_STRIPES;
use zq_proto::{Frame, Message, Payload, StripeJoin, Stripes};

use crate::error::ReplError;

/// Chunks the receiver holds per stripe stream while it waits for an earlier one.
pub const STRIPE_WINDOW: usize = 2;

/// How long the receiver waits for all stripe streams of a set to arrive.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Stripe streams that arrived before their step said [`Stripes`], kept at most this
/// many sets (and [`JOIN_TIMEOUT`]) per receiver.
const MAX_EARLY_SETS: usize = 256;

/// A new set id: unique in practice among one sender key's steps (the receiver matches
/// ids only among streams of the same key).
pub fn new_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    let b = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(id)
}

/// One chunk on its way to a stripe stream.
struct Chunk {
    seq: u64,
    hash: [u8; 32],
    payload: Payload,
}

/// The sending side of a stripe set: writers, one per stream, take the next chunk as soon
/// as their stream takes data.
pub struct StripeSender {
    tx: Option<mpsc::Sender<Chunk>>,
    writers: JoinSet<Result<(), ReplError>>,
    /// Set when a writer failed or the step is abandoned: every writer resets its stream.
    stop: watch::Sender<bool>,
    next: u64,
}

impl std::fmt::Debug for StripeSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSender")
            .field("streams", &self.writers.len())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl StripeSender {
    /// Opens one stripe stream of set `set` on each of `conns` (in that order, as indexes).
    /// The caller has said `set` on the step's stream.
    pub async fn open(conns: &[quinn::Connection], set: Stripes) -> Result<Self, ReplError> {
        let (tx, rx) = mpsc::channel(conns.len().max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (stop, _) = watch::channel(false);
        let mut streams = Vec::with_capacity(conns.len());
        for (index, conn) in conns.iter().enumerate() {
            let index = u8::try_from(index)
                .ok()
                .filter(|i| usize::from(*i) < MAX_STRIPES)
                .ok_or_else(|| ReplError::Protocol(format!("more than {MAX_STRIPES} stripes")))?;
            let (send, _recv) = conn.open_bi().await.map_err(ReplError::connection)?;
            let mut send = FramedSend::new(send);
            // Bulk, as the step's own stream is by now: on the step's connection the small
            // steps' streams go first (crate::lanes).
            send.set_priority(-1);
            send.send(&Message::StripeJoin(StripeJoin { id: set.id, index }))
                .await?;
            streams.push(send);
        }
        let mut writers = JoinSet::new();
        for send in streams {
            writers.spawn(write_stripe(send, rx.clone(), stop.clone()));
        }
        Ok(StripeSender {
            tx: Some(tx),
            writers,
            stop,
            next: 0,
        })
    }

    /// Queues the next chunk for whichever stripe stream takes it first. Fails with the
    /// first writer's error if a stripe stream failed.
    pub async fn send(&mut self, hash: [u8; 32], payload: Payload) -> Result<(), ReplError> {
        let chunk = Chunk {
            seq: self.next,
            hash,
            payload,
        };
        self.next += 1;
        let mut stopped = self.stop.subscribe();
        let queued = match &self.tx {
            Some(tx) => tokio::select! {
                r = tx.send(chunk) => r.is_ok(),
                _ = stopped.wait_for(|s| *s) => false,
            },
            None => false,
        };
        if queued {
            Ok(())
        } else {
            Err(self.failure().await)
        }
    }

    /// Waits until every stripe stream has sent its chunks and ended.
    pub async fn finish(mut self) -> Result<(), ReplError> {
        self.tx = None;
        while let Some(r) = self.writers.join_next().await {
            if let Err(e) = flatten(r) {
                let _ = self.stop.send(true);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Abandons the set: every stripe stream is reset.
    pub async fn abort(mut self) {
        self.tx = None;
        let _ = self.stop.send(true);
        while self.writers.join_next().await.is_some() {}
    }

    /// The error that stopped the set (the first writer's to fail).
    async fn failure(&mut self) -> ReplError {
        let _ = self.stop.send(true);
        let mut first = None;
        while let Some(r) = self.writers.join_next().await {
            if let Err(e) = flatten(r) {
                first.get_or_insert(e);
            }
        }
        first.unwrap_or_else(|| ReplError::Protocol("the stripe streams stopped".into()))
    }
}

fn flatten(r: Result<Result<(), ReplError>, tokio::task::JoinError>) -> Result<(), ReplError> {
    r.map_err(|e| ReplError::Protocol(format!("a stripe writer failed: {e}")))?
}

/// One stripe stream's writer: the next queued chunk, whenever the stream takes data.
async fn write_stripe(
    mut send: FramedSend,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Chunk>>>,
    stop: watch::Sender<bool>,
) -> Result<(), ReplError> {
    let mut stopped = stop.subscribe();
    let work = async {
        loop {
            let next = queue.lock().await.recv().await;
            let Some(c) = next else { break };
            send.send(&Message::StripeChunk(c.seq)).await?;
            send.send_payload(&c.hash, c.payload).await?;
        }
        send.finish()?;
        Ok::<(), ReplError>(())
    };
    let result = tokio::select! {
        r = work => r,
        _ = stopped.wait_for(|s| *s) => Err(ReplError::Protocol("stripe set abandoned".into())),
    };
    if result.is_err() {
        send.reset();
        let _ = stop.send(true);
    }
    result
}

/// Stripe streams that arrived, by sender key and set id, until their step claims them.
#[derive(Default)]
pub struct StripeRegistry {
    sets: Mutex<HashMap<(Fingerprint, u64), Entry>>,
}

impl std::fmt::Debug for StripeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.sets.lock().map_or(0, |s| s.len());
        f.debug_struct("StripeRegistry").field("sets", &n).finish()
    }
}

enum Entry {
    /// Arrived before the step's [`Stripes`].
    Early {
        streams: Vec<(u8, FramedRecv)>,
        since: Instant,
    },
    /// The step waits for them.
    Claimed {
        tx: mpsc::UnboundedSender<(u8, FramedRecv)>,
        delivered: usize,
    },
}

impl StripeRegistry {
    /// A stripe stream from `peer` (its [`StripeJoin`] read): handed to its step, or kept
    /// until the step claims it. Refused beyond [`MAX_STRIPES`] streams per set or
    /// `MAX_EARLY_SETS` unclaimed sets.
    pub fn deliver(
        &self,
        peer: Fingerprint,
        join: StripeJoin,
        recv: FramedRecv,
    ) -> Result<(), String> {
        let Ok(mut sets) = self.sets.lock() else {
            return Err("stripe registry poisoned".into());
        };
        sets.retain(|_, e| match e {
            Entry::Early { since, .. } => since.elapsed() < JOIN_TIMEOUT,
            Entry::Claimed { .. } => true,
        });
        let early = sets.len();
        match sets.entry((peer, join.id)) {
            std::collections::hash_map::Entry::Occupied(mut o) => match o.get_mut() {
                Entry::Claimed { tx, delivered } => {
                    *delivered += 1;
                    if *delivered > MAX_STRIPES {
                        return Err(format!(
                            "more than {MAX_STRIPES} streams for stripe set {:016x}",
                            join.id
                        ));
                    }
                    let _ = tx.send((join.index, recv));
                }
                Entry::Early { streams, .. } => {
                    if streams.len() >= MAX_STRIPES {
                        return Err(format!(
                            "more than {MAX_STRIPES} streams for stripe set {:016x}",
                            join.id
                        ));
                    }
                    streams.push((join.index, recv));
                }
            },
            std::collections::hash_map::Entry::Vacant(v) => {
                if early >= MAX_EARLY_SETS {
                    return Err(format!(
                        "{MAX_EARLY_SETS} stripe sets are waiting for their steps already"
                    ));
                }
                v.insert(Entry::Early {
                    streams: vec![(join.index, recv)],
                    since: Instant::now(),
                });
            }
        }
        Ok(())
    }

    /// Claims the streams of `set` from `peer`, those that came and those to come.
    pub fn claim(self: &Arc<Self>, peer: Fingerprint, set: Stripes) -> Merger {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut delivered = 0;
        if let Ok(mut sets) = self.sets.lock() {
            if let Some(Entry::Early { streams, .. }) = sets.remove(&(peer, set.id)) {
                delivered = streams.len();
                for s in streams {
                    let _ = tx.send(s);
                }
            }
            sets.insert((peer, set.id), Entry::Claimed { tx, delivered });
        }
        let (items_tx, items) = mpsc::channel(MAX_STRIPES * (STRIPE_WINDOW + 1));
        Merger {
            set,
            arrivals: rx,
            claim: Some((self.clone(), (peer, set.id))),
            joined: vec![false; usize::from(set.count)],
            readers: JoinSet::new(),
            items_tx,
            items,
            pending: BTreeMap::new(),
            next: 0,
            ended: 0,
            deadline: tokio::time::Instant::now() + JOIN_TIMEOUT,
            end: None,
        }
    }
}

/// What a stripe stream's reader hands the merge.
enum Item {
    Chunk {
        seq: u64,
        /// Boxed: a `Frame` is sized for its largest message.
        frame: Box<Frame>,
        _permit: OwnedSemaphorePermit,
    },
    End,
    Failed(u8, String),
}

/// The receiving side of a stripe set: its chunks, back in order.
pub struct Merger {
    set: Stripes,
    arrivals: mpsc::UnboundedReceiver<(u8, FramedRecv)>,
    /// Unregistered on drop.
    claim: Option<(Arc<StripeRegistry>, (Fingerprint, u64))>,
    joined: Vec<bool>,
    readers: JoinSet<()>,
    items_tx: mpsc::Sender<Item>,
    items: mpsc::Receiver<Item>,
    pending: BTreeMap<u64, (Frame, OwnedSemaphorePermit)>,
    next: u64,
    ended: usize,
    deadline: tokio::time::Instant,
    /// `StepEnd`, read on the step's stream before the stripes' last chunks came.
    end: Option<Frame>,
}

impl std::fmt::Debug for Merger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger")
            .field("set", &self.set)
            .field("next", &self.next)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        if let Some((registry, key)) = self.claim.take() {
            if let Ok(mut sets) = registry.sets.lock() {
                sets.remove(&key);
            }
        }
    }
}

impl Merger {
    /// The next chunk frame in order; `None` once every stripe stream has ended with all
    /// chunks delivered. A frame on the step's own stream (`main`) meanwhile may only be
    /// `StepAbort`, returned at once, or `StepEnd` (the sender's streams are not ordered
    /// with each other), kept for [`Merger::take_end`].
    pub async fn next(&mut self, main: &mut FramedRecv) -> Result<Option<Frame>, String> {
        loop {
            if let Some((frame, _permit)) = self.pending.remove(&self.next) {
                self.next += 1;
                return Ok(Some(frame));
            }
            let count = usize::from(self.set.count);
            if self.ended == count {
                return match self.pending.keys().next() {
                    Some(seq) => Err(format!(
                        "the stripe streams ended without chunk {} (chunk {seq} came)",
                        self.next
                    )),
                    None => Ok(None),
                };
            }
            let all_joined = self.joined.iter().all(|j| *j);
            tokio::select! {
                Some((index, recv)) = self.arrivals.recv(), if !all_joined => {
                    let i = usize::from(index);
                    if i >= count || self.joined[i] {
                        return Err(format!(
                            "stripe stream {index} of a set of {count} came twice or does not exist"
                        ));
                    }
                    self.joined[i] = true;
                    debug!(set = format_args!("{:016x}", self.set.id), index, "stripe stream joined");
                    self.readers.spawn(read_stripe(index, recv, self.items_tx.clone()));
                }
                _ = tokio::time::sleep_until(self.deadline), if !all_joined => {
                    let n = self.joined.iter().filter(|j| **j).count();
                    return Err(format!(
                        "only {n} of {count} stripe streams arrived within {JOIN_TIMEOUT:?}"
                    ));
                }
                item = self.items.recv() => match item {
                    Some(Item::Chunk { seq, frame, _permit }) => {
                        if seq < self.next || self.pending.contains_key(&seq) {
                            return Err(format!("stripe chunk {seq} came twice"));
                        }
                        self.pending.insert(seq, (*frame, _permit));
                    }
                    Some(Item::End) => self.ended += 1,
                    Some(Item::Failed(index, e)) => return Err(format!("stripe stream {index}: {e}")),
                    // We hold a sender ourselves.
                    None => return Err("the stripe readers stopped".into()),
                },
                frame = main.next(), if self.end.is_none() => match frame {
                    Ok(Some(f @ Frame::Message(Message::StepAbort(_)))) => return Ok(Some(f)),
                    Ok(Some(f @ Frame::Message(Message::StepEnd(_)))) => self.end = Some(f),
                    Ok(Some(other)) => return Err(format!(
                        "{} on the step's stream while its stripe streams were open",
                        other.name()
                    )),
                    Ok(None) => return Err("the step's stream ended while its stripe streams were open".into()),
                    Err(e) => return Err(e.to_string()),
                },
            }
        }
    }

    /// The `StepEnd` that came on the step's stream while the stripes were open.
    pub fn take_end(&mut self) -> Option<Frame> {
        self.end.take()
    }
}

/// Reads one stripe stream: (chunk number, data frame) pairs, at most [`STRIPE_WINDOW`]
/// of them handed on and not yet merged.
async fn read_stripe(index: u8, mut recv: FramedRecv, tx: mpsc::Sender<Item>) {
    let window = Arc::new(Semaphore::new(STRIPE_WINDOW));
    loop {
        let Ok(permit) = window.clone().acquire_owned().await else {
            return;
        };
        let failed = |why: String| Item::Failed(index, why);
        let item = match recv.next().await {
            Ok(Some(Frame::Message(Message::StripeChunk(seq)))) => match recv.next().await {
                Ok(Some(frame @ (Frame::Data { .. } | Frame::Compressed { .. }))) => Item::Chunk {
                    seq,
                    frame: Box::new(frame),
                    _permit: permit,
                },
                Ok(Some(other)) => failed(format!("{} instead of chunk {seq}", other.name())),
                Ok(None) => failed(format!("ended before chunk {seq}")),
                Err(e) => failed(e.to_string()),
            },
            Ok(Some(other)) => failed(format!("{} instead of StripeChunk", other.name())),
            Ok(None) => Item::End,
            Err(e) => failed(e.to_string()),
        };
        let last = !matches!(item, Item::Chunk { .. });
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// A step's frames: those of its stream, and from where the stream says [`Stripes`] until
/// every stripe stream has ended, the stripes' chunks in order.
pub struct StepFrames<'a> {
    main: &'a mut FramedRecv,
    /// Where stripe streams are claimed, and the sender's key; `None` before version 5.
    stripes: Option<(Arc<StripeRegistry>, Fingerprint)>,
    merging: Option<Merger>,
}

impl std::fmt::Debug for StepFrames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepFrames")
            .field("merging", &self.merging)
            .finish_non_exhaustive()
    }
}

impl<'a> StepFrames<'a> {
    /// The frames of the step on `main`; `stripes` (the registry and the sender's key)
    /// where the session may stripe (version 5).
    pub fn new(
        main: &'a mut FramedRecv,
        stripes: Option<(Arc<StripeRegistry>, Fingerprint)>,
    ) -> Self {
        StepFrames {
            main,
            stripes,
            merging: None,
        }
    }

    /// The next frame of the step, `None` at the end of its stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(m) = self.merging.as_mut() {
                match m.next(self.main).await? {
                    Some(f) => return Ok(Some(f)),
                    None => {
                        let end = m.take_end();
                        self.merging = None;
                        if end.is_some() {
                            return Ok(end);
                        }
                    }
                }
                continue;
            }
            match self.main.next().await {
                Ok(Some(Frame::Message(Message::Stripes(set)))) => self.stripe(set)?,
                Ok(f) => return Ok(f),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The step's stream said `set` (read by the caller): the next frames are the set's.
    pub fn stripe(&mut self, set: Stripes) -> Result<(), String> {
        let Some((registry, peer)) = &self.stripes else {
            return Err("Stripes before protocol version 5".into());
        };
        if self.merging.is_some() {
            return Err("Stripes while a stripe set was open".into());
        }
        debug!(
            set = format_args!("{:016x}", set.id),
            count = set.count,
            "chunks striped"
        );
        self.merging = Some(registry.claim(*peer, set));
        Ok(())
    }
}
