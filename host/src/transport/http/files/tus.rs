//! The tus 1.0.0 resumable upload protocol (<https://tus.io/protocols/resumable-upload>):
//! core (`HEAD` for the offset, `PATCH` to append), and the creation,
//! creation-with-upload, checksum (`sha1`, `sha256`, `crc32c`),
//! termination and expiration extensions. Uploads need a declared length
//! (no creation-defer-length): the whole length is reserved against the
//! quotas when the upload starts.
//!
//! A `PATCH` body is written by a task of its own, so the bytes that arrived
//! before a client hung up are still made durable and counted: the client
//! resumes from there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyDataStream;
use hyper::body::Incoming;

use super::{Caller, Early, Response, early, file_error, http_date, own_file};
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::files::FileRow;
use crate::transfer::access;
use crate::transfer::storage::{Algorithm, Checksum, FileError};
use crate::transport::reply::empty;

pub const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,creation-with-upload,checksum,termination,expiration";
/// The content type of every tus chunk.
const CHUNK_TYPE: &str = "application/offset+octet-stream";

const UPLOAD_OFFSET: &str = "upload-offset";
const UPLOAD_LENGTH: &str = "upload-length";
const UPLOAD_METADATA: &str = "upload-metadata";
const UPLOAD_EXPIRES: &str = "upload-expires";
const UPLOAD_CHECKSUM: &str = "upload-checksum";

/// Whether a request speaks tus (a `HEAD` without it is a download's).
pub(super) fn is_tus(headers: &HeaderMap) -> bool {
    headers.contains_key("tus-resumable")
}

/// `OPTIONS`: what this server supports.
pub(super) fn options(relay: &Relay) -> Response {
    let checksums: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
    let mut response = hyper::Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    headers.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    headers.insert(
        "tus-max-size",
        HeaderValue::from(relay.config.files.max_file_bytes),
    );
    headers.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_str(&checksums.join(",")).expect("algorithm names are tokens"),
    );
    response
}

/// Every request but `OPTIONS` names the version it speaks.
fn check_version(headers: &HeaderMap) -> Result<(), Early> {
    match headers.get("tus-resumable").map(HeaderValue::as_bytes) {
        Some(v) if v == TUS_VERSION.as_bytes() => Ok(()),
        _ => {
            let mut refusal = early(
                StatusCode::PRECONDITION_FAILED,
                ErrorCode::UnsupportedVersion,
                &format!("send Tus-Resumable: {TUS_VERSION}"),
            );
            refusal
                .headers_mut()
                .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
            Err(refusal)
        }
    }
}

/// `POST /files/`: starts an upload (creation), with its first bytes when
/// the body carries them (creation-with-upload).
pub(super) async fn create(
    relay: &Arc<Relay>,
    caller: &Caller,
    req: hyper::Request<Incoming>,
) -> Result<Response, Early> {
    let headers = req.headers();
    check_version(headers)?;
    if relay.is_draining() {
        return Err(early(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the relay is shutting down and takes no new uploads",
        ));
    }
    if headers.contains_key("upload-defer-length") {
        return Err(bad_header(
            "Upload-Defer-Length",
            "is not supported; send Upload-Length",
        ));
    }
    let length = number(headers, UPLOAD_LENGTH)?
        .ok_or_else(|| bad_header("Upload-Length", "is required"))?;
    let metadata = match headers.get(UPLOAD_METADATA) {
        None => BTreeMap::new(),
        Some(value) => parse_metadata(value).map_err(|e| bad_header("Upload-Metadata", &e))?,
    };
    let with_upload = is_chunk(headers);
    let checksum = if with_upload {
        checksum(headers)?
    } else {
        None
    };
    access::may_upload(
        relay.admission(),
        caller.who(),
        access::name(&metadata),
        length,
    )
    .map_err(super::refused)?;
    let file = relay
        .files
        .create(&caller.user, length, &metadata)
        .await
        .map_err(file_error)?;
    let location =
        HeaderValue::from_str(&format!("/files/{}", file.id)).expect("file ids are hex digits");
    if !with_upload {
        let mut response = created(&file);
        response.headers_mut().insert(header::LOCATION, location);
        return Ok(response);
    }
    let (_, body) = req.into_parts();
    match write(relay, &file.id, 0, checksum, body).await {
        Ok(file) => {
            let mut response = created(&file);
            response.headers_mut().insert(header::LOCATION, location);
            Ok(response)
        }
        // The upload exists: say where, so the client can resume it.
        Err(e) => {
            let mut refusal = file_error(e);
            refusal.headers_mut().insert(header::LOCATION, location);
            Err(refusal)
        }
    }
}

fn created(file: &FileRow) -> Response {
    let mut response = hyper::Response::new(empty());
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(file.offset));
    headers.insert(UPLOAD_EXPIRES, http_date(file.expires_at_ms));
    response
}

