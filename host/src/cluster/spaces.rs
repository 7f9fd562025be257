//! Spaces across nodes: a request entering any node reaches an instance
//! registered on any node.
//!
//! Each node lists the spaces its own instances serve in its registry
//! entry (how many instances, how busy, renewed every heartbeat). From
//! those lists every other node keeps, per (node, space), a *proxy*
//! instance in its own `Spaces`: it stands for that node's instances,
//! takes up to as many requests as they would, and is picked
//! least-loaded beside the local ones (a local instance wins a tie). So
//! the waiting line, deadlines, cancels, streamed bodies and caller
//! bookkeeping stay the one implementation in `spaces`; this module only
//! carries a proxy's queue to its node and brings the answers back.
//!
//! Per pair of nodes there are two [`Link`]s, each an outbound queue
//! drained onto one NATS subject by one task (so order holds):
//! - to call another node's instances: requests, cancels and request body
//!   pieces go to `<name>.spaces.<node>.call`;
//! - to answer another node's callers: responses, progress, errors and
//!   response body pieces go to `<name>.spaces.<node>.answer`, queued by
//!   this node's `Spaces` exactly as for a local caller.
//!
//! A forwarded request is served by the receiving node's own instances
//! only and never waits in line there (`Spaces::dispatch_local`). When a
//! node drops out of the registry (killed: within `cluster.node_ttl_ms`)
//! its proxies are removed, which fails the requests they held with
//! `instance_lost`, and the requests its callers had here are cancelled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::nodes::NodeInfo;
use crate::delivery::queue::{Budget, OutboundQueue, Overflow, QueueLimits};
use crate::delivery::table::{ConnInfo, ConnTable};
use crate::delivery::{Outbound, Pressure};
use crate::metrics::Metrics;
use crate::protocol::codec::{decode_binary, encode_binary};
use crate::protocol::{Msg, Request};
use crate::spaces::{
    BodyTarget, Caller, Directory, Instance, NodeLoad, SpaceError, SpaceInfo, Spaces,
};

/// Which node sent a message.
const FROM: &str = "Wr-From";

/// How much one link holds for its node: requests past it are refused
/// (`overloaded`), as for a local instance that is not keeping up.
const LINK_LIMITS: QueueLimits = QueueLimits {
    messages: 16_384,
    bytes: 64 << 20,
    slow_after: Duration::ZERO,
};

/// How long a forwarded request body piece waits for room at the instance.
const BODY_WAIT: Duration = Duration::from_secs(30);
/// Forwarded body pieces waiting for their instances (past it, the intake
/// of calls from other nodes waits).
const BODY_PIECES: usize = 1024;

/// One direction of traffic to one other node: a queue this node's
/// `Spaces` writes to as it would to a connection, and the task that
/// carries it to NATS.
struct Link {
    conn: Arc<ConnInfo>,
    queue: Arc<OutboundQueue>,
    carrier: tokio::task::JoinHandle<()>,
}

impl Link {
    fn is_broken(&self) -> bool {
        self.carrier.is_finished()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.queue.close("the node left the cluster");
        self.carrier.abort();
    }
}

/// Another node whose instances this node calls.
struct Remote {
    link: Link,
    /// Its spaces, by name: the proxy standing for its instances there.
    proxies: HashMap<String, Arc<Instance>>,
}

pub struct ClusterSpaces {
    spaces: Arc<Spaces>,
    table: Arc<ConnTable>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    client: async_nats::Client,
    node: String,
    prefix: String,
    remotes: Mutex<HashMap<String, Remote>>,
    /// Other nodes whose callers this node's instances answer.
    origins: Mutex<HashMap<String, Arc<Link>>>,
}

