//! The waiting loop: runs a schedule, or only the point-to-point flights, until its goal is
//! met, the deadline passes or the communicator is aborted; polls every flight meanwhile, so
//! that non-blocking sends and receives move whatever the thread waits for.
//!
//! Waiting follows what MPI libraries do on shared memory: spin (lowest latency), then yield
//! the core (others may need it: ranks can outnumber cores), then sleep as the open
//! transports say: on a doorbell until a peer rings it, or in `poll()`. The clock is read
//! every 64 polls while spinning (cheap polls, lowest latency), at every poll once yielding
//! (a yield costs far more than a clock read); an operation done before its 64th idle poll
//! reads no clock at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use oxccl_core::config::Config;
use oxccl_core::exec::{Exec, PollStatus};
use oxccl_core::link::{describe_tag, Tag};
use oxccl_core::transport::Sleeper;
use oxccl_core::{Error, Result};

use crate::engine::Links;
use crate::p2p::{Flights, IdleClock};

/// What the waiting loop needs besides the work: the operation as errors name it, settings,
/// how to sleep, the abort flag, the flight recorder and the operation's index in it.
pub(crate) struct Ctx<'a> {
    /// The collective's tag (errors name the operation from it, only when they happen:
    /// formatting costs more than a small collective); `None`: point-to-point.
    pub tag: Option<Tag>,
    pub cfg: &'a Config,
    pub wait: (Option<&'a dyn Sleeper>, Duration),
    pub abort: &'a AtomicBool,
    pub rec: (&'a crate::trace::Recorder, u64),
}

/// When the loop is done.
pub(crate) enum Goal<'a> {
    /// The schedule completed.
    Exec,
    /// Every flight is posted to its link (a later call's messages then follow them).
    Posted,
    /// Every flight completed; or `stop()` says another caller wants the engine (the loop
    /// returns [`Outcome::Stopped`]); or nothing moved for the spin and yield phases (it
    /// returns [`Outcome::Idle`] instead of sleeping: the caller naps without the lock).
    Drain { stop: &'a dyn Fn() -> bool },
}

/// How the loop ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Stopped,
    Idle,
}

/// The work of one loop: a schedule (maybe), the flights, and what ends it.
struct Work<'e, 's, 'g> {
    exec: Option<&'e mut Exec<'s>>,
    flights: &'e mut Flights,
    goal: Goal<'g>,
    rec: &'e crate::trace::Recorder,
}

