//! The operators' view: `/admin/connections` (the `ss`-like table),
//! `/admin/stats` (counts and totals), `/metrics` (Prometheus text), plugin
//! management, and the bearer-token check that guards all of them
//! ([`crate::admin::credential`] decides the token).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use http::{HeaderMap, Method, StatusCode, header};
use serde::Serialize;

use crate::admin::AdminCredential;
use crate::delivery::table::ConnSnapshot;
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::plugins as saved;
use crate::transport::reply::{Body, json, json_error, text};

/// Checks `Authorization: Bearer <token>` against the relay's admin credential.
#[allow(clippy::result_large_err)]
pub fn authorize(relay: &Relay, headers: &HeaderMap) -> Result<(), hyper::Response<Body>> {
    let AdminCredential::Token(expected) = &relay.admin else {
        return Ok(());
    };
    // A browser cannot set Authorization on a WebSocket: it offers the
    // token as a subprotocol `bearer.<token>` beside `wasmrelay-admin`.
    let offered = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix("bearer."))
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(offered)
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        let mut denied = json_error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "operator endpoints need Authorization: Bearer <token> (admin.token, or the file admin.token in the data directory)",
        );
        denied.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        Err(denied)
    }
}

/// Compares without stopping at the first difference, so response timing does
/// not reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves an already-authorized admin request; `segments` is the split path.
pub async fn route(relay: &Relay, method: &Method, segments: &[&str]) -> hyper::Response<Body> {
    match (method, segments) {
        (&Method::GET, ["admin", "connections"]) => json(StatusCode::OK, &connections(relay)),
        (&Method::GET, ["admin", "stats"]) => json(StatusCode::OK, &stats(relay).await),
        (&Method::GET, ["admin", "cluster"]) => match cluster(relay).await {
            Ok(view) => json(StatusCode::OK, &view),
            Err(e) => json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Overloaded,
                &format!("the cluster registry did not answer: {e}"),
            ),
        },
        // The router splits off three segments: a user's name may hold '/'.
        (&Method::GET, ["admin", "cluster", rest]) if rest.starts_with("users/") => {
            match user_presence(relay, &rest["users/".len()..]).await {
                Ok(view) => json(StatusCode::OK, &view),
                Err(e) => json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Overloaded,
                    &format!("the cluster's presence did not answer: {e}"),
                ),
            }
        }
        (&Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            relay.metrics.render(
                relay
                    .table
                    .counts()
                    .into_iter()
                    .map(|(transport, state, count)| (transport.as_str(), state.as_str(), count)),
            ),
        ),
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no admin endpoint {method} /{}", segments.join("/")),
        ),
    }
}

/// `GET /admin/cluster`: the nodes in the system now (this one alone when
/// it is not in a cluster).
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub enabled: bool,
    /// The cluster's name (`cluster.name`), when in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// This node.
    pub node: String,
    /// Whether the connection to NATS is up now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// Every listed node's connections together.
    pub connections_total: u64,
    pub nodes: Vec<crate::cluster::nodes::NodeInfo>,
    /// The nodes this one picks channel owners from (its last read of the
    /// registry).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub owners_from: Vec<String>,
}

/// `GET /admin/cluster/users/{user}`: where a user is connected.
#[derive(Debug, Serialize)]
pub struct UserPresence {
    pub user: String,
    /// Connections on every node together.
    pub connections: u64,
    pub nodes: Vec<crate::cluster::presence::UserOnNode>,
}

pub async fn user_presence(relay: &Relay, user: &str) -> Result<UserPresence, String> {
    let nodes = match (relay.cluster.as_ref(), relay.presence.get()) {
        (Some(cluster), Some(presence)) => {
            let live: Vec<String> = cluster
                .nodes
                .list()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|n| n.node)
                .collect();
            presence.lookup(user, &live).await?
        }
        _ => relay
            .users_here()
            .get(user)
            .map(|connections| {
                vec![crate::cluster::presence::UserOnNode {
                    node: relay.node.as_str().to_owned(),
                    connections: *connections,
                }]
            })
            .unwrap_or_default(),
    };
    Ok(UserPresence {
        user: user.to_owned(),
        connections: nodes.iter().map(|n| n.connections).sum(),
        nodes,
    })
}

