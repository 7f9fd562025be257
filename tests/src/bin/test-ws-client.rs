fn main() -> std::process::ExitCode {
    wasmrelay_examples::ws_client::main()
}
