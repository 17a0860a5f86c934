//! latchkey's use of openraft, kept behind this one module so that the
//! rest of the server sees a log of commands, not a consensus library.
//!
//! openraft is pinned at `=0.10.0-alpha.37`: its v2 storage traits (a log
//! store and a state machine apart, append acknowledged by a callback once
//! the write is on disk), the restore of an in-memory state machine from a
//! snapshot plus the log, and ReadIndex and lease reads, which the 0.9
//! line (0.9.25, the stable one) does not have. An alpha can change its
//! API between releases, hence the exact pin.
//!
//! Here: the type configuration, the log store ([`log_store`]), which
//! passes openraft's own storage test suite, the commands' encoding in the
//! log ([`encoding`]), the data folder ([`folder`]) and the member itself
//! with its state machine over the server's core ([`node`]). Snapshots are
//! not built yet: the log is kept and replayed whole.

pub(crate) mod encoding;
pub(crate) mod folder;
pub(crate) mod log_store;
pub(crate) mod node;
pub(crate) mod snapshot_file;

/// A command as the log holds it: its versioned encoding, so that the log
/// holds exactly the bytes every member decodes and applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Encoded(pub(crate) Vec<u8>);

impl std::fmt::Display for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// The types of latchkey's Raft group: commands in (`D`) and outputs
    /// out (`R`), both encoded.
    pub(crate) TypeConfig:
        D = Encoded,
        R = Encoded,
        NodeId = u64,
        Node = openraft::impls::BasicNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);
