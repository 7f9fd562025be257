//! `/files/`: uploads by the tus 1.0.0 protocol ([`tus`]) and downloads
//! with byte ranges ([`download`]), over the relay's file storage
//! (`transfer::storage`). This module finds out who the caller is: every
//! request is admitted by the policy like any other HTTP request, and
//! charged to the user's rate as class `files`; what they may then do is
//! `transfer::access`'s rule.

mod download;
mod operator;
mod range;
mod tus;

use std::sync::Arc;

use http::{HeaderValue, Method, StatusCode};
use hyper::body::Incoming;

use crate::delivery::table::ConnGuard;
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::files::FileRow;
use crate::transfer::access::{self, Refused, Who};
use crate::transfer::storage::FileError;
use crate::transport::reply::{Body, json_error, status_for};

pub(super) use operator::route as operator;
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
    fn who(&self) -> Option<Who<'_>> {
        (!self.user.is_empty()).then_some(Who {
            user: &self.user,
            tier: &self.tier,
        })
    }
}

/// The policy's verdict and the user's rate, as for any HTTP request.
fn admit(
    relay: &Relay,
    guard: &ConnGuard,
    req: &hyper::Request<Incoming>,
) -> Result<Caller, Early> {
    let grant = super::ingress::admit_request(relay, guard, req, "files")?;
    Ok(match &grant {
        Some(grant) => Caller {
            user: grant.user.clone(),
            tier: grant.tier.clone(),
        },
        None => Caller {
            user: String::new(),
            tier: String::new(),
        },
    })
}

/// A transfer refusal as the JSON error.
fn refused(refused: Refused) -> Early {
    early(status_for(refused.code), refused.code, &refused.reason)
}

/// The caller's own file or upload; anyone else's is reported missing.
async fn own_file(relay: &Relay, caller: &Caller, id: &str) -> Result<FileRow, Early> {
    let file = relay.files.info(id).await.map_err(file_error)?;
    access::owns(caller.who(), &file).map_err(refused)?;
    Ok(file)
}

/// A storage refusal as the JSON error with its documented code.
fn file_error(error: FileError) -> Early {
    let code = error.code();
    if code == ErrorCode::Internal {
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            "file storage failed"
        );
    }
    early(status_for(code), code, &error.to_string())
}

/// A millisecond wall-clock time as an HTTP date.
fn http_date(wall_ms: i64) -> HeaderValue {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(wall_ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).expect("an HTTP date is a valid header")
}
