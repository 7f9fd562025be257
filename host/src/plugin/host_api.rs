//! The host side of the capabilities a plugin may import (`log`, `kv`,
//! `publish`, `presence`, `clock`, `http`), and the per-store state they
//! work on. Only the capabilities a manifest grants are linked (see `runtime`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

use super::bindings::{clock, http, kv, log, presence, publish, stats, transfer, types};
pub use super::kv::KvStore;
use super::loaded::RunLog;
use super::manifest::Manifest;
use crate::bus::Bus;
use crate::channels::PresenceView;
use crate::protocol::Data;

/// Relay services a plugin's capabilities reach.
#[derive(Clone)]
pub struct HostServices {
    pub bus: Arc<dyn Bus>,
    /// What the `presence` capability reads.
    pub presence: Arc<dyn PresenceView>,
    pub kv: Arc<KvStore>,
    /// What the `stats` capability reads.
    pub figures: Arc<dyn RelayFigures>,
    /// Where the `transfer` capability puts and offers files.
    pub files: Arc<dyn FileDrop>,
}

/// Files for the `transfer` capability: put a finished file, offer one.
/// Calls block until done (task plugins run on blocking threads).
pub trait FileDrop: Send + Sync {
    /// Stores `data` as file `name` owned by `owner`; its id.
    fn put(&self, owner: &str, name: &str, data: Vec<u8>) -> Result<String, String>;
    /// Offers `owner`'s file `file` to `to`; the offer's id.
    fn offer(
        &self,
        owner: &str,
        file: &str,
        to: crate::protocol::Target,
        ttl_ms: Option<u64>,
    ) -> Result<String, String>;
}

impl FileDrop for NoRelay {
    fn put(&self, _: &str, _: &str, _: Vec<u8>) -> Result<String, String> {
        Err("no relay: files are not available here".to_owned())
    }

    fn offer(
        &self,
        _: &str,
        _: &str,
        _: crate::protocol::Target,
        _: Option<u64>,
    ) -> Result<String, String> {
        Err("no relay: files are not available here".to_owned())
    }
}

/// The relay's own figures, as the `stats` capability reports them.
pub trait RelayFigures: Send + Sync {
    fn figures(&self) -> stats::Snapshot;
}

/// Figures for a registry with no relay around it (unit tests, benches):
/// all zero.
pub struct NoRelay;

impl RelayFigures for NoRelay {
    fn figures(&self) -> stats::Snapshot {
        stats::Snapshot {
            connections: 0,
            channels: 0,
            spaces: 0,
            spaces_connected: 0,
            requests_pending: 0,
            messages_in: 0,
            messages_out: 0,
            uptime_ms: 0,
        }
    }
}

/// What every store of one plugin version shares.
pub struct PluginContext {
    pub name: String,
    pub version: String,
    pub services: HostServices,
    pub allow_hosts: Vec<String>,
    pub kv_max_keys: usize,
    pub kv_max_value_bytes: usize,
    pub memory_bytes: usize,
    pub call_timeout: Duration,
}

impl PluginContext {
    pub fn new(manifest: &Manifest, services: HostServices) -> Self {
        Self {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            services,
            allow_hosts: manifest.allow_hosts.clone(),
            kv_max_keys: manifest.limits.kv_max_keys,
            kv_max_value_bytes: manifest.limits.kv_max_value_bytes,
            memory_bytes: manifest.limits.memory_bytes as usize,
            call_timeout: Duration::from_millis(manifest.limits.call_timeout_ms),
        }
    }
}

/// The data of one plugin store.
pub struct HostState {
    pub ctx: Arc<PluginContext>,
    pub limiter: MemoryLimiter,
    /// During a task run: where its log lines go too.
    pub run_log: Option<RunLog>,
}

impl HostState {
    pub fn new(ctx: Arc<PluginContext>) -> Self {
        let limits = StoreLimitsBuilder::new()
            .memory_size(ctx.memory_bytes)
            .build();
        Self {
            ctx,
            limiter: MemoryLimiter {
                limits,
                refused: false,
            },
            run_log: None,
        }
    }
}

/// Enforces the manifest's memory cap and remembers a refusal, so a guest that
/// aborts after a failed allocation is reported as out of memory, not as a
/// generic trap.
pub struct MemoryLimiter {
    limits: StoreLimits,
    pub refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let plugin = self.ctx.name.as_str();
        let version = self.ctx.version.as_str();
        // Bounded, so a chatty plugin cannot flood the log with megabytes per line.
        let message: String = message.chars().take(4096).collect();
        if let Some(run_log) = &self.run_log {
            let name = match level {
                log::Level::Trace => "trace",
                log::Level::Debug => "debug",
                log::Level::Info => "info",
                log::Level::Warn => "warn",
                log::Level::Error => "error",
            };
            run_log(name, &message);
        }
        match level {
            log::Level::Trace => tracing::trace!(plugin, version, "{message}"),
            log::Level::Debug => tracing::debug!(plugin, version, "{message}"),
            log::Level::Info => tracing::info!(plugin, version, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, version, "{message}"),
            log::Level::Error => tracing::error!(plugin, version, "{message}"),
        }
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.ctx.services.kv.get(&self.ctx.name, &key)
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), String> {
        if value.len() > self.ctx.kv_max_value_bytes {
            return Err(format!(
                "value of {} bytes exceeds limits.kv_max_value_bytes ({})",
                value.len(),
                self.ctx.kv_max_value_bytes
            ));
        }
        let ttl = ttl_ms.map(Duration::from_millis);
        self.ctx
            .services
            .kv
            .set(&self.ctx.name, key, value, ttl, self.ctx.kv_max_keys)
    }

    fn delete(&mut self, key: String) -> bool {
        self.ctx.services.kv.delete(&self.ctx.name, &key)
    }
}

