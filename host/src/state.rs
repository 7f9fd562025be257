//! The state every connection of one relay shares — configuration, the
//! connection table, channels, bus, spaces, quotas, plugins, metrics, the
//! shutdown tokens — and the decisions made from it (admission). It sits
//! below `session` and `transport`, which take it as their handle; `relay`
//! above them builds it and runs the listeners.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminCredential;
use crate::bus::{Bus, LocalBus};
use crate::channels::Channels;
use crate::config::Config;
use crate::delivery::queue::Budget;
use crate::delivery::table::ConnTable;
use crate::hooks::{Admission, Filter, Grant, Handshake, Router};
use crate::ids::NodeId;
use crate::metrics::Metrics;
use crate::plugin::bindings::stats;
use crate::plugin::host_api::{FileDrop, HostServices, KvStore, RelayFigures};
use crate::plugin::{Registry, Runtime};
use crate::quota::{ConnQuota, Quotas, Refusal};
use crate::spaces::{Directory, Spaces};
use crate::store::{Store, StoreError};
use crate::tasks::Tasks;
use crate::tasks::files::Refusals;
use crate::transfer::offers::{OfferLimits, Offers};
use crate::transfer::storage::{FileLimits, Storage};

/// The database's file name in the data directory.
pub const STORE_FILE: &str = "wasmrelay.db";

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot start the plugin runtime")]
    PluginRuntime(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    AdminCredential(#[from] crate::admin::credential::CredentialError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the file storage")]
    Files(#[source] std::io::Error),
}

/// State shared by every connection of one relay. Its fields are visible
/// inside the crate only, to the layers above `state` (transports, `relay`);
/// a session gets the narrower [`crate::session::Context`], and users of the
/// library get [`crate::run`].
pub struct Relay {
    /// This node's name in the ids it hands out.
    pub(crate) node: NodeId,
    pub(crate) config: Arc<Config>,
    pub(crate) table: Arc<ConnTable>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) spaces: Arc<Spaces>,
    /// The spaces as the operator API shows them (cluster-wide in a cluster).
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) metrics: Arc<Metrics>,
    /// Loaded plugins; also the admission, router and filter hooks.
    pub(crate) plugins: Arc<Registry>,
    /// Connection caps and rate buckets, enforcing what admission granted.
    pub(crate) quotas: Arc<Quotas>,
    /// The byte budget all outbound queues share.
    pub(crate) budget: Arc<Budget>,
    /// What operator endpoints ask of a caller.
    pub(crate) admin: AdminCredential,
    /// The embedded database (`<data_dir>/wasmrelay.db`).
    pub(crate) store: Store,
    /// Plugin key-value data, live in memory, persisted to `store`.
    pub(crate) kv: Arc<KvStore>,
    /// Uploaded and pushed files.
    pub(crate) files: Arc<Storage>,
    /// Files offered to users, channels and sessions (push).
    pub(crate) offers: Arc<Offers>,
    /// The task manager, set by `relay::run` once the plugins are loaded
    /// (runs need them) and before any listener accepts.
    pub(crate) tasks: OnceLock<Tasks>,
    /// This node's membership, when `cluster.nats_url` is set (joined in
    /// `relay::run` before the relay is built).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The cluster's channel bus (also `bus`), for the membership it follows.
    pub(crate) cluster_bus: Option<Arc<crate::cluster::bus::ClusterBus>>,
    /// Plugin versions shared with the other nodes, in a cluster (set by
    /// `relay::run` before any listener accepts).
    pub(crate) rollout: OnceLock<Arc<crate::rollout::Rollout>>,
    /// Which node holds which user, in a cluster (set by `relay::run`).
    pub(crate) presence: OnceLock<Arc<crate::cluster::presence::Presence>>,
    /// Other nodes' instances and callers, following the registry.
    pub(crate) cluster_spaces: Option<Arc<crate::cluster::spaces::ClusterSpaces>>,
    /// Wall-clock start, for what this node says of itself.
    started_unix_ms: i64,
    /// Files in the task folder refused, as the task API lists them.
    pub(crate) task_file_refusals: Refusals,
    /// Cancelled when shutdown starts: stop accepting, send goaway, refuse new work.
    draining: CancellationToken,
    /// Cancelled when the grace period ends: close every connection.
    closing: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) conn_tasks: TaskTracker,
    started: Instant,
}

