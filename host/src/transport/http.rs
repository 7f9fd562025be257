//! The TCP listener and HTTP routing: accepts connections (each gets a row in
//! the connection table), serves HTTP/1.1 and HTTP/2 with hyper, and sends each
//! request to its endpoint — the browser page, health, WebSocket upgrade, the
//! spaces API and ingress, and the admin endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::admit::{Accepted, Admissions};
use super::body::StreamEnd;
use super::io::CountingIo;
use super::readahead::ReadAhead;
use super::tls::Certificates;
use crate::admin;
use crate::hooks::{Handshake, Route, RouteInput};
use crate::metrics::RefusedFor;
use crate::protocol::{Data, ErrorCode, Request};
use crate::quota::Refusal;
use crate::relay::Relay;
use crate::session::table::{ConnGuard, ConnState};
use crate::spaces::Caller;

pub type Body = Full<Bytes>;

/// The browser page served at `/` (also an example people copy).
const INDEX_HTML: &str = include_str!("../../../examples/browser/index.html");
/// Header by which an HTTP caller asks for a deadline shorter than the default.
pub const TIMEOUT_HEADER: &str = "x-wasmrelay-timeout-ms";
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
        let relay_tasks = relay.tasks.clone();
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
            route(relay.clone(), guard.clone(), refusal.clone(), req)
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

async fn route(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    refusal: Option<Arc<Refusal>>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(3, '/').collect();
    if path != "/ws" {
        guard.info().set_state(ConnState::Open);
    }
    let method = req.method().clone();
    if let Some(refusal) = refusal {
        let operator = matches!(segments.as_slice(), ["admin", ..] | ["metrics"])
            && admin::authorize(&relay, req.headers()).is_ok();
        if !operator && segments.as_slice() != ["healthz"] {
            let mut response = refusal_response(&refusal);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
    }
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => html(INDEX_HTML),
        (&Method::GET, ["healthz"]) => health(&relay),
        (_, ["ws"]) => super::ws::upgrade(relay, guard, req),
        (&Method::GET, ["spaces"]) => json(StatusCode::OK, &relay.spaces.list()),
        (&Method::GET, ["spaces", name]) => match relay.spaces.info(name) {
            Some(info) => json(StatusCode::OK, &info),
            None => json_error(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownSpace,
                &format!("no space named {name:?}"),
            ),
        },
        (_, ["spaces", name]) => {
            let name = (*name).to_owned();
            ingress(relay, guard, name, "/".to_owned(), req).await
        }
        (_, ["spaces", name, rest]) => {
            let (name, rest) = ((*name).to_owned(), format!("/{rest}"));
            ingress(relay, guard, name, rest, req).await
        }
        (_, ["admin", "plugins", ..]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                // The path is split in three at most; the last piece holds the rest.
                let rest: Vec<&str> = path.trim_start_matches('/').split('/').skip(2).collect();
                match rest.as_slice() {
                    [] | [""] => admin::plugins(&relay, req, None, None).await,
                    [name] => admin::plugins(&relay, req, Some(name), None).await,
                    [name, action] => admin::plugins(&relay, req, Some(name), Some(action)).await,
                    _ => json_error(
                        StatusCode::NOT_FOUND,
                        ErrorCode::NotFound,
                        "no such plugin endpoint",
                    ),
                }
            }
        }
        (_, ["admin", ..]) | (_, ["metrics"]) => {
            if let Err(denied) = admin::authorize(&relay, req.headers()) {
                denied
            } else {
                admin::route(&relay, &method, &segments)
            }
        }
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no endpoint {method} {path}"),
        ),
    };
    Ok(response)
}

fn health(relay: &Relay) -> hyper::Response<Body> {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
    }
    if relay.is_draining() {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Health { status: "draining" },
        )
    } else {
        json(StatusCode::OK, &Health { status: "ok" })
    }
}

