//! The flight recorder: each communicator keeps its last `OXCCL_TRACE_BUFFER` operations
//! (which, the sizes, the peer or root, the algorithm, running / done / failed, when), as
//! PyTorch does for NCCL, so that a hang can be read after the fact: which rank is behind,
//! and the operation it is stuck in.
//!
//! Recording costs a few relaxed stores and two reads of the coarse clock per operation (a
//! vDSO read of a few nanoseconds, 4 ms resolution: enough to tell a hang from a slow call).
//! One thread writes (the one running operations, under the engine's lock); readers (the
//! answering thread, `oxccl trace`, a failing rank) copy entries under a per-entry sequence
//! lock and never block the writer.
//!
//! Records leave the process through the store: when asked (the store key [`REQUEST`] goes
//! up: a rank that timed out or lost a peer, `oxccl trace`, the trace signal), a per-process
//! thread ([`Answerer`]) writes every live communicator's record to the store, without
//! taking any communicator's lock, whether its rank waits inside OxCCL or computes
//! elsewhere. A process that does not answer is stopped, hung, or gone.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use oxccl_core::algo::Algo;
use oxccl_core::link::opcode;
use oxccl_core::store::Store;
use oxccl_core::DataType;

/// Store key (at the root of the store) counting requests for records, answered under each
/// communicator's prefix (what a failing rank reads).
pub(crate) const REQUEST: &str = "oxccl/trace/request";
/// Store key counting requests for a listing of every communicator's records (`oxccl
/// trace`, the trace signal): answered under [`listed_key`], deleted by the reader.
pub(crate) const LIST: &str = "oxccl/trace/list";
/// How often the answering thread looks for a request.
pub(crate) const ANSWER_EVERY: Duration = Duration::from_millis(250);
/// Rows of the side-by-side table printed on a failure or on the trace signal (the latest).
pub(crate) const SHOWN_ROWS: usize = 40;
/// How long a store call of the answering thread may take.
const STORE_LIMIT: Duration = Duration::from_millis(500);

/// Milliseconds of the coarse monotonic clock (a few ns to read; 4 ms steps).
pub(crate) fn coarse_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC_COARSE needs nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// How an operation ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    /// Still running.
    Running,
    /// Completed.
    Done,
    /// Failed.
    Failed,
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpRecord {
    /// Its number among this communicator's operations on this rank (1, 2, ...).
    pub index: u64,
    /// `all_reduce`, `send`, `recv`, `send/recv` (a group), ...
    pub op: String,
    /// For collectives, the sequence number every rank gives the same call (`all_reduce
    /// #21`); 0 for point-to-point operations.
    pub seq: u64,
    /// Elements (0 for point-to-point groups: see `bytes`).
    pub count: u64,
    /// Element type.
    pub dtype: String,
    /// The peer (send, recv) or root (broadcast, reduce), if any.
    pub peer: Option<usize>,
    /// The algorithm, for collectives.
    pub algo: String,
    /// Running, done or failed.
    pub state: OpState,
    /// How long before the record was taken it started, in milliseconds.
    pub started_ms_ago: u64,
    /// How long it took (or has taken so far), in milliseconds.
    pub took_ms: u64,
    /// While it runs: the step of its schedule and the ranks it waits on, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<(usize, Vec<usize>)>,
}

impl OpRecord {
    /// "all_reduce #21" / "send to 2".
    pub fn name(&self) -> String {
        match (self.seq, self.peer) {
            (0, Some(p)) if self.op == "send" => format!("send to {p}"),
            (0, Some(p)) if self.op == "recv" => format!("recv from {p}"),
            (0, _) => self.op.clone(),
            (s, _) => format!("{} #{s}", self.op),
        }
    }
}

/// What an operation is, as the engine starts it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpInfo {
    pub opcode: u8,
    /// Point-to-point direction for a single send or recv (`Some(true)`: send).
    pub send: Option<bool>,
    pub seq: u64,
    pub count: u64,
    pub dtype: DataType,
    pub peer: Option<usize>,
    pub algo: Option<Algo>,
}

