//! The plugin registry: which plugin versions are loaded, which one serves
//! each role, and hot swap. A load or swap compiles and checks the new version
//! off the async threads, then switches atomically (arc-swap): calls already
//! running finish on the version they started with, and the previous version
//! is kept for rollback.
//!
//! The registry is also what the relay's hooks call: it implements
//! [`Admission`], [`Router`] and [`Filter`] by asking the active policy,
//! router and filter plugins, and lets everything through when a role has
//! no plugin.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use serde::Serialize;

use super::bindings::types::{
    Admission, ChannelHistory as WitChannelHistory, Decision, Handshake as WitHandshake,
    RequestInfo, Verdict,
};
use super::host_api::HostServices;
use super::loaded::{CallError, LoadedPlugin, Percentiles, Source};
use super::manifest::{Capability, Manifest, ManifestError, Role};
use super::runtime::{LoadError, Runtime};
use crate::hooks::{
    Admission as AdmissionHook, Admit, ChannelHistory, FileAction, FileSubject, Filter, Filtered,
    Grant, Handshake, MayRegister, Route, RouteInput, Router,
};
use crate::protocol::{Data, ErrorCode};

struct Slot {
    active: Arc<LoadedPlugin>,
    previous: Option<Arc<LoadedPlugin>>,
}

pub struct Registry {
    runtime: Arc<Runtime>,
    services: HostServices,
    max_memory_bytes: u64,
    slots: Mutex<BTreeMap<String, Slot>>,
    /// The plugin folder's refused files, by plugin name.
    folder_refusals: Mutex<BTreeMap<String, String>>,
    router: ArcSwapOption<LoadedPlugin>,
    policy: ArcSwapOption<LoadedPlugin>,
    filters: ArcSwap<Vec<Arc<LoadedPlugin>>>,
}

/// What a load, swap or rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    pub name: String,
    pub role: Role,
    pub version: String,
    pub digest: String,
    /// The version it replaced, if any.
    pub replaced: Option<String>,
    /// Compile, link, type-check, instantiate and self-check.
    pub prepare_ms: f64,
    /// From the request to the new version serving.
    pub total_ms: f64,
}

/// A registry refusal that is not about the plugin's bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("no plugin named {0:?} is loaded")]
    NotFound(String),
    #[error("plugin {0:?} has no previous version to roll back to")]
    NoPrevious(String),
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl RegistryError {
    pub fn http_status(&self) -> u16 {
        match self {
            RegistryError::NotFound(_) => 404,
            RegistryError::NoPrevious(_) => 409,
            RegistryError::Load(e) => e.http_status(),
        }
    }
}

/// One plugin as `GET /admin/plugins` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub role: Role,
    pub version: String,
    pub digest: String,
    pub state: &'static str,
    pub source: Source,
    pub loaded_unix_ms: u64,
    pub capabilities: Vec<Capability>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    pub calls: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub out_of_memory: u64,
    pub call_time: Option<Percentiles>,
    pub previous: Option<PreviousInfo>,
    /// Why the plugin folder's current files for this name were refused
    /// (the active version keeps serving); gone once they load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folder_refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreviousInfo {
    pub version: String,
    pub digest: String,
}

