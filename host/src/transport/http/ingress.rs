//! HTTP ingress: a request to `/spaces/{space}/{path}` becomes a protocol
//! request to an instance of the space (after the router hook), its body
//! streamed to the instance, and the instance's response comes back as the
//! HTTP response; a caller that hangs up cancels it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use tokio::sync::oneshot;

use crate::delivery::table::ConnGuard;
use crate::hooks::{Handshake, Route, RouteInput};
use crate::protocol::{Data, ErrorCode, Request};
use crate::spaces::{Caller, HttpBody, Reply};
use crate::state::Relay;
use crate::transport::body::{self, StreamEnd};
use crate::transport::reply::{Body, json_error, refusal_response, set_retry_after, status_for};

/// Header by which an HTTP caller asks for a deadline shorter than the default.
pub const TIMEOUT_HEADER: &str = "x-wasmrelay-timeout-ms";

/// An answer that ends the request early: a refusal or an error. Boxed, so
/// the happy path does not carry a whole response in every `Result`.
type Early = Box<hyper::Response<Body>>;

fn early(status: StatusCode, code: ErrorCode, message: &str) -> Early {
    Box::new(json_error(status, code, message))
}

/// Relays an HTTP request to an instance of `space` and returns its response.
pub(super) async fn ingress(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    space: String,
    path: String,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    match relay_request(&relay, &guard, space, path, req).await {
        Ok(response) => response,
        Err(early) => *early,
    }
}

async fn relay_request(
    relay: &Arc<Relay>,
    guard: &ConnGuard,
    space: String,
    path: String,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, Early> {
    admit(relay, guard, &space, &req)?;
    let timeout_ms = requested_timeout(req.headers())?;
    let (parts, body) = req.into_parts();
    let (data, body) = take_body(body).await?;
    let headers = forwarded_headers(&parts.headers);
    let space = match relay.router().route(&RouteInput::Request {
        space: &space,
        method: parts.method.as_str(),
        path: &path,
        headers: &headers,
    }) {
        Route::Pass => space,
        Route::Rewrite { target } => target,
        Route::Reject { code, reason } => return Err(early(status_for(code), code, &reason)),
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
        stream: body.is_some(),
        data: Data(data),
    };
    let deadline = tokio::time::Instant::now()
        + timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::MAX)
            .min(relay.config.request_timeout());
    let (reply_tx, reply_rx) = oneshot::channel();
    let id = relay
        .spaces
        .dispatch(request, Caller::Http(reply_tx))
        .map_err(|e| early(status_for(e.code), e.code, &e.message))?;
    // If the HTTP client disconnects, hyper drops this future; the guard then
    // cancels the request instead of leaving it pending until its deadline.
    let _abandon = AbandonOnDrop { relay, id };
    if let Some(body) = body {
        send_body(relay, id, body, deadline).await?;
    }
    match reply_rx.await {
        Ok(Ok(reply)) => http_response(reply),
        Ok(Err(e)) => Err(early(status_for(e.code), e.code, &e.message)),
        Err(_) => Err(early(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the request was dropped without an outcome",
        )),
    }
}

/// Every HTTP request is admitted and charged like a WebSocket request:
/// keep-alive connections must not carry one verdict for all their requests.
fn admit(
    relay: &Relay,
    guard: &ConnGuard,
    space: &str,
    req: &hyper::Request<Incoming>,
) -> Result<(), Early> {
    if relay.is_draining() {
        return Err(early(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the relay is shutting down and takes no new requests",
        ));
    }
    admit_request(relay, guard, req, space).map(|_| ())
}

/// The policy's verdict on one HTTP request and the user's rate for
/// `class` (a space, or `files`); the grant, also recorded on the
/// connection's row.
pub(super) fn admit_request(
    relay: &Relay,
    guard: &ConnGuard,
    req: &hyper::Request<Incoming>,
    class: &str,
) -> Result<Option<crate::hooks::Grant>, Early> {
    let handshake = Handshake::of(guard.info().peer, req);
    let grant = relay
        .admit_policy(&handshake)
        .map_err(|refusal| Box::new(refusal_response(&refusal)))?;
    if let Err(throttled) = relay.quotas.check_request(grant.as_ref(), class) {
        relay.metrics.message_throttled();
        let mut response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            &format!("over the {} rate; try again later", throttled.scope),
        );
        set_retry_after(&mut response, throttled.retry_after);
        return Err(Box::new(response));
    }
    guard.info().record_grant(grant.clone());
    Ok(grant)
}