/// Algorithms by their code in a slot (code = position + 1; 0: none).
/// In declaration order (a record keeps `algo as u8 + 1`; `algos_are_in_declaration_order`).
const ALGOS: [Algo; 7] =
    [Algo::Ring, Algo::RecursiveDoubling, Algo::Chain, Algo::Tree, Algo::Pairwise, Algo::Hierarchical, Algo::Striped];

/// One slot of the ring: packed fields under a sequence lock.
#[derive(Default)]
struct Slot {
    /// Even: stable; odd: being written.
    ver: AtomicU64,
    /// The operation's index (1-based; 0: never used).
    index: AtomicU64,
    /// opcode (8) | direction (8: 0 none, 1 send, 2 recv) | dtype (8) | algo (8) | state (8).
    kind: AtomicU64,
    seq: AtomicU64,
    count: AtomicU64,
    /// Peer or root + 1 (0: none).
    peer: AtomicU64,
    start_ms: AtomicU64,
    end_ms: AtomicU64,
}

const RUNNING: u64 = 0;
const DONE: u64 = 1;
const FAILED: u64 = 2;

/// A communicator's flight recorder.
pub(crate) struct Recorder {
    slots: Box<[Slot]>,
    /// Operations begun so far.
    begun: AtomicU64,
    /// The sequence number of the last collective begun (kept even when recording is off).
    last_seq: AtomicU64,
    /// The running operation's step and the ranks it waits on, as the waiting loop last saw
    /// them (by operation index; off the fast path).
    waiting: Mutex<Option<(u64, usize, Vec<usize>)>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("capacity", &self.slots.len()).finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder of the last `capacity` operations (0: records nothing).
    pub(crate) fn new(capacity: usize) -> Recorder {
        Recorder {
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            begun: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            waiting: Mutex::new(None),
        }
    }

