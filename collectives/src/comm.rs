//! The communicator: a group of ranks, created through a rendezvous store.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oxccl_core::budget::TrafficClass;
use oxccl_core::link::TransportKind;
use oxccl_core::mem::{MemKind, MemKinds};
use oxccl_core::store::{PrefixStore, Store};
use oxccl_core::topo::{local_ranks, PeerInfo};
use oxccl_core::transport::{OfferCtx, OpenCtx};
use oxccl_core::{Error, Result};

use crate::config::Config;
use crate::engine::State;
use crate::health::LIVE;
use crate::progress::ProgressThread;
use crate::shared::{Meta, Shared, Turnstile, REGISTRY};

/// How long the rank hosting the store waits, at close, for the others to close too.
const STORE_LINGER: Duration = Duration::from_secs(30);

/// A group of ranks that run collectives together.
///
/// Every rank of the group calls the same collectives in the same order (as with NCCL and
/// MPI). Blocking calls run on the caller's thread and return when this rank's part is done,
/// or fail at the communicator's deadline ([`Communicator::set_timeout`], `OXCCL_TIMEOUT`).
/// `*_async` calls return a [`crate::Work`] handle and run on the communicator's progress
/// thread, in call order with the blocking ones.
pub struct Communicator {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) progress: Mutex<Option<ProgressThread>>,
    pub(crate) split_seq: AtomicU64,
    /// The store server this process hosts, shared with split children; released at close.
    store_server: Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>,
    peers: Arc<Vec<PeerInfo>>,
    store: Arc<dyn Store>,
    prefix: String,
    /// The process hosting the store when a rank of the launch does (host id, pid).
    store_host: Mutex<Option<(String, u32)>>,
    /// Ordering on callers' GPU streams, made at the first call on a stream, and the number
    /// of the last operation called on one (under the lock: numbers follow call order).
    pub(crate) streams: Mutex<Option<crate::work::Streams>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Publishes `me` under `key/{rank}` and reads every rank's entry.
fn gather(store: &dyn Store, key: &str, me: &PeerInfo, world: usize, deadline: Instant) -> Result<Vec<PeerInfo>> {
    let json = serde_json::to_vec(me).map_err(|e| Error::Internal(e.to_string()))?;
    store.set(&format!("{key}/{}", me.rank), &json)?;
    let mut peers = Vec::with_capacity(world);
    for r in 0..world {
        let v = store.get(&format!("{key}/{r}"), deadline.saturating_duration_since(Instant::now()))?;
        let p: PeerInfo = serde_json::from_slice(&v)
            .map_err(|e| Error::Store(format!("{key}/{r} holds no valid peer description: {e}")))?;
        if p.rank != r {
            return Err(Error::Store(format!("{key}/{r} describes rank {}", p.rank)));
        }
        peers.push(p);
    }
    Ok(peers)
}

/// The last round of creation: publishes whether this rank's part came up (`failed`: why
/// not) and reads everyone's. A rank that failed returns at once (its own error follows);
/// the others fail naming the first rank that could not.
fn all_ready(store: &dyn Store, rank: usize, world: usize, failed: Option<&Error>, deadline: Instant) -> Result<()> {
    let mine = failed.map(|e| e.to_string()).unwrap_or_default();
    store.set(&format!("ready/{rank}"), mine.as_bytes())?;
    if failed.is_some() {
        return Ok(());
    }
    for r in (0..world).filter(|&r| r != rank) {
        let v = store.get(&format!("ready/{r}"), deadline.saturating_duration_since(Instant::now()))?;
        if !v.is_empty() {
            return Err(Error::Remote {
                rank: r,
                what: format!(
                    "could not create its part of the communicator, so no rank has it: {}",
                    String::from_utf8_lossy(&v)
                ),
            });
        }
    }
    Ok(())
}

fn nonce() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), t & 0xffff_ffff_ffff)
}

