//! The `wasmrelay` command line: `serve` runs the relay; `conns` prints a
//! running relay's connection table the way `ss` does.
//!
//! Precedence for settings: flag, then `WASMRELAY_*` environment variable,
//! then the config file, then the built-in default.

mod push;
mod task;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::relay::{Listeners, run};

#[derive(Debug, Parser)]
#[command(
    name = "wasmrelay",
    version,
    about = "A WebAssembly-extensible edge relay"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve(ServeArgs),
    /// Print a running relay's connections, like `ss`.
    Conns(ConnsArgs),
    /// List, load, swap, roll back or remove a running relay's plugins.
    Plugin(PluginArgs),
    /// Scheduled tasks: list, show, apply, run, stop, enable, disable,
    /// delete, history, logs (-f to follow), export.
    Task(task::TaskArgs),
    /// Put a file on the relay and offer it to users, channels or sessions
    /// (they are told, and pull it when ready).
    Push(push::PushArgs),
    /// Offers of files and their delivery states.
    Offers(push::OffersArgs),
}

#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    #[command(subcommand)]
    pub action: PluginAction,
}

/// Which relay an operator command talks to, and with what credential.
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// Base URL of the relay's HTTP listener.
    #[arg(
        long,
        env = "WASMRELAY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub relay: String,
    /// Admin bearer token; without it, the one the relay stored in
    /// `<data-dir>/admin.token` is used.
    #[arg(
        long,
        env = "WASMRELAY_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// The relay's data directory, where it keeps its generated admin token.
    #[arg(
        long,
        env = "WASMRELAY_DATA_DIR",
        default_value = "wasmrelay-data",
        global = true
    )]
    pub data_dir: PathBuf,
}

impl AdminTarget {
    fn base(&self) -> &str {
        self.relay.trim_end_matches('/')
    }

    /// `--token`, else the relay's stored token, else none (an open relay).
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let path = crate::admin::credential::token_path(&self.data_dir);
        Ok(crate::admin::credential::read_token_file(&path)?)
    }
}

#[derive(Debug, Subcommand)]
pub enum PluginAction {
    /// Show loaded plugins with their versions, call counts and call times.
    List,
    /// Load a plugin (or replace the running version): a component and its manifest.
    Load(PluginFiles),
    /// The same as `load`, for a plugin that is already running: the new
    /// version serves once it has compiled and passed its checks.
    Swap(PluginFiles),
    /// Make the previous version active again.
    Rollback { name: String },
    /// Unload a plugin.
    Remove { name: String },
}

