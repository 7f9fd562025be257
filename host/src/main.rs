fn main() -> std::process::ExitCode {
    wasmrelay::cli::main()
}
