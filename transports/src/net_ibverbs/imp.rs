//! net-ibverbs offered and opened (feature `ibverbs`): the port chosen, the queue pairs leased
//! from the host's ledger, one RC queue pair per peer connected through the store, each link
//! the protocol core over it ([`RcVerbs`] over [`IbQp`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oxccl_core::budget::{EndpointUse, ProviderLimits, TrafficClass};
use oxccl_core::link::{Link, TransportKind};
use oxccl_core::mem::MemKinds;
use oxccl_core::proto::rc::RcVerbs;
use oxccl_core::proto::{ChannelCfg, VerbsLink, Wire, LARGE_HEAD};
use oxccl_core::store::Store;
use oxccl_core::transport::{Capabilities, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Wait};
use oxccl_core::{Error, Result};

use super::select::choose_gid;
use super::IbSettings;
use crate::ibverbs::qp::{IbQp, Port, QpAddr};
use crate::ledger::{Ledger, Take};

/// Bytes of a head buffer, and of the largest message sent whole in it.
const HEAD_BYTES: usize = 4096;
/// The protocol's shape: 4 KiB heads, 12-bit piece numbers (as the immediate carries them).
const WIRE: Wire = Wire { inline: HEAD_BYTES - LARGE_HEAD, max_pieces: (1 << 12) - 3 };
/// Pieces of tagged messages (reducing receives) and receive slots: 64 KiB.
const CHUNK: usize = 64 << 10;
/// Receive slots per queue pair, and send work requests.
const SLOTS: u32 = 32;
const SEND_DEPTH: u32 = 128;
/// A waiting rank polls the completion queues this often.
const NAP: Duration = Duration::from_micros(100);

/// The port found and the queue pairs leased.
struct IbPlan {
    hca: String,
    port: u8,
    gid_index: u32,
    info: EndpointUse,
}

/// The first usable port `s` allows: (HCA, port, GID index, what the HCA reports).
fn pick(s: &IbSettings) -> std::result::Result<(String, u8, u32, crate::ibverbs::HcaInfo), String> {
    let (hcas, errors) = crate::ibverbs::probe().map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for h in &hcas {
        for p in h.ports.iter().filter(|p| s.hca.allows(&h.name, p.num)) {
            if !p.active {
                seen.push(format!("{}:{} ({})", h.name, p.num, p.state));
                continue;
            }
            match choose_gid(p.link, &p.gids, s.gid_index) {
                Ok(g) => return Ok((h.name.clone(), p.num, g, h.clone())),
                Err(why) => seen.push(format!("{}:{} ({why})", h.name, p.num)),
            }
        }
    }
    seen.extend(errors);
    Err(format!(
        "no usable RDMA port: {}",
        if seen.is_empty() { "none that OXCCL_IB_HCA allows".into() } else { seen.join("; ") }
    ))
}

/// Offered only where `OXCCL_NET` names it (it has not run on hardware yet), with a port to
/// use and queue pairs the host's ledger grants this communicator's class: one per peer on
/// another host.
pub(super) fn offer(s: &IbSettings, ctx: &OfferCtx<'_>) -> Offer {
    let named = ctx.cfg.net.as_ref().is_some_and(|n| n.iter().any(|n| n == "ibverbs"));
    if !named {
        return Offer::No(match super::usable_port(s) {
            Ok(p) => format!(
                "{p} found; net-ibverbs has not run on hardware yet, so it is used only where OXCCL_NET names it"
            ),
            Err(why) => why,
        });
    }
    let (hca, port, gid_index, h) = match pick(s) {
        Ok(x) => x,
        Err(why) => return Offer::No(why),
    };
    let me = &ctx.peers[ctx.rank];
    let want = ctx.peers.iter().filter(|p| p.host_id != me.host_id).count().max(1);
    let limit = ctx.cfg.budget.limit(&hca, h.max_qp);
    let ledger = Ledger::for_config(ctx.cfg);
    match ledger.take(&hca, h.max_qp, &ctx.cfg.budget, ctx.class, ctx.comm, want) {
        Ok(Take::Granted(guard, _)) => {
            let info = EndpointUse {
                nic: format!("{hca}:{port}"),
                provider: "ibverbs".into(),
                endpoint: 0,
                dedicated: true,
                opened_for: ctx.class,
                lease: Some(guard.lease.clone()),
                limit: limit.0,
                limit_from: limit.1.to_string(),
                provider_limits: ProviderLimits {
                    ep_cnt: h.max_qp,
                    mr_cnt: h.max_mr,
                    inject_size: 0,
                    max_msg_size: 1 << 31,
                    mr_mode: "every buffer registered (ibv_reg_mr)".into(),
                },
            };
            // The guard holds the lease until the plan (and then the opened transport) goes.
            Offer::Yes(Box::new((IbPlan { hca, port, gid_index, info }, guard)))
        }
        Ok(Take::Refused(budget)) => Offer::Refused(budget.refusal(ctx.class, ctx.comm)),
        Err(e) => Offer::Refused(e.to_string()),
    }
}