#[derive(Debug, Args)]
pub struct PluginFiles {
    /// The plugin's name (must match the manifest).
    pub name: String,
    /// The component (.wasm, built for wasm32-wasip2).
    #[arg(long)]
    pub wasm: PathBuf,
    /// The manifest; defaults to the .wasm path with a .toml extension.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file; see README.md for every field.
    #[arg(long, env = "WASMRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for HTTP and WebSocket [config: server.listen; default 127.0.0.1:8080].
    #[arg(long, env = "WASMRELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// UDP address for QUIC [config: server.quic_listen; default 127.0.0.1:8443].
    #[arg(long, env = "WASMRELAY_QUIC_LISTEN")]
    pub quic_listen: Option<SocketAddr>,
    /// Do not serve QUIC [config: server.quic = false].
    #[arg(long, env = "WASMRELAY_NO_QUIC")]
    pub no_quic: bool,
    /// TCP address for https and wss [config: server.tls_listen; default 127.0.0.1:8444].
    #[arg(long, env = "WASMRELAY_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// Do not serve https and wss [config: server.tls = false].
    #[arg(long, env = "WASMRELAY_NO_TLS")]
    pub no_tls: bool,
    /// Directory for state that survives restarts [config: server.data_dir].
    #[arg(long, env = "WASMRELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token required by /admin and /metrics [config: admin.token;
    /// default: generated into <data-dir>/admin.token].
    #[arg(long, env = "WASMRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Time in-flight requests get to finish on shutdown [config: server.shutdown_grace_ms].
    #[arg(long, env = "WASMRELAY_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Largest message or HTTP body accepted [config: limits.max_message_bytes].
    #[arg(long, env = "WASMRELAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Heartbeat ping interval [config: heartbeat.interval_ms].
    #[arg(long, env = "WASMRELAY_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a connection is reaped [config: heartbeat.idle_timeout_ms].
    #[arg(long, env = "WASMRELAY_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Default request deadline [config: limits.request_timeout_ms].
    #[arg(long, env = "WASMRELAY_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Join the relays sharing this NATS server [config: cluster.nats_url;
    /// e.g. nats://127.0.0.1:4222].
    #[arg(long, env = "WASMRELAY_CLUSTER")]
    pub cluster: Option<String>,
    /// This node's name in the cluster and in ids [config: server.node].
    #[arg(long, env = "WASMRELAY_NODE")]
    pub node: Option<String>,
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ServeArgs {
    /// The configuration these arguments describe: file (or defaults), then
    /// flag and environment overrides, validated.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(addr) = self.quic_listen {
            config.server.quic_listen = addr;
        }
        if self.no_quic {
            config.server.quic = false;
        }
        if let Some(addr) = self.tls_listen {
            config.server.tls_listen = addr;
        }
        if self.no_tls {
            config.server.tls = false;
        }
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = dir.clone();
        }
        if let Some(url) = &self.cluster {
            config.cluster.nats_url = url.clone();
        }
        if let Some(node) = &self.node {
            config.server.node = node.clone();
        }
        if let Some(token) = &self.admin_token {
            config.admin.token = Some(token.clone());
        }
        if let Some(ms) = self.shutdown_grace_ms {
            config.server.shutdown_grace_ms = ms;
        }
        if let Some(bytes) = self.max_message_bytes {
            config.limits.max_message_bytes = bytes;
        }
        if let Some(ms) = self.heartbeat_ms {
            config.heartbeat.interval_ms = ms;
        }
        if let Some(ms) = self.idle_timeout_ms {
            config.heartbeat.idle_timeout_ms = ms;
        }
        if let Some(ms) = self.request_timeout_ms {
            config.limits.request_timeout_ms = ms;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Entry point of the `wasmrelay` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Conns(args) => conns(args).await,
            Command::Plugin(args) => plugin(args).await,
            Command::Task(args) => task::task(args).await,
            Command::Push(args) => push::push(args).await,
            Command::Offers(args) => push::offers(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "wasmrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    std::fs::create_dir_all(&config.server.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let listeners = Listeners::bind(&config).await?;
    let addr = listeners.http.local_addr()?;
    tracing::info!("relay up: open http://{addr}/ in a browser; WebSocket at ws://{addr}/ws");
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    run(config, listeners, shutdown).await?;
    Ok(())
}

async fn conns(args: ConnsArgs) -> anyhow::Result<()> {
    let base = args.target.base();
    let token = args.target.token()?;
    let connections = get_json(&format!("{base}/admin/connections"), token.as_deref()).await?;
    let stats = get_json(&format!("{base}/admin/stats"), token.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let both = serde_json::json!({ "connections": connections, "stats": stats });
        writeln!(out, "{}", serde_json::to_string_pretty(&both)?)?;
        return Ok(());
    }
    out.write_all(render_table(&connections, &stats).as_bytes())?;
    Ok(())
}

async fn get_json(url: &str, token: Option<&str>) -> anyhow::Result<serde_json::Value> {
    call_json(http::Method::GET, url, token, None).await
}

/// One admin call answered with JSON; `body` is a content type and the
/// bytes to send.
async fn call_json(
    method: http::Method,
    url: &str,
    token: Option<&str>,
    body: Option<(String, Vec<u8>)>,
) -> anyhow::Result<serde_json::Value> {
    let body = call(method, url, token, body).await?;
    serde_json::from_slice(&body).with_context(|| format!("{url} did not return JSON"))
}

/// One admin call; its body when it succeeded. A refusal is reported by
/// its message (and the field it names), not as raw JSON.
async fn call(
    method: http::Method,
    url: &str,
    token: Option<&str>,
    body: Option<(String, Vec<u8>)>,
) -> anyhow::Result<Bytes> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let payload = match body {
        Some((content_type, bytes)) => {
            request = request.header(http::header::CONTENT_TYPE, content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let request = request
        .body(Full::new(payload))
        .with_context(|| format!("invalid URL {url}"))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        bail!(
            "{url} answered 401: give --token, or --data-dir of the relay (it keeps its token in <data-dir>/admin.token)"
        );
    }
    if !status.is_success() {
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let e = &v["error"];
                Some(format!(
                    "{} ({})",
                    e["message"].as_str()?,
                    e["code"].as_str()?
                ))
            });
        match error {
            Some(error) => bail!("{status}: {error}"),
            None => bail!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    Ok(body)
}

async fn plugin(args: PluginArgs) -> anyhow::Result<()> {
    let base = format!("{}/admin/plugins", args.target.base());
    let token = args.target.token()?;
    let token = token.as_deref();
    let mut out = std::io::stdout().lock();
    match args.action {
        PluginAction::List => {
            let list = get_json(&base, token).await?;
            out.write_all(render_plugins(&list).as_bytes())?;
        }
        PluginAction::Load(files) | PluginAction::Swap(files) => {
            let manifest_path = files
                .manifest
                .clone()
                .unwrap_or_else(|| files.wasm.with_extension("toml"));
            let wasm = std::fs::read(&files.wasm)
                .with_context(|| format!("cannot read {}", files.wasm.display()))?;
            let manifest = std::fs::read(&manifest_path)
                .with_context(|| format!("cannot read {}", manifest_path.display()))?;
            let (content_type, body) = multipart(&[("wasm", &wasm), ("manifest", &manifest)]);
            let url = format!("{base}/{}", files.name);
            let report =
                call_json(http::Method::PUT, &url, token, Some((content_type, body))).await?;
            let replaced = report["replaced"]
                .as_str()
                .map(|v| format!(" (replacing {v})"))
                .unwrap_or_default();
            writeln!(
                out,
                "{} {} serving{replaced} after {:.1} ms",
                report["name"].as_str().unwrap_or(""),
                report["version"].as_str().unwrap_or(""),
                report["total_ms"].as_f64().unwrap_or(0.0)
            )?;
        }
        PluginAction::Rollback { name } => {
            let url = format!("{base}/{name}/rollback");
            let report = call_json(http::Method::POST, &url, token, None).await?;
            writeln!(
                out,
                "{name} rolled back to {} (from {})",
                report["version"].as_str().unwrap_or(""),
                report["replaced"].as_str().unwrap_or("")
            )?;
        }
        PluginAction::Remove { name } => {
            call_json(http::Method::DELETE, &format!("{base}/{name}"), token, None).await?;
            writeln!(out, "{name} removed")?;
        }
    }
    Ok(())
}

/// A `multipart/form-data` body; returns its content type and bytes.
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let boundary = format!("wasmrelay-{nanos:x}-{}", std::process::id());
    let mut body = Vec::new();
    for (name, bytes) in parts {
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Formats `GET /admin/plugins` as a table.
pub fn render_plugins(list: &serde_json::Value) -> String {
    let header = [
        "Name", "Role", "Version", "Source", "Calls", "Traps", "P50-us", "P99-us", "Digest",
        "Previous",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let empty = Vec::new();
    for p in list.as_array().unwrap_or(&empty) {
        let text = |key: &str| p[key].as_str().unwrap_or("").to_owned();
        let number = |key: &str| p[key].as_u64().map(|n| n.to_string()).unwrap_or_default();
        let micros = |key: &str| {
            p["call_time"][key]
                .as_f64()
                .map(|us| format!("{us:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        rows.push(vec![
            text("name"),
            text("role"),
            text("version"),
            text("source"),
            number("calls"),
            number("traps"),
            micros("p50_us"),
            micros("p99_us"),
            text("digest").chars().take(12).collect(),
            p["previous"]["version"].as_str().unwrap_or("-").to_owned(),
        ]);
    }
    format_table(&rows)
}

fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Formats the connection table and a summary line, `ss`-style.
pub fn render_table(connections: &serde_json::Value, stats: &serde_json::Value) -> String {
    use serde_json::Value;
    let header = [
        "ID",
        "State",
        "Transport",
        "Local",
        "Peer",
        "Age",
        "Recv-B",
        "Send-B",
        "Msg-In",
        "Msg-Out",
        "Queue",
        "Drop",
        "RTT",
        "Space/Channels",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let empty = Vec::new();
    let list = connections["connections"].as_array().unwrap_or(&empty);
    let num = |v: &Value| v.as_u64().map(|n| n.to_string()).unwrap_or_default();
    let string = |v: &Value| v.as_str().unwrap_or("").to_owned();
    for c in list {
        let mut what: Vec<String> = Vec::new();
        for space in c["spaces"].as_array().unwrap_or(&empty) {
            what.push(format!("space:{}", space.as_str().unwrap_or("")));
        }
        for channel in c["channels"].as_array().unwrap_or(&empty) {
            what.push(format!("#{}", channel.as_str().unwrap_or("")));
        }
        rows.push(vec![
            num(&c["id"]),
            string(&c["state"]),
            string(&c["transport"]),
            string(&c["local"]),
            string(&c["peer"]),
            human_age(c["age_ms"].as_u64().unwrap_or(0)),
            num(&c["bytes_in"]),
            num(&c["bytes_out"]),
            num(&c["msgs_in"]),
            num(&c["msgs_out"]),
            num(&c["queue_depth"]),
            num(&c["dropped"]),
            c["quic"]["rtt_us"]
                .as_u64()
                .map(|us| format!("{:.1}ms", us as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            what.join(","),
        ]);
    }
    let mut out = format_table(&rows);
    let by_state = stats["connections"]["by_state"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "Total: {} ({by_state}); requests pending {}; spaces {} ({} connected); channels {}\n",
        stats["connections"]["total"].as_u64().unwrap_or(0),
        stats["requests"]["pending"].as_u64().unwrap_or(0),
        stats["spaces"].as_u64().unwrap_or(0),
        stats["spaces_connected"].as_u64().unwrap_or(0),
        stats["channels"].as_u64().unwrap_or(0),
    ));
    out
}

fn human_age(ms: u64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{}s", ms / 1_000),
        ms if ms < 3_600_000 => format!("{}m{}s", ms / 60_000, (ms / 1_000) % 60),
        ms => format!("{}h{}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}
