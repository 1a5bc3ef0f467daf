//! `net-libfabric`: libfabric reliable-datagram endpoints (FI_EP_RDM) with tagged messages —
//! EFA on AWS, verbs, and here `tcp;ofi_rxm` and `shm`.
//!
//! One endpoint per process ([`SharedEndpoint`]), shared by every communicator of the process: a
//! message's 64-bit tag says which communicator slot of the receiving process it is for, the
//! sender's rank, the message's sequence number on its link and the piece. The receiver
//! publishes its slot and its endpoint address in the communicator's store; the sender puts
//! the peer's slot and its own rank in the tag, so receives need no source filtering (no
//! FI_DIRECTED_RECV) and a tag is never ambiguous.
//!
//! Provider choice: `OXCCL_LIBFABRIC_PROVIDER` (a name or a prefix: `efa`, `tcp`,
//! `tcp;ofi_rxm`, `shm`) and `OXCCL_LIBFABRIC_DOMAIN`, else efa, then verbs, then tcp, in
//! libfabric's order of domains. `shm` only when named: it reaches this host only.

mod addr;
pub mod fabric;
pub mod link;
mod sys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use oxccl_core::budget::{ClassGate, TrafficClass};

use oxccl_core::store::Store;
use oxccl_core::{Error, Result};

use fabric::{Completion, Endpoint, Provider};
pub use link::LibfabricLink;

const T: oxccl_core::link::TransportKind = oxccl_core::link::TransportKind::NetLibfabric;

/// Communicator slots per process (12 tag bits).
pub const SLOTS: usize = 1 << 12;
/// Largest rank a tag can carry (20 bits).
pub const MAX_RANKS: usize = 1 << 20;

/// Settings of net-libfabric.
#[derive(Debug, Clone, PartialEq)]
pub struct LibfabricConfig {
    /// Provider name or prefix (`OXCCL_LIBFABRIC_PROVIDER`); `None`: efa, verbs, tcp.
    pub provider: Option<String>,
    /// Domain name (`OXCCL_LIBFABRIC_DOMAIN`); `None`: the provider's first.
    pub domain: Option<String>,
    /// Largest piece of a message (`OXCCL_LIBFABRIC_CHUNK_BYTES`).
    pub chunk: usize,
    /// Register every buffer even where the provider does not ask for it
    /// (`OXCCL_LIBFABRIC_REGISTER=always`; tests use it so the path EFA needs runs here).
    pub register_always: bool,
    /// Messages of at least this many bytes go as RMA writes into the receiver's buffer
    /// (after it says where) when the provider offers them; 0: never.
    pub rma_min: usize,
    /// Traffic class of the communicator (bandwidth priority at the NIC's gate).
    pub class: TrafficClass,
    /// `OXCCL_CLASS_SHARE`.
    pub share: f64,
    /// The communicator's incarnation (the same on every rank): a link's goodbye carries it,
    /// so one from an earlier communicator that used the same slot is ignored.
    pub nonce: u64,
    /// The GPU whose memory the links move themselves (FI_HMEM with CUDA, GPUDirect RDMA):
    /// pieces and RMA writes straight from and to its buffers. `None`: host memory only
    /// (GPU data is staged through host memory above the link).
    pub gpu: Option<u32>,
}

impl Default for LibfabricConfig {
    fn default() -> Self {
        LibfabricConfig {
            provider: None,
            domain: None,
            chunk: 1 << 20,
            register_always: false,
            rma_min: 1 << 20,
            class: TrafficClass::Bulk,
            share: 1.0,
            nonce: 0,
            gpu: None,
        }
    }
}

/// The kernels of GPU `n`, where this build reaches GPUs (the `cuda` feature).
pub(crate) fn device_mem(n: u32) -> Option<&'static dyn oxccl_core::mem::LocalMem> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::gpu::gpu(n).ok().map(|g| g as &'static dyn oxccl_core::mem::LocalMem)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = n;
        None
    }
}

/// Default provider order when none is named.
const PREFERENCE: &[&str] = &["efa", "verbs", "tcp"];

fn matches(p: &Provider, cfg: &LibfabricConfig) -> bool {
    let name_ok = match &cfg.provider {
        Some(want) => {
            p.name == *want || p.name.starts_with(&format!("{want};")) || p.name.split(';').next() == Some(want)
        }
        None => PREFERENCE.iter().any(|pre| p.name.split(';').next() == Some(pre)),
    };
    name_ok && cfg.domain.as_ref().is_none_or(|d| p.domain == *d)
}

fn rank_of(p: &Provider) -> usize {
    PREFERENCE.iter().position(|pre| p.name.split(';').next() == Some(pre)).unwrap_or(PREFERENCE.len())
}

