//! QUIC framing (PROTOCOL.md §1.1): ALPN `wasmrelay/1`, one bidirectional
//! control stream of length-prefixed frames (`u32 big-endian length | binary
//! message`, the message being exactly a WebSocket binary frame), and a
//! unidirectional stream per bulk body in either direction. The close and
//! stream error codes both ends use are here too.
//!
//! Reading and writing frames on quinn streams needs the `quinn` feature;
//! the rest is plain data, usable with any QUIC stack.

use bytes::{BufMut, Bytes, BytesMut};

use crate::Msg;

/// The ALPN protocol id of the QUIC transport.
pub const ALPN: &[u8] = b"wasmrelay/1";

/// A `request` or `response` whose payload is at least this many bytes is a
/// bulk body: it travels on a unidirectional stream of its own.
pub const BULK_THRESHOLD: usize = 16 * 1024;
/// Bulk streams a peer may have open towards the relay at once (and the most
/// the relay opens towards a peer); more wait for QUIC stream credit.
pub const MAX_BULK_STREAMS: u32 = 16;

/// Bytes in a frame's length prefix.
pub const LENGTH_BYTES: usize = 4;

/// QUIC application error codes the relay closes connections with.
pub mod close {
    /// The relay is shutting down (after `goaway`).
    pub const SHUTDOWN: u32 = 0x1;
    /// Framing broken: the control stream ended mid-frame, or a length that
    /// cannot be a frame.
    pub const PROTOCOL: u32 = 0x2;
    /// A frame over `max_message_bytes`.
    pub const TOO_LARGE: u32 = 0x3;
    /// No `hello` within the idle timeout.
    pub const NO_HELLO: u32 = 0x4;
    /// Admission refused the connection; the reason is `code: message`.
    pub const REFUSED: u32 = 0x5;
    /// No control stream opened within the idle timeout.
    pub const NO_CONTROL_STREAM: u32 = 0x6;
    /// Policy violation: rate-limited messages kept coming.
    pub const POLICY: u32 = 0x7;
    /// A slow consumer: it fell behind on a `disconnect` channel, could not
    /// take a response, or was shed to keep the relay within its budget.
    pub const SLOW_CONSUMER: u32 = 0x8;
    /// A connection serving instances was silent for
    /// `limits.instance_idle_timeout_ms`: presumed gone, its requests fail over.
    pub const INSTANCE_SILENT: u32 = 0x9;
}

/// QUIC application error codes on single bulk streams (STOP_SENDING and
/// RESET_STREAM); the connection carries on.
pub mod stream_code {
    /// The frame on this stream is over `max_message_bytes`.
    pub const TOO_LARGE: u32 = 0x3;
    /// The stream made no progress for `idle_timeout_ms`.
    pub const STALLED: u32 = 0x7;
    /// A transfer's stream: the transfer was cancelled or failed part-way.
    pub const ABORTED: u32 = 0x1;
}

/// A frame's 4-byte big-endian length prefix on its own, for writers that
/// hand the payload to the stream separately (no copy of a large body).
pub fn length_prefix(message: &Bytes) -> Bytes {
    Bytes::copy_from_slice(&(message.len() as u32).to_be_bytes())
}

/// A length-prefixed frame for the control stream.
pub fn frame(message: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(LENGTH_BYTES + message.len());
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Whether `msg` travels on a bulk stream of its own.
pub fn is_bulk(msg: &Msg) -> bool {
    matches!(msg, Msg::Request(_) | Msg::Response(_))
        && msg.data().is_some_and(|data| data.len() >= BULK_THRESHOLD)
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("a frame of {0} bytes is over max_message_bytes")]
    TooLarge(usize),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("the sender reset the stream (code {0}) in the middle of a frame")]
    Reset(u64),
    #[error("the stream made no progress for the idle timeout")]
    Stalled,
    #[error("the connection was lost")]
    Lost,
}

#[cfg(feature = "quinn")]
pub use stream::{FrameReader, read_frame, write_frame};

