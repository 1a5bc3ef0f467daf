//! Operations ordered on the caller's GPU stream, as NCCL's are.
//!
//! A collective called "on a stream" returns once it is queued. It **starts after** the work
//! the caller queued on that stream before the call (a [`Fence`] marks that point; the
//! engine's thread polls it, never blocking the device), and the work the caller queues on the
//! stream **after** the call waits, on the GPU, until the operation is done ([`StreamOrder::hold`]:
//! the stream waits for a counter in pinned host memory to reach the operation's number,
//! which the engine writes when the operation ends). The counter is written also when the
//! operation fails or the communicator is aborted, so a stream never waits forever: the
//! failure is reported by the operation's `Work` and by the communicator's next call.
//!
//! [`StreamOrder`] is all the engine knows of a GPU here: CUDA events and stream memory
//! operations in the `cuda` feature, a simulated stream in tests.

use crate::error::Result;

/// The caller's stream, as the driver knows it (a `CUstream`, `cudaStream_t`); 0 is the
/// legacy default stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHandle(pub usize);

/// The end of the work queued on a stream when an operation was called.
pub trait Fence: Send {
    /// Whether that work is done. Never blocks.
    fn done(&mut self) -> Result<bool>;
}

/// One communicator's ordering on its callers' streams.
pub trait StreamOrder: Send + Sync + std::fmt::Debug {
    /// Marks the end of what is queued on `stream` now.
    fn mark(&self, stream: StreamHandle) -> Result<Box<dyn Fence>>;
    /// Makes `stream` wait, on the GPU, until [`StreamOrder::release`] has reached `seq` on
    /// it (operations are numbered per stream: 1, 2, 3, ...).
    fn hold(&self, stream: StreamHandle, seq: u64) -> Result<()>;
    /// Lets `stream` go on past every hold for operations numbered `seq` or lower. Called in
    /// increasing order per stream, when those operations have ended (done or failed).
    fn release(&self, stream: StreamHandle, seq: u64);
    /// `stream`'s counter: the last of its operations released.
    fn released(&self, stream: StreamHandle) -> u64;
    /// For tests that look at a simulated stream.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A simulated stream for tests: work queued on a stream is a count of "kernels" that finish
/// one per poll of the fence; a hold is recorded with the value it waits for, and a stream is
/// "blocked" while a hold above the counter exists.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{Fence, StreamHandle, StreamOrder};
    use crate::error::Result;

    /// The simulated streams of one communicator.
    #[derive(Debug, Default)]
    pub struct FakeStreams {
        /// Per stream: kernels still running before the next mark.
        pending: Mutex<BTreeMap<usize, Arc<AtomicU64>>>,
        /// Holds: (stream, value waited for).
        pub holds: Mutex<Vec<(usize, u64)>>,
        /// Per stream: its counter.
        counters: Mutex<BTreeMap<usize, Arc<AtomicU64>>>,
        /// Set if the counter was ever written lower than or equal to its value (releases
        /// go forward only).
        pub out_of_order: std::sync::atomic::AtomicBool,
        /// At each release: the kernels still queued on every stream (an operation that did
        /// not wait for its fence would be released with earlier work still pending).
        pub pending_at_release: Mutex<Vec<u64>>,
    }

    impl FakeStreams {
        /// Queues `n` kernels on `stream` (the next fence completes after `n` polls).
        pub fn queue_kernels(&self, stream: usize, n: u64) {
            let mut p = self.pending.lock().expect("streams");
            p.entry(stream).or_default().fetch_add(n, Ordering::SeqCst);
        }
        /// Whether work queued on `stream` now would be held back (a hold above its counter).
        pub fn blocked(&self, stream: usize) -> bool {
            let c = self.counter(stream).load(Ordering::SeqCst);
            self.holds.lock().expect("holds").iter().any(|&(s, v)| s == stream && v > c)
        }
        fn counter(&self, stream: usize) -> Arc<AtomicU64> {
            self.counters.lock().expect("counters").entry(stream).or_default().clone()
        }
    }

    /// The end of a stream: its kernels queued before, and the hold (if any) queued before
    /// that it is behind: as on a GPU, work after a hold waits for the counter.
    struct FakeFence {
        pending: Arc<AtomicU64>,
        kernels: u64,
        counter: Arc<AtomicU64>,
        behind: u64,
    }

    impl Fence for FakeFence {
        fn done(&mut self) -> Result<bool> {
            if self.counter.load(Ordering::SeqCst) < self.behind {
                return Ok(false);
            }
            // One kernel of those queued before the mark finishes per poll.
            if self.kernels == 0 {
                return Ok(true);
            }
            self.kernels -= 1;
            self.pending.fetch_sub(1, Ordering::SeqCst);
            Ok(self.kernels == 0)
        }
    }

    impl StreamOrder for FakeStreams {
        fn mark(&self, stream: StreamHandle) -> Result<Box<dyn Fence>> {
            let mut p = self.pending.lock().expect("streams");
            let q = p.entry(stream.0).or_default().clone();
            let kernels = q.load(Ordering::SeqCst);
            let behind =
                self.holds.lock().expect("holds").iter().filter(|h| h.0 == stream.0).map(|h| h.1).max().unwrap_or(0);
            Ok(Box::new(FakeFence { pending: q, kernels, counter: self.counter(stream.0), behind }))
        }
        fn hold(&self, stream: StreamHandle, seq: u64) -> Result<()> {
            self.holds.lock().expect("holds").push((stream.0, seq));
            Ok(())
        }
        fn release(&self, stream: StreamHandle, seq: u64) {
            let pending: u64 = self.pending.lock().expect("streams").values().map(|p| p.load(Ordering::SeqCst)).sum();
            self.pending_at_release.lock().expect("log").push(pending);
            let before = self.counter(stream.0).fetch_max(seq, Ordering::SeqCst);
            if seq <= before {
                self.out_of_order.store(true, Ordering::SeqCst);
            }
        }
        fn released(&self, stream: StreamHandle) -> u64 {
            self.counter(stream.0).load(Ordering::SeqCst)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }
}
