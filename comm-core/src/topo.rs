//! What ranks know of each other.

use crate::link::TransportKind;

/// What every rank publishes about itself at communicator creation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerInfo {
    /// Rank in the communicator.
    pub rank: usize,
    /// Host identity: equal ids share memory (hostname + boot id, or `OXCCL_HOST_ID`).
    pub host_id: String,
    /// Operating-system process id.
    pub pid: u32,
    /// The network transports this rank offers to peers on other hosts, in its order of
    /// preference (`OXCCL_NET`, less what it could not bring up).
    #[serde(default)]
    pub nets: Vec<TransportKind>,
    /// The communicator's traffic class as this rank was told it.
    #[serde(default = "bulk")]
    pub class: crate::budget::TrafficClass,
    /// Why this rank offers less than it would (its NIC had no endpoint for the class), in
    /// words; empty when nothing was held back.
    #[serde(default)]
    pub net_note: String,
    /// Which process-id space `pid` belongs to (kernel boot id and PID namespace); ranks with
    /// the same one can watch each other's process directly. Empty when unknown.
    #[serde(default)]
    pub pid_space: String,
}

fn bulk() -> crate::budget::TrafficClass {
    crate::budget::TrafficClass::Bulk
}

impl PeerInfo {
    /// A rank with no network offer yet, of class `Bulk`.
    pub fn new(rank: usize, host_id: impl Into<String>, pid: u32) -> PeerInfo {
        PeerInfo {
            rank,
            host_id: host_id.into(),
            pid,
            nets: Vec::new(),
            class: bulk(),
            net_note: String::new(),
            pid_space: String::new(),
        }
    }
}

/// How `me` reaches `peer` and why, in words for logs and `explain`: host staging on one
/// host; across hosts, the first network transport of the lower-numbered rank's list that the
/// other offers too, so both sides of a pair pick the same one even when their `OXCCL_NET`
/// orders differ. `None` when no transport can reach the peer.
pub fn route(me: &PeerInfo, peer: &PeerInfo) -> (Option<TransportKind>, String) {
    let names = |v: &[TransportKind]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        }
    };
    if me.host_id == peer.host_id {
        return (Some(TransportKind::HostStaging), format!("same host ('{}'): shared-memory rings", peer.host_id));
    }
    let (lo, hi) = if me.rank < peer.rank { (me, peer) } else { (peer, me) };
    // What the budget held back on either side, said with the route.
    let notes: String = [me, peer]
        .iter()
        .filter(|p| !p.net_note.is_empty())
        .map(|p| format!("; rank {}: {}", p.rank, p.net_note))
        .collect();
    let (k, why) = match lo.nets.iter().find(|k| hi.nets.contains(k)) {
        Some(&k) => (
            Some(k),
            format!(
                "other host ('{}'); {} is the first of rank {}'s network transports ({}) that rank {} offers too",
                peer.host_id,
                k.name(),
                lo.rank,
                names(&lo.nets),
                hi.rank
            ),
        ),
        None => (
            None,
            format!(
                "other host ('{}') and no network transport in common: this rank offers {}, rank {} offers {} (OXCCL_NET)",
                peer.host_id,
                names(&me.nets),
                peer.rank,
                names(&peer.nets)
            ),
        ),
    };
    (k, why + &notes)
}

/// The ranks of one host, in rank order, and this rank's index among them.
pub fn local_ranks(peers: &[PeerInfo], me: usize) -> (Vec<usize>, usize) {
    let host = &peers[me].host_id;
    let local: Vec<usize> = peers.iter().filter(|p| &p.host_id == host).map(|p| p.rank).collect();
    let idx = local.iter().position(|&r| r == me).unwrap_or(0);
    (local, idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: usize, host: &str, nets: &[TransportKind]) -> PeerInfo {
        PeerInfo { nets: nets.to_vec(), ..PeerInfo::new(rank, host, 1) }
    }

    #[test]
    fn budget_notes_are_said_with_the_route() {
        use TransportKind::*;
        let a = info(0, "a", &[NetLibfabric, NetTcp]);
        let b = PeerInfo { net_note: "NIC 'eth0' has no endpoint".into(), ..info(1, "b", &[NetTcp]) };
        let (k, why) = route(&a, &b);
        assert_eq!(k, Some(NetTcp));
        assert!(why.ends_with("; rank 1: NIC 'eth0' has no endpoint"), "{why}");
        let c = PeerInfo { net_note: "no endpoint, no fallback".into(), ..info(1, "b", &[]) };
        let (k, why) = route(&a, &c);
        assert_eq!(k, None);
        assert!(why.contains("no network transport in common") && why.contains("no fallback"), "{why}");
    }

    #[test]
    fn routes_follow_host_and_the_shared_network_transports() {
        use TransportKind::*;
        let a = info(0, "a", &[NetLibfabric, NetTcp]);
        assert_eq!(route(&a, &info(1, "a", &[])).0, Some(HostStaging));
        let (k, why) = route(&a, &info(1, "b", &[NetTcp]));
        assert_eq!(k, Some(NetTcp));
        assert!(why.contains("net-tcp is the first of rank 0's") && why.contains("net-libfabric, net-tcp"), "{why}");
        // Both sides of a pair agree, whatever their own orders: the lower rank's order wins.
        let b = info(1, "b", &[NetTcp, NetLibfabric]);
        assert_eq!(route(&a, &b).0, Some(NetLibfabric));
        assert_eq!(route(&b, &a).0, Some(NetLibfabric));
        let (k, why) = route(&a, &info(3, "b", &[]));
        assert_eq!(k, None);
        assert!(why.contains("rank 3 offers none") && why.contains("this rank offers net-libfabric, net-tcp"), "{why}");
        // A description from a version that published no transports still parses.
        let old: PeerInfo = serde_json::from_str(r#"{"rank":2,"host_id":"h","pid":7}"#).unwrap();
        assert!(old.nets.is_empty());
    }
}