impl Relay {
    /// A relay on its own (no cluster).
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        Self::build(config, None)
    }

    /// A relay, joined to `cluster` when given: channels then go through
    /// the cluster's bus, whose tasks run until the token is cancelled.
    pub fn build(
        config: Config,
        cluster: Option<(
            Arc<crate::cluster::Cluster>,
            tokio_util::sync::CancellationToken,
        )>,
    ) -> Result<Arc<Self>, StartError> {
        let admin = crate::admin::credential::resolve(&config)?;
        let metrics = Arc::new(Metrics::new());
        let channels = Arc::new(Channels::new(metrics.clone(), config.channels.clone()));
        let node = NodeId::resolve(&config.server.node);
        let spaces = Arc::new(Spaces::new(
            &config.spaces,
            &config.limits,
            node.clone(),
            metrics.clone(),
        ));
        let table = Arc::new(ConnTable::default());
        let budget = Budget::new(config.limits.outbound_budget_bytes);
        let cluster_bus = cluster.as_ref().map(|(cluster, stop)| {
            crate::cluster::bus::ClusterBus::start(cluster, channels.clone(), stop.clone())
        });
        if let Some(bus) = &cluster_bus {
            // Weak: the bus holds the channels; the channels must not hold it.
            let numbering: Arc<dyn crate::channels::Numbering> = bus.clone();
            channels.set_numbering(Arc::downgrade(&numbering));
        }
        let cluster_spaces = cluster.as_ref().map(|(cluster, stop)| {
            crate::cluster::spaces::ClusterSpaces::start(
                cluster,
                spaces.clone(),
                table.clone(),
                budget.clone(),
                metrics.clone(),
                stop.clone(),
            )
        });
        let directory: Arc<dyn Directory> = match &cluster {
            Some((cluster, _)) => Arc::new(crate::cluster::spaces::ClusterDirectory {
                spaces: spaces.clone(),
                cluster: cluster.clone(),
            }),
            None => spaces.clone(),
        };
        let bus: Arc<dyn Bus> = match &cluster_bus {
            Some(bus) => bus.clone(),
            None => Arc::new(LocalBus::new(channels.clone())),
        };
        let cache_dir = config
            .plugins
            .compile_cache
            .then(|| config.server.data_dir.join(&config.plugins.cache_dir));
        let runtime = Runtime::new(&config.plugins, cache_dir)
            .map_err(|e| StartError::PluginRuntime(e.into_boxed_dyn_error()))?;
        let store = Store::open(&config.server.data_dir.join(STORE_FILE))?;
        let kv = Arc::new(KvStore::default());
        let limits = &config.files;
        let files = Storage::open(
            &config.server.data_dir.join(&limits.dir),
            store.clone(),
            FileLimits {
                max_file_bytes: limits.max_file_bytes,
                user_bytes: limits.user_bytes,
                total_bytes: limits.total_bytes,
                upload_ttl_ms: limits.upload_ttl_ms as i64,
                file_ttl_ms: limits.file_ttl_ms as i64,
                max_uploads_per_user: limits.max_uploads_per_user,
            },
        )
        .map_err(StartError::Files)?;
        let files = Arc::new(files);
        let offers = Arc::new(Offers::new(
            store.clone(),
            files.clone(),
            table.clone(),
            channels.clone(),
            metrics.clone(),
            node.clone(),
            OfferLimits {
                default_ttl_ms: limits.offer_ttl_ms,
                max_ttl_ms: limits.max_offer_ttl_ms,
            },
        ));
        let started = Instant::now();
        let services = HostServices {
            bus: bus.clone(),
            presence: channels.clone(),
            kv: kv.clone(),
            figures: Arc::new(Figures {
                table: table.clone(),
                channels: channels.clone(),
                directory: spaces.clone(),
                metrics: metrics.clone(),
                started,
            }),
            files: Arc::new(RelayFiles {
                files: files.clone(),
                offers: offers.clone(),
                runtime: tokio::runtime::Handle::current(),
            }),
        };
        let plugins = Arc::new(Registry::new(
            runtime,
            services,
            config.plugins.max_memory_bytes,
        ));
        // The active router may decide which new channels keep history.
        let router: Arc<dyn crate::hooks::Router> = plugins.clone();
        channels.set_router(&router);
        Ok(Arc::new(Self {
            directory,
            node,
            bus,
            channels,
            spaces,
            table,
            metrics,
            plugins,
            quotas: Arc::new(Quotas::new(&config.limits)),
            budget,
            admin,
            store,
            kv,
            files,
            offers,
            tasks: OnceLock::new(),
            cluster: cluster.map(|(cluster, _)| cluster),
            cluster_bus,
            cluster_spaces,
            rollout: OnceLock::new(),
            presence: OnceLock::new(),
            started_unix_ms: crate::store::wall_ms(),
            task_file_refusals: Refusals::default(),
            config: Arc::new(config),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            conn_tasks: TaskTracker::new(),
            started,
        }))
    }

    pub fn admission(&self) -> &dyn Admission {
        self.plugins.as_ref()
    }

    /// The policy's verdict alone (HTTP ingress asks it for every request);
    /// a denial is counted.
    pub fn admit_policy(&self, handshake: &Handshake<'_>) -> Result<Option<Grant>, Refusal> {
        crate::quota::admit_policy(self.admission(), &self.metrics, handshake)
    }

    /// What each connection's session gets to use.
    pub fn session_context(&self) -> crate::session::Context {
        crate::session::Context {
            config: self.config.clone(),
            node: self.node.clone(),
            channels: self.channels.clone(),
            bus: self.bus.clone(),
            spaces: self.spaces.clone(),
            quotas: self.quotas.clone(),
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            hooks: self.plugins.clone(),
            draining: self.draining.clone(),
            files: self.files.clone(),
            offers: self.offers.clone(),
        }
    }

    /// Admission for a new connection: the policy's verdict, then the user's
    /// tier cap (the relay-wide and address caps were taken at accept). The
    /// quota holds the user's slot until dropped.
    pub fn admit_connection(
        &self,
        handshake: &Handshake<'_>,
    ) -> Result<(Option<Grant>, ConnQuota), Refusal> {
        let grant = self.admit_policy(handshake)?;
        match self.quotas.open(grant.as_ref()) {
            Ok(quota) => Ok((grant, quota)),
            Err(refusal) => {
                self.metrics.refused(refusal.why);
                Err(refusal)
            }
        }
    }

    pub fn router(&self) -> &dyn Router {
        self.plugins.as_ref()
    }

    pub fn filter(&self) -> &dyn Filter {
        self.plugins.as_ref()
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

    /// Shutdown, first step: stop accepting, send goaway, refuse new work.
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    /// Shutdown, last step: close every connection.
    pub fn start_closing(&self) {
        self.closing.cancel();
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Connections per identified user on this node now.
    pub(crate) fn users_here(&self) -> std::collections::HashMap<String, u64> {
        let mut users = std::collections::HashMap::new();
        for conn in self.table.all() {
            if let Some((user, _)) = conn.identity() {
                *users.entry(user).or_insert(0) += 1;
            }
        }
        users
    }

    /// What this node says of itself in the cluster's registry (and in
    /// `/admin/cluster` when it is alone).
    pub(crate) fn node_info(&self) -> crate::cluster::nodes::NodeInfo {
        crate::cluster::nodes::NodeInfo {
            node: self.node.as_str().to_owned(),
            http: self.config.server.listen.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_unix_ms: self.started_unix_ms,
            connections: self.table.len() as u64,
            epoch: self
                .cluster_bus
                .as_ref()
                .map(|bus| bus.epoch())
                .unwrap_or_default(),
            spaces: self.spaces.local_summary(),
            plugins: self
                .plugins
                .list()
                .into_iter()
                .map(|p| crate::cluster::nodes::PluginVersion {
                    name: p.name,
                    version: p.version,
                    digest: p.digest,
                })
                .collect(),
            plugin_refusals: self
                .rollout
                .get()
                .map(|rollout| rollout.refusals())
                .unwrap_or_default(),
        }
    }
}

/// Where the `transfer` capability puts and offers files: the relay's own
/// storage and offers, run on the relay's runtime while the (blocking)
/// plugin call waits.
struct RelayFiles {
    files: Arc<Storage>,
    offers: Arc<Offers>,
    runtime: tokio::runtime::Handle,
}

impl RelayFiles {
    fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        let (done, answer) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = done.send(work.await);
        });
        crate::plugin::host_api::wait_for(answer, || Err("the relay is stopping".to_owned()))
    }
}

