//! A protocol session: the state of one connection that speaks PROTOCOL.md
//! (greeting, subscriptions, registrations, requests in flight) and what each
//! inbound message does. Transport-neutral: the connection loop in
//! `transport::conn` (over WebSocket or QUIC) decodes frames, hands messages
//! here, and writes what comes back.
//!
//! Dropping a session undoes everything it did, so a connection that ends in
//! any way leaves nothing behind.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::delivery::queue::{OutboundQueue, Overflow, QueueLimits};
use crate::delivery::table::{ConnInfo, ConnState, Transport};
use crate::delivery::{Outbound, Pressure, deliver};

use crate::bus::Bus;
use crate::bus::{Ack, BusError};
use crate::channels::Channels;
use crate::channels::Subscriber;
use crate::config::Config;
use crate::delivery::queue::Budget;
use crate::hooks::Hooks;
use crate::hooks::{Filtered, Handshake, MayRegister, Route, RouteInput};
use crate::ids::NodeId;
use crate::metrics::Metrics;
use crate::protocol::{DecodeError, ErrorCode, Msg, Position, Request, VERSION};
use crate::quota::Quotas;
use crate::quota::{ConnQuota, Verdict};
use crate::spaces::Spaces;
use crate::spaces::{Caller, Instance};
use crate::transfer::sink::{QueueStreams, TransferStreams};
use tokio_util::sync::CancellationToken;

mod transfers;
use transfers::{DownloadAsk, OfferAsk, Transfers, UploadAsk};

/// The `goaway` every connection is sent when the relay starts draining.
pub fn goaway(config: &Config) -> Outbound {
    Outbound::new(Msg::Goaway {
        reason: "relay shutting down".to_owned(),
        reconnect_ms: config.server.shutdown_grace_ms,
    })
}

/// What a session may use: the shared services of the layers below it, and
/// nothing of the transports, the operator API or the plugin registry
/// beyond its hooks. Built once by the relay and cloned per connection.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub node: NodeId,
    pub channels: Arc<Channels>,
    pub bus: Arc<dyn Bus>,
    pub spaces: Arc<Spaces>,
    pub quotas: Arc<Quotas>,
    pub metrics: Arc<Metrics>,
    /// The byte budget every outbound queue shares.
    pub budget: Arc<Budget>,
    /// Admission, routing and filtering (the plugins, or the open door).
    pub hooks: Arc<dyn Hooks>,
    /// Cancelled when the relay starts shutting down.
    pub draining: CancellationToken,
    /// Uploaded and pushed files.
    pub files: Arc<crate::transfer::storage::Storage>,
    /// Files offered to clients (push).
    pub offers: Arc<crate::transfer::offers::Offers>,
}

impl Context {
    fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }
}

pub use crate::protocol::names::validate_channel_name;

/// Sends the `ack` (or the error) for a publish the bus numbers later,
/// through the publisher's own queue; the session does not wait for it.
async fn acknowledge_later(
    conn: Arc<ConnInfo>,
    queue: Arc<OutboundQueue>,
    metrics: Arc<Metrics>,
    id: String,
    channel: String,
    numbered: tokio::sync::oneshot::Receiver<Result<u64, BusError>>,
) {
    let reply = match numbered.await {
        Ok(Ok(seq)) => Msg::Ack { id, channel, seq },
        Ok(Err(e)) => Msg::error(ErrorCode::Overloaded, e.to_string(), Some(id)),
        Err(_) => Msg::error(
            ErrorCode::Overloaded,
            "the message bus dropped the publish",
            Some(id),
        ),
    };
    // A publisher this far behind on reading loses the ack, counted.
    deliver(
        &conn,
        &queue,
        Outbound::new(reply),
        Overflow::DropNewest,
        &metrics,
    );
}

pub struct Session {
    relay: Context,
    conn: Arc<ConnInfo>,
    /// This connection's own outbound queue; others deliver to it.
    queue: Arc<OutboundQueue>,
    greeted: bool,
    subscriptions: HashSet<String>,
    instances: Vec<Arc<Instance>>,
    /// This connection's slot and rate buckets.
    quota: ConnQuota,
    /// Set when the connection must be closed after this turn's replies.
    closing: Option<Closing>,
    /// Subscribers' queues this connection's publishes filled up: the
    /// transport reads nothing more from it until they are relieved.
    backpressure: Pressure,
    /// The client asked for batched frames (`hello.batch`, WebSocket only).
    batch: bool,
    /// Uploads and downloads in progress.
    transfers: Transfers,
}