/// The provider this process would use, or why there is none. Only asks libfabric
/// (`fi_getinfo`); opens nothing.
pub fn probe(cfg: &LibfabricConfig) -> std::result::Result<Provider, String> {
    let all = fabric::providers()?;
    let mut ok: Vec<&Provider> = all.iter().filter(|p| matches(p, cfg)).collect();
    ok.sort_by_key(|p| rank_of(p)); // stable: libfabric's domain order within a provider
    match ok.first() {
        Some(p) => Ok((*p).clone()),
        None => {
            let mut names: Vec<String> = all.iter().map(|p| format!("{} ({})", p.name, p.domain)).collect();
            names.dedup();
            Err(format!(
                "no libfabric provider matches {}{} (offered for tagged RDM: {})",
                cfg.provider
                    .as_deref()
                    .map(|p| format!("OXCCL_LIBFABRIC_PROVIDER={p}"))
                    .unwrap_or("efa/verbs/tcp".into()),
                cfg.domain.as_deref().map(|d| format!(", OXCCL_LIBFABRIC_DOMAIN={d}")).unwrap_or_default(),
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ))
        }
    }
}

/// Completions read from the queue but not yet claimed by their link, by link id.
type Stash = HashMap<u32, Vec<Completion>>;

pub(crate) struct EndpointState {
    /// First field: its registrations close before the endpoint's domain does.
    pub(crate) cache: crate::mrcache::MrCache<fabric::Mr>,
    /// Which link a remote write's data (a cookie the receiver handed out) is for.
    rma_cookies: HashMap<u32, u32>,
    next_cookie: u32,
    pub(crate) ep: Endpoint,
    pub(crate) stash: Stash,
    /// Links alive on this endpoint (completions for any other id are late ones of a
    /// dropped link, or carry no context: dropped).
    pub(crate) links: std::collections::HashSet<u32>,
    slots: Vec<bool>,
    next_slot: usize,
    next_link: u32,
    addrs: HashMap<Vec<u8>, u64>,
}

impl EndpointState {
    /// Reads completions and files them by link; returns how many were read.
    pub(crate) fn poll(&mut self) -> std::result::Result<usize, String> {
        self.poll_for(u32::MAX, &mut Vec::new())
    }

    /// As [`EndpointState::poll`], with the completions of link `me` put straight into `mine`
    /// (the latency path: no detour through the stash).
    pub(crate) fn poll_for(&mut self, me: u32, mine: &mut Vec<Completion>) -> std::result::Result<usize, String> {
        let EndpointState { ep, rma_cookies, links, stash, .. } = self;
        // Completions read before an error are still filed.
        ep.poll_with(64, |c| {
            let link = match c.remote {
                // A peer's write: the cookie says which link's receive it belongs to
                // (an unknown one — a write for a receive that failed meanwhile — is
                // dropped; its link is gone or failing).
                Some(data) => rma_cookies.get(&(data as u32)).copied().unwrap_or(u32::MAX),
                None => (c.id >> 32) as u32,
            };
            if link == me {
                mine.push(c);
            } else if links.contains(&link) {
                stash.entry(link).or_default().push(c);
            }
        })
    }

    /// A cookie routing remote writes to `link` (32 bits: what EFA's remote data holds).
    pub(crate) fn new_cookie(&mut self, link: u32) -> u32 {
        loop {
            // 1 ..= u32::MAX - 1: u32::MAX is what a remote write without data reads as.
            self.next_cookie = if self.next_cookie >= u32::MAX - 1 { 1 } else { self.next_cookie + 1 };
            if let std::collections::hash_map::Entry::Vacant(v) = self.rma_cookies.entry(self.next_cookie) {
                v.insert(link);
                return self.next_cookie;
            }
        }
    }

    pub(crate) fn drop_cookie(&mut self, cookie: u32) {
        self.rma_cookies.remove(&cookie);
    }
}

/// One libfabric endpoint of the process on one NIC. Communicators share it (tags keep them
/// apart) unless the budget manager gave one a dedicated endpoint; even then, a communicator
/// of the process that gets no endpoint of its own may share it.
pub struct SharedEndpoint {
    inner: Mutex<EndpointState>,
    provider: Provider,
    cfg: LibfabricConfig,
    /// Class of the communicator it was opened for.
    owner: TrafficClass,
    /// Number of the endpoint in this process (for explain).
    serial: u32,
    /// The process's gate for this NIC.
    pub(crate) gate: Arc<ClassGate>,
    /// The budget lease this endpoint stands on, released when the endpoint closes.
    _lease: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for SharedEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEndpoint")
            .field("provider", &self.provider)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Every endpoint the process has open.
static ENDPOINTS: Mutex<Vec<Weak<SharedEndpoint>>> = Mutex::new(Vec::new());

fn same_nic(n: &SharedEndpoint, cfg: &LibfabricConfig) -> bool {
    n.cfg.provider == cfg.provider && n.cfg.domain == cfg.domain
}

impl SharedEndpoint {
    /// An endpoint of this process on the NIC `cfg` names, opened on first use and shared
    /// by every caller while any holds it (no budget: tests and benches).
    pub fn shared(cfg: &LibfabricConfig) -> Result<Arc<SharedEndpoint>> {
        if let Some(n) = SharedEndpoint::find(cfg) {
            return Ok(n);
        }
        SharedEndpoint::open(cfg, None)
    }

