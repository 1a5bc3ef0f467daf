//! `Communicator::explain`: which transport each peer link uses and why.

use serde::Serialize;

use oxccl_core::budget::{self, Budget, TrafficClass};
pub use oxccl_core::budget::{EndpointUse, ProviderLimits};
use oxccl_core::link::TransportKind;
use oxccl_transports::ledger::Ledger;

use crate::comm::Communicator;
use crate::registry;
use crate::shared::Shared;

/// One peer link as explained.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerLink {
    /// The peer's rank.
    pub peer: usize,
    /// The peer's host identity.
    pub host: String,
    /// The network transports the peer offers, in its order of preference.
    pub offers: Vec<TransportKind>,
    /// The transports for ranks of its host the peer offers (host-staging, p2p).
    pub host_offers: Vec<TransportKind>,
    /// The transport used (or that will be used on first contact); `None` if none can reach
    /// the peer.
    pub transport: Option<TransportKind>,
    /// Whether the link is already connected (links are made on first use).
    pub connected: bool,
    /// Why this transport.
    pub reason: String,
    /// Whether its bytes go over TLS (net-tcp with `OXCCL_TLS_*`).
    pub tls: bool,
    /// How GPU buffers cross this link, in words (`None`: neither side has a GPU).
    pub gpu_data: Option<String>,
}

/// A transport open for a communicator on this rank, and what its links can do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TransportUse {
    /// Which transport.
    pub transport: TransportKind,
    /// Memory kinds, RMA, endpoint limit, inline size, order.
    pub capabilities: oxccl_core::transport::Capabilities,
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
    /// The transports for ranks of this host it offers.
    pub host_offers: Vec<TransportKind>,
    /// Every other rank.
    pub peers: Vec<PeerLink>,
    /// The transports open on this rank (those its routes use).
    pub transports: Vec<TransportUse>,
    /// The communicator's name (its store prefix).
    pub name: String,
    /// Its traffic class.
    pub class: TrafficClass,
    /// The NIC endpoint it uses on this rank (net-libfabric), if any.
    pub endpoint: Option<EndpointUse>,
    /// What the budget held back on this rank (empty if nothing).
    pub net_note: String,
    /// The budget of each NIC this communicator uses, as its class sees it now: the limit,
    /// every lease on the host, what is reserved and what is left.
    pub nics: Vec<Budget>,
    /// The stripes and relay chains of the last broadcast from several roots, if any.
    pub striped: Option<oxccl_core::algo::StripedPlan>,
    /// How its TCP connections (store, net-tcp) prove they belong to the job
    /// (docs/security.md).
    pub auth: String,
}

/// Every communicator of this process, with the budgets of the NICs they use.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcessExplain {
    /// Process id.
    pub pid: u32,
    /// Every open communicator, oldest first.
    pub communicators: Vec<Explain>,
}

impl ProcessExplain {
    /// Plain text for people.
    pub fn to_text(&self) -> String {
        let mut s = format!("process {}: {} communicator(s)\n", self.pid, self.communicators.len());
        for c in &self.communicators {
            s += &c.to_text();
        }
        s
    }
}

/// Explains every communicator of this process that is not closed.
pub fn explain_process() -> ProcessExplain {
    let live: Vec<std::sync::Arc<Shared>> = {
        let reg = crate::shared::REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.iter().filter_map(std::sync::Weak::upgrade).collect()
    };
    let communicators = live
        .iter()
        .filter(|sh| !sh.closed.load(std::sync::atomic::Ordering::Relaxed))
        .map(|sh| explain_shared(sh))
        .collect();
    ProcessExplain { pid: std::process::id(), communicators }
}