pub(super) fn open(plan: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
    let (plan, lease) = *plan
        .downcast::<(IbPlan, crate::ledger::LeaseGuard)>()
        .map_err(|_| Error::Internal("net-ibverbs opened with another transport's plan".into()))?;
    let port = Port::open(&plan.hca, plan.port, plan.gid_index)?;
    let nonce =
        ctx.nonce.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    Ok(Box::new(IbOpen {
        port,
        rank: ctx.rank,
        class: ctx.class,
        share: ctx.cfg.budget.share,
        nonce,
        pending: HashMap::new(),
        ready: HashMap::new(),
        remote: ctx.peers.iter().filter(|p| p.host_id != ctx.peers[ctx.rank].host_id).map(|p| p.rank).collect(),
        info: plan.info,
        _lease: lease,
    }))
}

/// The link of rank `me` to `peer` over a connected queue pair: the protocol core over
/// [`RcVerbs`].
pub(crate) fn link_over(
    qp: IbQp,
    (me, peer): (usize, usize),
    gate: Arc<oxccl_core::budget::ClassGate>,
    class: TrafficClass,
    nonce: u64,
) -> Result<Box<dyn Link>> {
    let verbs = RcVerbs::new(qp, SLOTS as usize, CHUNK.max(HEAD_BYTES), (TransportKind::NetIbverbs, peer))?;
    let cfg = ChannelCfg {
        kind: TransportKind::NetIbverbs,
        me,
        peer,
        wire: WIRE,
        head_bytes: HEAD_BYTES,
        head_slots: 16,
        bounce_slots: 4,
        send_chunk: CHUNK,
        recv_chunk: CHUNK,
        // Every message larger than a head goes by rendezvous: written into the receiver's
        // buffer (tagged pieces only for reducing receives).
        rma_min_send: WIRE.inline + 1,
        rma_min_recv: WIRE.inline + 1,
        rma_recv: true,
        has_rma: true,
        register: true,
        inject_bytes: 0,
        max_inflight: (SEND_DEPTH / 2) as usize,
        gate,
        class,
        nonce,
        device: None,
    };
    Ok(Box::new(VerbsLink::over(verbs, cfg)?))
}

/// net-ibverbs opened for a communicator.
struct IbOpen {
    port: Arc<Port>,
    rank: usize,
    class: TrafficClass,
    share: f64,
    nonce: u64,
    /// Queue pairs made and published, waiting for the peer's address.
    pending: HashMap<usize, IbQp>,
    /// Queue pairs ready to send (RTS), waiting for the peer's to be.
    ready: HashMap<usize, IbQp>,
    /// The peers on other hosts (those it leased queue pairs for).
    remote: Vec<usize>,
    info: EndpointUse,
    _lease: crate::ledger::LeaseGuard,
}

impl IbOpen {
    /// A store key of this communicator's incarnation: `what` from rank `from` to `to`.
    fn key(&self, what: &str, from: usize, to: usize) -> String {
        format!("ibverbs/{what}/{:x}/{from}/{to}", self.nonce)
    }
}

