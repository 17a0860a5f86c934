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
/// and, after `grace`, SIGKILL. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent
/// to latchkey are passed on to the group (a group of its own does not get
/// the terminal's signals), and latchkey then waits for the command to
/// finish; Ctrl-Z is refused. If latchkey is killed, the command gets
/// SIGKILL (Linux's parent-death signal).
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

/// The signals latchkey passes on to the command's group, and Ctrl-Z.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    tstp: tokio::signal::unix::Signal,
}

fn interrupt_signals() -> Result<Interrupts, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let catch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot catch {name}: {e}"))
    };
    Ok(Interrupts {
        int: catch(SignalKind::interrupt(), "SIGINT")?,
        term: catch(SignalKind::terminate(), "SIGTERM")?,
        hup: catch(SignalKind::hangup(), "SIGHUP")?,
        quit: catch(SignalKind::quit(), "SIGQUIT")?,
        tstp: catch(SignalKind::from_raw(Signal::SIGTSTP as i32), "SIGTSTP")?,
    })
}

impl Interrupts {
    /// The next signal to pass on to the command. Ctrl-Z (SIGTSTP) is
    /// refused rather than passed on: a stopped latchkey stops
    /// heartbeating, and the lock would go to someone else while the command
    /// runs on.
    ///
    /// # Cancel safety
    /// Safe: tokio's signal `recv` is cancel-safe.
    async fn next(&mut self) -> Option<Signal> {
        loop {
            tokio::select! {
                got = self.int.recv() => return got.map(|()| Signal::SIGINT),
                got = self.term.recv() => return got.map(|()| Signal::SIGTERM),
                got = self.hup.recv() => return got.map(|()| Signal::SIGHUP),
                got = self.quit.recv() => return got.map(|()| Signal::SIGQUIT),
                got = self.tstp.recv() => {
                    got?;
                    eprintln!(
                        "latchkey: not suspending: the lock would expire while the command runs \
                         (stop the command, or press Ctrl-C)"
                    );
                }
            }
        }
    }
}