#[cfg(feature = "quinn")]
mod stream {
    use std::time::Duration;

    use bytes::{Buf, Bytes, BytesMut};

    use super::{FrameError, LENGTH_BYTES, length_prefix};

    /// Reads frames off a long-lived stream (the control stream) in large
    /// chunks: one read of the stream yields every frame it completed, where
    /// [`read_frame`] reads twice per frame (each read takes quinn's
    /// connection lock, which dominates for small messages).
    pub struct FrameReader {
        recv: quinn::RecvStream,
        buffer: BytesMut,
        max: usize,
    }

    /// Bytes asked of quinn per read.
    const READ_CHUNK: usize = 64 * 1024;

    impl FrameReader {
        pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
            Self {
                recv,
                buffer: BytesMut::new(),
                max,
            }
        }

        /// The next frame: `Ok(None)` when the stream finished cleanly
        /// between frames. Cancel-safe: what was read stays buffered.
        pub async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
            loop {
                if self.buffer.len() >= LENGTH_BYTES {
                    let length =
                        u32::from_be_bytes(self.buffer[..LENGTH_BYTES].try_into().expect("4"))
                            as usize;
                    if length > self.max {
                        return Err(FrameError::TooLarge(length));
                    }
                    if self.buffer.len() >= LENGTH_BYTES + length {
                        self.buffer.advance(LENGTH_BYTES);
                        return Ok(Some(self.buffer.split_to(length).freeze()));
                    }
                }
                match self.recv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk.bytes),
                    Ok(None) if self.buffer.is_empty() => return Ok(None),
                    Ok(None) => return Err(FrameError::Truncated),
                    Err(quinn::ReadError::Reset(code)) => {
                        return Err(FrameError::Reset(code.into_inner()));
                    }
                    Err(_) => return Err(FrameError::Lost),
                }
            }
        }
    }

    /// Writes `message` as one frame, handing it to quinn without copying it
    /// (for large bodies; `frame` + `write_all` copies twice).
    pub async fn write_frame(
        stream: &mut quinn::SendStream,
        message: Bytes,
    ) -> Result<(), quinn::WriteError> {
        stream
            .write_all_chunks(&mut [length_prefix(&message), message])
            .await
    }

    /// Reads one frame from `recv`: `Ok(None)` when the stream finished
    /// cleanly before a frame began. With `stall`, each read must make
    /// progress within it.
    pub async fn read_frame(
        recv: &mut quinn::RecvStream,
        max: usize,
        stall: Option<Duration>,
    ) -> Result<Option<Bytes>, FrameError> {
        let mut length = [0u8; LENGTH_BYTES];
        match read_full(recv, &mut length, stall).await? {
            0 => return Ok(None),
            LENGTH_BYTES => {}
            _ => return Err(FrameError::Truncated),
        }
        let length = u32::from_be_bytes(length) as usize;
        if length > max {
            return Err(FrameError::TooLarge(length));
        }
        let mut body = vec![0u8; length];
        if read_full(recv, &mut body, stall).await? < length {
            return Err(FrameError::Truncated);
        }
        Ok(Some(Bytes::from(body)))
    }

    /// Fills `buf` unless the stream finishes first; returns the bytes read.
    async fn read_full(
        recv: &mut quinn::RecvStream,
        buf: &mut [u8],
        stall: Option<Duration>,
    ) -> Result<usize, FrameError> {
        let mut filled = 0;
        while filled < buf.len() {
            let read = recv.read(&mut buf[filled..]);
            let read = match stall {
                Some(limit) => tokio::time::timeout(limit, read)
                    .await
                    .map_err(|_| FrameError::Stalled)?,
                None => read.await,
            };
            match read {
                Ok(Some(n)) => filled += n,
                Ok(None) => break,
                Err(quinn::ReadError::Reset(code)) => {
                    return Err(FrameError::Reset(code.into_inner()));
                }
                Err(_) => return Err(FrameError::Lost),
            }
        }
        Ok(filled)
    }
}
