//! The `latchkey` binary as a user runs it: `serve` in a child process, the
//! client commands against it, errors on stderr with a non-zero status.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

/// A `latchkey serve` child process on a free loopback port.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start() -> Serve {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--in-memory"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn latchkey serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("latchkey listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Serve { child, addr }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("LATCHKEY_SERVER", &self.addr)
            .output()
            .expect("run latchkey")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "latchkey {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "latchkey {args:?} should fail");
        assert!(out.stdout.is_empty(), "errors go to stderr only");
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    /// Sends SIGTERM and returns the exit status and stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return (status, stderr);
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_basic_commands_work_as_written() {
    let serve = Serve::start();
    assert_eq!(serve.ok(&["create", "/app", "hello"]), "/app\n");
    assert_eq!(serve.ok(&["get", "/app"]), "hello");
    assert_eq!(
        serve.ok(&["set", "/app", "world", "--version", "0"]),
        "version 1\n"
    );
    let stderr = serve.fails(&["set", "/app", "again", "--version", "0"]);
    assert!(stderr.contains("version"), "{stderr}");
    assert_eq!(serve.ok(&["get", "/app"]), "world");

    let first = serve.ok(&["create", "/app/job-", "--sequential"]);
    let second = serve.ok(&["create", "/app/job-", "--sequential"]);
    assert!(first.trim() < second.trim(), "{first} {second}");
    assert_eq!(
        serve.ok(&["ls", "/app"]),
        format!(
            "{}\n{}\n",
            first.trim().trim_start_matches("/app/"),
            second.trim().trim_start_matches("/app/")
        )
    );

    let stat = serve.ok(&["stat", "/app"]);
    assert!(stat.contains("version:               1"), "{stat}");
    assert!(stat.contains("children:              2"), "{stat}");

    serve.ok(&["create", "/deep/a/b", "--parents"]);
    serve.ok(&["create", "/hold", "x", "--ttl", "10m"]);
    assert!(serve
        .ok(&["stat", "/hold"])
        .contains("ttl:                   10m"));

    let stderr = serve.fails(&["delete", "/app"]);
    assert!(stderr.contains("children"), "{stderr}");
    serve.ok(&["delete", first.trim()]);
    serve.ok(&["delete", second.trim()]);
    serve.ok(&["delete", "/app", "--version", "1"]);
    let stderr = serve.fails(&["get", "/app"]);
    assert!(stderr.starts_with("latchkey: "), "{stderr}");
    assert!(stderr.contains("/app"), "{stderr}");

    let stderr = serve.fails(&["get", "app"]);
    assert!(stderr.contains("must start with"), "{stderr}");
}

#[test]
fn json_output_is_one_object_per_line() {
    let serve = Serve::start();
    let out = serve.ok(&["create", "/j", "data", "--json"]);
    let created: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(created["path"], "/j");
    let czxid = created["stat"]["czxid"]
        .as_u64()
        .expect("czxid is a number");
    assert!(czxid > 0);

    let got: serde_json::Value =
        serde_json::from_str(serve.ok(&["get", "/j", "--json"]).trim()).unwrap();
    assert_eq!(got["data"], "data");
    assert_eq!(got["stat"]["czxid"].as_u64(), Some(czxid));
    let ls: serde_json::Value =
        serde_json::from_str(serve.ok(&["ls", "/", "--json"]).trim()).unwrap();
    assert_eq!(ls["children"], serde_json::json!(["j"]));
    let stat: serde_json::Value =
        serde_json::from_str(serve.ok(&["stat", "/j", "--json"]).trim()).unwrap();
    assert_eq!(stat["stat"]["data_length"], 4);
}

#[test]
fn watch_prints_changes_as_they_happen() {
    let serve = Serve::start();
    serve.ok(&["create", "/w", "a"]);
    let mut watch = Command::new(BIN)
        .args(["watch", "/w", "--count", "3", "--server", &serve.addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut stdout = BufReader::new(watch.stdout.take().unwrap());
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    // The banner comes once the watch is armed.
    let mut banner = String::new();
    stderr.read_line(&mut banner).unwrap();
    assert!(banner.contains("watching /w"), "{banner}");
    let mut next_line = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line
    };
    serve.ok(&["set", "/w", "b"]);
    assert!(next_line().starts_with("data_changed /w (zxid "));
    serve.ok(&["create", "/w/child"]);
    assert!(next_line().starts_with("children_changed /w (zxid "));
    serve.ok(&["delete", "/w/child"]);
    assert!(next_line().starts_with("children_changed /w (zxid "));
    // Three reports asked for, three given: it exits by itself.
    let status = watch.wait().unwrap();
    assert!(status.success());
}

#[test]
fn serve_exits_zero_on_sigterm() {
    let serve = Serve::start();
    serve.ok(&["create", "/x"]);
    let (status, stderr) = serve.terminate();
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    // Bind and drop a listener: nothing listens on that port now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["get", "/", "--server", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains("latchkey serve"), "{stderr}");
}
