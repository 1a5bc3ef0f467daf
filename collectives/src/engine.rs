//! The engine of one communicator: its links, algorithm selection, and the driver that runs
//! a schedule to completion on the calling thread.
//!
//! Waiting follows what MPI libraries do on shared memory: spin (lowest latency), then yield
//! the core (others may need it: ranks can outnumber cores), then sleep as the open
//! transports say ([`Wait`]): on a doorbell until a peer rings it, or in `poll()`. Every wait
//! has a deadline. The engine names no transport: links come from the [`OpenTransport`]s
//! the registry opened, one per route.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oxccl_core::algo::{self, Algo, Shape};
use oxccl_core::config::Config;
use oxccl_core::exec::{Bufs, Exec, ExecMem};
use oxccl_core::link::{describe_tag, Link, LinkSet, MemSlice, Tag, TransportKind};
use oxccl_core::mem::{MemKind, Scratch};
use oxccl_core::schedule::{BufId, Schedule};
use oxccl_core::store::Store;
use oxccl_core::topo::PeerInfo;
use oxccl_core::transport::{OpenTransport, Sleeper, Wait};

use crate::driver::{drive, Ctx, Goal, Outcome};
use crate::p2p::Finish;
use oxccl_core::{DataType, Error, ReduceOp, Result};

/// What a collective call asks for (validated before it gets here).
#[derive(Debug, Clone)]
pub(crate) enum Coll {
    AllReduce {
        op: ReduceOp,
    },
    Broadcast {
        root: usize,
    },
    /// Broadcast from several roots holding the same data (distinct, checked).
    BroadcastRoots {
        roots: Vec<usize>,
    },
    Reduce {
        op: ReduceOp,
        root: usize,
    },
    AllGather,
    ReduceScatter {
        op: ReduceOp,
    },
    AllToAll,
    AllToAllV {
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    },
    Barrier,
    /// Grouped point-to-point: (peer, is_send, byte offset into the send or recv buffer, bytes).
    Group {
        ops: Vec<P2p>,
    },
}

/// One point-to-point operation of a group.
pub(crate) use oxccl_core::algo::P2pOp as P2p;

impl Coll {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Coll::AllReduce { .. } => "all_reduce",
            Coll::Broadcast { .. } | Coll::BroadcastRoots { .. } => "broadcast",
            Coll::Reduce { .. } => "reduce",
            Coll::AllGather => "all_gather",
            Coll::ReduceScatter { .. } => "reduce_scatter",
            Coll::AllToAll => "all_to_all",
            Coll::AllToAllV { .. } => "all_to_all_v",
            Coll::Barrier => "barrier",
            Coll::Group { .. } => "send/recv",
        }
    }
    fn opcode(&self) -> u8 {
        use oxccl_core::link::opcode::*;
        match self {
            Coll::AllReduce { .. } => ALL_REDUCE,
            Coll::Broadcast { .. } | Coll::BroadcastRoots { .. } => BROADCAST,
            Coll::Reduce { .. } => REDUCE,
            Coll::AllGather => ALL_GATHER,
            Coll::ReduceScatter { .. } => REDUCE_SCATTER,
            Coll::AllToAll => ALL_TO_ALL,
            Coll::AllToAllV { .. } => ALL_TO_ALL_V,
            Coll::Barrier => BARRIER,
            Coll::Group { .. } => SEND_RECV,
        }
    }
    fn op(&self) -> ReduceOp {
        match self {
            Coll::AllReduce { op } | Coll::Reduce { op, .. } | Coll::ReduceScatter { op } => *op,
            _ => ReduceOp::Sum,
        }
    }
}

/// A communicator's first error, the one place it is kept: every later call fails quoting
/// it (errors are sticky). Argument errors are not kept: they change nothing.
#[derive(Debug, Default)]
pub(crate) struct Sticky {
    /// Set once `first` holds an error: every call reads it, the lock only when it is set.
    set: AtomicBool,
    first: Mutex<Option<Error>>,
}