/// Why a session asks its transport to close the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Closing {
    /// Rate-limited messages kept coming (WebSocket 1008, QUIC 0x7).
    Policy,
    /// A connection cap was reached after the upgrade: `hello` named a user
    /// whose tier allows no more connections (WebSocket 1013, QUIC 0x5).
    Capacity(String),
}

impl Closing {
    /// The close reason: at most 123 bytes, what a WebSocket close frame holds.
    pub fn reason(&self) -> String {
        match self {
            Closing::Policy => "rate limits exceeded repeatedly".to_owned(),
            Closing::Capacity(reason) => {
                let mut end = reason.len().min(123);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason[..end].to_owned()
            }
        }
    }
}

impl Session {
    /// A session for `conn` with its bounded outbound queue; the transport
    /// drains the returned receiver.
    /// `streams` is where transfers to the peer go: by default the bulk
    /// lane of the connection's queue (QUIC gives each a stream instead).
    pub fn open(
        relay: Context,
        conn: Arc<ConnInfo>,
        quota: ConnQuota,
        streams: Option<Arc<dyn TransferStreams>>,
    ) -> (Self, Arc<OutboundQueue>) {
        let limits = &relay.config.limits;
        let queue = OutboundQueue::new(
            QueueLimits {
                messages: limits.outbound_queue,
                bytes: limits.outbound_queue_bytes,
                slow_after: Duration::from_millis(limits.slow_consumer_after_ms),
            },
            &relay.budget,
        );
        conn.attach_queue(queue.clone());
        let streams = streams.unwrap_or_else(|| Arc::new(QueueStreams::new(queue.clone())));
        let session = Self {
            relay,
            conn,
            queue: queue.clone(),
            greeted: false,
            subscriptions: HashSet::new(),
            instances: Vec::new(),
            quota,
            closing: None,
            backpressure: Pressure::default(),
            batch: false,
            transfers: Transfers::new(streams),
        };
        (session, queue)
    }

    /// Whether the transport must wait for [`backpressure`](Self::backpressure)
    /// before reading the next message.
    pub fn is_backpressured(&self) -> bool {
        !self.backpressure.is_empty()
    }

    /// What this connection's publishes wait for; see [`Pressure`].
    pub fn backpressure(&mut self) -> &mut Pressure {
        &mut self.backpressure
    }

    /// Whether frames after the `welcome` may carry several messages.
    pub fn batches(&self) -> bool {
        self.batch
    }

    /// Whether, and why, the transport should close the connection.
    pub fn closing(&self) -> Option<&Closing> {
        self.closing.as_ref()
    }

    /// Charges a publish or request to `name`'s rates (a control message to
    /// the general ones when `name` is `None`); the error to answer with when
    /// it is over them (the message is then dropped).
    fn charge(&mut self, name: Option<&str>, id: Option<String>) -> Option<Msg> {
        let verdict = match name {
            Some(name) => self.quota.charge(name),
            None => self.quota.charge_control(),
        };
        let throttled = match verdict {
            Verdict::Pass => return None,
            Verdict::Throttle(throttled) => throttled,
            Verdict::Close(throttled) => {
                self.closing = Some(Closing::Policy);
                self.relay.metrics.policy_close();
                throttled
            }
        };
        self.relay.metrics.message_throttled();
        Some(Msg::rate_limited(
            format!("over the {} rate; the message was dropped", throttled.scope),
            id,
            throttled.retry_after,
        ))
    }

    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// Whether this connection has registered instances of spaces.
    pub fn serves_instances(&self) -> bool {
        !self.instances.is_empty()
    }

    pub fn conn(&self) -> &Arc<ConnInfo> {
        &self.conn
    }

    /// Counts one inbound message and acts on it, or on why it could not be
    /// decoded; returns the direct reply, if any. What every transport calls.
    pub fn receive(&mut self, decoded: Result<Msg, DecodeError>) -> Option<Outbound> {
        self.conn.msgs_in.fetch_add(1, Ordering::Relaxed);
        self.relay.metrics.message_in();
        let reply = match decoded {
            Ok(msg) => self.handle(msg),
            Err(e) => Some(Msg::error(e.code, e.message, e.id)),
        };
        reply.map(Outbound::new)
    }

