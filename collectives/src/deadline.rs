//! Deadlines of blocking calls.

use std::cell::Cell;
use std::time::{Duration, Instant};

thread_local! {
    /// The per-call timeout set by `Communicator::with_timeout` on this thread, if any.
    static CALL_TIMEOUT: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// Runs `f` with `timeout` as this thread's per-call timeout.
pub(crate) fn with_call_timeout<R>(timeout: Duration, f: impl FnOnce() -> R) -> R {
    let old = CALL_TIMEOUT.with(|c| c.replace(Some(timeout)));
    let r = f();
    CALL_TIMEOUT.with(|c| c.set(old));
    r
}

/// The deadline of a call made now on this thread: its per-call timeout, else `default`.
/// A zero timeout is refused (every call would fail at once): `InvalidArgument`.
pub(crate) fn for_call(default: Duration) -> oxccl_core::Result<Deadline> {
    let t = CALL_TIMEOUT.with(|c| c.get()).unwrap_or(default);
    if t.is_zero() {
        return Err(oxccl_core::Error::invalid_arg(
            "the call's timeout is zero (Communicator::with_timeout): every call would fail at once; give a \
             positive duration"
                .to_string(),
        ));
    }
    Ok(Deadline::after(t))
}

/// `now + d`, or a far-away instant when that does not fit (an "infinite" timeout).
pub(crate) fn deadline_after(d: Duration) -> Instant {
    later(Instant::now(), d)
}

fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400))).unwrap_or(now)
}

/// A blocking call's deadline, read from the clock only once the call has to wait: a call
/// that finds everything ready reads no clock at all (on this VM a clock read costs about as
/// much as a shared-memory hop). The deadline then counts from the first wait, a few
/// microseconds at most after the call began.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    timeout: Duration,
    /// (when the call first waited, its deadline), once read.
    at: Option<(Instant, Instant)>,
}

impl Deadline {
    /// `timeout` from the first wait.
    pub(crate) fn after(timeout: Duration) -> Deadline {
        Deadline { timeout, at: None }
    }
    /// The timeout it counts.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The deadline, reading the clock (as `now`) if it was not read yet.
    pub(crate) fn at(&mut self, now: Instant) -> Instant {
        self.at.get_or_insert_with(|| (now, later(now, self.timeout))).1
    }
    /// How long the call has waited at `now`.
    pub(crate) fn waited(&mut self, now: Instant) -> Duration {
        self.at(now);
        self.at.map(|(since, _)| now.saturating_duration_since(since)).unwrap_or_default()
    }
}
