//! What HTTP endpoints answer with: JSON bodies, the one JSON error shape
//! (`{"error":{"code","message"}}`), refusals with Retry-After, plain text.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use serde::Serialize;

use crate::protocol::ErrorCode;

/// Every response body: whole (JSON, pages) or streamed (downloads,
/// streamed responses from instances), whose reads can fail.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body held whole in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn status_for(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub fn json(status: StatusCode, value: &impl Serialize) -> hyper::Response<Body> {
    let body = serde_json::to_vec(value).expect("our JSON types always serialize");
    let mut response = hyper::Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

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
pub fn set_retry_after(response: &mut hyper::Response<Body>, wait: Duration) {
    let seconds = u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
}

/// The JSON error body every HTTP endpoint uses: `{"error":{"code","message"}}`.
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

/// The JSON error shape with the field a refusal is about:
/// `{"error":{"code","message","field"}}`.
pub fn json_error_field(
    status: StatusCode,
    code: ErrorCode,
    message: &str,
    field: &str,
) -> hyper::Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message, "field": field } }),
    )
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
