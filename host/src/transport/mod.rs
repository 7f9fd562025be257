//! Listeners and the byte streams under the protocol: HTTP (hyper, http1 and
//! http2), WebSocket upgrades, QUIC (quinn), TLS identities, byte counting,
//! and read-ahead during bursts.

pub mod admit;
pub mod body;
pub mod conn;
pub mod http;
pub mod io;
pub mod quic;
pub mod readahead;
pub mod reply;
pub mod tls;
pub mod ws;
