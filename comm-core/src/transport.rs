//! The seam every transport plugs into.
//!
//! A transport is a [`Transport`]: one `static` value registered, in priority order, in the
//! `oxccl` crate's registry. Creating a communicator runs the same steps for every registered
//! transport, so the engine, the communicator and `explain` name none of them:
//!
//! 1. **Offer.** Each transport that could reach some peer ([`Transport::can_connect`]) and
//!    that the settings allow (`OXCCL_NET` filters and orders the network ones) is asked to
//!    [`Transport::offer`] itself: available here or not (and why), and what the endpoint
//!    budget grants. The rank publishes the kinds it offers, in its order of preference.
//! 2. **Route.** Every pair of ranks takes the first transport of the lower rank's offers
//!    that the higher rank offers too and that can connect the two ([`route`]); both sides
//!    compute the same answer, with the reason in words.
//! 3. **Open.** A transport that carries at least one of this rank's routes is
//!    [`Transport::open`]ed for the communicator: an [`OpenTransport`], which makes the
//!    [`Link`]s to peers on first use ([`OpenTransport::connect`], never blocking), says how a
//!    waiting rank sleeps ([`OpenTransport::wait`]), what it can carry
//!    ([`OpenTransport::capabilities`]) and what NIC endpoint it holds (for `explain`).
//!
//! Dropping an [`OpenTransport`] lets go of everything it holds (sockets, segments, the NIC
//! endpoint and its lease); [`OpenTransport::close`] is the orderly end before that.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::{EndpointUse, TrafficClass};
use crate::config::{Config, Knob};
use crate::link::{Link, TransportKind};
use crate::mem::MemKinds;
use crate::store::Store;
use crate::topo::PeerInfo;
use crate::Result;

/// Which peers a transport can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Processes of this host (same host identity): `p2p`, `host-staging`.
    Host,
    /// Processes of other hosts: `net-*`.
    Network,
}

/// What an opened transport can do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// The kinds of memory its links move (a buffer of another kind is refused before any
    /// byte moves).
    pub memory: MemKinds,
    /// Whether large messages are written straight into the receiver's buffer (RMA).
    pub rma: bool,
    /// Endpoints (queue pairs) the device allows, where the transport uses a NIC.
    pub endpoint_limit: Option<usize>,
    /// Largest message sent inline, done when the post returns (0: none).
    pub inline_bytes: usize,
    /// Messages of a link arrive in the order they were posted, whatever their sizes. Every
    /// OxCCL transport guarantees it; the field says so in `explain`.
    pub ordered: bool,
}

/// Puts a waiting rank to sleep until a peer wakes it (host-staging's doorbell).
pub trait Sleeper: Send + Sync {
    /// Sleeps until woken, `timeout` passes, or `ready()` (checked after this rank is marked
    /// asleep, so no wake-up is lost) finds work.
    fn sleep(&self, timeout: Duration, ready: &mut dyn FnMut() -> bool);
}

/// How a rank with nothing to do waits for a transport's links.
#[derive(Clone)]
pub enum Wait {
    /// Peers wake it through a doorbell. Used when this is the only transport the rank has
    /// open; otherwise the rank sleeps in `poll()` on the others' descriptors for at most
    /// `nap` at a time.
    Doorbell {
        /// The doorbell.
        sleeper: Arc<dyn Sleeper>,
        /// Longest `poll()` nap while other transports are open too.
        nap: Duration,
    },
    /// Sleep in `poll()` on the descriptors of the transport and its links
    /// ([`OpenTransport::wait_fds`], [`Link::wait_fds`]), for at most `nap` at a time
    /// (providers that move data only when polled need short naps).
    Poll {
        /// Longest nap.
        nap: Duration,
    },
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Doorbell { nap, .. } => write!(f, "Doorbell {{ nap: {nap:?} }}"),
            Wait::Poll { nap } => write!(f, "Poll {{ nap: {nap:?} }}"),
        }
    }
}

/// What a transport is given when asked to offer itself.
#[derive(Debug, Clone, Copy)]
pub struct OfferCtx<'a> {
    /// The communicator's settings.
    pub cfg: &'a Config,
    /// The communicator's traffic class.
    pub class: TrafficClass,
    /// The communicator's name (store prefix and rank), for leases and logs.
    pub comm: &'a str,
    /// This rank.
    pub rank: usize,
    /// Every rank's host identity and class (no offers yet).
    pub peers: &'a [PeerInfo],
}