impl Communicator {
    /// Creates a communicator of `world` ranks, this process being `rank`, meeting through
    /// `store`. Collective: every rank calls it. With the n-th call on each rank forming the
    /// n-th communicator, several communicators can share one store.
    pub fn init(store: Arc<dyn Store>, rank: usize, world: usize, cfg: Config) -> Result<Communicator> {
        if world == 0 {
            return Err(Error::invalid_arg("world size must be at least 1"));
        }
        if rank >= world {
            return Err(Error::invalid_arg(format!("rank {rank} is out of range for a world of {world} ranks")));
        }
        let generation = store.add(&format!("oxccl/generation/{rank}"), 1)?;
        store.add(LIVE, 1)?;
        let prefix = format!("oxccl/c{generation}");
        let host = oxccl_transports::host::host_id(cfg.host_id.as_deref());
        let me = PeerInfo {
            class: cfg.class,
            gpus: crate::registry::gpus(&cfg),
            gpu: crate::registry::current_gpu(&cfg),
            p2p: crate::registry::p2p_here(&cfg),
            gpu_bus: crate::registry::gpu_bus(&cfg).0,
            gpu_reach: crate::registry::gpu_bus(&cfg).1,
            // Ranks that say they are on different hosts (OXCCL_HOST_ID) are not watched by
            // pid, even when they share a machine: they test the cross-host paths.
            pid_space: match oxccl_transports::host::pid_space() {
                s if s.is_empty() => s,
                s => format!("{s}|{host}"),
            },
            ..PeerInfo::new(rank, host, std::process::id())
        };
        let cstore: Arc<dyn Store> = Arc::new(PrefixStore::new(prefix.clone(), store.clone()));
        let deadline = crate::deadline::deadline_after(cfg.timeout);
        // First round: who is where, and which class (the network offer needs both).
        let hosts = if world == 1 { Ok(vec![me]) } else { gather(&*cstore, "host", &me, world, deadline) };
        let r =
            hosts.and_then(|hosts| Self::build(store.clone(), cstore, prefix, hosts, rank, cfg.into_core(), deadline));
        if r.is_err() {
            // Not created: it does not count as live (the store's host would wait for it).
            let _ = store.add_within(LIVE, -1, Duration::from_millis(200));
        }
        r
    }

