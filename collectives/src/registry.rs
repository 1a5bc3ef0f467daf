//! The transports built into this library, in priority order, and the steps every one of
//! them goes through when a communicator is created: offer, route, open
//! ([`oxccl_core::transport`]). Nothing else in this crate names a concrete transport.
//!
//! Adding a transport: a module in `oxccl-transports` implementing
//! [`Transport`](oxccl_core::transport::Transport), and one line in [`TRANSPORTS`].

use oxccl_core::budget::TrafficClass;
use oxccl_core::config::{Config, GpuUse, Knob};
use oxccl_core::link::TransportKind;
use oxccl_core::mem::{LocalMem, MemKind};
use oxccl_core::topo::PeerInfo;
use oxccl_core::transport::{self, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Transport};
use oxccl_core::{Error, Result};

/// Every transport built in, highest priority first. A pair of ranks takes the first one
/// both offer that can connect them; `OXCCL_NET` filters and orders the network ones.
static TRANSPORTS: [&dyn Transport; 5] = [
    &oxccl_transports::p2p::P2P,
    &oxccl_transports::host_staging::HOST_STAGING,
    &oxccl_transports::net_libfabric::NET_LIBFABRIC,
    &oxccl_transports::net_ibverbs::NET_IBVERBS,
    &oxccl_transports::tcp::NET_TCP,
];

/// The registered transports, highest priority first.
pub fn transports() -> &'static [&'static dyn Transport] {
    &TRANSPORTS
}

/// The registered transport of `kind`.
pub(crate) fn get(kind: TransportKind) -> Option<&'static dyn Transport> {
    TRANSPORTS.iter().find(|t| t.kind() == kind).copied()
}

/// Every transport's settings, for building configurations.
pub(crate) fn knob_tables() -> Vec<&'static [Knob]> {
    TRANSPORTS.iter().map(|t| t.settings()).collect()
}

/// The names of the network transports `cfg` allows, in its order (what explain shows).
pub(crate) fn nets_named(cfg: &Config) -> Vec<String> {
    nets(cfg).iter().filter_map(|t| t.net_name()).map(String::from).collect()
}

/// The names `OXCCL_NET` knows.
fn net_names() -> Vec<&'static str> {
    TRANSPORTS.iter().filter_map(|t| t.net_name()).collect()
}

/// Checks what the core cannot: `OXCCL_NET` names transports that exist, each once, and
/// every transport's own settings.
pub(crate) fn check(cfg: &Config) -> Result<()> {
    let known = net_names();
    let given = || cfg.describe().into_iter().find(|(k, _, _)| k.name == "OXCCL_NET").map(|x| x.1).unwrap_or_default();
    let listed = cfg.net.as_deref().unwrap_or_default();
    if let Some(bad) = listed.iter().find(|n| !known.contains(&n.as_str())) {
        return Err(Error::invalid_arg(format!(
            "OXCCL_NET={:?}: unknown network transport '{bad}' (known: {}, auto, none)",
            given(),
            known.join(", ")
        )));
    }
    if let Some(twice) = listed.iter().enumerate().find(|(i, n)| listed[..*i].contains(n)).map(|(_, n)| n) {
        return Err(Error::invalid_arg(format!("OXCCL_NET={:?}: '{twice}' is named twice", given())));
    }
    if cfg.gpu == GpuUse::Simulated && !cfg!(feature = "simulated-gpu") {
        return Err(Error::invalid_arg(
            "OXCCL_GPU=simulated is for OxCCL's own tests: this build has no simulated GPU (the oxccl crate's \
             simulated-gpu feature); use auto or off",
        ));
    }
    TRANSPORTS.iter().try_for_each(|t| t.check_settings(cfg))
}