/// Relays an HTTP request to an instance of `space` and returns its response.
async fn ingress(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    space: String,
    path: String,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    if relay.is_draining() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the relay is shutting down and takes no new requests",
        );
    }
    // Every HTTP request is admitted and charged like a WebSocket request:
    // keep-alive connections must not carry one verdict for all their requests.
    let handshake = Handshake {
        peer: guard.info().peer,
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers: req.headers(),
    };
    let grant = match relay.admit_policy(&handshake) {
        Ok(grant) => grant,
        Err(refusal) => return refusal_response(&refusal),
    };
    if let Err(throttled) = relay.quotas.check_request(grant.as_ref(), &space) {
        relay.metrics.message_throttled();
        let mut response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            &format!("over the {} rate; try again later", throttled.scope),
        );
        set_retry_after(&mut response, throttled.retry_after);
        return response;
    }
    guard.info().record_grant(grant);
    let timeout_ms = match req.headers().get(TIMEOUT_HEADER).map(parse_timeout) {
        None => None,
        Some(Ok(ms)) => Some(ms),
        Some(Err(())) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadMessage,
                &format!("{TIMEOUT_HEADER} must be a positive number of milliseconds"),
            );
        }
    };
    let (parts, body) = req.into_parts();
    // Small bodies travel inline; larger ones (or of unknown length) are
    // streamed to the instance once it is chosen, as it takes them.
    let streamed = body
        .size_hint()
        .exact()
        .is_none_or(|length| length > super::body::STREAM_OVER);
    let (data, body) = if streamed {
        (Bytes::new(), Some(body))
    } else {
        match Limited::new(body, super::body::STREAM_OVER as usize)
            .collect()
            .await
        {
            Ok(collected) => (collected.to_bytes(), None),
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadFrame,
                    &format!("could not read the request body: {e}"),
                );
            }
        }
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            !is_hop_by_hop(name) && *name != header::HOST && name.as_str() != TIMEOUT_HEADER
        })
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .collect();
    let space = match relay.router().route(&RouteInput::Request {
        space: &space,
        method: parts.method.as_str(),
        path: &path,
        headers: &headers,
    }) {
        Route::Pass => space,
        Route::Rewrite { target } => target,
        Route::Reject { code, reason } => {
            return json_error(status_for(code), code, &reason);
        }
    };
    let mut headers = headers;
    // A caller's credentials are for the relay, not for whoever registered
    // the space, unless the operator says the space's instances need them.
    if !crate::config::matches_any(&relay.config.spaces.forward_credentials, &space) {
        headers.retain(|(name, _)| !is_credential(name));
    }
    let request = Request {
        id: String::new(),
        space,
        method: parts.method.as_str().to_owned(),
        path,
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers,
        timeout_ms,
        stream: streamed,
        data: Data(data),
    };
    let deadline = tokio::time::Instant::now()
        + timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::MAX)
            .min(relay.config.request_timeout());
    let (reply_tx, reply_rx) = oneshot::channel();
    let id = match relay.spaces.dispatch(request, Caller::Http(reply_tx)) {
        Ok(id) => id,
        Err(e) => return json_error(status_for(e.code), e.code, &e.message),
    };
    // If the HTTP client disconnects, hyper drops this future; the guard then
    // cancels the request instead of leaving it pending until its deadline.
    let _abandon = AbandonOnDrop { relay: &relay, id };
    if let Some(body) = body {
        let max = relay.config.limits.max_body_bytes;
        match super::body::stream_body(&relay, id, body, max, deadline).await {
            // The outcome follows: a response, or the deadline's timeout.
            StreamEnd::Complete | StreamEnd::RequestEnded | StreamEnd::TimedOut => {}
            StreamEnd::TooLarge => {
                relay.spaces.abandon(id);
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::TooLarge,
                    &format!("request body larger than max_body_bytes ({max})"),
                );
            }
            StreamEnd::Broken(e) => {
                relay.spaces.abandon(id);
                return json_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadFrame,
                    &format!("the request body broke off: {e}"),
                );
            }
        }
    }
    match reply_rx.await {
        Ok(Ok(response)) => {
            let status = StatusCode::from_u16(response.status)
                .ok()
                .filter(|s| !s.is_informational());
            let Some(status) = status else {
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::BadResponse,
                    &format!(
                        "the instance answered with invalid status {}",
                        response.status
                    ),
                );
            };
            let mut out = hyper::Response::new(Full::new(response.data.0));
            *out.status_mut() = status;
            for (name, value) in &response.headers {
                let (Ok(name), Ok(value)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) else {
                    continue;
                };
                if !is_hop_by_hop(&name) && name != header::CONTENT_LENGTH {
                    out.headers_mut().append(name, value);
                }
            }
            out
        }
        Ok(Err(e)) => json_error(status_for(e.code), e.code, &e.message),
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the request was dropped without an outcome",
        ),
    }
}

/// Cancels a still-pending request when dropped; harmless once it finished.
struct AbandonOnDrop<'a> {
    relay: &'a Relay,
    id: u64,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        self.relay.spaces.abandon(self.id);
    }
}

fn parse_timeout(value: &HeaderValue) -> Result<u64, ()> {
    value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .ok_or(())
}

/// Headers that carry the caller's credentials (names are lower-case here).
fn is_credential(name: &str) -> bool {
    matches!(name, "authorization" | "cookie")
}

fn is_hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

pub fn status_for(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub fn json(status: StatusCode, value: &impl Serialize) -> hyper::Response<Body> {
    let body = serde_json::to_vec(value).expect("our JSON types always serialize");
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The JSON error body every HTTP endpoint uses: `{"error":{"code","message"}}`.
/// The answer to a refused connection or request: its status and JSON
/// error, with Retry-After (whole seconds, rounded up) when there is one.
pub fn refusal_response(refusal: &crate::quota::Refusal) -> hyper::Response<Body> {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = json_error(status, refusal.code, &refusal.reason);
    if let Some(wait) = refusal.retry_after {
        set_retry_after(&mut response, wait);
    }
    response
}

/// Retry-After in whole seconds, rounded up (HTTP has no finer unit).
fn set_retry_after(response: &mut hyper::Response<Body>, wait: Duration) {
    let seconds = u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
}

pub fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> hyper::Response<Body> {
    #[derive(Serialize)]
    struct Wrapper<'a> {
        error: Inner<'a>,
    }
    #[derive(Serialize)]
    struct Inner<'a> {
        code: ErrorCode,
        message: &'a str,
    }
    json(
        status,
        &Wrapper {
            error: Inner { code, message },
        },
    )
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn html(page: &'static str) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(page.as_bytes())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
