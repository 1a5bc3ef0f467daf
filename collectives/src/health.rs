//! How a rank learns that its communicator failed somewhere else, so that no rank waits for
//! a peer that will never answer.
//!
//! Three sources, checked while an operation waits with nothing moving (first after
//! [`CHECK_AFTER`] of idleness, then after [`CHECK_EVERY`], the gap doubling up to
//! [`CHECK_EVERY_MAX`]; the fast path pays nothing):
//!
//! 1. **The failure record** (`<communicator>/fail` in the store). The first rank whose
//!    operation fails writes what happened (its error, the rank it blames); the store's server
//!    writes it for a rank whose process is lost (its watch connection ended without a
//!    goodbye: SIGKILL, a crash, its host vanished). Every other rank reads it and fails with
//!    the same cause: a rank killed anywhere is named on every survivor, a mismatch detected
//!    on one side is an `InvalidUsage` on both.
//! 2. **Processes on this machine**: peers in the same process-id space are watched through
//!    pidfds opened at creation (immune to pid reuse); a peer that exited is named at once.
//! 3. **The store itself**: the watch connection ending means the process hosting the store
//!    is gone; when a rank of the communicator hosted it, that rank is named.
//!
//! A stopped (SIGSTOP) or hung peer is none of these: it ends in a timeout at the deadline.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::store::{LossAction, Store, Watch};
use oxccl_core::topo::PeerInfo;
use oxccl_core::Error;

/// Store key counting the communicators not yet closed, over every rank (a lost rank's
/// count is taken back by the store).
pub(crate) const LIVE: &str = "oxccl/live";

/// Idle time before the first check of an operation.
pub(crate) const CHECK_AFTER: Duration = Duration::from_millis(20);
/// Time between the first checks while an operation stays idle; it doubles after each, up to
/// [`CHECK_EVERY_MAX`] (a long wait for a straggler costs the store little).
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(50);
/// The longest time between checks.
pub(crate) const CHECK_EVERY_MAX: Duration = Duration::from_secs(1);
/// How long before its deadline a waiting operation asks every rank for its flight record:
/// a second, or half the timeout when that is shorter.
pub(crate) fn ask_before(timeout: Duration) -> Duration {
    (timeout / 2).min(Duration::from_secs(1))
}
/// How long one store call of a check may take.
const STORE_LIMIT: Duration = Duration::from_millis(200);
/// How long a store that did not answer is left alone.
const STORE_BACKOFF: Duration = Duration::from_secs(1);
/// The failure record's key (under the communicator's prefix).
pub(crate) const FAIL_KEY: &str = "fail";
/// Counter deciding which rank writes the failure record.
const FAIL_COUNT: &str = "fail/n";
/// Where a rank that closed the communicator says so (`closed/<rank>`), and their count.
const CLOSED: &str = "closed";
/// Counts the ranks that would log the flight records after a loss the store recorded.
const PRINTED: &str = "trace/printed";
const CLOSED_COUNT: &str = "closed/n";

/// What the failure record holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Failure {
    /// The rank that wrote it (for a lost process: the lost rank, written by the store).
    pub by: usize,
    /// The rank to blame, when one is known.
    pub rank: Option<usize>,
    /// `lost`, `remote`, `timeout`, `usage`, `aborted` or `other`.
    pub kind: String,
    /// The error's words.
    pub what: String,
    /// Ranks the evidence says hold the operation up (a timeout: they did not answer, or
    /// never reached the operation).
    #[serde(default)]
    pub stalled: Vec<usize>,
    /// How long the writer waited before it failed, in milliseconds.
    #[serde(default)]
    pub waited_ms: u64,
}

