//! A byte stream wrapper that counts traffic into the connection's table row
//! and the relay-wide metrics. It sits under hyper, so it keeps counting after
//! a WebSocket upgrade, and the figures include all framing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::delivery::table::ConnInfo;
use crate::metrics::Metrics;

pub struct CountingIo<S> {
    inner: S,
    conn: Arc<ConnInfo>,
    metrics: Arc<Metrics>,
}

impl<S> CountingIo<S> {
    pub fn new(inner: S, conn: Arc<ConnInfo>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            conn,
            metrics,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.conn.bytes_in.fetch_add(n, Ordering::Relaxed);
            self.metrics.bytes_in(n);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.conn.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.metrics.bytes_out(n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.conn.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.metrics.bytes_out(n as u64);
        }
        poll
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
