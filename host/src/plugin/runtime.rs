//! The wasmtime side of plugins: one engine per relay (pooling allocator,
//! epoch interruption driven by a ticker thread), compilation with an on-disk
//! cache keyed by digest, and the per-plugin linker that links exactly the
//! capabilities a manifest grants.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{clock, http, kv, log, presence, publish, stats, transfer, types};
use super::host_api::HostState;
use super::manifest::{Capability, Manifest, ManifestError, WIT_VERSION};
use crate::config::PluginsConfig;

/// How often the epoch advances; call deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Why a plugin could not be loaded. Each names the problem for the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("cannot compile the component: {0}")]
    Compile(String),
    #[error(
        "the component imports `{import}`, a capability its manifest does not grant (granted: {granted})"
    )]
    NotGranted { import: String, granted: String },
    #[error(
        "the component imports `{import}`, built against wasmrelay:plugin@{found}; this relay provides @{WIT_VERSION}"
    )]
    WitVersion { import: String, found: String },
    #[error("the component imports `{0}`, which wasmrelay:plugin does not define")]
    UnknownImport(String),
    #[error("the component does not implement the `{role}` world: {detail}")]
    WrongWorld { role: &'static str, detail: String },
    #[error("instantiating the component failed: {0}")]
    Instantiate(String),
    #[error("the plugin's init refused its config: {0}")]
    Init(String),
    #[error("the plugin's self-check failed: {0}")]
    SelfCheck(String),
    #[error("{0}")]
    Conflict(String),
}

impl LoadError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            LoadError::Conflict(_) => 409,
            _ => 422,
        }
    }
}

pub struct Runtime {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    cache_max_bytes: u64,
}

impl Runtime {
    pub fn new(
        config: &PluginsConfig,
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, wasmtime::Error> {
        let mut pool = PoolingAllocationConfig::new();
        let slots = config.max_instances;
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .max_core_instances_per_component(16)
            .total_memories(slots.saturating_mul(2))
            .max_memories_per_component(2)
            .total_tables(slots.saturating_mul(4))
            .max_tables_per_component(4)
            .max_memory_size(config.max_memory_bytes as usize)
            .max_unused_warm_slots(16);
        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .parallel_compilation(true)
            .wasm_component_model(true);
        let engine = Engine::new(&wasm)?;
        spawn_epoch_ticker(&engine);
        if let Some(dir) = &cache_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "plugin compile cache disabled");
        }
        Ok(Arc::new(Self {
            engine,
            cache_dir,
            cache_max_bytes: config.cache_max_bytes,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (or loads the cached compilation of the same digest).
    /// CPU-heavy: call from a blocking thread.
    pub fn compile(&self, bytes: &[u8], digest: &str) -> Result<Component, LoadError> {
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(LoadError::CoreModule),
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm),
        }
        let cached = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(self.cache_name(digest)));
        if let Some(path) = &cached
            && path.exists()
        {
            match super::cache::load(&self.engine, path) {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "stale compile cache entry; recompiling")
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let Some(path) = &cached {
            super::cache::store(&component, path);
            if let Some(dir) = &self.cache_dir {
                let removed = super::cache::prune(dir, self.cache_max_bytes, path);
                if removed > 0 {
                    tracing::info!(
                        removed,
                        max_bytes = self.cache_max_bytes,
                        "pruned the plugin compile cache"
                    );
                }
            }
        }
        Ok(component)
    }

    /// Cache entries are specific to this wasmtime build and configuration.
    fn cache_name(&self, digest: &str) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{digest}-{:016x}.cwasm", hasher.finish())
    }

    /// A linker with the granted capabilities, after checking that the
    /// component imports nothing else from wasmrelay:plugin. Other imports
    /// (the WASI interfaces a std guest declares) trap if called: plugins get
    /// no files, environment, clocks or sockets from WASI.
    pub fn linker_for(
        &self,
        component: &Component,
        manifest: &Manifest,
    ) -> Result<Linker<HostState>, LoadError> {
        let granted = &manifest.capabilities;
        for (name, _) in component.component_type().imports(&self.engine) {
            let Some(rest) = name.strip_prefix("wasmrelay:plugin/") else {
                continue;
            };
            let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
            if !compatible(version) {
                return Err(LoadError::WitVersion {
                    import: name.to_owned(),
                    found: version.to_owned(),
                });
            }
            if interface == "types" {
                continue;
            }
            match Capability::from_interface(interface) {
                Some(capability) if granted.contains(&capability) => {}
                Some(_) => {
                    return Err(LoadError::NotGranted {
                        import: name.to_owned(),
                        granted: if granted.is_empty() {
                            "none".to_owned()
                        } else {
                            granted
                                .iter()
                                .map(|c| c.interface())
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    });
                }
                None => return Err(LoadError::UnknownImport(name.to_owned())),
            }
        }

        let link = |e: wasmtime::Error| LoadError::Instantiate(format!("{e:#}"));
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        for capability in granted {
            match capability {
                Capability::Log => {
                    log::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Kv => {
                    kv::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Publish => {
                    publish::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Presence => {
                    presence::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Clock => {
                    clock::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Http => {
                    http::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Stats => {
                    stats::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
                Capability::Transfer => {
                    transfer::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                }
            }
            .map_err(link)?;
        }
        linker
            .define_unknown_imports_as_traps(component)
            .map_err(link)?;
        Ok(linker)
    }
}

/// Whether an imported `wasmrelay:plugin` version can be served by ours:
/// for 0.x versions, the same minor version.
fn compatible(version: &str) -> bool {
    let ours: Vec<&str> = WIT_VERSION.split('.').collect();
    let theirs: Vec<&str> = version.split('.').collect();
    theirs.len() == 3 && theirs[0] == ours[0] && theirs[1] == ours[1]
}

/// The component's exports, for telling an operator what a wrong-world
/// component offers instead.
pub fn describe_exports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .exports(engine)
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentFunc(_) => format!("func {name}"),
            ComponentItem::ComponentInstance(_) => format!("instance {name}"),
            _ => name.to_owned(),
        })
        .collect()
}

/// Advances the engine's epoch every [`EPOCH_TICK`] for as long as the engine lives.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("wasmrelay-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker: plugin calls will time out at once");
    }
}