impl Registry {
    pub fn new(runtime: Arc<Runtime>, services: HostServices, max_memory_bytes: u64) -> Self {
        Self {
            runtime,
            services,
            max_memory_bytes,
            slots: Mutex::new(BTreeMap::new()),
            folder_refusals: Mutex::new(BTreeMap::new()),
            router: ArcSwapOption::empty(),
            policy: ArcSwapOption::empty(),
            filters: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Loads `bytes` as plugin `name` (replacing the running version, if any).
    pub async fn load(
        &self,
        name: &str,
        bytes: Bytes,
        manifest_toml: &str,
        source: Source,
    ) -> Result<SwapReport, RegistryError> {
        let started = Instant::now();
        let manifest = Manifest::from_toml(manifest_toml).map_err(LoadError::from)?;
        if manifest.name != name {
            return Err(LoadError::Manifest(ManifestError(format!(
                "name: the manifest says {:?} but it is being loaded as {name:?}",
                manifest.name
            )))
            .into());
        }
        manifest
            .validate(self.max_memory_bytes)
            .map_err(LoadError::from)?;
        self.check_role_free(&manifest)?;
        let runtime = self.runtime.clone();
        let services = self.services.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            LoadedPlugin::prepare(&runtime, &bytes, manifest, services, source)
        })
        .await
        .map_err(|e| LoadError::Instantiate(format!("preparing the plugin panicked: {e}")))??;
        let prepare_ms = started.elapsed().as_secs_f64() * 1000.0;
        let plugin = Arc::new(prepared);
        let replaced = self.install(plugin.clone())?;
        let report = SwapReport {
            name: plugin.name().to_owned(),
            role: plugin.role(),
            version: plugin.manifest.version.clone(),
            digest: plugin.digest.clone(),
            replaced: replaced.map(|p| p.manifest.version.clone()),
            prepare_ms,
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(
            plugin = %report.name,
            version = %report.version,
            replaced = ?report.replaced,
            total_ms = report.total_ms,
            "plugin serving"
        );
        Ok(report)
    }

    /// Router and policy are single roles: one plugin each. This is an
    /// early answer, before the costly compile; `install` decides.
    fn check_role_free(&self, manifest: &Manifest) -> Result<(), LoadError> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        role_free(&slots, manifest)
    }

    /// Makes `plugin` the active version of its name; returns the one it replaced.
    fn install(&self, plugin: Arc<LoadedPlugin>) -> Result<Option<Arc<LoadedPlugin>>, LoadError> {
        // Checked and taken under one lock: two routers loading at once
        // cannot both find the role free.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        role_free(&slots, &plugin.manifest)?;
        let replaced = slots.remove(plugin.name()).map(|slot| slot.active);
        slots.insert(
            plugin.name().to_owned(),
            Slot {
                active: plugin,
                previous: replaced.clone(),
            },
        );
        self.publish_roles(&slots);
        Ok(replaced)
    }

    /// Makes the previous version active again (and the current one previous).
    pub fn rollback(&self, name: &str) -> Result<SwapReport, RegistryError> {
        let started = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let previous = slot
            .previous
            .take()
            .ok_or_else(|| RegistryError::NoPrevious(name.to_owned()))?;
        let current = std::mem::replace(&mut slot.active, previous);
        slot.previous = Some(current.clone());
        let active = slot.active.clone();
        self.publish_roles(&slots);
        tracing::info!(plugin = name, version = %active.manifest.version, "plugin rolled back");
        Ok(SwapReport {
            name: name.to_owned(),
            role: active.role(),
            version: active.manifest.version.clone(),
            digest: active.digest.clone(),
            replaced: Some(current.manifest.version.clone()),
            prepare_ms: 0.0,
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Unloads a plugin; its role falls back to letting everything through.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        self.publish_roles(&slots);
        drop(slots);
        self.services.kv.clear(name);
        tracing::info!(plugin = name, "plugin removed");
        Ok(())
    }

    /// The active version of `name` when it is a task plugin: what a
    /// task's run calls. A run holds it to the end, whatever swaps meanwhile.
    pub fn task(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(name)
            .filter(|slot| slot.active.role() == Role::Task)
            .map(|slot| slot.active.clone())
    }

    /// The names of the loaded task plugins.
    pub fn task_names(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, slot)| slot.active.role() == Role::Task)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn source_of(&self, name: &str) -> Option<Source> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(name).map(|slot| slot.active.source)
    }

