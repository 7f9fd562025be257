//! The relay as a whole: [`Listeners`] and [`run`], which builds the shared
//! state ([`Relay`], in `state`) and serves listeners until told to shut down and then drains
//! gracefully (goaway, in-flight requests finish up to the grace period,
//! WebSockets close with 1001).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::plugin::{Source, bundled};
pub use crate::state::{Relay, StartError};
use crate::tasks::Tasks;
use crate::tasks::clock::Clock;
use crate::tasks::run::PluginExecutor;
use crate::transport;

/// How often pending requests are checked against their deadlines.
const EXPIRY_TICK: Duration = Duration::from_millis(50);
/// How long connections get to close after the grace period before `run` returns.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The sockets `run` serves; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub http: TcpListener,
    /// https and wss.
    pub https: Option<TcpListener>,
    pub quic: Option<quinn::Endpoint>,
    /// The certificate https, wss and QUIC present, reloaded when its files change.
    pub certificates: Option<Arc<transport::tls::Certificates>>,
}

impl Listeners {
    /// Binds TCP, and (when enabled) TCP for https/wss and UDP for QUIC,
    /// loading or generating the TLS certificate under `server.data_dir`.
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let bind_tcp = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })
        };
        let http = bind_tcp(config.server.listen).await?;
        let server = &config.server;
        if !server.quic && !server.tls {
            return Ok(Self {
                http,
                https: None,
                quic: None,
                certificates: None,
            });
        }
        let identity = transport::tls::load_or_create(&config.tls, &server.data_dir)?;
        let https = match server.tls {
            true => Some(bind_tcp(server.tls_listen).await?),
            false => None,
        };
        let quic = match server.quic {
            true => {
                let transport = Arc::new(transport::quic::transport_config(
                    config.idle_timeout(),
                    config.heartbeat_interval(),
                ));
                let quic_config = transport::tls::quic_server_config(&identity, transport.clone())?;
                let endpoint =
                    quinn::Endpoint::server(quic_config, server.quic_listen).map_err(|source| {
                        RunError::Bind {
                            addr: server.quic_listen,
                            source,
                        }
                    })?;
                Some((endpoint, transport))
            }
            false => None,
        };
        let certificates = transport::tls::Certificates::new(
            &identity,
            &config.tls,
            &server.data_dir,
            quic.clone(),
        )?;
        tracing::info!(
            cert = %identity.cert_path.display(),
            sha256 = %identity.fingerprint,
            development = identity.development,
            "TLS certificate (clients: --ca {} or --pin-sha256 {})",
            identity.cert_path.display(),
            identity.fingerprint
        );
        Ok(Self {
            http,
            https,
            quic: quic.map(|(endpoint, _)| endpoint),
            certificates: Some(certificates),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot load bundled plugin {name}")]
    Bundled {
        name: String,
        source: crate::plugin::RegistryError,
    },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
    let mut config = config;
    // Joined before the relay is built: its channels go through the
    // cluster's bus from the first publish. A cluster node needs a name
    // the others can address, so a random one is fixed here.
    let stop_cluster = CancellationToken::new();
    let cluster = if config.cluster.enabled() {
        if config.server.node.is_empty() {
            config.server.node = crate::ids::NodeId::resolve("").as_str().to_owned();
        }
        let cluster = crate::cluster::Cluster::join(&config.cluster, &config.server.node).await?;
        Some((cluster, stop_cluster.clone()))
    } else {
        None
    };
    let relay = Relay::build(config, cluster)?;
    // What plugins stored before the last stop, back before any of them runs.
    let rows = relay
        .store
        .call(|conn| crate::store::kv::load(conn, crate::store::wall_ms()))
        .await
        .map_err(|e| RunError::Start(e.into()))?;
    relay.kv.restore(rows);
    // Persisted channel history, with its epochs, before any client subscribes.
    crate::channels::persist::restore(&relay.channels, &relay.store)
        .await
        .map_err(|e| RunError::Start(e.into()))?;
    let stop_persisting = CancellationToken::new();
    let kv_persister = tokio::spawn(crate::plugin::kv::persist(
        relay.kv.clone(),
        relay.store.clone(),
        stop_persisting.clone(),
    ));
    let history_persister = tokio::spawn(crate::channels::persist::persist(
        relay.channels.clone(),
        relay.store.clone(),
        stop_persisting.clone(),
    ));
    for name in &relay.config.plugins.bundled {
        let plugin = bundled::find(name).expect("validated by Config::validate");
        let manifest =
            with_allowed_hosts(plugin.manifest, relay.config.plugins.allow_hosts.get(name));
        relay
            .plugins
            .load(name, plugin.wasm.into(), &manifest, Source::Bundled)
            .await
            .map_err(|source| RunError::Bundled {
                name: name.clone(),
                source,
            })?;
    }
    restore_uploads(&relay).await?;
    // In a cluster: the plugin versions every node runs, from the first
    // (a node joining later loads the current set here).
    if let Some(cluster) = &relay.cluster {
        let rollout = crate::rollout::Rollout::open(cluster).await?;
        let _ = relay.rollout.set(rollout.clone());
        tokio::spawn(crate::rollout::follow(
            rollout,
            relay.plugins.clone(),
            relay.store.clone(),
            stop_cluster.clone(),
        ));
    }
    // After the plugins, which runs call; before the listeners, which the
    // task API answers on.
    let stop_tasks = CancellationToken::new();
    // In a cluster every node knows the tasks and one fires each slot.
    let peers = match &relay.cluster {
        Some(cluster) => Some(crate::tasks::shared::ClusterPeers::open(cluster).await?),
        None => None,
    };
    let (tasks, task_manager) = Tasks::start(
        relay.store.clone(),
        Arc::new(PluginExecutor {
            registry: relay.plugins.clone(),
        }),
        &relay.config.tasks,
        Clock::system(),
        peers
            .clone()
            .map(|peers| peers as Arc<dyn crate::tasks::shared::Peers>),
        stop_tasks.clone(),
    )
    .await
    .map_err(|e| RunError::Start(e.into()))?;
    let _ = relay.tasks.set(tasks.clone());
    if let (Some(peers), Some(cluster)) = (peers, &relay.cluster) {
        tokio::spawn(crate::tasks::shared::follow(
            peers.clone(),
            tasks.clone(),
            stop_tasks.clone(),
        ));
        tokio::spawn(crate::tasks::shared::take_over(
            peers,
            cluster.clone(),
            tasks.clone(),
            Duration::from_millis(relay.config.cluster.heartbeat_ms),
            stop_tasks.clone(),
        ));
    }
    let task_folder = relay
        .config
        .tasks
        .watched_dir(&relay.config.server.data_dir)
        .map(|dir| {
            tokio::spawn(crate::tasks::files::watch(
                tasks,
                dir,
                Duration::from_millis(relay.config.tasks.watch_interval_ms),
                relay.task_file_refusals.clone(),
                relay.draining().clone(),
            ))
        });
    // In the registry before anyone can connect here.
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = if let Some(cluster) = relay.cluster.clone() {
        // Weak: the heartbeat must not keep a stopped relay alive.
        let me = Arc::downgrade(&relay);
        let describe = move || me.upgrade().map(|relay| relay.node_info());
        // The first entry before anything else, so a node that says it
        // started is in the registry.
        cluster.nodes.renew(&relay.node_info()).await?;
        // Owners and other nodes' spaces as the others see them before any
        // client publishes or calls here.
        cluster
            .refresh(
                relay.cluster_bus.as_deref(),
                relay.cluster_spaces.as_deref(),
            )
            .await;
        tokio::spawn(crate::cluster::follow(
            cluster.clone(),
            relay.cluster_bus.clone(),
            relay.cluster_spaces.clone(),
            Duration::from_millis(relay.config.cluster.heartbeat_ms),
            stop_cluster.clone(),
        ));
        let presence = Arc::new(
            crate::cluster::presence::Presence::open(
                &cluster,
                Duration::from_millis(relay.config.cluster.heartbeat_ms),
            )
            .await?,
        );
        let _ = relay.presence.set(presence.clone());
        tokio::spawn(follow_users(
            Arc::downgrade(&relay),
            presence,
            Duration::from_millis(relay.config.cluster.heartbeat_ms),
            stop_heartbeat.clone(),
        ));
        Some(tokio::spawn(crate::cluster::nodes::heartbeat(
            cluster,
            describe,
            Duration::from_millis(relay.config.cluster.heartbeat_ms),
            stop_heartbeat.clone(),
        )))
    } else {
        None
    };
    // Before the listeners: a user who connects is told of offers made
    // while the relay was down.
    if let Err(e) = relay.offers.refresh().await {
        tracing::warn!(error = %e, "open offers not read; users are told of them after the next sweep");
    }
    tracing::info!(
        addr = %listeners.http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "listening for HTTP and WebSocket"
    );

    let accept = tokio::spawn(transport::http::accept_loop(
        relay.clone(),
        listeners.http,
        None,
    ));
    let https_accept = match (listeners.https, &listeners.certificates) {
        (Some(listener), Some(certificates)) => {
            tracing::info!(
                addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "listening for https and wss"
            );
            Some(tokio::spawn(transport::http::accept_loop(
                relay.clone(),
                listener,
                Some(certificates.clone()),
            )))
        }
        _ => None,
    };
    if let Some(certificates) = &listeners.certificates {
        tokio::spawn(certificates.clone().watch(relay.draining().clone()));
    }
    let quic_endpoint = listeners.quic.clone();
    let quic_accept = listeners.quic.map(|endpoint| {
        tracing::info!(
            addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "listening for QUIC"
        );
        tokio::spawn(transport::quic::accept_loop(relay.clone(), endpoint))
    });
    let expiry = tokio::spawn(housekeeping(relay.clone()));
    let file_expiry = tokio::spawn(expire_files(relay.files.clone(), relay.offers.clone()));
    let watcher = relay
        .config
        .plugins
        .watched_dir(&relay.config.server.data_dir)
        .map(|dir| {
            tokio::spawn(crate::plugin::watch::watch(
                relay.plugins.clone(),
                dir,
                Duration::from_millis(relay.config.plugins.watch_interval_ms),
                relay.draining().clone(),
            ))
        });

    shutdown.cancelled().await;
    let grace = relay.config.shutdown_grace();
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        pending = relay.spaces.pending_count(),
        "shutting down: draining"
    );
    relay.start_draining();
    let _ = accept.await;
    if let Some(https_accept) = https_accept {
        let _ = https_accept.await;
    }
    if let Some(quic_accept) = quic_accept {
        let _ = quic_accept.await;
    }

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

    relay.start_closing();
    relay.conn_tasks.close();
    if tokio::time::timeout(CLOSE_WAIT, relay.conn_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = relay.conn_tasks.len(),
            "connections still closing; exiting anyway"
        );
    }
    // Closing a QUIC connection only queues CONNECTION_CLOSE; without this the
    // process can exit before it is sent and clients wait for their idle timeout.
    if let Some(endpoint) = quic_endpoint {
        let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    }
    expiry.abort();
    file_expiry.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some(task_folder) = task_folder {
        task_folder.abort();
    }
    // Out of the registry once nothing is served here any more.
    stop_heartbeat.cancel();
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.await;
    }
    stop_cluster.cancel();
    // Runs still going are stopped (`cancelled`) and the history written out.
    stop_tasks.cancel();
    let _ = task_manager.await;
    // Last: what plugins wrote up to the end reaches the store.
    stop_persisting.cancel();
    let _ = kv_persister.await;
    let _ = history_persister.await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Writes which users are connected here to the cluster's presence bucket
