//! The operator's side of files (admin token): put a file on the relay,
//! offer it to a user, a channel or a session (push), and follow offers'
//! delivery states.
//!
//! - `POST /admin/files?name=NAME` with the bytes as the body → 201, the file
//! - `GET|DELETE /admin/files/{id}`
//! - `POST /admin/offers` `{"file", "to": {"user"|"channel"|"session": …}, "ttl_ms"}` → 201
//! - `GET /admin/offers?file=&state=&limit=`, `GET /admin/offers/{id}`

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use serde::Deserialize;

use super::{Response, file_error};
use crate::protocol::{ErrorCode, Target};
use crate::state::Relay;
use crate::store::files::FileRow;
use crate::transfer::access;
use crate::transport::reply::{json, json_error, status_for};

/// Who files the operator puts on the relay belong to.
pub const OPERATOR: &str = "operator";

/// The largest offer request body.
const MAX_OFFER_BODY: usize = 16 * 1024;

pub(in crate::transport::http) async fn route(
    relay: Arc<Relay>,
    req: hyper::Request<Incoming>,
) -> Response {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let answer = match (&method, segments.as_slice()) {
        (&Method::POST, ["admin", "files"]) => put(&relay, req).await,
        (&Method::GET, ["admin", "files", id]) => match relay.files.info(id).await {
            Ok(file) => Ok(json(StatusCode::OK, &describe(&file))),
            Err(e) => Err(file_error(e)),
        },
        (&Method::DELETE, ["admin", "files", id]) => match relay.files.delete(id).await {
            Ok(()) => Ok(json(StatusCode::OK, &serde_json::json!({ "deleted": id }))),
            Err(e) => Err(file_error(e)),
        },
        (&Method::POST, ["admin", "offers"]) => offer(&relay, req).await,
        (&Method::GET, ["admin", "offers"]) => list(&relay, req.uri().query()).await,
        (&Method::GET, ["admin", "offers", id]) => match relay.offers.get(id).await {
            Ok(Some(offer)) => Ok(json(StatusCode::OK, &offer)),
            Ok(None) => Err(Box::new(json_error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such offer",
            ))),
            Err(e) => Err(internal(&e)),
        },
        _ => Err(Box::new(json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no admin endpoint {method} {path}"),
        ))),
    };
    answer.unwrap_or_else(|early| *early)
}

fn describe(file: &FileRow) -> serde_json::Value {
    serde_json::json!({
        "id": file.id,
        "owner": file.owner,
        "name": access::name(&access::metadata(file)),
        "size": file.length,
        "offset": file.offset,
        "sha256": file.sha256,
        "expires_at_ms": file.expires_at_ms,
    })
}

fn internal(error: &(dyn std::error::Error + 'static)) -> Box<Response> {
    tracing::warn!(error, "operator file request failed");
    Box::new(json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        &error.to_string(),
    ))
}

fn bad(message: &str) -> Box<Response> {
    Box::new(json_error(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadMessage,
        message,
    ))
}

/// `POST /admin/files?name=NAME`: the body, of a known length, becomes a
/// finished file owned by the operator.
async fn put(relay: &Arc<Relay>, req: hyper::Request<Incoming>) -> Result<Response, Box<Response>> {
    let name = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("name=")))
        .map(|n| {
            percent_encoding::percent_decode_str(&n.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let Some(length) = req.body().size_hint().exact() else {
        return Err(bad("send the file with a Content-Length"));
    };
    let mut metadata = BTreeMap::new();
    if !name.is_empty() {
        metadata.insert("filename".to_owned(), name);
    }
    let file = relay
        .files
        .create(OPERATOR, length, &metadata)
        .await
        .map_err(file_error)?;
    let written = super::tus::write(relay, &file.id, 0, None, req.into_body())
        .await
        .map_err(file_error)?;
    if written.sha256.is_none() {
        let _ = relay.files.delete(&file.id).await;
        return Err(bad("the body ended before Content-Length bytes"));
    }
    Ok(json(StatusCode::CREATED, &describe(&written)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferRequest {
    file: String,
    to: Target,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// `POST /admin/offers`: offers a file (anyone's) as the operator.
async fn offer(relay: &Relay, req: hyper::Request<Incoming>) -> Result<Response, Box<Response>> {
    let body = Limited::new(req.into_body(), MAX_OFFER_BODY)
        .collect()
        .await
        .map_err(|e| bad(&format!("cannot read the body: {e}")))?
        .to_bytes();
    let request: OfferRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(&format!(
            "expected {{\"file\": ID, \"to\": {{\"user\"|\"channel\"|\"session\": NAME}}, \"ttl_ms\": N}}: {e}"
        ))
    })?;
    match relay
        .offers
        .offer(OPERATOR, &request.file, request.to, request.ttl_ms)
        .await
    {
        Ok((offer, delivered)) => Ok(json(
            StatusCode::CREATED,
            &serde_json::json!({ "offer": offer, "delivered": delivered }),
        )),
        Err(e) => {
            let code = e.code();
            if code == ErrorCode::Internal {
                return Err(internal(&e));
            }
            Err(Box::new(json_error(status_for(code), code, &e.to_string())))
        }
    }
}

async fn list(relay: &Relay, query: Option<&str>) -> Result<Response, Box<Response>> {
    let mut file = None;
    let mut state = None;
    let mut limit = 100usize;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("file", v)) => file = Some(v.to_owned()),
            Some(("state", v)) => state = Some(v.to_owned()),
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| bad("limit must be a number"))?
                    .clamp(1, 1000)
            }
            _ => {
                return Err(bad(&format!(
                    "unknown query parameter {pair:?} (file, state, limit)"
                )));
            }
        }
    }
    let offers = relay
        .offers
        .list(file, state, limit)
        .await
        .map_err(|e| internal(&e))?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "offers": offers }),
    ))
}