    /// An endpoint this process already has on the NIC `cfg` names, if any: the one opened
    /// for the lowest class, so that sharing costs the least.
    pub fn find(cfg: &LibfabricConfig) -> Option<Arc<SharedEndpoint>> {
        let mut g = ENDPOINTS.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|w| w.strong_count() > 0);
        g.iter().filter_map(Weak::upgrade).filter(|n| same_nic(n, cfg)).max_by_key(|n| (n.owner, n.serial))
    }

    /// Opens a new endpoint for a communicator of `cfg.class`, standing on `lease` (kept
    /// until the endpoint closes).
    pub fn open(
        cfg: &LibfabricConfig,
        lease: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Arc<SharedEndpoint>> {
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let want = probe(cfg).map_err(|e| Error::Unsupported(format!("net-libfabric: {e}")))?;
        let ep = Endpoint::open(|p| p.name == want.name && p.domain == want.domain, 4096)
            .map_err(|e| Error::Unsupported(format!("net-libfabric: opening {} ({}): {e}", want.name, want.domain)))?;
        tracing::info!(
            provider = %want.name,
            domain = %want.domain,
            mr_mode = %want.mr_mode_names(),
            ep_cnt = want.ep_cnt,
            inject = want.inject_size,
            "net-libfabric: endpoint open"
        );
        let n = Arc::new(SharedEndpoint {
            owner: cfg.class,
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            gate: oxccl_core::budget::gate(&want.domain, cfg.share),
            _lease: lease,
            provider: ep.provider().clone(),
            inner: Mutex::new(EndpointState {
                cache: crate::mrcache::MrCache::new(if want.mr_cnt > 0 {
                    (want.mr_cnt / 4).clamp(8, 256)
                } else {
                    256
                }),
                rma_cookies: HashMap::new(),
                next_cookie: 0,
                ep,
                stash: HashMap::new(),
                links: Default::default(),
                slots: vec![false; SLOTS],
                next_slot: 0,
                next_link: 1,
                addrs: HashMap::new(),
            }),
            cfg: cfg.clone(),
        });
        ENDPOINTS.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&n));
        Ok(n)
    }

    /// Class of the communicator the endpoint was opened for.
    pub fn owner(&self) -> TrafficClass {
        self.owner
    }

    /// Number of the endpoint within the process.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The provider and its limits (for explain and the budget manager).
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Registration counts: (registrations made, cache hits, cache entries now).
    pub fn mr_stats(&self) -> (u64, u64, usize) {
        let g = self.lock();
        (g.ep.registrations, g.cache.hits, g.cache.len())
    }

    /// Whether this endpoint registers memory of GPU `n` (FI_HMEM with CUDA), tried on a
    /// small allocation of it: a provider may offer FI_HMEM and still refuse CUDA memory (no
    /// GPUDirect RDMA). `Err`: why not, in words.
    pub fn registers_gpu(&self, n: u32) -> std::result::Result<(), String> {
        if !self.provider.has_hmem() {
            return Err(format!("{} offers no FI_HMEM", self.provider.name));
        }
        let mem = device_mem(n).ok_or_else(|| format!("GPU {n} is not reachable from this build"))?;
        let s = mem.scratch(4096).map_err(|e| e.to_string())?;
        let mut g = self.lock();
        // SAFETY: `s` is a live allocation of GPU `n` of 4096 bytes, kept until the
        // registration, dropped at once, is closed.
        let r = unsafe { g.ep.register_on(s.ptr(), 4096, true, fabric::MemIface::Cuda(n)) };
        drop(g);
        r.map(drop).map_err(|e| format!("{} does not register memory of GPU {n}: {e}", self.provider.name))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EndpointState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free communicator slot, taken round-robin so that a slot just freed (whose late
    /// messages may still arrive) is the last to be used again.
    fn take_slot(&self) -> Result<u16> {
        let mut g = self.lock();
        let start = g.next_slot;
        let i = (0..SLOTS).map(|k| (start + k) % SLOTS).find(|&i| !g.slots[i]).ok_or_else(|| {
            Error::Unsupported(format!("net-libfabric: more than {SLOTS} communicators in one process"))
        })?;
        g.slots[i] = true;
        g.next_slot = (i + 1) % SLOTS;
        Ok(i as u16)
    }

    fn free_slot(&self, s: u16) {
        self.lock().slots[s as usize] = false;
    }

    pub(crate) fn new_link_id(&self) -> u32 {
        let mut g = self.lock();
        let id = g.next_link;
        // Never u32::MAX: completions without a context are filed there.
        g.next_link = (g.next_link % (u32::MAX - 1)) + 1;
        g.links.insert(id);
        id
    }
}

/// net-libfabric for one communicator: its slot on the process's endpoint.
pub struct LibfabricTransport {
    endpoint: Arc<SharedEndpoint>,
    slot: u16,
    rank: usize,
    cfg: LibfabricConfig,
}

impl std::fmt::Debug for LibfabricTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibfabricTransport").field("slot", &self.slot).field("rank", &self.rank).finish()
    }
}