impl ClusterSpaces {
    /// Starts taking other nodes' traffic for this node (until `stop`).
    pub fn start(
        cluster: &super::Cluster,
        spaces: Arc<Spaces>,
        table: Arc<ConnTable>,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            spaces,
            table,
            budget,
            metrics,
            client: cluster.client.clone(),
            node: cluster.node().to_owned(),
            prefix: cluster.name().to_owned(),
            remotes: Mutex::new(HashMap::new()),
            origins: Mutex::new(HashMap::new()),
        });
        tokio::spawn(receive(this.clone(), stop.clone()));
        tokio::spawn(fail_when_cut_off(this.clone(), cluster.link(), stop));
        this
    }

    /// The connection to NATS is lost: what was sent to other nodes or
    /// came from them may be lost with it, so every request in flight
    /// between nodes fails now (`instance_lost`) rather than at its
    /// deadline. The registry brings the proxies back once NATS is.
    fn cut_off(&self) {
        let remotes = std::mem::take(&mut *self.remotes.lock().unwrap_or_else(|e| e.into_inner()));
        for remote in remotes.values() {
            for proxy in remote.proxies.values() {
                self.spaces.unregister(proxy);
            }
        }
        let origins = std::mem::take(&mut *self.origins.lock().unwrap_or_else(|e| e.into_inner()));
        for link in origins.values() {
            self.spaces.remove_node_caller(&link.conn);
        }
        if !remotes.is_empty() || !origins.is_empty() {
            tracing::warn!(
                "cut off from NATS: requests between nodes failed; other nodes' instances return with the registry"
            );
        }
    }

    fn subject(&self, node: &str, direction: &str) -> String {
        format!("{}.spaces.{node}.{direction}", self.prefix)
    }

    fn link(&self, node: &str, direction: &str) -> Link {
        let conn = self.table.detached();
        let queue = OutboundQueue::new(LINK_LIMITS, &self.budget);
        let carrier = tokio::spawn(carry(
            queue.clone(),
            self.client.clone(),
            self.subject(node, direction),
            self.node.clone(),
        ));
        Link {
            conn,
            queue,
            carrier,
        }
    }

    /// Follows the registry: a proxy per (other node, space) its instances
    /// serve, with their load; proxies of spaces or nodes gone are removed
    /// (their requests fail with `instance_lost`), and requests from nodes
    /// gone are cancelled.
    pub fn sync(&self, nodes: &[NodeInfo]) {
        let mut remotes = self.remotes.lock().unwrap_or_else(|e| e.into_inner());
        let live = |name: &str| nodes.iter().any(|n| n.node == name);
        remotes.retain(|name, remote| {
            let keep = live(name) && !remote.link.is_broken();
            if !keep {
                tracing::warn!(node = %name, "another node's instances are gone; their requests fail");
                for proxy in remote.proxies.values() {
                    self.spaces.unregister(proxy);
                }
            }
            keep
        });
        for info in nodes.iter().filter(|n| n.node != self.node) {
            let remote = remotes.entry(info.node.clone()).or_insert_with(|| Remote {
                link: self.link(&info.node, "call"),
                proxies: HashMap::new(),
            });
            remote.proxies.retain(|space, proxy| {
                let still = info
                    .spaces
                    .iter()
                    .any(|s| &s.name == space && s.instances > 0);
                if !still {
                    self.spaces.unregister(proxy);
                }
                still
            });
            for served in info.spaces.iter().filter(|s| s.instances > 0) {
                let proxy = remote
                    .proxies
                    .entry(served.name.clone())
                    .or_insert_with(|| {
                        self.spaces.register_remote(
                            &served.name,
                            &info.node,
                            &served.principal,
                            &remote.link.conn,
                            remote.link.queue.clone(),
                        )
                    });
                // What that node's instances do for others: what it said,
                // less what this node had there (it counted ours too).
                let ours = proxy.in_flight().min(served.in_flight);
                proxy.set_remote_load(served.instances, served.in_flight - ours);
            }
        }
        drop(remotes);
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        origins.retain(|name, link| {
            let keep = live(name) && !link.is_broken();
            if !keep {
                self.spaces.remove_node_caller(&link.conn);
                // Kept a moment, so the failures just queued reach the
                // node if it only seemed gone.
                let link = link.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(link);
                });
            }
            keep
        });
    }

    /// The link carrying answers to `node`'s callers (made on its first call).
    fn origin(&self, node: &str) -> Arc<Link> {
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = origins.get(node)
            && !link.is_broken()
        {
            return link.clone();
        }
        let link = Arc::new(self.link(node, "answer"));
        self.spaces.add_node_caller(&link.conn);
        if let Some(old) = origins.insert(node.to_owned(), link.clone()) {
            self.spaces.remove_node_caller(&old.conn);
        }
        link
    }

    /// The connection standing for `node`'s instances here, if known.
    fn remote_conn(&self, node: &str) -> Option<Arc<ConnInfo>> {
        let remotes = self.remotes.lock().unwrap_or_else(|e| e.into_inner());
        remotes.get(node).map(|r| r.link.conn.clone())
    }

    /// A request, cancel or body piece from `from`'s caller, for an
    /// instance here. Body pieces go on through `bodies`, so an instance
    /// slow to take one holds up only the bodies behind it.
    async fn called(
        &self,
        from: &str,
        msg: Msg,
        bodies: &mpsc::Sender<(Arc<OutboundQueue>, Outbound)>,
    ) {
        let link = self.origin(from);
        match msg {
            Msg::Request(request) => self.serve(&link, request),
            Msg::Cancel { id, .. } => self.spaces.cancel_for_caller(&link.conn, &id),
            Msg::Body { id, last, data } => {
                let Some(key) = self.spaces.relay_id_of(&link.conn, &id) else {
                    return;
                };
                let piece = Outbound::new(Msg::Body {
                    id: self.spaces.instance_side_id(key),
                    last,
                    data,
                });
                // Served here only, so never waiting for a slot.
                if let BodyTarget::Instance(queue) = self.spaces.body_target(key) {
                    let _ = bodies.send((queue, piece)).await;
                }
            }
            other => tracing::debug!(node = from, kind = other.kind(), "unexpected cluster call"),
        }
    }

    fn serve(&self, link: &Link, request: Request) {
        let id = request.id.clone();
        let caller = Caller::Conn {
            conn: link.conn.clone(),
            queue: link.queue.clone(),
            id: id.clone(),
        };
        if let Err(e) = self.spaces.dispatch_local(request, caller) {
            let refusal = Msg::error(e.code, e.message, Some(id));
            crate::delivery::deliver(
                &link.conn,
                &link.queue,
                Outbound::new(refusal),
                Overflow::Refuse,
                &self.metrics,
            );
        }
    }

    /// An answer from `from`'s instances to a request of a caller here.
    fn answered(&self, from: &str, msg: Msg, pressure: &mut Pressure) {
        let Some(conn) = self.remote_conn(from) else {
            return;
        };
        let result = match msg {
            Msg::Response(response) => self.spaces.respond(&conn, response),
            Msg::Progress { id, percent, data } => self.spaces.progress(&conn, &id, percent, data),
            Msg::Error {
                code,
                message,
                id: Some(id),
                ..
            } => self
                .spaces
                .fail_from(&conn, &id, SpaceError::new(code, message)),
            Msg::Body { id, last, data } => {
                self.spaces.stream_body(&conn, &id, data, last, pressure)
            }
            other => {
                tracing::debug!(
                    node = from,
                    kind = other.kind(),
                    "unexpected cluster answer"
                );
                Ok(())
            }
        };
        // Late answers (the request timed out or its caller left) are normal.
        if let Err(e) = result {
            tracing::debug!(node = from, error = %e, "a cluster answer found no request");
        }
    }
}

