//! A Jepsen-style chaos test: clients behind proxies take two locks in turn
//! and write to fenced resources with their tokens, while a seeded schedule
//! cuts, partitions and stalls their connections, drops clients without
//! closing, and kills and restarts the server. A checker then reads the
//! history: no stale write accepted, tokens unique and rising, no lock
//! granted before its previous holder was told its hold was over, no
//! overlap between holders never in doubt, and every client acquires again
//! once the faults stop.
//!
//! `LATCHKEY_SEED=<n>` replays a schedule (as far as timing allows);
//! `LATCHKEY_CHAOS_SECS=<n>` runs a soak of that many seconds.

mod common;
#[path = "common/history.rs"]
mod history;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{within, CrashableServer, Proxy};
use history::{check, excerpt, Event, History};
use latchkey::server::Config;
use latchkey_client::{Client, ClientError, ClientOptions, Lock, SessionState};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

const SLOTS: usize = 6;
const LOCKS: [&str; 2] = ["/chaos/a", "/chaos/b"];
/// The session timeout the clients ask for (the test server allows it).
const SESSION_TIMEOUT: Duration = Duration::from_millis(1000);
const LOCK_DELAY: Duration = Duration::from_millis(300);
/// How long every client has, once the faults are healed, to acquire again.
const LIVENESS: Duration = Duration::from_secs(15);
/// At least this long between two server restarts: each costs every client
/// its session and holds grants back for up to a session timeout plus a
/// lock-delay plus a second, so back-to-back restarts would leave little
/// else to test.
const RESTART_GAP: Duration = Duration::from_secs(3);

