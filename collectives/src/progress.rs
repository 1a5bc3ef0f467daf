//! The thread that runs a communicator's non-blocking operations, in call order, and moves
//! its non-blocking sends and receives along while nobody else does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use oxccl_core::{Error, Result};

use crate::driver::Outcome;
use crate::shared::Shared;

/// A queued non-blocking operation.
pub(crate) type Job = Box<dyn FnOnce(&Shared) + Send>;

/// How long the thread naps, without the engine's lock, when flights wait on peers and
/// nothing moves (a blocking call or `Work::wait` elsewhere is never held up by it): from
/// `FIRST_NAP`, doubling while nothing moves, up to `NAP`. A flight that completes soon after
/// the last activity is seen within tens of microseconds; one that waits long costs a few
/// percent of a core.
const FIRST_NAP: Duration = Duration::from_micros(20);
const NAP: Duration = Duration::from_millis(1);

/// The thread that runs a communicator's non-blocking operations.
pub(crate) struct ProgressThread {
    tx: mpsc::Sender<Job>,
    /// Jobs sent and not yet taken (the thread lets go of the engine when one comes).
    queued: Arc<AtomicUsize>,
    handle: JoinHandle<()>,
}

fn run_job(shared: &Shared, rank: usize, job: Job) {
    // A job that panics must still finish its Work (its waiter would hang) and release its
    // turn; the slot is filled by the job's guard (see `submit`).
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(shared))).is_err() {
        tracing::error!(rank, "a non-blocking operation panicked; the communicator is unusable");
    }
}

impl ProgressThread {
    pub(crate) fn start(shared: Arc<Shared>, rank: usize) -> Result<ProgressThread> {
        let (tx, rx) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let handle = std::thread::Builder::new()
            .name(format!("oxccl-progress-{rank}"))
            .spawn(move || {
                let take = |job: Job| {
                    q.fetch_sub(1, Ordering::SeqCst);
                    run_job(&shared, rank, job);
                };
                let mut nap = FIRST_NAP;
                loop {
                    // Jobs first, in order.
                    match rx.try_recv() {
                        Ok(job) => {
                            nap = FIRST_NAP;
                            take(job);
                            continue;
                        }
                        Err(TryRecvError::Disconnected) => return,
                        Err(TryRecvError::Empty) => {}
                    }
                    // Then the flights, until they are done, someone wants the engine, a job
                    // comes, or nothing moves.
                    let stop = || shared.wanted.load(Ordering::SeqCst) > 0 || q.load(Ordering::SeqCst) > 0;
                    let outcome = match shared.state.lock() {
                        Ok(mut st) => st.drain(&stop, &shared.abort),
                        Err(_) => Outcome::Done,
                    };
                    if !matches!(outcome, Outcome::Idle) {
                        nap = FIRST_NAP;
                    }
                    match outcome {
                        // Nothing in flight: sleep until a job comes.
                        Outcome::Done => match rx.recv() {
                            Ok(job) => take(job),
                            Err(_) => return,
                        },
                        // Someone waits for the engine: let it have it.
                        Outcome::Stopped => {
                            while shared.wanted.load(Ordering::SeqCst) > 0 {
                                std::thread::yield_now();
                            }
                        }
                        Outcome::Idle => {
                            let r = rx.recv_timeout(nap);
                            // Short naps while a thread waits on a Work (it wants its
                            // completion soon); otherwise longer and longer.
                            nap =
                                if shared.waiters.load(Ordering::SeqCst) == 0 { (nap * 2).min(NAP) } else { FIRST_NAP };
                            match r {
                                Ok(job) => {
                                    nap = FIRST_NAP;
                                    take(job)
                                }
                                Err(RecvTimeoutError::Timeout) => {}
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the progress thread: {e}")))?;
        Ok(ProgressThread { tx, queued, handle })
    }

    /// Queues `job` after those queued before it.
    pub(crate) fn queue(&self, job: Job) -> Result<()> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Error::Internal("progress thread is gone".into())
        })
    }

    /// Lets queued jobs finish, then joins the thread (flights still in flight stay with
    /// the engine: the caller finishes them).
    pub(crate) fn stop(self) {
        drop(self.tx);
        if self.handle.join().is_err() {
            tracing::warn!("progress thread panicked");
        }
    }
}
