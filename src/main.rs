//! The `latchkey` command: `serve` runs the coordinator; the other commands
//! are a client for people and scripts. Everything is in [`latchkey::cli`].

fn main() -> std::process::ExitCode {
    latchkey::cli::main()
}
