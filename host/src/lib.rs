//! wasmrelay: a WebAssembly-extensible edge relay.
//!
//! The library exposes [`run`]: give it a [`Config`], bound [`Listeners`] and a
//! cancellation token, and it serves until the token is cancelled, then shuts
//! down gracefully. The `wasmrelay` binary (see [`cli`]) only parses flags,
//! sets up tracing and calls it; the tests call the same function on port 0.
//! ARCHITECTURE.md maps the modules.

pub mod admin;
pub mod bundled;
pub mod bus;
pub mod channels;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod hooks;
pub mod ids;
#[cfg(test)]
mod layers;
pub mod metrics;
pub mod plugin;
pub mod quota;
pub mod rate;
pub mod relay;
pub mod rollout;
pub mod secrets;
pub mod session;
pub mod shutdown;
pub mod spaces;
pub mod state;
pub mod store;
pub mod tasks;
#[cfg(test)]
mod testing;
pub mod transfer;
pub mod transport;

/// The wire protocol lives in its own crate so clients can share it without
/// the relay; re-exported so `wasmrelay::protocol` keeps naming it.
pub use wasmrelay_protocol as protocol;

pub use config::Config;
pub use relay::{Listeners, Relay, RunError, run};
