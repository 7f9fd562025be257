//! The relay as a whole: the shared state every connection task sees, and
//! [`run`], which serves listeners until told to shut down and then drains
//! gracefully (goaway, in-flight requests finish up to the grace period,
//! WebSockets close with 1001).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, LocalBus};
use crate::channels::Channels;
use crate::config::{Config, ConfigError};
use crate::hooks::{Admission, OpenDoor, Router};
use crate::metrics::Metrics;
use crate::session::table::ConnTable;
use crate::spaces::Spaces;
use crate::transport;

/// How often pending requests are checked against their deadlines.
const EXPIRY_TICK: Duration = Duration::from_millis(50);
/// How long connections get to close after the grace period before `run` returns.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// State shared by every connection of one relay.
pub struct Relay {
    pub config: Arc<Config>,
    pub table: Arc<ConnTable>,
    pub channels: Arc<Channels>,
    pub bus: Arc<dyn Bus>,
    pub spaces: Arc<Spaces>,
    pub metrics: Arc<Metrics>,
    admission: Arc<dyn Admission>,
    router: Arc<dyn Router>,
    /// Cancelled when shutdown starts: stop accepting, send goaway, refuse new work.
    draining: CancellationToken,
    /// Cancelled when the grace period ends: close every connection.
    closing: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    started: Instant,
}

/// The sockets `run` serves; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            http: TcpListener::bind(config.server.listen).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Relay {
    pub fn new(config: Config) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new());
        let channels = Arc::new(Channels::new(metrics.clone()));
        let spaces = Arc::new(Spaces::new(&config.spaces, &config.limits, metrics.clone()));
        Arc::new(Self {
            bus: Arc::new(LocalBus::new(channels.clone())),
            channels,
            spaces,
            table: Arc::new(ConnTable::default()),
            metrics,
            admission: Arc::new(OpenDoor),
            router: Arc::new(OpenDoor),
            config: Arc::new(config),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: Instant::now(),
        })
    }

    pub fn admission(&self) -> &dyn Admission {
        self.admission.as_ref()
    }

    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Validates `config`, serves `listeners` until `shutdown` is cancelled, then
/// shuts down gracefully. Returns when every connection has closed.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    std::fs::create_dir_all(&config.server.data_dir).map_err(|source| RunError::DataDir {
        path: config.server.data_dir.clone(),
        source,
    })?;
    let relay = Relay::new(config);
    tracing::info!(
        addr = %listeners.http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "listening for HTTP and WebSocket"
    );

    let accept = tokio::spawn(transport::http::accept_loop(relay.clone(), listeners.http));
    let expiry = tokio::spawn(expire_requests(relay.clone()));

    shutdown.cancelled().await;
    let grace = relay.config.shutdown_grace();
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        pending = relay.spaces.pending_count(),
        "shutting down: draining"
    );
    relay.draining.cancel();
    let _ = accept.await;

    let deadline = Instant::now() + grace;
    while relay.spaces.pending_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unfinished = relay.spaces.pending_count();
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "grace period over with requests still in flight"
        );
    }

    relay.closing.cancel();
    relay.tasks.close();
    if tokio::time::timeout(CLOSE_WAIT, relay.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = relay.tasks.len(),
            "connections still closing; exiting anyway"
        );
    }
    expiry.abort();
    tracing::info!("shutdown complete");
    Ok(())
}

async fn expire_requests(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let expired = relay.spaces.expire(Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "requests timed out");
        }
    }
}
