//! `Communicator::explain`: which transport each peer link uses and why.

use serde::Serialize;

use oxccl_core::link::TransportKind;

use crate::comm::Communicator;

/// One peer link as explained.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerLink {
    /// The peer's rank.
    pub peer: usize,
    /// The peer's host identity.
    pub host: String,
    /// The network transports the peer offers, in its order of preference.
    pub offers: Vec<TransportKind>,
    /// The transport used (or that will be used on first contact); `None` if none can reach
    /// the peer.
    pub transport: Option<TransportKind>,
    /// Whether the link is already connected (links are made on first use).
    pub connected: bool,
    /// Why this transport.
    pub reason: String,
}

/// What a communicator is made of, from this rank's point of view.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Explain {
    /// This rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// This rank's host identity.
    pub host: String,
    /// Hosts and their ranks.
    pub hosts: Vec<Vec<usize>>,
    /// Network transports allowed (`OXCCL_NET`).
    pub net: Vec<String>,
    /// The network transports this rank offers its peers on other hosts.
    pub offers: Vec<TransportKind>,
    /// Every other rank.
    pub peers: Vec<PeerLink>,
}

impl Explain {
    /// Plain text for people.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "rank {} of {} on host '{}'; {} host(s); network transports allowed: {}\n",
            self.rank,
            self.world,
            self.host,
            self.hosts.len(),
            if self.net.is_empty() { "none".to_string() } else { self.net.join(", ") }
        );
        for p in &self.peers {
            s += &format!(
                "  peer {:>4}  {:<13} {:<10} {}\n",
                p.peer,
                p.transport.map(|t| t.name()).unwrap_or("unreachable"),
                if p.connected { "connected" } else { "not yet" },
                p.reason
            );
        }
        s
    }
}

impl Communicator {
    /// Which transport every peer link uses (or will use on first contact) and why.
    pub fn explain(&self) -> Explain {
        let me = &self.peers()[self.rank];
        let connected: Vec<(usize, TransportKind)> = self.links();
        let cfg = self.config();
        let peers = (0..self.world)
            .filter(|&p| p != self.rank)
            .map(|p| {
                let host = self.peers()[p].host_id.clone();
                let live = connected.iter().find(|(q, _)| *q == p).map(|(_, k)| *k);
                let (transport, reason) = oxccl_core::topo::route(me, &self.peers()[p]);
                let offers = self.peers()[p].nets.clone();
                PeerLink { peer: p, host, offers, transport: live.or(transport), connected: live.is_some(), reason }
            })
            .collect();
        Explain {
            rank: self.rank,
            world: self.world,
            host: me.host_id.clone(),
            hosts: self.state().map(|s| s.hosts().to_vec()).unwrap_or_default(),
            net: cfg.net.clone(),
            offers: me.nets.clone(),
            peers,
        }
    }
}