impl Failure {
    fn from_error(by: usize, e: &Error, stalled: Vec<usize>) -> Failure {
        let (kind, rank) = match e {
            Error::Remote { rank, .. } => ("remote", Some(*rank)),
            // A transport call that failed because of a peer blames that peer.
            Error::Transport { peer: Some(p), .. } => ("remote", Some(*p)),
            Error::Timeout { .. } => ("timeout", None),
            Error::InvalidUsage(_) => ("usage", Some(by)),
            Error::Aborted(_) => ("aborted", Some(by)),
            _ => ("other", None),
        };
        let what = match e {
            Error::Remote { what, .. } | Error::Timeout { what, .. } => what.clone(),
            Error::InvalidUsage(s) | Error::Aborted(s) => s.clone(),
            e => e.to_string(),
        };
        let waited_ms = match e {
            Error::Timeout { after, .. } => after.as_millis() as u64,
            _ => 0,
        };
        Failure { by, rank, kind: kind.into(), what, stalled, waited_ms }
    }

    /// The error rank `me`, which waited `waited`, returns after reading this record: the
    /// writer's words, with how long the writer waited (its own figure, not this rank's).
    pub(crate) fn into_error(self, me: usize, waited: Duration) -> Error {
        let by = self.by;
        let gave_up = Duration::from_millis(self.waited_ms);
        match self.kind.as_str() {
            // This rank is the one the others waited for (it was stopped, or slow): the rank
            // that gave up ended the operation.
            "timeout" if self.stalled.contains(&me) => Error::Remote {
                rank: by,
                what: format!(
                    "timed out after {gave_up:.1?} waiting for this rank ({me}), which held up the operation: {}",
                    self.what
                ),
            },
            "timeout" => Error::Timeout {
                after: waited,
                what: format!("rank {by} timed out first, after {gave_up:.1?}: {}", self.what),
            },
            "lost" => Error::Remote { rank: self.rank.unwrap_or(by), what: self.what },
            "remote" => {
                Error::Remote { rank: self.rank.unwrap_or(by), what: format!("{} (seen by rank {by})", self.what) }
            }
            "usage" => Error::invalid_usage(format!("{} (found by rank {by})", self.what)),
            "aborted" => Error::Remote { rank: by, what: format!("aborted the communicator ({})", self.what) },
            _ => Error::Remote { rank: self.rank.unwrap_or(by), what: format!("rank {by} failed: {}", self.what) },
        }
    }
}

/// A rank's watch over its communicator's health.
pub(crate) struct Health {
    rank: usize,
    /// The communicator's store (prefixed).
    store: Arc<dyn Store>,
    /// This rank's registration of loss actions; `None` where the store cannot watch.
    watch: Option<Box<dyn Watch>>,
    /// The rank hosting the store, if one of this communicator's does.
    store_host: Option<usize>,
    /// Peers in this process's pid space, watched through pidfds.
    pidfds: Vec<Option<Peer>>,
    /// The store is known gone: no more store checks.
    store_lost: bool,
    /// The store did not answer a check: not asked again before this.
    store_quiet_until: Option<Instant>,
    /// The communicator's size.
    world: usize,
    /// The store the communicator was made through (requests for flight records go there).
    root: Arc<dyn Store>,
    /// The request for flight records this operation made, and when.
    asked: Option<(i64, Instant)>,
    /// The ranks the last evidence blamed (written into the failure record).
    blamed: Vec<usize>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("rank", &self.rank).field("watch", &self.watch.is_some()).finish_non_exhaustive()
    }
}

/// A peer process this rank can watch.
enum Peer {
    /// Its pidfd (readable once it exits).
    Running(OwnedFd),
    /// It was gone already when the communicator was created.
    Gone,
}

/// Opens a pidfd for `pid`: `Ok(None)` when the kernel has no pidfds, `Err` when the process
/// is already gone.
fn pidfd_open(pid: u32) -> std::io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Err(e),
            _ => Ok(None),
        };
    }
    // SAFETY: a fresh descriptor we own.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// True once the process behind `fd` has exited.
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

