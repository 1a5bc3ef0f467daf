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
    /// The transports this rank offers its peers, in its order of preference: those of its
    /// host first, then the network ones in `OXCCL_NET` order, less what it could not bring
    /// up or the budget refused ([`crate::transport::route`] picks from them).
    #[serde(default)]
    pub offers: Vec<TransportKind>,
    /// The communicator's traffic class as this rank was told it.
    #[serde(default = "bulk")]
    pub class: crate::budget::TrafficClass,
    /// Why this rank offers less than it would (its NIC had no endpoint for the class, or a
    /// transport `OXCCL_NET` names is not available here), in words; empty when nothing was
    /// held back.
    #[serde(default)]
    pub net_note: String,
    /// Which process-id space `pid` belongs to (kernel boot id and PID namespace); ranks with
    /// the same one can watch each other's process directly. Empty when unknown.
    #[serde(default)]
    pub pid_space: String,
    /// This rank's values of the settings every rank must share ([`crate::config::Knob::agree`]),
    /// compared at creation ([`check_same_settings`]).
    #[serde(default)]
    pub settings: Vec<(String, String)>,
    /// GPUs this rank can stage data from (0: none, no `cuda` feature, or `OXCCL_GPU=off`).
    /// A pair whose transport moves host memory only stages GPU data through host memory
    /// when either side has one (both must cut messages the same way).
    #[serde(default)]
    pub gpus: u32,
    /// The GPU this rank's device buffers are on (the device current when it was created).
    #[serde(default)]
    pub gpu: u32,
    /// This rank moves GPU data to and from ranks of its host through CUDA IPC (`p2p`): it
    /// has a GPU, the build has CUDA, and `OXCCL_P2P` is not `off`.
    #[serde(default)]
    pub p2p: bool,
    /// The PCI bus id of [`PeerInfo::gpu`] (`0000:17:00.0`), empty without a GPU.
    #[serde(default)]
    pub gpu_bus: String,
    /// The PCI bus ids of the GPUs whose memory this rank's GPU can reach through CUDA IPC:
    /// its own, and those visible to its process that it can access as a peer.
    #[serde(default)]
    pub gpu_reach: Vec<String>,
    /// The offered network transports whose links move this rank's GPU memory themselves
    /// (FI_HMEM); a pair stages GPU data through host memory unless both list its transport.
    #[serde(default)]
    pub gpu_direct: Vec<crate::link::TransportKind>,
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
            offers: Vec::new(),
            class: bulk(),
            net_note: String::new(),
            pid_space: String::new(),
            settings: Vec::new(),
            gpus: 0,
            gpu: 0,
            p2p: false,
            gpu_bus: String::new(),
            gpu_reach: Vec::new(),
            gpu_direct: Vec::new(),
        }
    }
}

/// Checks that every rank uses the same value of each setting ranks must share: a
/// difference is an `InvalidUsage` naming the setting and both values, the same on every
/// rank (each compares the same list).
pub fn check_same_settings(peers: &[PeerInfo]) -> crate::Result<()> {
    let Some(first) = peers.first() else { return Ok(()) };
    for p in &peers[1..] {
        let names = first.settings.iter().chain(&p.settings).map(|(k, _)| k);
        for name in names {
            let of = |q: &PeerInfo| q.settings.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            let (a, b) = (of(first), of(p));
            if a != b {
                let say = |v: Option<String>| v.unwrap_or_else(|| "no such setting (a different OxCCL build)".into());
                return Err(crate::Error::invalid_usage(format!(
                    "the ranks use different {name}: rank {} has {}, rank {} has {}. Settings that choose \
                     algorithms or how bytes are laid out on the wire must be the same on every rank \
                     (docs/settings.md marks them); the others may differ",
                    first.rank,
                    say(a),
                    p.rank,
                    say(b)
                )));
            }
        }
    }
    Ok(())
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

    #[test]
    fn settings_that_differ_are_named_with_both_values() {
        let p = |r, streams: &str| PeerInfo {
            settings: vec![("OXCCL_ALGO".into(), "auto".into()), ("OXCCL_TCP_STREAMS".into(), streams.into())],
            ..PeerInfo::new(r, "h", 1)
        };
        check_same_settings(&[p(0, "4"), p(1, "4"), p(2, "4")]).unwrap();
        let e = check_same_settings(&[p(0, "4"), p(1, "4"), p(2, "1")]).unwrap_err();
        assert!(matches!(e, crate::Error::InvalidUsage(_)), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("OXCCL_TCP_STREAMS: rank 0 has 4, rank 2 has 1"), "{m}");
        let mut old = PeerInfo::new(1, "h", 1);
        old.settings.truncate(0);
        let e = check_same_settings(&[p(0, "4"), old]).unwrap_err().to_string();
        assert!(e.contains("OXCCL_ALGO: rank 0 has auto, rank 1 has no such setting"), "{e}");
    }

    #[test]
    fn local_ranks_are_those_of_my_host_in_rank_order() {
        let p = |r, h: &str| PeerInfo::new(r, h, 1);
        let peers = [p(0, "a"), p(1, "b"), p(2, "a"), p(3, "b")];
        assert_eq!(local_ranks(&peers, 2), (vec![0, 2], 1));
        assert_eq!(local_ranks(&peers, 1), (vec![1, 3], 0));
    }
}
