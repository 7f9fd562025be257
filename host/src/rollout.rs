//! Plugin rollout across a cluster: a plugin uploaded, rolled back or
//! removed through one node's operator API reaches every node.
//!
//! The version a node's API made active is put in a JetStream object store,
//! `<name>_plugins` (object = plugin name, content = the component, the
//! manifest in its metadata): chunked and digest-checked by NATS, kept on
//! disk, so a node that joins later or restarts loads the current set.
//! Every node follows the store ([`follow`]): a version it does not run yet
//! is loaded through the same checks as an upload (manifest, compile,
//! instantiate, `self-check`) and swapped in only if they pass; a refusal
//! keeps the version already serving and is shown in the node's registry
//! entry. Each node lists the versions it runs in its registry entry, so
//! `GET /admin/cluster` shows every node's version of every plugin.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::object_store::{self, ObjectStore};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterError};
use crate::plugin::{Registry, Source};
use crate::store::Store;
use crate::store::plugins as saved;

/// The metadata key holding a version's manifest.
const MANIFEST: &str = "manifest";

pub struct Rollout {
    objects: ObjectStore,
    /// Why this node refused the cluster's version of a plugin, by name.
    refusals: Mutex<BTreeMap<String, String>>,
}

impl Rollout {
    pub async fn open(cluster: &Cluster) -> Result<Arc<Self>, ClusterError> {
        let objects = cluster
            .object_store(
                "plugins",
                "wasmrelay plugins: the version every node runs, by name",
            )
            .await?;
        Ok(Arc::new(Self {
            objects,
            refusals: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Makes `wasm` (with `manifest`) the version of plugin `name` every
    /// node runs: it has just become active on this node.
    pub async fn publish(&self, name: &str, wasm: Bytes, manifest: &str) -> Result<(), String> {
        let meta = object_store::ObjectMetadata {
            name: name.to_owned(),
            description: Some("a wasmrelay plugin component".into()),
            metadata: HashMap::from([(MANIFEST.to_owned(), manifest.to_owned())]),
            ..Default::default()
        };
        let mut reader: &[u8] = &wasm;
        self.objects
            .put(meta, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Plugin `name` was removed on this node: every node removes it.
    pub async fn withdraw(&self, name: &str) -> Result<(), String> {
        self.objects.delete(name).await.map_err(|e| e.to_string())
    }

    /// Refusals of the cluster's versions on this node, for its registry entry.
    pub fn refusals(&self) -> BTreeMap<String, String> {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refused(&self, name: &str, reason: Option<String>) {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        match reason {
            Some(reason) => refusals.insert(name.to_owned(), reason),
            None => refusals.remove(name),
        };
    }

    /// Brings plugin `info.name` to the cluster's version, if it differs.
    async fn apply(&self, info: &object_store::ObjectInfo, plugins: &Registry, store: &Store) {
        let name = info.name.as_str();
        if info.deleted {
            self.refused(name, None);
            if plugins.source_of(name) == Some(Source::Admin) && plugins.remove(name).is_ok() {
                keep(store, name, saved::removed).await;
                tracing::info!(plugin = name, "plugin removed across the cluster");
            }
            return;
        }
        let wasm = match self.fetch(name).await {
            Ok(wasm) => wasm,
            Err(e) => {
                tracing::warn!(plugin = name, error = %e, "the cluster's version of a plugin was not read");
                return;
            }
        };
        let manifest = info.metadata.get(MANIFEST).cloned().unwrap_or_default();
        let digest = crate::plugin::loaded::digest(&wasm);
        let version = crate::plugin::manifest::Manifest::from_toml(&manifest)
            .map(|m| m.version)
            .unwrap_or_default();
        let running = plugins
            .list()
            .into_iter()
            .any(|p| p.name == name && p.digest == digest && p.version == version);
        if running {
            self.refused(name, None);
            return;
        }
        match plugins
            .load(name, wasm.clone(), &manifest, Source::Admin)
            .await
        {
            Ok(report) => {
                self.refused(name, None);
                let version = saved::Version {
                    wasm: wasm.to_vec(),
                    manifest,
                };
                keep(store, name, move |conn, name| {
                    saved::uploaded(conn, name, &version)
                })
                .await;
                tracing::info!(plugin = name, version = %report.version, "plugin version from the cluster serving");
            }
            Err(e) => {
                tracing::warn!(plugin = name, error = %e, "the cluster's version of a plugin was refused here; the current one keeps serving");
                self.refused(name, Some(e.to_string()));
            }
        }
    }

    async fn fetch(&self, name: &str) -> Result<Bytes, String> {
        let mut object = self.objects.get(name).await.map_err(|e| e.to_string())?;
        let mut wasm = Vec::new();
        object
            .read_to_end(&mut wasm)
            .await
            .map_err(|e| e.to_string())?;
        Ok(wasm.into())
    }
}

/// Records a plugin change in this node's store, so it holds after a restart.
async fn keep(
    store: &Store,
    name: &str,
    change: impl FnOnce(&mut rusqlite::Connection, &str) -> rusqlite::Result<()> + Send + 'static,
) {
    let owned = name.to_owned();
    if let Err(e) = store.call(move |conn| change(conn, &owned)).await {
        tracing::warn!(plugin = name, error = %e, "plugin change not stored: it will not survive a restart");
    }
}

/// Loads the cluster's plugin versions (the current set first, then each
/// change) until `stop`.
pub async fn follow(
    rollout: Arc<Rollout>,
    plugins: Arc<Registry>,
    store: Store,
    stop: CancellationToken,
) {
    // A watch ends when NATS goes away for long; it is opened again (from
    // the current set: applying a version already running does nothing).
    loop {
        match rollout.objects.watch_with_history().await {
            Ok(mut changes) => loop {
                let info = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = changes.next() => match next {
                        Some(Ok(info)) => info,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "following the cluster's plugins again");
                            break;
                        }
                        None => break,
                    },
                };
                rollout.apply(&info, &plugins, &store).await;
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the cluster's plugins now; trying again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