/// `HEAD /files/{id}` with `Tus-Resumable`: how far the upload has got.
pub(super) async fn status(
    relay: &Relay,
    caller: &Caller,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, Early> {
    check_version(headers)?;
    let file = own_file(relay, caller, id).await?;
    let mut response = hyper::Response::new(empty());
    let out = response.headers_mut();
    out.insert(UPLOAD_OFFSET, HeaderValue::from(file.offset));
    out.insert(UPLOAD_LENGTH, HeaderValue::from(file.length));
    if file.sha256.is_none() {
        out.insert(UPLOAD_EXPIRES, http_date(file.expires_at_ms));
    }
    let metadata = access::metadata(&file);
    if !metadata.is_empty()
        && let Ok(value) = HeaderValue::from_str(&encode_metadata(&metadata))
    {
        out.insert(UPLOAD_METADATA, value);
    }
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `PATCH /files/{id}`: appends the body at `Upload-Offset`.
pub(super) async fn patch(
    relay: &Arc<Relay>,
    caller: &Caller,
    id: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, Early> {
    let headers = req.headers();
    check_version(headers)?;
    if !is_chunk(headers) {
        return Err(early(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadMessage,
            &format!("a PATCH body must be Content-Type: {CHUNK_TYPE}"),
        ));
    }
    let offset = number(headers, UPLOAD_OFFSET)?
        .ok_or_else(|| bad_header("Upload-Offset", "is required"))?;
    let checksum = checksum(headers)?;
    own_file(relay, caller, id).await?;
    let (_, body) = req.into_parts();
    match write(relay, id, offset, checksum, body).await {
        Ok(file) => {
            let mut response = hyper::Response::new(empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            let out = response.headers_mut();
            out.insert(UPLOAD_OFFSET, HeaderValue::from(file.offset));
            if file.sha256.is_none() {
                out.insert(UPLOAD_EXPIRES, http_date(file.expires_at_ms));
            }
            Ok(response)
        }
        Err(e) => {
            let at = match &e {
                FileError::OffsetMismatch { at, .. } => Some(*at),
                _ => None,
            };
            let mut refusal = file_error(e);
            if let Some(at) = at {
                refusal
                    .headers_mut()
                    .insert(UPLOAD_OFFSET, HeaderValue::from(at));
            }
            Err(refusal)
        }
    }
}

/// `DELETE /files/{id}`: removes an upload (finished or not) and its bytes.
pub(super) async fn terminate(
    relay: &Relay,
    caller: &Caller,
    id: &str,
    req: &hyper::Request<Incoming>,
) -> Result<Response, Early> {
    check_version(req.headers())?;
    own_file(relay, caller, id).await?;
    relay.files.delete(id).await.map_err(file_error)?;
    let mut response = hyper::Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// Writes a chunk on a task of the relay's own: if the client hangs up (and
/// hyper drops the request), the bytes that came are still recorded.
pub(super) async fn write(
    relay: &Arc<Relay>,
    id: &str,
    offset: u64,
    checksum: Option<Checksum>,
    body: Incoming,
) -> Result<FileRow, FileError> {
    let chunks = idle_limited(body, relay.config.files_body_idle_timeout());
    let (files, id) = (relay.files.clone(), id.to_owned());
    relay
        .conn_tasks
        .spawn(async move { files.append(&id, offset, checksum, chunks).await })
        .await
        .map_err(|e| FileError::Io(std::io::Error::other(e)))?
}

/// The body's bytes, ending with an error if none come for `idle`: a
/// stalled client must not hold the upload's single writer place.
fn idle_limited(
    body: Incoming,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, String>> + Unpin + Send + 'static {
    let data = BodyDataStream::new(body);
    Box::pin(stream::unfold(Some(data), move |state| async move {
        let mut data = state?;
        match tokio::time::timeout(idle, data.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(data))),
            Ok(Some(Err(e))) => Some((Err(e.to_string()), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(format!("nothing received for {} ms", idle.as_millis())),
                None,
            )),
        }
    }))
}

fn is_chunk(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(CHUNK_TYPE))
}

fn checksum(headers: &HeaderMap) -> Result<Option<Checksum>, Early> {
    let Some(value) = headers.get(UPLOAD_CHECKSUM) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| bad_header("Upload-Checksum", "is not text"))?;
    Checksum::parse(value)
        .map(Some)
        .map_err(|e| bad_header("Upload-Checksum", &e))
}

/// A header holding a non-negative integer, if present.
fn number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, Early> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| bad_header(name, "must be a non-negative integer"))
        })
        .transpose()
}

fn bad_header(name: &str, problem: &str) -> Early {
    early(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadMessage,
        &format!("{name} {problem}"),
    )
}

/// `key base64,key2 base64,key3`: keys are unique and free of spaces and
/// commas; values are base64 and, here, UTF-8 text.
fn parse_metadata(value: &HeaderValue) -> Result<BTreeMap<String, String>, String> {
    let text = value.to_str().map_err(|_| "is not text".to_owned())?;
    let mut pairs = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, encoded) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() {
            return Err(format!("has a pair without a key: {pair:?}"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| format!("value of {key:?} is not base64: {e}"))?;
        let value =
            String::from_utf8(bytes).map_err(|_| format!("value of {key:?} is not UTF-8 text"))?;
        if pairs.insert(key.to_owned(), value).is_some() {
            return Err(format!("names {key:?} twice"));
        }
    }
    Ok(pairs)
}

fn encode_metadata(metadata: &BTreeMap<String, String>) -> String {
    metadata
        .iter()
        .map(|(key, value)| {
            if value.is_empty() {
                key.clone()
            } else {
                format!(
                    "{key} {}",
                    base64::engine::general_purpose::STANDARD.encode(value)
                )
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_refuses_what_tus_forbids() {
        let parsed = parse_metadata(&HeaderValue::from_static(
            "filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential",
        ))
        .unwrap();
        assert_eq!(parsed["filename"], "world_domination_plan.pdf");
        assert_eq!(parsed["is_confidential"], "");
        assert_eq!(
            parse_metadata(&HeaderValue::from_str(&encode_metadata(&parsed)).unwrap()).unwrap(),
            parsed
        );
        assert!(parse_metadata(&HeaderValue::from_static("a YQ==,a Yg==")).is_err());
        assert!(parse_metadata(&HeaderValue::from_static("a !!!")).is_err());
        assert!(parse_metadata(&HeaderValue::from_static("a /w==")).is_err());
    }
}