pub async fn cluster(relay: &Relay) -> Result<ClusterView, crate::cluster::ClusterError> {
    let Some(cluster) = relay.cluster.as_ref() else {
        let me = relay.node_info();
        return Ok(ClusterView {
            enabled: false,
            name: None,
            node: relay.node.as_str().to_owned(),
            connected: None,
            connections_total: me.connections,
            nodes: vec![me],
            owners_from: Vec::new(),
        });
    };
    let nodes = cluster.nodes.list().await?;
    Ok(ClusterView {
        enabled: true,
        name: Some(cluster.name().to_owned()),
        node: cluster.node().to_owned(),
        connected: Some(cluster.connected()),
        connections_total: nodes.iter().map(|n| n.connections).sum(),
        nodes,
        owners_from: relay
            .cluster_bus
            .as_ref()
            .map(|bus| bus.members())
            .unwrap_or_default(),
    })
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub count: usize,
    pub connections: Vec<ConnSnapshot>,
}

pub fn connections(relay: &Relay) -> Connections {
    let connections = relay.table.snapshot();
    Connections {
        count: connections.len(),
        connections,
    }
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub uptime_ms: u64,
    pub draining: bool,
    pub connections: ConnectionCounts,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_messages: u64,
    pub requests: RequestCounts,
    pub limits: LimitCounts,
    pub outbound: OutboundCounts,
    pub spaces: usize,
    pub spaces_connected: usize,
    pub channels: usize,
    /// What channel histories hold, against `channels.history_memory_bytes`.
    pub history: HistoryCounts,
    /// Resident memory of the relay process, where the OS reports it.
    pub memory_rss_bytes: Option<u64>,
    /// Tasks by state, runs and the history's writes.
    pub tasks: Option<crate::tasks::manager::TaskStats>,
}

#[derive(Debug, Serialize)]
pub struct HistoryCounts {
    pub bytes: usize,
    pub budget_bytes: usize,
}

/// The outbound queues together, against their shared budget.
#[derive(Debug, Serialize)]
pub struct OutboundCounts {
    /// Bytes queued for all consumers now.
    pub queued_bytes: usize,
    pub budget_bytes: usize,
    /// Consumers closed to stay within the budget, since start.
    pub shed: usize,
}

/// What the caps and rates refused, throttled and closed since start.
#[derive(Debug, Serialize)]
pub struct LimitCounts {
    /// Refusals before a connection (or HTTP request) started, by reason:
    /// `global_cap`, `user_cap`, `ip_cap`, `policy`, `slow_handshake`,
    /// `handshake_cap`.
    pub refused: BTreeMap<&'static str, u64>,
    /// Publishes and requests dropped for being over a rate.
    pub throttled: u64,
    /// Connections closed for repeated rate violations (1008).
    pub policy_closes: u64,
    /// Users whose buckets the relay currently keeps.
    pub tracked_users: usize,
}

