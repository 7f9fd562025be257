//! The on-disk cache of compiled components, so a restart or a repeated swap
//! of the same bytes skips compilation (tens of milliseconds per plugin in a
//! release build, far more in a debug one).
//!
//! Entries are named by the wasm digest plus the engine's compatibility hash
//! and written atomically (temporary file, then rename).
#![allow(unsafe_code)]

use std::path::Path;

use wasmtime::Engine;
use wasmtime::component::Component;

/// Loads a compiled component written by [`store`].
pub fn load(engine: &Engine, path: &Path) -> Result<Component, String> {
    // SAFETY: wasmtime requires that the file holds unmodified output of
    // `Component::serialize` and is not changed while mapped. Only `store`
    // writes this directory, each entry is created once under a temporary
    // name and renamed into place, and entries are never modified afterwards
    // (their name is their content's digest). wasmtime still checks the
    // version and configuration header and refuses a mismatch safely.
    unsafe { Component::deserialize_file(engine, path) }.map_err(|e| format!("{e:#}"))
}

/// Writes `component` to `path`; failures only cost a recompile next time.
pub fn store(component: &Component, path: &Path) {
    let bytes = match component.serialize() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot serialize a compiled plugin");
            return;
        }
    };
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let written =
        std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        tracing::warn!(path = %path.display(), error = %e, "cannot write the plugin compile cache");
    }
}
