//! The decision points plugins will own: admission (who may connect, and on
//! what terms) and routing (where a publish or request goes). The relay core
//! asks these traits and enforces their answers; the built-in implementations
//! let everything through unchanged. The wasm plugin runtime implements the
//! same traits.

use std::net::SocketAddr;

use crate::protocol::ErrorCode;

/// What admission sees of a connection before it is upgraded.
#[derive(Debug)]
pub struct Handshake<'a> {
    pub peer: SocketAddr,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a http::HeaderMap,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Admit {
    Allow,
    Deny {
        status: u16,
        code: ErrorCode,
        reason: String,
    },
}

pub trait Admission: Send + Sync + 'static {
    fn admit(&self, handshake: &Handshake<'_>) -> Admit;
}

/// What the router is asked about.
#[derive(Debug)]
pub enum RouteInput<'a> {
    Publish { channel: &'a str },
    Request { space: &'a str, path: &'a str },
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

pub trait Router: Send + Sync + 'static {
    fn route(&self, input: &RouteInput<'_>) -> Route;
}

/// Admits everyone and routes everything as addressed.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenDoor;

impl Admission for OpenDoor {
    fn admit(&self, _: &Handshake<'_>) -> Admit {
        Admit::Allow
    }
}

impl Router for OpenDoor {
    fn route(&self, _: &RouteInput<'_>) -> Route {
        Route::Pass
    }
}
