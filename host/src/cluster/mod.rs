//! Several relays as one system over NATS JetStream (`cluster.*`, off by
//! default: one node needs nothing external). This module owns the
//! connection to NATS and what the nodes share through it; today that is
//! the node registry ([`nodes`]): which relays are in the system now, each
//! renewing its entry, a silent one expiring on the server's clock.
//!
//! The seams the rest of the relay already has (`bus::Bus`,
//! `channels::PresenceView`, `spaces::Directory`, `quota::users::UserLedger`,
//! ids that carry their node) are where the cluster's channels, spaces and
//! quotas plug in; ARCHITECTURE.md keeps the map.

pub mod bus;
pub mod nodes;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use crate::config::ClusterConfig;

/// This node's membership in a cluster.
pub struct Cluster {
    /// The system's name: the prefix of its subjects, streams and buckets.
    name: String,
    node: String,
    pub(crate) nodes: nodes::Registry,
    client: async_nats::Client,
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("cannot reach NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(
        "cannot open the JetStream bucket {bucket} (is JetStream enabled on the server? nats-server -js)"
    )]
    Bucket {
        bucket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Cluster {
    /// Connects to NATS and opens what the nodes share. NATS reconnects by
    /// itself after this; only the first connection must succeed.
    pub async fn join(config: &ClusterConfig, node: &str) -> Result<Arc<Self>, ClusterError> {
        // The first connection must succeed (a relay told to join says so
        // at start); after that the client reconnects by itself.
        let client = async_nats::ConnectOptions::new()
            .name(format!("wasmrelay {node}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("lost the connection to NATS; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            })
            .connect(&config.nats_url)
            .await
            .map_err(|source| ClusterError::Connect {
                url: config.nats_url.clone(),
                source,
            })?;
        let jetstream = jetstream::new(client.clone());
        let nodes = nodes::Registry::open(
            jetstream,
            &format!("{}_nodes", config.name),
            Duration::from_millis(config.node_ttl_ms),
        )
        .await?;
        tracing::info!(url = %config.nats_url, cluster = %config.name, node, "joined the cluster");
        Ok(Arc::new(Self {
            name: config.name.clone(),
            node: node.to_owned(),
            nodes,
            client,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the connection to NATS is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
