//! The relay binary, rebuilt inside the test crate so tests can run it as a
//! real process (`CARGO_BIN_EXE_test-wasmrelay`).
fn main() -> std::process::ExitCode {
    wasmrelay::cli::main()
}
