//! One loaded plugin version: its compiled, type-checked component, a pool of
//! warm instances reused across calls (a trapped one is discarded, and the
//! next call gets a fresh one), the per-call deadline and memory cap, and its
//! call statistics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::InstancePre;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::types::{
    Admission, ChannelHistory, Decision, FileInfo, Handshake, Outcome, Rejection, RequestInfo,
    RunContext, TransferAction, Verdict,
};
use super::bindings::{filter, policy, policy_files, policy_spaces, router, router_channels, task};
use super::host_api::{HostServices, HostState, PluginContext};
use super::manifest::{Manifest, Role};
use super::runtime::{EPOCH_TICK, LoadError, Runtime, describe_exports};

/// Warm instances kept per plugin version; more concurrent callers instantiate
/// extra ones (about 20 µs each) that are dropped afterwards.
const MAX_WARM: usize = 16;

/// How often a task run checks whether it was asked to stop, in epoch
/// ticks: a stop takes effect within about this many milliseconds.
pub const STOP_CHECK_TICKS: u64 = 5;

/// What the caller of a task run controls while it runs.
#[derive(Clone)]
pub struct RunControl {
    /// Set to stop the run (its timeout, or an operator's stop).
    pub stop: Arc<AtomicBool>,
    /// Receives each line the plugin logs during the run: level, message.
    pub log: RunLog,
}

/// Where a task run's log lines go.
pub type RunLog = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

/// Where a plugin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Bundled,
    Admin,
    Folder,
}

/// Why one call failed. The instance that failed is discarded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("exceeded its {0} ms call deadline")]
    Timeout(u64),
    #[error("exceeded its {0}-byte memory cap")]
    OutOfMemory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    /// A task run its caller stopped (its timeout, an operator's stop).
    #[error("was stopped")]
    Stopped,
}

enum Pre {
    Router(router::RouterPre<HostState>),
    RouterChannels(router_channels::RouterChannelsPre<HostState>),
    Policy(policy::PolicyPre<HostState>),
    PolicySpaces(policy_spaces::PolicySpacesPre<HostState>),
    PolicyFiles(policy_files::PolicyFilesPre<HostState>),
    Filter(filter::FilterPre<HostState>),
    Task(task::TaskPre<HostState>),
}

enum Bound {
    Router(router::Router),
    RouterChannels(router_channels::RouterChannels),
    Policy(policy::Policy),
    PolicySpaces(policy_spaces::PolicySpaces),
    PolicyFiles(policy_files::PolicyFiles),
    Filter(filter::Filter),
    Task(task::Task),
}

struct Warm {
    store: Store<HostState>,
    bound: Bound,
}

pub struct LoadedPlugin {
    pub manifest: Manifest,
    pub digest: String,
    pub source: Source,
    pub loaded_unix_ms: u64,
    pre: Pre,
    ctx: Arc<PluginContext>,
    config_json: String,
    deadline_ticks: u64,
    pool: Mutex<Vec<Warm>>,
    pub stats: CallStats,
}

