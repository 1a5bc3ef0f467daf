//! Non-blocking operations: [`Work`] handles and the progress thread that runs them.
//!
//! A `*_async` call takes ownership of its buffers, takes its place in the communicator's
//! call order, and returns at once. The communicator's progress thread (started on first
//! use) runs queued operations in order; [`Work::wait`] hands the buffers back.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use oxccl_core::link::MemSlice;
use oxccl_core::mem::MemKind;
use oxccl_core::{Element, Error, ReduceOp, Result};

use crate::comm::Communicator;
use crate::engine::Coll;
use crate::ops::{dcode, ocode};
use crate::progress::{Job, ProgressThread};
use crate::shared::Shared;

/// A communicator's ordering on its callers' GPU streams.
pub(crate) struct Streams {
    order: Arc<dyn oxccl_core::stream::StreamOrder>,
    /// Per stream: the number of the last operation called on it, and those that ended.
    per: std::collections::HashMap<oxccl_core::stream::StreamHandle, (u64, Arc<Mutex<Ended>>)>,
}

/// The operations on a stream that ended: every one up to `through`, and those beyond it.
#[derive(Default)]
struct Ended {
    through: u64,
    beyond: std::collections::BTreeSet<u64>,
}

impl Streams {
    fn new(order: Arc<dyn oxccl_core::stream::StreamOrder>) -> Streams {
        Streams { order, per: Default::default() }
    }

    /// Marks `stream`'s end: what the operations called now wait for.
    fn mark(&self, stream: oxccl_core::stream::StreamHandle) -> Result<SharedFence> {
        Ok(Arc::new(Mutex::new(self.order.mark(stream)?)))
    }

    /// The next operation number on `stream`, waiting for `fence`: the operation's
    /// [`Release`].
    fn take(&mut self, stream: oxccl_core::stream::StreamHandle, fence: &SharedFence) -> Release {
        let (last, ended) = self.per.entry(stream).or_default();
        *last += 1;
        Release { order: self.order.clone(), stream, seq: *last, fence: Some(fence.clone()), ended: ended.clone() }
    }

    /// Marks `stream`'s end and holds it for its next operation: the operation's [`Release`].
    #[cfg(test)]
    fn next(&mut self, stream: oxccl_core::stream::StreamHandle) -> Result<Release> {
        let fence = self.mark(stream)?;
        let r = self.take(stream, &fence);
        self.order.hold(stream, r.seq)?;
        Ok(r)
    }
}

/// A fence shared by the operations of one batch on a stream.
type SharedFence = Arc<Mutex<Box<dyn oxccl_core::stream::Fence>>>;

/// Operations queued together on one GPU stream, as NCCL's between `ncclGroupStart` and
/// `ncclGroupEnd`: each starts after the work queued on the stream before the batch began,
/// they progress together (a send and a receive between two ranks do not wait for each
/// other), and the work queued on the stream after the batch waits until all of them have
/// ended. The stream is held when the batch ends ([`StreamBatch::finish`], or when dropped).
pub struct StreamBatch<'a> {
    comm: &'a Communicator,
    gpu: u32,
    stream: oxccl_core::stream::StreamHandle,
    fence: SharedFence,
    /// The last operation's number, until the stream is held for it.
    last: Option<u64>,
}

impl std::fmt::Debug for StreamBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBatch").field("stream", &self.stream).field("last", &self.last).finish_non_exhaustive()
    }
}