    /// Remembers why the plugin folder's files for `name` were refused
    /// (`None`: they loaded), for the operator API.
    pub fn set_folder_refusal(&self, name: &str, refusal: Option<String>) {
        let mut refusals = self
            .folder_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match refusal {
            Some(reason) => refusals.insert(name.to_owned(), reason),
            None => refusals.remove(name),
        };
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        use std::sync::atomic::Ordering::Relaxed;
        let refusals = self
            .folder_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .map(|(name, slot)| {
                let p = &slot.active;
                PluginInfo {
                    name: name.clone(),
                    role: p.role(),
                    version: p.manifest.version.clone(),
                    digest: p.digest.clone(),
                    state: "active",
                    source: p.source,
                    loaded_unix_ms: p.loaded_unix_ms,
                    capabilities: p.manifest.capabilities.iter().copied().collect(),
                    channels: p.manifest.channels.clone(),
                    calls: p.stats.calls.load(Relaxed),
                    traps: p.stats.traps.load(Relaxed),
                    timeouts: p.stats.timeouts.load(Relaxed),
                    out_of_memory: p.stats.out_of_memory.load(Relaxed),
                    call_time: p.stats.percentiles(),
                    previous: slot.previous.as_ref().map(|prev| PreviousInfo {
                        version: prev.manifest.version.clone(),
                        digest: prev.digest.clone(),
                    }),
                    folder_refusal: refusals.get(name).cloned(),
                }
            })
            .collect()
    }

    /// Points the role hooks at the active versions. Called under the slots
    /// lock, so role views always change in the order loads commit.
    fn publish_roles(&self, slots: &BTreeMap<String, Slot>) {
        let of_role = |role: Role| {
            slots
                .values()
                .filter(move |slot| slot.active.role() == role)
                .map(|slot| slot.active.clone())
        };
        self.router.store(of_role(Role::Router).next());
        self.policy.store(of_role(Role::Policy).next());
        self.filters
            .store(Arc::new(of_role(Role::Filter).collect()));
    }
}

/// Whether `manifest` may take its role: router and policy are held by one
/// plugin at a time (another version of the same name may replace itself).
fn role_free(slots: &BTreeMap<String, Slot>, manifest: &Manifest) -> Result<(), LoadError> {
    if !matches!(manifest.role, Role::Router | Role::Policy) {
        return Ok(());
    }
    match slots
        .iter()
        .find(|(name, slot)| **name != manifest.name && slot.active.role() == manifest.role)
    {
        Some((holder, _)) => Err(LoadError::Conflict(format!(
            "the {} role is held by plugin {holder:?}; swap or remove it first",
            manifest.role.as_str()
        ))),
        None => Ok(()),
    }
}

fn error_code(code: &str) -> ErrorCode {
    serde_json::from_value(serde_json::Value::String(code.to_owned()))
        .unwrap_or(ErrorCode::Rejected)
}

fn failure(plugin: &LoadedPlugin, error: impl std::fmt::Display) -> String {
    format!(
        "{} plugin {}@{} {error}",
        plugin.role().as_str(),
        plugin.name(),
        plugin.manifest.version
    )
}

impl Router for Registry {
    fn route(&self, input: &RouteInput<'_>) -> Route {
        let Some(plugin) = self.router.load_full() else {
            return Route::Pass;
        };
        let decision = match input {
            RouteInput::Publish { channel } => plugin.route_publish(channel),
            RouteInput::Request {
                space,
                method,
                path,
                headers,
            } => plugin.route_request(&RequestInfo {
                space: (*space).to_owned(),
                method: (*method).to_owned(),
                path: (*path).to_owned(),
                headers: headers.to_vec(),
            }),
        };
        match decision {
            Ok(Decision::Pass) => Route::Pass,
            Ok(Decision::Rewrite(target)) => Route::Rewrite { target },
            Ok(Decision::Reject(rejection)) => Route::Reject {
                code: error_code(&rejection.code),
                reason: rejection.reason,
            },
            Err(e) => Route::Reject {
                code: ErrorCode::PluginFailed,
                reason: failure(&plugin, e),
            },
        }
    }

    fn channel_history(
        &self,
        channel: &str,
        configured: Option<ChannelHistory>,
    ) -> Option<ChannelHistory> {
        let Some(plugin) = self.router.load_full().filter(|p| p.decides_history()) else {
            return configured;
        };
        let asked = configured.map(|c| WitChannelHistory {
            size: u32::try_from(c.size).unwrap_or(u32::MAX),
            ttl_ms: c.ttl_ms,
            persist: c.persist,
        });
        match plugin.channel_history(channel, asked) {
            Ok(decided) => decided.map(|d| ChannelHistory {
                size: d.size as usize,
                ttl_ms: d.ttl_ms,
                persist: d.persist,
            }),
            Err(e) => {
                tracing::warn!(channel, error = %failure(&plugin, e), "channel-history failed; the configuration decides");
                configured
            }
        }
    }
}