impl FileDrop for RelayFiles {
    fn put(&self, owner: &str, name: &str, data: Vec<u8>) -> Result<String, String> {
        let (files, owner) = (self.files.clone(), owner.to_owned());
        let mut metadata = std::collections::BTreeMap::new();
        if !name.is_empty() {
            metadata.insert("filename".to_owned(), name.to_owned());
        }
        self.run(async move {
            let length = data.len() as u64;
            let file = files
                .create(&owner, length, &metadata)
                .await
                .map_err(|e| e.to_string())?;
            let body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                bytes::Bytes::from(data),
            )]);
            files
                .append(&file.id, 0, None, body)
                .await
                .map_err(|e| e.to_string())?;
            Ok(file.id)
        })
    }

    fn offer(
        &self,
        owner: &str,
        file: &str,
        to: crate::protocol::Target,
        ttl_ms: Option<u64>,
    ) -> Result<String, String> {
        let (files, offers) = (self.files.clone(), self.offers.clone());
        let (owner, file) = (owner.to_owned(), file.to_owned());
        self.run(async move {
            // A task offers only what it put.
            let row = files.info(&file).await.map_err(|e| e.to_string())?;
            if row.owner != owner {
                return Err(format!("no file {file} of {owner}"));
            }
            let (offer, _) = offers
                .offer(&owner, &file, to, ttl_ms)
                .await
                .map_err(|e| e.to_string())?;
            Ok(offer.id)
        })
    }
}

/// What the `stats` capability tells a plugin: this relay's figures.
struct Figures {
    table: Arc<ConnTable>,
    channels: Arc<Channels>,
    directory: Arc<dyn Directory>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl RelayFigures for Figures {
    fn figures(&self) -> stats::Snapshot {
        use std::sync::atomic::Ordering;
        let spaces = self.directory.list();
        let totals = &self.metrics.totals;
        stats::Snapshot {
            connections: self.table.len() as u64,
            channels: self.channels.len() as u64,
            spaces: spaces.len() as u64,
            spaces_connected: spaces.iter().filter(|s| s.connected).count() as u64,
            requests_pending: spaces
                .iter()
                .map(|s| (s.in_flight + s.waiting) as u64)
                .sum(),
            messages_in: totals.msgs_in.load(Ordering::Relaxed),
            messages_out: totals.msgs_out.load(Ordering::Relaxed),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}
