//! Streams an HTTP request body to the service instance serving the request,
//! in `body` messages, no faster than the instance's queue takes them: the
//! body is read from the socket only when there is room, so TCP flow control
//! carries the instance's pace back to the uploader and the relay holds at
//! most one queue's worth of it.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::delivery::Outbound;
use crate::protocol::{Data, Msg};
use crate::spaces::BodyTarget;
use crate::state::Relay;

/// Bodies larger than this (or of unknown length) are streamed; smaller
/// ones travel inline in the `request`.
pub const STREAM_OVER: u64 = 64 * 1024;
/// Payload per `body` message: under QUIC's bulk threshold, so pieces keep
/// their order on the control stream and never hold it long.
const PIECE: usize = 16 * 1024 - 512;
/// How often a body whose request waits for an instance checks again.
const WAITING_POLL: Duration = Duration::from_millis(5);

/// How streaming a body ended.
#[derive(Debug, PartialEq)]
pub enum StreamEnd {
    /// All of it reached the instance's queue, the last piece marked.
    Complete,
    /// The request ended first (answered early, failed, expired): the rest
    /// of the body is not read.
    RequestEnded,
    /// More than `max` bytes.
    TooLarge,
    /// The uploader's body broke off.
    Broken(String),
    /// The request's deadline passed while streaming.
    TimedOut,
}

pub async fn stream_body(
    relay: &Relay,
    id: u64,
    mut body: Incoming,
    max: usize,
    deadline: tokio::time::Instant,
) -> StreamEnd {
    let relay_id = relay.spaces.instance_side_id(id);
    let piece = |data, last| Msg::Body {
        id: relay_id.clone(),
        last,
        data: Data(data),
    };
    let streaming = async {
        let mut total = 0usize;
        loop {
            let mut data = match body.frame().await {
                None => {
                    return if send(relay, id, piece(Default::default(), true)).await {
                        StreamEnd::Complete
                    } else {
                        StreamEnd::RequestEnded
                    };
                }
                Some(Err(e)) => return StreamEnd::Broken(e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers carry nothing the protocol relays.
                    Err(_) => continue,
                },
            };
            total += data.len();
            if total > max {
                return StreamEnd::TooLarge;
            }
            while !data.is_empty() {
                let next = data.split_to(PIECE.min(data.len()));
                if !send(relay, id, piece(next, false)).await {
                    return StreamEnd::RequestEnded;
                }
            }
        }
    };
    tokio::time::timeout_at(deadline, streaming)
        .await
        .unwrap_or(StreamEnd::TimedOut)
}

/// Queues one piece for the request's instance once there is room; false
/// when the request has ended or the instance is gone.
async fn send(relay: &Relay, id: u64, msg: Msg) -> bool {
    let out = Outbound::new(msg);
    loop {
        match relay.spaces.body_target(id) {
            BodyTarget::Ended => return false,
            BodyTarget::Waiting => tokio::time::sleep(WAITING_POLL).await,
            BodyTarget::Instance(queue) => return queue.push_when_room(out).await.is_ok(),
        }
    }
}