/// SHA-256 of the wasm bytes, hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl LoadedPlugin {
    /// Compiles, links, type-checks against the role's world, instantiates,
    /// runs `init` and `self-check`. Only a plugin that passes all of it is
    /// returned. CPU-heavy: call from a blocking thread.
    pub fn prepare(
        runtime: &Runtime,
        bytes: &[u8],
        manifest: Manifest,
        services: HostServices,
        source: Source,
    ) -> Result<Self, LoadError> {
        let digest = digest(bytes);
        let component = runtime.compile(bytes, &digest)?;
        let linker = runtime.linker_for(&component, &manifest)?;
        let instance_pre: InstancePre<HostState> = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            role: manifest.role.as_str(),
            detail: format!(
                "{e:#} (it exports: {})",
                describe_exports(runtime.engine(), &component).join(", ")
            ),
        };
        let pre = match manifest.role {
            // A router that also exports `channel-history` decides history.
            Role::Router => {
                if let Ok(pre) = router_channels::RouterChannelsPre::new(instance_pre.clone()) {
                    Pre::RouterChannels(pre)
                } else {
                    Pre::Router(router::RouterPre::new(instance_pre).map_err(wrong_world)?)
                }
            }
            // A policy that also exports `may-register` decides registrations;
            // one that does not is still a policy.
            Role::Policy => {
                if let Ok(pre) = policy_files::PolicyFilesPre::new(instance_pre.clone()) {
                    Pre::PolicyFiles(pre)
                } else if let Ok(pre) = policy_spaces::PolicySpacesPre::new(instance_pre.clone()) {
                    Pre::PolicySpaces(pre)
                } else {
                    Pre::Policy(policy::PolicyPre::new(instance_pre).map_err(wrong_world)?)
                }
            }
            Role::Filter => Pre::Filter(filter::FilterPre::new(instance_pre).map_err(wrong_world)?),
            Role::Task => Pre::Task(task::TaskPre::new(instance_pre).map_err(wrong_world)?),
        };
        let ctx = Arc::new(PluginContext::new(&manifest, services));
        // Whole ticks, rounded up, plus one: the current tick is partly spent.
        let deadline_ticks = manifest
            .limits
            .call_timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1;
        let plugin = Self {
            config_json: manifest.init_config(),
            manifest,
            digest,
            source,
            loaded_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            pre,
            ctx,
            deadline_ticks,
            pool: Mutex::new(Vec::new()),
            stats: CallStats::default(),
        };
        let mut warm = plugin.instantiate().map_err(|e| match e {
            InstantiateError::Init(reason) => LoadError::Init(reason),
            InstantiateError::Call(e) => LoadError::Instantiate(e.to_string()),
        })?;
        warm.store.set_epoch_deadline(plugin.deadline_ticks);
        let checked = match &warm.bound {
            Bound::Router(b) => b.call_self_check(&mut warm.store),
            Bound::RouterChannels(b) => b.call_self_check(&mut warm.store),
            Bound::Policy(b) => b.call_self_check(&mut warm.store),
            Bound::PolicySpaces(b) => b.call_self_check(&mut warm.store),
            Bound::PolicyFiles(b) => b.call_self_check(&mut warm.store),
            Bound::Filter(b) => b.call_self_check(&mut warm.store),
            Bound::Task(b) => b.call_self_check(&mut warm.store),
        };
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(LoadError::SelfCheck(reason)),
            Err(e) => {
                let refused = warm.store.data().limiter.refused;
                return Err(LoadError::SelfCheck(
                    plugin.classify(&e, refused).to_string(),
                ));
            }
        }
        plugin
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(warm);
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn role(&self) -> Role {
        self.manifest.role
    }

    fn instantiate(&self) -> Result<Warm, InstantiateError> {
        let mut store = Store::new(self.pre_engine(), HostState::new(self.ctx.clone()));
        store.limiter(|state| &mut state.limiter);
        // The deadline is absolute and starts expired: arm it before any wasm runs.
        store.set_epoch_deadline(self.deadline_ticks);
        let failed = |store: &Store<HostState>, e: wasmtime::Error| {
            InstantiateError::Call(self.classify(&e, store.data().limiter.refused))
        };
        let bound = match &self.pre {
            Pre::Router(pre) => pre.instantiate(&mut store).map(Bound::Router),
            Pre::RouterChannels(pre) => pre.instantiate(&mut store).map(Bound::RouterChannels),
            Pre::Policy(pre) => pre.instantiate(&mut store).map(Bound::Policy),
            Pre::PolicySpaces(pre) => pre.instantiate(&mut store).map(Bound::PolicySpaces),
            Pre::PolicyFiles(pre) => pre.instantiate(&mut store).map(Bound::PolicyFiles),
            Pre::Filter(pre) => pre.instantiate(&mut store).map(Bound::Filter),
            Pre::Task(pre) => pre.instantiate(&mut store).map(Bound::Task),
        };
        let bound = bound.map_err(|e| failed(&store, e))?;
        store.set_epoch_deadline(self.deadline_ticks);
        let init = match &bound {
            Bound::Router(b) => b.call_init(&mut store, &self.config_json),
            Bound::RouterChannels(b) => b.call_init(&mut store, &self.config_json),
            Bound::Policy(b) => b.call_init(&mut store, &self.config_json),
            Bound::PolicySpaces(b) => b.call_init(&mut store, &self.config_json),
            Bound::PolicyFiles(b) => b.call_init(&mut store, &self.config_json),
            Bound::Filter(b) => b.call_init(&mut store, &self.config_json),
            Bound::Task(b) => b.call_init(&mut store, &self.config_json),
        };
        match init {
            Ok(Ok(())) => Ok(Warm { store, bound }),
            Ok(Err(reason)) => Err(InstantiateError::Init(reason)),
            Err(e) => Err(failed(&store, e)),
        }
    }

    fn pre_engine(&self) -> &wasmtime::Engine {
        match &self.pre {
            Pre::Router(pre) => pre.engine(),
            Pre::RouterChannels(pre) => pre.engine(),
            Pre::Policy(pre) => pre.engine(),
            Pre::PolicySpaces(pre) => pre.engine(),
            Pre::PolicyFiles(pre) => pre.engine(),
            Pre::Filter(pre) => pre.engine(),
            Pre::Task(pre) => pre.engine(),
        }
    }

    fn classify(&self, error: &wasmtime::Error, memory_refused: bool) -> CallError {
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout(self.manifest.limits.call_timeout_ms),
            _ if memory_refused => CallError::OutOfMemory(self.ctx.memory_bytes),
            Some(trap) => CallError::Trap(trap.to_string()),
            None => CallError::Trap(format!("{error:#}")),
        }
    }

    /// Runs `call` on a warm instance with the manifest's deadline armed.
    fn call<R>(
        &self,
        call: impl FnOnce(&Bound, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let deadline_ticks = self.deadline_ticks;
        self.call_armed(|store| store.set_epoch_deadline(deadline_ticks), call)
    }

    /// Runs `call` on a warm instance after `arm` set its deadline; returns
    /// the instance to the pool (disarmed) on success and discards it on any
    /// failure.
    fn call_armed<R>(
        &self,
        arm: impl FnOnce(&mut Store<HostState>),
        call: impl FnOnce(&Bound, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let warm = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut warm = match warm {
            Some(warm) => warm,
            None => self.instantiate().map_err(|e| {
                self.stats
                    .record_failure(&CallError::Instantiate(e.to_string()));
                match e {
                    InstantiateError::Call(e) => e,
                    InstantiateError::Init(reason) => CallError::Instantiate(reason),
                }
            })?,
        };
        arm(&mut warm.store);
        let started = Instant::now();
        let result = call(&warm.bound, &mut warm.store);
        self.stats.record_time(started.elapsed().as_nanos() as u64);
        match result {
            Ok(value) => {
                // What a task run armed (its stop check, its log) ends with it.
                warm.store.epoch_deadline_trap();
                warm.store.data_mut().run_log = None;
                let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < MAX_WARM {
                    pool.push(warm);
                }
                Ok(value)
            }
            Err(e) => {
                let state = warm.store.data();
                let error = match e.downcast_ref::<Trap>() {
                    // Interrupted during a task run: its caller stopped it.
                    Some(Trap::Interrupt) if state.run_log.is_some() => CallError::Stopped,
                    _ => self.classify(&e, state.limiter.refused),
                };
                if error == CallError::Stopped {
                    tracing::debug!(plugin = %self.manifest.name, "task run stopped; instance discarded");
                } else {
                    self.stats.record_failure(&error);
                    tracing::warn!(plugin = %self.manifest.name, version = %self.manifest.version, error = %error, "plugin call failed; instance discarded");
                }
                Err(error)
            }
        }
    }

    pub fn route_publish(&self, channel: &str) -> Result<Decision, CallError> {
        self.call(|bound, store| match bound {
            Bound::Router(b) => b.call_route_publish(store, channel),
            Bound::RouterChannels(b) => b.call_route_publish(store, channel),
            _ => unreachable_role(),
        })
    }

    pub fn route_request(&self, request: &RequestInfo) -> Result<Decision, CallError> {
        self.call(|bound, store| match bound {
            Bound::Router(b) => b.call_route_request(store, request),
            Bound::RouterChannels(b) => b.call_route_request(store, request),
            _ => unreachable_role(),
        })
    }

    /// Whether this router decides channels' history (exports `channel-history`).
    pub fn decides_history(&self) -> bool {
        matches!(self.pre, Pre::RouterChannels(_))
    }

    /// `channel-history`; only for a router that [decides history](Self::decides_history).
    pub fn channel_history(
        &self,
        channel: &str,
        configured: Option<ChannelHistory>,
    ) -> Result<Option<ChannelHistory>, CallError> {
        self.call(|bound, store| match bound {
            Bound::RouterChannels(b) => b.call_channel_history(store, channel, configured),
            _ => unreachable_role(),
        })
    }

    pub fn admit(&self, handshake: &Handshake) -> Result<Admission, CallError> {
        self.call(|bound, store| match bound {
            Bound::Policy(b) => b.call_admit(store, handshake),
            Bound::PolicySpaces(b) => b.call_admit(store, handshake),
            Bound::PolicyFiles(b) => b.call_admit(store, handshake),
            _ => unreachable_role(),
        })
    }

    /// Whether this policy decides registrations (exports `may-register`).
    pub fn decides_registration(&self) -> bool {
        matches!(self.pre, Pre::PolicySpaces(_) | Pre::PolicyFiles(_))
    }

    /// Whether this policy decides file transfers (exports `may-transfer`).
    pub fn decides_transfers(&self) -> bool {
        matches!(self.pre, Pre::PolicyFiles(_))
    }

    /// `may-transfer`; only for a policy that [decides transfers](Self::decides_transfers).
    pub fn may_transfer(
        &self,
        user: &str,
        tier: &str,
        action: TransferAction,
        file: &FileInfo,
    ) -> Result<Result<(), Rejection>, CallError> {
        self.call(|bound, store| match bound {
            Bound::PolicyFiles(b) => b.call_may_transfer(store, user, tier, action, file),
            _ => unreachable_role(),
        })
    }

    /// `may-register`; only for a policy that [decides registrations](Self::decides_registration).
    pub fn may_register(
        &self,
        user: &str,
        tier: &str,
        space: &str,
    ) -> Result<Result<(), Rejection>, CallError> {
        self.call(|bound, store| match bound {
            Bound::PolicySpaces(b) => b.call_may_register(store, user, tier, space),
            Bound::PolicyFiles(b) => b.call_may_register(store, user, tier, space),
            _ => unreachable_role(),
        })
    }

    pub fn on_message(&self, channel: &str, data: &[u8]) -> Result<Verdict, CallError> {
        self.call(|bound, store| match bound {
            Bound::Filter(b) => b.call_on_message(store, channel, data),
            _ => unreachable_role(),
        })
    }

    /// One task run. The task's own timeout governs, not the manifest's call
    /// deadline: the run goes on until it returns or `control.stop` is set
    /// (checked every [`STOP_CHECK_TICKS`]), and what it logs goes to
    /// `control.log` as well as to the relay's log. A stopped run is
    /// [`CallError::Stopped`]; the caller knows why it stopped it.
    pub fn run_task(
        &self,
        context: &RunContext,
        control: &RunControl,
    ) -> Result<Outcome, CallError> {
        let stop = control.stop.clone();
        let log = control.log.clone();
        self.call_armed(
            move |store| {
                store.data_mut().run_log = Some(log);
                store.epoch_deadline_callback(move |_| {
                    Ok(if stop.load(Ordering::Relaxed) {
                        UpdateDeadline::Interrupt
                    } else {
                        UpdateDeadline::Continue(STOP_CHECK_TICKS)
                    })
                });
                store.set_epoch_deadline(STOP_CHECK_TICKS);
            },
            |bound, store| match bound {
                Bound::Task(b) => b.call_run(store, context),
                _ => unreachable_role(),
            },
        )
    }
}

/// The registry only hands a plugin calls of its own role; reaching this is a
/// relay bug, reported as a failed call rather than a crash.
fn unreachable_role<R>() -> wasmtime::Result<R> {
    Err(wasmtime::format_err!("relay bug: call for another role"))
}

enum InstantiateError {
    Call(CallError),
    Init(String),
}

impl std::fmt::Display for InstantiateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstantiateError::Call(e) => e.fmt(f),
            InstantiateError::Init(reason) => write!(f, "init failed: {reason}"),
        }
    }
}

