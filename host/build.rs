//! Builds the bundled plugins (plugins/*) for wasm32-wasip2 so the relay can
//! embed them: `cargo run` and `cargo test` need no manual plugin step.

use std::path::Path;

/// Package names of the bundled plugins; each lives in `plugins/<name>`.
const BUNDLED: [&str; 3] = ["path-router", "tiered-policy", "stamp-filter"];

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
    let out_dir = std::env::var("OUT_DIR").expect("set by cargo");
    let built = wasmrelay_plugin_build::build_components(root, &BUNDLED);
    for (package, path) in BUNDLED.iter().zip(built) {
        let destination = Path::new(&out_dir).join(format!("{package}.wasm"));
        std::fs::copy(&path, &destination).unwrap_or_else(|e| {
            panic!(
                "cannot copy {} to {}: {e}",
                path.display(),
                destination.display()
            )
        });
    }
}