    /// How many operations were begun (counted even when recording is off).
    pub(crate) fn ops(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// The sequence number of the last collective begun (0: none).
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Relaxed)
    }

    /// How many operations it keeps.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn write(&self, index: u64, f: impl FnOnce(&Slot)) {
        let Some(s) = self.slots.get((index as usize).wrapping_sub(1) % self.slots.len().max(1)) else { return };
        let v = s.ver.load(Ordering::Relaxed);
        s.ver.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        f(s);
        s.ver.store(v + 2, Ordering::Release);
    }

    /// Records the start of an operation; returns its index (0 when nothing is recorded).
    /// One writer at a time (the engine's lock).
    pub(crate) fn begin(&self, op: OpInfo) -> u64 {
        if op.seq != 0 {
            self.last_seq.store(op.seq, Ordering::Relaxed);
        }
        let index = self.begun.load(Ordering::Relaxed) + 1;
        if self.slots.is_empty() {
            self.begun.store(index, Ordering::Relaxed);
            return 0;
        }
        let dir = match op.send {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        let kind = (op.opcode as u64) << 32
            | dir << 24
            | (op.dtype.index() as u64) << 16
            | op.algo.map_or(0, |a| a as u64 + 1) << 8
            | RUNNING;
        let now = coarse_ms();
        self.write(index, |s| {
            s.index.store(index, Ordering::Relaxed);
            s.kind.store(kind, Ordering::Relaxed);
            s.seq.store(op.seq, Ordering::Relaxed);
            s.count.store(op.count, Ordering::Relaxed);
            s.peer.store(op.peer.map_or(0, |p| p as u64 + 1), Ordering::Relaxed);
            s.start_ms.store(now, Ordering::Relaxed);
            s.end_ms.store(0, Ordering::Relaxed);
        });
        self.begun.store(index, Ordering::Release);
        index
    }

    /// Records the end of operation `index`.
    pub(crate) fn end(&self, index: u64, ok: bool) {
        if index == 0 {
            return;
        }
        let now = coarse_ms();
        self.write(index, |s| {
            if s.index.load(Ordering::Relaxed) == index {
                let k = s.kind.load(Ordering::Relaxed) & !0xff;
                s.kind.store(k | if ok { DONE } else { FAILED }, Ordering::Relaxed);
                s.end_ms.store(now.max(1), Ordering::Relaxed);
            }
        });
    }

    /// How long operation `index` has run, by the coarse clock (zero when not recorded). A
    /// rank stopped in the middle of an operation reads no other clock for it.
    pub(crate) fn elapsed(&self, index: u64) -> Duration {
        let Some(s) = self.slots.get((index as usize).wrapping_sub(1) % self.slots.len().max(1)) else {
            return Duration::ZERO;
        };
        if index == 0 || s.index.load(Ordering::Relaxed) != index {
            return Duration::ZERO;
        }
        Duration::from_millis(coarse_ms().saturating_sub(s.start_ms.load(Ordering::Relaxed)))
    }

    /// Notes where running operation `index` waits (called by the waiting loop, at its
    /// health checks only).
    pub(crate) fn waiting(&self, index: u64, step: usize, on: &[usize]) {
        if index != 0 {
            *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, step, on.to_vec()));
        }
    }

    /// The operations kept, oldest first, as of now.
    pub(crate) fn snapshot(&self) -> Vec<OpRecord> {
        let now = coarse_ms();
        let begun = self.begun.load(Ordering::Acquire);
        let n = self.slots.len() as u64;
        if n == 0 {
            return Vec::new();
        }
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = Vec::new();
        for index in begun.saturating_sub(n) + 1..=begun {
            let s = &self.slots[((index - 1) % n) as usize];
            // Copy under the sequence lock; a slot rewritten meanwhile (the writer lapped
            // us) is skipped.
            let copy = (0..4).find_map(|_| {
                let v1 = s.ver.load(Ordering::Acquire);
                let fields = (
                    s.index.load(Ordering::Relaxed),
                    s.kind.load(Ordering::Relaxed),
                    s.seq.load(Ordering::Relaxed),
                    s.count.load(Ordering::Relaxed),
                    s.peer.load(Ordering::Relaxed),
                    s.start_ms.load(Ordering::Relaxed),
                    s.end_ms.load(Ordering::Relaxed),
                );
                fence(Ordering::Acquire);
                (v1 % 2 == 0 && s.ver.load(Ordering::Relaxed) == v1).then_some(fields)
            });
            let Some((idx, kind, seq, count, peer, start, end)) = copy else { continue };
            if idx != index {
                continue;
            }
            let code = (kind >> 32) as u8;
            let op = match ((kind >> 24) & 0xff, code) {
                (1, _) => "send".to_string(),
                (2, _) => "recv".to_string(),
                (_, c) => opcode::name(c).to_string(),
            };
            let state = match kind & 0xff {
                DONE => OpState::Done,
                FAILED => OpState::Failed,
                _ => OpState::Running,
            };
            let algo =
                (((kind >> 8) & 0xff) as usize).checked_sub(1).and_then(|i| ALGOS.get(i)).map_or("", |a| a.name());
            out.push(OpRecord {
                index,
                op,
                seq,
                count,
                dtype: DataType::ALL[((kind >> 16) & 0xff) as usize % DataType::ALL.len()].name().to_string(),
                peer: peer.checked_sub(1).map(|p| p as usize),
                algo: algo.to_string(),
                state,
                started_ms_ago: now.saturating_sub(start),
                took_ms: if end == 0 { now.saturating_sub(start) } else { end.saturating_sub(start) },
                waiting: match (&waiting, state) {
                    (Some((i, step, on)), OpState::Running) if *i == index => Some((*step, on.clone())),
                    _ => None,
                },
            });
        }
        out
    }
}

/// One rank's answer: its communicator's record, as of the request it answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankTrace {
    /// The communicator (its store prefix).
    pub comm: String,
    /// The rank in it.
    pub rank: usize,
    /// Its size.
    pub world: usize,
    /// The host (identity) and process.
    pub host: String,
    /// Operating-system process id.
    pub pid: u32,
    /// The request answered.
    pub request: i64,
    /// How many operations the recorder keeps (0: recording is off, `OXCCL_TRACE_BUFFER`).
    pub capacity: usize,
    /// The last collective this rank started (its sequence number; 0: none).
    pub last_seq: u64,
    /// The communicator failed here, with this error; or it was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// The operations kept, oldest first.
    pub ops: Vec<OpRecord>,
}

impl RankTrace {
    /// The running operation, if any.
    pub fn running(&self) -> Option<&OpRecord> {
        self.ops.iter().rev().find(|o| o.state == OpState::Running)
    }
}

/// Store key of a rank's answer (under its communicator's prefix).
pub(crate) fn answer_key(rank: usize) -> String {
    format!("trace/{rank}")
}

