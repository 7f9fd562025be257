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
//! - Runs under way: while a claimed slot runs, `<task>.<slot>` in
//!   `<name>_task_runs` names the node running it (removed when the run
//!   ends). When a node drops out of the registry (killed: within
//!   `cluster.node_ttl_ms`), the others look for its runs there; the one
//!   that swaps the key to itself first takes the run over ([`take_over`]):
//!   it runs the slot again if the task has retries, else records it
//!   `failed` with the reason.

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

/// How long the marker of an ended run stays in `<name>_task_runs`.
const RUN_MARKER_TTL: Duration = Duration::from_secs(60);

/// What the task manager asks of the other nodes.
pub trait Peers: Send + Sync {
    /// Whether this node fires `task`'s slot at `slot_ms`: true for exactly
    /// one node that asks; an error when that cannot be known now.
    fn claim(&self, task: &str, slot_ms: i64) -> BoxFuture<'static, Result<bool, String>>;

    /// A task defined or changed (`Some`), or deleted (`None`), over this
    /// node's API, for the other nodes.
    fn share(&self, task: &str, definition: Option<Shared>);

    /// This node's run of `task`'s slot `slot_ms` has ended.
    fn finished(&self, task: &str, slot_ms: i64);
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
    runs: kv::Store,
    node: String,
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
                    // On disk: a NATS restart must not forget who fires a slot.
                    storage: async_nats::jetstream::stream::StorageType::File,
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
        let runs = cluster
            .bucket(
                "task_runs",
                kv::Config {
                    description: "wasmrelay task runs under way: the node running each".into(),
                    history: 1,
                    // An ended run's key is purged with a marker that
                    // expires (nats-server 2.11): none pile up.
                    limit_markers: Some(RUN_MARKER_TTL),
                    // On disk: a NATS restart must not forget who fires a slot.
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                },
            )
            .await?;
        Ok(Arc::new(Self {
            claims,
            definitions,
            runs,
            node: cluster.node().to_owned(),
        }))
    }
}

impl Peers for ClusterPeers {
    fn claim(&self, task: &str, slot_ms: i64) -> BoxFuture<'static, Result<bool, String>> {
        let (claims, runs) = (self.claims.clone(), self.runs.clone());
        let node = bytes::Bytes::from(self.node.clone());
        let key = format!("{task}.{slot_ms}");
        Box::pin(async move {
            match claims.create_with_ttl(&key, node.clone(), CLAIM_TTL).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(e.to_string()),
            }
            // Ours: under way here until it ends. Unrecorded, the run still
            // goes ahead; only a takeover if this node died would be lost.
            if let Err(e) = runs.put(&key, node).await {
                tracing::warn!(key, error = %e, "a claimed run was not recorded as under way");
            }
            Ok(true)
        })
    }

    fn finished(&self, task: &str, slot_ms: i64) {
        let runs = self.runs.clone();
        let key = format!("{task}.{slot_ms}");
        tokio::spawn(async move {
            if let Err(e) = runs.purge_with_ttl(&key, RUN_MARKER_TTL).await {
                tracing::debug!(key, error = %e, "an ended run was not cleared");
            }
        });
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
    // A watch ends when NATS goes away for long; it is opened again (from
    // the latest values: a definition already taken changes nothing).
    loop {
        match peers.definitions.watch_with_history(">").await {
            Ok(changes) => {
                if apply_changes(changes, &tasks, &stop).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the cluster's tasks now; trying again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Applies shared definitions as `changes` brings them; true once `stop`
/// is cancelled, false when the watch ended.
async fn apply_changes(mut changes: kv::Watch, tasks: &Tasks, stop: &CancellationToken) -> bool {
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return true,
            next = changes.next() => match next {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "following the cluster's tasks again");
                    return false;
                }
                None => return false,
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

impl ClusterPeers {
    /// The runs node `gone` had under way that this node now owns: each
    /// key swapped from `gone` to this node (one node wins each).
    async fn adopt(&self, gone: &str) -> Result<Vec<(String, i64)>, String> {
        let keys: Vec<String> = self
            .runs
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .filter_map(|key| async move { key.ok() })
            .collect()
            .await;
        let mut adopted = Vec::new();
        for key in keys {
            let Ok(Some(entry)) = self.runs.entry(&key).await else {
                continue;
            };
            if entry.operation != kv::Operation::Put || entry.value != gone.as_bytes() {
                continue;
            }
            let swapped = self
                .runs
                .update(&key, self.node.clone().into(), entry.revision)
                .await;
            if swapped.is_ok()
                && let Some((task, slot)) = key.rsplit_once('.')
                && let Ok(slot) = slot.parse::<i64>()
            {
                adopted.push((task.to_owned(), slot));
            }
        }
        Ok(adopted)
    }
}

/// Takes over the runs of nodes that drop out of the registry, checking
/// every `every` until `stop`.
pub async fn take_over(
    peers: Arc<ClusterPeers>,
    cluster: Arc<Cluster>,
    tasks: Tasks,
    every: Duration,
    stop: CancellationToken,
) {
    let names = |cluster: &Cluster| -> Vec<String> {
        cluster.view().iter().map(|n| n.node.clone()).collect()
    };
    let mut known = names(&cluster);
    // Nodes gone whose runs could not be read yet: asked again each tick.
    let mut unread: Vec<String> = Vec::new();
    let mut beat = crate::cluster::Beat::new(every, stop);
    while beat.next().await {
        let live = names(&cluster);
        if live.is_empty() {
            // The registry was not read yet (or not at all): nobody left.
            continue;
        }
        let departed = known
            .iter()
            .filter(|n| !live.contains(n))
            .cloned()
            .chain(std::mem::take(&mut unread));
        for gone in departed.collect::<Vec<_>>() {
            let gone = &gone;
            match peers.adopt(gone).await {
                Ok(adopted) => {
                    for (task, slot) in adopted {
                        tracing::warn!(task, slot, node = %gone, "took over a run from a node that left the cluster");
                        if let Err(e) = tasks.take_over(&task, slot, gone).await {
                            tracing::warn!(task, error = %e, "a run taken over did not start");
                            peers.finished(&task, slot);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %gone, error = %e, "the runs of a node that left were not read; trying again");
                    if !live.contains(gone) {
                        unread.push(gone.clone());
                    }
                }
            }
        }
        known = live;
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