/// The network transports `cfg` allows, in its order: those `OXCCL_NET` names, or every one
/// built in, in priority order.
pub(crate) fn nets(cfg: &Config) -> Vec<&'static dyn Transport> {
    match &cfg.net {
        None => TRANSPORTS.iter().filter(|t| t.scope() == Scope::Network).copied().collect(),
        Some(names) => {
            names.iter().filter_map(|n| TRANSPORTS.iter().find(|t| t.net_name() == Some(n.as_str())).copied()).collect()
        }
    }
}

/// How `me` reaches `peer`, and why ([`transport::route`] over the registered transports).
pub(crate) fn route(me: &PeerInfo, peer: &PeerInfo) -> (Option<TransportKind>, String) {
    transport::route(&TRANSPORTS, me, peer)
}

/// How `me` reaches `peer`, without the words.
pub(crate) fn route_kind(me: &PeerInfo, peer: &PeerInfo) -> Option<TransportKind> {
    transport::route_kind(&TRANSPORTS, me, peer)
}

/// The ranks of `rank`'s host that open the host transport `kind`: those with a route over it
/// to another rank of the host (every rank computes the same list).
pub(crate) fn opening_here(kind: TransportKind, peers: &[PeerInfo], rank: usize) -> Vec<usize> {
    let host = &peers[rank].host_id;
    let local: Vec<&PeerInfo> = peers.iter().filter(|p| &p.host_id == host).collect();
    local
        .iter()
        .filter(|a| local.iter().any(|b| b.rank != a.rank && route_kind(a, b) == Some(kind)))
        .map(|a| a.rank)
        .collect()
}

/// Whether `kind` reaches ranks of this host only.
pub(crate) fn is_local(kind: TransportKind) -> bool {
    get(kind).is_some_and(|t| t.scope() == Scope::Host)
}

/// What a rank offers its peers.
pub(crate) struct Offers {
    /// The transports offered, in this rank's order of preference.
    pub kinds: Vec<TransportKind>,
    /// What was held back and why, in words (empty if nothing).
    pub note: String,
    /// What each offered transport was granted, to open it with.
    pub plans: Vec<(TransportKind, Plan)>,
    /// The offered transports whose links move this rank's GPU memory themselves.
    pub gpu_direct: Vec<TransportKind>,
}

/// Asks every transport that could reach one of this rank's peers to offer itself: those of
/// the host first, then the network ones `OXCCL_NET` names, in its order. A network
/// transport the budget refuses leaves the fallback after it (net-tcp) only to classes that
/// may fall back (`OXCCL_TCP_FALLBACK`).
pub(crate) fn offer(ctx: &OfferCtx<'_>) -> Offers {
    let (cfg, class, rank) = (ctx.cfg, ctx.class, ctx.rank);
    let me = &ctx.peers[rank];
    let reaches = |t: &dyn Transport| ctx.peers.iter().any(|p| p.rank != rank && t.can_connect(me, p));
    let explicit = cfg.is_set("OXCCL_NET");
    let mut order: Vec<&dyn Transport> = TRANSPORTS.iter().filter(|t| t.scope() == Scope::Host).copied().collect();
    order.extend(nets(cfg));
    let mut out = Offers { kinds: Vec::new(), note: String::new(), plans: Vec::new(), gpu_direct: Vec::new() };
    let mut refused: Option<(TransportKind, String)> = None;
    for t in order.into_iter().filter(|t| reaches(*t)) {
        let kind = t.kind();
        if let (true, Some((by, why))) = (t.fallback(), &refused) {
            if !fallback_allowed(cfg, class) {
                out.note = format!("{why}; {class} may not fall back to {kind} (OXCCL_TCP_FALLBACK)");
                continue;
            }
            tracing::warn!(rank, %class, "{}: {kind} instead of {by}: {why}", ctx.comm);
            out.note = format!("{kind} instead of {by} ({class} may fall back: OXCCL_TCP_FALLBACK): {why}");
        }
        match t.offer(ctx) {
            Offer::Yes(plan) => {
                tracing::debug!(rank, "{kind} offered");
                if t.gpu_direct(ctx, &plan) {
                    out.gpu_direct.push(kind);
                }
                out.kinds.push(kind);
                out.plans.push((kind, plan));
            }
            Offer::No(why) if explicit && t.scope() == Scope::Network => {
                // Asked for by name: the reason goes with this rank's routes (explain, and the
                // error if no pair can do without it).
                tracing::warn!(rank, "{kind} not offered: {why}");
                if out.note.is_empty() {
                    out.note = format!("{kind} not offered: {why}");
                }
            }
            Offer::No(why) => tracing::debug!(rank, "{kind} not offered: {why}"),
            Offer::Refused(why) => refused = Some((kind, why)),
        }
    }
    if let (Some((_, why)), true) = (refused, out.note.is_empty()) {
        out.note = why;
    }
    out
}