impl StreamBatch<'_> {
    fn check_gpu(&self, kind: MemKind, what: &str) -> Result<()> {
        match kind {
            MemKind::Device(n) if n == self.gpu => self.comm.check_memory(kind),
            MemKind::Device(n) => Err(Error::invalid_arg(format!(
                "{what}: a buffer of GPU {n} in a batch on a stream of GPU {}",
                self.gpu
            ))),
            k => Err(Error::invalid_arg(format!(
                "{what}: a call on a GPU stream takes GPU buffers; this one is in {k} (call it without a stream)"
            ))),
        }
    }

    fn release(&mut self) -> Release {
        let mut streams = self.comm.streams.lock().unwrap_or_else(|e| e.into_inner());
        let r = streams.as_mut().expect("made with the batch").take(self.stream, &self.fence);
        self.last = Some(r.seq);
        r
    }

    /// Queues `call` on GPU buffers in the batch.
    ///
    /// # Safety
    ///
    /// As [`Communicator::call_raw`], until the operation has ended.
    pub unsafe fn submit(
        &mut self,
        call: &crate::RawCall,
        send: crate::RawBuf,
        recv: crate::RawBuf,
    ) -> Result<Work<()>> {
        let plan = self.comm.plan_raw(call, send, recv)?;
        self.check_gpu(plan.kind, call.name())?;
        let release = self.release();
        // SAFETY: forwarded from the caller. The job waits for the fence before it touches
        // the buffers, and releases the stream when it ends, whatever happened.
        unsafe { self.comm.submit_ptrs_after(plan, Some(release), || ()) }
    }

    /// Queues a send of GPU `buf` to `peer` in the batch (progresses on its own, in order
    /// per peer, as [`Communicator::send_async_raw`]).
    ///
    /// # Safety
    ///
    /// `buf` stays valid and unchanged until the work has ended.
    pub unsafe fn send(&mut self, buf: crate::RawBuf, peer: usize) -> Result<Work<()>> {
        // SAFETY: forwarded.
        unsafe { self.p2p(buf, (peer, true, 0)) }
    }

    /// Queues a receive into GPU `buf` from `peer` in the batch.
    ///
    /// # Safety
    ///
    /// `buf` stays valid, and untouched by anything else, until the work has ended.
    pub unsafe fn recv(&mut self, buf: crate::RawBuf, peer: usize) -> Result<Work<()>> {
        // SAFETY: forwarded.
        unsafe { self.p2p(buf, (peer, false, 0)) }
    }

    unsafe fn p2p(&mut self, buf: crate::RawBuf, how: (usize, bool, u32)) -> Result<Work<()>> {
        let len = buf.bytes().ok_or_else(|| Error::invalid_arg(format!("{} x {} overflows", buf.count, buf.dtype)))?;
        if len > 0 && buf.addr == 0 {
            return Err(Error::invalid_arg(format!("a buffer of {} elements at a null address", buf.count)));
        }
        self.check_gpu(buf.kind, if how.1 { "send" } else { "recv" })?;
        let release = self.release();
        let ptr = std::ptr::with_exposed_provenance_mut(buf.addr);
        // SAFETY: forwarded; the flight waits for the fence before it is posted and releases
        // the stream when it ends.
        unsafe { self.comm.p2p_ptr_async_after(ptr, len, buf.kind, how, Some(release), || ()) }
    }

    /// Ends the batch: the stream's later work waits for every operation of it.
    pub fn finish(mut self) -> Result<()> {
        self.hold()
    }

    fn hold(&mut self) -> Result<()> {
        let Some(last) = self.last.take() else { return Ok(()) };
        let streams = self.comm.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.as_ref().expect("made with the batch").order.hold(self.stream, last)
    }
}

impl Drop for StreamBatch<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.hold() {
            tracing::warn!("the GPU stream could not be held for a batch's operations: {e}");
        }
    }
}

/// A call on a GPU stream: the fence of the work queued before it, and the release of the
/// stream when the operation ends (on drop: done, failed, or never run). A stream is released
/// in the order of its own operations: one operation's end releases it once every operation
/// called before it on that stream has ended too (sends and receives may end out of order);
/// operations on other streams do not hold it.
struct Release {
    order: Arc<dyn oxccl_core::stream::StreamOrder>,
    stream: oxccl_core::stream::StreamHandle,
    seq: u64,
    fence: Option<SharedFence>,
    ended: Arc<Mutex<Ended>>,
}

