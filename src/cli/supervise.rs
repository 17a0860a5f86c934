//! Running a command while a lock (or leadership) is held, and stopping it
//! before the server could grant the lock to anyone else.

use std::process::ExitCode;
use std::time::Duration;

use latchkey_client::protocol::Zxid;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;

/// Exit status when the lock was not acquired within `--timeout`.
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit status when the lock was lost while the command ran.
pub const EXIT_LOST: u8 = 4;
/// Exit status when the command cannot be found, as shells report it.
const EXIT_NOT_FOUND: u8 = 127;
/// Exit status when the command cannot be run, as shells report it.
const EXIT_CANNOT_RUN: u8 = 126;

/// How the supervised command ended.
pub enum Ended {
    /// It exited by itself (or after a signal we forwarded): its status.
    Exited(ExitCode),
    /// The lock was lost; the command was terminated.
    Lost(String),
}

/// Runs `argv` in a process group of its own with `LATCHKEY_FENCING_TOKEN`
/// set, until it exits or `lost` resolves. On loss, the group gets SIGTERM
/// and, after `grace`, SIGKILL. SIGINT and SIGTERM sent to latchkey are
/// passed on to the group (a group of its own does not get the terminal's
/// Ctrl-C), and latchkey then waits for the command to finish.
pub async fn run_while_held(
    argv: &[String],
    token: Zxid,
    lost: impl std::future::Future<Output = String>,
    grace: Duration,
) -> Result<Ended, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command given: write it after `--`, e.g. `-- ./job.sh`".into());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LATCHKEY_FENCING_TOKEN", token.0.to_string())
        .process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one syscall (prctl), which is async-signal-safe.
    unsafe {
        // If latchkey itself is killed (SIGKILL cannot be caught), the
        // command must not run on unsupervised while another holds the lock.
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("latchkey: cannot run {program}: {e}");
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_RUN,
            };
            return Ok(Ended::Exited(ExitCode::from(code)));
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| format!("{program} exited before it could be supervised"))?;
    let signal = |sig: Signal| {
        // The group may be gone already; nothing to do then.
        let _ = killpg(group, sig);
    };

    let mut interrupts = interrupt_signals()?;
    tokio::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| format!("waiting for {program}: {e}"))?;
                return Ok(Ended::Exited(exit_code(status)));
            }
            reason = &mut lost => {
                signal(Signal::SIGTERM);
                tokio::select! {
                    _ = child.wait() => {}
                    () = tokio::time::sleep(grace) => {
                        signal(Signal::SIGKILL);
                        let _ = child.wait().await;
                    }
                }
                return Ok(Ended::Lost(reason));
            }
            Some(sig) = interrupts.next() => signal(sig),
        }
    }
}

/// The exit code that mirrors a child's status: its own code, or 128 plus
/// the signal that killed it, as shells report.
pub fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// SIGINT and SIGTERM as a stream of signals to forward.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

fn interrupt_signals() -> Result<Interrupts, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot catch SIGINT: {e}"))?;
    let term = signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
    Ok(Interrupts { int, term })
}

impl Interrupts {
    /// The next interrupt, as the signal to forward.
    ///
    /// # Cancel safety
    /// Safe: tokio's signal `recv` is cancel-safe.
    async fn next(&mut self) -> Option<Signal> {
        tokio::select! {
            got = self.int.recv() => got.map(|()| Signal::SIGINT),
            got = self.term.recv() => got.map(|()| Signal::SIGTERM),
        }
    }
}