fn fallback_allowed(cfg: &Config, class: TrafficClass) -> bool {
    cfg.budget.tcp_fallback[class.index()]
}

/// The local memory work (copy, reduce, scale, scratch) for buffers of `kind`: the host
/// kernels for host memory; device memory has none in this build yet (docs/gpu.md).
pub(crate) fn local_mem(kind: MemKind, gpu: GpuUse) -> Result<&'static dyn LocalMem> {
    match kind {
        MemKind::Host | MemKind::PinnedHost => Ok(&oxccl_core::mem::HOST),
        #[cfg(feature = "simulated-gpu")]
        MemKind::Device(0) if gpu == GpuUse::Simulated => Ok(&oxccl_core::staging::fake::FAKE_DEVICE_MEM),
        MemKind::Device(n) if gpu == GpuUse::Off => {
            Err(Error::Unsupported(format!("memory of GPU {n}: GPU buffers are off (OXCCL_GPU=off)")))
        }
        #[cfg(feature = "cuda")]
        MemKind::Device(n) => Ok(oxccl_transports::cuda::gpu::gpu(n)?),
        #[cfg(not(feature = "cuda"))]
        MemKind::Device(n) => Err(Error::Unsupported(format!(
            "memory of GPU {n}: this build has no GPU support (build with the cuda feature; docs/gpu.md)"
        ))),
    }
}

/// GPUs this rank offers to stage data from: those the driver shows, unless `OXCCL_GPU=off`
/// or the build has no `cuda` feature.
pub(crate) fn gpus(cfg: &Config) -> u32 {
    match cfg.gpu {
        GpuUse::Off => 0,
        GpuUse::Simulated => u32::from(cfg!(feature = "simulated-gpu")),
        #[cfg(feature = "cuda")]
        GpuUse::Auto => oxccl_transports::cuda::gpu_count() as u32,
        #[cfg(not(feature = "cuda"))]
        GpuUse::Auto => 0,
    }
}

/// Ordering on callers' streams of GPU `n`, for one communicator.
pub(crate) fn stream_order(n: u32, gpu: GpuUse) -> Result<std::sync::Arc<dyn oxccl_core::stream::StreamOrder>> {
    #[cfg(feature = "simulated-gpu")]
    if gpu == GpuUse::Simulated {
        return Ok(std::sync::Arc::new(oxccl_core::stream::fake::FakeStreams::default()));
    }
    let _ = gpu;
    #[cfg(feature = "cuda")]
    {
        let g = oxccl_transports::cuda::gpu::gpu(n)?;
        Ok(std::sync::Arc::new(oxccl_transports::cuda::gpu::CudaStreamOrder::new(g)?))
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::Unsupported(format!("GPU {n}: this build has no GPU support (build with the cuda feature)")))
}

/// The GPU this rank's device buffers are on: the device of the context current on the
/// creating thread (as NCCL takes the current device; torch's `set_device` makes it), else 0.
pub(crate) fn current_gpu(cfg: &Config) -> u32 {
    #[cfg(feature = "cuda")]
    if cfg.gpu == GpuUse::Auto && oxccl_transports::cuda::gpu_count() > 0 {
        return oxccl_transports::cuda::current_device().unwrap_or(0);
    }
    let _ = cfg;
    0
}

