//! The TCP listener and HTTP connections: accepts connections (each gets a
//! row in the connection table and its place under the caps), applies the
//! header and TLS deadlines, and serves HTTP/1.1 and HTTP/2 with hyper,
//! handing each request to [`router`]. The endpoints live beside it:
//! [`ingress`] (requests into spaces), [`files`] (tus uploads and ranged
//! downloads), [`admin`] (the operator API), and
//! `transport::reply` (the JSON and error bodies they all answer with).

mod admin;
mod files;
mod ingress;
mod router;
mod tasks;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::delivery::table::ConnGuard;
use crate::metrics::RefusedFor;
use crate::quota::Refusal;
use crate::state::Relay;
use crate::transport::admit::{Accepted, Admissions};
use crate::transport::io::CountingIo;
use crate::transport::readahead::ReadAhead;
use crate::transport::tls::Certificates;

pub use super::reply::Body;
pub use ingress::TIMEOUT_HEADER;
/// How long an HTTP connection may take to finish once the relay is closing.
const HTTP_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Shortest gap between two warnings about refused or failed accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections until the relay starts draining; with `tls`, each
/// connection is a TLS one (https, wss) using the current certificate.
///
/// Every connection takes its place under the relay-wide and per-address
/// caps as it is accepted, before any protocol runs. One over a cap is
/// answered with the refusal (503 / 429 and `Retry-After`) for whatever it
/// asks, except `/healthz` and authorized operator calls, so an operator is
/// never locked out of a full relay; then it is closed.
pub async fn accept_loop(relay: Arc<Relay>, listener: TcpListener, tls: Option<Arc<Certificates>>) {
    let admissions = Admissions::default();
    let mut warnings = Warnings::default();
    // One descriptor kept in reserve: at the open-file limit it is given up
    // to accept and at once close a connection, so clients are refused
    // promptly instead of waiting in the kernel's backlog.
    let mut reserve = FdReserve::open();
    loop {
        let accepted = tokio::select! {
            _ = relay.draining().cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                let out_of_files = reserve.is_out_of_files(&e);
                if out_of_files {
                    reserve.shed_one(&listener).await;
                }
                warnings.warn(|suppressed| {
                    tracing::warn!(error = %e, out_of_files, suppressed, "accept failed; refusing connections");
                });
                if !out_of_files {
                    // Some other failure: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let (guard, refusal) = match admissions.accept(&relay, peer, local) {
            Accepted::Admitted(guard) => (guard, None),
            Accepted::Refusing(guard, refusal) => {
                warnings.warn(|suppressed| {
                    tracing::warn!(%peer, reason = %refusal.reason, suppressed, "connection refused");
                });
                (guard, Some(Arc::new(refusal)))
            }
            Accepted::Dropped(refusal) => {
                warnings.warn(|suppressed| {
                    tracing::warn!(%peer, reason = %refusal.reason, suppressed, "connection refused (closed unanswered: too many refusals in progress)");
                });
                continue;
            }
        };
        let guard = Arc::new(guard);
        relay.metrics.connection_accepted();
        let span = tracing::debug_span!("conn", id = guard.info().id, %peer);
        let relay_tasks = relay.conn_tasks.clone();
        let tls = tls.clone();
        let relay = relay.clone();
        let stream = ReadAhead::new(stream);
        let connection = async move {
            match tls {
                None => serve_connection(relay, stream, guard, refusal).await,
                Some(tls) => {
                    let handshake = tls.acceptor().accept(stream);
                    match tokio::time::timeout(relay.config.tls_handshake_timeout(), handshake)
                        .await
                    {
                        Ok(Ok(stream)) => serve_connection(relay, stream, guard, refusal).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => {
                            relay.metrics.refused(RefusedFor::SlowHandshake);
                            tracing::debug!("TLS handshake timed out");
                        }
                    }
                }
            }
        };
        relay_tasks.spawn(tracing::Instrument::instrument(connection, span));
    }
    tracing::info!("stopped accepting connections");
}

/// Rate-limits a warning that a flood would otherwise repeat thousands of
/// times a second; says how many were left out.
#[derive(Default)]
struct Warnings {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Warnings {
    fn warn(&mut self, emit: impl FnOnce(u64)) {
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        emit(self.suppressed);
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// A spare file descriptor for refusing connections at the open-file limit.
struct FdReserve(Option<std::fs::File>);

impl FdReserve {
    fn open() -> Self {
        Self(std::fs::File::open("/dev/null").ok())
    }

    fn is_out_of_files(&self, error: &std::io::Error) -> bool {
        // EMFILE (process) and ENFILE (system) on Linux.
        matches!(error.raw_os_error(), Some(24) | Some(23))
    }

    /// Frees the spare descriptor, accepts one waiting connection and closes
    /// it at once, then takes the spare back.
    async fn shed_one(&mut self, listener: &TcpListener) {
        self.0 = None;
        if let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
        {
            drop(stream);
        }
        *self = Self::open();
    }
}

async fn serve_connection<S>(
    relay: Arc<Relay>,
    stream: S,
    guard: Arc<ConnGuard>,
    refusal: Option<Arc<Refusal>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(CountingIo::new(
        stream,
        guard.info().clone(),
        relay.metrics.clone(),
    ));
    // Cancelled by the first request; until then the header deadline runs.
    let first_request = CancellationToken::new();
    let refusing = refusal.is_some();
    let service = {
        let relay = relay.clone();
        let guard = guard.clone();
        let first_request = first_request.clone();
        service_fn(move |req| {
            first_request.cancel();
            router::route(relay.clone(), guard.clone(), refusal.clone(), req)
        })
    };
    let limits = &relay.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(relay.config.header_timeout())
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(!refusing);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let header_deadline = no_request_within(&first_request, relay.config.header_timeout());
    tokio::pin!(header_deadline);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = relay.closing().cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(HTTP_CLOSE_WAIT, conn).await.unwrap_or(Ok(()))
        }
        () = &mut header_deadline => {
            relay.metrics.refused(RefusedFor::SlowHandshake);
            tracing::debug!("closed: no complete request within server.header_timeout_ms");
            return;
        }
        // A refused connection gets its one answer, then is closed.
        _ = first_request.cancelled(), if refusing => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(HTTP_CLOSE_WAIT, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        // hyper's own header deadline, for a later request on a kept-alive connection
        // or a first one it already started reading.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            relay.metrics.refused(RefusedFor::SlowHandshake);
        }
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Resolves once `limit` has passed without the first request; never after it.
async fn no_request_within(first_request: &CancellationToken, limit: Duration) {
    tokio::select! {
        _ = first_request.cancelled() => std::future::pending().await,
        _ = tokio::time::sleep(limit) => {}
    }
}
