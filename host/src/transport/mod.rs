//! Listeners and the byte streams under the protocol: HTTP (hyper, http1 and
//! http2), WebSocket upgrades, and the byte counting every connection gets.

pub mod http;
pub mod io;
pub mod ws;
