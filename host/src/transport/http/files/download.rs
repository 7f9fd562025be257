//! `GET` and `HEAD /files/{id}`: a finished file, whole or one byte range,
//! streamed from disk a buffer at a time. Its strong `ETag` is its SHA-256,
//! which `Repr-Digest` (RFC 9530) also carries, so a client checks what it
//! assembled from ranges against the whole file's digest.
//!
//! Files are what users uploaded: they are always served as attachments,
//! never sniffed, and sandboxed, so an uploaded page cannot run as the
//! relay's origin.

use std::io::SeekFrom;

use base64::Engine;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::range::{self, Part};
use super::{Caller, Early, Response, early, file_error, refused};
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::files::FileRow;
use crate::transfer::access;
use crate::transfer::offers::Offers;
use crate::transfer::storage::FileError;
use crate::transport::reply::{Body, empty};

/// Bytes read from disk per body frame: each read is a trip to a blocking
/// thread, so few per megabyte; a download holds about this much.
const READ_BUFFER: usize = 256 * 1024;

pub(super) async fn serve(
    relay: &Relay,
    caller: &Caller,
    id: &str,
    req: &hyper::Request<Incoming>,
) -> Result<Response, Early> {
    let file = relay.files.info(id).await.map_err(file_error)?;
    let offer = offer_in(req.uri().query());
    let offered = match &offer {
        Some(offer) => {
            relay
                .offers
                .for_recipient(offer, &file.id, caller.who())
                .await
                .map_err(refused)?;
            true
        }
        None => false,
    };
    access::may_download(relay.admission(), caller.who(), &file, offered).map_err(refused)?;
    let (Some(sha256), Some(path)) = (&file.sha256, relay.files.blob_path(&file)) else {
        return Err(early(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!(
                "the upload is not complete ({} of {} bytes)",
                file.offset, file.length
            ),
        ));
    };
    let etag = format!("\"{sha256}\"");
    let mut response = hyper::Response::new(empty());
    describe(&mut response, &file, sha256, &etag);
    let if_none_match = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if if_none_match
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(response);
    }
    let (start, count) = match range::requested(req.headers(), file.length, &etag) {
        Part::Whole => (0, file.length),
        Part::Range { start, end } => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{}", file.length))
                    .expect("numbers make a valid header"),
            );
            (start, end - start + 1)
        }
        Part::Unsatisfiable => {
            let mut refusal = early(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeNotSatisfiable,
                &format!("the file has {} bytes", file.length),
            );
            refusal.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", file.length))
                    .expect("numbers make a valid header"),
            );
            return Err(refusal);
        }
    };
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if req.method() == Method::HEAD {
        return Ok(response);
    }
    // Opened now, so a file removed later (expired, deleted) still finishes
    // for whoever started reading it.
    let mut blob = match tokio::fs::File::open(&path).await {
        Ok(blob) => blob,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(file_error(FileError::NotFound));
        }
        Err(e) => return Err(file_error(FileError::Io(e))),
    };
    blob.seek(SeekFrom::Start(start))
        .await
        .map_err(|e| file_error(FileError::Io(e)))?;
    let reaches_end = start + count == file.length;
    let pulled = match offer {
        Some(offer) => {
            relay.offers.pulling(&offer).await;
            // The offer is done once a pull has sent the file's last byte.
            reaches_end.then(|| (relay.offers.clone(), offer))
        }
        None => None,
    };
    *response.body_mut() = stream(blob.take(count), pulled);
    Ok(response)
}

/// `offer=…` in the query: the download is of a file offered to the caller.
fn offer_in(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("offer="))
        .filter(|offer| !offer.is_empty())
        .map(str::to_owned)
}

/// The headers every answer about a finished file carries.
fn describe(response: &mut Response, file: &FileRow, sha256: &str, etag: &str) {
    let metadata = access::metadata(file);
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(tag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, tag);
    }
    if let Some(digest) = hex_bytes(sha256) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(digest);
        if let Ok(value) = HeaderValue::from_str(&format!("sha-256=:{encoded}:")) {
            headers.insert("repr-digest", value);
        }
    }
    let content_type = metadata
        .get("filetype")
        .filter(|t| is_media_type(t))
        .and_then(|t| HeaderValue::from_str(t).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&attachment(access::name(&metadata)))
            .expect("percent-encoding leaves only header-safe bytes"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
}

/// `type/subtype` of token characters (no parameters, nothing to inject).
fn is_media_type(value: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    value
        .split_once('/')
        .is_some_and(|(kind, sub)| token(kind) && token(sub))
}

/// `attachment; filename*=UTF-8''…` (RFC 6266 / 8187), any name made safe:
/// everything but RFC 8187's attr-chars is percent-encoded.
fn attachment(name: &str) -> String {
    const NOT_ATTR_CHAR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'!')
        .remove(b'#')
        .remove(b'$')
        .remove(b'&')
        .remove(b'+')
        .remove(b'-')
        .remove(b'.')
        .remove(b'^')
        .remove(b'_')
        .remove(b'`')
        .remove(b'|')
        .remove(b'~');
    if name.is_empty() {
        return "attachment".to_owned();
    }
    format!(
        "attachment; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(name, NOT_ATTR_CHAR)
    )
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The file's bytes as a body; with `pulled`, its offer is recorded done
/// when the last of them has been handed to the connection.
fn stream(
    reader: impl tokio::io::AsyncRead + Send + 'static,
    pulled: Option<(Arc<Offers>, String)>,
) -> Body {
    let frames = ReaderStream::with_capacity(reader, READ_BUFFER).map_ok(Frame::data);
    let done = futures_util::stream::once(async move {
        if let Some((offers, offer)) = pulled {
            offers.pulled(&offer).await;
        }
    })
    .filter_map(|()| async { None });
    StreamBody::new(frames.chain(done)).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_types_cannot_inject_headers() {
        assert_eq!(attachment(""), "attachment");
        assert_eq!(
            attachment("report 1.pdf"),
            "attachment; filename*=UTF-8''report%201.pdf"
        );
        assert_eq!(
            attachment("a\"\r\nSet-Cookie: x"),
            "attachment; filename*=UTF-8''a%22%0D%0ASet-Cookie%3A%20x"
        );
        assert_eq!(attachment("é"), "attachment; filename*=UTF-8''%C3%A9");
        assert!(is_media_type("image/png"));
        assert!(!is_media_type("text/html; charset=utf-8"));
        assert!(!is_media_type("text/html\r\nX: y"));
        assert_eq!(hex_bytes("00ff"), Some(vec![0, 255]));
    }
}
