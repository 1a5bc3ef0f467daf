//! The thread that runs a communicator's non-blocking operations, in call order.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use oxccl_core::{Error, Result};

use crate::shared::Shared;

/// A queued non-blocking operation.
pub(crate) type Job = Box<dyn FnOnce(&Shared) + Send>;

/// The thread that runs a communicator's non-blocking operations.
pub(crate) struct ProgressThread {
    tx: mpsc::Sender<Job>,
    handle: JoinHandle<()>,
}

impl ProgressThread {
    pub(crate) fn start(shared: Arc<Shared>, rank: usize) -> Result<ProgressThread> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name(format!("oxccl-progress-{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A job that panics must still finish its Work (its waiter would hang) and
                    // release its turn; the slot is filled by the job's guard (see `submit`).
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&shared))).is_err() {
                        tracing::error!(rank, "a non-blocking operation panicked; the communicator is unusable");
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the progress thread: {e}")))?;
        Ok(ProgressThread { tx, handle })
    }
    /// Queues `job` after those queued before it.
    pub(crate) fn queue(&self, job: Job) -> Result<()> {
        self.tx.send(job).map_err(|_| Error::Internal("progress thread is gone".into()))
    }

    /// Lets queued jobs finish, then joins the thread.
    pub(crate) fn stop(self) {
        drop(self.tx);
        if self.handle.join().is_err() {
            tracing::warn!("progress thread panicked");
        }
    }
}
