//! Listeners and the byte streams under the protocol: HTTP (hyper, http1 and
//! http2), WebSocket upgrades, QUIC (quinn), TLS identities, and byte counting.

pub mod body;
pub mod http;
pub mod io;
pub mod quic;
pub mod tls;
pub mod ws;
