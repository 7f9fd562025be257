//! Tasks in a cluster: every node knows every task defined over the API on
//! any of them, and each scheduled slot fires on exactly one node.
//!
//! - Definitions live in a JetStream key-value bucket, `<name>_tasks`: one
//!   key per task holding its definition and its schedule's anchor, so an
//!   interval's slots fall at the same instants on every node. A define,
//!   change or delete over one node's API is written there ([`Peers::share`]);
//!   every node follows the bucket from its latest values ([`follow`]) and
//!   applies what differs. Tasks from a node's task folder stay its own
//!   (the same file on every node gives every node the task).
//! - Claims: before a slot fires, its node creates the key `<task>.<slot>`
//!   in `<name>_task_claims` (create-if-absent, kept [`CLAIM_TTL`]): the one
//!   node whose create succeeds runs the slot, with the task's retries; the
//!   others record nothing. When NATS cannot be asked, the slot is recorded
//!   `skipped` with the reason rather than risk running it twice.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::manager::Define;
use super::spec::TaskSpec;
use super::{Origin, TaskError, Tasks};
use crate::cluster::{Cluster, ClusterError};

/// How long a slot's claim is kept: far longer than any node can lag
/// behind the others in firing the same slot.
pub const CLAIM_TTL: Duration = Duration::from_secs(300);

/// What the task manager asks of the other nodes.
pub trait Peers: Send + Sync {
    /// Whether this node fires `task`'s slot at `slot_ms`: true for exactly
    /// one node that asks; an error when that cannot be known now.
    fn claim(&self, task: &str, slot_ms: i64) -> BoxFuture<'static, Result<bool, String>>;

    /// A task defined or changed (`Some`), or deleted (`None`), over this
    /// node's API, for the other nodes.
    fn share(&self, task: &str, definition: Option<Shared>);
}

/// A task as the nodes share it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    pub spec: TaskSpec,
    /// Where its interval counts from (wall-clock ms).
    pub anchor_ms: i64,
}

/// [`Peers`] over the cluster's buckets.
pub struct ClusterPeers {
    claims: kv::Store,
    definitions: kv::Store,
}

impl ClusterPeers {
    /// Opens (creating if needed) the two buckets.
    pub async fn open(cluster: &Cluster) -> Result<Arc<Self>, ClusterError> {
        let claims = cluster
            .bucket(
                "task_claims",
                kv::Config {
                    description: "wasmrelay task slots: the node that fires each".into(),
                    history: 1,
                    // A backstop; each claim is created with its own TTL.
                    max_age: CLAIM_TTL * 2,
                    // Per-key TTLs (nats-server 2.11 or later).
                    limit_markers: Some(Duration::from_secs(1)),
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                },
            )
            .await?;
        let definitions = cluster
            .bucket(
                "tasks",
                kv::Config {
                    description: "wasmrelay tasks defined over the API, shared by every node"
                        .into(),
                    history: 1,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                },
            )
            .await?;
        Ok(Arc::new(Self {
            claims,
            definitions,
        }))
    }
}

impl Peers for ClusterPeers {
    fn claim(&self, task: &str, slot_ms: i64) -> BoxFuture<'static, Result<bool, String>> {
        let claims = self.claims.clone();
        let key = format!("{task}.{slot_ms}");
        Box::pin(async move {
            match claims
                .create_with_ttl(&key, bytes::Bytes::new(), CLAIM_TTL)
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn share(&self, task: &str, definition: Option<Shared>) {
        let definitions = self.definitions.clone();
        let task = task.to_owned();
        tokio::spawn(async move {
            let written = match &definition {
                Some(shared) => {
                    let value = serde_json::to_vec(shared).expect("a task serializes");
                    definitions
                        .put(&task, value.into())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                None => definitions.delete(&task).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = written {
                tracing::warn!(task, error = %e, "a task change did not reach the other nodes");
            }
        });
    }
}

/// Applies the shared definitions to this node's tasks, from the latest
/// value of each and then as they change, until `stop`.
pub async fn follow(peers: Arc<ClusterPeers>, tasks: Tasks, stop: CancellationToken) {
    let mut changes = match peers.definitions.watch_with_history(">").await {
        Ok(changes) => changes,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow the cluster's tasks; this node keeps its own");
            return;
        }
    };
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return,
            next = changes.next() => match next {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "a shared task change was not read");
                    continue;
                }
                None => {
                    tracing::warn!("stopped following the cluster's tasks");
                    return;
                }
            },
        };
        let applied = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Shared>(&entry.value) {
                Ok(shared) => tasks.define_shared(shared).await.map(|_| ()),
                Err(e) => {
                    tracing::warn!(task = %entry.key, error = %e, "a shared task does not read");
                    continue;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                match tasks.delete_shared(&entry.key).await {
                    Err(TaskError::NotFound(_)) => Ok(()),
                    other => other,
                }
            }
        };
        if let Err(e) = applied {
            tracing::warn!(task = %entry.key, error = %e, "a task another node defined was not taken");
        }
    }
}

// The manager's side: what a definition from another node does here.
impl Tasks {
    /// Takes a definition another node shared (or this node's own, seen
    /// again): defined or replaced, with its anchor; not shared again.
    pub async fn define_shared(&self, shared: Shared) -> Result<(), TaskError> {
        self.define_from(
            shared.spec,
            Origin::Api,
            Define::Upsert,
            Some(shared.anchor_ms),
        )
        .await
        .map(|_| ())
    }
}
