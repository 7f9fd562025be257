//! Builds the bundled plugins (plugins/*) for wasm32-wasip2 so the relay can
//! embed them: `cargo run` and `cargo test` need no manual plugin step.

use std::path::Path;

/// Package names of the bundled plugins; each lives in `plugins/<name>`.
const BUNDLED: [&str; 5] = [
    "path-router",
    "tiered-policy",
    "stamp-filter",
    "heartbeat",
    "http-probe",
];

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let root = Path::new(&manifest_dir)
        .parent()
        .expect("host/ is in the workspace");
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("plugins/sdk").display()
    );
    for package in BUNDLED {
        println!(
            "cargo:rerun-if-changed={}",
            root.join("plugins").join(package).display()
        );
    }
    wasmrelay_plugin_build::build_into_out_dir(root, &BUNDLED);
}
