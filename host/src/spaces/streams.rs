//! Streamed responses: an instance answers with `response` marked `stream`
//! and sends the body in `body` messages of any number, the last one
//! marked. The head reaches the caller at once; each piece follows with
//! flow control, so a response of any size passes through bounded memory:
//!
//! - to an HTTP caller, through a channel of [`HTTP_PIECES`] pieces that
//!   hyper drains into the socket; while it is full the instance's
//!   connection is not read (its `Pressure` holds the piece), so TCP or
//!   QUIC slows the instance down;
//! - to a protocol caller, through its outbound queue, pressing as a
//!   publish does (the instance waits while the caller's queue is past half).
//!
//! The request keeps its instance slot until the last piece. A stream that
//! sends nothing for the request timeout fails with `timeout`; a caller
//! that goes away cancels it (`cancel` to the instance); an instance that
//! goes away fails it with `instance_lost`. An HTTP body that fails is cut
//! off with an error, never ended as if complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Instance, SpaceError, Spaces, not_pending};
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::ConnInfo;
use crate::delivery::{Outbound, Pressure, deliver, deliver_pressing};
use crate::protocol::{Data, ErrorCode, Msg, Response};

/// Body pieces waiting for an HTTP caller's socket.
pub const HTTP_PIECES: usize = 4;

/// A response's body as an HTTP caller reads it: pieces until the channel
/// ends; `complete` says whether it ended with the last piece.
#[derive(Debug)]
pub struct HttpBody {
    pub pieces: mpsc::Receiver<Bytes>,
    pub complete: Arc<AtomicBool>,
}

/// Where a streamed response goes.
#[derive(Debug)]
pub(super) enum StreamTo {
    Http {
        pieces: mpsc::Sender<Bytes>,
        complete: Arc<AtomicBool>,
    },
    Conn {
        conn: Arc<ConnInfo>,
        queue: Arc<OutboundQueue>,
        id: String,
    },
}

#[derive(Debug)]
pub(super) struct Streaming {
    pub to: StreamTo,
    pub instance: Arc<Instance>,
    pub started: Instant,
    /// When the instance last sent a piece.
    pub heard: Instant,
}

/// How a stream ended.
enum Ended {
    Complete,
    Failed(SpaceError),
    /// The caller went away; the instance is told to stop.
    CallerGone,
}

impl Spaces {
    /// Starts streaming request `key`'s response (`response.stream`): the
    /// head goes to the caller now, for an HTTP caller with the body to come.
    pub(super) fn start_stream(&self, key: u64, pending: super::Pending, response: Response) {
        let Some(instance) = pending.instance.clone() else {
            return;
        };
        let to = match pending.caller {
            super::Caller::Http(reply) => {
                let (pieces, body) = mpsc::channel(HTTP_PIECES);
                let complete = Arc::new(AtomicBool::new(false));
                let first = response.data.0.clone();
                let head = super::Reply {
                    response: Response {
                        data: Data::default(),
                        ..response
                    },
                    body: Some(HttpBody {
                        pieces: body,
                        complete: complete.clone(),
                    }),
                };
                if reply.send(Ok(head)).is_err() {
                    // The caller left before the head: nothing to stream to.
                    self.send_cancel(&instance, key, "caller disconnected");
                    self.release_instance(&instance);
                    return;
                }
                if !first.is_empty() {
                    let _ = pieces.try_send(first);
                }
                StreamTo::Http { pieces, complete }
            }
            super::Caller::Conn { conn, queue, id } => {
                let head = Msg::Response(Response {
                    id: id.clone(),
                    ..response
                });
                deliver(
                    &conn,
                    &queue,
                    Outbound::new(head),
                    Overflow::Disconnect,
                    &self.metrics,
                );
                StreamTo::Conn { conn, queue, id }
            }
        };
        self.streams.insert(
            key,
            Streaming {
                to,
                instance,
                started: pending.started,
                heard: Instant::now(),
            },
        );
    }

    /// One piece of a streamed response from the instance `from`. While the
    /// caller cannot take it, `pressure` holds the instance's reading.
    pub fn stream_body(
        &self,
        from: &ConnInfo,
        id: &str,
        data: Data,
        last: bool,
        pressure: &mut Pressure,
    ) -> Result<(), SpaceError> {
        let key = self.node.parse_scoped(id).ok_or_else(|| not_pending(id))?;
        let ended = {
            let Some(mut stream) = self.streams.get_mut(&key) else {
                return Err(not_pending(id));
            };
            if stream.instance.conn.id != from.id {
                return Err(not_pending(id));
            }
            stream.heard = Instant::now();
            match &stream.to {
                StreamTo::Http { pieces, complete } => {
                    if last {
                        complete.store(true, Ordering::Release);
                    }
                    match (data.is_empty(), pieces.try_send(data.0)) {
                        (true, _) | (false, Ok(())) => last.then_some(Ended::Complete),
                        (false, Err(mpsc::error::TrySendError::Full(piece))) => {
                            let pieces = pieces.clone();
                            pressure.hold(async move {
                                // A caller gone meanwhile is found at the next piece.
                                let _ = pieces.send(piece).await;
                            });
                            last.then_some(Ended::Complete)
                        }
                        (false, Err(mpsc::error::TrySendError::Closed(_))) => {
                            Some(Ended::CallerGone)
                        }
                    }
                }
                StreamTo::Conn { conn, queue, id } => {
                    let piece = Msg::Body {
                        id: id.clone(),
                        last,
                        data,
                    };
                    // Never dropped: a caller too far behind is closed (1013).
                    deliver_pressing(
                        conn,
                        queue,
                        Outbound::new(piece),
                        Overflow::Disconnect,
                        &self.metrics,
                        pressure,
                    );
                    last.then_some(Ended::Complete)
                }
            }
        };
        if let Some(ended) = ended {
            self.end_stream(key, ended);
        }
        Ok(())
    }