impl Health {
    /// Registers this rank's loss actions (the failure record naming it, its share of the live
    /// count, its own store entries) and opens pidfds for the peers it can watch directly.
    pub(crate) fn new(
        rank: usize,
        peers: &[PeerInfo],
        root: Arc<dyn Store>,
        prefix: &str,
        store: Arc<dyn Store>,
    ) -> Health {
        let me = &peers[rank];
        let lost = Failure {
            by: rank,
            rank: Some(rank),
            kind: "lost".into(),
            what: format!(
                "rank {rank} (pid {} on host '{}') is gone: its process ended without closing the communicator \
                 (killed or crashed), or its host became unreachable",
                me.pid, me.host_id
            ),
            stalled: vec![rank],
            waited_ms: 0,
        };
        let mut actions = vec![
            LossAction::Add { key: format!("{prefix}/{FAIL_COUNT}"), delta: 1 },
            LossAction::SetIfAbsent {
                key: format!("{prefix}/{FAIL_KEY}"),
                value: serde_json::to_vec(&lost).unwrap_or_default(),
            },
            // It no longer counts as a live communicator (the store's host would wait for it).
            LossAction::Add { key: LIVE.into(), delta: -1 },
        ];
        // Entries only this rank wrote, useless once it is gone: its descriptions, and what
        // each transport published for it.
        let keys = ["host", "peer"].map(|k| format!("{k}/{rank}"));
        let transport_keys = crate::registry::transports().iter().flat_map(|t| t.rank_keys(rank));
        for k in keys.into_iter().chain(transport_keys) {
            actions.push(LossAction::Delete { key: format!("{prefix}/{k}") });
        }
        let watch = if peers.len() > 1 {
            root.watch(&actions).unwrap_or_else(|e| {
                tracing::warn!(
                    rank,
                    "the store cannot watch this rank ({e}): a lost rank is found only by its links or at the deadline"
                );
                None
            })
        } else {
            None
        };
        let pidfds = peers
            .iter()
            .map(|p| {
                // Ranks in this very process (threads) are not watched by pid.
                if p.rank == rank || p.pid == me.pid || p.pid_space.is_empty() || p.pid_space != me.pid_space {
                    return None;
                }
                match pidfd_open(p.pid) {
                    Ok(fd) => fd.map(Peer::Running),
                    // Gone before this rank finished creating the communicator.
                    Err(_) => Some(Peer::Gone),
                }
            })
            .collect();
        Health {
            rank,
            world: peers.len(),
            root,
            store,
            watch,
            store_host: None,
            pidfds,
            store_lost: false,
            store_quiet_until: None,
            asked: None,
            blamed: Vec::new(),
        }
    }

    /// Looks for a failure elsewhere that concerns an operation waiting on `waiting_on`.
    /// The flag says whether the error came from the failure record (another rank's words,
    /// not to be written again).
    pub(crate) fn check(&mut self, waiting_on: &[usize], waited: Duration) -> Option<(Error, bool)> {
        let exited_peer = waiting_on.iter().copied().find(|&p| self.exited(p));
        // The record first: a peer that failed (or aborted) and then exited wrote why.
        if let Some(e) = self.record(waited) {
            return Some((e, true));
        }
        if let Some((p, what)) = self.closed_peer(waiting_on) {
            return Some((Error::Remote { rank: p, what }, false));
        }
        if let Some(p) = exited_peer {
            return Some((
                Error::Remote {
                    rank: p,
                    what: format!(
                        "its process exited (killed, crashed, or ended early) while rank {} waited for it",
                        self.rank
                    ),
                },
                false,
            ));
        }
        self.store_vanished(Some(waiting_on)).map(|e| (e, false))
    }

    /// True when the process of `peer` is known to have exited.
    pub(crate) fn exited(&self, peer: usize) -> bool {
        match self.pidfds.get(peer) {
            Some(Some(Peer::Running(fd))) => exited(fd),
            Some(Some(Peer::Gone)) => true,
            _ => false,
        }
    }

