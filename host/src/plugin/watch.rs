//! The watched plugin folder: drop `NAME.wasm` and `NAME.toml` in it to load
//! or swap plugin NAME; delete them to unload it. Polled (a stat per file per
//! interval) rather than inotify, so it behaves the same on every filesystem,
//! including network and container mounts where change events go missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::loaded::Source;
use super::registry::Registry;

/// What identifies one version of a file pair without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    wasm: (SystemTime, u64),
    manifest: (SystemTime, u64),
}

async fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Scans `dir` every `interval` until `stop`.
pub async fn watch(
    registry: Arc<Registry>,
    dir: PathBuf,
    interval: Duration,
    stop: CancellationToken,
) {
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create the plugin folder; not watching it");
        return;
    }
    tracing::info!(dir = %dir.display(), "watching the plugin folder");
    let mut seen: HashMap<String, Fingerprint> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let present = scan(&dir).await;
        for (name, (wasm_path, manifest_path, print)) in &present {
            if seen.get(name) == Some(print) {
                continue;
            }
            // Remembered even when the load fails, so a broken pair is retried
            // when it changes, not every interval.
            seen.insert(name.clone(), print.clone());
            load(&registry, name, wasm_path, manifest_path).await;
        }
        let gone: Vec<String> = seen
            .keys()
            .filter(|name| !present.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            seen.remove(&name);
            if registry.source_of(&name) == Some(Source::Folder) {
                match registry.remove(&name) {
                    Ok(()) => tracing::info!(plugin = %name, "plugin files removed; unloaded"),
                    Err(e) => tracing::warn!(plugin = %name, error = %e, "cannot unload"),
                }
            }
        }
    }
}

async fn scan(dir: &Path) -> HashMap<String, (PathBuf, PathBuf, Fingerprint)> {
    let mut found = HashMap::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return found;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let wasm_path = entry.path();
        if wasm_path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let Some(name) = wasm_path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        let manifest_path = wasm_path.with_extension("toml");
        let (Some(wasm), Some(manifest)) = (
            fingerprint(&wasm_path).await,
            fingerprint(&manifest_path).await,
        ) else {
            continue;
        };
        found.insert(
            name,
            (wasm_path, manifest_path, Fingerprint { wasm, manifest }),
        );
    }
    found
}

async fn load(registry: &Registry, name: &str, wasm_path: &Path, manifest_path: &Path) {
    let (wasm, manifest) = match (
        tokio::fs::read(wasm_path).await,
        tokio::fs::read_to_string(manifest_path).await,
    ) {
        (Ok(wasm), Ok(manifest)) => (wasm, manifest),
        (Err(e), _) | (_, Err(e)) => {
            registry.set_folder_refusal(name, Some(format!("cannot read the files: {e}")));
            tracing::warn!(plugin = name, error = %e, "cannot read plugin files");
            return;
        }
    };
    match registry
        .load(name, wasm.into(), &manifest, Source::Folder)
        .await
    {
        Ok(report) => {
            registry.set_folder_refusal(name, None);
            tracing::info!(plugin = name, version = %report.version, total_ms = report.total_ms, "loaded from the plugin folder")
        }
        Err(e) => {
            registry.set_folder_refusal(name, Some(e.to_string()));
            tracing::warn!(plugin = name, error = %e, "refused a plugin from the plugin folder; the previous version keeps serving")
        }
    }
}
