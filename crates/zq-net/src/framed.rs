//! zq frames over one QUIC stream: [`FramedSend`] writes messages and data chunks (the
//! chunk bytes are handed to quinn without a copy), [`FramedRecv`] reads frames with a
//! buffer bounded by the largest frame.

use bytes::{Bytes, BytesMut};
use zq_proto::{codec, Frame, FrameError, Message};

/// Most bytes taken from quinn per read; the buffer never holds more than one frame plus
/// this.
const READ_CHUNK: usize = 64 * 1024;

/// Reading or writing frames on a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent bytes that are not a valid frame.
    #[error("invalid frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// Writing to the stream failed (peer reset or stopped it, or the connection was lost).
    #[error("stream write failed")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed.
    #[error("stream read failed")]
    Read(#[from] quinn::ReadError),
    /// The stream is already closed.
    #[error("stream already closed")]
    Closed(#[from] quinn::ClosedStream),
    /// The peer finished the stream where a frame was required.
    #[error("peer closed the stream while we expected {0}")]
    Eof(&'static str),
    /// The peer sent a valid frame that does not belong here.
    #[error("expected {expected}, peer sent {got}")]
    Unexpected {
        /// What we expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FramedSend {
    inner: quinn::SendStream,
    buf: BytesMut,
}

impl FramedSend {
    /// Wraps a QUIC send stream.
    pub fn new(inner: quinn::SendStream) -> Self {
        FramedSend {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// Writes one message frame.
    pub async fn send(&mut self, msg: &Message) -> Result<(), StreamError> {
        self.buf.clear();
        codec::encode(msg, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        Ok(())
    }

    /// Writes one data frame: header, then `data` itself.
    pub async fn send_data(&mut self, hash: &[u8; 32], data: Bytes) -> Result<(), StreamError> {
        let header = Bytes::copy_from_slice(&codec::encode_data_header(hash, data.len()));
        self.inner.write_all_chunks(&mut [header, data]).await?;
        Ok(())
    }

    /// Writes one chunk as [`zq_proto::Compressor`] prepared it: a data frame, or a
    /// compressed one. Either way the chunk's bytes are not copied.
    pub async fn send_payload(
        &mut self,
        hash: &[u8; 32],
        payload: zq_proto::Payload,
    ) -> Result<(), StreamError> {
        match payload {
            zq_proto::Payload::Raw(data) => self.send_data(hash, data).await,
            zq_proto::Payload::Zstd { raw_len, data } => {
                let header =
                    Bytes::copy_from_slice(&codec::encode_zstd_header(hash, raw_len, data.len()));
                self.inner.write_all_chunks(&mut [header, data]).await?;
                Ok(())
            }
        }
    }

    /// Sets the stream's priority: quinn transmits what higher-priority streams have
    /// buffered first (default 0). A stream whose connection is gone keeps its priority.
    pub fn set_priority(&self, priority: i32) {
        let _ = self.inner.set_priority(priority);
    }

    /// Finishes the stream (no more frames from us).
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.inner.finish()?;
        Ok(())
    }

    /// Abandons the stream: what is buffered is dropped and the peer's reads fail.
    pub fn reset(&mut self) {
        let _ = self.inner.reset(0u32.into());
    }

    /// Waits until the peer has received everything or stopped the stream.
    pub async fn stopped(&mut self) {
        let _ = self.inner.stopped().await;
    }
}

/// The receiving half of a framed stream.
#[derive(Debug)]
pub struct FramedRecv {
    inner: quinn::RecvStream,
    buf: BytesMut,
    eof: bool,
}

impl FramedRecv {
    /// Wraps a QUIC receive stream.
    pub fn new(inner: quinn::RecvStream) -> Self {
        FramedRecv {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            eof: false,
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(frame) = codec::decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.eof {
                codec::finish(&self.buf)?;
                return Ok(None);
            }
            match self.inner.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => self.eof = true,
            }
        }
    }

    /// The next frame, which must be a message.
    pub async fn message(&mut self, expected: &'static str) -> Result<Message, StreamError> {
        match self.next().await? {
            Some(Frame::Message(m)) => Ok(m),
            Some(other) => Err(StreamError::Unexpected {
                expected,
                got: other.name(),
            }),
            None => Err(StreamError::Eof(expected)),
        }
    }

    /// Tells the peer to stop sending on this stream (we will not read further).
    pub fn stop(&mut self) {
        let _ = self.inner.stop(quinn::VarInt::from_u32(1));
    }
}