impl Explain {
    /// Plain text for people.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "communicator {} (class {}): rank {} of {} on host '{}'; {} host(s); network transports allowed: {}\n",
            self.name,
            self.class,
            self.rank,
            self.world,
            self.host,
            self.hosts.len(),
            if self.net.is_empty() { "none".to_string() } else { self.net.join(", ") }
        );
        match &self.endpoint {
            Some(e) if e.dedicated => {
                s += &format!(
                    "  NIC endpoint: {} on '{}', endpoint {} of this process, leased for this communicator\n",
                    e.provider, e.nic, e.endpoint
                )
            }
            Some(e) => {
                s += &format!(
                    "  NIC endpoint: {} on '{}', shares endpoint {} of this process (opened for a {} communicator)\n",
                    e.provider, e.nic, e.endpoint, e.opened_for
                )
            }
            None => s += "  NIC endpoint: none\n",
        }
        s += &format!("  authentication: {}\n", self.auth);
        if !self.net_note.is_empty() {
            s += &format!("  budget: {}\n", self.net_note);
        }
        for b in &self.nics {
            s += &format!(
                "  NIC '{}': limit {} ({}), {} leased, {} left for {}; reserved: {}\n",
                b.nic,
                b.limit,
                b.limit_from,
                b.leased,
                b.free_for_class,
                self.class,
                b.reserved
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for l in &b.holders {
                s += &format!("    lease: {} ({}, pid {}): {} endpoint(s)\n", l.comm, l.class, l.pid, l.endpoints);
            }
        }
        for t in &self.transports {
            let c = &t.capabilities;
            s += &format!(
                "  transport {}: moves {:?}{}{}{}\n",
                t.transport,
                c.memory,
                if c.rma { ", RMA writes" } else { "" },
                if c.inline_bytes > 0 { format!(", inline up to {} B", c.inline_bytes) } else { String::new() },
                c.endpoint_limit.map(|n| format!(", endpoint limit {n}")).unwrap_or_default(),
            );
        }
        if let Some(p) = &self.striped {
            s += &describe_striped(p, &self.hosts, "last call");
        }
        for p in &self.peers {
            s += &format!(
                "  peer {:>4}  {:<13} {:<10} {}{}\n",
                p.peer,
                p.transport.map(|t| t.name()).unwrap_or("unreachable"),
                if p.connected { "connected" } else { "not yet" },
                p.reason,
                if p.tls { "; over TLS" } else { "" }
            );
            if let Some(g) = &p.gpu_data {
                s += &format!("              {g}\n");
            }
        }
        s
    }
}

/// A [`StripedPlan`](oxccl_core::algo::StripedPlan) in words: who sends, why, and the
/// chain of every stripe.
/// `when` says which call it was (e.g. "last call").
pub fn describe_striped(p: &oxccl_core::algo::StripedPlan, hosts: &[Vec<usize>], when: &str) -> String {
    let host = |r: usize| hosts.iter().position(|g| g.contains(&r)).map_or("?".to_string(), |h| h.to_string());
    let list = |v: &[usize]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
    let count: usize = p.stripes.iter().map(|s| s.len).sum();
    let mut s = format!(
        "  broadcast from roots [{}] ({when}: {count} elements): sources [{}]{}; {} stripe(s), each sent by one source and relayed down its chain (host of each rank in brackets):\n",
        list(&p.roots),
        list(&p.sources),
        if p.sources.len() < p.roots.len() {
            " (one root per host sends: two senders on one host would share its NIC)"
        } else {
            ""
        },
        p.stripes.len()
    );
    for (i, st) in p.stripes.iter().enumerate() {
        let chain: Vec<String> = st.chain.iter().map(|&r| format!("{r}[h{}]", host(r))).collect();
        s += &format!("    stripe {i}: elements {}..{}: {}\n", st.offset, st.offset + st.len, chain.join(" -> "));
    }
    s
}

