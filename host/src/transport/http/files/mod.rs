//! `/files/`: uploads by the tus 1.0.0 protocol ([`tus`]) and downloads
//! with byte ranges ([`download`]), over the relay's file storage
//! (`transfer::storage`). This module owns who the caller is and what they
//! may do:
//!
//! - every request is admitted by the policy like any other HTTP request,
//!   and charged to the user's rate as class `files`;
//! - an upload belongs to whoever started it: only they can see, continue
//!   or delete it (to anyone else it does not exist);
//! - starting an upload needs the policy's yes (`may-transfer upload`); a
//!   policy that does not decide transfers allows none;
//! - a finished file can be fetched by its owner (and, once push is built,
//!   by whoever it is offered to); the policy may refuse that
//!   (`may-transfer download`) but cannot open anyone else's file.

mod download;
mod range;
mod tus;

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderValue, Method, StatusCode};
use hyper::body::Incoming;

use crate::delivery::table::ConnGuard;
use crate::hooks::{FileAction, FileSubject, Handshake, MayRegister};
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::files::FileRow;
use crate::transfer::storage::FileError;
use crate::transport::reply::{Body, json_error, refusal_response, set_retry_after, status_for};

pub use tus::TUS_VERSION;

type Response = hyper::Response<Body>;

/// An answer that ends the request early: a refusal or an error.
type Early = Box<Response>;

fn early(status: StatusCode, code: ErrorCode, message: &str) -> Early {
    Box::new(json_error(status, code, message))
}

/// `/files/` and `/files/{id}`.
pub(super) async fn route(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    id: Option<String>,
    req: hyper::Request<Incoming>,
) -> Response {
    let method = req.method().clone();
    let answer = if method == Method::OPTIONS {
        // Discovery needs no credential: it says only what the relay speaks.
        Ok(tus::options(&relay))
    } else {
        match admit(&relay, &guard, &req) {
            Err(refused) => Err(refused),
            Ok(caller) => match (&method, id) {
                (&Method::POST, None) => tus::create(&relay, &caller, req).await,
                (&Method::HEAD, Some(id)) if tus::is_tus(req.headers()) => {
                    tus::status(&relay, &caller, &id, req.headers()).await
                }
                (&Method::PATCH, Some(id)) => tus::patch(&relay, &caller, &id, req).await,
                (&Method::DELETE, Some(id)) => tus::terminate(&relay, &caller, &id, &req).await,
                (&Method::GET | &Method::HEAD, Some(id)) => {
                    download::serve(&relay, &caller, &id, &req).await
                }
                (method, _) => Err(early(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::NotFound,
                    &format!("no endpoint {method} {}", req.uri().path()),
                )),
            },
        }
    };
    let mut response = answer.unwrap_or_else(|early| *early);
    response
        .headers_mut()
        .insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    response
}

/// Who is asking, as the policy named them (empty for a client no policy
/// identified).
struct Caller {
    user: String,
    tier: String,
}

impl Caller {
    fn anonymous(&self) -> bool {
        self.user.is_empty()
    }
}

/// The policy's verdict and the user's rate, as for any HTTP request.
fn admit(
    relay: &Relay,
    guard: &ConnGuard,
    req: &hyper::Request<Incoming>,
) -> Result<Caller, Early> {
    let handshake = Handshake::of(guard.info().peer, req);
    let grant = relay
        .admit_policy(&handshake)
        .map_err(|refusal| Box::new(refusal_response(&refusal)))?;
    if let Err(throttled) = relay.quotas.check_request(grant.as_ref(), "files") {
        relay.metrics.message_throttled();
        let mut response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            &format!("over the {} rate; try again later", throttled.scope),
        );
        set_retry_after(&mut response, throttled.retry_after);
        return Err(Box::new(response));
    }
    let caller = match &grant {
        Some(grant) => Caller {
            user: grant.user.clone(),
            tier: grant.tier.clone(),
        },
        None => Caller {
            user: String::new(),
            tier: String::new(),
        },
    };
    guard.info().record_grant(grant);
    Ok(caller)
}

/// The policy's answer on `action` (an upload), where only its yes lets the caller through.
fn policy_allows(
    relay: &Relay,
    caller: &Caller,
    action: FileAction,
    file: &FileSubject<'_>,
) -> Result<(), Early> {
    let verb = match action {
        FileAction::Upload => "upload",
        FileAction::Download => "download",
        FileAction::Push => "push",
    };
    if caller.anonymous() {
        return Err(early(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            &format!("only a client the policy identified may {verb} files"),
        ));
    }
    match relay
        .admission()
        .may_transfer(&caller.user, &caller.tier, action, file)
    {
        MayRegister::Allow => Ok(()),
        MayRegister::Refuse { code, reason } => Err(early(status_for(code), code, &reason)),
        MayRegister::Undecided => Err(early(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            &format!("the policy does not allow clients to {verb} files"),
        )),
    }
}

/// The caller's own file or upload; anyone else's is reported missing.
async fn own_file(relay: &Relay, caller: &Caller, id: &str) -> Result<FileRow, Early> {
    let file = relay.files.info(id).await.map_err(file_error)?;
    if caller.anonymous() || file.owner != caller.user {
        return Err(file_error(FileError::NotFound));
    }
    Ok(file)
}

/// A file's metadata as stored (the tus `Upload-Metadata` pairs).
fn metadata(file: &FileRow) -> BTreeMap<String, String> {
    serde_json::from_str(&file.metadata).unwrap_or_default()
}

/// The name a file goes by: its `filename` (tus-js-client, Uppy) or `name`.
fn file_name(metadata: &BTreeMap<String, String>) -> &str {
    metadata
        .get("filename")
        .or_else(|| metadata.get("name"))
        .map_or("", String::as_str)
}

/// A storage refusal as the JSON error with its documented code.
fn file_error(error: FileError) -> Early {
    let code = match &error {
        FileError::NotFound => ErrorCode::NotFound,
        FileError::TooLarge { .. } | FileError::BeyondLength(_) => ErrorCode::TooLarge,
        FileError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        FileError::OffsetMismatch { .. } => ErrorCode::OffsetMismatch,
        FileError::Busy => ErrorCode::FileBusy,
        FileError::ChecksumMismatch(_) => ErrorCode::ChecksumMismatch,
        FileError::Body(_) => ErrorCode::BadFrame,
        FileError::Io(_) | FileError::Store(_) => {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "file storage failed"
            );
            ErrorCode::Internal
        }
    };
    early(status_for(code), code, &error.to_string())
}

/// A millisecond wall-clock time as an HTTP date.
fn http_date(wall_ms: i64) -> HeaderValue {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(wall_ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).expect("an HTTP date is a valid header")
}
