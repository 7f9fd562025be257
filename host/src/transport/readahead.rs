//! Read-ahead that costs nothing while a connection is idle.
//!
//! Idle connections dominate a relay's memory, so the WebSocket layer reads
//! with a small buffer (a few KiB per connection). A peer streaming a large
//! body would then cost one system call per few KiB. [`ReadAhead`] notices a
//! burst — a read that filled the caller's whole buffer — and from then on
//! reads from the socket in [`CHUNK`]-sized pieces, handing them out from
//! its own buffer. The buffer exists only during the burst: it is freed as
//! soon as a read comes up short or the socket has nothing to give.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much is read from the socket at once during a burst.
pub const CHUNK: usize = 64 * 1024;

pub struct ReadAhead<S> {
    inner: S,
    /// Present only during a burst.
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    bursting: bool,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buffer: None,
            start: 0,
            end: 0,
            bursting: false,
        }
    }

    /// Whether a read-ahead buffer is held right now.
    pub fn is_buffering(&self) -> bool {
        self.buffer.is_some()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Copies buffered bytes to `dst`; frees the buffer once it is drained
    /// and the burst is over.
    fn drain_into(&mut self, dst: &mut ReadBuf<'_>) {
        let Some(buffer) = &self.buffer else { return };
        let n = dst.remaining().min(self.end - self.start);
        dst.put_slice(&buffer[self.start..self.start + n]);
        self.start += n;
        if self.start == self.end && !self.bursting {
            self.buffer = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start < this.end {
            this.drain_into(dst);
            return Poll::Ready(Ok(()));
        }
        let wanted = dst.remaining();
        if !this.bursting || wanted >= CHUNK {
            let before = dst.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
            let read = dst.filled().len() - before;
            // A read that fills the caller's buffer means more is waiting.
            this.bursting = read > 0 && read == wanted && wanted < CHUNK;
            return Poll::Ready(Ok(()));
        }
        let buffer = this
            .buffer
            .get_or_insert_with(|| vec![0; CHUNK].into_boxed_slice());
        let mut chunk = ReadBuf::new(buffer);
        match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
            Poll::Pending => {
                // The burst is over: hold no memory while waiting.
                this.bursting = false;
                this.buffer = None;
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => {
                this.bursting = false;
                this.buffer = None;
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Ok(())) => {}
        }
        let read = chunk.filled().len();
        this.start = 0;
        this.end = read;
        // A short read means the peer's burst has ended (or, at 0, the stream).
        this.bursting = read == CHUNK;
        this.drain_into(dst);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_burst_is_read_ahead_in_chunks_and_the_buffer_freed_after() {
        let (mut writer, reader) = tokio::io::duplex(4 * CHUNK);
        let mut reader = ReadAhead::new(reader);
        let sent: Vec<u8> = (0..3 * CHUNK + 100).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        let mut received = Vec::new();
        let mut small = [0u8; 4096];
        let mut buffered_at_some_point = false;
        while received.len() < sent.len() {
            let n = reader.read(&mut small).await.unwrap();
            assert!(n > 0);
            received.extend_from_slice(&small[..n]);
            buffered_at_some_point |= reader.is_buffering();
        }
        assert_eq!(received, sent, "every byte, in order");
        assert!(buffered_at_some_point, "a burst is read in chunks");
        assert!(!reader.is_buffering(), "a short read ends the burst");

        // Idle, then a small message: read straight through, nothing held.
        writer.write_all(b"hello").await.unwrap();
        let n = reader.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello");
        assert!(!reader.is_buffering());
        drop(writer);
        assert_eq!(reader.read(&mut small).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn waiting_mid_burst_holds_no_buffer() {
        let (mut writer, reader) = tokio::io::duplex(4 * CHUNK);
        let mut reader = ReadAhead::new(reader);
        // Exactly two chunks and a bit: the burst's reads come up full, then
        // the socket has nothing more for a while.
        writer
            .write_all(&vec![7u8; 2 * CHUNK + 4096])
            .await
            .unwrap();
        let mut small = [0u8; 4096];
        let mut total = 0;
        while total < 2 * CHUNK + 4096 {
            total += reader.read(&mut small).await.unwrap();
        }
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            reader.read(&mut small),
        )
        .await;
        assert!(pending.is_err(), "nothing to read");
        assert!(!reader.is_buffering(), "no buffer held while waiting");
        writer.write_all(b"more").await.unwrap();
        let n = reader.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"more");
    }
}
