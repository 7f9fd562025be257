//! Wasm component plugins: the WIT bindings, the sandboxed runtime
//! (wasmtime, pooling allocator, per-call deadline, memory cap), the host
//! capabilities, the registry that hot-swaps versions under live traffic,
//! the bundled plugins and the watched plugin folder.

pub mod bindings;
/// The plugins compiled into the binary (data only, so config can check names).
pub use crate::bundled;
mod cache;
pub mod host_api;
pub mod kv;
pub mod loaded;
pub mod manifest;
pub mod registry;
pub mod runtime;
pub mod watch;

pub use loaded::{CallError, LoadedPlugin, Source};
pub use manifest::{Capability, Manifest, Role};
pub use registry::{PluginInfo, Registry, RegistryError, SwapReport};
pub use runtime::{LoadError, Runtime};
