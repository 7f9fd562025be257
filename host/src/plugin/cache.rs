//! The on-disk cache of compiled components, so a restart or a repeated swap
//! of the same bytes skips compilation (tens of milliseconds per plugin in a
//! release build, far more in a debug one).
//!
//! Entries are named by the wasm digest plus the engine's compatibility hash
//! and written atomically (temporary file, then rename). The folder is kept
//! under a byte bound: after each write the least recently used entries go
//! (a load marks an entry used by touching its modification time).
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
    // (their name is their content's digest); pruning only unlinks them,
    // which leaves an existing mapping intact. wasmtime still checks the
    // version and configuration header and refuses a mismatch safely.
    let component =
        unsafe { Component::deserialize_file(engine, path) }.map_err(|e| format!("{e:#}"))?;
    // Marks it recently used for pruning; the content is not touched.
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
    Ok(component)
}

/// Removes the least recently used entries of `dir` until the rest weigh at
/// most `max_bytes`; `keep` (the entry just written) is never removed.
/// Returns how many were removed.
pub fn prune(dir: &Path, max_bytes: u64, keep: &Path) -> usize {
    let Ok(read) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut entries: Vec<(std::time::SystemTime, u64, std::path::PathBuf)> = read
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            let path = entry.path();
            let is_entry = metadata.is_file() && path.extension().is_some_and(|e| e == "cwasm");
            if !is_entry {
                return None;
            }
            Some((metadata.modified().ok()?, metadata.len(), path))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    entries.sort_by_key(|(modified, _, _)| *modified);
    let mut removed = 0;
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total = total.saturating_sub(len);
            removed += 1;
        }
    }
    removed
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn pruning_removes_the_least_recently_used_but_never_the_new_entry() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let entry = |name: &str, age_s: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let file = std::fs::File::options().append(true).open(&path).unwrap();
            file.set_modified(now - Duration::from_secs(age_s)).unwrap();
            path
        };
        let oldest = entry("a.cwasm", 30);
        let middle = entry("b.cwasm", 20);
        let newest = entry("c.cwasm", 10);
        // The entry just written may be old by its clock (a copied file); it stays.
        let written = entry("d.cwasm", 40);
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 1000]).unwrap();
        assert_eq!(prune(dir.path(), 250, &written), 2);
        assert!(!oldest.exists() && !middle.exists());
        assert!(newest.exists() && written.exists());
        assert!(
            dir.path().join("notes.txt").exists(),
            "only entries are pruned"
        );
        assert_eq!(prune(dir.path(), 250, &written), 0);
    }
}
