//! Which node holds which user: a JetStream key-value bucket,
//! `<name>_presence`, with one key per (user, node) — `<user>.<node>`, the
//! user's name in URL-safe base64 — holding how many connections the user
//! has there.
//!
//! Each node writes what changed every heartbeat and writes everything
//! again every [`REWRITE_EVERY`] heartbeats; entries live
//! [`AGE_IN_HEARTBEATS`] heartbeats (the bucket's max age), so a killed
//! node's entries age out on their own, and readers count only nodes in the
//! registry, so they drop out of every view within `cluster.node_ttl_ms`.
//! A node that stops cleanly removes its entries at once.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use serde::Serialize;

use super::{Cluster, ClusterError};

/// Every this many heartbeats a node writes all its entries again.
pub const REWRITE_EVERY: u64 = 10;
/// Entries not rewritten within this many heartbeats expire.
pub const AGE_IN_HEARTBEATS: u32 = 30;

/// One node's share of a user's connections.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserOnNode {
    pub node: String,
    pub connections: u64,
}

pub struct Presence {
    kv: kv::Store,
    node: String,
    /// What this node last wrote, by user.
    written: tokio::sync::Mutex<(HashMap<String, u64>, u64)>,
}

impl Presence {
    pub async fn open(cluster: &Cluster, heartbeat: Duration) -> Result<Self, ClusterError> {
        let kv = cluster
            .bucket(
                "presence",
                kv::Config {
                    description: "wasmrelay users: connections per user and node".into(),
                    history: 1,
                    max_age: heartbeat * AGE_IN_HEARTBEATS,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                },
            )
            .await?;
        Ok(Self {
            kv,
            node: cluster.node().to_owned(),
            written: tokio::sync::Mutex::new((HashMap::new(), 0)),
        })
    }

    fn key(&self, user: &str, node: &str) -> String {
        let user = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user);
        format!("{user}.{node}")
    }

    /// Brings this node's entries to `users` (connections per user now).
    pub async fn publish(&self, users: HashMap<String, u64>) -> Result<(), String> {
        let mut written = self.written.lock().await;
        let (last, beats) = &mut *written;
        *beats += 1;
        let everything = (*beats).is_multiple_of(REWRITE_EVERY);
        for (user, count) in &users {
            if everything || last.get(user) != Some(count) {
                let value = serde_json::to_vec(&serde_json::json!({ "connections": count }))
                    .expect("a count serializes");
                self.kv
                    .put(self.key(user, &self.node), value.into())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        for user in last.keys().filter(|user| !users.contains_key(*user)) {
            self.kv
                .purge(self.key(user, &self.node))
                .await
                .map_err(|e| e.to_string())?;
        }
        *last = users;
        Ok(())
    }

    /// Removes this node's entries (a clean stop).
    pub async fn leave(&self) {
        let written = std::mem::take(&mut self.written.lock().await.0);
        for user in written.keys() {
            if let Err(e) = self.kv.purge(self.key(user, &self.node)).await {
                tracing::debug!(error = %e, "a presence entry was left to expire");
            }
        }
    }

    /// Where `user` is connected, on the nodes in `live`.
    pub async fn lookup(&self, user: &str, live: &[String]) -> Result<Vec<UserOnNode>, String> {
        let mut found = Vec::new();
        for node in live {
            let Some(value) = self
                .kv
                .get(self.key(user, node))
                .await
                .map_err(|e| e.to_string())?
            else {
                continue;
            };
            let connections = serde_json::from_slice::<serde_json::Value>(&value)
                .ok()
                .and_then(|v| v["connections"].as_u64())
                .unwrap_or(0);
            if connections > 0 {
                found.push(UserOnNode {
                    node: node.clone(),
                    connections,
                });
            }
        }
        Ok(found)
    }
}