    /// Acts on one inbound message; returns the direct reply, if any.
    pub fn handle(&mut self, msg: Msg) -> Option<Msg> {
        if !self.greeted {
            return match msg {
                Msg::Hello {
                    v,
                    client,
                    token,
                    batch,
                    resume,
                } => Some(self.hello(v, client, token, batch, resume)),
                other => Some(Msg::error(
                    ErrorCode::HelloRequired,
                    format!("the first message must be `hello`, not `{}`", other.kind()),
                    None,
                )),
            };
        }
        match msg {
            Msg::Hello { .. } => Some(Msg::error(
                ErrorCode::HelloRequired,
                "`hello` was already received on this connection",
                None,
            )),
            Msg::Ping { id } => Some(Msg::Pong { id }),
            Msg::Pong { .. } => None,
            // Control messages are charged like the rest: churning them
            // costs the sender's rates, not its neighbours' queues.
            Msg::Subscribe { .. }
            | Msg::Unsubscribe { .. }
            | Msg::History { .. }
            | Msg::Who { .. }
            | Msg::Register { .. }
            | Msg::Upload { .. }
            | Msg::Download { .. }
            | Msg::Offer { .. }
                if let Some(throttled) = self.charge(None, None) =>
            {
                Some(throttled)
            }
            Msg::Subscribe { channel, recover } => Some(self.subscribe(channel, recover)),
            Msg::History {
                id,
                channel,
                since,
                limit,
            } => Some(self.history(id, channel, since, limit)),
            Msg::Who { id, channel } => Some(self.who(id, channel)),
            Msg::Unsubscribe { channel } => Some(self.unsubscribe(channel)),
            Msg::Publish { channel, id, data } => self.publish(channel, id, data),
            Msg::Register { space } => Some(self.register(space)),
            Msg::Request(req) => self.request(req),
            Msg::Progress { id, percent, data } => {
                let result = self.relay.spaces.progress(&self.conn, &id, percent, data);
                result
                    .err()
                    .map(|e| Msg::error(e.code, e.message, Some(id)))
            }
            Msg::Response(response) => {
                let id = response.id.clone();
                let result = self.relay.spaces.respond(&self.conn, response);
                result
                    .err()
                    .map(|e| Msg::error(e.code, e.message, Some(id)))
            }
            Msg::Body { id, last, data } => {
                let result = self.relay.spaces.stream_body(
                    &self.conn,
                    &id,
                    data,
                    last,
                    &mut self.backpressure,
                );
                result
                    .err()
                    .map(|e| Msg::error(e.code, e.message, Some(id)))
            }
            Msg::Upload {
                id,
                file,
                name,
                size,
                sha256,
                chunk_size,
            } => {
                let session = self.relay.node.scoped(self.conn.id);
                let ask = UploadAsk {
                    id,
                    file,
                    name,
                    size,
                    sha256,
                    chunk_size,
                };
                self.transfers
                    .upload(&self.relay, &self.conn, &self.queue, session, ask)
            }
            Msg::Chunk {
                id,
                seq,
                offset,
                crc32c,
                last,
                data,
            } => {
                let piece = transfers::piece(seq, offset, crc32c, last, data);
                self.transfers.chunk(id, piece, &mut self.backpressure)
            }
            Msg::Download {
                id,
                file,
                offset,
                chunk_size,
                offer,
            } => {
                let ask = DownloadAsk {
                    id,
                    file,
                    offset,
                    chunk_size,
                    offer,
                };
                self.transfers
                    .download(&self.relay, &self.conn, &self.queue, ask)
            }
            Msg::Offer {
                id,
                file,
                to,
                ttl_ms,
            } => {
                let ask = OfferAsk {
                    id,
                    file,
                    to,
                    ttl_ms,
                };
                self.transfers
                    .offer(&self.relay, &self.conn, &self.queue, ask)
            }
            Msg::CancelTransfer { id } => self.transfers.cancel(id),
            other => Some(Msg::error(
                ErrorCode::UnexpectedType,
                format!("`{}` is sent by the relay, not to it", other.kind()),
                None,
            )),
        }
    }

