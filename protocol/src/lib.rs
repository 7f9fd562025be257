//! The wasmrelay wire protocol, version 1: the logical messages of
//! PROTOCOL.md, their error codes, how they are laid out in text and binary
//! frames ([`codec`]), and how frames travel over QUIC ([`quic`]).
//!
//! One enum, [`Msg`], serves both directions, so the relay and clients written
//! in Rust (`wasmrelay-client`, the examples, the tests) share one definition.
//! This crate does no I/O unless its `quinn` feature is on.

pub mod batch;
pub mod codec;
pub mod names;
pub mod quic;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use codec::{DecodeError, Encoding};

/// The protocol version this relay speaks; `hello.v` must equal it.
pub const VERSION: u32 = 1;

/// One protocol message. `type` names the variant in snake_case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Client → relay, first message on every connection.
    Hello {
        v: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Asks the relay to put several messages in one frame after the
        /// `welcome` (PROTOCOL §2.1, [`batch`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
        /// The `welcome.session` of this client's previous connection: the
        /// uploads it left unfinished are listed in `welcome.transfers`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
    },
    /// Relay → client, answer to `hello`.
    Welcome {
        v: u32,
        session: String,
        heartbeat_ms: u64,
        idle_timeout_ms: u64,
        max_message_bytes: usize,
        /// Over QUIC, the longest a connection serving instances may stay
        /// silent before it is presumed gone (PROTOCOL §3.2).
        #[serde(default)]
        instance_idle_timeout_ms: u64,
        /// Every frame after this one is batched ([`batch`]): the relay's
        /// yes to `hello.batch`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
        /// With `hello.resume`: the uploads the previous connection left
        /// unfinished, to continue with `upload` naming their `file`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        transfers: Vec<Unfinished>,
    },
    /// Either direction: an application-level liveness probe (browsers cannot
    /// send WebSocket pings). Answered with `pong` carrying the same id.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Subscribe {
        channel: String,
        /// Where this client left off (the `epoch` of its last `subscribed`
        /// and the last `seq` it received): the messages it missed are
        /// delivered before any live one, or `subscribed.recovered` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recover: Option<Position>,
    },
    /// `seq` is the channel's last sequence number, `presence` its subscriber count.
    Subscribed {
        channel: String,
        seq: u64,
        presence: u64,
        /// For a channel with history: the name of its sequence. A different
        /// epoch than before means the sequence restarted and history was lost.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// Only when the `subscribe` asked to `recover`: whether every
        /// missed message follows (true) or the client must resync (false).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// Client → relay: the messages of `channel` kept in its history, after
    /// `since` (oldest first), or the last `limit` when `since` is absent.
    History {
        id: String,
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Relay → client: one page of `history`, oldest first. `seq` is the
    /// channel's last sequence number; `more` says a next page (ask again
    /// with `since` the last seq here) holds more; `complete` says the page
    /// starts right after `since` (false: some were no longer kept).
    HistoryPage {
        id: String,
        channel: String,
        epoch: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        complete: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        messages: Vec<Kept>,
    },
    /// Client → relay: who is subscribed to `channel` (where the relay's
    /// configuration shows it: `channels.presence_details`).
    Who {
        id: String,
        channel: String,
    },
    /// Relay → client: the answer to `who`; `count` is the whole number,
    /// `members` at most the first 1,000.
    Members {
        id: String,
        channel: String,
        count: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<Member>,
    },
    Unsubscribe {
        channel: String,
    },
    Unsubscribed {
        channel: String,
    },
    Publish {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Data::is_empty")]
        data: Data,
    },
    /// Relay → publisher, when the publish carried an `id`.
    Ack {
        id: String,
        channel: String,
        seq: u64,
    },
    /// Relay → subscriber: one publish, numbered per channel.
    Message {
        channel: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "Data::is_empty")]
        data: Data,
    },
    /// Relay → subscribers of a channel whenever its subscriber count changes.
    Presence {
        channel: String,
        count: u64,
    },
    /// Relay → subscriber: `count` messages of `channel` were dropped for
    /// this connection because it fell behind (the `seq` gap shows where).
    Lost {
        channel: String,
        count: u64,
    },
    /// A service instance joins a space.
    Register {
        space: String,
    },
    Registered {
        space: String,
        instance: String,
    },
    /// Caller → relay (with the caller's own `id`), and relay → instance (with the
    /// relay's `id`, which the instance echoes in `progress` and `response`).
    Request(Request),
    /// Instance → relay → the one caller of request `id`.
    Progress {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        percent: Option<f32>,
        #[serde(default, skip_serializing_if = "Data::is_empty")]
        data: Data,
    },
    Response(Response),
    /// The next piece of a streamed body, `last` marking the end: relay →
    /// instance for a request with `stream: true`; instance → relay → caller
    /// for a response with `stream: true`.
    Body {
        id: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        last: bool,
        #[serde(default, skip_serializing_if = "Data::is_empty")]
        data: Data,
    },
    /// Relay → instance: the caller went away or the deadline passed; stop working on `id`.
    Cancel {
        id: String,
        reason: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// With `rate_limited`: when the next such message would be accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Relay → client: the relay is shutting down; reconnect after `reconnect_ms`.
    Goaway {
        reason: String,
        reconnect_ms: u64,
    },
    /// Client → relay: start uploading a file (`name`, `size`, optionally its
    /// `sha256`), or continue the upload `file` after an interruption. `id`
    /// is the client's name for this transfer on this connection.
    Upload {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        name: String,
        #[serde(default)]
        size: u64,
        /// Hex SHA-256 of the whole file; checked before it is complete.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chunk_size: Option<u32>,
    },
    /// Relay → client: send the chunks of upload `id` from `offset`, each
    /// at most `chunk_size` bytes.
    UploadReady {
        id: String,
        file: String,
        offset: u64,
        size: u64,
        chunk_size: u32,
    },
    /// Relay → client: upload `id` is complete, its digest checked.
    UploadDone {
        id: String,
        file: String,
        size: u64,
        sha256: String,
    },
    /// Client → relay: send file `file` from `offset` (with `offer`: a
    /// file offered to this client, `file_offer.offer`).
    Download {
        id: String,
        file: String,
        #[serde(default)]
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chunk_size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offer: Option<String>,
    },
    /// Client → relay: offer file `file` (one of this client's) to `to`,
    /// for `ttl_ms` (the relay's default when absent).
    Offer {
        id: String,
        file: String,
        to: Target,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// Relay → client: offer `id` was made; `delivered` connections were
    /// told at once (the rest are told when they connect).
    Offered {
        id: String,
        offer: String,
        delivered: u64,
    },
    /// Relay → client: a file is offered to this client; pull it with
    /// `download` (naming `offer`) or `GET /files/{file}?offer=…`.
    FileOffer {
        offer: String,
        file: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        name: String,
        size: u64,
        sha256: String,
        from: String,
        expires_at_ms: i64,
    },
    /// Relay → client: what download `id` sends, before its first chunk.
    DownloadReady {
        id: String,
        file: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        name: String,
        size: u64,
        sha256: String,
        offset: u64,
        chunk_size: u32,
    },
    /// Either direction: `data` is the bytes of transfer `id` at `offset`;
    /// `seq` counts the chunks of this transfer from 0, `crc32c` is the
    /// CRC-32C of `data`, `last` marks the chunk that ends the file.
    Chunk {
        id: String,
        seq: u64,
        offset: u64,
        crc32c: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        last: bool,
        #[serde(default, skip_serializing_if = "Data::is_empty")]
        data: Data,
    },
    /// Client → relay: stop transfer `id` (an upload keeps what it has).
    CancelTransfer {
        id: String,
    },
}

/// A point in a channel's sequence: its `epoch` and a `seq` in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// A message kept in a channel's history (`history_page.messages`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Data::is_empty")]
    pub data: Data,
}