impl AdmissionHook for Registry {
    fn admit(&self, handshake: &Handshake<'_>) -> Admit {
        let Some(plugin) = self.policy.load_full() else {
            return Admit::Allow(None);
        };
        let request = WitHandshake {
            peer: handshake.peer.to_string(),
            path: handshake.path.to_owned(),
            query: handshake.query.to_owned(),
            headers: handshake
                .headers
                .iter()
                .filter_map(|(n, v)| {
                    v.to_str()
                        .ok()
                        .map(|v| (n.as_str().to_owned(), v.to_owned()))
                })
                .collect(),
        };
        match plugin.admit(&request) {
            Ok(Admission::Allow(grant)) => Admit::Allow(Some(Grant {
                user: grant.user,
                tier: grant.tier,
                limits: Some(tier_limits(grant.limits)),
            })),
            Ok(Admission::Deny(denial)) => Admit::Deny {
                status: denial.status,
                code: error_code(&denial.code),
                reason: denial.reason,
            },
            // Fail closed: a broken policy must not let everyone in.
            Err(e) => Admit::Deny {
                status: 503,
                code: ErrorCode::PluginFailed,
                reason: failure(&plugin, e),
            },
        }
    }

    fn may_transfer(
        &self,
        user: &str,
        tier: &str,
        action: FileAction,
        file: &FileSubject<'_>,
    ) -> MayRegister {
        use super::bindings::types::{FileInfo, TransferAction};
        let Some(plugin) = self.policy.load_full() else {
            return MayRegister::Undecided;
        };
        if !plugin.decides_transfers() {
            return MayRegister::Undecided;
        }
        let action = match action {
            FileAction::Upload => TransferAction::Upload,
            FileAction::Download => TransferAction::Download,
            FileAction::Push => TransferAction::Push,
        };
        let info = FileInfo {
            id: file.id.to_owned(),
            owner: file.owner.to_owned(),
            name: file.name.to_owned(),
            size: file.size,
        };
        policy_answer(&plugin, plugin.may_transfer(user, tier, action, &info))
    }

    fn may_register(&self, user: &str, tier: &str, space: &str) -> MayRegister {
        let Some(plugin) = self.policy.load_full() else {
            return MayRegister::Undecided;
        };
        if !plugin.decides_registration() {
            return MayRegister::Undecided;
        }
        policy_answer(&plugin, plugin.may_register(user, tier, space))
    }
}

/// A policy's yes or no (on a registration or a transfer) as the hook's
/// answer; a failed call refuses, as admission does (fail closed).
fn policy_answer(
    plugin: &LoadedPlugin,
    answer: Result<Result<(), super::bindings::types::Rejection>, CallError>,
) -> MayRegister {
    match answer {
        Ok(Ok(())) => MayRegister::Allow,
        Ok(Err(rejection)) => MayRegister::Refuse {
            code: error_code(&rejection.code),
            reason: rejection.reason,
        },
        Err(e) => MayRegister::Refuse {
            code: ErrorCode::PluginFailed,
            reason: failure(plugin, e),
        },
    }
}

fn tier_limits(limits: super::bindings::types::Limits) -> crate::quota::TierLimits {
    let rate = |r: super::bindings::types::Rate| crate::rate::Rate {
        per_second: r.per_second,
        burst: r.burst,
    };
    crate::quota::TierLimits {
        max_connections: limits.max_connections,
        messages: rate(limits.messages),
        classes: limits
            .classes
            .into_iter()
            .map(|c| (c.name, rate(c.rate)))
            .collect(),
    }
}