    fn hello(
        &mut self,
        v: u32,
        client: Option<String>,
        token: Option<String>,
        batch: bool,
        resume: Option<String>,
    ) -> Msg {
        if v != VERSION {
            return Msg::error(
                ErrorCode::UnsupportedVersion,
                format!("this relay speaks protocol version {VERSION}, not {v}"),
                None,
            );
        }
        if let Some(refused) = token.and_then(|token| self.identify(&token)) {
            return refused;
        }
        self.greeted = true;
        if self.relay.is_draining() {
            self.conn.set_state(ConnState::Draining);
        } else {
            self.conn.set_state(ConnState::Open);
        }
        if let Some(client) = client {
            let client: String = client.chars().take(64).collect();
            self.conn.update_detail(|d| d.client = Some(client));
        }
        // QUIC's control stream carries messages back to back already.
        self.batch = batch && self.conn.transport() == Transport::Ws;
        let user = self.conn.identity().map(|(user, _)| user);
        // Only the user who left them gets a session's unfinished uploads.
        let transfers = match (&resume, &user) {
            (Some(previous), Some(user)) => self.relay.files.take_unfinished(previous, user),
            _ => Vec::new(),
        };
        // Files offered while this client was away are told after the
        // `welcome` (queued, so they follow it).
        if user.is_some() || resume.is_some() {
            let offers = self.relay.offers.clone();
            let (conn, queue) = (self.conn.clone(), self.queue.clone());
            tokio::spawn(async move { offers.tell_open(conn, queue, user, resume).await });
        }
        let config = &self.relay.config;
        Msg::Welcome {
            v: VERSION,
            session: self.relay.node.scoped(self.conn.id),
            heartbeat_ms: config.heartbeat.interval_ms,
            idle_timeout_ms: config.heartbeat.idle_timeout_ms,
            max_message_bytes: config.limits.max_message_bytes,
            instance_idle_timeout_ms: config.limits.instance_idle_timeout_ms,
            batch: self.batch,
            transfers,
        }
    }

    /// Asks the policy who `token` names, as if it had come as
    /// `Authorization: Bearer` on the handshake (QUIC has no headers, and
    /// browsers cannot set them on a WebSocket), and moves the connection to
    /// that user's quota. A refused token leaves the connection un-greeted; a
    /// user over their tier's connection cap is closed (1013). Returns the
    /// error to answer `hello` with, if any.
    fn identify(&mut self, token: &str) -> Option<Msg> {
        let Ok(bearer) = http::HeaderValue::from_str(&format!("Bearer {token}")) else {
            return Some(Msg::error(
                ErrorCode::BadMessage,
                "`token` must be printable ASCII",
                None,
            ));
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, bearer);
        let handshake = Handshake {
            peer: self.conn.peer,
            path: match self.conn.transport() {
                Transport::Quic => "quic",
                _ => "/ws",
            },
            query: "",
            headers: &headers,
        };
        let grant = match crate::quota::admit_policy(
            self.relay.hooks.as_ref(),
            &self.relay.metrics,
            &handshake,
        ) {
            Ok(Some(grant)) => grant,
            Ok(None) => return None,
            Err(refusal) => return Some(Msg::error(refusal.code, refusal.reason, None)),
        };
        if let Err(refusal) = self.quota.rebind(&grant) {
            self.relay.metrics.refused(refusal.why);
            self.closing = Some(Closing::Capacity(refusal.reason.clone()));
            return Some(Msg::error(refusal.code, refusal.reason, None));
        }
        self.conn.record_grant(Some(grant));
        None
    }

    fn subscribe(&mut self, channel: String, recover: Option<Position>) -> Msg {
        if let Err(reason) = validate_channel_name(&channel) {
            return Msg::error(ErrorCode::InvalidName, reason, None);
        }
        let limit = self.relay.config.limits.max_subscriptions_per_connection;
        if !self.subscriptions.contains(&channel) && self.subscriptions.len() >= limit {
            return Msg::error(
                ErrorCode::Overloaded,
                format!("at most {limit} subscriptions per connection"),
                None,
            );
        }
        let subscriber = Subscriber {
            conn: self.conn.clone(),
            queue: self.queue.clone(),
        };
        let found = self
            .relay
            .channels
            .subscribe(&channel, subscriber, recover.as_ref());
        if self.subscriptions.insert(channel.clone()) {
            self.conn
                .update_detail(|d| d.channels.push(channel.clone()));
        }
        Msg::Subscribed {
            channel,
            seq: found.seq,
            presence: found.presence,
            epoch: found.epoch,
            recovered: found.recovered,
        }
    }