/// Calls [`ClusterSpaces::cut_off`] each time the connection to NATS drops.
async fn fail_when_cut_off(
    this: Arc<ClusterSpaces>,
    mut link: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
                if !*link.borrow_and_update() {
                    this.cut_off();
                }
            }
        }
    }
}

/// Drains one link's queue onto its subject, in order.
async fn carry(
    queue: Arc<OutboundQueue>,
    client: async_nats::Client,
    subject: String,
    node: String,
) {
    let subject = async_nats::Subject::from(subject);
    while let Ok(batch) = queue.next_batch(64).await {
        for out in batch {
            let mut headers = HeaderMap::new();
            headers.insert(FROM, node.as_str());
            let payload = encode_binary(out.msg());
            if let Err(e) = client
                .publish_with_headers(subject.clone(), headers, payload)
                .await
            {
                tracing::warn!(error = %e, %subject, "a message for another node was not sent");
            }
        }
    }
}

/// Puts forwarded request body pieces on their instances' queues, in the
/// order they came, each waiting (up to [`BODY_WAIT`]) for room.
async fn pass_bodies(mut arriving: mpsc::Receiver<(Arc<OutboundQueue>, Outbound)>) {
    while let Some((queue, piece)) = arriving.recv().await {
        if tokio::time::timeout(BODY_WAIT, queue.push_when_room(piece))
            .await
            .is_err()
        {
            tracing::debug!("a forwarded request body piece found no room at its instance");
        }
    }
}

