//! Several relays as one system over NATS JetStream (`cluster.*`, off by
//! default: one node needs nothing external). This module owns the
//! connection to NATS and what the nodes share through it: the node
//! registry ([`nodes`]: which relays are in the system now, each renewing
//! its entry, a silent one expiring on the server's clock), channels
//! across nodes ([`bus`]) and spaces across nodes ([`spaces`]), both
//! following the registry ([`follow`]).
//!
//! The seams the rest of the relay already has (`bus::Bus`,
//! `channels::PresenceView`, `spaces::Directory`, `quota::users::UserLedger`,
//! ids that carry their node) are where the cluster's channels, spaces and
//! quotas plug in; ARCHITECTURE.md keeps the map.

pub mod bus;
pub mod nodes;
pub mod presence;
pub mod spaces;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;

/// This node's membership in a cluster.
pub struct Cluster {
    /// The system's name: the prefix of its subjects, streams and buckets.
    name: String,
    node: String,
    pub(crate) nodes: nodes::Registry,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Whether the connection to NATS is up, as its events say.
    link: tokio::sync::watch::Receiver<bool>,
    /// Every channel's numbered messages, in order ([`bus`]).
    channel_stream: jetstream::stream::Stream,
    /// The registry as last read ([`follow`]).
    view: ArcSwap<Vec<nodes::NodeInfo>>,
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
        let (link_tx, link) = tokio::sync::watch::channel(true);
        let client = async_nats::ConnectOptions::new()
            .name(format!("wasmrelay {node}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let link_tx = link_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("lost the connection to NATS; reconnecting");
                            link_tx.send_replace(false);
                        }
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            link_tx.send_replace(true);
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
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
            jetstream.clone(),
            &format!("{}_nodes", config.name),
            Duration::from_millis(config.node_ttl_ms),
        )
        .await?;
        let stream_name = format!("{}_channels", config.name);
        let channel_stream = jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: stream_name.clone(),
                description: Some("wasmrelay channel messages, numbered by their owners".into()),
                subjects: vec![format!("{}.ch.>", config.name)],
                storage: jetstream::stream::StorageType::File,
                max_age: Duration::from_millis(config.channel_retention_ms),
                max_bytes: i64::try_from(config.channel_retention_bytes).unwrap_or(i64::MAX),
                discard: jetstream::stream::DiscardPolicy::Old,
                // Within it a message written again is kept once.
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: stream_name,
                source: e.into(),
            })?;
        tracing::info!(url = %config.nats_url, cluster = %config.name, node, "joined the cluster");
        Ok(Arc::new(Self {
            name: config.name.clone(),
            node: node.to_owned(),
            nodes,
            client,
            jetstream,
            channel_stream,
            link,
            view: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// A key-value bucket the nodes share, `<name>_<what>`, created by the
    /// first node that asks with `config` (its bucket name is set here).
    pub async fn bucket(
        &self,
        what: &str,
        config: jetstream::kv::Config,
    ) -> Result<jetstream::kv::Store, ClusterError> {
        let bucket = format!("{}_{what}", self.name);
        self.jetstream
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.clone(),
                ..config
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket,
                source: e.into(),
            })
    }

    /// An object store the nodes share, `<name>_<what>` (on disk), created
    /// by the first node that asks.
    pub async fn object_store(
        &self,
        what: &str,
        description: &str,
    ) -> Result<jetstream::object_store::ObjectStore, ClusterError> {
        let bucket = format!("{}_{what}", self.name);
        self.jetstream
            .create_object_store(jetstream::object_store::Config {
                bucket: bucket.clone(),
                description: Some(description.to_owned()),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket,
                source: e.into(),
            })
    }

    /// The live nodes as the registry listed them last (every heartbeat).
    pub fn view(&self) -> Arc<Vec<nodes::NodeInfo>> {
        self.view.load_full()
    }

    /// Reads the registry once and hands it to what follows it.
    pub async fn refresh(
        &self,
        bus: Option<&bus::ClusterBus>,
        spaces: Option<&spaces::ClusterSpaces>,
    ) {
        if let Some(bus) = bus {
            bus.expire_forwards();
        }
        let nodes = match self.nodes.list().await {
            Ok(nodes) => nodes,
            Err(e) => {
                // Owners and proxies stay as they were until it reads again.
                tracing::debug!(error = %e, "registry not read");
                return;
            }
        };
        if let Some(bus) = bus {
            bus.set_view(&nodes);
        }
        if let Some(spaces) = spaces {
            spaces.sync(&nodes);
        }
        self.view.store(Arc::new(nodes));
    }

    /// Follows the connection to NATS going down (false) and up (true).
    pub fn link(&self) -> tokio::sync::watch::Receiver<bool> {
        self.link.clone()
    }

    /// Whether the connection to NATS is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// A tick every `every` until `stop`: what the cluster's periodic tasks
/// (heartbeat, registry, presence, takeovers) wait on. A late tick is not
/// made up for in a burst.
pub struct Beat {
    tick: tokio::time::Interval,
    stop: CancellationToken,
}

impl Beat {
    pub fn new(every: Duration, stop: CancellationToken) -> Self {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, stop }
    }

    /// Waits for the next tick; false once stopped.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

/// Keeps what follows the registry current: every `every` until `stop`,
/// the channels' owners and the other nodes' spaces.
pub async fn follow(
    cluster: Arc<Cluster>,
    bus: Option<Arc<bus::ClusterBus>>,
    spaces: Option<Arc<spaces::ClusterSpaces>>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut beat = Beat::new(every, stop);
    while beat.next().await {
        cluster.refresh(bus.as_deref(), spaces.as_deref()).await;
    }
}