impl Filter for Registry {
    fn filter(&self, channel: &str, data: Data) -> Filtered {
        let filters = self.filters.load();
        let mut data = data;
        for plugin in filters
            .iter()
            .filter(|p| p.manifest.covers_channel(channel))
        {
            match plugin.on_message(channel, data.as_bytes()) {
                Ok(Verdict::Keep) => {}
                Ok(Verdict::Replace(bytes)) => data = Data::from(bytes),
                Ok(Verdict::Drop(reason)) => {
                    return Filtered::Drop {
                        code: ErrorCode::Rejected,
                        reason: format!("filter {}: {reason}", plugin.name()),
                    };
                }
                Err(e) => {
                    return Filtered::Drop {
                        code: ErrorCode::PluginFailed,
                        reason: failure(plugin, e),
                    };
                }
            }
        }
        Filtered::Deliver(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::LocalBus;
    use crate::channels::Channels;
    use crate::metrics::Metrics;
    use crate::plugin::bundled;
    use crate::plugin::host_api::KvStore;

    fn registry() -> Arc<Registry> {
        let channels = Arc::new(Channels::new(Arc::new(Metrics::new()), Default::default()));
        let services = HostServices {
            bus: Arc::new(LocalBus::new(channels.clone())),
            presence: channels.clone(),
            kv: Arc::new(KvStore::default()),
            figures: Arc::new(crate::plugin::host_api::NoRelay),
            files: Arc::new(crate::plugin::host_api::NoRelay),
        };
        let runtime = Runtime::new(&Default::default(), None).expect("runtime");
        Arc::new(Registry::new(runtime, services, 64 << 20))
    }

    async fn load_bundled(registry: &Registry, name: &str) {
        let plugin = bundled::find(name).unwrap();
        registry
            .load(
                name,
                Bytes::from_static(plugin.wasm),
                plugin.manifest,
                Source::Bundled,
            )
            .await
            .unwrap();
    }

    fn router_manifest(name: &str) -> String {
        let bundled = bundled::find("path-router").unwrap();
        bundled
            .manifest
            .replace("name = \"path-router\"", &format!("name = \"{name}\""))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_routers_loading_at_once_cannot_both_take_the_role() {
        let registry = registry();
        let wasm = Bytes::from_static(bundled::find("path-router").unwrap().wasm);
        let load = |name: &'static str| {
            let registry = registry.clone();
            let wasm = wasm.clone();
            tokio::spawn(async move {
                registry
                    .load(name, wasm, &router_manifest(name), Source::Admin)
                    .await
            })
        };
        let (a, b) = (load("router-a"), load("router-b"));
        let results = [a.await.unwrap(), b.await.unwrap()];
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "exactly one router takes the role: {results:?}");
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(refused, RegistryError::Load(LoadError::Conflict(_))),
            "{refused:?}"
        );
        let routers = registry
            .list()
            .into_iter()
            .filter(|p| p.role == Role::Router)
            .count();
        assert_eq!(routers, 1);
    }