/// Takes other nodes' calls to this node's instances, and the answers to
/// this node's callers.
async fn receive(this: Arc<ClusterSpaces>, stop: CancellationToken) {
    let subscribed = tokio::try_join!(
        this.client.subscribe(this.subject(&this.node, "call")),
        this.client.subscribe(this.subject(&this.node, "answer")),
    );
    let (mut calls, mut answers) = match subscribed {
        Ok(subscriptions) => subscriptions,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the cluster's space subjects; requests stay on this node");
            return;
        }
    };
    let mut pressure = Pressure::default();
    let (bodies, arriving) = mpsc::channel(BODY_PIECES);
    tokio::spawn(pass_bodies(arriving));
    let decode = |message: &async_nats::Message| {
        let from = message.headers.as_ref()?.get(FROM)?.as_str().to_owned();
        match decode_binary(&message.payload) {
            Ok(msg) => Some((from, msg)),
            Err(e) => {
                tracing::warn!(error = %e, node = %from, "an undecodable message from another node");
                None
            }
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(message) = calls.next() => {
                if let Some((from, msg)) = decode(&message) {
                    this.called(&from, msg, &bodies).await;
                }
            }
            Some(message) = answers.next() => {
                if let Some((from, msg)) = decode(&message) {
                    this.answered(&from, msg, &mut pressure);
                    // A caller here behind on a streamed body slows the
                    // intake of answers (NATS buffers meanwhile).
                    if !pressure.is_empty() {
                        pressure.relieved().await;
                    }
                }
            }
            else => return,
        }
    }
}

/// `GET /spaces` in a cluster: this node's spaces merged with what every
/// other node's registry entry lists, with each node's share.
pub struct ClusterDirectory {
    pub(crate) spaces: Arc<Spaces>,
    pub(crate) cluster: Arc<super::Cluster>,
}

impl Directory for ClusterDirectory {
    fn list(&self) -> Vec<SpaceInfo> {
        let mut merged: std::collections::BTreeMap<String, SpaceInfo> = self
            .spaces
            .list()
            .into_iter()
            .map(|mut info| {
                if info.instances > 0 {
                    info.nodes.push(NodeLoad {
                        node: self.cluster.node().to_owned(),
                        instances: info.instances,
                        in_flight: info.in_flight,
                    });
                }
                (info.name.clone(), info)
            })
            .collect();
        let view = self.cluster.view();
        for node in view.iter().filter(|n| n.node != self.cluster.node()) {
            for served in node.spaces.iter().filter(|s| s.instances > 0) {
                let info = merged
                    .entry(served.name.clone())
                    .or_insert_with(|| SpaceInfo {
                        name: served.name.clone(),
                        connected: false,
                        instances: 0,
                        in_flight: 0,
                        waiting: 0,
                        declared: false,
                        nodes: Vec::new(),
                    });
                info.connected = true;
                info.instances += served.instances;
                info.in_flight += served.in_flight;
                info.nodes.push(NodeLoad {
                    node: node.node.clone(),
                    instances: served.instances,
                    in_flight: served.in_flight,
                });
            }
        }
        merged.into_values().collect()
    }

    fn info(&self, name: &str) -> Option<SpaceInfo> {
        self.list().into_iter().find(|info| info.name == name)
    }
}
