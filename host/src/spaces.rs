//! Spaces: named groups of service instances (apps behind NAT that connected
//! out and registered), and the request/reply traffic routed to them.
//!
//! A request is given a relay-wide id, sent to the instance with the fewest
//! requests in flight, and remembered as pending until the instance answers,
//! the instance disconnects (the caller hears `instance_lost` at once), or the
//! deadline passes (`timeout`, and the instance is told to `cancel`). Progress
//! and the response go only to the one caller that asked; a response the
//! instance streams goes on piece by piece ([`streams`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Serialize;
use tokio::sync::oneshot;
// tokio's clock, so deadlines and waits can be tested on paused time.
use tokio::time::Instant;

use crate::config::{LimitsConfig, SpacesConfig};
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::ConnInfo;
use crate::delivery::{Outbound, deliver};
use crate::ids::NodeId;
use crate::metrics::Metrics;
use crate::protocol::{Data, ErrorCode, Msg, Request, Response};

pub use crate::protocol::names::validate_space_name;
pub use streams::HttpBody;

mod streams;

/// What an HTTP caller gets: the response, and its body still to come when
/// the instance streams it.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub body: Option<HttpBody>,
}

/// A refusal, with the code the caller gets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
#[error("{code}: {message}")]
pub struct SpaceError {
    pub code: ErrorCode,
    pub message: String,
}

impl SpaceError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One registered service instance.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub space: String,
    /// The user it registered as (empty for anonymous clients); a space not
    /// configured as shared has instances of one user at a time.
    principal: String,
    conn: Arc<ConnInfo>,
    queue: Arc<OutboundQueue>,
    in_flight: AtomicUsize,
    /// Set when this stands for another node's instances of the space
    /// (a cluster proxy): requests given it travel to that node.
    node: Option<String>,
    /// How many instances it stands for (1 for a local one): it takes up
    /// to that many times `max_in_flight_per_instance`.
    slots: AtomicUsize,
    /// Requests the instances it stands for are already working on for
    /// other nodes (as their node last said).
    background: AtomicUsize,
}

impl Instance {
    /// The other node this proxy stands for; `None` for a local instance.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// How busy it is, per instance it stands for (in thousandths), for
    /// picking the least loaded; a local instance wins a tie.
    fn load(&self) -> (usize, bool) {
        let busy = self.in_flight.load(Ordering::Relaxed) + self.background.load(Ordering::Relaxed);
        (
            busy * 1000 / self.slots.load(Ordering::Relaxed).max(1),
            self.node.is_some(),
        )
    }

    fn limit(&self, max_in_flight: usize) -> usize {
        max_in_flight * self.slots.load(Ordering::Relaxed).max(1)
    }

    /// Requests it is working on for callers of this node.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// For a proxy: how many instances it stands for and how busy they are.
    pub fn set_remote_load(&self, instances: usize, in_flight: usize) {
        self.slots.store(instances.max(1), Ordering::Relaxed);
        self.background.store(in_flight, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Space {
    declared: bool,
    instances: RwLock<Vec<Arc<Instance>>>,
    // Breaks ties between equally loaded instances so they share the work.
    rotation: AtomicUsize,
    /// Requests waiting for an instance with a free slot, oldest first. Ids
    /// whose request already ended (caller gone, wait over) are skipped.
    waiting: Mutex<VecDeque<u64>>,
}

impl Space {
    fn new(declared: bool) -> Self {
        Self {
            declared,
            instances: RwLock::new(Vec::new()),
            rotation: AtomicUsize::new(0),
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    fn instance_count(&self) -> usize {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Takes a slot on the least loaded instance, if one is under
    /// `max_in_flight`. The slot is claimed with a compare-and-swap, so
    /// dispatchers racing for the last slot never push an instance past the
    /// limit; the loser looks again, and waits in line when all are full.
    /// `local_only`: another node's proxies are not candidates (a request
    /// that came from another node is served here or not at all).
    fn claim_slot(&self, max_in_flight: usize, local_only: bool) -> Option<Arc<Instance>> {
        // Bounded: under heavy contention the request waits in line instead,
        // and the next freed slot dispatches it.
        for _ in 0..8 {
            let instance = self.least_loaded(local_only)?;
            let limit = instance.limit(max_in_flight);
            let claimed = instance
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok();
            if claimed {
                return Some(instance);
            }
            if instance.in_flight.load(Ordering::Acquire) >= limit
                && self.all_full(max_in_flight, local_only)
            {
                return None;
            }
        }
        None
    }

    fn all_full(&self, max_in_flight: usize, local_only: bool) -> bool {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|i| !local_only || i.node.is_none())
            .all(|i| i.in_flight.load(Ordering::Acquire) >= i.limit(max_in_flight))
    }

    fn least_loaded(&self, local_only: bool) -> Option<Arc<Instance>> {
        let instances = self.instances.read().unwrap_or_else(|e| e.into_inner());
        let n = instances.len();
        if n == 0 {
            return None;
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| &instances[(start + i) % n])
            .filter(|inst| !local_only || inst.node.is_none())
            .min_by_key(|inst| inst.load())
            .cloned()
    }

    fn local_count(&self) -> usize {
        self.instances
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|i| i.node.is_none())
            .count()
    }
}

/// Where the next piece of a streamed request body goes.
#[derive(Debug)]
pub enum BodyTarget {
    /// The instance working on the request: its queue.
    Instance(Arc<OutboundQueue>),
    /// The request still waits for a free instance.
    Waiting,
    /// The request has ended (answered, failed, expired, abandoned).
    Ended,
}

/// Who is waiting for a request's outcome.
#[derive(Debug)]
pub enum Caller {
    /// A protocol connection, which gets `progress`, `response` or `error`
    /// messages carrying its own request id.
    Conn {
        conn: Arc<ConnInfo>,
        queue: Arc<OutboundQueue>,
        id: String,
    },
    /// An HTTP ingress request, which gets only the outcome.
    Http(oneshot::Sender<Result<Reply, SpaceError>>),
}

#[derive(Debug)]
struct Pending {
    caller: Caller,
    /// The instance working on it; `None` while it waits for a free slot.
    instance: Option<Arc<Instance>>,
    /// The request as the instance will get it, kept while it waits.
    waiting: Option<Waiting>,
    started: Instant,
    deadline: Instant,
}

#[derive(Debug)]
struct Waiting {
    forwarded: Msg,
    /// When it stops waiting and fails with `overloaded`.
    until: Instant,
}

/// A space as `GET /spaces` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpaceInfo {
    pub name: String,
    pub connected: bool,
    pub instances: usize,
    pub in_flight: usize,
    /// Requests waiting for an instance with a free slot.
    pub waiting: usize,
    pub declared: bool,
    /// In a cluster: the nodes whose instances serve it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeLoad>,
}

/// One node's share of a space, in a cluster.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeLoad {
    pub node: String,
    pub instances: usize,
    pub in_flight: usize,
}

/// A space as this node serves it, for the cluster's registry: counts of
/// this node's own instances only.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LocalSpace {
    pub name: String,
    pub instances: usize,
    pub in_flight: usize,
    /// The user its instances registered as (a space not shared has one).
    #[serde(default)]
    pub principal: String,
    /// Its instances' ids (the first [`LISTED_IDS`]).
    #[serde(default)]
    pub ids: Vec<String>,
}

/// Instance ids a node lists per space in the registry.
pub const LISTED_IDS: usize = 32;

/// Which spaces exist and how they are served, as `GET /spaces` shows them:
/// on one node, [`Spaces`] itself; a cluster backend merges every node's view
/// (and is where a request finds an instance held by another node).
pub trait Directory: Send + Sync {
    /// Every space, by name.
    fn list(&self) -> Vec<SpaceInfo>;
    fn info(&self, name: &str) -> Option<SpaceInfo>;
}

impl Directory for Spaces {
    fn list(&self) -> Vec<SpaceInfo> {
        Spaces::list(self)
    }

