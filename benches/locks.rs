//! The lock benchmark, latchkey alone: every workload of benches/lockbench
//! against a latchkey server process started on 127.0.0.1:0.
//!
//!   cargo bench --bench locks                   # full: medians of 3 runs
//!   cargo bench --bench locks -- --quick        # a short smoke run (CI)
//!   cargo bench --bench locks -- --server ADDR  # against a running latchkey
//!   cargo bench --bench locks -- --only sessions,fan-out  # some workloads
//!
//! The same workloads against Redis, etcd and ZooKeeper, side by side in one
//! run, are in benches/peers (`scripts/peers.sh bench`).

mod lockbench;

fn main() {
    lockbench::main(lockbench::Setup {
        command: "cargo bench --bench locks",
        quick_command: "cargo bench --bench locks -- --quick",
        others: || Box::pin(async { Vec::new() }),
    });
}
