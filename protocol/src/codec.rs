//! Frame layouts: JSON in text frames, and the binary layout
//! `u32 big-endian header length | JSON header | raw payload` in which the
//! payload (`data`) is carried as bytes, never base64'd.
//!
//! Decoding tells the three ways a frame can be wrong apart, so the sender gets
//! the right error code: not JSON at all (`bad_frame`), an unknown `type`
//! (`unknown_type`), or a known type with bad fields (`bad_message`).

use super::{ErrorCode, KNOWN_TYPES, Msg};
use bytes::{BufMut, Bytes, BytesMut};

/// Which frame kind a connection speaks; chosen by the frame its `hello` came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Text,
    Binary,
}

/// Why a frame could not be decoded, with the request id when one was readable,
/// so the error can answer it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
}

impl DecodeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
        }
    }
}

const HEADER_LEN_BYTES: usize = 4;

/// Encodes a message as the JSON text of a text frame.
pub fn encode_text(msg: &Msg) -> String {
    // Serializing our own enum into a String cannot fail: every map key is a string.
    serde_json::to_string(msg).expect("protocol messages always serialize")
}

/// Encodes a message as a binary frame: header length, JSON header without
/// `data`, then the payload bytes.
pub fn encode_binary(msg: &Msg) -> Bytes {
    let mut header = msg.clone();
    let payload = header
        .data_mut()
        .map(|data| std::mem::take(&mut data.0))
        .unwrap_or_default();
    let json = serde_json::to_vec(&header).expect("protocol messages always serialize");
    let mut frame = BytesMut::with_capacity(HEADER_LEN_BYTES + json.len() + payload.len());
    frame.put_u32(json.len() as u32);
    frame.put_slice(&json);
    frame.put_slice(&payload);
    frame.freeze()
}

/// Decodes the JSON of a text frame.
pub fn decode_text(text: &str) -> Result<Msg, DecodeError> {
    decode_json(text.as_bytes())
}

/// Decodes a binary frame; the payload after the header becomes the message's `data`.
pub fn decode_binary(frame: &Bytes) -> Result<Msg, DecodeError> {
    if frame.len() < HEADER_LEN_BYTES {
        return Err(DecodeError::new(
            ErrorCode::BadFrame,
            "binary frame shorter than its 4-byte header length",
        ));
    }
    let header_len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let header_end = HEADER_LEN_BYTES
        .checked_add(header_len)
        .filter(|end| *end <= frame.len())
        .ok_or_else(|| {
            DecodeError::new(
                ErrorCode::BadFrame,
                format!(
                    "binary frame header length {header_len} exceeds the frame ({} bytes)",
                    frame.len()
                ),
            )
        })?;
    let header = &frame[HEADER_LEN_BYTES..header_end];
    let mut msg = decode_json(header)?;
    let payload = frame.slice(header_end..);
    if !payload.is_empty() {
        let refused = match msg.data_mut() {
            Some(data) if data.is_empty() => {
                data.0 = payload;
                return Ok(msg);
            }
            Some(_) => "binary frame carries both a header `data` field and a payload".to_owned(),
            None => format!("a `{}` message carries no payload", msg.kind()),
        };
        // The header was read, so the sender learns which message it was.
        let mut error = DecodeError::new(ErrorCode::BadMessage, refused);
        error.id = id_of(header);
        return Err(error);
    }
    Ok(msg)
}

/// The string `id` of a JSON object, for error replies.
fn id_of(json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithId {
        id: Option<String>,
    }
    serde_json::from_slice::<WithId>(json).ok()?.id
}

fn decode_json(json: &[u8]) -> Result<Msg, DecodeError> {
    match serde_json::from_slice::<Msg>(json) {
        Ok(msg) => Ok(msg),
        Err(err) => Err(classify(json, err)),
    }
}