    fn info(&self, name: &str) -> Option<SpaceInfo> {
        Spaces::info(self, name)
    }
}

pub struct Spaces {
    spaces: DashMap<String, Arc<Space>>,
    pending: DashMap<u64, Pending>,
    /// Requests whose response is being streamed, by relay id.
    streams: DashMap<u64, streams::Streaming>,
    // (caller connection, caller's request id) -> relay id, to refuse duplicates.
    by_caller: DashMap<(u64, String), u64>,
    next_request: AtomicU64,
    next_instance: AtomicU64,
    /// Callers that stand for another node's connections (cluster
    /// proxies): their node already held each connection to its limit.
    node_callers: DashMap<u64, ()>,
    allow_undeclared: bool,
    shared: Vec<String>,
    max_spaces: usize,
    max_pending: usize,
    max_per_caller: usize,
    max_in_flight: usize,
    max_waiting: usize,
    max_wait: Duration,
    default_timeout: Duration,
    /// Request and instance ids carry it.
    node: NodeId,
    metrics: Arc<Metrics>,
}

impl Spaces {
    pub fn new(
        spaces: &SpacesConfig,
        limits: &LimitsConfig,
        node: NodeId,
        metrics: Arc<Metrics>,
    ) -> Self {
        let map = DashMap::new();
        for name in &spaces.declared {
            map.insert(name.clone(), Arc::new(Space::new(true)));
        }
        Self {
            spaces: map,
            pending: DashMap::new(),
            streams: DashMap::new(),
            by_caller: DashMap::new(),
            next_request: AtomicU64::new(0),
            next_instance: AtomicU64::new(0),
            node_callers: DashMap::new(),
            allow_undeclared: spaces.allow_undeclared,
            shared: spaces.shared.clone(),
            max_spaces: spaces.max_spaces,
            max_pending: limits.max_pending_requests,
            max_per_caller: limits.max_requests_per_connection,
            max_in_flight: limits.max_in_flight_per_instance,
            max_waiting: limits.max_waiting_per_space,
            max_wait: Duration::from_millis(limits.max_wait_ms),
            default_timeout: Duration::from_millis(limits.request_timeout_ms),
            node,
            metrics,
        }
    }