/// every `every` until `stop`, then removes this node's entries.
async fn follow_users(
    relay: std::sync::Weak<Relay>,
    presence: Arc<crate::cluster::presence::Presence>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut beat = crate::cluster::Beat::new(every, stop);
    let mut failing = false;
    while beat.next().await {
        let Some(users) = relay.upgrade().map(|relay| relay.users_here()) else {
            break;
        };
        match presence.publish(users).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "users connected here not written to the cluster's presence");
            }
            Err(_) => {}
        }
    }
    presence.leave().await;
}

/// A bundled manifest with the operator's `plugins.allow_hosts` added.
fn with_allowed_hosts(manifest: &str, extra: Option<&Vec<String>>) -> String {
    let Some(extra) = extra.filter(|hosts| !hosts.is_empty()) else {
        return manifest.to_owned();
    };
    let Ok(mut table) = manifest.parse::<toml::Table>() else {
        // Bundled manifests parse; loading reports it if one ever does not.
        return manifest.to_owned();
    };
    let hosts = table
        .entry("allow_hosts")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    if let toml::Value::Array(hosts) = hosts {
        hosts.extend(extra.iter().cloned().map(toml::Value::String));
    }
    toml::to_string(&table).unwrap_or_else(|_| manifest.to_owned())
}