/// Works out which error code a frame that failed to decode deserves. Only
/// runs on the error path, so the second parse costs nothing in the common case.
fn classify(json: &[u8], err: serde_json::Error) -> DecodeError {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(json) else {
        return DecodeError::new(ErrorCode::BadFrame, format!("not a JSON object: {err}"));
    };
    let id = match object.remove("id") {
        Some(serde_json::Value::String(id)) => Some(id),
        _ => None,
    };
    let (code, message) = match object.remove("type") {
        None => (ErrorCode::BadMessage, "missing field `type`".to_owned()),
        Some(serde_json::Value::String(kind)) if !KNOWN_TYPES.contains(&kind.as_str()) => (
            ErrorCode::UnknownType,
            format!("unknown message type {kind:?}"),
        ),
        Some(serde_json::Value::String(kind)) => {
            (ErrorCode::BadMessage, format!("invalid `{kind}`: {err}"))
        }
        Some(_) => (ErrorCode::BadMessage, "`type` must be a string".to_owned()),
    };
    DecodeError { code, message, id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Data, Request, Response};

    fn request() -> Msg {
        Msg::Request(Request {
            id: "7".into(),
            space: "tts".into(),
            method: "POST".into(),
            path: "/speak".into(),
            query: "voice=a".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            timeout_ms: Some(500),
            stream: false,
            data: Data::from("hello"),
        })
    }

    #[test]
    fn text_round_trip() {
        let msg = request();
        let text = encode_text(&msg);
        assert!(text.contains(r#""type":"request""#), "{text}");
        assert!(text.contains(r#""data":"hello""#), "{text}");
        assert_eq!(decode_text(&text).unwrap(), msg);
    }

    #[test]
    fn binary_round_trip_keeps_payload_raw() {
        let payload: Vec<u8> = (0..=255u8).collect();
        let msg = Msg::Response(Response {
            id: "1".into(),
            status: 201,
            headers: vec![],
            stream: false,
            data: Data::from(payload.clone()),
        });
        let frame = encode_binary(&msg);
        assert!(
            frame.ends_with(&payload),
            "payload travels raw, after the header"
        );
        assert!(
            !frame.windows(3).any(|w| w == b"b64"),
            "never base64 in binary"
        );
        assert_eq!(decode_binary(&frame).unwrap(), msg);
    }

    #[test]
    fn a_bad_binary_frame_whose_header_was_read_keeps_its_id() {
        let frame = |header: &str, payload: &[u8]| {
            let mut frame = (header.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(header.as_bytes());
            frame.extend_from_slice(payload);
            Bytes::from(frame)
        };
        let both = frame(
            r#"{"type":"publish","channel":"c","id":"p1","data":"x"}"#,
            b"payload",
        );
        let error = decode_binary(&both).unwrap_err();
        assert_eq!(
            (error.code, error.id.as_deref()),
            (ErrorCode::BadMessage, Some("p1"))
        );
        let no_slot = frame(r#"{"type":"ping","id":"q7"}"#, b"payload");
        let error = decode_binary(&no_slot).unwrap_err();
        assert_eq!(
            (error.code, error.id.as_deref()),
            (ErrorCode::BadMessage, Some("q7"))
        );
    }

    #[test]
    fn non_utf8_data_in_json_uses_b64_object() {
        let msg = Msg::Message {
            channel: "c".into(),
            seq: 1,
            data: Data::from(vec![0xff, 0x00]),
        };
        let text = encode_text(&msg);
        assert!(text.contains(r#""data":{"b64":"/wA="}"#), "{text}");
        assert_eq!(decode_text(&text).unwrap(), msg);
    }

    #[test]
    fn defaults_fill_optional_request_fields() {
        let msg = decode_text(r#"{"type":"request","id":"a","space":"s"}"#).unwrap();
        let Msg::Request(req) = msg else {
            panic!("not a request")
        };
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/"));
        assert!(req.data.is_empty());
    }

    #[test]
    fn malformed_json_is_bad_frame() {
        let err = decode_text("{not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::BadFrame);
        let err = decode_text("[1,2]").unwrap_err();
        assert_eq!(err.code, ErrorCode::BadFrame);
    }

    #[test]
    fn unknown_type_is_told_apart_and_keeps_the_id() {
        let err = decode_text(r#"{"type":"teleport","id":"x9"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownType);
        assert_eq!(err.id.as_deref(), Some("x9"));
    }

    #[test]
    fn missing_field_is_bad_message() {
        let err = decode_text(r#"{"type":"subscribe"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadMessage);
        assert!(err.message.contains("channel"), "{}", err.message);
        let err = decode_text(r#"{"channel":"x"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadMessage);
    }

    #[test]
    fn truncated_binary_frames_are_bad_frames() {
        assert_eq!(
            decode_binary(&Bytes::from_static(b"\x00\x00"))
                .unwrap_err()
                .code,
            ErrorCode::BadFrame
        );
        assert_eq!(
            decode_binary(&Bytes::from_static(b"\x00\x00\x00\x09{}"))
                .unwrap_err()
                .code,
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn payload_on_a_message_without_data_is_refused() {
        let mut frame = BytesMut::new();
        let header = br#"{"type":"subscribe","channel":"c"}"#;
        frame.put_u32(header.len() as u32);
        frame.put_slice(header);
        frame.put_slice(b"stray");
        let err = decode_binary(&frame.freeze()).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadMessage);
    }
}
