//! Builds the test fixture plugins (tests/fixtures/*) for wasm32-wasip2.

use std::path::Path;

const FIXTURES: [&str; 5] = [
    "evil-filter",
    "fetch-filter",
    "future-filter",
    "noop-filter",
    "task-script",
];

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let tests = Path::new(&manifest_dir);
    let root = tests.parent().expect("tests/ is in the workspace");
    let wit = root.join("wit/plugin.wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("plugins/sdk").display()
    );
    for fixture in FIXTURES {
        println!(
            "cargo:rerun-if-changed={}",
            tests.join("fixtures").join(fixture).join("src").display()
        );
    }
    // The future filter speaks the same WIT with a bumped package version.
    let current = std::fs::read_to_string(&wit).expect("read wit/plugin.wit");
    let future = current.replace(
        "package wasmrelay:plugin@0.1.0;",
        "package wasmrelay:plugin@0.2.0;",
    );
    assert_ne!(
        current, future,
        "wit/plugin.wit no longer declares @0.1.0; update tests/build.rs"
    );
    let future_wit = tests.join("fixtures/future-filter/wit");
    std::fs::create_dir_all(&future_wit).expect("create the future WIT folder");
    let future_path = future_wit.join("plugin.wit");
    if std::fs::read_to_string(&future_path).ok().as_deref() != Some(future.as_str()) {
        std::fs::write(&future_path, future).expect("write the future WIT");
    }

    wasmrelay_plugin_build::build_into_out_dir(root, &FIXTURES);
}
