//! Calls on buffers given by address, element count, data type and memory kind: what the
//! faces that cannot hand Rust slices use (the Python package, the NCCL-compatible C
//! library). The typed calls of [`Communicator`] go through the same checks
//! ([`Communicator::plan`]), so both report the same errors for the same mistakes.

use std::sync::atomic::Ordering;

use oxccl_core::mem::MemKind;
use oxccl_core::{DataType, Error, ReduceOp, Result};

use crate::comm::Communicator;
use crate::engine::{Coll, P2p};
use crate::ops::{dcode, ocode};
use crate::work::Work;

/// A caller's buffer: `count` elements of `dtype` at address `addr`, in memory of `kind`.
/// An empty buffer may have any address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBuf {
    /// The address of the first element.
    pub addr: usize,
    /// Elements (not bytes).
    pub count: usize,
    /// Their type.
    pub dtype: DataType,
    /// Where the memory is.
    pub kind: MemKind,
}

impl RawBuf {
    /// Host memory: `count` elements of `dtype` at `ptr`.
    pub fn host(ptr: *const u8, count: usize, dtype: DataType) -> RawBuf {
        RawBuf { addr: ptr.expose_provenance(), count, dtype, kind: MemKind::Host }
    }

    /// No buffer (a non-root's receive of `reduce`, a non-root's send of `broadcast`).
    pub fn none(dtype: DataType) -> RawBuf {
        RawBuf { addr: 0, count: 0, dtype, kind: MemKind::Host }
    }

    /// Its size in bytes (`None`: it overflows).
    pub fn bytes(&self) -> Option<usize> {
        self.count.checked_mul(self.dtype.size())
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        std::ptr::with_exposed_provenance_mut(self.addr)
    }
}

/// A collective on raw buffers; its buffers' lengths follow the typed call of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawCall {
    /// [`Communicator::all_reduce`]: `send` and `recv` of equal counts (the same address:
    /// in place).
    AllReduce {
        /// The operator.
        op: ReduceOp,
    },
    /// [`Communicator::broadcast`]: the root's `send` into everyone's `recv`.
    Broadcast {
        /// The rank whose data goes out.
        root: usize,
    },
    /// [`Communicator::broadcast_from_roots`]: the roots' `send` (the same data on each)
    /// into everyone's `recv`.
    BroadcastRoots {
        /// The ranks that hold the data (distinct, at least one).
        roots: Vec<usize>,
    },
    /// [`Communicator::reduce`]: everyone's `send` into the root's `recv`.
    Reduce {
        /// The operator.
        op: ReduceOp,
        /// The rank that receives.
        root: usize,
    },
    /// [`Communicator::all_gather`]: `recv` holds `world` blocks of `send`'s count (`send`
    /// may be block `rank` of `recv`: in place).
    AllGather,
    /// [`Communicator::reduce_scatter`]: `send` holds `world` blocks of `recv`'s count
    /// (`recv` may be block `rank` of `send`: in place).
    ReduceScatter {
        /// The operator.
        op: ReduceOp,
    },
    /// [`Communicator::all_to_all`]: equal counts, a multiple of the world size.
    AllToAll,
    /// [`Communicator::all_to_all_v`].
    AllToAllV {
        /// Elements to each rank, packed in rank order in `send`.
        send_counts: Vec<usize>,
        /// Elements from each rank, packed in rank order in `recv`.
        recv_counts: Vec<usize>,
    },
    /// [`Communicator::barrier`]: no buffers.
    Barrier,
}

impl RawCall {
    /// The call's name, as errors say it.
    pub fn name(&self) -> &'static str {
        match self {
            RawCall::AllReduce { .. } => "all_reduce",
            RawCall::Broadcast { .. } => "broadcast",
            RawCall::BroadcastRoots { .. } => "broadcast_from_roots",
            RawCall::Reduce { .. } => "reduce",
            RawCall::AllGather => "all_gather",
            RawCall::ReduceScatter { .. } => "reduce_scatter",
            RawCall::AllToAll => "all_to_all",
            RawCall::AllToAllV { .. } => "all_to_all_v",
            RawCall::Barrier => "barrier",
        }
    }
}

/// A checked call, ready for the engine.
pub(crate) struct Plan {
    pub coll: Coll,
    pub dtype: DataType,
    pub count: usize,
    pub send: *const u8,
    pub recv: *mut u8,
    pub kind: MemKind,
    pub digest: Digest,
}

/// The arguments' digest of a tag (at most four parts), kept without a heap allocation (a
/// small collective's whole cost is a few hundred nanoseconds).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Digest {
    parts: [u64; 4],
    n: usize,
}