/// One subscriber of a channel (`members`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its connection's `welcome.session`.
    pub session: String,
    /// The user admission named, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Who a file is offered to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every connection of this user, now and until the offer expires.
    User(String),
    /// The connections subscribed to this channel now.
    Channel(String),
    /// One connection (`welcome.session`), or the one that resumes it.
    Session(String),
}

/// An upload a previous connection left unfinished (`welcome.transfers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unfinished {
    /// The transfer's `id` on the previous connection.
    pub id: String,
    pub file: String,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub space: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Caller → relay: a deadline shorter than the relay's default (larger values
    /// are clamped to it). Relay → instance: the deadline in effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Relay → instance: the body follows in `body` messages (`data` is
    /// empty), streamed from an HTTP caller as it arrives.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Data::is_empty")]
    pub data: Data,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: String,
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The body continues in `body` messages after this one (`data` holds
    /// its first bytes, if any), the last one marked (PROTOCOL §6.3).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Data::is_empty")]
    pub data: Data,
}

fn default_method() -> String {
    "POST".to_owned()
}

fn default_path() -> String {
    "/".to_owned()
}

fn default_status() -> u16 {
    200
}

impl Msg {
    /// The `type` string of this message, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Welcome { .. } => "welcome",
            Msg::Ping { .. } => "ping",
            Msg::Pong { .. } => "pong",
            Msg::Subscribe { .. } => "subscribe",
            Msg::Subscribed { .. } => "subscribed",
            Msg::History { .. } => "history",
            Msg::HistoryPage { .. } => "history_page",
            Msg::Who { .. } => "who",
            Msg::Members { .. } => "members",
            Msg::Unsubscribe { .. } => "unsubscribe",
            Msg::Unsubscribed { .. } => "unsubscribed",
            Msg::Publish { .. } => "publish",
            Msg::Ack { .. } => "ack",
            Msg::Message { .. } => "message",
            Msg::Presence { .. } => "presence",
            Msg::Lost { .. } => "lost",
            Msg::Register { .. } => "register",
            Msg::Registered { .. } => "registered",
            Msg::Request(_) => "request",
            Msg::Progress { .. } => "progress",
            Msg::Response(_) => "response",
            Msg::Body { .. } => "body",
            Msg::Cancel { .. } => "cancel",
            Msg::Error { .. } => "error",
            Msg::Goaway { .. } => "goaway",
            Msg::Upload { .. } => "upload",
            Msg::UploadReady { .. } => "upload_ready",
            Msg::UploadDone { .. } => "upload_done",
            Msg::Download { .. } => "download",
            Msg::DownloadReady { .. } => "download_ready",
            Msg::Chunk { .. } => "chunk",
            Msg::CancelTransfer { .. } => "cancel_transfer",
            Msg::Offer { .. } => "offer",
            Msg::Offered { .. } => "offered",
            Msg::FileOffer { .. } => "file_offer",
        }
    }

    /// The payload slot of this message type, if it has one.
    pub fn data_mut(&mut self) -> Option<&mut Data> {
        match self {
            Msg::Publish { data, .. }
            | Msg::Message { data, .. }
            | Msg::Progress { data, .. }
            | Msg::Body { data, .. }
            | Msg::Chunk { data, .. }
            | Msg::Request(Request { data, .. })
            | Msg::Response(Response { data, .. }) => Some(data),
            _ => None,
        }
    }

    /// The payload of this message, if its type has one.
    pub fn data(&self) -> Option<&Data> {
        match self {
            Msg::Publish { data, .. }
            | Msg::Message { data, .. }
            | Msg::Progress { data, .. }
            | Msg::Body { data, .. }
            | Msg::Chunk { data, .. }
            | Msg::Request(Request { data, .. })
            | Msg::Response(Response { data, .. }) => Some(data),
            _ => None,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> Self {
        Msg::Error {
            code,
            message: message.into(),
            id,
            retry_after_ms: None,
        }
    }

    /// A `rate_limited` error for the message `id`, which was dropped.
    pub fn rate_limited(
        message: impl Into<String>,
        id: Option<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        Msg::Error {
            code: ErrorCode::RateLimited,
            message: message.into(),
            id,
            retry_after_ms: Some(retry_after_ms(retry_after)),
        }
    }
}

/// A wait in whole milliseconds, rounded up so a client that waits exactly
/// this long is not refused again; "never" saturates.
pub fn retry_after_ms(wait: std::time::Duration) -> u64 {
    let nanos = wait.as_nanos();
    u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Every `type` the protocol defines, for telling "unknown type" from "malformed".
pub const KNOWN_TYPES: &[&str] = &[
    "hello",
    "welcome",
    "ping",
    "pong",
    "subscribe",
    "subscribed",
    "unsubscribe",
    "unsubscribed",
    "history",
    "history_page",
    "who",
    "members",
    "publish",
    "ack",
    "message",
    "presence",
    "lost",
    "register",
    "registered",
    "request",
    "progress",
    "response",
    "body",
    "cancel",
    "error",
    "goaway",
    "upload",
    "upload_ready",
    "upload_done",
    "download",
    "download_ready",
    "chunk",
    "cancel_transfer",
    "offer",
    "offered",
    "file_offer",
];

/// A message payload: raw bytes. In JSON it is a string when the bytes are
/// UTF-8 and `{"b64": "..."}` otherwise; in binary frames it is never encoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Data(pub Bytes);

impl Data {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Data {
    fn from(value: &str) -> Self {
        Data(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl From<String> for Data {
    fn from(value: String) -> Self {
        Data(Bytes::from(value))
    }
}

impl From<Bytes> for Data {
    fn from(value: Bytes) -> Self {
        Data(value)
    }
}

impl From<Vec<u8>> for Data {
    fn from(value: Vec<u8>) -> Self {
        Data(Bytes::from(value))
    }
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        use serde::ser::SerializeMap as _;
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    "b64",
                    &base64::engine::general_purpose::STANDARD.encode(&self.0),
                )?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Base64 { b64: String },
        }
        match Wire::deserialize(deserializer)? {
            Wire::Text(text) => Ok(Data::from(text)),
            Wire::Base64 { b64 } => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Data::from)
                .map_err(|e| serde::de::Error::custom(format!("data.b64: {e}"))),
        }
    }
}

/// Documented error codes (PROTOCOL.md, "Errors"). Each maps to one HTTP status
/// for the HTTP ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a binary frame's header is malformed.
    BadFrame,
    /// The JSON is well formed but a field is missing or has the wrong type.
    BadMessage,
    /// `type` names no message this protocol version defines.
    UnknownType,
    /// The message is defined but not one a client may send.
    UnexpectedType,
    /// The first message was not `hello`, or `hello` came twice.
    HelloRequired,
    /// `hello.v` is a version this relay does not speak.
    UnsupportedVersion,
    /// A message or body larger than `max_message_bytes`.
    TooLarge,
    /// The space was never declared nor registered.
    UnknownSpace,
    /// The space exists but no instance is connected.
    NoInstance,
    /// A request id already in flight on this connection.
    DuplicateId,
    /// A progress or response for a request that is not pending (or not yours).
    UnknownRequest,
    /// The instance serving the request disconnected.
    InstanceLost,
    /// HTTP ingress: the instance's response cannot be relayed (for example an
    /// invalid status code).
    BadResponse,
    /// The request's deadline passed.
    Timeout,
    /// A limit was reached (pending requests, subscriptions, queue space, the
    /// relay's connection cap).
    Overloaded,
    /// The message was over its rate (per connection, user or class) and was
    /// dropped; `retry_after_ms` says when the next one would pass.
    RateLimited,
    /// The user (or, for unidentified clients, the IP address) already holds
    /// as many connections as allowed.
    TooManyConnections,
    /// The relay is draining for shutdown and takes no new work.
    ShuttingDown,
    /// The router, filter or admission hook refused the message.
    Rejected,
    /// A plugin failed on this message (trapped, ran past its deadline or its
    /// memory cap); the message names the plugin. The plugin instance is
    /// replaced; other messages are unaffected.
    PluginFailed,
    /// A name (space, channel) that breaks the naming rules.
    InvalidName,
    /// Admin endpoints: missing or wrong bearer token.
    Unauthorized,
    /// `register`: this client may not serve the space — the policy says no,
    /// an anonymous client where registration needs an identity, or the
    /// space is held by instances of another user.
    Forbidden,
    /// Admin plugin endpoints: the plugin was refused (not a component, wrong
    /// world, ungranted capability, init or self-check failed, role taken, ...);
    /// the message names the problem. The previous version keeps serving.
    PluginRefused,
    /// HTTP: no such endpoint (or, on the task endpoints, no such task).
    NotFound,
    /// Admin task endpoints: the task definition does not check; `field`
    /// names what to fix.
    InvalidTask,
    /// Admin task endpoints: a task of that name already exists.
    TaskExists,
    /// Admin task endpoints: the task is defined by a file in the task
    /// folder; change the file instead.
    TaskFromFile,
    /// Admin task endpoints: the task is running and its concurrency is
    /// `forbid`.
    TaskBusy,
    /// Files: the upload would take more than the user's or the relay's
    /// file quota; nothing was stored.
    QuotaExceeded,
    /// Files: a chunk written at an offset other than where the upload is;
    /// ask for the offset (tus `HEAD`) and resume from there.
    OffsetMismatch,
    /// Files: a chunk did not match its checksum; it was discarded and the
    /// offset is unchanged.
    ChecksumMismatch,
    /// Files: another request is writing this upload now.
    FileBusy,
    /// Files: the requested byte range is outside the file.
    RangeNotSatisfiable,
    /// A `chunk` or `cancel_transfer` for a transfer this connection does
    /// not have open.
    UnknownTransfer,
    /// Something went wrong inside the relay; the message says what.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnexpectedType => "unexpected_type",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownSpace => "unknown_space",
            ErrorCode::NoInstance => "no_instance",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::UnknownRequest => "unknown_request",
            ErrorCode::InstanceLost => "instance_lost",
            ErrorCode::BadResponse => "bad_response",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Rejected => "rejected",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::PluginRefused => "plugin_refused",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidTask => "invalid_task",
            ErrorCode::TaskExists => "task_exists",
            ErrorCode::TaskFromFile => "task_from_file",
            ErrorCode::TaskBusy => "task_busy",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::OffsetMismatch => "offset_mismatch",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::FileBusy => "file_busy",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::UnknownTransfer => "unknown_transfer",
            ErrorCode::Internal => "internal",
        }
    }

    /// The status the HTTP ingress answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadFrame
            | ErrorCode::BadMessage
            | ErrorCode::UnknownType
            | ErrorCode::UnexpectedType
            | ErrorCode::HelloRequired
            | ErrorCode::UnsupportedVersion
            | ErrorCode::InvalidName
            | ErrorCode::InvalidTask => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Rejected | ErrorCode::Forbidden => 403,
            ErrorCode::UnknownSpace
            | ErrorCode::NotFound
            | ErrorCode::UnknownRequest
            | ErrorCode::UnknownTransfer => 404,
            ErrorCode::DuplicateId
            | ErrorCode::TaskExists
            | ErrorCode::TaskFromFile
            | ErrorCode::TaskBusy
            | ErrorCode::OffsetMismatch => 409,
            ErrorCode::PluginRefused => 422,
            ErrorCode::RateLimited | ErrorCode::TooManyConnections => 429,
            ErrorCode::TooLarge | ErrorCode::QuotaExceeded => 413,
            ErrorCode::RangeNotSatisfiable => 416,
            ErrorCode::FileBusy => 423,
            // tus's own status for a failed checksum.
            ErrorCode::ChecksumMismatch => 460,
            ErrorCode::Internal | ErrorCode::PluginFailed => 500,
            ErrorCode::InstanceLost | ErrorCode::BadResponse => 502,
            ErrorCode::NoInstance | ErrorCode::Overloaded | ErrorCode::ShuttingDown => 503,
            ErrorCode::Timeout => 504,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