impl OpenTransport for IbOpen {
    fn kind(&self) -> TransportKind {
        TransportKind::NetIbverbs
    }
    fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
        if !self.remote.contains(&peer) {
            return Err(Error::Internal(format!(
                "net-ibverbs asked to reach rank {peer}, which is on this rank's host (its queue pairs are leased \
                 for peers on other hosts)"
            )));
        }
        // 1. A queue pair, its address published.
        if !self.pending.contains_key(&peer) && !self.ready.contains_key(&peer) {
            let qp = IbQp::create(&self.port, peer, SEND_DEPTH, SLOTS)?;
            store.set(&self.key("qp", self.rank, peer), &qp.addr().encode())?;
            self.pending.insert(peer, qp);
        }
        // 2. The peer's address: RTR and RTS, then say so. A queue pair receives nothing
        // before RTR, so neither side sends before the other has said it is ready.
        if let Some(mut qp) = self.pending.remove(&peer) {
            let Some(bytes) = store.try_get(&self.key("qp", peer, self.rank))? else {
                self.pending.insert(peer, qp);
                return Ok(None);
            };
            let remote = QpAddr::decode(&bytes).map_err(|e| Error::Remote { rank: peer, what: e })?;
            qp.connect(&remote)?;
            store.set(&self.key("ready", self.rank, peer), b"1")?;
            self.ready.insert(peer, qp);
        }
        // 3. The peer ready too: the link.
        if store.try_get(&self.key("ready", peer, self.rank))?.is_none() {
            return Ok(None);
        }
        let qp = self.ready.remove(&peer).expect("made ready above");
        tracing::debug!(rank = self.rank, peer, port = %self.info.nic, "net-ibverbs: queue pair connected");
        let gate = oxccl_core::budget::gate(&self.info.nic, self.share);
        Ok(Some(link_over(qp, (self.rank, peer), gate, self.class, self.nonce)?))
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            memory: MemKinds::HOST,
            rma: true,
            endpoint_limit: Some(self.info.limit),
            inline_bytes: 0,
            ordered: true,
        }
    }
    fn wait(&self) -> Wait {
        Wait::Poll { nap: NAP }
    }
    fn endpoint(&self) -> Option<EndpointUse> {
        Some(self.info.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxccl_core::conformance::{self, LinkPair};

    /// Pairs of links between two queue pairs of one port of this host (loopback).
    struct Loopback {
        port: Arc<Port>,
        seq: u64,
    }

    impl LinkPair for Loopback {
        fn name(&self) -> String {
            format!("net-ibverbs loopback on {}:{}", self.port.name, self.port.num)
        }
        fn piece(&self) -> usize {
            CHUNK
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            self.seq += 1;
            let mut a = IbQp::create(&self.port, 1, SEND_DEPTH, SLOTS).expect("queue pair");
            let mut b = IbQp::create(&self.port, 0, SEND_DEPTH, SLOTS).expect("queue pair");
            let (aa, ba) = (a.addr(), b.addr());
            a.connect(&ba).expect("connect");
            b.connect(&aa).expect("connect");
            let gate = oxccl_core::budget::gate(&format!("ibverbs-test-{}", self.seq), 1.0);
            (
                link_over(a, (0, 1), gate.clone(), TrafficClass::Bulk, self.seq).expect("link"),
                link_over(b, (1, 0), gate, TrafficClass::Bulk, self.seq).expect("link"),
            )
        }
        fn notices_a_closed_peer(&self) -> std::result::Result<(), String> {
            Err("an RC queue pair learns of its peer's end only by the goodbye, or from the engine's loss \
                 detection"
                .into())
        }
    }

    /// The whole Link conformance suite over a real HCA: two queue pairs of one port
    /// connected to each other. Needs an RDMA device: `OXCCL_TEST_IB_DEVICE=mlx5_0:1` (or
    /// `rxe0:1` for soft-RoCE) `cargo test -p oxccl-transports --features ibverbs -- --ignored
    /// ib_`; docs/transports.md.
    #[test]
    #[ignore = "needs an RDMA device (OXCCL_TEST_IB_DEVICE=hca:port)"]
    fn ib_links_keep_the_link_contract_on_a_real_hca() {
        let dev = std::env::var("OXCCL_TEST_IB_DEVICE").expect("OXCCL_TEST_IB_DEVICE=hca:port names the device");
        let (hca, port) = dev.split_once(':').unwrap_or((dev.as_str(), "1"));
        let port: u8 = port.parse().expect("a port number");
        let s = IbSettings {
            hca: super::super::select::HcaSpec::parse(&format!("={hca}:{port}")).unwrap(),
            gid_index: None,
        };
        let (name, num, gid, h) = pick(&s).unwrap_or_else(|why| panic!("{dev}: {why}"));
        println!("{name}:{num}, GID index {gid}, max_qp {}", h.max_qp);
        let port = Port::open(&name, num, gid).expect("open the port");
        conformance::run(&mut Loopback { port, seq: 0 });
    }
}
