//! latchkey: a ZooKeeper-style lock coordinator.
//!
//! [`state`] is the deterministic state machine; [`server`] runs it behind a
//! framed TCP listener; [`cli`] is the `latchkey` command. The wire protocol
//! and the client live in the `latchkey-client` crate.

pub mod cli;
pub mod server;
pub mod state;