impl Release {
    /// Waits, polling, until the work queued on the stream before the call is done; bounded
    /// by the call's deadline and ended by an abort. Meanwhile it moves the communicator's
    /// sends and receives along (this runs on the progress thread, which is what moves them:
    /// one queued earlier on the stream may be what the stream waits for).
    fn wait_for_stream(&mut self, deadline: &mut crate::deadline::Deadline, sh: &Shared) -> Result<()> {
        let Some(fence) = self.fence.clone() else { return Ok(()) };
        let abort = &sh.abort;
        let start = Instant::now();
        let until = deadline.at(start);
        let mut nap = Duration::from_micros(5);
        while !fence.lock().unwrap_or_else(|e| e.into_inner()).done()? {
            if let Ok(mut st) = sh.lock_state() {
                let passes = std::cell::Cell::new(0u32);
                let stop = || {
                    passes.set(passes.get() + 1);
                    passes.get() > 8
                };
                st.drain(&stop, abort);
            }
            if abort.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Aborted("abort() was called".into()));
            }
            let now = Instant::now();
            if now >= until {
                return Err(Error::Timeout {
                    after: now - start,
                    what: "waiting for the work queued on the GPU stream before this call (a kernel that does not \
                           end, or a stream waiting on something that never comes)"
                        .into(),
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_micros(100));
        }
        self.fence = None;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut g = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let e = &mut *g;
        e.beyond.insert(self.seq);
        let before = e.through;
        while e.beyond.remove(&(e.through + 1)) {
            e.through += 1;
        }
        if e.through > before {
            self.order.release(self.stream, e.through);
        }
    }
}

struct Slot<R> {
    value: Mutex<Option<Result<R>>>,
    cv: Condvar,
}

/// A non-blocking operation in flight. Dropping it does not cancel the operation (peers
/// expect it); the buffers are then freed when it finishes.
pub struct Work<R> {
    slot: Arc<Slot<R>>,
    shared: Arc<Shared>,
}

/// Counts a thread waiting for a work while it waits.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(s: &'a Shared) -> Self {
        s.waiters.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiting(s)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<R> std::fmt::Debug for Work<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work").field("done", &self.test()).finish()
    }
}

impl<R> Work<R> {
    /// True once the operation has finished (successfully or not). Never blocks.
    pub fn test(&self) -> bool {
        self.slot.value.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
    /// Waits for the operation and returns its buffers. Bounded: the operation itself fails
    /// at the communicator's deadline.
    pub fn wait(self) -> Result<R> {
        let _waiting = Waiting::new(&self.shared);
        let mut g = self.slot.value.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.slot.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    /// Waits at most `timeout`; `Err(self)` if the operation is still running.
    pub fn wait_timeout(self, timeout: Duration) -> std::result::Result<Result<R>, Self> {
        let deadline = crate::deadline::deadline_after(timeout);
        {
            let _waiting = Waiting::new(&self.shared);
            let mut g = self.slot.value.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(r) = g.take() {
                    return Ok(r);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                g = self.slot.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        Err(self)
    }
}

/// Completes a Work whose job panicked or was dropped unrun: fills its slot with an error,
/// lets later operations run, and marks the communicator failed.
struct FillOnDrop<R> {
    armed: bool,
    slot: Arc<Slot<R>>,
    t: u64,
    shared: Arc<Shared>,
}

impl<R> Drop for FillOnDrop<R> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let e = Error::Internal("the non-blocking operation did not complete (it panicked or was dropped)".into());
        self.shared.record(usize::MAX, &e);
        self.shared.turns.done(self.t);
        let mut g = self.slot.value.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(Err(e));
        }
        drop(g);
        self.slot.cv.notify_all();
    }
}

/// Owned buffers of a queued operation.
struct Owned<T> {
    send: Vec<T>,
    recv: Vec<T>,
}

/// A queued operation's buffer addresses: valid until its job ends (the submitter promised,
/// or the job owns the memory).
struct Ptrs(*const u8, *mut u8);
// SAFETY: only addresses; the submitting call guarantees the memory stays valid and untouched
// until the job has run (owned vectors move into the job; raw callers promise it).
unsafe impl Send for Ptrs {}

impl Communicator {
    fn submit<T: Element, R: Send + 'static>(
        &self,
        coll: Coll,
        count: usize,
        mut bufs: Owned<T>,
        in_place: bool,
        digest: Vec<u64>,
        finish: fn(Vec<T>, Vec<T>) -> R,
    ) -> Result<Work<R>> {
        let rp = bufs.recv.as_mut_ptr() as *mut u8;
        let sp = if in_place { rp as *const u8 } else { bufs.send.as_ptr() as *const u8 };
        let plan = crate::raw::Plan {
            coll,
            dtype: T::DTYPE,
            count,
            send: sp,
            recv: rp,
            kind: MemKind::Host,
            digest: crate::raw::Digest::from_slice(&digest),
        };
        // SAFETY: the vectors move into the job below (their heap buffers do not move), whose
        // lengths the submitting call checked; nothing else holds them.
        unsafe { self.submit_ptrs(plan, move || finish(bufs.send, bufs.recv)) }
    }