    /// Second round of creation: what this rank offers (each transport that could reach a
    /// peer, as the budget allows), then the transports its routes use. `hosts` holds every
    /// rank's host and class.
    fn build(
        root_store: Arc<dyn Store>,
        cstore: Arc<dyn Store>,
        prefix: String,
        hosts: Vec<PeerInfo>,
        rank: usize,
        cfg: oxccl_core::config::Config,
        deadline: Instant,
    ) -> Result<Communicator> {
        let world = hosts.len();
        let class = oxccl_core::budget::check_same_class(&hosts.iter().map(|p| p.class).collect::<Vec<_>>())?;
        let name = format!("{prefix} rank {rank}");
        // Only transports that could reach a peer are asked (a rank alone on its host takes no
        // shared memory, one with no peer elsewhere no NIC endpoint).
        let offers = crate::registry::offer(&OfferCtx { cfg: &cfg, class, comm: &name, rank, peers: &hosts });
        let (peers, plans) = if world > 1 {
            let me = PeerInfo {
                offers: offers.kinds,
                net_note: offers.note,
                settings: cfg.agreed(),
                gpu_direct: offers.gpu_direct,
                ..hosts[rank].clone()
            };
            let peers = gather(&*cstore, "peer", &me, world, deadline)?;
            // Settings that choose algorithms or wire layouts must agree (every rank compares
            // the same list, so all of them fail alike).
            oxccl_core::topo::check_same_settings(&peers)?;
            // A pair left unreachable by what a rank could not get (the budget refused its
            // endpoint, or a transport OXCCL_NET names is not available here) fails creation
            // on every rank (not only the two concerned: the others would wait for them),
            // with each side's reason. A pair the settings alone keep apart (OXCCL_NET=none
            // on one side) is created, and explain says why it is unreachable.
            for a in &peers {
                for b in peers.iter().filter(|b| b.rank > a.rank) {
                    let (k, why) = crate::registry::route(a, b);
                    if k.is_none() && (!a.net_note.is_empty() || !b.net_note.is_empty()) {
                        return Err(Error::Unsupported(format!(
                            "{name} ({class}): rank {} cannot reach rank {}: {why}",
                            a.rank, b.rank
                        )));
                    }
                }
            }
            (peers, offers.plans)
        } else {
            (hosts, Vec::new())
        };
        let peers = Arc::new(peers);
        let (local, _) = local_ranks(&peers, rank);
        let mut cfg = cfg;
        // CPUs of the host, not of this process's affinity mask: ranks bound one per core
        // are the best case, not an oversubscribed one.
        // SAFETY: sysconf has no preconditions.
        let cores = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
        if local.len() > cores && !cfg.spin_explicit {
            // More ranks than cores: a spinning rank would hold the core its peer needs.
            tracing::info!(
                rank,
                local = local.len(),
                cores,
                "oversubscribed host: waits yield at once instead of spinning"
            );
            cfg.spin = Duration::ZERO;
        }
        // Nothing is created that is not needed: a world of one has no transport, a rank alone
        // on its host no host-staging, a communicator within one host no network listener.
        let nonce = if world == 1 {
            String::new()
        } else if rank == 0 {
            let n = nonce();
            cstore.set("nonce", n.as_bytes())?;
            n
        } else {
            String::from_utf8_lossy(&cstore.get("nonce", deadline.saturating_duration_since(Instant::now()))?)
                .into_owned()
        };
        // A transport is opened only if some route of this rank uses it (the plan of one that
        // is not, and the NIC lease it may hold, goes now); `opening` is filled in for each.
        let octx =
            OpenCtx { cfg: &cfg, class, store: &*cstore, rank, peers: &peers, opening: &[], nonce: &nonce, deadline };
        let opened = crate::registry::open(plans, &octx);
        // Creation succeeds on every rank or on none: each says whether its part came up, and
        // a rank whose part failed is named on the others (they would wait for it later).
        if world > 1 {
            all_ready(&*cstore, rank, world, opened.as_ref().err(), deadline)?;
        }
        let opened = opened?;
        let endpoint = opened.transports.iter().find_map(|t| t.endpoint());
        let memory: Vec<(TransportKind, MemKinds)> =
            opened.transports.iter().map(|t| (t.kind(), t.capabilities().memory)).collect();
        let mut carried = memory.iter().fold(MemKinds::ALL, |all, (_, m)| all.and(*m));
        if peers[rank].gpus > 0 {
            // Links of transports that move host memory only stage GPU data through it.
            carried = carried.with(MemKind::Device(0));
        }
        tracing::info!(rank, world, local = local.len(), "communicator {prefix} ready");
        let timeout_ns = AtomicU64::new(cfg.timeout.as_nanos().min(u64::MAX as u128) as u64);
        let health = crate::health::Health::new(rank, &peers, root_store.clone(), &prefix, cstore.clone());
        let sticky = Arc::new(crate::engine::Sticky::default());
        let rec = Arc::new(crate::trace::Recorder::new(cfg.trace_buffer));
        if let Some(sig) = cfg.trace_signal {
            crate::trace::install_signal(sig);
        }
        let watchers = crate::engine::Watchers { health, sticky: sticky.clone(), rec: rec.clone() };
        let gpu = cfg.gpu;
        let state = State::new(rank, cfg, cstore.clone(), peers.clone(), opened, watchers);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wanted: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            turns: Turnstile::default(),
            abort: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            sticky,
            timeout_ns,
            meta: Meta {
                rank,
                world,
                name: prefix.clone(),
                class,
                peers: peers.clone(),
                endpoint,
                carried,
                gpu,
                memory,
                root: root_store.clone(),
            },
            rec,
        });
        {
            let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            reg.retain(|w| w.strong_count() > 0);
            reg.push(Arc::downgrade(&shared));
        }
        if world > 1 {
            let traced: Arc<dyn crate::trace::Traced> = shared.clone();
            crate::trace::Answerer::register(Arc::downgrade(&traced));
        }
        Ok(Communicator {
            rank,
            world,
            shared,
            progress: Mutex::new(None),
            streams: Mutex::new(None),
            split_seq: AtomicU64::new(0),
            store_server: Mutex::new(None),
            peers,
            store: root_store,
            prefix,
            store_host: Mutex::new(None),
        })
    }

    /// Records that the process `(host id, pid)` hosts the store: if the store vanishes, the
    /// rank of this communicator living in that process is named as lost.
    pub(crate) fn set_store_host(&self, who: Option<(String, u32)>) {
        let rank = who.as_ref().and_then(|(h, pid)| self.peers.iter().position(|p| &p.host_id == h && p.pid == *pid));
        if let Ok(mut s) = self.state() {
            s.health.set_store_host(rank);
        }
        *self.store_host.lock().unwrap_or_else(|e| e.into_inner()) = who;
    }

    /// Keeps `server` (a store this rank hosts) alive as long as the communicator.
    pub(crate) fn hold_server(mut self, server: Arc<dyn std::any::Any + Send + Sync>) -> Self {
        *self.store_server.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(server);
        self
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// What every rank published at creation (host identity, pid).
    pub fn peers(&self) -> &[PeerInfo] {
        &self.peers
    }
    /// The communicator's traffic class.
    pub fn class(&self) -> TrafficClass {
        self.shared.meta.class
    }
    /// The default deadline of blocking calls.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.shared.timeout_ns.load(Ordering::Relaxed))
    }
    /// Runs `f` with `timeout` as the deadline of every blocking call it makes on this thread
    /// (a per-call override of [`Communicator::set_timeout`]).
    pub fn with_timeout<R>(&self, timeout: Duration, f: impl FnOnce(&Self) -> R) -> R {
        crate::deadline::with_call_timeout(timeout, || f(self))
    }

    /// The deadline of a call made now: the per-call timeout ([`Communicator::with_timeout`])
    /// or the communicator's.
    pub(crate) fn deadline(&self) -> Result<crate::deadline::Deadline> {
        crate::deadline::for_call(self.timeout())
    }

    /// Changes the default deadline of blocking calls. Zero is refused with
    /// `InvalidArgument` (every call would fail at once); `Duration::MAX` means no deadline.
    pub fn set_timeout(&self, t: Duration) -> Result<()> {
        if t.is_zero() {
            return Err(Error::invalid_arg(
                "set_timeout(0): every call would fail at once; give a positive duration (Duration::MAX: none)"
                    .to_string(),
            ));
        }
        self.shared.timeout_ns.store(t.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The transport of every link connected so far (links are made on first use).
    pub fn links(&self) -> Vec<(usize, TransportKind)> {
        self.state().map(|s| s.link_kinds()).unwrap_or_default()
    }

    /// The effective configuration.
    pub fn config(&self) -> Config {
        self.state().map(|s| Config::from_core(s.cfg.clone())).unwrap_or_else(|_| Config::defaults())
    }

    pub(crate) fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.shared.lock_state()
    }

    /// Fails, before any byte moves and leaving the communicator usable, when this build has
    /// no local memory work (copies, reductions) for `kind`, or a transport this rank's links
    /// use cannot move it.
    pub(crate) fn check_memory(&self, kind: MemKind) -> Result<()> {
        let m = &self.shared.meta;
        if let MemKind::Device(n) = kind {
            if m.peers[self.rank].gpus == 0 {
                return Err(Error::Unsupported(format!(
                    "rank {}: a buffer in memory of GPU {n}, but {}",
                    self.rank,
                    crate::registry::why_no_gpu(m.gpu)
                )));
            }
        }
        if m.carried.contains(kind) {
            return crate::registry::local_mem(kind, m.gpu).map(|_| ());
        }
        let cannot: Vec<String> =
            m.memory.iter().filter(|(_, k)| !k.contains(kind)).map(|(t, k)| format!("{t} (moves {k:?})")).collect();
        Err(Error::Unsupported(format!(
            "rank {}: a buffer in {kind} cannot go over {}, which carries some of this rank's links",
            self.rank,
            cannot.join(", ")
        )))
    }

    /// Fails if the communicator is closed, aborted, or failed earlier (errors are sticky).
    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Error::invalid_usage("the communicator is closed"));
        }
        self.shared.sticky.check()?;
        if self.shared.abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted("abort() was called".into()));
        }
        Ok(())
    }

    pub(crate) fn record(&self, e: &Error) {
        self.shared.record(self.rank, e);
    }

    /// Ends every in-flight and later operation of this rank with `Aborted`. Callable from
    /// any thread; never blocks.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::Relaxed);
        // Idle: let go of the links and the NIC endpoint (and its lease) now. An operation in
        // flight holds the state; it ends with `Aborted` and drops them itself.
        if let Ok(mut s) = self.shared.state.try_lock() {
            s.let_go();
        }
        // The other ranks are told through the failure record, which takes store round trips:
        // off this thread. An operation in flight writes it itself when it ends `Aborted`.
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new().name("oxccl-abort".into()).spawn(move || {
            if let Ok(mut s) = shared.state.lock() {
                s.abandon("abort() was called");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(rank = self.rank, "abort: cannot start the thread that tells the other ranks: {e}");
        }
    }

    /// Releases the communicator's resources; every later call fails with `InvalidUsage`.
    /// Waits for queued non-blocking operations first (up to the deadline).
    pub fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let t = self.shared.turns.ticket();
        // A zero per-call timeout does not stop a close: it waits the communicator's.
        let mut deadline = self.deadline().unwrap_or_else(|_| crate::deadline::Deadline::after(self.timeout()));
        let r = self.shared.turns.wait_turn(t, &mut deadline, &self.shared.abort);
        if let Some(p) = self.progress.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
        if let Ok(mut s) = self.state() {
            // An orderly close lets peers still collect what this rank sent (bounded by the
            // deadline); a failed or aborted communicator just lets go.
            let orderly = !self.shared.sticky.is_set() && !self.shared.abort.load(Ordering::Relaxed);
            // Sends and receives still in flight finish first (each within its deadline).
            while orderly && s.drain(&|| false, &self.shared.abort) != crate::driver::Outcome::Done {
                std::thread::sleep(Duration::from_micros(200));
            }
            let deadline = if orderly { crate::deadline::deadline_after(self.timeout()) } else { Instant::now() };
            s.close(deadline);
            // An orderly goodbye: the store forgets what to do if this rank were lost.
            s.health.disarm();
        }
        self.shared.turns.done(t);
        // Every communicator counts itself live in the store from before it publishes anything
        // until it closes; the process that hosts the store keeps it up until none is left
        // (split children on other ranks still connect through it), or STORE_LINGER passes.
        let _ = self.store.add_within(LIVE, -1, Duration::from_secs(2));
        let server = self.store_server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            if Arc::strong_count(&server) == 1 {
                let until = Instant::now() + STORE_LINGER;
                loop {
                    let live = self
                        .store
                        .try_get(LIVE)
                        .ok()
                        .flatten()
                        .and_then(|v| oxccl_core::store::parse_counter(LIVE, &v).ok());
                    if live.is_none_or(|n| n <= 0) {
                        break;
                    }
                    if Instant::now() >= until {
                        tracing::warn!(
                            rank = self.rank,
                            "communicators still open elsewhere when this rank's store shut down"
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        r
    }

    /// Splits into sub-communicators, as `MPI_Comm_split` / `ncclCommSplit`: ranks passing the
    /// same `color` form one, ordered by `key` (ties by parent rank). `None` as color takes
    /// no part and gets `Ok(None)`. Collective over the parent.
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        self.split_with_class(color, key, self.class())
    }

    /// [`Communicator::split`] into communicators of traffic class `class` (every member
    /// must give the same). The child asks the NIC budget for its own endpoint.
    pub fn split_with_class(&self, color: Option<u32>, key: i64, class: TrafficClass) -> Result<Option<Communicator>> {
        let mut cfg = self.config();
        cfg.set("OXCCL_CLASS", class.name())?;
        // The child keeps the parent's deadline, as set now.
        cfg.set("OXCCL_TIMEOUT", &format!("{}ms", self.timeout().as_millis()))?;
        self.split_with_config(color, key, cfg)
    }

    /// [`Communicator::split`] with the child's own configuration (as `ncclCommSplit` takes
    /// one): its class (`OXCCL_CLASS`), network transports, budget settings. Settings every
    /// rank must share (sizes of pieces and staging) must still agree within the child.
    pub fn split_with_config(&self, color: Option<u32>, key: i64, cfg: Config) -> Result<Option<Communicator>> {
        self.check_usable()?;
        let class = cfg.class;
        let seq = self.split_seq.fetch_add(1, Ordering::SeqCst);
        let deadline = crate::deadline::deadline_after(cfg.timeout);
        let base = format!("{}/split{seq}", self.prefix);
        let s = PrefixStore::new(base.clone(), self.store.clone());
        let mine = match color {
            Some(c) => format!("{c} {key} {}", class.name()),
            None => "none".to_string(),
        };
        if color.is_some() {
            self.store.add(LIVE, 1)?;
        }
        s.set(&format!("{}", self.rank), mine.as_bytes())?;
        let mut members: Vec<(i64, usize, TrafficClass)> = Vec::new();
        for r in 0..self.world {
            let v = s.get(&format!("{r}"), deadline.saturating_duration_since(Instant::now()))?;
            let v = String::from_utf8_lossy(&v).into_owned();
            if v == "none" {
                continue;
            }
            let mut it = v.split(' ');
            let (c, k, cl) = (|| {
                Some((
                    it.next()?.parse::<u32>().ok()?,
                    it.next()?.parse::<i64>().ok()?,
                    TrafficClass::parse(it.next()?)?,
                ))
            })()
            .ok_or_else(|| Error::Store(format!("split entry of rank {r} is malformed: {v:?}")))?;
            if Some(c) == color {
                members.push((k, r, cl));
            }
        }
        let Some(c) = color else { return Ok(None) };
        members.sort();
        let new_rank = members
            .iter()
            .position(|&(_, r, _)| r == self.rank)
            .ok_or_else(|| Error::Internal("split lost this rank".into()))?;
        let hosts: Vec<PeerInfo> = members
            .iter()
            .enumerate()
            .map(|(i, &(_, r, cl))| PeerInfo {
                rank: i,
                class: cl,
                offers: Vec::new(),
                net_note: String::new(),
                ..self.peers[r].clone()
            })
            .collect();
        self.child(format!("{base}/c{c}"), hosts, new_rank, cfg.into_core(), deadline).map(Some)
    }

    /// Creates a communicator derived from this one (split, shrink), counted live already:
    /// the count is given back if creation fails. It keeps the store this rank hosts alive
    /// (connections are made on first use) and knows who hosts it.
    fn child(
        &self,
        prefix: String,
        hosts: Vec<PeerInfo>,
        rank: usize,
        cfg: oxccl_core::config::Config,
        deadline: Instant,
    ) -> Result<Communicator> {
        let cstore: Arc<dyn Store> = Arc::new(PrefixStore::new(prefix.clone(), self.store.clone()));
        let comm = match Self::build(self.store.clone(), cstore, prefix, hosts, rank, cfg, deadline) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.store.add_within(LIVE, -1, Duration::from_millis(200));
                return Err(e);
            }
        };
        let held = self.store_server.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let comm = match &held {
            Some(s) => comm.hold_server(s.clone()),
            None => comm,
        };
        comm.set_store_host(self.store_host.lock().unwrap_or_else(|e| e.into_inner()).clone());
        Ok(comm)
    }
}

