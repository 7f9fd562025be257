//! The end-to-end suite, one test binary: every integration test links the
//! whole relay (wasmtime, quinn, rustls), and one binary instead of ten keeps
//! the build several gigabytes smaller and links once instead of ten times.
//!
//! Run one area with `cargo test -p wasmrelay-tests --test suite quic::`.

mod admin;
mod backpressure;
mod browser;
mod cluster;
mod e2e;
mod files;
mod history;
mod hot_swap;
mod leak;
mod limits;
mod plugins;
mod protocol;
mod push;
mod quic;
mod security;
mod spaces;
mod streams;
mod tasks;
mod tls;
mod transfers;
