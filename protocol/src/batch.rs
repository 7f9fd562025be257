//! Batched WebSocket frames (PROTOCOL.md §2.1): after a `welcome` with
//! `batch: true`, each frame the relay sends may carry several messages.
//!
//! - text: the messages' JSON, separated by `\n` (compact JSON has no raw
//!   newline, so a frame with one message is unchanged);
//! - binary: each message as `u32 big-endian length | binary message`,
//!   back to back — the framing of the QUIC control stream.
//!
//! The relay never delays a frame to fill it: a batch is what was already
//! queued for the connection when it wrote, at most [`MAX_BATCH_BYTES`]
//! (a single larger message goes alone).

use bytes::{BufMut, Bytes, BytesMut};

use crate::ErrorCode;
use crate::codec::DecodeError;
use crate::quic::LENGTH_BYTES;

/// Messages are packed into one frame up to this many bytes.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Joins encoded text messages (valid JSON, no raw newline) into one frame.
pub fn join_text<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut frame = BytesMut::new();
    for message in messages {
        if !frame.is_empty() {
            frame.put_u8(b'\n');
        }
        frame.put_slice(message);
    }
    frame.freeze()
}

/// Joins encoded binary messages into one frame, each length-prefixed.
pub fn join_binary<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut frame = BytesMut::new();
    for message in messages {
        frame.put_u32(message.len() as u32);
        frame.put_slice(message);
    }
    frame.freeze()
}

/// The messages of a batched text frame, in order, undecoded (slices of
/// `frame`, no copy).
pub fn split_text(frame: &Bytes) -> Vec<Bytes> {
    let mut messages = Vec::new();
    let mut start = 0;
    for (at, byte) in frame.iter().enumerate() {
        if *byte == b'\n' {
            if at > start {
                messages.push(frame.slice(start..at));
            }
            start = at + 1;
        }
    }
    if start < frame.len() {
        messages.push(frame.slice(start..));
    }
    messages
}

/// The messages of a batched binary frame, in order, undecoded (slices of
/// `frame`, no copy); a broken length prefix is `bad_frame`.
pub fn split_binary(frame: &Bytes) -> Result<Vec<Bytes>, DecodeError> {
    let mut messages = Vec::new();
    let mut at = 0;
    while at < frame.len() {
        let Some(prefix) = frame.get(at..at + LENGTH_BYTES) else {
            return Err(broken("a length prefix is cut short"));
        };
        let length = u32::from_be_bytes(prefix.try_into().expect("four bytes")) as usize;
        let start = at + LENGTH_BYTES;
        let Some(end) = start.checked_add(length).filter(|end| *end <= frame.len()) else {
            return Err(broken("a message runs past the end of the frame"));
        };
        messages.push(frame.slice(start..end));
        at = end;
    }
    Ok(messages)
}

fn broken(what: &str) -> DecodeError {
    DecodeError {
        code: ErrorCode::BadFrame,
        message: format!("batched binary frame: {what}"),
        id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::{Data, Msg};

    fn message(seq: u64, data: &[u8]) -> Msg {
        Msg::Message {
            channel: "c".to_owned(),
            seq,
            data: Data::from(data.to_vec()),
        }
    }

    #[test]
    fn text_and_binary_batches_give_back_the_same_messages_in_order() {
        let messages = vec![
            message(1, b"line one\nline two"),
            message(2, &[0xff, 0x00, b'\n']),
            message(3, b""),
        ];
        let text: Vec<String> = messages.iter().map(codec::encode_text).collect();
        let frame = join_text(text.iter().map(|t| t.as_bytes()));
        let back: Vec<Msg> = split_text(&frame)
            .iter()
            .map(|m| codec::decode_text(std::str::from_utf8(m).unwrap()).unwrap())
            .collect();
        assert_eq!(back, messages);

        let binary: Vec<Bytes> = messages.iter().map(codec::encode_binary).collect();
        let frame = join_binary(binary.iter().map(|b| b.as_ref()));
        let back: Vec<Msg> = split_binary(&frame)
            .unwrap()
            .iter()
            .map(|m| codec::decode_binary(m).unwrap())
            .collect();
        assert_eq!(back, messages);
    }

    #[test]
    fn a_single_message_text_frame_is_unchanged_by_batching() {
        let json = codec::encode_text(&message(1, b"x"));
        assert_eq!(join_text([json.as_bytes()]), json.as_bytes());
    }

    #[test]
    fn a_truncated_binary_batch_is_a_bad_frame() {
        let first = codec::encode_binary(&message(1, b"a"));
        let frame = join_binary([first.as_ref(), b"xy"]);
        let cut = frame.slice(..frame.len() - 1);
        assert_eq!(split_binary(&cut).unwrap_err().code, ErrorCode::BadFrame);
        assert_eq!(split_binary(&frame).unwrap().len(), 2);
    }
}