/// Store key of the `i`-th answer to request `n` (at the root: `oxccl trace` reads them all).
pub(crate) fn listed_key(n: i64, i: i64) -> String {
    format!("oxccl/trace/{n}/{i}")
}

/// Store key counting the answers to request `n`.
pub(crate) fn listed_count(n: i64) -> String {
    format!("oxccl/trace/{n}/count")
}

/// Asks every process on `store` for its communicators' records; returns the request's
/// number.
pub(crate) fn ask(store: &dyn Store) -> oxccl_core::Result<i64> {
    store.add_within(REQUEST, 1, STORE_LIMIT)
}

/// The answers of a communicator's ranks to request `at_least` or later (`None`: no answer
/// yet); `store` is the communicator's (prefixed).
pub(crate) fn answers(store: &dyn Store, world: usize, at_least: i64) -> Vec<Option<RankTrace>> {
    (0..world)
        .map(|r| {
            let v = store.try_get_within(&answer_key(r), STORE_LIMIT).ok()??;
            serde_json::from_slice::<RankTrace>(&v).ok().filter(|t| t.request >= at_least)
        })
        .collect()
}

/// How many answers list request `n` has (0 when it cannot be read).
fn answers_listed(store: &dyn Store, n: i64) -> i64 {
    store
        .try_get_within(&listed_count(n), STORE_LIMIT)
        .ok()
        .flatten()
        .and_then(|v| oxccl_core::store::parse_counter("", &v).ok())
        .unwrap_or(0)
}

/// Every answer to request `n` on `store`, whichever communicator (what `oxccl trace`
/// prints).
fn listed(store: &dyn Store, n: i64) -> Vec<RankTrace> {
    (1..=answers_listed(store, n))
        .filter_map(|i| {
            let v = store.try_get_within(&listed_key(n, i), STORE_LIMIT).ok()??;
            serde_json::from_slice(&v).ok()
        })
        .collect()
}

/// Asks every process that uses `store` (the store communicators were made through) for its
/// communicators' records, and collects the answers for up to `wait` (less when every
/// communicator that answered has all its ranks' answers and every live process has had time
/// to look). A rank that does not answer is stopped, hung or gone: [`report`] says so.
pub fn gather(store: &dyn Store, wait: Duration) -> oxccl_core::Result<Vec<RankTrace>> {
    let n = store.add_within(LIST, 1, STORE_LIMIT)?;
    let start = std::time::Instant::now();
    let got = loop {
        std::thread::sleep(Duration::from_millis(50));
        let got = listed(store, n);
        let looked = start.elapsed() >= 3 * ANSWER_EVERY;
        if start.elapsed() >= wait || (looked && !got.is_empty() && complete(&got)) {
            break got;
        }
    };
    // The listing is read: leave nothing behind (a late answer leaves its own key and count).
    for i in 1..=answers_listed(store, n) {
        let _ = store.delete(&listed_key(n, i));
    }
    let _ = store.delete(&listed_count(n));
    Ok(got)
}

/// Every communicator in `traces` has an answer from each of its ranks.
fn complete(traces: &[RankTrace]) -> bool {
    traces.iter().all(|t| (0..t.world).all(|r| traces.iter().any(|o| o.comm == t.comm && o.rank == r)))
}

/// Records of any number of communicators (what [`gather`] returns), each communicator's
/// ranks side by side, its last `rows` rows (0: all).
pub fn report(traces: &[RankTrace], rows: usize) -> String {
    let mut by_comm: std::collections::BTreeMap<&str, Vec<Option<RankTrace>>> = Default::default();
    for t in traces {
        let slots = by_comm.entry(&t.comm).or_insert_with(|| vec![None; t.world]);
        if slots.len() < t.world {
            slots.resize(t.world, None);
        }
        slots[t.rank] = Some(t.clone());
    }
    if by_comm.is_empty() {
        return "no rank answered (no live communicator uses this store, or no process could be reached)\n".into();
    }
    by_comm.iter().map(|(comm, a)| side_by_side(comm, a.len(), a, rows)).collect::<Vec<_>>().join("\n")
}

/// Set by the trace signal's handler; the answering thread acts on it.
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_trace_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(true, Ordering::Relaxed);
}

