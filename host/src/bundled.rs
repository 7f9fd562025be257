//! The plugins compiled into the relay binary (built by host/build.rs from
//! plugins/*), with their manifests: what `plugins.bundled` names.

pub struct Bundled {
    pub name: &'static str,
    pub wasm: &'static [u8],
    pub manifest: &'static str,
}

pub const BUNDLED: [Bundled; 5] = [
    Bundled {
        name: "path-router",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/path-router.wasm")),
        manifest: include_str!("../../plugins/path-router/plugin.toml"),
    },
    Bundled {
        name: "tiered-policy",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/tiered-policy.wasm")),
        manifest: include_str!("../../plugins/tiered-policy/plugin.toml"),
    },
    Bundled {
        name: "stamp-filter",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/stamp-filter.wasm")),
        manifest: include_str!("../../plugins/stamp-filter/plugin.toml"),
    },
    Bundled {
        name: "heartbeat",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat.wasm")),
        manifest: include_str!("../../plugins/heartbeat/plugin.toml"),
    },
    Bundled {
        name: "http-probe",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/http-probe.wasm")),
        manifest: include_str!("../../plugins/http-probe/plugin.toml"),
    },
];

pub fn find(name: &str) -> Option<&'static Bundled> {
    BUNDLED.iter().find(|b| b.name == name)
}