/// The store key of `rank`'s endpoint address (an [`addr::PeerAddr`] record).
pub fn addr_key(rank: usize) -> String {
    format!("libfabric/addr/{rank}")
}

impl LibfabricTransport {
    /// Takes a slot on the process's shared endpoint and publishes `(slot, address)` for
    /// the peers.
    pub fn new(store: &dyn Store, rank: usize, world: usize, cfg: LibfabricConfig) -> Result<LibfabricTransport> {
        LibfabricTransport::on(SharedEndpoint::shared(&cfg)?, store, rank, world, cfg)
    }

    /// Takes a slot on `endpoint` and publishes `(slot, address)` for the peers.
    pub fn on(
        endpoint: Arc<SharedEndpoint>,
        store: &dyn Store,
        rank: usize,
        world: usize,
        cfg: LibfabricConfig,
    ) -> Result<LibfabricTransport> {
        if world > MAX_RANKS {
            return Err(Error::Unsupported(format!("net-libfabric: worlds above {MAX_RANKS} ranks")));
        }
        let slot = endpoint.take_slot()?;
        let name = endpoint.lock().ep.name().to_vec();
        let t = LibfabricTransport { endpoint, slot, rank, cfg };
        let chunk = u32::try_from(t.cfg.chunk.clamp(64, 1 << 30)).expect("at most 1 GiB");
        let rma_min = if t.endpoint.provider().has_rma() { t.cfg.rma_min.max(link::INLINE + 1) as u64 } else { 0 };
        let rma_min = if t.cfg.rma_min == 0 { 0 } else { rma_min };
        let provider = t.endpoint.provider().name.clone();
        store.set(&addr_key(rank), &addr::PeerAddr { slot, chunk, rma_min, provider, name }.encode())?;
        Ok(t)
    }

    /// The provider in use.
    pub fn provider(&self) -> &Provider {
        self.endpoint.provider()
    }

    /// The GPU whose memory its links move themselves (FI_HMEM), if any.
    pub fn gpu(&self) -> Option<u32> {
        self.cfg.gpu
    }

    /// The smallest message this rank receives by RMA write (0: none).
    pub fn rma_min(&self) -> usize {
        self.cfg.rma_min
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &Arc<SharedEndpoint> {
        &self.endpoint
    }

    /// The link to `peer`, once the peer has published its address (`None` until then).
    pub fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<LibfabricLink>> {
        let Some(v) = store.try_get(&addr_key(peer))? else { return Ok(None) };
        let a = addr::PeerAddr::decode(peer, &v, &self.endpoint.provider.name)?;
        let (peer_slot, peer_chunk, peer_rma_min, name) = (a.slot, a.chunk as usize, a.rma_min as usize, a.name);
        let mut g = self.endpoint.lock();
        let addr = match g.addrs.get(&name) {
            Some(a) => *a,
            None => {
                let a = g.ep.insert(&name).map_err(|e| Error::Transport {
                    transport: T,
                    op: "fi_av_insert",
                    peer: Some(peer),
                    source: e.into(),
                })?;
                g.addrs.insert(name, a);
                a
            }
        };
        drop(g);
        Ok(Some(LibfabricLink::new(
            self.endpoint.clone(),
            self.rank,
            self.slot,
            link::PeerEnd { rank: peer, addr, slot: peer_slot, chunk: peer_chunk, rma_min: peer_rma_min },
            &self.cfg,
        )?))
    }
}

impl Drop for LibfabricTransport {
    fn drop(&mut self) {
        self.endpoint.free_slot(self.slot);
    }
}

/// Whether net-libfabric can run here with these settings, and if not, why (cached per
/// settings for the life of the process: it asks libfabric only once).
pub fn available(cfg: &LibfabricConfig) -> std::result::Result<Provider, String> {
    type Key = (Option<String>, Option<String>);
    static CACHE: OnceLock<Mutex<HashMap<Key, std::result::Result<Provider, String>>>> = OnceLock::new();
    let mut g = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    g.entry((cfg.provider.clone(), cfg.domain.clone())).or_insert_with(|| probe(cfg)).clone()
}

#[cfg(test)]
mod tests;