    /// Adds an instance of `principal` (a user, or empty for an anonymous
    /// client) to `space`, creating the space if allowed. A space held by
    /// another principal's instances refuses it unless configured as shared.
    pub fn register(
        &self,
        space: &str,
        principal: &str,
        conn: &Arc<ConnInfo>,
        queue: Arc<OutboundQueue>,
    ) -> Result<Arc<Instance>, SpaceError> {
        validate_space_name(space).map_err(|reason| {
            SpaceError::new(ErrorCode::InvalidName, format!("space name {reason}"))
        })?;
        if !self.spaces.contains_key(space) {
            if !self.allow_undeclared {
                return Err(SpaceError::new(
                    ErrorCode::UnknownSpace,
                    format!("space {space:?} is not declared in the relay's configuration"),
                ));
            }
            if self.spaces.len() >= self.max_spaces && !self.evict_one_empty() {
                return Err(SpaceError::new(
                    ErrorCode::Overloaded,
                    format!("the relay already holds {} spaces", self.max_spaces),
                ));
            }
        }
        let n = self.next_instance.fetch_add(1, Ordering::Relaxed) + 1;
        let instance = Arc::new(Instance {
            id: format!("{space}#{}", self.node.scoped(n)),
            space: space.to_owned(),
            principal: principal.to_owned(),
            conn: conn.clone(),
            queue,
            in_flight: AtomicUsize::new(0),
            node: None,
            slots: AtomicUsize::new(1),
            background: AtomicUsize::new(0),
        });
        let shared = crate::config::matches_any(&self.shared, space);
        // Joined under the map entry, so an eviction cannot remove the space
        // between our lookup and the join, and two principals racing for an
        // empty space cannot both get in.
        let entry = self
            .spaces
            .entry(space.to_owned())
            .or_insert_with(|| Arc::new(Space::new(false)));
        {
            let mut instances = entry.instances.write().unwrap_or_else(|e| e.into_inner());
            if !shared && instances.iter().any(|i| i.principal != principal) {
                return Err(SpaceError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "space {space:?} is served by another user's instances; it is not configured as shared (spaces.shared)"
                    ),
                ));
            }
            instances.push(instance.clone());
        }
        drop(entry);
        tracing::info!(space, instance = %instance.id, conn = conn.id, "instance registered");
        Ok(instance)
    }

    /// Adds a proxy for node `node`'s instances of `space` (a cluster
    /// member's, as the registry lists them): requests given it are queued
    /// on `queue`, which the cluster carries to that node, and the answers
    /// come back as if `conn` sent them. Never refused: the other node
    /// already admitted its instances.
    pub fn register_remote(
        &self,
        space: &str,
        node: &str,
        principal: &str,
        conn: &Arc<ConnInfo>,
        queue: Arc<OutboundQueue>,
    ) -> Arc<Instance> {
        let instance = Arc::new(Instance {
            id: format!("{space}@{node}"),
            space: space.to_owned(),
            principal: principal.to_owned(),
            conn: conn.clone(),
            queue,
            in_flight: AtomicUsize::new(0),
            node: Some(node.to_owned()),
            slots: AtomicUsize::new(1),
            background: AtomicUsize::new(0),
        });
        let entry = self
            .spaces
            .entry(space.to_owned())
            .or_insert_with(|| Arc::new(Space::new(false)));
        entry
            .instances
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(instance.clone());
        let space = entry.clone();
        drop(entry);
        // Requests waiting here for a free slot may take the new one.
        self.start_waiting(&space);
        tracing::debug!(space = %instance.space, node, "another node's instances reachable");
        instance
    }

    /// Marks `conn` as standing for another node's callers: not held to
    /// `limits.max_requests_per_connection` (their node held each of its
    /// own connections to it).
    pub fn add_node_caller(&self, conn: &ConnInfo) {
        self.node_callers.insert(conn.id, ());
    }

    /// Forgets a node's callers: their requests end (the instances are
    /// told to cancel) and fail with `instance_lost` on their queue, so a
    /// node that only seemed gone is not left waiting for them.
    pub fn remove_node_caller(&self, conn: &ConnInfo) {
        let error = SpaceError::new(
            ErrorCode::InstanceLost,
            "the request's node left the cluster as the instance's node saw it",
        );
        let ids: Vec<u64> = self
            .by_caller
            .iter()
            .filter(|e| e.key().0 == conn.id)
            .map(|e| *e.value())
            .collect();
        for id in ids {
            if let Some((_, pending)) = self.pending.remove(&id) {
                if let Some(instance) = &pending.instance {
                    self.send_cancel(instance, id, "the caller's node left");
                }
                self.finish(pending, Err(error.clone()));
            }
        }
        self.caller_streams_failed(conn.id, &error);
        self.by_caller.retain(|key, _| key.0 != conn.id);
        self.node_callers.remove(&conn.id);
    }

    /// The caller `conn` withdrew its request `caller_id` (a `cancel` that
    /// came from another node): it ends here, and the instance is told.
    pub fn cancel_for_caller(&self, conn: &ConnInfo, caller_id: &str) {
        let Some(id) = self.relay_id_of(conn, caller_id) else {
            return;
        };
        self.abandon(id);
        self.caller_stream_gone(id);
        self.unclaim(conn, caller_id);
    }

    /// The relay's id for caller `conn`'s request `caller_id`, while pending.
    pub fn relay_id_of(&self, conn: &ConnInfo, caller_id: &str) -> Option<u64> {
        self.by_caller
            .get(&(conn.id, caller_id.to_owned()))
            .map(|id| *id)
    }

    /// The instance (here, a proxy of another node's) failed the request
    /// it was given: the caller gets the error, as if from this node.
    pub fn fail_from(
        &self,
        from: &ConnInfo,
        id: &str,
        error: SpaceError,
    ) -> Result<(), SpaceError> {
        if let Ok(key) = self.own_pending(from, id)
            && let Some((_, pending)) = self.pending.remove(&key)
        {
            self.finish(pending, Err(error));
            return Ok(());
        }
        self.fail_stream_from(from, id, error)
    }

    /// Removes an instance; its pending requests fail with `instance_lost` now.
    pub fn unregister(&self, instance: &Arc<Instance>) {
        if let Some(space) = self.spaces.get(&instance.space) {
            space
                .instances
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|i| !Arc::ptr_eq(i, instance));
        }
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|p| {
                p.instance
                    .as_ref()
                    .is_some_and(|i| Arc::ptr_eq(i, instance))
            })
            .map(|p| *p.key())
            .collect();
        for id in lost {
            if let Some((_, pending)) = self.pending.remove(&id) {
                self.finish(
                    pending,
                    Err(SpaceError::new(
                        ErrorCode::InstanceLost,
                        format!(
                            "the instance serving space {:?} disconnected",
                            instance.space
                        ),
                    )),
                );
            }
        }
        self.instance_streams_lost(instance);
        tracing::info!(space = %instance.space, instance = %instance.id, "instance unregistered");
    }

    /// Sends a request to the least loaded instance of `req.space`; the outcome
    /// reaches `caller` later. Returns the relay's id for the request.
    pub fn dispatch(&self, req: Request, caller: Caller) -> Result<u64, SpaceError> {
        self.dispatch_to(req, caller, false)
    }

    /// Dispatches a request another node forwarded here: only this node's
    /// own instances serve it (it is never passed on again), and it does
    /// not wait in line here; its node keeps its place in line there.
    pub fn dispatch_local(&self, req: Request, caller: Caller) -> Result<u64, SpaceError> {
        self.dispatch_to(req, caller, true)
    }

    fn dispatch_to(
        &self,
        req: Request,
        caller: Caller,
        local_only: bool,
    ) -> Result<u64, SpaceError> {
        if self.pending.len() >= self.max_pending {
            return Err(SpaceError::new(
                ErrorCode::Overloaded,
                format!("{} requests already in flight", self.max_pending),
            ));
        }
        let space = self
            .spaces
            .get(&req.space)
            .map(|s| s.clone())
            .ok_or_else(|| {
                SpaceError::new(
                    ErrorCode::UnknownSpace,
                    format!("no space named {:?}", req.space),
                )
            })?;
        let serving = if local_only {
            space.local_count()
        } else {
            space.instance_count()
        };
        if serving == 0 {
            return Err(SpaceError::new(
                ErrorCode::NoInstance,
                format!("space {:?} has no instance connected", req.space),
            ));
        }

        let timeout = match req.timeout_ms {
            None => self.default_timeout,
            Some(0) => {
                return Err(SpaceError::new(
                    ErrorCode::BadMessage,
                    "timeout_ms must be a positive number of milliseconds",
                ));
            }
            Some(ms) => Duration::from_millis(ms).min(self.default_timeout),
        };
        let id = self.next_request.fetch_add(1, Ordering::Relaxed) + 1;
        if let Caller::Conn {
            conn,
            id: caller_id,
            ..
        } = &caller
        {
            self.claim_caller_id(conn, caller_id, id)?;
        }
        let now = Instant::now();
        let forwarded = Msg::Request(Request {
            id: self.instance_side_id(id),
            timeout_ms: Some(timeout.as_millis() as u64),
            ..req
        });
        let Some(instance) = space.claim_slot(self.max_in_flight, local_only) else {
            if local_only {
                if let Caller::Conn {
                    conn,
                    id: caller_id,
                    ..
                } = &caller
                {
                    self.unclaim(conn, caller_id);
                }
                return Err(SpaceError::new(
                    ErrorCode::Overloaded,
                    "every instance of the space on this node is busy",
                ));
            }
            return self.wait_for_slot(&space, id, forwarded, caller, now, timeout);
        };
        // Pending before sending, so that even an instantaneous response finds it.
        self.pending.insert(
            id,
            Pending {
                caller,
                instance: Some(instance.clone()),
                waiting: None,
                started: now,
                deadline: now + timeout,
            },
        );
        // A full instance queue refuses: the caller hears `overloaded` rather
        // than the instance being disconnected for another's burst.
        let queued = deliver(
            &instance.conn,
            &instance.queue,
            Outbound::new(forwarded),
            Overflow::Refuse,
            &self.metrics,
        );
        if !queued {
            self.withdraw(id);
            return Err(SpaceError::new(
                ErrorCode::Overloaded,
                format!("instance {} is not keeping up", instance.id),
            ));
        }
        Ok(id)
    }

    /// Takes back a request that was never handed over: its slot and its
    /// caller's id are free again, and nobody is told.
    fn withdraw(&self, id: u64) {
        if let Some((_, pending)) = self.pending.remove(&id) {
            self.release(&pending);
            if let Caller::Conn {
                conn,
                id: caller_id,
                ..
            } = &pending.caller
            {
                self.unclaim(conn, caller_id);
            }
        }
    }

    /// Every instance of `space` is at `max_in_flight_per_instance`: the
    /// request waits (boundedly, for at most `max_wait_ms`) for a free slot.
    fn wait_for_slot(
        &self,
        space: &Arc<Space>,
        id: u64,
        forwarded: Msg,
        caller: Caller,
        now: Instant,
        timeout: Duration,
    ) -> Result<u64, SpaceError> {
        self.pending.insert(
            id,
            Pending {
                caller,
                instance: None,
                waiting: Some(Waiting {
                    forwarded,
                    until: now + self.max_wait.min(timeout),
                }),
                started: now,
                deadline: now + timeout,
            },
        );
        let queued = {
            let mut waiting = space.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let room = waiting.len() < self.max_waiting;
            if room {
                waiting.push_back(id);
            }
            room
        };
        if !queued {
            self.withdraw(id);
            return Err(SpaceError::new(
                ErrorCode::Overloaded,
                format!(
                    "every instance is busy and {} requests are already waiting",
                    self.max_waiting
                ),
            ));
        }
        // A slot may have come free since we looked.
        self.start_waiting(space);
        Ok(id)
    }

    fn claim_caller_id(
        &self,
        conn: &Arc<ConnInfo>,
        caller_id: &str,
        id: u64,
    ) -> Result<(), SpaceError> {
        if caller_id.is_empty() {
            return Err(SpaceError::new(
                ErrorCode::BadMessage,
                "request id must not be empty",
            ));
        }
        if conn.requests_in_flight.load(Ordering::Relaxed) >= self.max_per_caller
            && !self.node_callers.contains_key(&conn.id)
        {
            return Err(SpaceError::new(
                ErrorCode::Overloaded,
                format!(
                    "{} requests already in flight on this connection",
                    self.max_per_caller
                ),
            ));
        }
        match self.by_caller.entry((conn.id, caller_id.to_owned())) {
            Entry::Occupied(_) => Err(SpaceError::new(
                ErrorCode::DuplicateId,
                format!("request {caller_id:?} is already in flight on this connection"),
            )),
            Entry::Vacant(slot) => {
                slot.insert(id);
                conn.requests_in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// The id the instance working on request `id` knows it by: it carries
    /// this node, so in a cluster a response can find its way back.
    pub fn instance_side_id(&self, id: u64) -> String {
        self.node.scoped(id)
    }

    /// Tells an instance to stop working on request `id`.
    fn send_cancel(&self, instance: &Instance, id: u64, reason: &str) {
        let msg = Msg::Cancel {
            id: self.instance_side_id(id),
            reason: reason.to_owned(),
        };
        deliver(
            &instance.conn,
            &instance.queue,
            Outbound::new(msg),
            Overflow::DropNewest,
            &self.metrics,
        );
    }

    /// Forwards an instance's progress report to the request's caller.
    pub fn progress(
        &self,
        from: &ConnInfo,
        id: &str,
        percent: Option<f32>,
        data: Data,
    ) -> Result<(), SpaceError> {
        let key = self.own_pending(from, id)?;
        let Some(pending) = self.pending.get(&key) else {
            return Err(not_pending(id));
        };
        if let Caller::Conn {
            conn,
            queue,
            id: caller_id,
        } = &pending.caller
        {
            let msg = Msg::Progress {
                id: caller_id.clone(),
                percent,
                data,
            };
            // Progress is advisory: a caller behind on reading loses it.
            deliver(
                conn,
                queue,
                Outbound::new(msg),
                Overflow::DropNewest,
                &self.metrics,
            );
        }
        Ok(())
    }

    /// Completes a request with the instance's response.
    pub fn respond(&self, from: &ConnInfo, response: Response) -> Result<(), SpaceError> {
        let key = self.own_pending(from, &response.id)?;
        let Some((_, pending)) = self.pending.remove(&key) else {
            return Err(not_pending(&response.id));
        };
        if response.stream {
            self.start_stream(key, pending, response);
        } else {
            self.finish(pending, Ok(response));
        }
        Ok(())
    }

    /// Parses an instance-side id and checks the request is pending on that instance.
    fn own_pending(&self, from: &ConnInfo, id: &str) -> Result<u64, SpaceError> {
        let key = self.node.parse_scoped(id).ok_or_else(|| not_pending(id))?;
        match self.pending.get(&key) {
            Some(p) if p.instance.as_ref().is_some_and(|i| i.conn.id == from.id) => Ok(key),
            _ => Err(not_pending(id)),
        }
    }

    /// Fails every pending request whose deadline has passed; the instance is
    /// told to cancel. Called periodically by the relay.
    pub fn expire(&self, now: Instant) -> usize {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|p| p.deadline <= now || p.waiting.as_ref().is_some_and(|w| w.until <= now))
            .map(|p| *p.key())
            .collect();
        let mut count = 0;
        for id in expired {
            if let Some((_, pending)) = self.pending.remove(&id) {
                let waited = pending.deadline.duration_since(pending.started);
                let error = match (&pending.instance, &pending.waiting) {
                    (None, Some(_)) => SpaceError::new(
                        ErrorCode::Overloaded,
                        format!(
                            "no instance had a free slot within {} ms",
                            now.duration_since(pending.started).as_millis()
                        ),
                    ),
                    _ => SpaceError::new(
                        ErrorCode::Timeout,
                        format!("no response within {} ms", waited.as_millis()),
                    ),
                };
                if let Some(instance) = &pending.instance {
                    self.send_cancel(instance, id, "deadline passed");
                }
                self.finish(pending, Err(error));
                count += 1;
            }
        }
        count + self.expire_streams(now)
    }

    /// The HTTP caller gave up (disconnected) before the outcome: forget the
    /// request and tell the instance to stop working on it.
    pub fn abandon(&self, id: u64) {
        if let Some((_, pending)) = self.pending.remove(&id) {
            if let Some(instance) = &pending.instance {
                self.send_cancel(instance, id, "caller disconnected");
            }
            self.release(&pending);
            self.metrics
                .request_finished("caller_gone", pending.started.elapsed().as_secs_f64());
        }
    }

    /// The caller connection went away: forget its requests and tell the
    /// instances to stop working on them.
    pub fn caller_gone(&self, conn_id: u64) {
        let orphaned: Vec<u64> = self
            .by_caller
            .iter()
            .filter(|e| e.key().0 == conn_id)
            .map(|e| *e.value())
            .collect();
        for id in orphaned {
            if let Some((_, pending)) = self.pending.remove(&id) {
                if let Some(instance) = &pending.instance {
                    self.send_cancel(instance, id, "caller disconnected");
                }
                self.release(&pending);
                self.metrics
                    .request_finished("caller_gone", pending.started.elapsed().as_secs_f64());
            }
        }
        self.caller_streams_gone(conn_id);
        self.by_caller.retain(|key, _| key.0 != conn_id);
    }

    fn unclaim(&self, conn: &ConnInfo, caller_id: &str) {
        if self
            .by_caller
            .remove(&(conn.id, caller_id.to_owned()))
            .is_some()
        {
            conn.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Gives the request's instance slot back, and hands it to the oldest
    /// request waiting in that space.
    fn release(&self, pending: &Pending) {
        if let Some(instance) = &pending.instance {
            self.release_instance(instance);
        }
    }

    fn release_instance(&self, instance: &Instance) {
        instance.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(space) = self.spaces.get(&instance.space).map(|s| s.clone()) {
            self.start_waiting(&space);
        }
    }

    /// Sends waiting requests to instances with free slots, oldest first.
    fn start_waiting(&self, space: &Arc<Space>) {
        let waiting_is_empty = || {
            space
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        };
        let mut claimed: Option<Arc<Instance>> = None;
        loop {
            let instance = match claimed.take() {
                Some(instance) => instance,
                None => match space.claim_slot(self.max_in_flight, false) {
                    Some(instance) => instance,
                    None => return,
                },
            };
            // The waiting lock is never held while a pending entry is.
            let next = space
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(id) = next else {
                instance.in_flight.fetch_sub(1, Ordering::AcqRel);
                // A request that lined up while we held the slot found no
                // free slot and counts on us to dispatch it.
                if waiting_is_empty() {
                    return;
                }
                continue;
            };
            let forwarded = match self.pending.get_mut(&id) {
                Some(mut pending) => match pending.waiting.take() {
                    Some(waiting) => {
                        pending.instance = Some(instance.clone());
                        Some(waiting.forwarded)
                    }
                    None => None,
                },
                // It ended while waiting (caller gone, wait over).
                None => None,
            };
            match forwarded {
                Some(forwarded) => self.send_to(&instance, id, forwarded),
                // The slot is still ours: offer it to the next in line.
                None => claimed = Some(instance),
            }
        }
    }

    /// Puts a request on its instance's queue; a full queue fails it with
    /// `overloaded` (the instance is not keeping up).
    fn send_to(&self, instance: &Arc<Instance>, id: u64, forwarded: Msg) {
        let queued = deliver(
            &instance.conn,
            &instance.queue,
            Outbound::new(forwarded),
            Overflow::Refuse,
            &self.metrics,
        );
        if !queued && let Some((_, pending)) = self.pending.remove(&id) {
            self.finish(
                pending,
                Err(SpaceError::new(
                    ErrorCode::Overloaded,
                    format!("instance {} is not keeping up", instance.id),
                )),
            );
        }
    }

    fn finish(&self, pending: Pending, outcome: Result<Response, SpaceError>) {
        self.release(&pending);
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        self.metrics
            .request_finished(label, pending.started.elapsed().as_secs_f64());
        match pending.caller {
            Caller::Conn { conn, queue, id } => {
                self.unclaim(&conn, &id);
                let msg = match outcome {
                    Ok(response) => Msg::Response(Response { id, ..response }),
                    Err(e) => Msg::error(e.code, e.message, Some(id)),
                };
                // An outcome is never dropped: a caller too far behind to
                // take it is disconnected instead (1013).
                deliver(
                    &conn,
                    &queue,
                    Outbound::new(msg),
                    Overflow::Disconnect,
                    &self.metrics,
                );
            }
            Caller::Http(reply) => {
                // The HTTP caller may have given up already; nothing to do then.
                let _ = reply.send(outcome.map(|response| Reply {
                    response,
                    body: None,
                }));
            }
        }
    }

    /// Where a streamed body for request `id` should go now.
    pub fn body_target(&self, id: u64) -> BodyTarget {
        match self.pending.get(&id) {
            None => BodyTarget::Ended,
            Some(pending) => match &pending.instance {
                Some(instance) => BodyTarget::Instance(instance.queue.clone()),
                None => BodyTarget::Waiting,
            },
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn info(&self, name: &str) -> Option<SpaceInfo> {
        self.spaces
            .get(name)
            .map(|space| self.describe(name, &space))
    }

    pub fn list(&self) -> Vec<SpaceInfo> {
        let mut list: Vec<SpaceInfo> = self
            .spaces
            .iter()
            .map(|entry| self.describe(entry.key(), entry.value()))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// This node's view of a space: its own instances (another node's are
    /// the cluster directory's to add).
    fn describe(&self, name: &str, space: &Space) -> SpaceInfo {
        let instances = space.instances.read().unwrap_or_else(|e| e.into_inner());
        let local = || instances.iter().filter(|i| i.node.is_none());
        SpaceInfo {
            name: name.to_owned(),
            connected: local().next().is_some(),
            instances: local().count(),
            in_flight: local().map(|i| i.in_flight.load(Ordering::Relaxed)).sum(),
            waiting: space
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|id| self.pending.get(id).is_some_and(|p| p.waiting.is_some()))
                .count(),
            declared: space.declared,
            nodes: Vec::new(),
        }
    }

    /// The spaces this node's own instances serve, for the registry.
    pub fn local_summary(&self) -> Vec<LocalSpace> {
        let mut list: Vec<LocalSpace> = self
            .spaces
            .iter()
            .filter_map(|entry| {
                let instances = entry.instances.read().unwrap_or_else(|e| e.into_inner());
                let local: Vec<&Arc<Instance>> =
                    instances.iter().filter(|i| i.node.is_none()).collect();
                let first = local.first()?;
                Some(LocalSpace {
                    name: entry.key().clone(),
                    instances: local.len(),
                    in_flight: local
                        .iter()
                        .map(|i| i.in_flight.load(Ordering::Relaxed))
                        .sum(),
                    principal: first.principal.clone(),
                    ids: local
                        .iter()
                        .take(LISTED_IDS)
                        .map(|i| i.id.clone())
                        .collect(),
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// In-flight counts per instance id, for tests and the admin view.
    pub fn load_by_instance(&self) -> HashMap<String, usize> {
        self.spaces
            .iter()
            .flat_map(|space| {
                space
                    .instances
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|i| i.node.is_none())
                    .map(|i| (i.id.clone(), i.in_flight.load(Ordering::Relaxed)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Makes room for a new space by forgetting an undeclared one with no instances.
    fn evict_one_empty(&self) -> bool {
        let victim = self
            .spaces
            .iter()
            .find(|s| !s.declared && s.instance_count() == 0)
            .map(|s| s.key().clone());
        match victim {
            Some(name) => self
                .spaces
                .remove_if(&name, |_, s| s.instance_count() == 0)
                .is_some(),
            None => false,
        }
    }
}

fn not_pending(id: &str) -> SpaceError {
    SpaceError::new(
        ErrorCode::UnknownRequest,
        format!("request {id:?} is not pending on this instance"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::queue::Budget;
    use crate::delivery::table::ConnTable;
    use crate::testing::Peer;

    struct World {
        table: Arc<ConnTable>,
        budget: Arc<Budget>,
        spaces: Spaces,
    }

    impl World {
        fn new(edit: impl FnOnce(&mut SpacesConfig, &mut LimitsConfig)) -> Self {
            let (mut spaces, mut limits) = (SpacesConfig::default(), LimitsConfig::default());
            edit(&mut spaces, &mut limits);
            Self {
                table: Arc::new(ConnTable::default()),
                budget: Budget::new(1 << 30),
                spaces: Spaces::new(
                    &spaces,
                    &limits,
                    NodeId::resolve("test"),
                    Arc::new(Metrics::new()),
                ),
            }
        }

        fn peer(&self) -> Peer {
            Peer::new(&self.table, &self.budget, 64)
        }

        /// `caller` sends request `id` to `space`; panics if it is refused.
        fn call(&self, caller: &Peer, space: &str, id: &str) {
            self.spaces
                .dispatch(request(space, id), caller.caller(id))
                .unwrap();
        }

        fn instance(&self, space: &str, principal: &str) -> (Peer, Arc<Instance>) {
            let peer = self.peer();
            let instance = self
                .spaces
                .register(space, principal, peer.conn(), peer.queue.clone())
                .unwrap();
            (peer, instance)
        }
    }

    fn request(space: &str, id: &str) -> Request {
        Request {
            id: id.to_owned(),
            space: space.to_owned(),
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            timeout_ms: None,
            stream: false,
            data: Data::from("hi"),
        }
    }

    fn response(id: &str) -> Response {
        Response {
            id: id.to_owned(),
            status: 200,
            headers: vec![],
            stream: false,
            data: Data::from("HI"),
        }
    }

    /// The relay-side id of the one request queued for an instance.
    fn forwarded_id(instance: &Peer) -> String {
        match instance.queued().as_slice() {
            [Msg::Request(request)] => request.id.clone(),
            other => panic!("expected one request, got {other:?}"),
        }
    }

    fn error_code(msg: &Msg) -> ErrorCode {
        match msg {
            Msg::Error { code, .. } => *code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn requests_spread_over_instances_and_responses_reach_their_caller() {
        let world = World::new(|_, _| {});
        let (a, _) = world.instance("demo", "svc");
        let (b, _) = world.instance("demo", "svc");
        let caller = world.peer();
        world.call(&caller, "demo", "one");
        world.call(&caller, "demo", "two");
        let (at_a, at_b) = (forwarded_id(&a), forwarded_id(&b));
        assert_ne!(at_a, at_b);
        // Only the instance working on a request may answer it.
        let stolen = world.spaces.respond(b.conn(), response(&at_a));
        assert_eq!(stolen.unwrap_err().code, ErrorCode::UnknownRequest);
        world.spaces.respond(a.conn(), response(&at_a)).unwrap();
        world.spaces.respond(b.conn(), response(&at_b)).unwrap();
        let mut answered: Vec<String> = caller
            .queued()
            .into_iter()
            .map(|msg| match msg {
                Msg::Response(response) => response.id,
                other => panic!("expected a response, got {other:?}"),
            })
            .collect();
        answered.sort();
        assert_eq!(answered, ["one", "two"]);
        assert_eq!(world.spaces.pending_count(), 0);
    }

    #[test]
    fn a_callers_id_in_flight_twice_is_a_duplicate() {
        let world = World::new(|_, _| {});
        let (_instance, _) = world.instance("demo", "");
        let caller = world.peer();
        world.call(&caller, "demo", "same");
        let again = world
            .spaces
            .dispatch(request("demo", "same"), caller.caller("same"));
        assert_eq!(again.unwrap_err().code, ErrorCode::DuplicateId);
    }

    #[test]
    fn a_lost_instance_fails_its_requests_at_once() {
        let world = World::new(|_, _| {});
        let (_peer, instance) = world.instance("demo", "");
        let caller = world.peer();
        let (http_tx, mut http_rx) = oneshot::channel();
        world.call(&caller, "demo", "ws");
        world
            .spaces
            .dispatch(request("demo", ""), Caller::Http(http_tx))
            .unwrap();
        world.spaces.unregister(&instance);
        let told = caller.queued();
        assert_eq!(told.len(), 1);
        assert_eq!(error_code(&told[0]), ErrorCode::InstanceLost);
        let http = http_rx.try_recv().unwrap().unwrap_err();
        assert_eq!(http.code, ErrorCode::InstanceLost);
        let next = world
            .spaces
            .dispatch(request("demo", "later"), caller.caller("later"));
        assert_eq!(next.unwrap_err().code, ErrorCode::NoInstance);
    }

    #[test]
    fn a_space_held_by_one_user_refuses_another_unless_shared() {
        let world = World::new(|spaces, _| spaces.shared = vec!["open".into()]);
        let _held = world.instance("demo", "alice");
        let other = world.peer();
        let refused = world
            .spaces
            .register("demo", "mallory", other.conn(), other.queue.clone());
        assert_eq!(refused.unwrap_err().code, ErrorCode::Forbidden);
        let _alice_again = world.instance("demo", "alice");
        let _first = world.instance("open", "alice");
        let _second = world.instance("open", "bob");
        assert_eq!(world.spaces.info("open").unwrap().instances, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_times_out_and_the_instance_is_told_to_cancel() {
        let world = World::new(|_, _| {});
        let (instance, _) = world.instance("demo", "");
        let caller = world.peer();
        let mut slow = request("demo", "slow");
        slow.timeout_ms = Some(100);
        world.spaces.dispatch(slow, caller.caller("slow")).unwrap();
        let relay_id = forwarded_id(&instance);
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(world.spaces.expire(Instant::now()), 0);
        assert!(caller.queue.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(world.spaces.expire(Instant::now()), 1);
        assert_eq!(error_code(&caller.queued()[0]), ErrorCode::Timeout);
        match instance.queued().as_slice() {
            [Msg::Cancel { id, .. }] => assert_eq!(*id, relay_id),
            other => panic!("expected a cancel, got {other:?}"),
        }
        // A late response finds nothing to answer.
        let late = world.spaces.respond(instance.conn(), response(&relay_id));
        assert_eq!(late.unwrap_err().code, ErrorCode::UnknownRequest);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_free_slot_and_fails_overloaded_when_none_frees() {
        let world = World::new(|_, limits| {
            limits.max_in_flight_per_instance = 1;
            limits.max_wait_ms = 50;
        });
        let (instance, _) = world.instance("demo", "");
        let caller = world.peer();
        for id in ["first", "second", "third"] {
            world.call(&caller, "demo", id);
        }
        assert_eq!(world.spaces.info("demo").unwrap().waiting, 2);
        // The first answer frees the slot: the second starts at once.
        let first = forwarded_id(&instance);
        world
            .spaces
            .respond(instance.conn(), response(&first))
            .unwrap();
        let second = forwarded_id(&instance);
        assert_ne!(first, second);
        // The third gets no slot within max_wait_ms.
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(world.spaces.expire(Instant::now()), 1);
        // (Errors ride the control lane, so they come out first.)
        let told = caller.queued();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(
            told.iter()
                .any(|m| matches!(m, Msg::Response(r) if r.id == "first"))
        );
        assert!(told.iter().any(|m| matches!(m,
            Msg::Error { code: ErrorCode::Overloaded, id: Some(id), .. } if id == "third")));
        assert_eq!(world.spaces.info("demo").unwrap().waiting, 0);
    }

    #[test]
    fn another_nodes_instances_share_the_load_and_forwarded_requests_stay_local() {
        let world = World::new(|_, _| {});
        let (local, _) = world.instance("demo", "svc");
        // Another node's three instances, idle: they take the first calls
        // after a tie goes to the local one.
        let remote = world.peer();
        let proxy =
            world
                .spaces
                .register_remote("demo", "b", "svc", remote.conn(), remote.queue.clone());
        proxy.set_remote_load(3, 0);
        let caller = world.peer();
        for id in ["1", "2", "3", "4"] {
            world.call(&caller, "demo", id);
        }
        // Loads per instance: local 1 (a tie at 0 went local), then the
        // proxy takes three (0, 1/3, 2/3 < 1), and the fourth ties at 1.
        assert_eq!(proxy.in_flight(), 3);
        assert_eq!(local.queued().len(), 1);
        assert_eq!(remote.queued().len(), 3);
        // Busy there for others: the local instance is preferred.
        proxy.set_remote_load(3, 30);
        world.call(&caller, "demo", "5");
        assert_eq!(local.queued().len(), 1);
        // A request another node forwarded is never passed on again.
        let other_node = world.peer();
        world.spaces.add_node_caller(other_node.conn());
        let _ = local.queued();
        for id in ["f1", "f2"] {
            world
                .spaces
                .dispatch_local(request("demo", id), other_node.caller(id))
                .unwrap();
        }
        assert_eq!(local.queued().len(), 2);
        assert!(remote.queued().is_empty());
        // The proxy's node gone: what it held fails at once.
        world.spaces.unregister(&proxy);
        let lost = caller
            .queued()
            .iter()
            .filter(|m| error_code(m) == ErrorCode::InstanceLost)
            .count();
        assert_eq!(lost, 3);
        // Not listed as this node's own.
        assert_eq!(world.spaces.info("demo").unwrap().instances, 1);
        assert_eq!(world.spaces.local_summary()[0].instances, 1);
    }

    #[test]
    fn a_caller_that_goes_away_cancels_its_requests() {
        let world = World::new(|_, _| {});
        let (instance, _) = world.instance("demo", "");
        let caller = world.peer();
        world.call(&caller, "demo", "x");
        let relay_id = forwarded_id(&instance);
        world.spaces.caller_gone(caller.conn().id);
        assert!(
            matches!(instance.queued().as_slice(), [Msg::Cancel { id, .. }] if *id == relay_id)
        );
        assert_eq!(world.spaces.pending_count(), 0);
    }
}