    /// The failure record another rank (or the store, for a lost rank) wrote, if any. A store
    /// that does not answer within [`STORE_LIMIT`] is asked again only after
    /// [`STORE_BACKOFF`].
    fn record(&mut self, waited: Duration) -> Option<Error> {
        if self.store_lost || self.store_quiet_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        match self.store.try_get_within(FAIL_KEY, STORE_LIMIT) {
            Ok(Some(v)) => match serde_json::from_slice::<Failure>(&v) {
                Ok(f) if f.by != self.rank => {
                    let lost = f.kind == "lost";
                    let e = f.into_error(self.rank, waited);
                    if lost {
                        self.print_for_the_store(&e);
                    }
                    Some(e)
                }
                Ok(_) => None,
                Err(e) => Some(Error::Store(format!("the failure record is not readable: {e}"))),
            },
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(rank = self.rank, "failure record not readable now: {e}");
                self.store_quiet_until = Some(Instant::now() + STORE_BACKOFF);
                None
            }
        }
    }

    /// The store vanished (its watch connection ended): the error naming the rank that hosted
    /// it, when that rank is one this operation waits on (`waiting_on`; `None`: any) or its
    /// process is seen gone. Otherwise the communicator goes on over its links, without the
    /// record (said once in the log).
    fn store_vanished(&mut self, waiting_on: Option<&[usize]>) -> Option<Error> {
        if self.store_lost || !self.watch.as_ref().is_some_and(|w| w.store_gone()) {
            return None;
        }
        self.store_lost = true;
        let what = "the rendezvous store's process is gone";
        match self.store_host {
            Some(r) if r != self.rank && (waiting_on.is_none_or(|w| w.contains(&r)) || self.exited(r)) => {
                Some(Error::Remote { rank: r, what: format!("{what}: rank {r}, which hosted it, died") })
            }
            _ => {
                tracing::warn!(
                    rank = self.rank,
                    "{what}: this communicator goes on over its links, but a lost rank is now found only by them or at the deadline"
                );
                None
            }
        }
    }

    /// Writes the failure record for `e` (with the ranks the evidence says hold it up) if no
    /// rank has yet, and returns the error this rank should report: its own, or (when another
    /// rank failed first) that rank's cause with what this rank saw, after waiting `waited`.
    /// Every store call is bounded by [`STORE_LIMIT`].
    pub(crate) fn settle(&mut self, e: Error, waited: Duration) -> Error {
        let stalled = std::mem::take(&mut self.blamed);
        if self.store_lost {
            return e;
        }
        // The store vanished with the rank hosting it: that loss is the cause (a peer that
        // saw it first dropped its links, which may be all this rank saw).
        if let Some(lost) = self.store_vanished(None) {
            return match lost {
                Error::Remote { rank, what } => Error::Remote { rank, what: format!("{what}; here: {e}") },
                _ => e,
            };
        }
        match self.store.add_within(FAIL_COUNT, 1, STORE_LIMIT) {
            Ok(1) => {
                let f = Failure::from_error(self.rank, &e, stalled);
                if let Ok(v) = serde_json::to_vec(&f) {
                    if let Err(err) = self.store.set_within(FAIL_KEY, &v, STORE_LIMIT) {
                        tracing::debug!(rank = self.rank, "cannot write the failure record: {err}");
                    }
                }
                // After the record: the others wait for it only briefly.
                self.print_records(&e, true);
                e
            }
            Ok(_) => {
                // Another rank (or the store, for a lost one) was first: its record is the
                // cause. The writer sets it right after counting; wait a moment for it.
                let until = Instant::now() + Duration::from_millis(500);
                let rec = loop {
                    match self.store.try_get_within(FAIL_KEY, STORE_LIMIT) {
                        Ok(Some(v)) => break Some(v),
                        Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                        _ => break None,
                    }
                };
                match rec.and_then(|v| serde_json::from_slice::<Failure>(&v).ok()) {
                    Some(f) if f.by != self.rank => {
                        let here = e.to_string();
                        if f.kind == "lost" {
                            self.print_for_the_store(&e);
                        }
                        match f.into_error(self.rank, waited) {
                            Error::Remote { rank, what } => {
                                Error::Remote { rank, what: format!("{what}; here: {here}") }
                            }
                            other => other,
                        }
                    }
                    _ => e,
                }
            }
            Err(_) => e,
        }
    }

    /// The first rank to fail logs every rank's flight record side by side (at error level).
    /// After a timeout: the answers asked for before the deadline, at once. After a lost or
    /// closed peer: asked for now and logged by a short-lived thread within a second (the
    /// error is not delayed; the lost rank never answers). Other failures (an abort, bad
    /// input) log nothing.
    fn print_records(&mut self, e: &Error, first: bool) {
        if self.world < 2 || self.store_lost {
            return;
        }
        let (store, world, rank) = (self.store.clone(), self.world, self.rank);
        let print = move |n: i64, e: String| {
            let answers = crate::trace::answers(&*store, world, n);
            let comm =
                answers.iter().flatten().next().map_or_else(|| "this communicator".to_string(), |t| t.comm.clone());
            let who = if first { "this rank failed first" } else { "a rank was lost (the store saw its process end)" };
            tracing::error!(
                rank,
                "{who} ({e}); every rank's flight record:\n{}",
                crate::trace::side_by_side(&comm, world, &answers, crate::trace::SHOWN_ROWS)
            );
        };
        match (e, self.asked) {
            (Error::Timeout { .. }, Some((n, _))) => print(n, e.to_string()),
            (Error::Transport { .. } | Error::Remote { .. }, _) => {
                let Ok(n) = crate::trace::ask(&*self.root) else { return };
                let (e, store) = (e.to_string(), self.store.clone());
                let wait = move || {
                    let until = Instant::now() + 3 * crate::trace::ANSWER_EVERY;
                    while Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(50));
                        if crate::trace::answers(&*store, world, n).iter().all(Option::is_some) {
                            break;
                        }
                    }
                    print(n, e);
                };
                if let Err(err) = std::thread::Builder::new().name("oxccl-trace-print".into()).spawn(wait) {
                    tracing::debug!(rank, "cannot start the thread that prints flight records: {err}");
                }
            }
            _ => {}
        }
    }

    /// A lost process's record is written by the store, not by a rank, so no rank is first
    /// to fail: the first rank to read it logs the flight records instead (once per
    /// communicator, by a counter in the store).
    fn print_for_the_store(&mut self, e: &Error) {
        if self.store.add_within(PRINTED, 1, STORE_LIMIT).ok() == Some(1) {
            self.print_records(e, false);
        }
    }

    /// Asks every rank for its flight record (once per operation), so that the answers are
    /// there by the deadline.
    pub(crate) fn ask_for_records(&mut self) {
        if self.asked.is_some() || self.store_lost || self.world < 2 {
            return;
        }
        match crate::trace::ask(&*self.root) {
            Ok(n) => self.asked = Some((n, Instant::now())),
            Err(e) => tracing::debug!(rank = self.rank, "cannot ask for flight records: {e}"),
        }
    }

    /// Forgets the request and the blame of the operation that ended.
    pub(crate) fn op_ended(&mut self) {
        self.asked = None;
        self.blamed.clear();
    }

    /// Who holds up operation `op` (a collective's sequence number, 0 for point-to-point),
    /// which waits on `waiting_on`, by the evidence of the ranks' flight records: a rank
    /// that did not answer in time (stopped, hung, cut off), one that closed or failed, one
    /// whose last collective is before `op`. Returns the words (the ranks to blame go into
    /// the failure record); `None` when no records were asked for.
    pub(crate) fn evidence(&mut self, op: &str, seq: u64, waiting_on: &[usize]) -> Option<String> {
        let (n, asked) = self.asked?;
        let answers = crate::trace::answers(&*self.store, self.world, n);
        // A live process answers within a few rounds of its answering thread.
        let long_enough = asked.elapsed() >= 3 * crate::trace::ANSWER_EVERY;
        // (rank, what its record says, whether it holds the operation up)
        let mut notes: Vec<(usize, String, bool)> = Vec::new();
        // Ranks behind `op` that are themselves inside an operation waiting on others.
        let mut behind_waiting: Vec<(usize, Vec<usize>)> = Vec::new();
        // Ranks that did not answer yet, too soon to blame them.
        let mut pending: Vec<usize> = Vec::new();
        // A send or receive (no sequence number) concerns only the peers it waits on.
        let concerned = |r: usize| r != self.rank && (seq > 0 || waiting_on.contains(&r));
        for (r, a) in answers.iter().enumerate().filter(|(r, _)| concerned(*r)) {
            match a {
                None if long_enough => notes.push((
                    r,
                    format!(
                        "did not answer for its flight record within {:.1?} (stopped, hung, or cut off from the store)",
                        asked.elapsed()
                    ),
                    true,
                )),
                None => pending.push(r),
                Some(t) => {
                    let now = match t.running() {
                        Some(o) => match &o.waiting {
                            Some((step, on)) => format!("is in {} (step {step}, waiting on ranks {on:?})", o.name()),
                            None => format!("is in {}", o.name()),
                        },
                        None => match t.ops.last() {
                            Some(o) => format!(
                                "is outside OxCCL: its last operation, {}, ended {} ms ago",
                                o.name(),
                                o.started_ms_ago.saturating_sub(o.took_ms)
                            ),
                            None if t.capacity == 0 => {
                                "has its flight recorder off (OXCCL_TRACE_BUFFER=0): what it does now is not known"
                                    .into()
                            }
                            None => "has run no operation".into(),
                        },
                    };
                    if let Some(ended) = &t.ended {
                        notes.push((r, ended.clone(), true));
                    } else if seq > 0 && t.last_seq < seq {
                        let last = t.last_seq;
                        if let Some((_, on)) = t.running().and_then(|o| o.waiting.as_ref()) {
                            behind_waiting.push((r, on.clone()));
                        }
                        notes.push((
                            r,
                            format!("has not reached {op}: its last collective is #{last}, and it {now}"),
                            true,
                        ));
                    } else if seq == 0 || t.last_seq == seq {
                        notes.push((r, now, false));
                    }
                }
            }
        }
        // A rank behind because its own earlier operation waits on another rank that holds
        // things up is not a cause: blame the ranks at the root of the chain (when there are
        // any), and report the others as evidence.
        let holds = |r: usize| notes.iter().any(|n| n.0 == r && n.2);
        let follows: Vec<usize> = behind_waiting
            .iter()
            .filter(|(r, on)| on.iter().any(|&o| o != *r && holds(o) && !behind_waiting.iter().any(|b| b.0 == o)))
            .map(|b| b.0)
            .collect();
        for n in notes.iter_mut().filter(|n| follows.contains(&n.0)) {
            n.2 = false;
        }
        let stalled: Vec<usize> = notes.iter().filter(|n| n.2).map(|n| n.0).collect();
        let others: Vec<String> = notes.iter().filter(|n| !n.2).map(|(r, n, _)| format!("rank {r} {n}")).collect();
        let text = match stalled.as_slice() {
            [] if others.is_empty() && pending.is_empty() => return None,
            // Records asked for too late to judge a silent rank (a short deadline): say so,
            // blame nobody.
            [] if !pending.is_empty() => format!(
                "the flight records of ranks {pending:?} had not come in after {:.1?} (a deadline under about \
                 2 s leaves too little time to gather them){}",
                asked.elapsed(),
                if others.is_empty() { String::new() } else { format!("; {}", others.join("; ")) }
            ),
            [] => format!("no rank is behind by the flight records: {}", others.join("; ")),
            [r] => format!("rank {r} holds it up: it {}", notes.iter().find(|n| n.0 == *r).map_or("", |n| &n.1)),
            rs => format!(
                "ranks {rs:?} hold it up: {}",
                notes.iter().filter(|n| n.2).map(|(r, n, _)| format!("rank {r} {n}")).collect::<Vec<_>>().join("; ")
            ),
        };
        let text =
            if stalled.is_empty() || others.is_empty() { text } else { format!("{text}; {}", others.join("; ")) };
        self.blamed = stalled;
        Some(text)
    }

    /// Tells the others this rank is closing the communicator after `ops` operations (the
    /// words a peer whose link ends reads; [`Health::closed`] then makes waiting peers look).
    pub(crate) fn closing(&self, ops: u64, last_seq: u64) {
        if self.world < 2 || self.store_lost {
            return;
        }
        let what = format!(
            "closed the communicator after {ops} operation{} (its last collective: #{last_seq})",
            if ops == 1 { "" } else { "s" }
        );
        let _ = self.store.set_within(&format!("{CLOSED}/{}", self.rank), what.as_bytes(), STORE_LIMIT);
    }

    /// Counts this rank among the closed ones, once its links have delivered what it sent:
    /// from now on a peer that waits on it is told at its next check.
    pub(crate) fn closed(&self) {
        if self.world < 2 || self.store_lost {
            return;
        }
        let _ = self.store.add_within(CLOSED_COUNT, 1, STORE_LIMIT);
    }

    /// `e` with the words of the rank it blames, when that rank closed the communicator (a
    /// link that ended says only that the peer went; the peer's record says why).
    pub(crate) fn explain_peer(&self, e: Error) -> Error {
        let p = match &e {
            Error::Remote { rank, .. } => *rank,
            Error::Transport { peer: Some(p), .. } => *p,
            _ => return e,
        };
        if self.store_lost || p == self.rank {
            return e;
        }
        match self.store.try_get_within(&format!("{CLOSED}/{p}"), STORE_LIMIT) {
            Ok(Some(v)) => Error::Remote {
                rank: p,
                what: format!("{} while rank {} waits for it ({e})", String::from_utf8_lossy(&v), self.rank),
            },
            _ => e,
        }
    }

    /// A rank this operation waits on that closed the communicator, with its words (one
    /// counter read per check; the closed ranks' words only once one closed).
    fn closed_peer(&mut self, waiting_on: &[usize]) -> Option<(usize, String)> {
        if self.store_lost || waiting_on.is_empty() {
            return None;
        }
        let n = match self.store.try_get_within(CLOSED_COUNT, STORE_LIMIT) {
            Ok(Some(v)) => oxccl_core::store::parse_counter(CLOSED_COUNT, &v).unwrap_or(0),
            _ => return None,
        };
        if n == 0 {
            return None;
        }
        waiting_on.iter().find_map(|&p| {
            let v = self.store.try_get_within(&format!("{CLOSED}/{p}"), STORE_LIMIT).ok()??;
            Some((p, format!("{} while rank {} waits for it", String::from_utf8_lossy(&v), self.rank)))
        })
    }

    /// Says which rank hosts the store (named when the store vanishes).
    pub(crate) fn set_store_host(&mut self, rank: Option<usize>) {
        self.store_host = rank;
    }

    /// Drops the registration (an orderly goodbye): the store forgets the loss actions.
    pub(crate) fn disarm(&mut self) {
        self.watch = None;
    }

    /// Whether a check is due: after [`CHECK_AFTER`] of idleness, then `every` after the last.
    pub(crate) fn due(idle: Duration, last: Option<Instant>, every: Duration, now: Instant) -> bool {
        idle >= CHECK_AFTER && last.is_none_or(|t| now.duration_since(t) >= every)
    }
}