/// This rank's GPU's PCI bus id, and those its memory is reachable from through CUDA IPC
/// (empty without p2p; the simulated GPU is the GPU of its process).
pub(crate) fn gpu_bus(cfg: &Config) -> (String, Vec<String>) {
    if !p2p_here(cfg) {
        return (String::new(), Vec::new());
    }
    if cfg.gpu == GpuUse::Simulated {
        let bus = oxccl_transports::p2p::simulated_bus(std::process::id());
        return (bus.clone(), vec![bus]);
    }
    #[cfg(feature = "cuda")]
    {
        let g = current_gpu(cfg);
        (oxccl_transports::cuda::bus_id(g).unwrap_or_default(), oxccl_transports::cuda::reach(g))
    }
    #[cfg(not(feature = "cuda"))]
    (String::new(), Vec::new())
}

/// Whether this rank offers `p2p` to ranks of its host: a GPU (real, or the simulated one
/// in OxCCL's tests) and `OXCCL_P2P` not off.
pub(crate) fn p2p_here(cfg: &Config) -> bool {
    oxccl_transports::p2p::offered_here(cfg, gpus(cfg))
}

/// Why this rank takes no GPU buffers, in words.
pub(crate) fn why_no_gpu(gpu: GpuUse) -> String {
    match gpu {
        GpuUse::Off => "GPU buffers are off here (OXCCL_GPU=off)".into(),
        GpuUse::Simulated => "this build has no simulated GPU".into(),
        #[cfg(feature = "cuda")]
        GpuUse::Auto => format!(
            "this process found no GPU ({})",
            oxccl_transports::cuda::probe().err().unwrap_or_else(|| "the driver shows none".into())
        ),
        #[cfg(not(feature = "cuda"))]
        GpuUse::Auto => "this build has no GPU support (build with the cuda feature; docs/gpu.md)".into(),
    }
}