/// The caller's deadline from [`TIMEOUT_HEADER`], if it gave one.
fn requested_timeout(headers: &http::HeaderMap) -> Result<Option<u64>, Early> {
    match headers.get(TIMEOUT_HEADER).map(parse_timeout) {
        None => Ok(None),
        Some(Ok(ms)) => Ok(Some(ms)),
        Some(Err(())) => Err(early(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadMessage,
            &format!("{TIMEOUT_HEADER} must be a positive number of milliseconds"),
        )),
    }
}

/// Small bodies travel inline (read here); larger ones, or of unknown
/// length, are streamed to the instance once it is chosen, as it takes them.
async fn take_body(body: Incoming) -> Result<(Bytes, Option<Incoming>), Early> {
    let streamed = body
        .size_hint()
        .exact()
        .is_none_or(|length| length > body::STREAM_OVER);
    if streamed {
        return Ok((Bytes::new(), Some(body)));
    }
    match Limited::new(body, body::STREAM_OVER as usize)
        .collect()
        .await
    {
        Ok(collected) => Ok((collected.to_bytes(), None)),
        Err(e) => Err(early(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            &format!("could not read the request body: {e}"),
        )),
    }
}

/// The caller's headers an instance sees: not hop-by-hop ones, `Host` or
/// the relay's own timeout header.
fn forwarded_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
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
        .collect()
}

/// Streams a large body to the instance request `id` went to.
async fn send_body(
    relay: &Relay,
    id: u64,
    incoming: Incoming,
    deadline: tokio::time::Instant,
) -> Result<(), Early> {
    let max = relay.config.limits.max_body_bytes;
    match body::stream_body(relay, id, incoming, max, deadline).await {
        // The outcome follows: a response, or the deadline's timeout.
        StreamEnd::Complete | StreamEnd::RequestEnded | StreamEnd::TimedOut => Ok(()),
        StreamEnd::TooLarge => {
            relay.spaces.abandon(id);
            Err(early(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                &format!("request body larger than max_body_bytes ({max})"),
            ))
        }
        StreamEnd::Broken(e) => {
            relay.spaces.abandon(id);
            Err(early(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                &format!("the request body broke off: {e}"),
            ))
        }
    }
}

/// The instance's response as the HTTP response (hop-by-hop headers
/// dropped, and its own Content-Length unless it streams: hyper sets the
/// real one); a streamed body follows as the instance sends it.
fn http_response(reply: Reply) -> Result<hyper::Response<Body>, Early> {
    let Reply { response, body } = reply;
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| {
            early(
                StatusCode::BAD_GATEWAY,
                ErrorCode::BadResponse,
                &format!(
                    "the instance answered with invalid status {}",
                    response.status
                ),
            )
        })?;
    let streamed = body.is_some();
    let mut out = hyper::Response::new(match body {
        None => crate::transport::reply::full(response.data.0),
        Some(body) => streamed_body(body),
    });
    *out.status_mut() = status;
    for (name, value) in &response.headers {
        let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        if !is_hop_by_hop(&name) && (streamed || name != header::CONTENT_LENGTH) {
            out.headers_mut().append(name, value);
        }
    }
    Ok(out)
}

/// A streamed response's pieces as they come; a stream that stops before
/// its last piece ends the body with an error (the connection is cut), so
/// the caller never takes a partial body for a whole one.
fn streamed_body(body: HttpBody) -> Body {
    let HttpBody { pieces, complete } = body;
    let frames = futures_util::stream::unfold(Some(pieces), move |state| {
        let complete = complete.clone();
        async move {
            let mut pieces = state?;
            match pieces.recv().await {
                Some(piece) => Some((Ok(Frame::data(piece)), Some(pieces))),
                None if complete.load(std::sync::atomic::Ordering::Acquire) => None,
                None => Some((
                    Err(std::io::Error::other(
                        "the instance's streamed response ended early",
                    )),
                    None,
                )),
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
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