/// What a transport granted when it offered itself, handed back to [`Transport::open`]
/// (a lease on a NIC endpoint, say). Dropping it undoes it.
pub type Plan = Box<dyn Any + Send>;

/// A transport's answer to [`Transport::offer`].
pub enum Offer {
    /// Offered, with what was granted.
    Yes(Plan),
    /// Not available here, and why (no provider, no device, not built in).
    No(String),
    /// Available, but the endpoint budget has nothing for this communicator's class: why, in
    /// words that name the NIC, the limit and the holders. Transports after it that are
    /// [`Transport::fallback`]s are offered only if the class may fall back.
    Refused(String),
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offer::Yes(_) => f.write_str("Yes"),
            Offer::No(why) => write!(f, "No({why:?})"),
            Offer::Refused(why) => write!(f, "Refused({why:?})"),
        }
    }
}

/// What a transport is given when opened for a communicator.
#[derive(Clone, Copy)]
pub struct OpenCtx<'a> {
    /// The communicator's settings.
    pub cfg: &'a Config,
    /// The communicator's traffic class.
    pub class: TrafficClass,
    /// The communicator's own store (keys are private to it).
    pub store: &'a dyn Store,
    /// This rank.
    pub rank: usize,
    /// Every rank, with what it offers.
    pub peers: &'a [PeerInfo],
    /// For a transport of one host ([`Scope::Host`]): the ranks of this host that open it too
    /// (this one included, in rank order): those with a route over it. What it sets up for
    /// the ranks of the host together (host-staging's doorbells) is shared by these only.
    /// Empty for network transports.
    pub opening: &'a [usize],
    /// A value unique to this communicator, the same on every rank (for file names).
    pub nonce: &'a str,
    /// When creation must be done.
    pub deadline: Instant,
}

impl std::fmt::Debug for OpenCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCtx").field("rank", &self.rank).field("world", &self.peers.len()).finish_non_exhaustive()
    }
}

/// One way of moving bytes between ranks, as registered.
pub trait Transport: Send + Sync {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Which peers it can reach.
    fn scope(&self) -> Scope;
    /// The name `OXCCL_NET` gives a network transport (`tcp`, `libfabric`); `None` for the
    /// transports of one host, which are always offered where they can connect.
    fn net_name(&self) -> Option<&'static str> {
        None
    }
    /// True for a transport that stands in when a NIC has no endpoint left for a class
    /// (net-tcp): offered after a [`Offer::Refused`] only if the class may fall back
    /// (`OXCCL_TCP_FALLBACK`).
    fn fallback(&self) -> bool {
        false
    }
    /// Its settings, each declared once (name, default, what it does); their values are
    /// read with [`Config::value`] and checked by [`Transport::check_settings`].
    fn settings(&self) -> &'static [Knob] {
        &[]
    }
    /// Checks its settings' values, with an error naming the setting and what it expects.
    fn check_settings(&self, cfg: &Config) -> Result<()> {
        let _ = cfg;
        Ok(())
    }
    /// Whether it can connect `me` and `peer` (cheap, no side effects, symmetric). By
    /// default: the same host for [`Scope::Host`], different hosts for [`Scope::Network`].
    fn can_connect(&self, me: &PeerInfo, peer: &PeerInfo) -> bool {
        match self.scope() {
            Scope::Host => me.host_id == peer.host_id,
            Scope::Network => me.host_id != peer.host_id,
        }
    }
    /// Keys of the communicator's store this rank writes for the transport that are of no use
    /// once the rank is gone (its address): the store deletes them when it loses the rank.
    fn rank_keys(&self, rank: usize) -> Vec<String> {
        let _ = rank;
        Vec::new()
    }
    /// Whether it can be offered here, and what the budget grants (asks the device, opens
    /// nothing that the plan does not hold).
    fn offer(&self, ctx: &OfferCtx<'_>) -> Offer;
    /// Whether the links of what [`Transport::offer`] granted move this rank's GPU memory
    /// themselves (net-libfabric with FI_HMEM: GPUDirect RDMA). Published with the offers; a
    /// pair where both sides say so moves GPU buffers on the link, any other pair with a GPU
    /// stages them through host memory. By default: no.
    fn gpu_direct(&self, ctx: &OfferCtx<'_>, plan: &Plan) -> bool {
        let _ = (ctx, plan);
        false
    }
    /// Opens it for a communicator, with what [`Transport::offer`] granted. Collective over
    /// the ranks this transport carries routes of; bounded by `ctx.deadline`.
    fn open(&self, plan: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>>;
}

/// A transport opened for one communicator on one rank.
pub trait OpenTransport: Send {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// Starts or finishes the link to `peer`; never blocks. `Ok(None)`: not there yet, call
    /// again.
    fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>>;
    /// What its links can do.
    fn capabilities(&self) -> Capabilities;
    /// How a waiting rank sleeps on it.
    fn wait(&self) -> Wait;
    /// Descriptors of the transport itself (not its links) a sleeping rank polls, with
    /// whether writability (`true`) or readability (`false`) matters: a listener that
    /// connecting peers knock on, say.
    fn wait_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        let _ = out;
    }
    /// The NIC endpoint it holds, for `explain` and the budget.
    fn endpoint(&self) -> Option<EndpointUse> {
        None
    }
    /// The orderly end, before it is dropped: waits at most until `deadline` for what peers
    /// still need from it (host-staging: until every local rank has mapped the doorbells).
    fn close(self: Box<Self>, store: &dyn Store, deadline: Instant) {
        let _ = (store, deadline);
    }
    /// The end after an abort or a failure: lets go at once of what others need (a NIC
    /// endpoint and its lease), waiting for nobody. What peers may still need (host-staging's
    /// doorbells, which a slower rank may not have mapped yet) it hands back, to be closed
    /// with the communicator. By default: nothing kept, it is dropped.
    fn abort(self: Box<Self>) -> Option<Box<dyn OpenTransport>> {
        None
    }
}