/// Installs the handler for `OXCCL_TRACE_SIGNAL` (`USR1` or `USR2`) once per process: on the
/// signal, the answering thread gathers every rank's record and prints it to stderr.
pub(crate) fn install_signal(name: &str) {
    static DONE: std::sync::Once = std::sync::Once::new();
    let sig = match name {
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => return,
    };
    DONE.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic; SA_RESTART
        // keeps system calls of other threads from failing with EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_trace_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "OXCCL_TRACE_SIGNAL={name}: cannot install the handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Gathers every rank's record through each store and prints them to stderr (the trace
/// signal's work; on its own thread, so answering goes on meanwhile).
fn print_on_signal(stores: Vec<Arc<dyn Store>>) {
    let run = move || {
        for store in stores {
            match gather(&*store, Duration::from_secs(2)) {
                Ok(t) => eprintln!(
                    "oxccl: flight records (OXCCL_TRACE_SIGNAL), pid {}:\n{}",
                    std::process::id(),
                    report(&t, SHOWN_ROWS)
                ),
                Err(e) => eprintln!("oxccl: cannot gather flight records: {e}"),
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("oxccl-trace-print".into()).spawn(run) {
        tracing::warn!("cannot start the thread that prints flight records: {e}");
    }
}

/// What the answering thread needs of a communicator.
pub(crate) trait Traced: Send + Sync {
    /// The store the communicator was made through (its root) and its prefix.
    fn store(&self) -> (&Arc<dyn Store>, &str);
    /// Its record now.
    fn trace(&self, request: i64) -> RankTrace;
}

/// The per-process thread that answers requests for records.
pub(crate) struct Answerer {
    comms: Mutex<Vec<Weak<dyn Traced>>>,
}

static ANSWERER: std::sync::OnceLock<Arc<Answerer>> = std::sync::OnceLock::new();

impl Answerer {
    /// Registers `comm` to be answered for, starting the thread on first use.
    pub(crate) fn register(comm: Weak<dyn Traced>) {
        let a = ANSWERER.get_or_init(|| {
            let a = Arc::new(Answerer { comms: Mutex::new(Vec::new()) });
            let run = a.clone();
            if let Err(e) = std::thread::Builder::new().name("oxccl-trace".into()).spawn(move || run.run()) {
                tracing::warn!("cannot start the flight recorder's answering thread: {e}");
            }
            a
        });
        let mut c = a.comms.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|w| w.strong_count() > 0);
        c.push(comm);
    }

    /// Writes `comm`'s record for request `n`: under its own key (`listing`: false), or into
    /// the listing of list request `n`.
    pub(crate) fn answer(comm: &dyn Traced, n: i64, listing: bool) {
        let (store, prefix) = comm.store();
        let t = comm.trace(n);
        let Ok(v) = serde_json::to_vec(&t) else { return };
        let r = if listing {
            store
                .add_within(&listed_count(n), 1, STORE_LIMIT)
                .and_then(|i| store.set_within(&listed_key(n, i), &v, STORE_LIMIT))
        } else {
            store.set_within(&format!("{prefix}/{}", answer_key(t.rank)), &v, STORE_LIMIT)
        };
        if let Err(e) = r {
            tracing::debug!(rank = t.rank, "cannot write the flight record: {e}");
        }
    }

    fn run(&self) {
        // Per store: the last request and list request answered. The weak reference keeps
        // the store's allocation, so its address cannot be reused while it is listed here.
        let mut seen: Vec<(Weak<dyn Store>, [i64; 2])> = Vec::new();
        loop {
            std::thread::sleep(ANSWER_EVERY);
            let live: Vec<Arc<dyn Traced>> = {
                let mut c = self.comms.lock().unwrap_or_else(|e| e.into_inner());
                c.retain(|w| w.strong_count() > 0);
                c.iter().filter_map(Weak::upgrade).collect()
            };
            seen.retain(|(w, _)| w.strong_count() > 0);
            let mut stores: Vec<&Arc<dyn Store>> = Vec::new();
            for c in &live {
                let s = c.store().0;
                if !stores.iter().any(|x| Arc::ptr_eq(x, s)) {
                    stores.push(s);
                }
            }
            if SIGNALLED.swap(false, Ordering::Relaxed) {
                print_on_signal(stores.iter().map(|s| Arc::clone(s)).collect());
            }
            for store in stores {
                let i = match seen.iter().position(|(w, _)| std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(store))) {
                    Some(i) => i,
                    None => {
                        // The first look: requests already made were made before this
                        // process looked (maybe while it slept); answer them once.
                        seen.push((Arc::downgrade(store), [0, 0]));
                        seen.len() - 1
                    }
                };
                for (k, key) in [REQUEST, LIST].into_iter().enumerate() {
                    let Ok(Some(v)) = store.try_get_within(key, STORE_LIMIT) else { continue };
                    let Ok(n) = oxccl_core::store::parse_counter(key, &v) else { continue };
                    if n <= seen[i].1[k] {
                        continue;
                    }
                    seen[i].1[k] = n;
                    for c in live.iter().filter(|c| Arc::ptr_eq(c.store().0, store)) {
                        Answerer::answer(&**c, n, k == 1);
                    }
                }
            }
            drop(live);
        }
    }
}

/// The records of one communicator's ranks side by side: a row per collective (by sequence
/// number, comparable across ranks) and per point-to-point operation between them, the last
/// `last` rows (0: all); a rank that did not answer is said to.
pub fn side_by_side(comm: &str, world: usize, answers: &[Option<RankTrace>], last: usize) -> String {
    use std::fmt::Write;
    // Row keys: (collective seq before or at it, 0 for the collective itself / 1 + n for the
    // n-th point-to-point operation after it).
    let mut rows: std::collections::BTreeMap<(u64, u64), Vec<String>> = Default::default();
    for (r, a) in answers.iter().enumerate() {
        let Some(a) = a else { continue };
        let (mut last, mut n) = (0u64, 0u64);
        for o in &a.ops {
            let key = if o.seq > 0 {
                last = o.seq;
                n = 0;
                (o.seq, 0)
            } else {
                n += 1;
                (last, n)
            };
            let cell = rows.entry(key).or_insert_with(|| vec![String::new(); world]);
            let what = if o.seq > 0 { format!("{} {}x{}", o.name(), o.count, o.dtype) } else { o.name() };
            let state = match (o.state, &o.waiting) {
                (OpState::Running, Some((step, on))) => {
                    format!("RUNNING {} ms, step {step} waits on {on:?}", o.took_ms)
                }
                (OpState::Running, None) => format!("RUNNING {} ms", o.took_ms),
                (OpState::Done, _) => format!("done, {} ms", o.took_ms),
                (OpState::Failed, _) => format!("FAILED after {} ms", o.took_ms),
            };
            if r < world {
                cell[r] = format!("{what}: {state}");
            }
        }
    }
    let mut out = format!("flight recorder of {comm} ({world} ranks), oldest first:\n");
    for (r, a) in answers.iter().enumerate() {
        let _ = match a {
            Some(a) => writeln!(
                out,
                "  rank {r}: pid {} on {}, last collective #{}{}{}",
                a.pid,
                a.host,
                a.last_seq,
                if a.capacity == 0 { ", recording off (OXCCL_TRACE_BUFFER=0)" } else { "" },
                a.ended.as_deref().map(|e| format!(", ended: {e}")).unwrap_or_default()
            ),
            None => writeln!(out, "  rank {r}: NO ANSWER (stopped, hung, gone, or its store unreachable)"),
        };
    }
    let rows: Vec<Vec<String>> = rows
        .into_values()
        .map(|cells| {
            cells
                .into_iter()
                .enumerate()
                .map(|(r, c)| match (c.is_empty(), &answers.get(r)) {
                    (true, Some(Some(_))) => "-".to_string(),
                    (true, _) => "?".to_string(),
                    _ => c,
                })
                .collect()
        })
        .collect();
    let hidden = if last == 0 { 0 } else { rows.len().saturating_sub(last) };
    let rows = &rows[hidden..];
    if hidden > 0 {
        let _ = writeln!(out, "  ({hidden} earlier rows not shown)");
    }
    // Each column as wide as its widest cell.
    let widths: Vec<usize> =
        (0..world).map(|r| rows.iter().map(|c| c[r].chars().count()).max().unwrap_or(0).max(6)).collect();
    let _ = write!(out, "  |");
    for (r, w) in widths.iter().enumerate() {
        let _ = write!(out, " {:<w$} |", format!("rank {r}"));
    }
    out.push('\n');
    for cells in rows {
        let _ = write!(out, "  |");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, " {c:<w$} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(opcode: u8, seq: u64) -> OpInfo {
        OpInfo { opcode, send: None, seq, count: 16, dtype: DataType::F32, peer: None, algo: Some(Algo::Ring) }
    }

    #[test]
    fn algos_are_in_declaration_order() {
        for (i, a) in ALGOS.iter().enumerate() {
            assert_eq!(*a as usize, i, "{a:?}");
        }
    }

    #[test]
    fn keeps_the_last_operations_with_their_state() {
        let r = Recorder::new(3);
        for s in 1..=5 {
            let i = r.begin(info(opcode::ALL_REDUCE, s));
            r.end(i, s != 4);
        }
        let i = r.begin(OpInfo { send: Some(true), peer: Some(2), ..info(opcode::SEND_RECV, 0) });
        r.waiting(i, 0, &[2]);
        let ops = r.snapshot();
        assert_eq!(ops.iter().map(|o| o.index).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(ops[0].state, OpState::Failed);
        assert_eq!(ops[0].name(), "all_reduce #4");
        assert_eq!(ops[1].state, OpState::Done);
        assert_eq!((ops[2].state, ops[2].name()), (OpState::Running, "send to 2".to_string()));
        assert_eq!(ops[2].waiting, Some((0, vec![2])));
        assert_eq!(ops[0].dtype, "float");
        r.end(i, true);
        assert_eq!(r.snapshot()[2].waiting, None, "a finished operation waits on nobody");
    }

    #[test]
    fn an_empty_recorder_records_nothing() {
        let r = Recorder::new(0);
        assert_eq!(r.begin(info(opcode::BARRIER, 1)), 0);
        r.end(0, true);
        assert!(r.snapshot().is_empty());
    }

    /// Readers copy entries while the writer laps the ring: every entry read is whole.
    #[test]
    fn readers_never_see_a_torn_entry() {
        use std::sync::atomic::AtomicBool;
        let r = Arc::new(Recorder::new(4));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, halt) = (r.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut s = 0u64;
            while !halt.load(Ordering::Relaxed) {
                s += 1;
                let i = w.begin(OpInfo { count: s * 3, ..info(opcode::ALL_REDUCE, s) });
                w.end(i, true);
            }
        });
        let (mut seen, t0) = (0, std::time::Instant::now());
        while seen < 20_000 && t0.elapsed() < Duration::from_secs(5) {
            for o in r.snapshot() {
                assert_eq!(o.count, o.seq * 3, "{o:?}");
                assert_eq!(o.index, o.seq);
                seen += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(seen > 0, "the reader never saw an entry");
    }

    #[test]
    fn side_by_side_aligns_collectives_and_names_silent_ranks() {
        let r = Recorder::new(8);
        for s in 1..=2 {
            let i = r.begin(info(opcode::ALL_REDUCE, s));
            if s == 1 {
                r.end(i, true);
            } else {
                r.waiting(i, 2, &[2]);
            }
        }
        let t = RankTrace {
            comm: "oxccl/c1".into(),
            rank: 0,
            world: 3,
            host: "h".into(),
            pid: 1,
            request: 1,
            capacity: 8,
            last_seq: 2,
            ended: None,
            ops: r.snapshot(),
        };
        let answers = [Some(t.clone()), Some(RankTrace { rank: 1, ..t }), None];
        let text = side_by_side("oxccl/c1", 3, &answers, 0);
        assert!(text.contains("rank 2: NO ANSWER"), "{text}");
        assert!(text.contains("all_reduce #2 16xfloat: RUNNING"), "{text}");
        assert!(text.contains("step 2 waits on [2]"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("  |")).count(), 3, "a header and two rows: {text}");
        let text = side_by_side("oxccl/c1", 3, &answers, 1);
        assert!(text.contains("(1 earlier rows not shown)") && !text.contains("all_reduce #1"), "{text}");
        assert!(text.contains("all_reduce #2"), "{text}");
    }
}