    /// Queues a checked operation; when it succeeds, the work's value is `finish()`.
    ///
    /// # Safety
    ///
    /// The plan's buffers stay valid for the operation (and untouched by anything else) until
    /// the job has run; `finish` may own them.
    pub(crate) unsafe fn submit_ptrs<R: Send + 'static>(
        &self,
        plan: crate::raw::Plan,
        finish: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Work<R>> {
        // SAFETY: forwarded.
        unsafe { self.submit_ptrs_after(plan, None, finish) }
    }

    /// [`Communicator::submit_ptrs`] that first waits for the work queued on a GPU stream
    /// before the call, and releases the stream when it ends.
    ///
    /// # Safety
    ///
    /// As [`Communicator::submit_ptrs`].
    unsafe fn submit_ptrs_after<R: Send + 'static>(
        &self,
        plan: crate::raw::Plan,
        stream: Option<Release>,
        finish: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Work<R>> {
        let crate::raw::Plan { coll, dtype, count, send, recv, kind, digest } = plan;
        self.check_memory(kind)?;
        self.check_usable()?;
        let slot = Arc::new(Slot { value: Mutex::new(None), cv: Condvar::new() });
        // A queued operation's deadline counts from when it was submitted.
        let mut deadline = self.deadline()?;
        deadline.at(Instant::now());
        let t = self.shared.turns.ticket();
        let rank = self.rank;
        let s2 = slot.clone();
        let guard = FillOnDrop { armed: true, slot: slot.clone(), t, shared: self.shared.clone() };
        let ptrs = Ptrs(send, recv);
        let job: Job = Box::new(move |sh: &Shared| {
            let mut guard = guard;
            let ptrs = ptrs;
            let mut stream = stream;
            let r = (|| {
                if let Some(s) = stream.as_mut() {
                    s.wait_for_stream(&mut deadline, sh)?;
                }
                sh.turns.wait_turn(t, &mut deadline, &sh.abort)?;
                let mut st = sh.lock_state()?;
                // SAFETY: the submitter's promise (above).
                unsafe {
                    st.run(&coll, dtype, count, ptrs.0, ptrs.1, kind, digest.as_slice(), &mut deadline, &sh.abort)
                }
            })();
            guard.armed = false;
            sh.turns.done(t);
            if let Err(e) = &r {
                sh.record(rank, e);
            }
            // The stream goes on once the operation has ended (before the caller's host
            // thread hears of it: its next stream work may already be queued).
            drop(stream);
            *s2.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.map(|_| finish()));
            s2.cv.notify_all();
        });
        self.queue(job)?;
        Ok(Work { slot, shared: self.shared.clone() })
    }

    /// Queues `call` on raw buffers, ordered on the caller's GPU `stream` as NCCL's calls are:
    /// it returns at once; the operation starts after the work queued on `stream` before this
    /// call, and the work queued on `stream` after this call waits, on the GPU, until the
    /// operation has ended (docs/gpu.md). The [`Work`] says when it has ended and how; a
    /// failure also fails the communicator's next call, and releases the stream (it never
    /// waits forever).
    ///
    /// # Safety
    ///
    /// As [`Communicator::call_raw`], until the operation has ended; `stream` is a live stream
    /// of the context of the buffers' GPU.
    pub unsafe fn submit_on_stream(
        &self,
        call: &crate::RawCall,
        send: crate::RawBuf,
        recv: crate::RawBuf,
        stream: oxccl_core::stream::StreamHandle,
    ) -> Result<Work<()>> {
        let plan = self.plan_raw(call, send, recv)?;
        let MemKind::Device(n) = plan.kind else {
            return Err(Error::invalid_arg(format!(
                "{}: a call on a GPU stream takes GPU buffers; these are in {} (call it without a stream)",
                call.name(),
                plan.kind
            )));
        };
        let mut batch = self.stream_batch(n, stream)?;
        // SAFETY: forwarded from the caller.
        let w = unsafe { batch.submit(call, send, recv) }?;
        batch.finish()?;
        Ok(w)
    }

    /// Begins a batch of operations on GPU `gpu`'s `stream` (see [`StreamBatch`]): marks the
    /// stream's end now.
    pub fn stream_batch(&self, gpu: u32, stream: oxccl_core::stream::StreamHandle) -> Result<StreamBatch<'_>> {
        self.check_memory(MemKind::Device(gpu))?;
        let streams = self.streams_of(gpu)?;
        let fence = streams.as_ref().expect("made").mark(stream)?;
        Ok(StreamBatch { comm: self, gpu, stream, fence, last: None })
    }

    /// The communicator's stream ordering, made for GPU `n` at the first call on a stream;
    /// held locked (numbers follow call order).
    fn streams_of(&self, n: u32) -> Result<std::sync::MutexGuard<'_, Option<Streams>>> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams.is_none() {
            *streams = Some(Streams::new(crate::registry::stream_order(n, self.shared.meta.gpu)?));
        }
        Ok(streams)
    }

    /// A send of raw GPU `buf` to `peer`, ordered on the caller's GPU `stream` (as
    /// [`Communicator::submit_on_stream`]); progresses on its own, in order per peer, as
    /// [`Communicator::send_async_raw`].
    ///
    /// # Safety
    ///
    /// `buf` stays valid and unchanged until the work has ended; `stream` is a live stream of
    /// the context of its GPU.
    pub unsafe fn send_on_stream(
        &self,
        buf: crate::RawBuf,
        peer: usize,
        stream: oxccl_core::stream::StreamHandle,
    ) -> Result<Work<()>> {
        // SAFETY: forwarded.
        unsafe { self.p2p_on_stream(buf, (peer, true, 0), stream) }
    }

    /// A receive into raw GPU `buf` from `peer`, ordered on the caller's GPU `stream`.
    ///
    /// # Safety
    ///
    /// `buf` stays valid, and untouched by anything else, until the work has ended; `stream`
    /// is a live stream of the context of its GPU.
    pub unsafe fn recv_on_stream(
        &self,
        buf: crate::RawBuf,
        peer: usize,
        stream: oxccl_core::stream::StreamHandle,
    ) -> Result<Work<()>> {
        // SAFETY: forwarded.
        unsafe { self.p2p_on_stream(buf, (peer, false, 0), stream) }
    }

    unsafe fn p2p_on_stream(
        &self,
        buf: crate::RawBuf,
        how: (usize, bool, u32),
        stream: oxccl_core::stream::StreamHandle,
    ) -> Result<Work<()>> {
        let MemKind::Device(n) = buf.kind else {
            return Err(Error::invalid_arg(format!(
                "a send or receive on a GPU stream takes a GPU buffer; this one is in {} (call it without a stream)",
                buf.kind
            )));
        };
        let mut batch = self.stream_batch(n, stream)?;
        // SAFETY: forwarded.
        let w = unsafe { batch.p2p(buf, how) }?;
        batch.finish()?;
        Ok(w)
    }

    /// Runs `f` on this communicator's simulated streams (`OXCCL_GPU=simulated`; made now if
    /// no call on a stream made them yet): OxCCL's own tests queue "kernels" and look at holds.
    #[cfg(feature = "simulated-gpu")]
    pub fn with_simulated_streams<T>(&self, f: impl FnOnce(&oxccl_core::stream::fake::FakeStreams) -> T) -> Result<T> {
        let streams = self.streams_of(0)?;
        let order = &streams.as_ref().expect("made").order;
        order
            .as_any()
            .downcast_ref::<oxccl_core::stream::fake::FakeStreams>()
            .map(f)
            .ok_or_else(|| Error::invalid_usage("this communicator's streams are not simulated (OXCCL_GPU=simulated)"))
    }

    /// Queues `job` on the progress thread, starting it on first use.
    fn queue(&self, job: Job) -> Result<()> {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(ProgressThread::start(self.shared.clone(), self.rank)?);
        }
        p.as_ref().expect("started above").queue(job)
    }

    /// Non-blocking [`Communicator::all_reduce_in_place`]; the work returns `buf`.
    pub fn all_reduce_async<T: Element>(&self, buf: Vec<T>, op: ReduceOp) -> Result<Work<Vec<T>>> {
        op.check(T::DTYPE)?;
        let n = buf.len();
        let d = vec![dcode(T::DTYPE), n as u64, ocode(op)];
        self.submit(Coll::AllReduce { op }, n, Owned { send: Vec::new(), recv: buf }, true, d, |_, r| r)
    }

    /// Non-blocking [`Communicator::broadcast_in_place`]; the work returns `buf`.
    pub fn broadcast_async<T: Element>(&self, buf: Vec<T>, root: usize) -> Result<Work<Vec<T>>> {
        if root >= self.world {
            return Err(Error::invalid_arg(format!(
                "root {root} is out of range: the communicator has {} ranks",
                self.world
            )));
        }
        let n = buf.len();
        let d = vec![dcode(T::DTYPE), n as u64, root as u64];
        self.submit(Coll::Broadcast { root }, n, Owned { send: Vec::new(), recv: buf }, true, d, |_, r| r)
    }

    /// Non-blocking [`Communicator::reduce`]; the work returns `(send, recv)`, `recv` holding
    /// the result at the root (`recv` must be as long as `send` there; elsewhere it may be
    /// empty).
    pub fn reduce_async<T: Element>(
        &self,
        send: Vec<T>,
        mut recv: Vec<T>,
        op: ReduceOp,
        root: usize,
    ) -> Result<Work<(Vec<T>, Vec<T>)>> {
        op.check(T::DTYPE)?;
        if root >= self.world {
            return Err(Error::invalid_arg(format!(
                "root {root} is out of range: the communicator has {} ranks",
                self.world
            )));
        }
        let n = send.len();
        if self.rank == root && recv.len() != n {
            return Err(Error::invalid_arg(format!(
                "reduce: at the root, send has {n} elements but recv has {}",
                recv.len()
            )));
        }
        if self.rank != root {
            recv.clear();
        }
        let d = vec![dcode(T::DTYPE), n as u64, ocode(op), root as u64];
        self.submit(Coll::Reduce { op, root }, n, Owned { send, recv }, false, d, |s, r| (s, r))
    }

    /// Non-blocking [`Communicator::reduce_scatter`]; the work returns `(send, recv)`.
    pub fn reduce_scatter_async<T: Element>(
        &self,
        send: Vec<T>,
        recv: Vec<T>,
        op: ReduceOp,
    ) -> Result<Work<(Vec<T>, Vec<T>)>> {
        op.check(T::DTYPE)?;
        let n = recv.len();
        if Some(send.len()) != n.checked_mul(self.world) {
            return Err(Error::invalid_arg(format!(
                "reduce_scatter: send has {} elements, expected {} x {n}",
                send.len(),
                self.world
            )));
        }
        let d = vec![dcode(T::DTYPE), n as u64, ocode(op)];
        self.submit(Coll::ReduceScatter { op }, n, Owned { send, recv }, false, d, |s, r| (s, r))
    }

    /// Non-blocking [`Communicator::all_to_all_v`]; the work returns `(send, recv)`.
    pub fn all_to_all_v_async<T: Element>(
        &self,
        send: Vec<T>,
        send_counts: &[usize],
        recv: Vec<T>,
        recv_counts: &[usize],
    ) -> Result<Work<(Vec<T>, Vec<T>)>> {
        let ts = crate::ops::check_v_counts(self, send.len(), send_counts, recv.len(), recv_counts)?;
        let coll = Coll::AllToAllV { send_counts: send_counts.to_vec(), recv_counts: recv_counts.to_vec() };
        self.submit(coll, ts, Owned { send, recv }, false, vec![dcode(T::DTYPE)], |s, r| (s, r))
    }

    /// Non-blocking [`Communicator::all_gather`]; the work returns `(send, recv)`.
    pub fn all_gather_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>) -> Result<Work<(Vec<T>, Vec<T>)>> {
        let n = send.len();
        if recv.len() != n * self.world {
            return Err(Error::invalid_arg(format!(
                "all_gather: recv has {} elements, expected {}",
                recv.len(),
                n * self.world
            )));
        }
        let d = vec![dcode(T::DTYPE), n as u64];
        self.submit(Coll::AllGather, n, Owned { send, recv }, false, d, |s, r| (s, r))
    }

    /// Non-blocking [`Communicator::all_to_all`]; the work returns `(send, recv)`.
    pub fn all_to_all_async<T: Element>(&self, send: Vec<T>, recv: Vec<T>) -> Result<Work<(Vec<T>, Vec<T>)>> {
        if send.len() != recv.len() || send.len() % self.world != 0 {
            return Err(Error::invalid_arg(format!(
                "all_to_all: send ({}) and recv ({}) must have equal lengths, a multiple of {}",
                send.len(),
                recv.len(),
                self.world
            )));
        }
        let n = send.len() / self.world;
        let d = vec![dcode(T::DTYPE), n as u64];
        self.submit(Coll::AllToAll, n, Owned { send, recv }, false, d, |s, r| (s, r))
    }

    /// Non-blocking [`Communicator::send`]; the work returns `buf`.
    ///
    /// Posted sends and receives progress on their own, as MPI's `Isend`/`Irecv` and torch's
    /// `isend`/`irecv`: two ranks that each post `recv_async` then `send_async` to each other
    /// both complete. Order is kept per peer and direction: sends to one peer arrive in the
    /// order they were posted, and receives from one peer are matched in posting order.
    pub fn send_async<T: Element>(&self, buf: Vec<T>, peer: usize) -> Result<Work<Vec<T>>> {
        self.p2p_async(buf, peer, true)
    }

    /// Non-blocking [`Communicator::recv`]; the work returns `buf`, filled. Progresses on its
    /// own, in order per peer (see [`Communicator::send_async`]).
    pub fn recv_async<T: Element>(&self, buf: Vec<T>, peer: usize) -> Result<Work<Vec<T>>> {
        self.p2p_async(buf, peer, false)
    }

    /// A non-blocking send or receive: it takes its place in call order (posted after every
    /// earlier operation's messages), then progresses on its own, so later calls (and the
    /// peer's) never wait for it to complete; see `p2p.rs`.
    fn p2p_async<T: Element>(&self, mut buf: Vec<T>, peer: usize, send: bool) -> Result<Work<Vec<T>>> {
        let (ptr, len) = (buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf.as_slice()));
        // SAFETY: the Vec's heap buffer stays where it is when the Vec moves into the finish
        // closure, which owns it until the flight ends (the links let go of it first); nothing
        // else touches it meanwhile.
        unsafe { self.p2p_ptr_async(ptr, len, MemKind::Host, (peer, send, 0), move || buf) }
    }

    /// A non-blocking send or receive of `len` bytes at `ptr`; the work's value is `finish()`.
    ///
    /// # Safety
    ///
    /// The memory stays valid (and, for a receive, untouched by anything else) until the
    /// flight ends; `finish` may own it.
    pub(crate) unsafe fn p2p_ptr_async<R: Send + 'static>(
        &self,
        ptr: *mut u8,
        len: usize,
        kind: MemKind,
        how: (usize, bool, u32),
        finish: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Work<R>> {
        // SAFETY: forwarded.
        unsafe { self.p2p_ptr_async_after(ptr, len, kind, how, None, finish) }
    }

    /// [`Communicator::p2p_ptr_async`] that first waits for the work queued on a GPU stream
    /// before the call, and releases the stream when the flight ends.
    ///
    /// # Safety
    ///
    /// As [`Communicator::p2p_ptr_async`].
    unsafe fn p2p_ptr_async_after<R: Send + 'static>(
        &self,
        ptr: *mut u8,
        len: usize,
        kind: MemKind,
        (peer, send, user_tag): (usize, bool, u32),
        stream: Option<Release>,
        finish: impl FnOnce() -> R + Send + 'static,
    ) -> Result<Work<R>> {
        if peer >= self.world || peer == self.rank {
            return Err(Error::invalid_arg(format!(
                "peer {peer} is out of range or this rank itself (world of {})",
                self.world
            )));
        }
        self.check_memory(kind)?;
        self.check_usable()?;
        // Its deadline counts from now.
        let mut deadline = self.deadline()?;
        let called = Instant::now();
        let until = deadline.at(called);
        let slot = Arc::new(Slot { value: Mutex::new(None), cv: Condvar::new() });
        let t = self.shared.turns.ticket();
        let guard = FillOnDrop { armed: true, slot: slot.clone(), t, shared: self.shared.clone() };
        let ptrs = Ptrs(ptr, ptr);
        let job: Job = Box::new(move |sh: &Shared| {
            let mut guard = guard;
            let ptrs = ptrs;
            let slot = guard.slot.clone();
            let fill = move |r: Result<R>| {
                *slot.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                slot.cv.notify_all();
            };
            let mut stream = stream;
            let fenced = match stream.as_mut() {
                Some(s) => s.wait_for_stream(&mut deadline, sh),
                None => Ok(()),
            };
            let turn = fenced.and_then(|_| sh.turns.wait_turn(t, &mut deadline, &sh.abort));
            let state = turn.and_then(|_| sh.lock_state());
            guard.armed = false;
            let mut st = match state {
                Ok(st) => st,
                Err(e) => {
                    sh.turns.done(t);
                    drop(stream);
                    fill(Err(e));
                    return;
                }
            };
            // SAFETY: the submitter's promise (above), memory of `kind`.
            let slice = unsafe { MemSlice::new_in(ptrs.1, len, kind) };
            st.push_flight(
                (peer, send, user_tag),
                slice,
                (called, until),
                Box::new(move |r| {
                    // The stream goes on once the flight has ended, done or failed.
                    drop(stream);
                    fill(r.map(|_| finish()))
                }),
            );
            drop(st);
            // Posted in call order: the next call may go (it does not wait for completion).
            sh.turns.done(t);
        });
        self.queue(job)?;
        Ok(Work { slot, shared: self.shared.clone() })
    }

    /// Non-blocking [`Communicator::barrier`].
    pub fn barrier_async(&self) -> Result<Work<()>> {
        self.submit::<u8, ()>(Coll::Barrier, 0, Owned { send: Vec::new(), recv: vec![0u8] }, true, vec![], |_, _| ())
    }
}