impl Sticky {
    /// Keeps `e` if it is the first error that may have left peers out of step.
    pub(crate) fn record(&self, rank: usize, e: &Error) {
        if matches!(e, Error::InvalidArgument(_)) {
            return;
        }
        let mut g = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            tracing::error!(rank, "communicator failed: {e}");
            *g = Some(e.duplicate());
            self.set.store(true, Ordering::Release);
        }
    }

    /// The error later calls get, if the communicator failed.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.is_set() {
            return Ok(());
        }
        match self.first.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(e) => Err(Error::Aborted(format!("an earlier operation failed: {e}"))),
            None => Ok(()),
        }
    }

    /// The first error's words, if the communicator failed.
    pub(crate) fn first(&self) -> Option<String> {
        if !self.is_set() {
            return None;
        }
        self.first.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|e| e.to_string())
    }

    /// Whether the communicator failed.
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

/// One link slot: nothing yet, or a connected link.
type Slot = Option<Box<dyn Link>>;

/// Mutable state of a communicator, owned by whoever runs an operation.
pub(crate) struct State {
    pub rank: usize,
    pub world: usize,
    pub cfg: Config,
    pub store: Arc<dyn Store>,
    pub peers: Arc<Vec<PeerInfo>>,
    /// The transports opened for this communicator.
    transports: Vec<Box<dyn OpenTransport>>,
    /// For each peer, the transport (index into `transports`) that reaches it.
    routes: Vec<Option<usize>>,
    /// How a waiting rank sleeps: on this doorbell when it is the only transport open, else
    /// in `poll()` for at most `nap`.
    doorbell: Option<Arc<dyn Sleeper>>,
    nap: Duration,
    pub links: Vec<Slot>,
    pub coll_seq: u64,
    /// Ranks of each host (by host identity, hosts ordered by their first rank).
    hosts: Vec<Vec<usize>>,
    /// The plan of the last broadcast from several roots (for `explain`).
    pub last_striped: Option<algo::StripedPlan>,
    /// Scratch memory of the last kind used, kept for the next call.
    scratch: Option<(MemKind, Scratch)>,
    /// Schedules of recent calls, by their arguments (no generation on repeated calls; a
    /// fast hash: the key is ours, and this is on every call's path).
    cache: rustc_hash::FxHashMap<SchedKey, (Arc<Schedule>, Algo)>,
    /// The last schedule used (checked before the map: repeated calls skip hashing).
    last: Option<(SchedKey, Arc<Schedule>, Algo)>,
    /// The executor's memory, recycled between calls.
    mem: ExecMem,
    /// Why nothing runs any more, once the transports are closed (abort, failure, close).
    gone: Option<&'static str>,
    /// Transports an abort ended that still hold what peers may need, closed with the
    /// communicator.
    retired: Vec<Box<dyn OpenTransport>>,
    /// The communicator's first error (shared with the communicator): once an operation
    /// failed mid-way, links are dropped (their queued operations pointed at the caller's
    /// buffers), and nothing runs any more.
    sticky: Arc<Sticky>,
    /// Failures elsewhere: the store's failure record, peers' processes, the store itself.
    pub health: crate::health::Health,
    /// The flight recorder.
    pub(crate) rec: Arc<crate::trace::Recorder>,
    /// Non-blocking sends and receives in flight. Declared after the links: when the state
    /// goes, the links (which may point at the flights' buffers) go first.
    pub(crate) flights: crate::p2p::Flights,
}

/// What determines a schedule (for the cache): collective with its root and avg-ness,
/// element size, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SchedKey {
    opcode: u8,
    in_place: bool,
    root: usize,
    avg: bool,
    es: usize,
    count: usize,
}

const CACHE_ENTRIES: usize = 256;

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("rank", &self.rank).field("world", &self.world).finish_non_exhaustive()
    }
}