impl Work<'_, '_, '_> {
    fn poll(&mut self, links: &mut Links<'_>) -> Result<PollStatus> {
        let mut work = 0;
        if !self.flights.is_empty() {
            let rec = self.rec;
            work += self.flights.poll(links, &mut |i| rec.end(i, true))?.work;
        }
        let done = match &self.goal {
            Goal::Exec => {
                let exec = self.exec.as_mut().expect("a schedule to run");
                let st = exec.poll(links)?;
                work += st.work;
                st.done
            }
            Goal::Posted => self.flights.all_posted(),
            Goal::Drain { .. } => self.flights.is_empty(),
        };
        Ok(PollStatus { done, work })
    }
    fn step(&self) -> usize {
        self.exec.as_ref().map_or(0, |e| e.step())
    }
    fn waiting_on(&self) -> Vec<usize> {
        let mut v = self.exec.as_ref().map(|e| e.waiting_on()).unwrap_or_default();
        v.extend(self.flights.waiting_on());
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The longest nap while a link's GPU copies or kernels are under way (their completion rings
/// no doorbell).
const GPU_NAP: Duration = Duration::from_micros(50);

/// Runs `exec` (with [`Goal::Exec`]) or the flights alone until `goal`, within the call's
/// deadline (for a schedule) and every flight's. The error says whether it came from the
/// failure record (another rank's words, not to be written again).
pub(crate) fn drive(
    exec: Option<&mut Exec<'_>>,
    flights: &mut Flights,
    goal: Goal<'_>,
    links: &mut Links<'_>,
    ctx: &Ctx<'_>,
    call_deadline: &mut crate::deadline::Deadline,
    health: &mut crate::health::Health,
) -> std::result::Result<Outcome, (Error, bool)> {
    let Ctx { tag, cfg, wait: (doorbell, nap), abort, rec: (rec, index) } = *ctx;
    let schedule = matches!(goal, Goal::Exec);
    // Flights driven alone keep their idle clock across drives (the progress thread comes
    // back every few microseconds to a millisecond); a schedule starts its own.
    let clock = if schedule { IdleClock::default() } else { flights.idle };
    let IdleClock { since: mut idle_since, mut last_check, every: mut check_every } = clock;
    let mut w = Work { exec, flights, goal, rec };
    let mut idle_polls: u32 = 0;
    let mut spinning = !cfg.spin.is_zero();
    // The clock the flights keep when this drive hands back (Idle, Stopped).
    macro_rules! keep_clock {
        () => {
            if !schedule {
                w.flights.idle = IdleClock { since: idle_since, last_check, every: check_every };
            }
        };
    }
    loop {
        let st = w.poll(links).map_err(|e| (e, false))?;
        if st.done {
            w.flights.idle = IdleClock::default();
            return Ok(Outcome::Done);
        }
        if st.work > 0 {
            idle_polls = 0;
            idle_since = None;
            last_check = None;
            check_every = crate::health::CHECK_EVERY;
            spinning = !cfg.spin.is_zero();
        }
        if let Goal::Drain { stop } = &w.goal {
            if stop() {
                keep_clock!();
                return Ok(Outcome::Stopped);
            }
        }
        if st.work > 0 {
            continue;
        }
        idle_polls = idle_polls.wrapping_add(1);
        if spinning && idle_polls % 64 != 0 {
            std::hint::spin_loop();
            continue;
        }
        if abort.load(Ordering::Relaxed) {
            let e = format!("aborted while in step {} waiting on ranks {:?}", w.step(), w.waiting_on());
            return Err((Error::Aborted(e), false));
        }
        let now = Instant::now();
        // The call's deadline (a schedule's), and the earliest of the flights'.
        let flight_deadline = w.flights.earliest_deadline();
        let deadline = match (schedule, flight_deadline) {
            (true, Some(f)) => call_deadline.at(now).min(f),
            (true, None) => call_deadline.at(now),
            (false, Some(f)) => f,
            (false, None) => now + Duration::from_secs(3600),
        };
        // How long this rank has waited: the schedule's call, or its oldest flight.
        let waited = if schedule { call_deadline.waited(now) } else { w.flights.longest_wait(now) };
        if now >= deadline {
            return Err((timeout(&w, tag, waited, now, health), false));
        }
        // Ask every rank for its flight record a little before the deadline, so that the
        // answers (every live process answers within a few rounds of its answering thread)
        // are in by then.
        let timeout_len = if schedule { call_deadline.timeout() } else { cfg.timeout };
        if deadline.saturating_duration_since(now) <= crate::health::ask_before(timeout_len) {
            health.ask_for_records();
        }
        let idle = now - *idle_since.get_or_insert(now);
        if crate::health::Health::due(idle, last_check, check_every, now) {
            last_check = Some(now);
            check_every = (check_every * 2).min(crate::health::CHECK_EVERY_MAX);
            let on = w.waiting_on();
            rec.waiting(index, w.step(), &on);
            if let Some((e, from_record)) = health.check(&on, waited) {
                if !from_record {
                    // A peer seen gone may have sent everything before it went: look once
                    // more before blaming it.
                    let st = w.poll(links).map_err(|e| (e, false))?;
                    if st.done {
                        return Ok(Outcome::Done);
                    }
                    if st.work > 0 {
                        continue;
                    }
                }
                return Err((e, from_record));
            }
        }
        if idle < cfg.spin {
            continue;
        }
        // Flights alone (the progress thread): no yield phase under the engine's lock; the
        // thread naps without it and comes back (see progress.rs).
        if matches!(w.goal, Goal::Drain { .. }) {
            keep_clock!();
            return Ok(Outcome::Idle);
        }
        spinning = false;
        if idle < cfg.spin + cfg.yield_for {
            std::thread::yield_now();
            continue;
        }
        let Some(bell) = doorbell else {
            // Sleep in poll() on the descriptors of the links and transports (a listener, for
            // links still connecting), waking at least as often as the transports ask
            // (host-staging beside others: 1 ms; libfabric providers, which move data only
            // when polled: 100 us).
            let nap = if links.busy_unsignalled() { nap.min(GPU_NAP) } else { nap };
            links.poll_fds((deadline - now).min(nap));
            continue;
        };
        let longest = if links.busy_unsignalled() { GPU_NAP } else { Duration::from_millis(20) };
        let nap = (deadline - now).min(longest);
        let mut err = None;
        let mut woke = false;
        bell.sleep(nap, &mut || match w.poll(links) {
            Ok(s) => {
                woke = s.done || s.work > 0;
                woke
            }
            Err(e) => {
                err = Some(e);
                true
            }
        });
        if let Some(e) = err {
            return Err((e, false));
        }
        if woke {
            idle_since = None;
            spinning = !cfg.spin.is_zero();
        }
    }
}

/// The timeout of the loop at `now`: of the flight whose deadline passed first, else of the
/// schedule; with what it waited on and whom the evidence blames.
fn timeout(
    w: &Work<'_, '_, '_>,
    tag: Option<Tag>,
    waited: Duration,
    now: Instant,
    health: &mut crate::health::Health,
) -> Error {
    let (op, seq, waiting_on, head, after) = match w.flights.expired(now) {
        Some(f) => {
            let after = now.saturating_duration_since(f.started);
            (format!("send/recv ({})", f.describe()), 0, vec![f.peer], f.describe(), after)
        }
        None => {
            let on = w.waiting_on();
            let (what, seq) = tag.map_or(("send/recv".to_string(), 0), |t| (describe_tag(t), t.seq()));
            (what, seq, on.clone(), format!("step {} waiting on ranks {on:?}", w.step()), waited)
        }
    };
    let mut msg = head;
    // Whom the evidence blames: the ranks' flight records, asked for before now.
    if let Some(evidence) = health.evidence(&op, seq, &waiting_on) {
        msg = format!("{msg}; {evidence}");
    }
    Error::Timeout { after, what: msg }
}