#[derive(Debug, Serialize)]
pub struct ConnectionCounts {
    pub total: u64,
    pub accepted_total: u64,
    pub by_transport: BTreeMap<&'static str, u64>,
    pub by_state: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct RequestCounts {
    pub pending: usize,
    pub ok: u64,
    pub failed: u64,
}

pub async fn stats(relay: &Relay) -> Stats {
    let tasks = match relay.tasks.get() {
        Some(tasks) => tasks.stats().await.ok(),
        None => None,
    };
    let mut by_transport = BTreeMap::new();
    let mut by_state = BTreeMap::new();
    let mut total = 0;
    for (transport, state, count) in relay.table.counts() {
        *by_transport.entry(transport.as_str()).or_insert(0) += count;
        *by_state.entry(state.as_str()).or_insert(0) += count;
        total += count;
    }
    let totals = &relay.metrics.totals;
    let spaces = relay.directory.list();
    Stats {
        uptime_ms: relay.uptime().as_millis() as u64,
        draining: relay.is_draining(),
        connections: ConnectionCounts {
            total,
            accepted_total: totals.accepted.load(Ordering::Relaxed),
            by_transport,
            by_state,
        },
        messages_in: totals.msgs_in.load(Ordering::Relaxed),
        messages_out: totals.msgs_out.load(Ordering::Relaxed),
        bytes_in: totals.bytes_in.load(Ordering::Relaxed),
        bytes_out: totals.bytes_out.load(Ordering::Relaxed),
        dropped_messages: totals.dropped.load(Ordering::Relaxed),
        requests: RequestCounts {
            pending: relay.spaces.pending_count(),
            ok: totals.requests_ok.load(Ordering::Relaxed),
            failed: totals.requests_failed.load(Ordering::Relaxed),
        },
        history: {
            let (bytes, budget_bytes) = relay.channels.history_bytes();
            HistoryCounts {
                bytes,
                budget_bytes,
            }
        },
        outbound: OutboundCounts {
            queued_bytes: relay.budget.used(),
            budget_bytes: relay.config.limits.outbound_budget_bytes,
            shed: relay.budget.shed_count(),
        },
        limits: LimitCounts {
            refused: BTreeMap::from([
                (
                    "global_cap",
                    totals.refused_global_cap.load(Ordering::Relaxed),
                ),
                ("user_cap", totals.refused_user_cap.load(Ordering::Relaxed)),
                ("ip_cap", totals.refused_ip_cap.load(Ordering::Relaxed)),
                ("policy", totals.refused_policy.load(Ordering::Relaxed)),
                (
                    "slow_handshake",
                    totals.refused_slow_handshake.load(Ordering::Relaxed),
                ),
                (
                    "handshake_cap",
                    totals.refused_handshake_cap.load(Ordering::Relaxed),
                ),
            ]),
            throttled: totals.throttled.load(Ordering::Relaxed),
            policy_closes: totals.policy_closes.load(Ordering::Relaxed),
            tracked_users: relay.quotas.users(),
        },
        spaces_connected: spaces.iter().filter(|s| s.connected).count(),
        spaces: spaces.len(),
        channels: relay.channels.len(),
        memory_rss_bytes: resident_memory(),
        tasks,
    }
}

/// Resident set size from `/proc/self/status` (Linux); `None` elsewhere.
pub fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Most a plugin upload (wasm plus manifest) may weigh.
const MAX_PLUGIN_UPLOAD: usize = 32 * 1024 * 1024;

/// `/admin/plugins[/{name}[/rollback]]`, already authorized.
pub async fn plugins(
    relay: &Relay,
    req: hyper::Request<hyper::body::Incoming>,
    name: Option<&str>,
    action: Option<&str>,
) -> hyper::Response<Body> {
    use crate::plugin::Source;
    let method = req.method().clone();
    match (&method, name, action) {
        (&Method::GET, None, None) => json(StatusCode::OK, &relay.plugins.list()),
        (&Method::GET, Some(name), None) => {
            match relay.plugins.list().into_iter().find(|p| p.name == name) {
                Some(info) => json(StatusCode::OK, &info),
                None => json_error(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    &format!("no plugin named {name:?} is loaded"),
                ),
            }
        }
        (&Method::PUT, Some(name), None) => {
            let (wasm, manifest) = match read_upload(req).await {
                Ok(parts) => parts,
                Err(message) => {
                    return json_error(StatusCode::BAD_REQUEST, ErrorCode::BadMessage, &message);
                }
            };
            match relay
                .plugins
                .load(name, wasm.clone(), &manifest, Source::Admin)
                .await
            {
                Ok(report) => {
                    let version = saved::Version {
                        wasm: wasm.to_vec(),
                        manifest: manifest.clone(),
                    };
                    keep(relay, name, move |conn, name| {
                        saved::uploaded(conn, name, &version)
                    })
                    .await;
                    let rollout = roll_out(relay, name, Some((wasm, manifest))).await;
                    json(StatusCode::OK, &with_rollout(&report, rollout))
                }
                Err(e) => refused(e),
            }
        }
        (&Method::POST, Some(name), Some("rollback")) => match relay.plugins.rollback(name) {
            Ok(report) => {
                keep(relay, name, saved::rolled_back).await;
                let owned = name.to_owned();
                let active = relay
                    .store
                    .call(move |conn| saved::active(conn, &owned))
                    .await
                    .ok()
                    .flatten();
                let rollout = match active {
                    Some(version) => {
                        let wasm = bytes::Bytes::from(version.wasm);
                        roll_out(relay, name, Some((wasm, version.manifest))).await
                    }
                    // Back to a bundled or folder version: each node's own.
                    None => relay.rollout.get().map(|_| {
                        "not rolled out: this node went back to its bundled or folder version; roll back on each node".to_owned()
                    }),
                };
                json(StatusCode::OK, &with_rollout(&report, rollout))
            }
            Err(e) => refused(e),
        },
        (&Method::DELETE, Some(name), None) => match relay.plugins.remove(name) {
            Ok(()) => {
                keep(relay, name, saved::removed).await;
                let rollout = roll_out(relay, name, None).await;
                json(
                    StatusCode::OK,
                    &with_rollout(&serde_json::json!({ "removed": name }), rollout),
                )
            }
            Err(e) => refused(e),
        },
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "plugin endpoints: GET /admin/plugins, GET|PUT|DELETE /admin/plugins/{name}, POST /admin/plugins/{name}/rollback",
        ),
    }
}