/// How GPU buffers cross a link of transport `t` between `me` and `peer`, in words.
fn gpu_path(
    t: TransportKind,
    me: &oxccl_core::topo::PeerInfo,
    peer: &oxccl_core::topo::PeerInfo,
    st: &oxccl_core::staging::Staging,
) -> Option<String> {
    if me.gpus == 0 && peer.gpus == 0 {
        return None;
    }
    if registry::moves_device_memory(t) {
        return Some(format!(
            "GPU data moves GPU to GPU ({t}: the sender's copy engine writes the receiver's buffer, opened through \
             CUDA IPC; handshakes and host buffers go through {t}'s own shared-memory rings)"
        ));
    }
    if registry::gpu_direct_pair(t, me, peer) {
        return Some(format!(
            "GPU data moves straight from and to GPU memory ({t} registers it with FI_HMEM on both sides: GPUDirect \
             RDMA; reducing receives land their pieces in GPU bounce buffers), except a small message's payload, which \
             rides in its head through host memory"
        ));
    }
    let (who, note) = match (me.gpus > 0, peer.gpus > 0) {
        (true, true) => ("each side's GPU copies", ""),
        (true, false) => ("this rank's GPU copies", "; the peer has no GPU: its host buffers go in the same pieces"),
        _ => ("the peer's GPU copies", "; this rank has no GPU: its host buffers go in the same pieces"),
    };
    let what = if me.gpu_direct.contains(&t) || peer.gpu_direct.contains(&t) {
        format!("{t} moves GPU memory directly on one side only")
    } else {
        format!("{t} moves host memory only")
    };
    Some(format!(
        "GPU data staged through host memory ({what}): {who} each {} piece into or out of \
         one of {} pinned bounce buffers per direction{note}",
        oxccl_core::config::format_size(st.piece),
        st.slots
    ))
}

impl Communicator {
    /// Which transport every peer link uses (or will use on first contact) and why; the
    /// communicator's class, its NIC endpoint and the budgets of the NICs it uses.
    pub fn explain(&self) -> Explain {
        explain_shared(&self.shared)
    }
}

fn explain_shared(sh: &Shared) -> Explain {
    let m = &sh.meta;
    let me = &m.peers[m.rank];
    let (connected, cfg, hosts, open, striped) = match sh.state.lock() {
        Ok(s) => (s.link_kinds(), s.cfg.clone(), s.hosts().to_vec(), s.capabilities(), s.last_striped.clone()),
        Err(_) => (Vec::new(), crate::Config::defaults().into_core(), Vec::new(), Vec::new(), None),
    };
    let transports =
        open.into_iter().map(|(transport, capabilities)| TransportUse { transport, capabilities }).collect();
    let split = |v: &[TransportKind]| -> (Vec<TransportKind>, Vec<TransportKind>) {
        v.iter().partition(|k| !registry::is_local(**k))
    };
    let peers = (0..m.world)
        .filter(|&p| p != m.rank)
        .map(|p| {
            let host = m.peers[p].host_id.clone();
            let live = connected.iter().find(|(q, _)| *q == p).map(|(_, k)| *k);
            let (transport, reason) = registry::route(me, &m.peers[p]);
            let (offers, host_offers) = split(&m.peers[p].offers);
            PeerLink {
                peer: p,
                host,
                offers,
                host_offers,
                transport: live.or(transport),
                connected: live.is_some(),
                reason,
                tls: live.or(transport) == Some(TransportKind::NetTcp) && cfg.auth.tls().is_some(),
                gpu_data: live.or(transport).and_then(|t| gpu_path(t, me, &m.peers[p], &cfg.staging)),
            }
        })
        .collect();
    let nics = m
        .endpoint
        .iter()
        .filter_map(|e| {
            let ledger = Ledger::for_config(&cfg);
            let leases = ledger.leases().ok()?;
            Some(budget::budget(&e.nic, (e.limit, &e.limit_from), &cfg.budget, m.class, &leases))
        })
        .collect();
    let (offers, host_offers) = split(&me.offers);
    Explain {
        rank: m.rank,
        world: m.world,
        host: me.host_id.clone(),
        hosts,
        net: registry::nets_named(&cfg),
        offers,
        host_offers,
        peers,
        transports,
        name: m.name.clone(),
        class: m.class,
        endpoint: m.endpoint.clone(),
        net_note: me.net_note.clone(),
        nics,
        striped,
        auth: cfg.auth.describe(),
    }
}
