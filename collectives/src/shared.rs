//! What a communicator's threads share: its engine state (behind one lock), the turnstile
//! that keeps calls in order, the abort and close flags, the sticky first error, and what
//! it is (fixed at creation).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use oxccl_core::budget::{EndpointUse, TrafficClass};
use oxccl_core::link::TransportKind;
use oxccl_core::mem::MemKinds;
use oxccl_core::topo::PeerInfo;
use oxccl_core::{Error, Result};

use crate::engine::State;

/// Serializes operations in call order: each takes a ticket when it is called, and runs when
/// every earlier ticket has finished (blocking calls and queued `Work` alike). Atomics on the
/// fast path (a blocking call with nothing queued takes no lock); a mutex and condition
/// variable only for callers that must wait.
#[derive(Debug, Default)]
pub(crate) struct Turnstile {
    issued: AtomicU64,
    running: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A ticket's turn, released when dropped, also on a panic (later calls then fail at once
/// on the poisoned state instead of waiting for their deadline).
pub(crate) struct Turn<'a>(pub &'a Turnstile, pub u64);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.done(self.1);
    }
}

impl Turnstile {
    pub(crate) fn ticket(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::SeqCst)
    }
    /// Waits until `t` may run. Fails at `deadline` or on abort.
    pub(crate) fn wait_turn(&self, t: u64, deadline: &mut crate::deadline::Deadline, abort: &AtomicBool) -> Result<()> {
        if self.running.load(Ordering::Acquire) == t {
            return Ok(());
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = loop {
            if self.running.load(Ordering::SeqCst) == t {
                break Ok(());
            }
            if abort.load(Ordering::Relaxed) {
                break Err(Error::Aborted("aborted while waiting for earlier operations".into()));
            }
            let now = Instant::now();
            let left = deadline.at(now).saturating_duration_since(now);
            if left.is_zero() {
                break Err(Error::Timeout {
                    after: Duration::ZERO,
                    what: "earlier non-blocking operations of this communicator did not finish".into(),
                });
            }
            g = self.cv.wait_timeout(g, left.min(Duration::from_millis(50))).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }
    /// Lets the next ticket run.
    pub(crate) fn done(&self, t: u64) {
        // Monotonic: a late or repeated `done` can never move the turn backwards.
        self.running.fetch_max(t + 1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Threads waiting for `state` (the progress thread, moving flights along, lets go of it
    /// when one is).
    pub(crate) wanted: AtomicUsize,
    /// Threads waiting in `Work::wait` (the progress thread then naps only briefly: a
    /// waiter wants its completion soon, as a blocking call would).
    pub(crate) waiters: AtomicUsize,
    pub(crate) turns: Turnstile,
    pub(crate) abort: AtomicBool,
    pub(crate) closed: AtomicBool,
    /// The first error (shared with the engine's state).
    pub(crate) sticky: Arc<crate::engine::Sticky>,
    pub(crate) timeout_ns: AtomicU64,
    /// What the communicator is, for explain (fixed at creation).
    pub(crate) meta: Meta,
    /// The flight recorder (shared with the engine's state, which writes it).
    pub(crate) rec: Arc<crate::trace::Recorder>,
}

/// A communicator's identity and what the budget gave it.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// Store prefix: names the communicator in logs, leases and explain.
    pub(crate) name: String,
    pub(crate) class: TrafficClass,
    pub(crate) peers: Arc<Vec<PeerInfo>>,
    /// The NIC endpoint it uses, if a transport that leases one carries any of its links.
    pub(crate) endpoint: Option<EndpointUse>,
    /// The kinds of memory every transport open on this rank can move, and each one's.
    pub(crate) carried: MemKinds,
    /// `OXCCL_GPU` as this communicator was created with it.
    pub(crate) gpu: oxccl_core::config::GpuUse,
    pub(crate) memory: Vec<(TransportKind, MemKinds)>,
    /// The store it was made through (its root: requests for flight records arrive there).
    pub(crate) root: Arc<dyn oxccl_core::store::Store>,
}

/// Every communicator of the process. Process-wide because `explain_process` (and
/// `oxccl explain`) must see communicators no caller handed it; weak, so it keeps none alive.
pub(crate) static REGISTRY: Mutex<Vec<std::sync::Weak<Shared>>> = Mutex::new(Vec::new());

impl Shared {
    /// The engine's state, for an operation: taken at once when free; else this thread says
    /// it wants it (the progress thread lets go between polls of the flights) and waits.
    pub(crate) fn lock_state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        let poisoned = |_| Error::Internal("communicator state poisoned by a panic".into());
        match self.state.try_lock() {
            Ok(g) => return Ok(g),
            Err(std::sync::TryLockError::Poisoned(e)) => return Err(poisoned(e)),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        self.wanted.fetch_add(1, Ordering::SeqCst);
        let g = self.state.lock();
        self.wanted.fetch_sub(1, Ordering::SeqCst);
        g.map_err(poisoned)
    }

    /// Makes `e` sticky (argument errors excepted).
    pub(crate) fn record(&self, rank: usize, e: &Error) {
        self.sticky.record(rank, e);
    }
}

impl crate::trace::Traced for Shared {
    fn store(&self) -> (&Arc<dyn oxccl_core::store::Store>, &str) {
        (&self.meta.root, &self.meta.name)
    }

    fn trace(&self, request: i64) -> crate::trace::RankTrace {
        let m = &self.meta;
        let ended = match self.sticky.first() {
            Some(e) => Some(format!("failed: {e}")),
            None if self.closed.load(Ordering::Relaxed) => Some("closed".into()),
            None => None,
        };
        crate::trace::RankTrace {
            comm: m.name.clone(),
            rank: m.rank,
            world: m.world,
            host: m.peers[m.rank].host_id.clone(),
            pid: std::process::id(),
            request,
            capacity: self.rec.capacity(),
            last_seq: self.rec.last_seq(),
            ended,
            ops: self.rec.snapshot(),
        }
    }
}