fn names(v: &[TransportKind]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }
}

/// How `me` reaches `peer`: [`route`] without the words.
pub fn route_kind(table: &[&dyn Transport], me: &PeerInfo, peer: &PeerInfo) -> Option<TransportKind> {
    let (lo, hi) = if me.rank < peer.rank { (me, peer) } else { (peer, me) };
    let connects = |k: TransportKind| table.iter().find(|t| t.kind() == k).is_some_and(|t| t.can_connect(lo, hi));
    lo.offers.iter().copied().find(|k| hi.offers.contains(k) && connects(*k))
}

/// How `me` reaches `peer` and why, in words for logs and `explain`: the first transport of
/// the lower-numbered rank's offers that the other offers too and that can connect the pair
/// (so both sides agree even when their orders differ). `None` when nothing can.
pub fn route(table: &[&dyn Transport], me: &PeerInfo, peer: &PeerInfo) -> (Option<TransportKind>, String) {
    let (lo, hi) = if me.rank < peer.rank { (me, peer) } else { (peer, me) };
    let get = |k: TransportKind| table.iter().find(|t| t.kind() == k);
    let connects = |k: TransportKind| get(k).is_some_and(|t| t.can_connect(lo, hi));
    let same_host = me.host_id == peer.host_id;
    // What the budget or the machine held back on either side, said with the route.
    let notes: String = [me, peer]
        .iter()
        .filter(|p| !p.net_note.is_empty())
        .map(|p| format!("; rank {}: {}", p.rank, p.net_note))
        .collect();
    let found = route_kind(table, me, peer);
    let scope_of = |k: TransportKind| get(k).map(|t| t.scope());
    let why = match found {
        Some(k) if same_host && scope_of(k) == Some(Scope::Host) => {
            let local: Vec<TransportKind> =
                lo.offers.iter().copied().filter(|k| scope_of(*k) == Some(Scope::Host)).collect();
            format!(
                "same host ('{}'); {} is the first of rank {}'s transports for this host ({}) that rank {} offers too",
                peer.host_id,
                k.name(),
                lo.rank,
                names(&local),
                hi.rank
            )
        }
        Some(k) => {
            let nets: Vec<TransportKind> =
                lo.offers.iter().copied().filter(|k| scope_of(*k) == Some(Scope::Network)).collect();
            format!(
                "{} ('{}'); {} is the first of rank {}'s network transports ({}) that rank {} offers too",
                if same_host { "same host, no transport of the host in common" } else { "other host" },
                peer.host_id,
                k.name(),
                lo.rank,
                names(&nets),
                hi.rank
            )
        }
        None => {
            let reach =
                |p: &PeerInfo| -> Vec<TransportKind> { p.offers.iter().copied().filter(|k| connects(*k)).collect() };
            if same_host {
                format!(
                    "same host ('{}') and no transport in common that connects it: this rank offers {}, rank {} offers {}",
                    peer.host_id,
                    names(&reach(me)),
                    peer.rank,
                    names(&reach(peer))
                )
            } else {
                format!(
                    "other host ('{}') and no network transport in common: this rank offers {}, rank {} offers {} (OXCCL_NET)",
                    peer.host_id,
                    names(&reach(me)),
                    peer.rank,
                    names(&reach(peer))
                )
            }
        }
    };
    (found, why + &notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use TransportKind::*;

    /// A transport that is only a kind and a scope.
    struct Fake(TransportKind, Scope);
    impl Transport for Fake {
        fn kind(&self) -> TransportKind {
            self.0
        }
        fn scope(&self) -> Scope {
            self.1
        }
        fn offer(&self, _: &OfferCtx<'_>) -> Offer {
            Offer::No("fake".into())
        }
        fn open(&self, _: Plan, _: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
            Err(crate::Error::Unsupported("fake".into()))
        }
    }
    static HS: Fake = Fake(HostStaging, Scope::Host);
    static LF: Fake = Fake(NetLibfabric, Scope::Network);
    static TCP: Fake = Fake(NetTcp, Scope::Network);
    static TABLE: [&dyn Transport; 3] = [&HS, &LF, &TCP];

    fn info(rank: usize, host: &str, offers: &[TransportKind]) -> PeerInfo {
        PeerInfo { offers: offers.to_vec(), ..PeerInfo::new(rank, host, 1) }
    }

    fn r(me: &PeerInfo, peer: &PeerInfo) -> (Option<TransportKind>, String) {
        route(&TABLE, me, peer)
    }

    #[test]
    fn budget_notes_are_said_with_the_route() {
        let a = info(0, "a", &[HostStaging, NetLibfabric, NetTcp]);
        let b = PeerInfo { net_note: "NIC 'eth0' has no endpoint".into(), ..info(1, "b", &[NetTcp]) };
        let (k, why) = r(&a, &b);
        assert_eq!(k, Some(NetTcp));
        assert!(why.ends_with("; rank 1: NIC 'eth0' has no endpoint"), "{why}");
        let c = PeerInfo { net_note: "no endpoint, no fallback".into(), ..info(1, "b", &[]) };
        let (k, why) = r(&a, &c);
        assert_eq!(k, None);
        assert!(why.contains("no network transport in common") && why.contains("no fallback"), "{why}");
    }

    #[test]
    fn routes_follow_host_and_the_shared_network_transports() {
        let a = info(0, "a", &[HostStaging, NetLibfabric, NetTcp]);
        let (k, why) = r(&a, &info(1, "a", &[HostStaging]));
        assert_eq!(k, Some(HostStaging));
        assert!(why.contains("same host") && why.contains("host-staging is the first"), "{why}");
        let (k, why) = r(&a, &info(1, "b", &[NetTcp]));
        assert_eq!(k, Some(NetTcp));
        assert!(why.contains("net-tcp is the first of rank 0's") && why.contains("net-libfabric, net-tcp"), "{why}");
        assert!(why.contains("other host"), "{why}");
        // Both sides of a pair agree, whatever their own orders: the lower rank's order wins.
        let b = info(1, "b", &[NetTcp, NetLibfabric]);
        assert_eq!(r(&a, &b).0, Some(NetLibfabric));
        assert_eq!(r(&b, &a).0, Some(NetLibfabric));
        let (k, why) = r(&a, &info(3, "b", &[]));
        assert_eq!(k, None);
        assert!(why.contains("rank 3 offers none") && why.contains("this rank offers net-libfabric, net-tcp"), "{why}");
        // A description from a version that published no transports still parses.
        let old: PeerInfo = serde_json::from_str(r#"{"rank":2,"host_id":"h","pid":7}"#).unwrap();
        assert!(old.offers.is_empty());
    }

    #[test]
    fn a_transport_that_cannot_connect_the_pair_is_passed_over() {
        // Host staging offered on both sides but the ranks are on different hosts; a network
        // transport offered by both carries it.
        let a = info(0, "a", &[HostStaging, NetTcp]);
        let b = info(1, "b", &[HostStaging, NetTcp]);
        assert_eq!(r(&a, &b).0, Some(NetTcp));
        // Same host, no host transport in common: a network transport that can connect the
        // pair would do, but the default network scope reaches other hosts only.
        let c = info(1, "a", &[NetTcp]);
        let (k, why) = r(&a, &c);
        assert_eq!(k, None);
        assert!(why.contains("same host") && why.contains("no transport in common"), "{why}");
        // A kind nobody registered is never chosen.
        let d = info(1, "b", &[P2p, NetTcp]);
        let e = info(0, "a", &[P2p, NetTcp]);
        assert_eq!(r(&e, &d).0, Some(NetTcp));
    }
}