/// Call counts and a log-scale histogram of call times (4 buckets per power
/// of two, so percentiles are within ~19%).
pub struct CallStats {
    pub calls: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub out_of_memory: AtomicU64,
    buckets: [AtomicU64; 256],
}

impl Default for CallStats {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            out_of_memory: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Percentiles of call time, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

impl CallStats {
    fn bucket(ns: u64) -> usize {
        let ns = ns.max(1);
        let log = 63 - ns.leading_zeros() as u64;
        let sub = if log >= 2 { (ns >> (log - 2)) & 3 } else { 0 };
        ((log * 4 + sub) as usize).min(255)
    }

    fn bucket_floor_ns(index: usize) -> u64 {
        let (log, sub) = ((index / 4) as u64, (index % 4) as u64);
        if log >= 2 {
            (4 + sub) << (log - 2)
        } else {
            1 << log
        }
    }

    pub fn record_time(&self, ns: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.buckets[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    fn record_failure(&self, error: &CallError) {
        self.traps.fetch_add(1, Ordering::Relaxed);
        match error {
            CallError::Timeout(_) => self.timeouts.fetch_add(1, Ordering::Relaxed),
            CallError::OutOfMemory(_) => self.out_of_memory.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn percentiles(&self) -> Option<Percentiles> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let at = |q: f64| {
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (index, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return Self::bucket_floor_ns(index) as f64 / 1000.0;
                }
            }
            0.0
        };
        Some(Percentiles {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [1, 2, 3, 4, 5, 7, 8, 100, 750, 1_000, 65_536, 10_000_000] {
            let index = CallStats::bucket(ns);
            assert!(index >= last);
            last = index;
            let floor = CallStats::bucket_floor_ns(index);
            assert!(floor <= ns && ns < floor * 2, "{ns} in bucket from {floor}");
        }
    }

    #[test]
    fn percentiles_follow_the_data() {
        let stats = CallStats::default();
        for _ in 0..90 {
            stats.record_time(1_000);
        }
        for _ in 0..10 {
            stats.record_time(100_000);
        }
        let p = stats.percentiles().unwrap();
        assert!((0.8..=1.0).contains(&p.p50_us), "{p:?}");
        assert!((0.8..=1.0).contains(&p.p90_us), "{p:?}");
        assert!((80.0..=100.0).contains(&p.p99_us), "{p:?}");
    }
}