/// Loads the plugins uploaded before the last stop, each one's previous
/// version first so a rollback still returns to it. One that no longer loads
/// (a newer relay refusing it) is skipped with a warning.
async fn restore_uploads(relay: &Relay) -> Result<(), RunError> {
    let saved = relay
        .store
        .call(crate::store::plugins::all)
        .await
        .map_err(|e| RunError::Start(e.into()))?;
    for plugin in saved {
        for version in plugin
            .previous
            .iter()
            .chain(std::iter::once(&plugin.active))
        {
            let wasm = bytes::Bytes::from(version.wasm.clone());
            match relay
                .plugins
                .load(&plugin.name, wasm, &version.manifest, Source::Admin)
                .await
            {
                Ok(report) => {
                    tracing::info!(plugin = %plugin.name, version = %report.version, "uploaded plugin restored")
                }
                Err(e) => {
                    tracing::warn!(plugin = %plugin.name, error = %e, "a stored plugin no longer loads; skipped")
                }
            }
        }
    }
    Ok(())
}

/// Removes abandoned uploads and files past their time, once a minute.
async fn expire_files(
    files: Arc<crate::transfer::storage::Storage>,
    offers: Arc<crate::transfer::offers::Offers>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match offers.expire().await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "offers expired"),
            Err(e) => tracing::warn!(error = %e, "offers not expired"),
        }
        match files.expire().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "expired files removed"),
            Err(e) => tracing::warn!(error = %e, "expired files not removed"),
        }
    }
}