/// Where a staged link of this rank gets its GPU's copier; `None` without GPUs.
pub(crate) fn device_source(me: &PeerInfo, gpu: GpuUse) -> Option<oxccl_core::staging::DeviceSource> {
    if me.gpus == 0 {
        return None;
    }
    #[cfg(feature = "simulated-gpu")]
    if gpu == GpuUse::Simulated {
        let seed = me.rank as u64 + 1;
        return Some(Box::new(move |n: u32| {
            if n != 0 {
                return Err(Error::invalid_arg(format!("the simulated GPU is GPU 0; got a buffer of GPU {n}")));
            }
            Ok(Box::new(oxccl_core::staging::fake::FakeGpu::new(seed, 2)) as Box<dyn oxccl_core::staging::DeviceCopies>)
        }));
    }
    let _ = gpu;
    #[cfg(feature = "cuda")]
    {
        Some(Box::new(|n: u32| {
            let g = oxccl_transports::cuda::gpu::gpu(n)?;
            Ok(Box::new(oxccl_transports::cuda::gpu::CudaCopies::new(g)?) as Box<dyn oxccl_core::staging::DeviceCopies>)
        }))
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Whether the pair's link stages GPU data through host memory: one side has a GPU, and the
/// transport moves host memory only, or GPU memory but not on both sides
/// ([`gpu_direct_pair`]).
pub(crate) fn stages_gpu_data(kind: TransportKind, me: &PeerInfo, peer: &PeerInfo) -> bool {
    (me.gpus > 0 || peer.gpus > 0) && !moves_device_memory(kind) && !gpu_direct_pair(kind, me, peer)
}

/// Whether the pair's network link moves GPU buffers itself: both ranks' links of `kind` do
/// (net-libfabric with FI_HMEM on both sides).
pub(crate) fn gpu_direct_pair(kind: TransportKind, me: &PeerInfo, peer: &PeerInfo) -> bool {
    me.gpu_direct.contains(&kind) && peer.gpu_direct.contains(&kind)
}

/// Whether a transport's links move device memory themselves (`p2p`).
pub(crate) fn moves_device_memory(kind: TransportKind) -> bool {
    kind == TransportKind::P2p
}

/// The transports opened for a communicator on one rank.
pub(crate) struct Opened {
    /// Each transport that carries at least one route.
    pub transports: Vec<Box<dyn OpenTransport>>,
    /// For each peer, the index of the transport that reaches it.
    pub routes: Vec<Option<usize>>,
}

/// Opens, for this rank, each offered transport that carries at least one of its routes (a
/// plan no route uses is dropped, and with it what it held: a NIC endpoint's lease).
pub(crate) fn open(plans: Vec<(TransportKind, Plan)>, ctx: &OpenCtx<'_>) -> Result<Opened> {
    let me = &ctx.peers[ctx.rank];
    let kinds: Vec<Option<TransportKind>> =
        ctx.peers.iter().map(|p| if p.rank == ctx.rank { None } else { route_kind(me, p) }).collect();
    let mut open: Vec<Box<dyn OpenTransport>> = Vec::new();
    for (kind, plan) in plans {
        if !kinds.contains(&Some(kind)) {
            continue;
        }
        let t = get(kind).ok_or_else(|| Error::Internal(format!("{kind} offered but not registered")))?;
        let opening = if t.scope() == Scope::Host { opening_here(kind, ctx.peers, ctx.rank) } else { Vec::new() };
        open.push(t.open(plan, &OpenCtx { opening: &opening, ..*ctx })?);
    }
    let routes = kinds.iter().map(|k| k.and_then(|k| open.iter().position(|t| t.kind() == k))).collect();
    Ok(Opened { transports: open, routes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(r: usize, host: &str, pid: u32, gpus: u32, p2p: bool) -> PeerInfo {
        // Every GPU of the test is one GPU on bus 17, reachable from itself.
        let bus = if gpus > 0 { "0000:17:00.0".to_string() } else { String::new() };
        // What each rank offers, in the registry's order: p2p where it has it, then the rest.
        let offers =
            [TransportKind::P2p, TransportKind::HostStaging, TransportKind::NetLibfabric, TransportKind::NetTcp]
                .into_iter()
                .filter(|k| p2p || *k != TransportKind::P2p)
                .collect();
        PeerInfo { gpus, p2p, offers, gpu_reach: vec![bus.clone()], gpu_bus: bus, ..PeerInfo::new(r, host, pid) }
    }

    /// Whether the pair's GPU data moves GPU to GPU: its route is p2p.
    fn p2p_pair(me: &PeerInfo, peer: &PeerInfo) -> bool {
        route_kind(me, peer) == Some(TransportKind::P2p)
    }

    /// Which path GPU data takes between a pair: GPU to GPU where both offer p2p (two
    /// processes of one host), else staged through host memory where either has a GPU, else
    /// nothing special; the same answer from both sides.
    #[test]
    fn the_path_of_gpu_data_for_each_pair() {
        use TransportKind::*;
        let gpu_a = rank(0, "h", 10, 1, true);
        let gpu_b = rank(1, "h", 11, 1, true);
        let no_p2p = rank(2, "h", 12, 1, false);
        let cpu = rank(3, "h", 13, 0, false);
        let other_host = rank(4, "g", 14, 1, true);
        for (a, b, kind, p2p, staged) in [
            (&gpu_a, &gpu_b, P2p, true, false),
            (&gpu_a, &no_p2p, HostStaging, false, true),
            (&gpu_a, &cpu, HostStaging, false, true),
            (&cpu, &rank(5, "h", 15, 0, false), HostStaging, false, false),
            (&gpu_a, &other_host, NetLibfabric, false, true),
        ] {
            for (x, y) in [(a, b), (b, a)] {
                assert_eq!(route_kind(x, y), Some(kind), "route {} -> {}", x.rank, y.rank);
                assert_eq!(p2p_pair(x, y), p2p, "p2p {} -> {} over {kind}", x.rank, y.rank);
                assert_eq!(stages_gpu_data(kind, x, y), staged, "staged {} -> {} over {kind}", x.rank, y.rank);
            }
        }
        assert!(stages_gpu_data(NetTcp, &gpu_a, &other_host));
        // Across hosts, GPU buffers go on the link itself only where both sides' links of
        // that transport move GPU memory (FI_HMEM): one-sided is staged.
        let direct = |p: &PeerInfo| PeerInfo { gpu_direct: vec![NetLibfabric], ..p.clone() };
        assert!(!stages_gpu_data(NetLibfabric, &direct(&gpu_a), &direct(&other_host)));
        assert!(gpu_direct_pair(NetLibfabric, &direct(&other_host), &direct(&gpu_a)));
        assert!(stages_gpu_data(NetLibfabric, &direct(&gpu_a), &other_host));
        assert!(stages_gpu_data(NetLibfabric, &gpu_a, &direct(&other_host)));
        assert!(stages_gpu_data(NetTcp, &direct(&gpu_a), &direct(&other_host)), "tcp moves host memory only");
        // Two ranks of one process (threads): CUDA IPC cannot open memory of the same process.
        let same = rank(6, "h", 10, 1, true);
        assert!(!p2p_pair(&gpu_a, &same));
        assert_eq!(route_kind(&gpu_a, &same), Some(HostStaging));
        assert!(stages_gpu_data(HostStaging, &gpu_a, &same));
        // The simulated GPU's handles are pointers: its p2p connects ranks of one process only.
        let sim = |r: usize, pid: u32| {
            let bus = oxccl_transports::p2p::simulated_bus(pid);
            PeerInfo { gpu_bus: bus.clone(), gpu_reach: vec![bus], ..rank(r, "h", pid, 1, true) }
        };
        assert!(p2p_pair(&sim(8, 30), &sim(9, 30)) && !p2p_pair(&sim(8, 30), &sim(9, 31)));
        // GPUs that cannot reach each other (each process sees its own GPU only, or two GPUs
        // that are not peers): staged; one-sided reach is no reach.
        let mut far = rank(7, "h", 17, 1, true);
        far.gpu_bus = "0000:65:00.0".into();
        far.gpu_reach = vec![far.gpu_bus.clone()];
        assert!(!p2p_pair(&gpu_a, &far) && !p2p_pair(&far, &gpu_a));
        assert_eq!(route_kind(&gpu_a, &far), Some(HostStaging));
        assert!(stages_gpu_data(HostStaging, &gpu_a, &far));
        far.gpu_reach.push("0000:17:00.0".into());
        assert!(!p2p_pair(&gpu_a, &far), "rank 0's GPU does not reach rank 7's");
        let mut near = gpu_a.clone();
        near.gpu_reach.push("0000:65:00.0".into());
        assert!(p2p_pair(&near, &far) && p2p_pair(&far, &near));
    }

    /// The ranks of a host that open a host transport are those with a route over it: a
    /// rank that reaches every local peer over p2p opens no host-staging, and the doorbells
    /// of host-staging are shared by the others only.
    #[test]
    fn a_host_transport_is_opened_by_the_ranks_that_route_over_it() {
        use TransportKind::*;
        // Ranks 0 and 1 reach each other over p2p; rank 2 has no GPU; rank 3 is elsewhere.
        let peers = vec![
            rank(0, "h", 10, 1, true),
            rank(1, "h", 11, 1, true),
            rank(2, "h", 12, 0, false),
            rank(3, "g", 13, 1, true),
        ];
        for r in 0..3 {
            assert_eq!(opening_here(P2p, &peers, r), vec![0, 1], "rank {r}");
            assert_eq!(opening_here(HostStaging, &peers, r), vec![0, 1, 2], "rank {r}");
        }
        let two = vec![peers[0].clone(), peers[1].clone()];
        assert_eq!(opening_here(HostStaging, &two, 0), Vec::<usize>::new());
        assert_eq!(opening_here(P2p, &peers, 3), Vec::<usize>::new());
    }

    #[test]
    fn every_transport_is_registered_once_with_settings_declared_once() {
        let mut kinds: Vec<TransportKind> = TRANSPORTS.iter().map(|t| t.kind()).collect();
        kinds.dedup();
        assert_eq!(kinds.len(), TRANSPORTS.len());
        // Building a configuration with every table checks that no name is declared twice.
        let cfg = Config::with_knobs(&knob_tables(), |_| None).unwrap();
        check(&cfg).unwrap();
        let doc = include_str!("../../docs/settings.md");
        for k in knob_tables().iter().flat_map(|t| t.iter()) {
            assert!(doc.contains(&format!("`{}`", k.name)), "{} is missing from docs/settings.md", k.name);
            // The table's "ranks" column says which settings are compared at creation
            // (OXCCL_CLASS too: the budget compares it).
            let row = doc.lines().find(|l| l.starts_with(&format!("| `{}` |", k.name))).expect("a table row");
            let ranks = row.split('|').nth(3).map(str::trim);
            let same = k.agree || k.name == "OXCCL_CLASS";
            assert_eq!(ranks, Some(if same { "same" } else { "may differ" }), "{}: {row}", k.name);
        }
    }

    #[test]
    fn oxccl_net_names_only_transports_that_exist() {
        let mut cfg = Config::with_knobs(&knob_tables(), |_| None).unwrap();
        cfg.set("OXCCL_NET", "tcp,infiniband").unwrap();
        let e = check(&cfg).unwrap_err().to_string();
        assert!(e.contains("unknown network transport 'infiniband'") && e.contains("libfabric, ibverbs, tcp"), "{e}");
        cfg.set("OXCCL_NET", "tcp,libfabric,tcp").unwrap();
        assert!(check(&cfg).unwrap_err().to_string().contains("'tcp' is named twice"));
        cfg.set("OXCCL_NET", "none").unwrap();
        check(&cfg).unwrap();
        assert!(nets(&cfg).is_empty());
        cfg.set("OXCCL_NET", "auto").unwrap();
        let auto: Vec<TransportKind> = nets(&cfg).iter().map(|t| t.kind()).collect();
        assert_eq!(
            auto,
            [TransportKind::NetLibfabric, TransportKind::NetIbverbs, TransportKind::NetTcp],
            "every one built in, in priority order"
        );
        // A transport's own setting is checked by the transport.
        cfg.set("OXCCL_TCP_STREAMS", "0").unwrap();
        assert!(check(&cfg).unwrap_err().to_string().contains("OXCCL_TCP_STREAMS"));
    }

    fn peers(hosts: &[&str]) -> Vec<PeerInfo> {
        hosts.iter().enumerate().map(|(r, h)| PeerInfo::new(r, *h, 1)).collect()
    }

    #[test]
    fn only_transports_that_reach_a_peer_are_offered() {
        let cfg = Config::with_knobs(&knob_tables(), |k| (k == "OXCCL_NET").then(|| "tcp".into())).unwrap();
        let ctx = |p: &[PeerInfo]| -> Vec<TransportKind> {
            let ps = p.to_vec();
            let c = OfferCtx { cfg: &cfg, class: TrafficClass::Bulk, comm: "test", rank: 0, peers: &ps };
            offer(&c).kinds
        };
        assert_eq!(ctx(&peers(&["a"])), vec![]);
        // Without a GPU p2p reaches nobody: not asked.
        assert_eq!(ctx(&peers(&["a", "a"])), vec![TransportKind::HostStaging]);
        assert_eq!(ctx(&peers(&["a", "b"])), vec![TransportKind::NetTcp]);
        assert_eq!(ctx(&peers(&["a", "a", "b"])), vec![TransportKind::HostStaging, TransportKind::NetTcp]);
    }
}