    #[tokio::test]
    async fn a_new_version_replaces_itself_and_can_be_rolled_back() {
        let registry = registry();
        let bundled = bundled::find("path-router").unwrap();
        let wasm = Bytes::from_static(bundled.wasm);
        let v1 = router_manifest("router");
        let v2 = v1.replacen("version = ", "version = \"9.9.9\"\n# was: ", 1);
        registry
            .load("router", wasm.clone(), &v1, Source::Admin)
            .await
            .unwrap();
        let swap = registry
            .load("router", wasm, &v2, Source::Admin)
            .await
            .unwrap();
        assert_eq!(swap.version, "9.9.9");
        assert!(swap.replaced.is_some());
        let back = registry.rollback("router").unwrap();
        assert_ne!(back.version, "9.9.9");
        assert_eq!(back.replaced.as_deref(), Some("9.9.9"));
        registry.remove("router").unwrap();
        assert!(registry.list().is_empty());
        assert!(matches!(
            registry.rollback("router"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn the_bundled_policy_decides_transfers_by_tier() {
        let registry = registry();
        let file = FileSubject {
            id: "",
            owner: "alice",
            name: "report.pdf",
            size: 1024,
        };
        assert_eq!(
            registry.may_transfer("alice", "vip", FileAction::Upload, &file),
            MayRegister::Undecided,
            "no policy, no decision"
        );
        load_bundled(&registry, "tiered-policy").await;
        for (tier, action, allowed) in [
            ("vip", FileAction::Upload, true),
            ("service", FileAction::Push, true),
            ("guest", FileAction::Download, true),
            ("guest", FileAction::Upload, false),
            ("normal", FileAction::Push, false),
        ] {
            let decision = registry.may_transfer("someone", tier, action, &file);
            match decision {
                MayRegister::Allow => assert!(allowed, "{tier} {action:?}"),
                MayRegister::Refuse { code, reason } => {
                    assert!(!allowed, "{tier} {action:?}: {reason}");
                    assert_eq!(code, ErrorCode::Forbidden);
                    assert!(reason.contains("report.pdf"), "{reason}");
                }
                MayRegister::Undecided => panic!("the bundled policy decides transfers"),
            }
        }
        // It still decides registrations as before.
        assert_eq!(
            registry.may_register("svc", "service", "demo"),
            MayRegister::Allow
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bundled_heartbeat_task_counts_in_kv_and_publishes_each_beat() {
        use crate::channels::Subscriber;
        use crate::delivery::queue::Budget;
        use crate::delivery::table::ConnTable;
        use crate::plugin::bindings::types::{Outcome, RunContext};
        use crate::testing::Peer;

        let channels = Arc::new(Channels::new(Arc::new(Metrics::new()), Default::default()));
        let kv = Arc::new(KvStore::default());
        let services = HostServices {
            bus: Arc::new(LocalBus::new(channels.clone())),
            presence: channels.clone(),
            kv: kv.clone(),
            figures: Arc::new(crate::plugin::host_api::NoRelay),
            files: Arc::new(crate::plugin::host_api::NoRelay),
        };
        let runtime = Runtime::new(&Default::default(), None).expect("runtime");
        let registry = Registry::new(runtime, services, 64 << 20);
        load_bundled(&registry, "heartbeat").await;
        assert!(registry.task("nope").is_none());
        let (table, budget) = (Arc::new(ConnTable::default()), Budget::new(1 << 30));
        let watcher = Peer::new(&table, &budget, 16);
        channels.subscribe(
            "tasks/heartbeat",
            Subscriber {
                conn: watcher.conn().clone(),
                queue: watcher.queue.clone(),
            },
            None,
        );
        let task = registry.task("heartbeat").expect("a task plugin");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let control = crate::plugin::loaded::RunControl {
            stop: Default::default(),
            log: Arc::new({
                let lines = lines.clone();
                move |level, message| lines.lock().unwrap().push(format!("{level}: {message}"))
            }),
        };
        for run in 1..=2u64 {
            let context = RunContext {
                task: "beat".into(),
                run_id: run,
                attempt: 1,
                scheduled_at_ms: 1_000 * run,
                config: "{}".into(),
            };
            let outcome = tokio::task::spawn_blocking({
                let (task, control) = (task.clone(), control.clone());
                move || task.run_task(&context, &control)
            })
            .await
            .unwrap()
            .unwrap();
            assert!(
                matches!(&outcome, Outcome::Success(s) if s.starts_with(&format!("beat {run}"))),
                "{outcome:?}"
            );
        }
        assert_eq!(kv.get("heartbeat", "count"), Some(b"2".to_vec()));
        assert_eq!(
            *lines.lock().unwrap(),
            [
                "info: beat 1 published to tasks/heartbeat",
                "info: beat 2 published to tasks/heartbeat"
            ],
            "what a run logs goes to its log"
        );
        let beats: Vec<serde_json::Value> = watcher
            .queued()
            .iter()
            .filter_map(|msg| match msg {
                crate::protocol::Msg::Message { data, .. } => {
                    serde_json::from_slice(data.as_bytes()).ok()
                }
                _ => None,
            })
            .collect();
        assert_eq!(beats.len(), 2, "{beats:?}");
        assert_eq!(
            (beats[1]["count"].as_u64(), beats[1]["run"].as_u64()),
            (Some(2), Some(2))
        );
        assert_eq!(beats[1]["task"], "beat");
        assert_eq!(
            beats[1]["relay"]["uptime_ms"], 0,
            "figures from the stats capability"
        );
    }
}