impl publish::Host for HostState {
    fn publish(&mut self, channel: String, data: Vec<u8>) -> u64 {
        // A plugin cannot be paused mid-call: its publishes are not held
        // back (a slow subscriber gets its channel's policy, as ever).
        let mut unheeded = crate::delivery::Pressure::default();
        let published = self
            .ctx
            .services
            .bus
            .publish(&channel, Data::from(data), &mut unheeded);
        match published {
            crate::bus::Ack::Numbered(seq) => seq,
            // Numbered later (a cluster): the WIT's 0, "not known here".
            crate::bus::Ack::Pending(_) => 0,
        }
    }
}

impl presence::Host for HostState {
    fn count(&mut self, channel: String) -> u64 {
        self.ctx.services.presence.presence(&channel)
    }
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

impl stats::Host for HostState {
    fn figures(&mut self) -> stats::Snapshot {
        self.ctx.services.figures.figures()
    }
}

impl transfer::Host for HostState {
    fn put(&mut self, name: String, data: Vec<u8>) -> Result<String, String> {
        let owner = format!("task:{}", self.ctx.name);
        self.ctx.services.files.put(&owner, &name, data)
    }

    fn offer(&mut self, file: String, to: transfer::Target, ttl_ms: u64) -> Result<String, String> {
        let owner = format!("task:{}", self.ctx.name);
        let to = match to {
            transfer::Target::User(user) => crate::protocol::Target::User(user),
            transfer::Target::Channel(channel) => crate::protocol::Target::Channel(channel),
            transfer::Target::Session(session) => crate::protocol::Target::Session(session),
        };
        let ttl = (ttl_ms > 0).then_some(ttl_ms);
        self.ctx.services.files.offer(&owner, &file, to, ttl)
    }
}

/// Waits, from a plugin call, for what a task on a runtime sends back:
/// block_in_place hands this worker's other tasks to another thread
/// meanwhile, so connections sharing the worker are not held up.
pub fn wait_for<T>(answer: std::sync::mpsc::Receiver<T>, gone: impl FnOnce() -> T) -> T {
    let wait = || answer.recv().unwrap_or_else(|_| gone());
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        // A current-thread runtime has no other worker to hand tasks to (the
        // relay binary never runs on one; some tests and benches do).
        _ => wait(),
    }
}

impl http::Host for HostState {
    fn fetch(&mut self, request: http::Request) -> Result<http::Response, String> {
        fetch(&self.ctx, request)
    }
}

/// Outbound HTTP for the `http` capability: plain `http://` to an allowed
/// host, bounded by the plugin's call timeout. The request runs on a small
/// runtime of its own ([`outbound_http`]) with a pooled client.
fn fetch(ctx: &PluginContext, request: http::Request) -> Result<http::Response, String> {
    let uri: ::http::Uri = request
        .url
        .parse()
        .map_err(|e| format!("invalid url {:?}: {e}", request.url))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "only http:// URLs are supported, not {:?}",
            request.url
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("url {:?} has no host", request.url))?;
    let allowed = ctx.allow_hosts.iter().any(|allowed| {
        allowed == authority.as_str() || (!allowed.contains(':') && allowed == authority.host())
    });
    if !allowed {
        return Err(format!(
            "host {authority} is not in the manifest's allow_hosts"
        ));
    }
    let method = ::http::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", request.method))?;
    let mut builder = ::http::Request::builder().method(method).uri(uri);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let outbound = builder
        .body(http_body_util::Full::new(bytes::Bytes::from(request.body)))
        .map_err(|e| format!("invalid request: {e}"))?;
    let timeout = ctx.call_timeout;
    let (done, answer) = std::sync::mpsc::sync_channel(1);
    outbound_http()?.spawn(async move {
        let call = tokio::time::timeout(timeout, send(outbound));
        let _ = done.send(
            call.await
                .unwrap_or_else(|_| Err(format!("no response within {} ms", timeout.as_millis()))),
        );
    });
    // Plugin calls are synchronous, so the caller must wait.
    wait_for(answer, || Err("the HTTP client stopped".to_owned()))
}

/// The runtime outbound plugin HTTP runs on: one thread of its own, started
/// on first use, so the relay's workers never drive (or wait inside) it.
fn outbound_http() -> Result<&'static tokio::runtime::Handle, String> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("wasmrelay-plugin-http")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the HTTP client: {e}"))
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
        .map_err(Clone::clone)
}

/// Sends one request with a pooled client and reads the whole response.
async fn send(
    outbound: ::http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<http::Response, String> {
    use http_body_util::BodyExt;
    type Pool = hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >;
    static CLIENT: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        // Bounded: only allow-listed hosts are reached, and at most a few
        // idle connections are kept to each.
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build_http()
    });
    let response = client
        .request(outbound)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(n, v)| {
            v.to_str()
                .ok()
                .map(|v| (n.as_str().to_owned(), v.to_owned()))
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(http::Response {
        status,
        headers,
        body,
    })
}