    /// `history`: a page of what the channel keeps; a page stays within
    /// one message's size (a client pages on with `since`).
    fn history(
        &mut self,
        id: String,
        channel: String,
        since: Option<u64>,
        limit: Option<u32>,
    ) -> Msg {
        if let Err(reason) = validate_channel_name(&channel) {
            return Msg::error(ErrorCode::InvalidName, reason, Some(id));
        }
        let max_bytes = self.relay.config.limits.max_message_bytes / 2;
        match self
            .relay
            .channels
            .history(&channel, since, limit, max_bytes)
        {
            Ok((epoch, seq, page)) => Msg::HistoryPage {
                id,
                channel,
                epoch,
                seq,
                complete: page.complete,
                more: page.more,
                messages: page.messages,
            },
            Err(refused) => Msg::error(refused.code, refused.reason, Some(id)),
        }
    }

    /// `who`: the channel's subscribers, where the configuration shows them.
    fn who(&mut self, id: String, channel: String) -> Msg {
        if let Err(reason) = validate_channel_name(&channel) {
            return Msg::error(ErrorCode::InvalidName, reason, Some(id));
        }
        let node = self.relay.node.clone();
        match self
            .relay
            .channels
            .members(&channel, |conn| node.scoped(conn.id))
        {
            Ok((count, members)) => Msg::Members {
                id,
                channel,
                count,
                members,
            },
            Err(refused) => Msg::error(refused.code, refused.reason, Some(id)),
        }
    }

    fn unsubscribe(&mut self, channel: String) -> Msg {
        if self.subscriptions.remove(&channel) {
            self.relay.channels.unsubscribe(&channel, self.conn.id);
            self.conn
                .update_detail(|d| d.channels.retain(|c| *c != channel));
        }
        Msg::Unsubscribed { channel }
    }

    fn publish(
        &mut self,
        channel: String,
        id: Option<String>,
        data: crate::protocol::Data,
    ) -> Option<Msg> {
        if let Err(reason) = validate_channel_name(&channel) {
            return Some(Msg::error(ErrorCode::InvalidName, reason, id));
        }
        if let Some(throttled) = self.charge(Some(&channel), id.clone()) {
            return Some(throttled);
        }
        let target = match self
            .relay
            .hooks
            .route(&RouteInput::Publish { channel: &channel })
        {
            Route::Pass => channel,
            Route::Rewrite { target } => target,
            Route::Reject { code, reason } => return Some(Msg::error(code, reason, id)),
        };
        let data = match self.relay.hooks.filter(&target, data) {
            Filtered::Deliver(data) => data,
            Filtered::Drop { code, reason } => return Some(Msg::error(code, reason, id)),
        };
        match self
            .relay
            .bus
            .publish(&target, data, &mut self.backpressure)
        {
            Ack::Numbered(seq) => id.map(|id| Msg::Ack {
                id,
                channel: target,
                seq,
            }),
            Ack::Pending(numbered) => {
                if let Some(id) = id {
                    let (conn, queue) = (self.conn.clone(), self.queue.clone());
                    let metrics = self.relay.metrics.clone();
                    tokio::spawn(acknowledge_later(
                        conn, queue, metrics, id, target, numbered,
                    ));
                }
                None
            }
        }
    }

    fn register(&mut self, space: String) -> Msg {
        if self.relay.is_draining() {
            return Msg::error(
                ErrorCode::ShuttingDown,
                "the relay is shutting down; register again after reconnecting",
                None,
            );
        }
        if let Some(existing) = self.instances.iter().find(|i| i.space == space) {
            return Msg::Registered {
                space,
                instance: existing.id.clone(),
            };
        }
        let limit = self.relay.config.limits.max_registrations_per_connection;
        if self.instances.len() >= limit {
            return Msg::error(
                ErrorCode::Overloaded,
                format!("at most {limit} registrations per connection"),
                None,
            );
        }
        let principal = match self.may_register(&space) {
            Ok(principal) => principal,
            Err((code, reason)) => return Msg::error(code, reason, None),
        };
        match self
            .relay
            .spaces
            .register(&space, &principal, &self.conn, self.queue.clone())
        {
            Ok(instance) => {
                let id = instance.id.clone();
                self.instances.push(instance);
                self.conn.update_detail(|d| d.spaces.push(space.clone()));
                Msg::Registered {
                    space,
                    instance: id,
                }
            }
            Err(e) => Msg::error(e.code, e.message, None),
        }
    }