impl Communicator {
    /// Builds a communicator of every rank but `excluded`, as `ncclCommShrink` does: after a
    /// failure (a rank lost, the communicator poisoned), the survivors call it with the same
    /// list and go on with a fresh communicator, ranks renumbered in their old order. It needs
    /// only the store, not the old links, so it works on a failed communicator; it does not
    /// work when the store died with its host (start the store apart from the ranks, with
    /// `oxccl store`, where that must survive). The new communicator has the same class and
    /// configuration. Collective over the survivors; checks that they all exclude the same
    /// ranks (`InvalidUsage` otherwise).
    pub fn shrink(&self, excluded: &[usize]) -> Result<Communicator> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(Error::invalid_usage("shrink of a closed communicator"));
        }
        let mut ex: Vec<usize> = excluded.to_vec();
        ex.sort_unstable();
        ex.dedup();
        if let Some(&r) = ex.iter().find(|&&r| r >= self.world) {
            return Err(Error::invalid_arg(format!("shrink: rank {r} is out of range for a world of {}", self.world)));
        }
        if ex.contains(&self.rank) {
            return Err(Error::invalid_arg(format!(
                "shrink: rank {} excludes itself; only the survivors call shrink",
                self.rank
            )));
        }
        let survivors: Vec<usize> = (0..self.world).filter(|r| !ex.contains(r)).collect();
        let cfg = {
            let mut c = self.config();
            c.set("OXCCL_TIMEOUT", &format!("{}ms", self.timeout().as_millis()))?;
            c
        };
        let seq = self.split_seq.fetch_add(1, Ordering::SeqCst);
        let deadline = crate::deadline::deadline_after(cfg.timeout);
        let prefix = format!("{}/shrink{seq}", self.prefix);
        let s = PrefixStore::new(format!("{prefix}/excluded"), self.store.clone());
        let mine = format!("{ex:?}");
        s.set(&self.rank.to_string(), mine.as_bytes())?;
        for &r in &survivors {
            let v = s.get(&r.to_string(), deadline.saturating_duration_since(Instant::now()))?;
            let theirs = String::from_utf8_lossy(&v);
            if theirs != mine {
                return Err(Error::invalid_usage(format!(
                    "shrink: rank {r} excludes ranks {theirs}, rank {} excludes {mine}: every survivor must name the same ranks",
                    self.rank
                )));
            }
        }
        let hosts: Vec<PeerInfo> = survivors
            .iter()
            .enumerate()
            .map(|(i, &r)| PeerInfo { rank: i, offers: Vec::new(), net_note: String::new(), ..self.peers[r].clone() })
            .collect();
        let new_rank = survivors
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| Error::Internal("shrink lost this rank".into()))?;
        tracing::info!(rank = self.rank, new_rank, excluded = ?ex, "{}: shrinking to {} ranks", self.prefix, survivors.len());
        self.store.add(LIVE, 1)?;
        self.child(prefix, hosts, new_rank, cfg.into_core(), deadline)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(rank = self.rank, "closing communicator: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxccl_core::store::MemStore;

    /// A call that gets past the usability checks just as abort() lets go of the transports
    /// (the race the abort thread leaves open) fails with Aborted; it used to index a
    /// transport that was gone.
    #[test]
    fn a_call_racing_abort_fails_cleanly() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let c = Communicator::init(s, r, 2, Config::defaults()).unwrap();
                    c.barrier().unwrap();
                    if r == 0 {
                        c.state().unwrap().let_go();
                        let mut v = vec![1.0f32; 8];
                        let e = c.all_reduce_in_place(&mut v, oxccl_core::ReduceOp::Sum).unwrap_err();
                        assert!(matches!(e, Error::Aborted(_)), "{e}");
                        c.abort();
                    }
                    drop(c);
                })
            })
            .collect();
        for r in ranks {
            r.join().unwrap();
        }
    }

    /// Creation succeeds on every rank or on none: a rank whose part failed is named, with
    /// its words, on every other (a split that failed on two members used to leave the rest
    /// with a communicator whose calls waited for them until the deadline).
    #[test]
    fn a_part_that_failed_fails_creation_everywhere() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        let ranks: Vec<_> = (0..3)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let mine = (r == 1).then(|| Error::Unsupported("its endpoint could not open".into()));
                    (r, all_ready(&*s, r, 3, mine.as_ref(), deadline))
                })
            })
            .collect();
        for h in ranks {
            let (r, res) = h.join().unwrap();
            match (r, res) {
                (1, r) => r.unwrap(),
                (_, Err(Error::Remote { rank: 1, what })) => assert!(
                    what.contains("could not create its part") && what.contains("its endpoint could not open"),
                    "{what}"
                ),
                (r, other) => panic!("rank {r}: {other:?}"),
            }
        }
    }

    /// A buffer of a kind the transports of this rank cannot move is refused before any byte
    /// moves, naming them, and the communicator stays usable; explain lists what each open
    /// transport moves.
    #[test]
    fn memory_no_open_transport_moves_is_refused_up_front() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    let c = Communicator::init(s, r, 2, Config::defaults()).unwrap();
                    c.check_memory(MemKind::Host).unwrap();
                    c.check_memory(MemKind::PinnedHost).unwrap();
                    let e = c.check_memory(MemKind::Device(0)).unwrap_err();
                    assert!(matches!(e, Error::Unsupported(_)), "{e}");
                    let msg = e.to_string();
                    let why = ["no GPU support", "found no GPU"];
                    assert!(msg.contains("memory of GPU 0") && why.iter().any(|w| msg.contains(w)), "{msg}");
                    let mut v = vec![1.0f32; 8];
                    c.all_reduce_in_place(&mut v, oxccl_core::ReduceOp::Sum).unwrap();
                    assert_eq!(v, vec![2.0f32; 8], "still usable");
                    let x = c.explain();
                    assert_eq!(x.transports.len(), 1, "{x:?}");
                    assert_eq!(x.transports[0].transport, TransportKind::HostStaging);
                    assert!(x.transports[0].capabilities.ordered && !x.transports[0].capabilities.rma);
                    assert!(x.to_text().contains("transport host-staging: moves {host, pinned}, inline up to 32 B"));
                })
            })
            .collect();
        for r in ranks {
            r.join().unwrap();
        }
        // A world of one has no transport, but still copies: not without a GPU; and with GPU
        // buffers turned off, it says so.
        let one = Communicator::init(Arc::new(MemStore::new()), 0, 1, Config::defaults()).unwrap();
        let e = one.check_memory(MemKind::Device(1)).unwrap_err().to_string();
        assert!(
            e.contains("memory of GPU 1") && ["no GPU support", "found no GPU"].iter().any(|w| e.contains(w)),
            "{e}"
        );
        let mut off = Config::defaults();
        off.set("OXCCL_GPU", "off").unwrap();
        let one = Communicator::init(Arc::new(MemStore::new()), 0, 1, off).unwrap();
        let e = one.check_memory(MemKind::Device(0)).unwrap_err().to_string();
        assert!(e.contains("OXCCL_GPU=off"), "{e}");
    }
}
