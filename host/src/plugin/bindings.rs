//! The one place host bindings are generated from `wit/plugin.wit`: one
//! `bindgen!` expansion per role world (the macro takes a single world). The router's
//! expansion owns the shared interfaces; the other worlds reuse them through
//! `with`, so each capability has exactly one host trait.

pub mod router {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
    });
}

/// Bindings for another role's world that reuse the router's capability
/// interfaces and shared types.
macro_rules! role_world {
    ($world:literal) => {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: $world,
            with: {
                "wasmrelay:plugin/types": super::router::wasmrelay::plugin::types,
                "wasmrelay:plugin/log": super::router::wasmrelay::plugin::log,
                "wasmrelay:plugin/kv": super::router::wasmrelay::plugin::kv,
                "wasmrelay:plugin/publish": super::router::wasmrelay::plugin::publish,
                "wasmrelay:plugin/presence": super::router::wasmrelay::plugin::presence,
                "wasmrelay:plugin/clock": super::router::wasmrelay::plugin::clock,
                "wasmrelay:plugin/http": super::router::wasmrelay::plugin::http,
                "wasmrelay:plugin/stats": super::router::wasmrelay::plugin::stats,
            },
        });
    };
}

/// A router that also answers `channel-history`; tried first for the
/// router role, with plain `router` as the fallback.
pub mod router_channels {
    role_world!("router-channels");
}

pub mod policy {
    role_world!("policy");
}

/// A policy that also answers `may-register`; tried first for the policy
/// role, with plain `policy` as the fallback.
pub mod policy_spaces {
    role_world!("policy-spaces");
}

/// A policy that also answers `may-transfer`; tried before `policy-spaces`.
pub mod policy_files {
    role_world!("policy-files");
}

pub mod filter {
    role_world!("filter");
}

pub mod task {
    role_world!("task");
}

pub use router::wasmrelay::plugin::{clock, http, kv, log, presence, publish, stats, types};
/// Only the task world imports it.
pub use task::wasmrelay::plugin::transfer;