/// Expires requests past their deadline; now and then forgets idle users' buckets.
async fn housekeeping(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Forgotten users' buckets are swept far less often than requests expire.
    const SWEEP_EVERY: u32 = 100;
    let mut sweep_due = SWEEP_EVERY;
    // Channel histories once a second.
    const HISTORY_EVERY: u32 = 20;
    let mut history_due = HISTORY_EVERY;
    loop {
        tick.tick().await;
        let expired = relay.spaces.expire(tokio::time::Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "requests timed out");
        }
        history_due -= 1;
        if history_due == 0 {
            history_due = HISTORY_EVERY;
            relay.channels.sweep();
        }
        sweep_due -= 1;
        if sweep_due == 0 {
            sweep_due = SWEEP_EVERY;
            relay.quotas.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_add_hosts_to_a_bundled_manifest() {
        let probe = bundled::find("http-probe").unwrap();
        let extra = vec!["status.example.com".to_owned()];
        let manifest = crate::plugin::manifest::Manifest::from_toml(&with_allowed_hosts(
            probe.manifest,
            Some(&extra),
        ))
        .unwrap();
        assert_eq!(
            manifest.allow_hosts,
            ["127.0.0.1", "localhost", "status.example.com"]
        );
    }

    /// Nothing the relay's parts hold on to each other may keep it alive
    /// once its owner lets go: a cycle keeps the store's thread, the
    /// plugin engine's ticker and every file they hold open for good.
    #[tokio::test]
    async fn a_relay_is_freed_when_its_last_handle_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_owned();
        config.admin.token = Some("test-token-for-the-drop-test".into());
        let relay = Relay::new(config).unwrap();
        let weak = Arc::downgrade(&relay);
        let channels = Arc::downgrade(&relay.channels);
        let plugins = Arc::downgrade(&relay.plugins);
        let offers = Arc::downgrade(&relay.offers);
        drop(relay);
        assert!(weak.upgrade().is_none(), "something holds the relay");
        assert!(channels.upgrade().is_none(), "something holds the channels");
        assert!(plugins.upgrade().is_none(), "something holds the plugins");
        assert!(offers.upgrade().is_none(), "something holds the offers");
    }
}
