//! Used by build scripts (host/build.rs for the bundled plugins, tests/build.rs
//! for test fixtures) so that `cargo build` and `cargo test` produce the wasm
//! plugins with no manual step: adds the `wasm32-wasip2` target when it is
//! missing, then runs a cargo of its own for that target.
//!
//! The inner cargo uses its own target directory: the outer one is locked by
//! the build that runs this script.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const TARGET: &str = "wasm32-wasip2";

/// Builds `packages` (workspace package names) in release mode for
/// wasm32-wasip2 and returns the path of each component, in order.
///
/// Panics with a readable message on failure: build scripts have no better
/// way to report it.
pub fn build_components(workspace_root: &Path, packages: &[&str]) -> Vec<PathBuf> {
    ensure_target();
    let target_dir = workspace_root.join("target").join("wasm-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace_root)
        .args(["build", "--release", "--target", TARGET])
        .arg("--manifest-path")
        .arg(workspace_root.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        // Small components: without these a plugin is megabytes of debug info.
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false");
    for package in packages {
        command.args(["-p", package]);
    }
    // Flags meant for the outer (host) build must not leak into the wasm build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the plugins: {e}"));
    assert!(
        status.success(),
        "building the plugins {packages:?} for {TARGET} failed (see the cargo output above)"
    );
    packages
        .iter()
        .map(|package| {
            let file = format!("{}.wasm", package.replace('-', "_"));
            target_dir.join(TARGET).join("release").join(file)
        })
        .collect()
}

/// Builds `packages` and copies each component to `$OUT_DIR/<package>.wasm`,
/// where the crate can `include_bytes!` it.
pub fn build_into_out_dir(workspace_root: &Path, packages: &[&str]) {
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set for build scripts");
    let built = build_components(workspace_root, packages);
    for (package, path) in packages.iter().zip(built) {
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

/// Adds the wasm32-wasip2 target with rustup when the toolchain lacks it
/// (rustup does not install targets listed in rust-toolchain.toml for a
/// toolchain that is already present).
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if libdir.is_some_and(|dir| dir.exists()) {
        return;
    }
    // Build scripts talk to cargo through stdout.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "cargo:warning=the {TARGET} target is missing; running `rustup target add {TARGET}`"
        );
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", TARGET]);
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        rustup.args(["--toolchain", &toolchain]);
    }
    let status = rustup.status().unwrap_or_else(|e| {
        panic!("the {TARGET} target is missing and rustup could not be run ({e}); install it with `rustup target add {TARGET}`")
    });
    assert!(
        status.success(),
        "`rustup target add {TARGET}` failed; install the target by hand and build again"
    );
}