/// The executor's view of the links: connects on first use.
pub(crate) struct Links<'a> {
    rank: usize,
    links: &'a mut [Slot],
    transports: &'a mut [Box<dyn OpenTransport>],
    routes: &'a [Option<usize>],
    store: &'a dyn Store,
    peers: &'a [PeerInfo],
    staging: oxccl_core::staging::Staging,
    gpu: oxccl_core::config::GpuUse,
}

impl Links<'_> {
    /// Whether a link has work under way that nothing will signal (GPU copies): a waiting
    /// rank naps briefly then.
    pub(crate) fn busy_unsignalled(&self) -> bool {
        self.links.iter().flatten().any(|l| l.busy_unsignalled())
    }

    /// Sleeps in `poll()` until a descriptor a link or a transport waits on is ready, or
    /// `timeout`.
    pub(crate) fn poll_fds(&self, timeout: Duration) {
        let mut want = Vec::new();
        for l in self.links.iter().flatten() {
            l.wait_fds(&mut want);
        }
        for t in self.transports.iter() {
            t.wait_fds(&mut want);
        }
        let mut fds: Vec<libc::pollfd> = want
            .into_iter()
            .map(|(fd, write)| libc::pollfd {
                fd,
                events: if write { libc::POLLOUT } else { libc::POLLIN },
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of fds.len() pollfd structures for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
}

impl LinkSet for Links<'_> {
    fn link(&mut self, peer: usize) -> Result<Option<&mut dyn Link>> {
        if self.links[peer].is_none() {
            let Some(t) = self.routes.get(peer).copied().flatten() else {
                let (_, why) = crate::registry::route(&self.peers[self.rank], &self.peers[peer]);
                return Err(Error::Unsupported(format!("rank {} cannot reach rank {peer}: {why}", self.rank)));
            };
            // The transports are gone once the communicator was aborted or closed.
            let Some(transport) = self.transports.get_mut(t) else {
                return Err(Error::Aborted(format!("rank {}: the communicator's transports are closed", self.rank)));
            };
            match transport.connect(self.store, peer)? {
                Some(l) => {
                    let (me, them) = (&self.peers[self.rank], &self.peers[peer]);
                    let (_, why) = crate::registry::route(me, them);
                    tracing::info!(rank = self.rank, peer, transport = l.kind().name(), "link up: {why}");
                    let l = if crate::registry::stages_gpu_data(l.kind(), me, them) {
                        let source = crate::registry::device_source(me, self.gpu);
                        Box::new(oxccl_core::staging::StagedLink::new(l, source, self.staging)?)
                    } else {
                        l
                    };
                    self.links[peer] = Some(l);
                }
                None => return Ok(None),
            }
        }
        Ok(self.links[peer].as_deref_mut().map(|l| l as &mut dyn Link))
    }
}

/// What watches a communicator and keeps its story: failures elsewhere, its first error,
/// its flight recorder.
pub(crate) struct Watchers {
    pub health: crate::health::Health,
    pub sticky: Arc<Sticky>,
    pub rec: Arc<crate::trace::Recorder>,
}

/// The executor's view of `$s`'s links (a macro: it borrows only the fields it needs, so the
/// flights and the health watch stay free to borrow beside it).
macro_rules! links_of {
    ($s:expr) => {
        Links {
            rank: $s.rank,
            links: &mut $s.links,
            transports: &mut $s.transports,
            routes: &$s.routes,
            store: &*$s.store,
            peers: &$s.peers,
            staging: $s.cfg.staging,
            gpu: $s.cfg.gpu,
        }
    };
}

impl State {
    pub(crate) fn new(
        rank: usize,
        cfg: Config,
        store: Arc<dyn Store>,
        peers: Arc<Vec<PeerInfo>>,
        crate::registry::Opened { transports, routes }: crate::registry::Opened,
        Watchers { health, sticky, rec }: Watchers,
    ) -> Self {
        let world = peers.len();
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        for p in peers.iter() {
            match hosts.iter_mut().find(|g| peers[g[0]].host_id == p.host_id) {
                Some(g) => g.push(p.rank),
                None => hosts.push(vec![p.rank]),
            }
        }
        // A doorbell is slept on only when its transport is the only one open; otherwise the
        // rank naps in poll() as briefly as the most demanding transport asks.
        let waits: Vec<Wait> = transports.iter().map(|t| t.wait()).collect();
        let doorbell = match waits.as_slice() {
            [Wait::Doorbell { sleeper, .. }] => Some(sleeper.clone()),
            _ => None,
        };
        let nap = waits
            .iter()
            .map(|w| match w {
                Wait::Doorbell { nap, .. } | Wait::Poll { nap } => *nap,
            })
            .min()
            .unwrap_or(Duration::from_millis(20));
        State {
            hosts,
            last_striped: None,
            transports,
            routes,
            doorbell,
            nap,
            rank,
            world,
            cfg,
            store,
            peers,
            links: (0..world).map(|_| None).collect(),
            coll_seq: 0,
            scratch: None,
            cache: Default::default(),
            last: None,
            mem: ExecMem::default(),
            sticky,
            gone: None,
            retired: Vec::new(),
            health,
            rec,
            flights: crate::p2p::Flights::default(),
        }
    }

    /// Ranks of each host.
    pub(crate) fn hosts(&self) -> &[Vec<usize>] {
        &self.hosts
    }

    /// Ends the communicator after `abort()` on an idle rank: tells the other ranks (the
    /// failure record) and lets go of the links and the transports.
    pub(crate) fn abandon(&mut self, why: &str) {
        if !self.sticky.is_set() {
            let e = self.health.settle(Error::Aborted(why.to_string()), Duration::ZERO);
            self.sticky.record(self.rank, &e);
        }
        self.let_go();
    }

    /// Drops every link (their queued operations point at buffers the caller gets back) and
    /// ends every transport at once, letting go of what it holds (a NIC endpoint and its
    /// lease, segment names): nothing runs any more.
    pub(crate) fn let_go(&mut self) {
        self.gone.get_or_insert("the communicator was aborted or failed; its transports are closed");
        self.links.iter_mut().for_each(|l| *l = None);
        self.routes.iter_mut().for_each(|r| *r = None);
        for t in self.transports.drain(..) {
            self.retired.extend(t.abort());
        }
        // The links are gone: the flights' buffers may go back to their owners, failed.
        let e = match self.sticky.first() {
            Some(first) => Error::Aborted(format!("an earlier operation failed: {first}")),
            None => Error::Aborted("the communicator was aborted".into()),
        };
        for i in self.flights.fail_all(&e) {
            self.rec.end(i, false);
        }
    }

    /// The orderly end: each link and transport waits, until `deadline` at most, for what its
    /// peers still need, then goes.
    pub(crate) fn close(&mut self, deadline: Instant) {
        let orderly = self.gone.is_none() && !self.sticky.is_set();
        if orderly {
            // The words first: a peer whose link to this rank ends reads them.
            self.health.closing(self.rec.ops(), self.rec.last_seq());
        }
        self.gone.get_or_insert("the communicator is closed");
        for l in self.links.iter_mut().flatten() {
            l.close(deadline);
        }
        // Counted (what a waiting peer's idle check looks at) only once the links have
        // delivered what this rank sent: a peer still receiving the last collective's data
        // must not take this for a rank that left early (a cross-host delivery may stall
        // longer than the checks' first 20 ms).
        if orderly {
            self.health.closed();
        }
        self.links.iter_mut().for_each(|l| *l = None);
        self.routes.iter_mut().for_each(|r| *r = None);
        for t in self.transports.drain(..).chain(self.retired.drain(..)) {
            t.close(&*self.store, deadline);
        }
        for i in
            self.flights.fail_all(&Error::invalid_usage("the communicator was closed before this send/recv completed"))
        {
            self.rec.end(i, false);
        }
    }

    /// The transports open, with what they can do.
    pub(crate) fn capabilities(&self) -> Vec<(TransportKind, oxccl_core::transport::Capabilities)> {
        self.transports.iter().map(|t| (t.kind(), t.capabilities())).collect()
    }

    /// The transport of each connected link.
    pub(crate) fn link_kinds(&self) -> Vec<(usize, TransportKind)> {
        self.links.iter().enumerate().filter_map(|(p, l)| l.as_ref().map(|l| (p, l.kind()))).collect()
    }

    /// Picks the algorithm (`OXCCL_ALGO` first, then message size).
    pub(crate) fn choose(&self, coll: &Coll, bytes: usize) -> Algo {
        if let Coll::BroadcastRoots { .. } = coll {
            return Algo::Striped;
        }
        let allowed = algo::allowed(coll.name()).unwrap_or(&[Algo::Pairwise]);
        if let Some(a) = self.cfg.forced_algo(coll.name()).filter(|a| allowed.contains(a)) {
            return a;
        }
        let spread = self.hosts.len() > 1 && self.hosts.iter().any(|g| g.len() > 1);
        match coll {
            Coll::AllReduce { .. } if bytes <= self.cfg.rd_max_bytes => Algo::RecursiveDoubling,
            Coll::AllReduce { .. } if spread => Algo::Hierarchical,
            Coll::Broadcast { .. } if bytes <= self.cfg.tree_max_bytes && self.world > 2 => Algo::Tree,
            Coll::Broadcast { .. } if spread => Algo::Hierarchical,
            Coll::AllGather if spread && bytes * self.world > self.cfg.tree_max_bytes => Algo::Hierarchical,
            _ => allowed[0],
        }
    }

    /// Builds this rank's schedule for `coll` on `count` elements of `dtype`.
    pub(crate) fn schedule(&self, coll: &Coll, dtype: DataType, count: usize, in_place: bool) -> (Schedule, Algo) {
        let es = dtype.size();
        let sh = Shape { rank: self.rank, n: self.world, es, seg: (self.cfg.segment_bytes / es).max(1) };
        let algo = self.choose(coll, count * es);
        let s = match coll {
            Coll::AllReduce { op } => {
                let avg = *op == ReduceOp::Avg;
                match algo {
                    Algo::RecursiveDoubling => algo::all_reduce_rd(sh, count, avg, in_place),
                    Algo::Hierarchical => algo::all_reduce_hier(self.rank, &self.hosts, es, sh.seg, count, avg),
                    _ => algo::all_reduce_ring(sh, count, avg),
                }
            }
            Coll::Broadcast { root } => match algo {
                Algo::Tree => algo::broadcast_tree(sh, count, *root),
                Algo::Hierarchical => algo::broadcast_hier(self.rank, &self.hosts, es, sh.seg, count, *root),
                _ => algo::broadcast_chain(sh, count, *root),
            },
            Coll::BroadcastRoots { roots } => match &self.last_striped {
                // run() planned this call just before.
                Some(p) if p.roots == *roots && p.stripes.iter().map(|st| st.len).sum::<usize>() == count => {
                    algo::broadcast_striped(self.rank, p, es, sh.seg)
                }
                _ => algo::broadcast_striped(self.rank, &algo::striped_plan(&self.hosts, count, roots), es, sh.seg),
            },
            Coll::Reduce { op, root } => algo::reduce_chain(sh, count, *root, *op == ReduceOp::Avg),
            Coll::AllGather => match algo {
                Algo::Hierarchical => algo::all_gather_hier(self.rank, &self.hosts, es, sh.seg, count),
                _ => algo::all_gather_ring(sh, count),
            },
            Coll::ReduceScatter { op } => algo::reduce_scatter_ring(sh, count, *op == ReduceOp::Avg),
            Coll::AllToAll => {
                let c = vec![count; self.world];
                algo::all_to_all_pairwise(sh, &c, &c, false, BufId::Send)
            }
            Coll::AllToAllV { send_counts, recv_counts } => {
                algo::all_to_all_pairwise(sh, send_counts, recv_counts, true, BufId::Send)
            }
            Coll::Barrier => algo::barrier(sh),
            Coll::Group { ops } => algo::group(self.rank, ops),
        };
        (s, algo)
    }

    /// Runs `coll` to completion on this thread.
    ///
    /// # Safety
    /// `send` / `recv` point to buffers at least as long as the schedule for these arguments
    /// needs (the public API checks lengths first), valid and not otherwise accessed until
    /// this returns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &mut self,
        coll: &Coll,
        dtype: DataType,
        count: usize,
        send: *const u8,
        recv: *mut u8,
        kind: MemKind,
        digest_parts: &[u64],
        deadline: &mut crate::deadline::Deadline,
        abort: &AtomicBool,
    ) -> Result<()> {
        self.sticky.check()?;
        if let Some(why) = self.gone {
            return Err(Error::Aborted(why.into()));
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Error::Aborted("abort() was called".into()));
        }
        // A broadcast from several roots is planned here, once: the schedule is built from
        // this plan, and explain shows it.
        if let Coll::BroadcastRoots { roots } = coll {
            self.last_striped = Some(algo::striped_plan(&self.hosts, count, roots));
        }
        let key = match coll {
            Coll::AllToAllV { .. } | Coll::Group { .. } | Coll::BroadcastRoots { .. } => None,
            Coll::Broadcast { root } | Coll::Reduce { root, .. } => Some(*root),
            _ => Some(0),
        }
        .map(|root| SchedKey {
            opcode: coll.opcode(),
            in_place: std::ptr::eq(send, recv),
            root,
            avg: coll.op() == ReduceOp::Avg,
            es: dtype.size(),
            count,
        });
        let (sched, algo) = match (key, &self.last) {
            (Some(k), Some((lk, s, a))) if k == *lk => (s.clone(), *a),
            _ => {
                let (s, a) = match key.and_then(|k| self.cache.get(&k)) {
                    Some((s, a)) => (s.clone(), *a),
                    None => {
                        let (s, a) = self.schedule(coll, dtype, count, std::ptr::eq(send, recv));
                        let s = Arc::new(s);
                        if let Some(k) = key {
                            if self.cache.len() >= CACHE_ENTRIES {
                                self.cache.clear();
                            }
                            self.cache.insert(k, (s.clone(), a));
                        }
                        (s, a)
                    }
                };
                if let Some(k) = key {
                    self.last = Some((k, s.clone(), a));
                }
                (s, a)
            }
        };
        if sched.steps() == 0 {
            return Ok(());
        }
        let tag = match coll {
            Coll::Group { .. } => Tag::new(coll.opcode(), 0, 0),
            _ => {
                self.coll_seq += 1;
                Tag::new(coll.opcode(), oxccl_core::link::digest(digest_parts), self.coll_seq)
            }
        };
        // Earlier sends and receives still in flight go on the wire first (this operation's
        // messages follow theirs on each link); they need not complete.
        if !self.flights.all_posted() {
            self.drive_flights(Goal::Posted, abort)?;
        }
        // The local memory work for the buffers' kind, and scratch of that kind.
        let mem = crate::registry::local_mem(kind, self.cfg.gpu)?;
        let fits = |s: &Option<(MemKind, Scratch)>| {
            s.as_ref().is_some_and(|(k, s)| *k == kind && s.len() >= sched.scratch_bytes)
        };
        if !fits(&self.scratch) {
            self.scratch = Some((kind, mem.scratch(sched.scratch_bytes)?));
        }
        let scratch = self.scratch.as_ref().map_or(std::ptr::null_mut(), |(_, s)| s.ptr());
        let bufs = Bufs { send, recv, scratch, kind, mem };
        let op = coll.op();
        let mem = std::mem::take(&mut self.mem);
        // SAFETY: forwarded from the caller; scratch is sized above and owned by self.
        let mut exec = unsafe { Exec::with_mem(&sched, bufs, tag, dtype, op, self.world, mem) };
        let mut links = links_of!(self);
        let wait = (self.doorbell.as_deref(), self.nap);
        let index = self.rec.begin(crate::trace::OpInfo {
            opcode: coll.opcode(),
            send: match coll {
                Coll::Group { ops } if ops.len() == 1 => Some(ops[0].send),
                _ => None,
            },
            seq: tag.seq(),
            count: match coll {
                Coll::Group { ops } => ops.iter().map(|o| o.len as u64).sum(),
                _ => count as u64,
            },
            dtype: if matches!(coll, Coll::Group { .. }) { DataType::U8 } else { dtype },
            peer: match coll {
                Coll::Group { ops } if ops.len() == 1 => Some(ops[0].peer),
                Coll::Broadcast { root } | Coll::Reduce { root, .. } => Some(*root),
                _ => None,
            },
            algo: (!matches!(coll, Coll::Group { .. })).then_some(algo),
        });
        let ctx = Ctx { tag: Some(tag), cfg: &self.cfg, wait, abort, rec: (&self.rec, index) };
        let (flights, health) = (&mut self.flights, &mut self.health);
        let r = drive(Some(&mut exec), flights, Goal::Exec, &mut links, &ctx, deadline, health).map(|_| ());
        self.rec.end(index, r.is_ok());
        self.mem = exec.into_mem();
        // The caller's buffers are the caller's again: links keep nothing about them.
        self.links.iter_mut().flatten().for_each(|l| l.op_end());
        // A timeout says which operation, where, on which rank.
        let rank = self.rank;
        let r = r.map_err(|(e, seen_elsewhere)| {
            let e = match e {
                Error::Timeout { after, what } => {
                    let op = match coll {
                        // Sends and receives have no count or algorithm: say what they move.
                        Coll::Group { ops } => {
                            let each: Vec<String> = ops
                                .iter()
                                .map(|o| match o.send {
                                    true => format!("send of {} bytes to rank {}", o.len, o.peer),
                                    false => format!("recv of {} bytes from rank {}", o.len, o.peer),
                                })
                                .collect();
                            format!("send/recv ({})", each.join(", "))
                        }
                        _ => format!("{} ({}, {count} x {dtype})", describe_tag(tag), algo.name()),
                    };
                    Error::Timeout { after, what: format!("{op} on rank {rank}: {what}") }
                }
                e => e,
            };
            // The call's own clock starts at its first wait; the recorder's at its start (a
            // rank stopped mid-operation never waited by its own clock).
            let waited = deadline.waited(Instant::now()).max(self.rec.elapsed(index));
            self.fail(e, seen_elsewhere, waited)
        });
        self.health.op_ended();
        r
    }

    /// Ends the communicator after operation error `e`: a failure found here is written down
    /// for the other ranks (or, when one failed first, replaced by its cause; `seen_elsewhere`:
    /// it came from there), kept as the first error, and every link and transport goes.
    /// Operations this rank posted may still sit in the links' queues, pointing at the
    /// caller's buffers, which the caller gets back now: dropping the links drops those
    /// queues. The communicator is unusable after this, as peers are out of step; it never
    /// talks again, so its transports go too (a NIC endpoint, its lease).
    fn fail(&mut self, e: Error, seen_elsewhere: bool, waited: Duration) -> Error {
        let e = if seen_elsewhere {
            e
        } else {
            let e = self.health.explain_peer(e);
            let waited = match &e {
                Error::Timeout { after, .. } => *after,
                _ => waited,
            };
            self.health.settle(e, waited)
        };
        self.health.op_ended();
        self.sticky.record(self.rank, &e);
        // Flights end with the communicator's error itself (a flight's own timeout reads as
        // one); their buffers go back once the links are gone, below.
        let flights = std::mem::take(&mut self.flights);
        self.let_go();
        let mut flights = flights;
        for i in flights.fail_all(&e) {
            self.rec.end(i, false);
        }
        e
    }

    /// Starts a non-blocking send or receive of `buf` to or from `peer`: it is posted as soon
    /// as its link is up, after every earlier operation's messages. A communicator that
    /// failed ends it at once with its error.
    pub(crate) fn push_flight(
        &mut self,
        (peer, send, user_tag): (usize, bool, u32),
        buf: MemSlice,
        when: (Instant, Instant),
        finish: Finish,
    ) {
        let usable = self.sticky.check().and_then(|_| match self.gone {
            Some(why) => Err(Error::Aborted(why.into())),
            None => Ok(()),
        });
        if let Err(e) = usable {
            finish(Err(e));
            return;
        }
        let index = self.rec.begin(crate::trace::OpInfo {
            opcode: oxccl_core::link::opcode::SEND_RECV,
            send: Some(send),
            seq: 0,
            count: buf.len() as u64,
            dtype: DataType::U8,
            peer: Some(peer),
            algo: None,
        });
        self.flights.push(crate::p2p::Flight::new((peer, send, user_tag), buf, index, when, finish));
    }

    /// Moves the flights along until they are all done, `stop()` asks for the engine, or
    /// nothing moves for a while ([`Outcome::Idle`]: the caller may nap without the lock).
    /// A flight that fails (or passes its deadline) fails the communicator: every flight
    /// ends with the error.
    pub(crate) fn drain(&mut self, stop: &dyn Fn() -> bool, abort: &AtomicBool) -> Outcome {
        if self.flights.is_empty() {
            return Outcome::Done;
        }
        self.drive_flights(Goal::Drain { stop }, abort).unwrap_or(Outcome::Done)
    }

    /// Drives the flights until `finished()` (the caller's own flights all ended), napping
    /// when nothing moves, within `deadline`.
    pub(crate) fn drive_until(
        &mut self,
        finished: &dyn Fn() -> bool,
        deadline: &mut crate::deadline::Deadline,
        abort: &AtomicBool,
    ) -> Result<()> {
        while !finished() {
            if let Outcome::Idle = self.drive_flights(Goal::Drain { stop: finished }, abort)? {
                if Instant::now() >= deadline.at(Instant::now()) {
                    let after = deadline.timeout();
                    let e = Error::Timeout {
                        after,
                        what: format!("send/recv on rank {}: sends still in flight", self.rank),
                    };
                    return Err(self.fail(e, false, after));
                }
                std::thread::sleep(self.nap.min(Duration::from_millis(1)));
            }
        }
        Ok(())
    }

    /// Runs the flights alone towards `goal`; an error fails the communicator.
    fn drive_flights(&mut self, goal: Goal<'_>, abort: &AtomicBool) -> Result<Outcome> {
        let mut links = links_of!(self);
        let wait = (self.doorbell.as_deref(), self.nap);
        let ctx = Ctx { tag: None, cfg: &self.cfg, wait, abort, rec: (&self.rec, 0) };
        let mut unused = crate::deadline::Deadline::after(self.cfg.timeout);
        let (flights, health) = (&mut self.flights, &mut self.health);
        let waited = flights.longest_wait(Instant::now());
        match drive(None, flights, goal, &mut links, &ctx, &mut unused, health) {
            Ok(o) => {
                if matches!(o, Outcome::Done) {
                    // Every flight ended: a request for records made for them is spent.
                    health.op_ended();
                }
                Ok(o)
            }
            Err((e, seen_elsewhere)) => {
                let rank = self.rank;
                let e = match e {
                    Error::Timeout { after, what } => {
                        Error::Timeout { after, what: format!("send/recv on rank {rank}: {what}") }
                    }
                    e => e,
                };
                let waited = match &e {
                    Error::Timeout { after, .. } => *after,
                    _ => waited,
                };
                Err(self.fail(e, seen_elsewhere, waited))
            }
        }
    }
}
