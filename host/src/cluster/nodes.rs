//! The node registry: one entry per relay in a JetStream key-value bucket
//! whose entries live `cluster.node_ttl_ms` (the bucket's max age, kept on
//! the server's clock). Each node rewrites its entry every
//! `cluster.heartbeat_ms`; one that stops (killed, cut off) drops out
//! within the TTL, with nobody having to notice it died. A node that shuts
//! down cleanly removes its entry at once.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::ClusterError;

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    /// Where its HTTP listener is (as configured).
    pub http: String,
    pub version: String,
    pub started_unix_ms: i64,
    /// Its connections when it last renewed its entry.
    pub connections: u64,
    /// The epoch it numbers its channels under (`cluster::bus`).
    #[serde(default)]
    pub epoch: String,
    /// The spaces its own instances serve, with their load.
    #[serde(default)]
    pub spaces: Vec<crate::spaces::LocalSpace>,
    /// The plugin versions it runs.
    #[serde(default)]
    pub plugins: Vec<PluginVersion>,
    /// Plugin versions from the cluster it refused (the one before keeps
    /// serving there), with why, by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub plugin_refusals: std::collections::BTreeMap<String, String>,
}

/// A plugin version as a node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginVersion {
    pub name: String,
    pub version: String,
    /// SHA-256 of the component.
    pub digest: String,
}

pub struct Registry {
    /// Swapped when the bucket is created again (a NATS server restarted
    /// without it: it is kept in memory).
    kv: std::sync::Mutex<kv::Store>,
    jetstream: jetstream::Context,
    bucket: String,
    ttl: Duration,
}

impl Registry {
    /// Opens (creating if needed) the bucket `bucket` with entries that
    /// live `ttl`. Every node asks for the same bucket; the first creates it.
    pub async fn open(
        jetstream: jetstream::Context,
        bucket: &str,
        ttl: Duration,
    ) -> Result<Self, ClusterError> {
        let kv = create(&jetstream, bucket, ttl).await?;
        Ok(Self {
            kv: std::sync::Mutex::new(kv),
            jetstream,
            bucket: bucket.to_owned(),
            ttl,
        })
    }

    fn store(&self) -> kv::Store {
        self.kv.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Writes (renews) this node's entry; creates the bucket again if the
    /// server lost it.
    pub async fn renew(&self, info: &NodeInfo) -> Result<(), ClusterError> {
        let value: bytes::Bytes = serde_json::to_vec(info)
            .expect("node info serializes")
            .into();
        if self.store().put(&info.node, value.clone()).await.is_ok() {
            return Ok(());
        }
        let kv = create(&self.jetstream, &self.bucket, self.ttl).await?;
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = kv.clone();
        kv.put(&info.node, value)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Bucket {
                bucket: self.bucket.clone(),
                source: e.into(),
            })
    }

    /// Removes this node's entry (a clean shutdown).
    pub async fn leave(&self, node: &str) {
        if let Err(e) = self.store().purge(node).await {
            tracing::warn!(error = %e, "could not remove this node from the registry; it expires on its own");
        }
    }

    /// The nodes whose entries are live, by name.
    pub async fn list(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| ClusterError::Bucket {
            bucket: self.bucket.clone(),
            source,
        };
        let kv = self.store();
        let keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| failed(e.into()))?
            .try_collect()
            .await
            .map_err(|e| failed(e.into()))?;
        let mut nodes = Vec::with_capacity(keys.len());
        for key in keys {
            // Gone between the listing and the read: expired, skip it.
            if let Some(value) = kv.get(&key).await.map_err(|e| failed(e.into()))?
                && let Ok(info) = serde_json::from_slice::<NodeInfo>(&value)
            {
                nodes.push(info);
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }
}

/// The bucket, created if absent (every node asks for the same one).
async fn create(
    jetstream: &jetstream::Context,
    bucket: &str,
    ttl: Duration,
) -> Result<kv::Store, ClusterError> {
    jetstream
        .create_key_value(kv::Config {
            bucket: bucket.to_owned(),
            description: "wasmrelay nodes: one entry per live relay".into(),
            history: 1,
            max_age: ttl,
            // On disk, so a NATS restart does not empty it: every node
            // would look gone until it renewed its entry.
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| ClusterError::Bucket {
            bucket: bucket.to_owned(),
            source: e.into(),
        })
}

/// Renews this node's entry every `every` until `stop`, then removes it.
/// `describe` says what to write each time (`None`: the relay is gone).
pub async fn heartbeat(
    cluster: std::sync::Arc<super::Cluster>,
    describe: impl Fn() -> Option<NodeInfo> + Send + 'static,
    every: Duration,
    stop: CancellationToken,
) {
    let mut beat = super::Beat::new(every, stop);
    let mut failing = false;
    while beat.next().await {
        let Some(info) = describe() else { break };
        match cluster.nodes.renew(&info).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("registry entry renewed again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not renew this node's registry entry; other nodes will see it gone until it is");
            }
            Err(_) => {}
        }
    }
    cluster.nodes.leave(cluster.node()).await;
}
