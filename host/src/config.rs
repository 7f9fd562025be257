//! The relay's configuration: one serde tree with defaults, loaded from TOML,
//! overridden by `WASMRELAY_*` environment variables and command-line flags
//! (see `cli`), and validated once at load with errors that name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `wasmrelay serve` can be told. Every field has a default, so an
/// empty file (or none) is a valid configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub heartbeat: HeartbeatConfig,
    pub admin: AdminConfig,
    pub spaces: SpacesConfig,
    pub channels: ChannelsConfig,
    pub plugins: PluginsConfig,
    pub tasks: TasksConfig,
    pub files: FilesConfig,
    pub tls: TlsConfig,
    pub cluster: ClusterConfig,
}

/// Several relays as one system over NATS (JetStream). Off unless `nats_url`
/// is set: a single node needs nothing external.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `nats://host:port` of the NATS server the nodes share; empty: no cluster.
    pub nats_url: String,
    /// The system's name: the prefix of its NATS subjects, streams and
    /// buckets, so several systems can share one NATS server.
    pub name: String,
    /// How often a node renews its entry in the registry.
    pub heartbeat_ms: u64,
    /// A node whose entry was not renewed this long is gone.
    pub node_ttl_ms: u64,
    /// How long the cluster's stream keeps channel messages.
    pub channel_retention_ms: u64,
    /// How many bytes of channel messages the stream keeps (oldest go first).
    pub channel_retention_bytes: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            name: "wasmrelay".into(),
            heartbeat_ms: 1000,
            node_ttl_ms: 3000,
            channel_retention_ms: 3_600_000,
            channel_retention_bytes: 1 << 30,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.nats_url.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: &str| ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        };
        if self.enabled() && !self.nats_url.starts_with("nats://") {
            return Err(invalid("cluster.nats_url", "must start with nats://"));
        }
        if self.name.is_empty()
            || self.name.len() > 32
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid("cluster.name", "must be 1-32 of A-Z a-z 0-9 - _"));
        }
        if self.heartbeat_ms == 0 {
            return Err(invalid("cluster.heartbeat_ms", "must be greater than 0"));
        }
        // NATS expires whole seconds at best; three beats fit in a TTL so one
        // late renewal does not make a live node look gone.
        if self.node_ttl_ms < 1000 || self.node_ttl_ms < 3 * self.heartbeat_ms {
            return Err(invalid(
                "cluster.node_ttl_ms",
                "must be at least 1000 and at least 3 × cluster.heartbeat_ms",
            ));
        }
        if self.channel_retention_ms < 1000 {
            return Err(invalid(
                "cluster.channel_retention_ms",
                "must be at least 1000",
            ));
        }
        if self.channel_retention_bytes < 1 << 20 {
            return Err(invalid(
                "cluster.channel_retention_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP address for HTTP and WebSocket.
    pub listen: SocketAddr,
    /// Where the relay keeps what must survive a restart.
    pub data_dir: PathBuf,
    /// This node's name in the ids it hands out (sessions, instances,
    /// requests), so a cluster can tell whose an id is. Empty: a random one
    /// at each start.
    pub node: String,
    /// How long in-flight requests may take to finish after SIGTERM / Ctrl-C.
    pub shutdown_grace_ms: u64,
    /// Serve QUIC (UDP) as well.
    pub quic: bool,
    /// UDP address for QUIC (ALPN `wasmrelay/1`).
    pub quic_listen: SocketAddr,
    /// Serve https and wss on `tls_listen` as well.
    pub tls: bool,
    /// TCP address for https and wss (the same endpoints as `listen`).
    pub tls_listen: SocketAddr,
    /// How long a new connection may take to send its first request's
    /// headers (and each later HTTP/1.1 request its headers); slower ones are
    /// closed, so a connection that trickles bytes holds nothing for long.
    pub header_timeout_ms: u64,
    /// How long a TLS client may take to finish its handshake.
    pub tls_handshake_timeout_ms: u64,
    /// QUIC handshakes in progress past which a client whose address is not
    /// yet validated is sent a Retry first (one more round trip, and no state
    /// kept for a spoofed source address).
    pub quic_retry_above: usize,
    /// QUIC handshakes in progress past which new ones are refused outright.
    pub quic_max_handshakes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`, replaces the generated development certificate.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// How often the certificate files are checked for changes; a changed
    /// pair is loaded for new connections without touching established ones.
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            reload_interval_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest protocol message (WebSocket message, HTTP body) accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most bytes an HTTP request's head (request line and headers) may take;
    /// larger ones are refused (431) before they are buffered.
    pub max_header_bytes: usize,
    /// Messages a connection's outbound queue holds before further ones are dropped.
    pub outbound_queue: usize,
    /// Deadline of a request to a space unless the caller asks for a shorter one.
    pub request_timeout_ms: u64,
    /// Requests in flight across the whole relay; past it new ones get `overloaded`.
    pub max_pending_requests: usize,
    /// Requests in flight per caller connection.
    pub max_requests_per_connection: usize,
    /// Channels one connection may subscribe to.
    pub max_subscriptions_per_connection: usize,
    /// Connections across the relay; past it new ones get 503 `overloaded`.
    pub max_connections: usize,
    /// Connections per IP address for clients no policy identified (with a
    /// policy, its tier's per-user cap applies instead).
    pub max_connections_per_ip: usize,
    /// Publishes and requests per connection, whoever the client is; off
    /// (`per_second = 0, burst = 0`) by default.
    pub connection_rate: crate::rate::Rate,
    /// Rate-limited messages in a row after which the connection is closed (1008).
    pub rate_violations_before_close: u32,
    /// Largest HTTP request body relayed; bodies over 64 KiB (or of unknown
    /// length) are streamed to the instance in `body` messages as they arrive.
    pub max_body_bytes: usize,
    /// Requests one service instance works on at once; more wait for a slot.
    pub max_in_flight_per_instance: usize,
    /// Spaces one connection may register instances of.
    pub max_registrations_per_connection: usize,
    /// A QUIC connection serving instances that sends nothing for this long
    /// is presumed gone (close 0x9) and its requests fail over; instances
    /// ping at least every quarter of it (PROTOCOL §3.2).
    pub instance_idle_timeout_ms: u64,
    /// Requests that may wait for a free instance per space; past it `overloaded`.
    pub max_waiting_per_space: usize,
    /// How long a request waits for a free instance before `overloaded` (503).
    pub max_wait_ms: u64,
    /// Bytes one connection's outbound queue holds (payloads plus a 64-byte
    /// estimate per message) before its channels' slow-consumer policy applies.
    pub outbound_queue_bytes: usize,
    /// Bytes all outbound queues together may hold; past it the consumer
    /// with the most queued is closed (1013) to make room.
    pub outbound_budget_bytes: usize,
    /// Ingress backpressure: a subscriber whose queue passes half its bounds
    /// makes its channels' publishers wait (the relay stops reading them)
    /// until it is back under a quarter; one that stays behind this long is
    /// a slow consumer, and its channels' `slow_consumer` policy applies
    /// instead. 0 turns backpressure off (fill, then apply the policy).
    pub slow_consumer_after_ms: u64,
}

/// What happens to a subscriber that falls behind on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumer {
    /// Drop its oldest queued messages; it is sent `lost` with the count.
    DropOldest,
    /// Close it with 1013 (QUIC 0x8).
    Disconnect,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// The slow-consumer policy of channels no override names.
    pub slow_consumer: SlowConsumer,
    /// Policies by channel-name prefix; the longest matching prefix wins.
    pub overrides: Vec<ChannelOverride>,
    /// Which channels keep a history, by pattern (the most specific wins):
    /// their sequence survives empty periods, and a client that comes back
    /// recovers what it missed (PROTOCOL §5.1).
    pub history: Vec<HistoryRule>,
    /// Bytes all channels' histories may hold together (payloads plus a
    /// fixed estimate per message and per channel); past it the oldest
    /// messages relay-wide go first.
    pub history_memory_bytes: usize,
    /// How long a channel with history that nobody subscribes to and
    /// nobody publishes on keeps its epoch and sequence after its last
    /// message expired.
    pub history_idle_ms: u64,
    /// Channel patterns whose subscribers a subscriber may list (`who`):
    /// their sessions and users. None by default.
    pub presence_details: Vec<String>,
}

/// History for the channels a pattern names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// A channel name, or a prefix ending in `*` (`chat/*`).
    pub pattern: String,
    /// Messages kept per channel (1–10,000).
    pub size: usize,
    /// How long a message is kept.
    pub ttl_ms: u64,
    /// Also keep it in the embedded store, so a restart keeps the epoch.
    #[serde(default)]
    pub persist: bool,
}

/// Whether `pattern` (a name, or a prefix ending in `*`) names `channel`.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => channel == pattern,
    }
}

/// How specific a pattern is: an exact name beats any prefix, a longer
/// prefix a shorter one.
fn specificity(pattern: &str) -> usize {
    match pattern.strip_suffix('*') {
        Some(prefix) => prefix.len(),
        None => usize::MAX,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelOverride {
    pub prefix: String,
    pub slow_consumer: SlowConsumer,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            slow_consumer: SlowConsumer::DropOldest,
            overrides: Vec::new(),
            // The demo's chat keeps its last 100 messages for 5 minutes.
            history: vec![HistoryRule {
                pattern: "chat/*".into(),
                size: 100,
                ttl_ms: 5 * 60 * 1000,
                persist: false,
            }],
            history_memory_bytes: 64 * 1024 * 1024,
            history_idle_ms: 60 * 60 * 1000,
            presence_details: Vec::new(),
        }
    }
}

impl ChannelsConfig {
    /// The policy for `channel`.
    pub fn slow_consumer(&self, channel: &str) -> SlowConsumer {
        self.overrides
            .iter()
            .filter(|o| channel.starts_with(&o.prefix))
            .max_by_key(|o| o.prefix.len())
            .map_or(self.slow_consumer, |o| o.slow_consumer)
    }

    /// The history rule for `channel`, if any names it.
    pub fn history_for(&self, channel: &str) -> Option<&HistoryRule> {
        self.history
            .iter()
            .filter(|rule| pattern_matches(&rule.pattern, channel))
            .max_by_key(|rule| specificity(&rule.pattern))
    }

    /// Whether `who` may list `channel`'s subscribers.
    pub fn shows_members(&self, channel: &str) -> bool {
        self.presence_details
            .iter()
            .any(|pattern| pattern_matches(pattern, channel))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let check_pattern = |field: String, pattern: &str| {
            let star = pattern.find('*');
            if pattern.is_empty() || star.is_some_and(|at| at + 1 != pattern.len()) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    reason: "must be a channel name, or a prefix ending in `*`".into(),
                });
            }
            Ok(())
        };
        for (i, rule) in self.history.iter().enumerate() {
            check_pattern(format!("channels.history[{i}].pattern"), &rule.pattern)?;
            if !(1..=10_000).contains(&rule.size) {
                return Err(ConfigError::Invalid {
                    field: format!("channels.history[{i}].size").into(),
                    reason: "must be 1 to 10000".into(),
                });
            }
            if rule.ttl_ms == 0 {
                return Err(ConfigError::Invalid {
                    field: format!("channels.history[{i}].ttl_ms").into(),
                    reason: "must be greater than 0".into(),
                });
            }
        }
        for (i, pattern) in self.presence_details.iter().enumerate() {
            check_pattern(format!("channels.presence_details[{i}]"), pattern)?;
        }
        if self.history_memory_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid {
                field: "channels.history_memory_bytes".into(),
                reason: "must be at least 65536".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// How often the relay pings each WebSocket connection.
    pub interval_ms: u64,
    /// A connection silent this long (no frame, no pong) is reaped; a WebSocket
    /// that has not sent `hello` within this time is closed too.
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// The bearer token `/admin/*` and `/metrics` require. Unset, the relay
    /// generates one on first start into `<data_dir>/admin.token` (mode 0600)
    /// and the CLI reads it from there.
    pub token: Option<String>,
    /// Serve `/admin/*` and `/metrics` without a token. Refused unless every
    /// TCP listener is on a loopback address.
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpacesConfig {
    /// Spaces known before any instance registers, so they show as "Not connected"
    /// rather than unknown.
    pub declared: Vec<String>,
    /// Whether a service may register under a space that is not declared.
    pub allow_undeclared: bool,
    /// Upper bound on distinct spaces, so registrations cannot grow the registry without end.
    pub max_spaces: usize,
    /// Whether clients no policy identified may register instances. Identified
    /// ones may unless the policy's `may-register` says otherwise.
    pub anonymous_register: bool,
    /// Spaces (exact names, or prefixes ending in `*`) whose instances may
    /// belong to different users at once. Elsewhere a space is held by the
    /// user of its first instance until its last instance leaves.
    pub shared: Vec<String>,
    /// Spaces (exact names, or prefixes ending in `*`) whose instances receive
    /// HTTP callers' `Authorization` and `Cookie` headers. Elsewhere they are
    /// removed before a request is relayed.
    pub forward_credentials: Vec<String>,
}

/// Whether `name` matches one of `patterns`: exact names, or prefixes ending in `*`.
pub fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Plugins compiled into the relay to load at start (see plugins/).
    pub bundled: Vec<String>,
    /// A folder watched for `NAME.wasm` + `NAME.toml` pairs: added or changed
    /// pairs are loaded or swapped, removed ones unloaded. Relative paths are
    /// under `server.data_dir`. Empty disables watching.
    pub dir: PathBuf,
    /// How often the folder is scanned.
    pub watch_interval_ms: u64,
    /// Ceiling for any plugin's `limits.memory_bytes` (the pooling allocator's slot size).
    pub max_memory_bytes: u64,
    /// Plugin instances that may exist at once across all plugins.
    pub max_instances: u32,
    /// Keep compiled plugins so restarts and repeated swaps skip compilation.
    pub compile_cache: bool,
    /// Where the compile cache lives; relative paths are under `server.data_dir`.
    pub cache_dir: PathBuf,
    /// Most bytes the compile cache keeps; the least recently used entries
    /// are removed past it.
    pub cache_max_bytes: u64,
    /// Hosts added to a bundled plugin's `allow_hosts`, by plugin name: what
    /// `http-probe` may check beyond the relay's own host.
    pub allow_hosts: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            bundled: vec![
                "path-router".to_owned(),
                "tiered-policy".to_owned(),
                "stamp-filter".to_owned(),
                "heartbeat".to_owned(),
                "http-probe".to_owned(),
            ],
            dir: PathBuf::from("plugins"),
            watch_interval_ms: 1_000,
            max_memory_bytes: 64 * 1024 * 1024,
            max_instances: 256,
            compile_cache: true,
            cache_dir: PathBuf::from("plugin-cache"),
            cache_max_bytes: 256 * 1024 * 1024,
            allow_hosts: Default::default(),
        }
    }
}

/// Scheduled task runs (task plugins).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Runs that may go on at once across all tasks; more wait, `queued`.
    pub max_concurrent_runs: usize,
    /// Runs kept in the history per task (with their logs); older ones are pruned.
    pub keep_runs: u32,
    /// Log lines kept per run; past it they are counted, not kept.
    pub max_log_lines_per_run: u32,
    /// A folder of task definitions, one `NAME.toml` per task, watched and
    /// applied without a restart. Relative paths are under `server.data_dir`;
    /// empty disables it.
    pub dir: PathBuf,
    /// How often the folder is scanned.
    pub watch_interval_ms: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 16,
            keep_runs: 100,
            max_log_lines_per_run: 1_000,
            dir: PathBuf::from("tasks"),
            watch_interval_ms: 1_000,
        }
    }
}

/// Uploaded and pushed files: `/files/` (tus uploads, ranged downloads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Where file bytes live; relative paths are under `server.data_dir`.
    pub dir: PathBuf,
    /// The largest file accepted.
    pub max_file_bytes: u64,
    /// Bytes one user's files may take together (declared lengths, reserved
    /// when an upload starts).
    pub user_bytes: u64,
    /// Bytes all files may take together.
    pub total_bytes: u64,
    /// An upload untouched this long is abandoned and removed.
    pub upload_ttl_ms: u64,
    /// A finished file is kept this long.
    pub file_ttl_ms: u64,
    /// An upload body that sends nothing for this long is cut off (what
    /// came before is kept), so a stalled client does not hold the upload.
    pub body_idle_timeout_ms: u64,
    /// Uploads one user may have in progress at once.
    pub max_uploads_per_user: u64,
    /// The largest chunk of a transfer over WebSocket or QUIC (a client may
    /// ask for less); also what the relay sends per chunk by default.
    pub max_chunk_bytes: u32,
    /// Uploads and downloads one connection may have open at once.
    pub max_transfers_per_connection: usize,
    /// How long an offer (push) stays open when the offer names no TTL.
    pub offer_ttl_ms: u64,
    /// The longest TTL an offer may ask for.
    pub max_offer_ttl_ms: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("files"),
            max_file_bytes: 1 << 30,
            user_bytes: 2 << 30,
            total_bytes: 10 << 30,
            upload_ttl_ms: 24 * 60 * 60 * 1000,
            file_ttl_ms: 7 * 24 * 60 * 60 * 1000,
            body_idle_timeout_ms: 30_000,
            max_uploads_per_user: 64,
            max_chunk_bytes: 256 * 1024,
            max_transfers_per_connection: 8,
            offer_ttl_ms: 24 * 60 * 60 * 1000,
            max_offer_ttl_ms: 7 * 24 * 60 * 60 * 1000,
        }
    }
}

impl TasksConfig {
    /// The watched folder, if any, resolved against the data directory.
    pub fn watched_dir(&self, data_dir: &Path) -> Option<PathBuf> {
        if self.dir.as_os_str().is_empty() {
            None
        } else {
            Some(data_dir.join(&self.dir))
        }
    }
}

impl PluginsConfig {
    /// The watched folder, if any, resolved against the data directory.
    pub fn watched_dir(&self, data_dir: &Path) -> Option<PathBuf> {
        if self.dir.as_os_str().is_empty() {
            None
        } else {
            Some(data_dir.join(&self.dir))
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("wasmrelay-data"),
            node: String::new(),
            shutdown_grace_ms: 10_000,
            quic: true,
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            tls: true,
            tls_listen: SocketAddr::from(([127, 0, 0, 1], 8444)),
            header_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 5_000,
            quic_retry_above: 64,
            quic_max_handshakes: 4_096,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_header_bytes: 32 * 1024,
            outbound_queue: 1024,
            request_timeout_ms: 30_000,
            max_pending_requests: 10_000,
            max_requests_per_connection: 256,
            max_subscriptions_per_connection: 256,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            // Off: rates come from the policy's tiers unless an operator
            // wants a floor for everyone.
            connection_rate: crate::rate::Rate {
                per_second: 0,
                burst: 0,
            },
            rate_violations_before_close: 100,
            max_body_bytes: 64 * 1024 * 1024,
            max_in_flight_per_instance: 64,
            max_registrations_per_connection: 4,
            instance_idle_timeout_ms: 2_000,
            max_waiting_per_space: 1024,
            max_wait_ms: 5_000,
            outbound_queue_bytes: 4 * 1024 * 1024,
            outbound_budget_bytes: 512 * 1024 * 1024,
            slow_consumer_after_ms: 1_000,
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: 15_000,
            idle_timeout_ms: 45_000,
        }
    }
}

impl Default for SpacesConfig {
    fn default() -> Self {
        Self {
            declared: vec!["demo".to_owned()],
            allow_undeclared: true,
            max_spaces: 1024,
            anonymous_register: false,
            shared: Vec::new(),
            forward_credentials: Vec::new(),
        }
    }
}

/// A configuration that could not be loaded; the message names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        field: std::borrow::Cow<'static, str>,
        reason: String,
    },
}

impl Config {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks what serde cannot: ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field: field.into(),
                reason: reason.into(),
            }
        }
        if let Err(reason) = crate::ids::validate_node(&self.server.node) {
            return Err(invalid("server.node", reason));
        }
        self.channels.validate()?;
        self.cluster.validate()?;
        let l = &self.limits;
        if l.max_message_bytes < 1024 {
            return Err(invalid("limits.max_message_bytes", "must be at least 1024"));
        }
        if l.max_message_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be at most 67108864 (64 MiB); stream larger payloads in chunks",
            ));
        }
        for (field, value) in [
            ("limits.outbound_queue", l.outbound_queue),
            ("limits.max_pending_requests", l.max_pending_requests),
            (
                "limits.max_requests_per_connection",
                l.max_requests_per_connection,
            ),
            (
                "limits.max_subscriptions_per_connection",
                l.max_subscriptions_per_connection,
            ),
            ("spaces.max_spaces", self.spaces.max_spaces),
            (
                "limits.max_registrations_per_connection",
                l.max_registrations_per_connection,
            ),
            ("limits.max_connections", l.max_connections),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("limits.outbound_queue_bytes", l.outbound_queue_bytes),
            ("limits.max_body_bytes", l.max_body_bytes),
            (
                "limits.max_in_flight_per_instance",
                l.max_in_flight_per_instance,
            ),
            ("limits.outbound_budget_bytes", l.outbound_budget_bytes),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if !(8 * 1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if self.server.quic_max_handshakes == 0 {
            return Err(invalid(
                "server.quic_max_handshakes",
                "must be greater than 0",
            ));
        }
        for (field, ms) in [
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            (
                "server.tls_handshake_timeout_ms",
                self.server.tls_handshake_timeout_ms,
            ),
        ] {
            if !(100..=120_000).contains(&ms) {
                return Err(invalid(field, "must be between 100 and 120000"));
            }
        }
        if l.instance_idle_timeout_ms < 1_000 {
            return Err(invalid(
                "limits.instance_idle_timeout_ms",
                "must be at least 1000 (instances ping every quarter of it)",
            ));
        }
        if l.request_timeout_ms == 0 {
            return Err(invalid(
                "limits.request_timeout_ms",
                "must be greater than 0",
            ));
        }
        let h = &self.heartbeat;
        if h.interval_ms < 10 {
            return Err(invalid("heartbeat.interval_ms", "must be at least 10"));
        }
        if h.idle_timeout_ms <= h.interval_ms {
            return Err(invalid(
                "heartbeat.idle_timeout_ms",
                format!(
                    "must be greater than heartbeat.interval_ms ({}), or every connection is reaped between pings",
                    h.interval_ms
                ),
            ));
        }
        if let Some(token) = &self.admin.token {
            if token.trim().is_empty() {
                return Err(invalid(
                    "admin.token",
                    "must not be empty; leave it out to have one generated into <data_dir>/admin.token",
                ));
            }
            if token.len() < 16 {
                return Err(invalid(
                    "admin.token",
                    "must be at least 16 characters; leave it out to have a random one generated",
                ));
            }
            if self.admin.insecure {
                return Err(invalid(
                    "admin.insecure",
                    "cannot be combined with admin.token; choose one",
                ));
            }
        }
        if self.admin.insecure {
            let mut listeners = vec![("server.listen", self.server.listen)];
            if self.server.tls {
                listeners.push(("server.tls_listen", self.server.tls_listen));
            }
            if let Some((field, addr)) = listeners.iter().find(|(_, a)| !a.ip().is_loopback()) {
                return Err(invalid(
                    "admin.insecure",
                    format!(
                        "refused: {field} = {addr} is not a loopback address, so the operator API would be open to the network; set admin.token or use the generated one"
                    ),
                ));
            }
        }
        for name in &self.spaces.declared {
            if let Err(reason) = crate::protocol::names::validate_space_name(name) {
                return Err(invalid("spaces.declared", format!("{name:?}: {reason}")));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                "tls.cert",
                "give both tls.cert and tls.key, or neither (for the development certificate)",
            ));
        }
        if self.tls.reload_interval_ms < 100 {
            return Err(invalid("tls.reload_interval_ms", "must be at least 100"));
        }
        let p = &self.plugins;
        if let Some(name) = p.allow_hosts.keys().find(|name| !p.bundled.contains(name)) {
            return Err(invalid(
                "plugins.allow_hosts",
                format!("{name:?} is not in plugins.bundled"),
            ));
        }
        for name in &p.bundled {
            if crate::bundled::find(name).is_none() {
                return Err(invalid(
                    "plugins.bundled",
                    format!(
                        "{name:?} is not a bundled plugin (bundled: {})",
                        crate::bundled::BUNDLED
                            .iter()
                            .map(|b| b.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if p.max_memory_bytes < 1024 * 1024 || p.max_memory_bytes > 4 * 1024 * 1024 * 1024 {
            return Err(invalid(
                "plugins.max_memory_bytes",
                "must be between 1048576 (1 MiB) and 4294967296 (4 GiB)",
            ));
        }
        if p.max_instances < 4 {
            return Err(invalid("plugins.max_instances", "must be at least 4"));
        }
        if p.watch_interval_ms < 50 {
            return Err(invalid("plugins.watch_interval_ms", "must be at least 50"));
        }
        let f = &self.files;
        if f.max_file_bytes == 0 || f.user_bytes == 0 || f.total_bytes == 0 {
            return Err(invalid(
                "files.max_file_bytes",
                "files.max_file_bytes, user_bytes and total_bytes must be greater than 0",
            ));
        }
        if f.upload_ttl_ms < 1_000 {
            return Err(invalid("files.upload_ttl_ms", "must be at least 1000"));
        }
        if f.file_ttl_ms < 1_000 {
            return Err(invalid("files.file_ttl_ms", "must be at least 1000"));
        }
        if f.body_idle_timeout_ms < 100 {
            return Err(invalid(
                "files.body_idle_timeout_ms",
                "must be at least 100",
            ));
        }
        if f.max_uploads_per_user == 0 {
            return Err(invalid(
                "files.max_uploads_per_user",
                "must be greater than 0",
            ));
        }
        if f.max_transfers_per_connection == 0 {
            return Err(invalid(
                "files.max_transfers_per_connection",
                "must be greater than 0",
            ));
        }
        // Larger than a message allows is fine: `chunk_limit` caps it.
        if f.max_chunk_bytes < 1024 {
            return Err(invalid("files.max_chunk_bytes", "must be at least 1024"));
        }
        if f.offer_ttl_ms == 0 || f.offer_ttl_ms > f.max_offer_ttl_ms {
            return Err(invalid(
                "files.offer_ttl_ms",
                "must be greater than 0 and at most files.max_offer_ttl_ms",
            ));
        }
        let t = &self.tasks;
        if !(1..=4096).contains(&t.max_concurrent_runs) {
            return Err(invalid(
                "tasks.max_concurrent_runs",
                "must be between 1 and 4096",
            ));
        }
        if t.keep_runs == 0 {
            return Err(invalid("tasks.keep_runs", "must be at least 1"));
        }
        if t.watch_interval_ms < 50 {
            return Err(invalid("tasks.watch_interval_ms", "must be at least 50"));
        }
        if self.spaces.declared.len() > self.spaces.max_spaces {
            return Err(invalid(
                "spaces.declared",
                "declares more spaces than spaces.max_spaces",
            ));
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat.interval_ms)
    }

    /// The largest chunk a transfer over WebSocket or QUIC uses:
    /// `files.max_chunk_bytes`, but never more than fits in one message
    /// with its header (1 KiB is kept for that).
    pub fn chunk_limit(&self) -> u32 {
        let fits = self.limits.max_message_bytes.saturating_sub(1024).max(1);
        self.files
            .max_chunk_bytes
            .min(u32::try_from(fits).unwrap_or(u32::MAX))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat.idle_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }

    pub fn files_body_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.files.body_idle_timeout_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.server.header_timeout_ms)
    }

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.server.tls_handshake_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
    }

    #[test]
    fn example_file_documents_the_defaults() {
        let text = include_str!("../../examples/wasmrelay.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn allowed_hosts_name_a_bundled_plugin() {
        let config =
            Config::from_toml("[plugins.allow_hosts]\n\"http-probe\" = [\"status.example.com\"]\n")
                .unwrap();
        config.validate().unwrap();
        let config =
            Config::from_toml("[plugins.allow_hosts]\nnope = [\"example.com\"]\n").unwrap();
        assert!(
            matches!(
                config.validate(),
                Err(ConfigError::Invalid { ref field, .. }) if field == "plugins.allow_hosts"
            ),
            "{:?}",
            config.validate()
        );
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let config = Config::from_toml("[heartbeat]\ninterval_ms = 1000\n").unwrap();
        assert_eq!(config.heartbeat.interval_ms, 1000);
        assert_eq!(config.heartbeat.idle_timeout_ms, 45_000);
    }

    #[test]
    fn a_bad_node_name_is_refused_naming_the_field() {
        let mut config = Config::default();
        config.server.node = "Node One".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.node"), "{err}");
        config.server.node = "node-1".into();
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::from_toml("[limits]\nmax_mesage_bytes = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("[server]\nlisten = 8080\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn an_open_admin_plane_is_only_allowed_on_loopback() {
        let mut config = Config::default();
        config.admin.insecure = true;
        config.validate().unwrap();
        config.server.tls_listen = "0.0.0.0:8444".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("admin.insecure") && err.contains("server.tls_listen"),
            "{err}"
        );
        config.server.tls = false;
        config.validate().unwrap();
        config.server.listen = "[::]:8080".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");

        let mut config = Config::default();
        config.admin.token = Some("short".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
        config.admin.token = Some("a-long-enough-token".into());
        config.admin.insecure = true;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("admin.insecure"), "{err}");
    }

    #[test]
    fn small_messages_cap_the_transfer_chunk_instead_of_refusing_the_config() {
        let mut config = Config::default();
        config.limits.max_message_bytes = 4096;
        config.validate().expect("a small message limit is valid");
        assert_eq!(config.chunk_limit(), 3072);
        assert_eq!(Config::default().chunk_limit(), 256 * 1024);
    }

    #[test]
    fn relations_between_fields_are_checked() {
        let mut config = Config::default();
        config.heartbeat.idle_timeout_ms = config.heartbeat.interval_ms;
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string().contains("heartbeat.idle_timeout_ms"),
            "{err}"
        );

        let mut config = Config::default();
        config.limits.max_message_bytes = 10;
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string().contains("limits.max_message_bytes"),
            "{err}"
        );

        let mut config = Config::default();
        config.spaces.declared = vec!["has space".into()];
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("spaces.declared"), "{err}");
    }
}
