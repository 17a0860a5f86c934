//! The `latchkey` binary, built in this package too so that its benches can
//! start the server they compare, exactly as the root package builds it.

fn main() -> std::process::ExitCode {
    latchkey::cli::main()
}
