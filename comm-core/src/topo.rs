//! What ranks know of each other.

/// What every rank publishes about itself at communicator creation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    /// Rank in the communicator.
    pub rank: usize,
    /// Host identity: equal ids share memory (hostname + boot id, or `OXCCL_HOST_ID`).
    pub host_id: String,
    /// Operating-system process id.
    pub pid: u32,
}

/// The ranks of one host, in rank order, and this rank's index among them.
pub fn local_ranks(peers: &[PeerInfo], me: usize) -> (Vec<usize>, usize) {
    let host = &peers[me].host_id;
    let local: Vec<usize> = peers.iter().filter(|p| &p.host_id == host).map(|p| p.rank).collect();
    let idx = local.iter().position(|&r| r == me).unwrap_or(0);
    (local, idx)
}
