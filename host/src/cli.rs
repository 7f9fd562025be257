//! The `wasmrelay` command line: `serve` runs the relay; `conns` prints a
//! running relay's connection table the way `ss` does.
//!
//! Precedence for settings: flag, then `WASMRELAY_*` environment variable,
//! then the config file, then the built-in default.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
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
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file; see README.md for every field.
    #[arg(long, env = "WASMRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for HTTP and WebSocket [config: server.listen; default 127.0.0.1:8080].
    #[arg(long, env = "WASMRELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for state that survives restarts [config: server.data_dir].
    #[arg(long, env = "WASMRELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token required by /admin and /metrics [config: admin.token].
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
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    /// Base URL of the relay's HTTP listener.
    #[arg(long, env = "WASMRELAY_URL", default_value = "http://127.0.0.1:8080")]
    pub relay: String,
    /// Admin bearer token, when the relay has one.
    #[arg(long, env = "WASMRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = dir.clone();
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
    let listeners = Listeners::bind(&config)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listeners.http.local_addr()?;
    tracing::info!("relay up: open http://{addr}/ in a browser; WebSocket at ws://{addr}/ws");
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    run(config, listeners, shutdown).await?;
    Ok(())
}

async fn conns(args: ConnsArgs) -> anyhow::Result<()> {
    let base = args.relay.trim_end_matches('/');
    let connections = get_json(&format!("{base}/admin/connections"), args.token.as_deref()).await?;
    let stats = get_json(&format!("{base}/admin/stats"), args.token.as_deref()).await?;
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
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(url);
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::new())
        .with_context(|| format!("invalid URL {url}"))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("{url} did not return JSON"))
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
            what.join(","),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
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