/// xorshift64*: a tiny, seeded generator for the schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// One client's place: its proxy, and what faults did to its connection.
struct Slot {
    index: usize,
    proxy: Mutex<Arc<Proxy>>,
    /// Bumped when a fault on this slot starts and when it ends.
    fault_gen: AtomicU64,
    /// A fault on this slot is in force.
    faulted: AtomicBool,
    /// The slot's client holds a lock now (the schedule aims at holders).
    holding: AtomicBool,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Slot {
    fn proxy(&self) -> Arc<Proxy> {
        self.proxy.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn fault_begins(&self) {
        self.faulted.store(true, Ordering::SeqCst);
        self.fault_gen.fetch_add(1, Ordering::SeqCst);
    }

    fn fault_ends(&self) {
        self.fault_gen.fetch_add(1, Ordering::SeqCst);
        self.faulted.store(false, Ordering::SeqCst);
    }
}

struct Shared {
    history: History,
    stop: AtomicBool,
    acquire_errors: AtomicU64,
    reconnects: AtomicU64,
}

async fn connect_slot(slot: &Slot, shared: &Shared) -> Option<Client> {
    while !shared.stop.load(Ordering::SeqCst) {
        let options = ClientOptions::new(slot.proxy().addr().to_string())
            .session_timeout(SESSION_TIMEOUT)
            .connect_timeout(Duration::from_secs(1));
        match tokio::time::timeout(Duration::from_secs(3), Client::connect(options)).await {
            Ok(Ok(client)) => return Some(client),
            // Partitioned or refused: try again, a little later.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

fn session_over(client: &Client) -> bool {
    matches!(
        client.session_status().borrow().state,
        SessionState::Expired | SessionState::Closed
    )
}

/// A client's lock loop until `stop`: acquire, write, hold, write, release.
async fn worker(slot: Arc<Slot>, shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    let Some(mut client) = connect_slot(&slot, &shared).await else {
        return;
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let lock_index = rng.below(LOCKS.len() as u64) as usize;
        let gen_start = slot.fault_gen.load(Ordering::SeqCst);
        let faulted_at_start = slot.faulted.load(Ordering::SeqCst);
        let lock = Lock::new(&client, LOCKS[lock_index]).lock_delay(LOCK_DELAY);
        let guard = match lock.acquire_timeout(Duration::from_secs(2)).await {
            Ok(Some(guard)) => guard,
            Ok(None) => continue,
            Err(error) => {
                shared.acquire_errors.fetch_add(1, Ordering::SeqCst);
                if session_over(&client)
                    || matches!(error, ClientError::SessionExpired | ClientError::Closed)
                {
                    let _ = tokio::time::timeout(Duration::from_secs(1), client.close()).await;
                    shared.reconnects.fetch_add(1, Ordering::SeqCst);
                    match connect_slot(&slot, &shared).await {
                        Some(fresh) => client = fresh,
                        None => return,
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
        };
        let token = guard.token().0;
        let history = &shared.history;
        let hold = history.acquired(slot.index, client.session_id().0, lock_index, token);
        slot.holding.store(true, Ordering::SeqCst);
        let lost_flag = Arc::new(AtomicBool::new(false));
        let watcher = {
            let lost = guard.lost();
            let (flag, shared) = (lost_flag.clone(), shared.clone());
            tokio::spawn(async move {
                let reason = lost.await;
                flag.store(true, Ordering::SeqCst);
                shared.history.record(Event::Lost {
                    hold,
                    reason: format!("{reason:?}"),
                });
            })
        };
        history.write(hold, lock_index, token);
        // The work under the lock: brief, but now and then a holder stalls
        // (a pause, a slow disk) long enough for a fault to catch it, and
        // writes again without checking lost(): the fencing must stop it.
        match rng.below(12) {
            0 => tokio::time::sleep(rng.millis(300, 2500)).await,
            1..=4 => tokio::task::yield_now().await,
            _ => tokio::time::sleep(rng.millis(1, 15)).await,
        }
        history.write(hold, lock_index, token);
        slot.holding.store(false, Ordering::SeqCst);
        let in_doubt = faulted_at_start
            || slot.faulted.load(Ordering::SeqCst)
            || slot.fault_gen.load(Ordering::SeqCst) != gen_start
            || lost_flag.load(Ordering::SeqCst)
            || guard.is_lost();
        watcher.abort();
        history.record(Event::Releasing { hold, in_doubt });
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(3), guard.release()).await,
            Ok(Ok(()))
        );
        history.record(Event::Released { hold, ok });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
}

fn spawn_worker(slot: &Arc<Slot>, shared: &Arc<Shared>, seed: u64) {
    let handle = tokio::spawn(worker(slot.clone(), shared.clone(), seed));
    *slot.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Cut,
    CutAndRefuse,
    ShortPartition,
    LongPartition,
    ShortStall,
    LongStall,
    Crash,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::CutAndRefuse => "cut_and_refuse",
            Fault::ShortPartition => "short_partition",
            Fault::LongPartition => "long_partition",
            Fault::ShortStall => "short_stall_replies",
            Fault::LongStall => "long_stall_replies",
            Fault::Crash => "drop_client",
        }
    }

    fn pick(rng: &mut Rng) -> Fault {
        match rng.below(13) {
            0 | 1 => Fault::Cut,
            2 => Fault::CutAndRefuse,
            3..=4 => Fault::ShortPartition,
            5..=6 => Fault::LongPartition,
            7..=8 => Fault::ShortStall,
            9..=10 => Fault::LongStall,
            _ => Fault::Crash,
        }
    }

    /// How long the fault lasts (zero: instant).
    fn duration(self, rng: &mut Rng) -> Duration {
        let timeout = SESSION_TIMEOUT.as_millis() as u64;
        match self {
            Fault::Cut | Fault::Crash => Duration::ZERO,
            Fault::CutAndRefuse => rng.millis(100, 2 * timeout),
            Fault::ShortPartition | Fault::ShortStall => rng.millis(50, timeout / 2),
            Fault::LongPartition | Fault::LongStall => rng.millis(timeout * 3 / 2, timeout * 3),
        }
    }

    fn apply(self, proxy: &Proxy) {
        match self {
            Fault::Cut => proxy.cut_all(),
            Fault::CutAndRefuse => {
                proxy.refuse(true);
                proxy.cut_all();
            }
            Fault::ShortPartition | Fault::LongPartition | Fault::Crash => proxy.partition(true),
            Fault::ShortStall | Fault::LongStall => proxy.stall_replies(true),
        }
    }

    fn heal(self, proxy: &Proxy) {
        match self {
            Fault::Cut | Fault::Crash => {}
            Fault::CutAndRefuse => proxy.refuse(false),
            Fault::ShortPartition | Fault::LongPartition => proxy.partition(false),
            Fault::ShortStall | Fault::LongStall => proxy.stall_replies(false),
        }
    }
}

/// Drops the slot's client without closing: its connection is partitioned
/// first, so nothing (not even the guard's background delete) reaches the
/// server, then the worker is aborted and the proxy replaced. A fresh client
/// takes the slot.
async fn crash(slot: &Arc<Slot>, shared: &Arc<Shared>, server: SocketAddr, seed: u64) {
    let handle = slot.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(handle) = handle {
        handle.abort();
        let _ = handle.await;
    }
    shared.history.record(Event::Crashed { slot: slot.index });
    let fresh = Arc::new(Proxy::start(server).await);
    let old = std::mem::replace(
        &mut *slot.proxy.lock().unwrap_or_else(|p| p.into_inner()),
        fresh,
    );
    drop(old);
    spawn_worker(slot, shared, seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_locks_stay_safe_and_live_under_seeded_faults() {
    let data = common::temp_dir("chaos-durable");
    chaos(Config {
        data: Some(data.join("data")),
        // Often, so that restarts land before, amid and after snapshots.
        snapshot_every: 64,
        ..common::test_config()
    })
    .await;
    let _ = std::fs::remove_dir_all(&data);
}

/// The same with the state in memory: a restart loses every session, and
/// the lease file must hold grants back until the old holders know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_locks_stay_safe_and_live_under_seeded_faults_in_memory() {
    chaos(Config {
        lease_file: Some(common::temp_dir("chaos").join("lease")),
        ..common::test_config()
    })
    .await;
}

/// Runs the seeded schedule of faults against a server started with
/// `config`, restarted (from its data folder, if it has one) now and then,
/// and checks the history.
async fn chaos(config: Config) {
    let seed = env_u64("LATCHKEY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            % 1_000_000_007
    });
    eprintln!("LATCHKEY_SEED={seed}");
    let run_for = Duration::from_secs(env_u64("LATCHKEY_CHAOS_SECS").unwrap_or(15));
    let mut rng = Rng::new(seed);

    let mut server = Some(CrashableServer::start(config.clone()).await);
    let server_addr = server.as_ref().map(|s| s.addr()).expect("started");
    let shared = Arc::new(Shared {
        history: History::new(),
        stop: AtomicBool::new(false),
        acquire_errors: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
    });
    let mut slots = Vec::new();
    for index in 0..SLOTS {
        slots.push(Arc::new(Slot {
            index,
            proxy: Mutex::new(Arc::new(Proxy::start(server_addr).await)),
            fault_gen: AtomicU64::new(0),
            faulted: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            worker: Mutex::new(None),
        }));
    }
    for slot in &slots {
        spawn_worker(slot, &shared, rng.next());
    }

    // The schedule: one fault at a time per slot, several slots at once.
    let started = Instant::now();
    let busy: Arc<Vec<AtomicBool>> = Arc::new((0..SLOTS).map(|_| AtomicBool::new(false)).collect());
    let mut heals = JoinSet::new();
    let mut last_restart = Instant::now();
    let mut restarts = 0u64;
    while started.elapsed() < run_for {
        tokio::time::sleep(rng.millis(50, 300)).await;
        // Now and then, kill the server and start it again on its address:
        // from its folder, durable; in memory, every session is lost, and
        // the lease file must hold grants back until the old holders know.
        // At least one restart a run: forced a third of the way in.
        let due = restarts == 0 && started.elapsed() >= run_for / 3;
        if (due || rng.below(25) == 0) && last_restart.elapsed() >= RESTART_GAP {
            restarts += 1;
            for slot in &slots {
                slot.fault_begins();
            }
            shared.history.record(Event::Fault {
                slot: SLOTS,
                kind: "server_restart",
                start: true,
            });
            if let Some(running) = server.take() {
                running.crash();
            }
            server = Some(
                CrashableServer::start(Config {
                    listen: server_addr,
                    ..config.clone()
                })
                .await,
            );
            for slot in &slots {
                slot.fault_ends();
            }
            shared.history.record(Event::Fault {
                slot: SLOTS,
                kind: "server_restart",
                start: false,
            });
            last_restart = Instant::now();
            continue;
        }
        // Half the time, aim at a client that holds a lock now.
        let holders: Vec<usize> = slots
            .iter()
            .filter(|s| s.holding.load(Ordering::SeqCst))
            .map(|s| s.index)
            .collect();
        let index = if !holders.is_empty() && rng.below(2) == 0 {
            holders[rng.below(holders.len() as u64) as usize]
        } else {
            rng.below(SLOTS as u64) as usize
        };
        let fault = Fault::pick(&mut rng);
        let duration = fault.duration(&mut rng);
        let worker_seed = rng.next();
        if busy[index].swap(true, Ordering::SeqCst) {
            continue;
        }
        let slot = slots[index].clone();
        slot.fault_begins();
        shared.history.record(Event::Fault {
            slot: index,
            kind: fault.name(),
            start: true,
        });
        fault.apply(&slot.proxy());
        if let Fault::Crash = fault {
            crash(&slot, &shared, server_addr, worker_seed).await;
        }
        let (shared, busy) = (shared.clone(), busy.clone());
        heals.spawn(async move {
            tokio::time::sleep(duration).await;
            fault.heal(&slot.proxy());
            slot.fault_ends();
            shared.history.record(Event::Fault {
                slot: index,
                kind: fault.name(),
                start: false,
            });
            busy[index].store(false, Ordering::SeqCst);
        });
    }

    // Heal everything, then every client must acquire again.
    within("the faults' heals", async {
        while let Some(healed) = heals.join_next().await {
            healed.expect("a heal task");
        }
    })
    .await;
    for slot in &slots {
        let proxy = slot.proxy();
        proxy.partition(false);
        proxy.stall_replies(false);
        proxy.refuse(false);
    }
    let healed_at = shared.history.record(Event::Healed);
    let mut progress = shared.history.progress();
    let live = tokio::time::timeout(LIVENESS, async {
        loop {
            if shared.history.slots_acquired_after(healed_at).len() == SLOTS {
                return;
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let live_slots = shared.history.slots_acquired_after(healed_at);
    shared.stop.store(true, Ordering::SeqCst);
    for slot in &slots {
        let handle = slot.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            within("a worker's stop", handle)
                .await
                .expect("a worker ends cleanly");
        }
    }
    let entries = shared.history.entries();
    let tail = excerpt(&entries, entries.len() as u64, 30);
    assert!(
        live.is_ok(),
        "liveness: after healing at #{healed_at}, only slots {live_slots:?} of {SLOTS} acquired \
         within {LIVENESS:?}; rerun with LATCHKEY_SEED={seed}\nlast entries:\n{tail}"
    );

    let (counts, violations) = check(&entries);
    let faults: u64 = counts.faults.values().sum();
    eprintln!(
        "chaos: seed {seed}, {:?} of faults then {:?} in all; acquisitions {}, in doubt {}, \
         lost {}, writes accepted {}, refused {}, releases ok {} failed {}, crashes {}, \
         acquire errors {}, reconnects {}, faults {} {:?}, violations {}",
        run_for,
        started.elapsed(),
        counts.acquisitions,
        counts.holds_in_doubt,
        counts.lost,
        counts.writes_accepted,
        counts.writes_refused,
        counts.releases_ok,
        counts.releases_failed,
        counts.crashes,
        shared.acquire_errors.load(Ordering::SeqCst),
        shared.reconnects.load(Ordering::SeqCst),
        faults,
        counts.faults,
        violations.len(),
    );
    if !violations.is_empty() {
        let mut report = String::new();
        for violation in violations.iter().take(10) {
            report.push_str(&violation.to_string());
            if let Some(first) = violation.evidence.first() {
                report.push_str("  around it:\n");
                report.push_str(&excerpt(&entries, first.seq, 6));
            }
        }
        panic!(
            "{} violation(s); rerun with LATCHKEY_SEED={seed}\n{report}",
            violations.len()
        );
    }
    assert!(
        counts.acquisitions >= SLOTS as u64,
        "only {} acquisitions: the clients barely ran; rerun with LATCHKEY_SEED={seed}",
        counts.acquisitions
    );
    assert!(
        faults > 0,
        "no fault was injected; rerun with LATCHKEY_SEED={seed}"
    );
    assert!(
        restarts > 0,
        "the server was never restarted; rerun with LATCHKEY_SEED={seed}"
    );
    drop(server);
}