    fn end_stream(&self, key: u64, ended: Ended) {
        let Some((_, stream)) = self.streams.remove(&key) else {
            return;
        };
        self.release_instance(&stream.instance);
        let label = match &ended {
            Ended::Complete => "ok",
            Ended::Failed(e) => e.code.as_str(),
            Ended::CallerGone => "caller_gone",
        };
        self.metrics
            .request_finished(label, stream.started.elapsed().as_secs_f64());
        if matches!(ended, Ended::CallerGone | Ended::Failed(_)) {
            self.send_cancel(&stream.instance, key, "the response stream ended early");
        }
        match stream.to {
            // Dropping the sender ends the body; `complete` says how.
            StreamTo::Http { .. } => {}
            StreamTo::Conn { conn, queue, id } => {
                self.unclaim(&conn, &id);
                if let Ended::Failed(e) = ended {
                    deliver(
                        &conn,
                        &queue,
                        Outbound::new(Msg::error(e.code, e.message, Some(id))),
                        Overflow::Disconnect,
                        &self.metrics,
                    );
                }
            }
        }
    }

    /// The caller of stream `key` withdrew (a `cancel` from its node).
    pub(super) fn caller_stream_gone(&self, key: u64) {
        if self.streams.contains_key(&key) {
            self.end_stream(key, Ended::CallerGone);
        }
    }

    /// The instance `from` (a proxy of another node's) reports stream `id`
    /// failed there.
    pub(super) fn fail_stream_from(
        &self,
        from: &ConnInfo,
        id: &str,
        error: SpaceError,
    ) -> Result<(), SpaceError> {
        let key = self.node.parse_scoped(id).ok_or_else(|| not_pending(id))?;
        let ours = self
            .streams
            .get(&key)
            .is_some_and(|s| s.instance.conn.id == from.id);
        if !ours {
            return Err(not_pending(id));
        }
        self.end_stream(key, Ended::Failed(error));
        Ok(())
    }

    /// Fails streams that sent nothing for the request timeout.
    pub(super) fn expire_streams(&self, now: Instant) -> usize {
        let idle = self.default_timeout;
        let stalled: Vec<u64> = self
            .streams
            .iter()
            .filter(|s| now.duration_since(s.heard) >= idle)
            .map(|s| *s.key())
            .collect();
        for key in &stalled {
            self.end_stream(
                *key,
                Ended::Failed(SpaceError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the streamed response sent nothing for {} ms",
                        idle.as_millis()
                    ),
                )),
            );
        }
        stalled.len()
    }

    /// Fails the streams instance `instance` was sending.
    pub(super) fn instance_streams_lost(&self, instance: &Arc<Instance>) {
        let lost: Vec<u64> = self
            .streams
            .iter()
            .filter(|s| Arc::ptr_eq(&s.instance, instance))
            .map(|s| *s.key())
            .collect();
        for key in lost {
            self.end_stream(
                key,
                Ended::Failed(SpaceError::new(
                    ErrorCode::InstanceLost,
                    format!(
                        "the instance serving space {:?} disconnected mid-response",
                        instance.space
                    ),
                )),
            );
        }
    }

    /// Fails the streams going to connection `conn_id` with `error`.
    pub(super) fn caller_streams_failed(&self, conn_id: u64, error: &SpaceError) {
        let failed: Vec<u64> = self
            .streams
            .iter()
            .filter(|s| matches!(&s.to, StreamTo::Conn { conn, .. } if conn.id == conn_id))
            .map(|s| *s.key())
            .collect();
        for key in failed {
            self.end_stream(key, Ended::Failed(error.clone()));
        }
    }

    /// Ends the streams going to connection `conn_id`, which went away.
    pub(super) fn caller_streams_gone(&self, conn_id: u64) {
        let gone: Vec<u64> = self
            .streams
            .iter()
            .filter(|s| matches!(&s.to, StreamTo::Conn { conn, .. } if conn.id == conn_id))
            .map(|s| *s.key())
            .collect();
        for key in gone {
            self.end_stream(key, Ended::CallerGone);
        }
    }

    pub fn streams_count(&self) -> usize {
        self.streams.len()
    }
}
