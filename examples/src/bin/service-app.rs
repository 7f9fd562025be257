fn main() -> std::process::ExitCode {
    wasmrelay_examples::service_app::main()
}