/// In a cluster, makes this node's change to plugin `name` every node's:
/// the version now active (`Some`), or its removal. What the operator is
/// told of it (`None` outside a cluster).
async fn roll_out(
    relay: &Relay,
    name: &str,
    active: Option<(bytes::Bytes, String)>,
) -> Option<String> {
    let rollout = relay.rollout.get()?;
    let shared = match active {
        Some((wasm, manifest)) => rollout.publish(name, wasm, &manifest).await,
        None => rollout.withdraw(name).await,
    };
    Some(match shared {
        Ok(()) => "every node".to_owned(),
        Err(e) => {
            tracing::warn!(plugin = name, error = %e, "a plugin change did not reach the other nodes");
            format!("this node only: the cluster's plugin store failed ({e})")
        }
    })
}

/// A reply with where the change went (`rollout`), in a cluster.
fn with_rollout(reply: &impl serde::Serialize, rollout: Option<String>) -> serde_json::Value {
    let mut value = serde_json::to_value(reply).unwrap_or_default();
    if let (Some(rollout), Some(object)) = (rollout, value.as_object_mut()) {
        object.insert("rollout".into(), rollout.into());
    }
    value
}

/// Records a change to uploaded plugin `name` in the store, so it holds
/// after a restart. The change already serves; a failed write is logged for
/// the operator (the plugin would come back as it was before the change).
async fn keep(
    relay: &Relay,
    name: &str,
    change: impl FnOnce(&mut rusqlite::Connection, &str) -> rusqlite::Result<()> + Send + 'static,
) {
    let owned = name.to_owned();
    if let Err(e) = relay.store.call(move |conn| change(conn, &owned)).await {
        tracing::warn!(plugin = name, error = %e, "plugin change not stored: it will not survive a restart");
    }
}

fn refused(error: crate::plugin::RegistryError) -> hyper::Response<Body> {
    let status =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
    let code = if status == StatusCode::NOT_FOUND {
        ErrorCode::NotFound
    } else {
        ErrorCode::PluginRefused
    };
    json_error(status, code, &error.to_string())
}

/// Reads a `multipart/form-data` upload with a `wasm` part and a `manifest` part.
async fn read_upload(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<(bytes::Bytes, String), String> {
    use http_body_util::{BodyExt, Limited};
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let boundary = multer::parse_boundary(&content_type).map_err(|_| {
        "send multipart/form-data with parts `wasm` (the component) and `manifest` (plugin.toml), e.g. curl -F wasm=@p.wasm -F manifest=@plugin.toml".to_owned()
    })?;
    let body = Limited::new(req.into_body(), MAX_PLUGIN_UPLOAD)
        .collect()
        .await
        .map_err(|e| format!("cannot read the upload (limit {MAX_PLUGIN_UPLOAD} bytes): {e}"))?
        .to_bytes();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut wasm, mut manifest) = (None, None);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| format!("malformed multipart body: {e}"))?
    {
        match field.name() {
            Some("wasm") => wasm = Some(field.bytes().await.map_err(|e| e.to_string())?),
            Some("manifest") => manifest = Some(field.text().await.map_err(|e| e.to_string())?),
            _ => {}
        }
    }
    match (wasm, manifest) {
        (Some(wasm), Some(manifest)) => Ok((wasm, manifest)),
        (None, _) => Err("the upload has no `wasm` part".into()),
        (_, None) => Err("the upload has no `manifest` part".into()),
    }
}
