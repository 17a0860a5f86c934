//! What durability costs, against `latchkey serve` children on
//! 127.0.0.1:0: the floors measured in the same run (a small write plus
//! fdatasync in the data folder, and the loopback echo round trip), the
//! uncontended lock cycle durable and in memory, many clients' lock cycles
//! sharing fsyncs, and how long a restart takes with 100,000 nodes.
//!
//!   cargo bench --bench durable
//!
//! Nothing here asserts on speed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use latchkey_client::protocol::{Create, MultiOp, NodeKind};
use latchkey_client::{Client, ClientOptions, CreateOptions, Lock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `latchkey serve` child; killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts a server: durable in `data`, or in memory.
    fn start(data: Option<&Path>) -> Server {
        Server::start_with(data, &[])
    }

    /// As `start`, with more arguments for `serve`.
    fn start_with(data: Option<&Path>, args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args);
        match data {
            Some(folder) => command.arg("--data").arg(folder),
            None => command.args(["--in-memory", "--no-lease-file"]),
        };
        let mut child = command
            // LATCHKEY_BENCH_LOG=info shows, among others, each snapshot's
            // encode and write times.
            .env(
                "RUST_LOG",
                std::env::var("LATCHKEY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start latchkey serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("the server printed {line:?}, not `listening on ADDR`"));
        Server { child, addr }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A 64-byte write plus fdatasync in `folder`, as the log pays per batch.
fn fdatasync_floor(folder: &Path, count: usize) -> Histogram<u64> {
    let mut h = histogram();
    let mut file = std::fs::File::create(folder.join("floor")).expect("a file");
    for _ in 0..count {
        let start = Instant::now();
        file.write_all(&[7u8; 64]).expect("write");
        file.sync_data().expect("fdatasync");
        h.record(micros(start)).expect("record");
    }
    let _ = std::fs::remove_file(folder.join("floor"));
    h
}

/// The loopback round trip of 64 bytes through a tokio echo server.
async fn echo_floor(count: usize) -> Histogram<u64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while socket.read_exact(&mut buf).await.is_ok() {
            if socket.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let mut h = histogram();
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let start = Instant::now();
        socket.write_all(&buf).await.expect("write");
        socket.read_exact(&mut buf).await.expect("read");
        h.record(micros(start)).expect("record");
    }
    h
}

async fn client(addr: &str) -> Client {
    Client::connect(ClientOptions::new(addr).session_timeout(Duration::from_secs(30)))
        .await
        .expect("connect")
}

/// Uncontended acquire plus release of one lock, `count` times.
async fn lock_cycles(addr: &str, count: usize) -> Histogram<u64> {
    let client = client(addr).await;
    let lock = Lock::new(&client, "/bench/cycle");
    let mut h = histogram();
    for _ in 0..count {
        let start = Instant::now();
        let guard = lock.acquire().await.expect("acquire");
        guard.release().await.expect("release");
        h.record(micros(start)).expect("record");
    }
    h
}

/// `clients` clients, each cycling a lock of its own for `run`: cycles
/// per second in all.
async fn spread(addr: &str, clients: usize, run: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (addr, done) = (addr.to_owned(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = client(&addr).await;
            let lock = Lock::new(&client, format!("/bench/spread-{i}"));
            while Instant::now() < until {
                let guard = lock.acquire().await.expect("acquire");
                guard.release().await.expect("release");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for task in tasks {
        task.await.expect("a client");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Creates `count` nodes, 1,000 to a multi, under 100 parents.
async fn fill(addr: &str, count: usize) {
    let client = client(addr).await;
    let parents = 100;
    for p in 0..parents {
        client
            .create(&format!("/fill-{p}"), "", CreateOptions::persistent())
            .await
            .expect("a parent");
    }
    let per_parent = count / parents;
    for p in 0..parents {
        for chunk in (0..per_parent).collect::<Vec<_>>().chunks(1_000) {
            let ops = chunk
                .iter()
                .map(|i| {
                    MultiOp::Create(Create {
                        path: format!("/fill-{p}/node-{i:06}"),
                        data: b"sixteen bytes..!".to_vec().into(),
                        kind: NodeKind::Persistent,
                        ..Create::default()
                    })
                })
                .collect();
            client.multi(ops).await.expect("a multi of creates");
        }
    }
}

fn temp_folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latchkey-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

fn line(what: &str, h: &Histogram<u64>) {
    println!(
        "{what:<44} p50 {:>7} us   p99 {:>7} us   max {:>7} us",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = temp_folder("durable");
    let data = root.join("data");
    let fsync = fdatasync_floor(&root, 500);
    let echo = echo_floor(2_000).await;
    line("floor: 64 bytes + fdatasync", &fsync);
    line("floor: loopback echo", &echo);

    let durable = Server::start(Some(&data));
    let memory = Server::start(None);
    let cycle_durable = lock_cycles(&durable.addr, 500).await;
    let cycle_memory = lock_cycles(&memory.addr, 2_000).await;
    line("lock cycle, durable", &cycle_durable);
    line("lock cycle, in memory", &cycle_memory);
    let target = 2.0 * (fsync.value_at_quantile(0.5) + echo.value_at_quantile(0.5)) as f64 * 1.25;
    println!(
        "lock cycle durable p50 / (2 x (fdatasync + echo) x 1.25) = {:.2} (target <= 1)",
        cycle_durable.value_at_quantile(0.5) as f64 / target
    );
    let spread_durable = spread(&durable.addr, 32, Duration::from_secs(3)).await;
    let spread_memory = spread(&memory.addr, 32, Duration::from_secs(3)).await;
    println!("spread, 32 clients on 32 locks, durable:   {spread_durable:>9.0} cycles/s");
    println!("spread, 32 clients on 32 locks, in memory: {spread_memory:>9.0} cycles/s");
    println!(
        "  fsyncs one cycle would cost alone, per second: {:.0}",
        1e6 / (2.0 * fsync.value_at_quantile(0.5) as f64)
    );
    memory.kill();

    durable.kill();
    // Restarts with 100,000 nodes, made by 100 multis of 1,000 creates:
    // the log replayed whole, and from a snapshot (one every 10 entries
    // here, so that at most 10 multis are replayed after it).
    for (name, every) in [("log replayed whole", "0"), ("from a snapshot", "10")] {
        let data = root.join(format!("restart-{every}"));
        let server = Server::start_with(Some(&data), &["--snapshot-every", every]);
        let nodes = 100_000;
        let start = Instant::now();
        fill(&server.addr, nodes).await;
        println!(
            "created {nodes} nodes (1,000 per multi) in {:?}",
            start.elapsed()
        );
        server.kill();
        let start = Instant::now();
        let restarted = Server::start_with(Some(&data), &["--snapshot-every", every]);
        let listening = start.elapsed();
        let reader = client(&restarted.addr).await;
        reader
            .get("/fill-99/node-000999")
            .await
            .expect("the last node");
        println!(
            "restart with {nodes} nodes ({name}): listening after {listening:?}, first read after {:?}",
            start.elapsed()
        );
        drop(restarted);
    }
    let _ = std::fs::remove_dir_all(&root);
}