#[cfg(all(test, feature = "simulated-gpu"))]
mod tests {
    use super::*;
    use oxccl_core::stream::fake::FakeStreams;
    use oxccl_core::stream::{StreamHandle, StreamOrder};

    /// Operations that end out of call order release their stream in call order: an
    /// operation's end releases it only once every earlier one on that stream has ended;
    /// another stream's operations do not hold it.
    #[test]
    fn streams_are_released_in_call_order() {
        let fake = Arc::new(FakeStreams::default());
        let mut s = Streams::new(fake.clone());
        let (a, b) = (StreamHandle(0), StreamHandle(1));
        // a: 1, 2, 3; b: 1 (called between a's 2 and 3).
        let r: Vec<Release> = [a, a, b, a].into_iter().map(|st| s.next(st).unwrap()).collect();
        let holds: Vec<(usize, u64)> = fake.holds.lock().unwrap().clone();
        assert_eq!(holds, vec![(0, 1), (0, 2), (1, 1), (0, 3)]);
        let mut r: Vec<Option<Release>> = r.into_iter().map(Some).collect();
        let mut end = |k: usize| drop(r[k].take());
        end(1);
        assert_eq!(fake.released(a), 0, "a's 2 ended, its 1 did not: nothing released");
        end(2);
        assert_eq!(fake.released(b), 1, "b's only operation ended: b goes on, whatever a does");
        assert!(!fake.blocked(1) && fake.blocked(0));
        end(0);
        assert_eq!(fake.released(a), 2, "a's 1 ended: 1 and 2 released at once");
        assert!(fake.blocked(0), "a's 3 holds it");
        end(3);
        assert_eq!(fake.released(a), 3);
        assert!(!fake.blocked(0) && !fake.blocked(1));
        assert!(!fake.out_of_order.load(std::sync::atomic::Ordering::SeqCst));
    }
}
