//! The decision points plugins own: admission (who may connect, and on what
//! terms), routing (where a publish or request goes) and filtering (what a
//! published message becomes). The relay core asks these traits and enforces
//! their answers; `plugin::Registry` implements them with the active wasm
//! plugins, and [`OpenDoor`] lets everything through unchanged.

use std::net::SocketAddr;

use crate::protocol::{Data, ErrorCode};
use crate::rate::Rate;

/// What admission sees of a connection before it is upgraded.
#[derive(Debug)]
pub struct Handshake<'a> {
    pub peer: SocketAddr,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl<'a> Handshake<'a> {
    /// What admission sees of an HTTP request (or WebSocket upgrade) from `peer`.
    pub fn of<B>(peer: SocketAddr, req: &'a http::Request<B>) -> Self {
        Self {
            peer,
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            headers: req.headers(),
        }
    }
}

/// Who an admitted connection is, as admission decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub user: String,
    pub tier: String,
    /// The tier's caps and rates, which the relay enforces (`quota`).
    pub limits: Option<TierLimits>,
}

/// What a tier allows, as the policy decided.
#[derive(Debug, Clone, PartialEq)]
pub struct TierLimits {
    /// Connections one user may hold at once.
    pub max_connections: u32,
    /// Messages of no particular class, per user.
    pub messages: Rate,
    /// Per-class rates, per user.
    pub classes: Vec<(String, Rate)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Admit {
    /// Let in; with a grant when a policy identified the client.
    Allow(Option<Grant>),
    Deny {
        status: u16,
        code: ErrorCode,
        reason: String,
    },
}

/// The policy's answer on a registration or a transfer.
#[derive(Debug, Clone, PartialEq)]
pub enum MayRegister {
    Allow,
    Refuse {
        code: ErrorCode,
        reason: String,
    },
    /// The policy does not decide registrations; the relay's own rule applies
    /// (identified clients may, anonymous ones where the config says so).
    Undecided,
}

/// What a client asks to do with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    Upload,
    Download,
    Push,
}

/// The file a transfer is about (for an upload: no id yet, the uploader as owner).
#[derive(Debug, Clone, PartialEq)]
pub struct FileSubject<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub name: &'a str,
    pub size: u64,
}

pub trait Admission: Send + Sync + 'static {
    fn admit(&self, handshake: &Handshake<'_>) -> Admit;

    /// Whether the client admission named `user` in `tier` may register an
    /// instance of `space`.
    fn may_register(&self, _user: &str, _tier: &str, _space: &str) -> MayRegister {
        MayRegister::Undecided
    }

    /// Whether the client admission named `user` in `tier` may do `action`
    /// with `file`. `Undecided` when the policy does not decide transfers
    /// (the relay then refuses uploads and pushes, and allows a client only
    /// its own files and those offered to it).
    fn may_transfer(
        &self,
        _user: &str,
        _tier: &str,
        _action: FileAction,
        _file: &FileSubject<'_>,
    ) -> MayRegister {
        MayRegister::Undecided
    }
}

/// What the router is asked about.
#[derive(Debug)]
pub enum RouteInput<'a> {
    Publish {
        channel: &'a str,
    },
    Request {
        space: &'a str,
        method: &'a str,
        path: &'a str,
        headers: &'a [(String, String)],
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Deliver as addressed.
    Pass,
    /// Deliver to another channel or space.
    Rewrite { target: String },
    /// Refuse; the sender gets `code` with `reason`.
    Reject { code: ErrorCode, reason: String },
}

/// How a channel keeps history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHistory {
    /// Messages kept.
    pub size: usize,
    pub ttl_ms: u64,
    /// Also kept in the embedded store.
    pub persist: bool,
}

pub trait Router: Send + Sync + 'static {
    fn route(&self, input: &RouteInput<'_>) -> Route;

    /// Whether and how a new `channel` keeps history, given what the
    /// configuration says. Called outside any channel lock.
    fn channel_history(
        &self,
        _channel: &str,
        configured: Option<ChannelHistory>,
    ) -> Option<ChannelHistory> {
        configured
    }
}

/// What a filter made of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Filtered {
    /// Deliver these bytes (the original or a replacement).
    Deliver(Data),
    /// Do not deliver; the publisher gets `code` with `reason`.
    Drop { code: ErrorCode, reason: String },
}

/// Transforms or drops messages published on channels.
pub trait Filter: Send + Sync + 'static {
    fn filter(&self, channel: &str, data: Data) -> Filtered;
}

/// Admits everyone, routes everything as addressed, filters nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenDoor;

impl Admission for OpenDoor {
    fn admit(&self, _: &Handshake<'_>) -> Admit {
        Admit::Allow(None)
    }
}

impl Filter for OpenDoor {
    fn filter(&self, _: &str, data: Data) -> Filtered {
        Filtered::Deliver(data)
    }
}

impl Router for OpenDoor {
    fn route(&self, _: &RouteInput<'_>) -> Route {
        Route::Pass
    }
}

/// All the decision points at once, as a session needs them.
pub trait Hooks: Admission + Router + Filter {}

impl<T: Admission + Router + Filter> Hooks for T {}