impl Digest {
    #[inline]
    pub(crate) fn of<const N: usize>(p: [u64; N]) -> Digest {
        const { assert!(N <= 4, "a digest has at most four parts") };
        let mut parts = [0; 4];
        parts[..N].copy_from_slice(&p);
        Digest { parts, n: N }
    }

    /// From a slice of at most four parts (the typed queued calls build them at run time).
    pub(crate) fn from_slice(p: &[u64]) -> Digest {
        let mut parts = [0; 4];
        let n = p.len().min(4);
        parts[..n].copy_from_slice(&p[..n]);
        Digest { parts, n }
    }

    pub(crate) fn as_slice(&self) -> &[u64] {
        &self.parts[..self.n]
    }
}

fn arg(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

impl Communicator {
    /// [`Communicator::plan`] for buffers from outside Rust: first what a slice guarantees
    /// by itself (a size that fits in memory, an address that is not null, one memory kind).
    #[inline(always)]
    pub(crate) fn plan_raw(&self, call: &RawCall, send: RawBuf, recv: RawBuf) -> Result<Plan> {
        let name = call.name();
        for (what, b) in [("send", &send), ("recv", &recv)] {
            if b.bytes().is_none() {
                return Err(arg(format!("{name}: {what} of {} x {} overflows the address space", b.count, b.dtype)));
            }
            if b.count > 0 && b.addr == 0 {
                return Err(arg(format!("{name}: {what} has {} elements at a null address", b.count)));
            }
        }
        if send.count > 0 && recv.count > 0 && send.kind != recv.kind {
            return Err(arg(format!("{name}: send is in {} but recv is in {}", send.kind, recv.kind)));
        }
        // By reference: a copy of each RawBuf, built by the caller a moment ago, would be
        // read back wider than it was written, and stall (it showed in the C ABI's 8-byte cost).
        self.plan(call, &send, &recv)
    }

    /// Checks `call` on `send` and `recv` (every rule of the typed call of the same name)
    /// and says what the engine runs; nothing moves.
    #[inline(always)]
    pub(crate) fn plan(&self, call: &RawCall, send: &RawBuf, recv: &RawBuf) -> Result<Plan> {
        let name = call.name();
        let (rank, world) = (self.rank, self.world);
        // The element type: both buffers' where this rank uses both, else the one it uses.
        let dtype = match call {
            RawCall::Broadcast { root } if *root != rank => recv.dtype,
            RawCall::BroadcastRoots { roots } if !roots.contains(&rank) => recv.dtype,
            RawCall::Reduce { root, .. } if *root != rank => send.dtype,
            RawCall::Barrier => DataType::U8,
            _ if send.dtype != recv.dtype => {
                return Err(arg(format!("{name}: send holds {} but recv holds {}", send.dtype, recv.dtype)));
            }
            _ => recv.dtype,
        };
        let kind = if recv.count > 0 { recv.kind } else { send.kind };
        let check_rank = |what: &str, r: usize| {
            if r >= world {
                return Err(arg(format!("{what} {r} is out of range: the communicator has {world} ranks")));
            }
            Ok(())
        };
        let (sp, rp) = (send.ptr() as *const u8, recv.ptr());
        let d = dcode(dtype);
        let plan = |coll, count, send, recv, digest| Ok(Plan { coll, dtype, count, send, recv, kind, digest });
        match call {
            RawCall::AllReduce { op } => {
                op.check(dtype)?;
                if send.count != recv.count {
                    return Err(arg(format!(
                        "all_reduce: send has {} elements but recv has {}; they must be equal",
                        send.count, recv.count
                    )));
                }
                let n = send.count;
                plan(Coll::AllReduce { op: *op }, n, sp, rp, Digest::of([d, n as u64, ocode(*op)]))
            }
            RawCall::Broadcast { root } => {
                check_rank("root", *root)?;
                let n = recv.count;
                if rank == *root && send.count != n {
                    return Err(arg(format!(
                        "broadcast: at the root, send has {} elements but recv has {}",
                        send.count, n
                    )));
                }
                let sp = if rank == *root { sp } else { rp as *const u8 };
                plan(Coll::Broadcast { root: *root }, n, sp, rp, Digest::of([d, n as u64, *root as u64]))
            }
            RawCall::BroadcastRoots { roots } => {
                if roots.is_empty() {
                    return Err(arg("broadcast_from_roots: no roots given; name at least one rank".into()));
                }
                for (i, &r) in roots.iter().enumerate() {
                    check_rank("root", r)?;
                    if roots[..i].contains(&r) {
                        return Err(arg(format!("broadcast_from_roots: root {r} is named twice")));
                    }
                }
                let n = recv.count;
                let is_root = roots.contains(&rank);
                if is_root && send.count != n {
                    return Err(arg(format!(
                        "broadcast_from_roots: at root {rank}, send has {} elements but recv has {n}",
                        send.count
                    )));
                }
                let sp = if is_root { sp } else { rp as *const u8 };
                // Every rank must name the same roots in the same order: their digest goes in
                // the tag, so a mismatch is found instead of mixing stripes.
                let h =
                    roots.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| (h ^ r as u64).wrapping_mul(0x100_0000_01b3));
                plan(
                    Coll::BroadcastRoots { roots: roots.clone() },
                    n,
                    sp,
                    rp,
                    Digest::of([d, n as u64, h, roots.len() as u64]),
                )
            }
            RawCall::Reduce { op, root } => {
                op.check(dtype)?;
                check_rank("root", *root)?;
                let n = send.count;
                if rank == *root && recv.count != n {
                    return Err(arg(format!("reduce: at the root, send has {n} elements but recv has {}", recv.count)));
                }
                let rp = if rank == *root { rp } else { std::ptr::null_mut() };
                plan(
                    Coll::Reduce { op: *op, root: *root },
                    n,
                    sp,
                    rp,
                    Digest::of([d, n as u64, ocode(*op), *root as u64]),
                )
            }
            RawCall::AllGather => {
                let n = send.count;
                if Some(recv.count) != n.checked_mul(world) {
                    return Err(arg(format!(
                        "all_gather: recv has {} elements, expected {world} x {n} = {}",
                        recv.count,
                        n.saturating_mul(world)
                    )));
                }
                plan(Coll::AllGather, n, sp, rp, Digest::of([d, n as u64]))
            }
            RawCall::ReduceScatter { op } => {
                op.check(dtype)?;
                let n = recv.count;
                if Some(send.count) != n.checked_mul(world) {
                    return Err(arg(format!(
                        "reduce_scatter: send has {} elements, expected {world} x {n} = {}",
                        send.count,
                        n.saturating_mul(world)
                    )));
                }
                plan(Coll::ReduceScatter { op: *op }, n, sp, rp, Digest::of([d, n as u64, ocode(*op)]))
            }
            RawCall::AllToAll => {
                if send.count != recv.count || send.count % world != 0 {
                    return Err(arg(format!(
                        "all_to_all: send ({}) and recv ({}) must have equal lengths, a multiple of the world size {world}",
                        send.count, recv.count
                    )));
                }
                let n = send.count / world;
                plan(Coll::AllToAll, n, sp, rp, Digest::of([d, n as u64]))
            }
            RawCall::AllToAllV { send_counts, recv_counts } => {
                let ts = crate::ops::check_v_counts(self, send.count, send_counts, recv.count, recv_counts)?;
                let coll = Coll::AllToAllV { send_counts: send_counts.clone(), recv_counts: recv_counts.clone() };
                plan(coll, ts, sp, rp, Digest::of([d]))
            }
            RawCall::Barrier => {
                // The engine writes nothing for a barrier; it wants a valid address.
                let p = std::ptr::NonNull::<u8>::dangling().as_ptr();
                Ok(Plan {
                    coll: Coll::Barrier,
                    dtype: DataType::U8,
                    count: 0,
                    send: p,
                    recv: p,
                    kind,
                    digest: Digest::default(),
                })
            }
        }
    }

    /// Runs `call` on raw buffers, blocking, as the typed call of the same name (same checks,
    /// same errors, same deadline).
    ///
    /// # Safety
    ///
    /// `send` must be valid for reads and `recv` for writes of their counts of elements for
    /// the whole call (only the ones this rank uses: a non-root's `recv` of `reduce`, say, is
    /// not touched), in memory of the kind they name; nothing else may write them meanwhile.
    #[inline(always)]
    pub unsafe fn call_raw(&self, call: &RawCall, send: RawBuf, recv: RawBuf) -> Result<()> {
        self.call(self.plan_raw(call, send, recv)?)
    }

    /// Queues `call` on raw buffers, as the `*_async` typed calls: it takes its place in call
    /// order and runs on the progress thread; the [`Work`] says when it is done.
    ///
    /// # Safety
    ///
    /// As [`Communicator::call_raw`], until the work has completed (its `wait` or `test` says
    /// so), even when the `Work` is dropped earlier.
    pub unsafe fn submit_raw(&self, call: &RawCall, send: RawBuf, recv: RawBuf) -> Result<Work<()>> {
        let p = self.plan_raw(call, send, recv)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.submit_ptrs(p, || ()) }
    }

    /// Sends `count` elements at `buf` to `peer`, blocking, as [`Communicator::send`].
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads of its bytes for the whole call.
    pub unsafe fn send_raw(&self, buf: RawBuf, peer: usize) -> Result<()> {
        let mut g = self.group();
        // SAFETY: forwarded from the caller; `run` returns before this call does.
        unsafe { g.send_raw(buf, peer)? };
        g.run()
    }

    /// Receives from `peer` into `buf`, blocking, as [`Communicator::recv`].
    ///
    /// # Safety
    ///
    /// `buf` must be valid for writes of its bytes for the whole call.
    pub unsafe fn recv_raw(&self, buf: RawBuf, peer: usize) -> Result<()> {
        let mut g = self.group();
        // SAFETY: forwarded from the caller; `run` returns before this call does.
        unsafe { g.recv_raw(buf, peer)? };
        g.run()
    }

    /// Non-blocking send from raw memory, as [`Communicator::send_async`] (independent
    /// progress, order kept per peer and direction).
    ///
    /// # Safety
    ///
    /// `buf` must stay valid for reads, and unchanged, until the work has completed.
    pub unsafe fn send_async_raw(&self, buf: RawBuf, peer: usize) -> Result<Work<()>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.p2p_raw_async(buf, (peer, true, 0)) }
    }

    /// [`Communicator::send_async_raw`] with a tag. Sends and receives between two ranks
    /// still match in call order (as NCCL's do, whatever torch's `tag=` says); the tag
    /// travels with the message and the receive checks it, so a receive posted for another
    /// tag fails with `InvalidUsage` naming both, instead of taking the wrong data.
    ///
    /// # Safety
    ///
    /// As [`Communicator::send_async_raw`].
    pub unsafe fn send_async_raw_tagged(&self, buf: RawBuf, peer: usize, tag: u32) -> Result<Work<()>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.p2p_raw_async(buf, (peer, true, tag)) }
    }

    /// [`Communicator::recv_async_raw`] with a tag (see
    /// [`Communicator::send_async_raw_tagged`]).
    ///
    /// # Safety
    ///
    /// As [`Communicator::recv_async_raw`].
    pub unsafe fn recv_async_raw_tagged(&self, buf: RawBuf, peer: usize, tag: u32) -> Result<Work<()>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.p2p_raw_async(buf, (peer, false, tag)) }
    }

    /// Non-blocking receive into raw memory, as [`Communicator::recv_async`].
    ///
    /// # Safety
    ///
    /// `buf` must stay valid for writes, and untouched by anything else, until the work has
    /// completed.
    pub unsafe fn recv_async_raw(&self, buf: RawBuf, peer: usize) -> Result<Work<()>> {
        // SAFETY: forwarded from the caller.
        unsafe { self.p2p_raw_async(buf, (peer, false, 0)) }
    }

    unsafe fn p2p_raw_async(&self, buf: RawBuf, how: (usize, bool, u32)) -> Result<Work<()>> {
        let len =
            buf.bytes().ok_or_else(|| arg(format!("{} x {} overflows the address space", buf.count, buf.dtype)))?;
        if len > 0 && buf.addr == 0 {
            return Err(arg(format!("a buffer of {} elements at a null address", buf.count)));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.p2p_ptr_async(buf.ptr(), len, buf.kind, how, || ()) }
    }

    /// Whether this communicator was aborted (by [`Communicator::abort`] here, or a failure).
    pub fn is_aborted(&self) -> bool {
        self.shared.abort.load(Ordering::Relaxed) || self.shared.sticky.is_set()
    }
}

impl crate::ops::Group<'_> {
    /// Adds a send of raw `buf` to `peer`.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads of its bytes until [`crate::Group::run`] returns.
    pub unsafe fn send_raw(&mut self, buf: RawBuf, peer: usize) -> Result<&mut Self> {
        self.push_raw(buf, peer, true)
    }

    /// Adds a receive into raw `buf` from `peer`.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for writes of its bytes until [`crate::Group::run`] returns.
    pub unsafe fn recv_raw(&mut self, buf: RawBuf, peer: usize) -> Result<&mut Self> {
        self.push_raw(buf, peer, false)
    }

    fn push_raw(&mut self, buf: RawBuf, peer: usize, send: bool) -> Result<&mut Self> {
        let len =
            buf.bytes().ok_or_else(|| arg(format!("{} x {} overflows the address space", buf.count, buf.dtype)))?;
        if len > 0 && buf.addr == 0 {
            return Err(arg(format!("a buffer of {} elements at a null address", buf.count)));
        }
        self.push(P2p { peer, send, addr: buf.addr, len }, buf.kind)
    }
}
