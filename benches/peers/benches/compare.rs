//! The lock benchmark with the peers: the workloads of benches/lockbench
//! against latchkey and, in the same run, against each of Redis, etcd and
//! ZooKeeper that answers on its loopback port.
//!
//!   scripts/peers.sh install   # once: the peers and protoc, from Debian
//!   scripts/peers.sh bench     # starts the peers, runs this, stops them
//!
//! or by hand, with the peers already running (`scripts/peers.sh start`):
//!
//!   cargo bench --manifest-path benches/peers/Cargo.toml --bench compare [-- --quick]
//!
//! A peer that does not answer is skipped, and the output says why. The
//! peers' recipes are in this package's library (src/): Redis (SET NX PX,
//! compare-and-delete release, waiters retrying as node-redlock does), etcd
//! v3 (a lease and the create-revision mutex of etcd's concurrency package)
//! and ZooKeeper (ephemeral sequential nodes), each client on its own
//! connection.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use latchkey_peers::{Peer, PeerLock};

#[path = "../../lockbench/mod.rs"]
mod lockbench;

use lockbench::{Locker, System};

fn main() {
    lockbench::main(lockbench::Setup {
        command: "scripts/peers.sh bench",
        quick_command: "scripts/peers.sh bench --quick",
        others: || Box::pin(peer_systems()),
    });
}

/// A peer (Redis, etcd, ZooKeeper) as a system under test.
struct PeerSystem(Arc<Peer>);

/// A peer's client, remembering the lock it holds.
struct PeerLocker {
    lock: PeerLock,
    held: Option<String>,
}

impl Locker for PeerLocker {
    fn acquire<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, String>> {
        Box::pin(async move {
            self.lock.acquire(name).await?;
            self.held = Some(name.to_owned());
            // The peers' recipes give no fencing token.
            Ok(None)
        })
    }

    fn release(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let name = self.held.take().ok_or("release without a hold")?;
            self.lock.release(&name).await
        })
    }
}

impl System for PeerSystem {
    fn name(&self) -> String {
        self.0.name().into()
    }

    fn locker(&self) -> BoxFuture<'_, Result<Box<dyn Locker>, String>> {
        Box::pin(async move {
            let lock = self.0.client().await?;
            Ok(Box::new(PeerLocker { lock, held: None }) as Box<dyn Locker>)
        })
    }
}

/// The peers that answer on their loopback ports; each one that does not is
/// named as skipped.
async fn peer_systems() -> Vec<Box<dyn System>> {
    let detected = latchkey_peers::detect().await;
    for line in &detected.skipped {
        println!("peer skipped: {line}");
    }
    detected
        .peers
        .into_iter()
        .map(|peer| {
            println!(
                "peer: {} {} on {}",
                peer.name(),
                peer.version(),
                peer.addr()
            );
            Box::new(PeerSystem(Arc::new(peer))) as Box<dyn System>
        })
        .collect()
}