    /// Whether this client may serve `space`: the policy decides for the
    /// users it named; anonymous clients only where the config allows.
    /// Returns the principal the instance is held by.
    fn may_register(&self, space: &str) -> Result<String, (ErrorCode, String)> {
        let Some((user, tier)) = self.conn.identity() else {
            if self.relay.config.spaces.anonymous_register {
                return Ok(String::new());
            }
            return Err((
                ErrorCode::Forbidden,
                "registering needs an identified client: connect with a token the policy knows (?token=, Authorization: Bearer, or hello.token)".to_owned(),
            ));
        };
        match self.relay.hooks.may_register(&user, &tier, space) {
            MayRegister::Allow | MayRegister::Undecided => Ok(user),
            MayRegister::Refuse { code, reason } => Err((code, reason)),
        }
    }

    fn request(&mut self, mut req: Request) -> Option<Msg> {
        let id = req.id.clone();
        if req.stream {
            return Some(Msg::error(
                ErrorCode::BadMessage,
                "`stream` is set by the relay for streamed HTTP bodies; send `data` inline",
                Some(id),
            ));
        }
        if let Some(throttled) = self.charge(Some(&req.space), Some(id.clone())) {
            return Some(throttled);
        }
        if self.relay.is_draining() {
            return Some(Msg::error(
                ErrorCode::ShuttingDown,
                "the relay is shutting down and takes no new requests",
                Some(id),
            ));
        }
        match self.relay.hooks.route(&RouteInput::Request {
            space: &req.space,
            method: &req.method,
            path: &req.path,
            headers: &req.headers,
        }) {
            Route::Pass => {}
            Route::Rewrite { target } => req.space = target,
            Route::Reject { code, reason } => return Some(Msg::error(code, reason, Some(id))),
        }
        let caller = Caller::Conn {
            conn: self.conn.clone(),
            queue: self.queue.clone(),
            id: id.clone(),
        };
        match self.relay.spaces.dispatch(req, caller) {
            Ok(_) => None,
            Err(e) => Some(Msg::error(e.code, e.message, Some(id))),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for channel in self.subscriptions.drain() {
            self.relay.channels.unsubscribe(&channel, self.conn.id);
        }
        for instance in self.instances.drain(..) {
            self.relay.spaces.unregister(&instance);
        }
        self.relay.spaces.caller_gone(self.conn.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::queue::Budget;
    use crate::delivery::table::ConnTable;
    use crate::testing::Peer;

    async fn acknowledged(answer: Option<Result<u64, BusError>>) -> Msg {
        let publisher = Peer::new(&Arc::new(ConnTable::default()), &Budget::new(1 << 20), 8);
        let (numbered_tx, numbered) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn(acknowledge_later(
            publisher.conn().clone(),
            publisher.queue.clone(),
            Arc::new(Metrics::new()),
            "p1".into(),
            "room".into(),
            numbered,
        ));
        assert!(publisher.queue.is_empty(), "nothing before the bus answers");
        match answer {
            Some(answer) => numbered_tx.send(answer).unwrap(),
            None => drop(numbered_tx),
        }
        waiting.await.unwrap();
        let mut queued = publisher.queued();
        assert_eq!(queued.len(), 1, "{queued:?}");
        queued.remove(0)
    }

    #[tokio::test]
    async fn a_publish_numbered_later_is_acknowledged_then() {
        let ack = acknowledged(Some(Ok(7))).await;
        assert_eq!(
            ack,
            Msg::Ack {
                id: "p1".into(),
                channel: "room".into(),
                seq: 7
            }
        );
        let failed = acknowledged(Some(Err(BusError::Unavailable("down".into())))).await;
        assert!(
            matches!(&failed, Msg::Error { code: ErrorCode::Overloaded, id: Some(id), .. } if id == "p1"),
            "{failed:?}"
        );
        let dropped = acknowledged(None).await;
        assert!(matches!(
            dropped,
            Msg::Error {
                code: ErrorCode::Overloaded,
                ..
            }
        ));
    }
}
