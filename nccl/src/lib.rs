//! OxCCL's NCCL-compatible C library: `liboxccl_nccl.so`, installed as `libnccl.so.2`.
//!
//! It exports NCCL's C symbols with NCCL's types (`include/nccl.h`), so that programs and
//! wrappers that load NCCL by path (vLLM's `VLLM_NCCL_SO_PATH`, a C program linked with
//! `-lnccl`) run on OxCCL by changing one variable. Communicators made here are ordinary
//! OxCCL communicators (transports, NIC budget, traffic classes, `oxccl explain`); their
//! class comes from `OXCCL_NCCL_CLASS` rules (docs/nccl-abi.md).
//!
//! Calls on host memory run to completion before they return (there is no stream to
//! order them on). Calls on GPU memory (the `cuda` feature) are ordered on the caller's
//! stream as NCCL's are: they return once queued, start after the stream's earlier work and
//! hold its later work until they end (docs/gpu.md). Calls between `ncclGroupStart` and
//! `ncclGroupEnd` are issued together at the end.

#![allow(non_snake_case, non_camel_case_types, non_upper_case_globals, clippy::missing_safety_doc)]

pub mod class;
pub mod id;
pub mod premul;
pub mod types;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use oxccl::{Communicator, Config, DataType, MemKind, RawBuf, RawCall, ReduceOp, StreamHandle, Work};

use premul::{PreMul, Scalar};
pub use types::*;

// ---------------------------------------------------------------------------------------
// Communicators

const LIVE: u64 = 0x0c0c_1a7e_0b5e_55ed;
const DEAD: u64 = 0xdead_c0de_dead_c0de;

/// What an `ncclComm_t` points to (on cache lines of its own).
#[derive(Debug)]
#[repr(align(128))]
pub struct ncclComm {
    /// LIVE, or DEAD once destroyed or aborted (read by calls that may race an abort).
    magic: AtomicU64,
    comm: Comm,
}

/// A communicator handle.
pub type ncclComm_t = *mut ncclComm;

/// A communicator of this library: the OxCCL one and what NCCL's API adds to it.
#[derive(Debug)]
pub struct Comm {
    inner: Communicator,
    /// The first error that failed it (`ncclCommGetAsyncError`); `ncclSuccess` while usable.
    async_error: AtomicI32,
    /// Operators made by `ncclRedOpCreatePreMulSum`: value `NCCL_NUM_OPS + i` is entry i.
    ops: Mutex<Vec<Option<PreMul>>>,
    finalized: AtomicBool,
}

impl Comm {
    fn new(inner: Communicator) -> Comm {
        Comm {
            inner,
            async_error: AtomicI32::new(ncclSuccess),
            ops: Mutex::new(Vec::new()),
            finalized: AtomicBool::new(false),
        }
    }

    /// Notes a failure: once the communicator is failed, its first error is its async error.
    fn note(&self, f: &Fail) {
        if self.inner.is_aborted() {
            let _ = self.async_error.compare_exchange(ncclSuccess, f.code, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// The operator value `op`: built in, or made for this communicator.
    fn op(&self, op: c_int, dtype: DataType) -> Result<Op, Fail> {
        if let Some(o) = builtin_op(op) {
            return Ok(Op::Plain(o));
        }
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let p = op
            .checked_sub(NCCL_NUM_OPS)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| ops.get(i).cloned().flatten())
            .ok_or_else(|| Fail::arg(format!("reduction operator {op} is neither built in (0 to 4) nor made by ncclRedOpCreatePreMulSum on this communicator")))?;
        if p.dtype != dtype {
            return Err(Fail::arg(format!("reduction operator {op} was made for {:?}, not {dtype:?}", p.dtype)));
        }
        Ok(Op::PreMul(p))
    }
}

enum Op {
    Plain(ReduceOp),
    PreMul(PreMul),
}

/// The communicator behind a handle (checked: not null, not destroyed).
#[inline(always)]
fn comm_of<'a>(c: ncclComm_t) -> Result<&'a Comm, Fail> {
    if c.is_null() {
        return Err(Fail::arg("the communicator is NULL"));
    }
    // SAFETY: a non-null handle came from this library (the caller's promise, as with NCCL);
    // the magic tells a destroyed one (freed memory still readable in practice) from a live one.
    let h = unsafe { &*c };
    if h.magic.load(Ordering::Relaxed) != LIVE {
        return Err(Fail::usage("the communicator was destroyed (or is not one of this library's)"));
    }
    // Borrowed, not cloned (an 8-byte call costs a few hundred nanoseconds; a reference
    // count's two atomic operations showed). Safe because a handle is freed only by
    // ncclCommDestroy, which NCCL forbids during other calls on it; ncclCommAbort, which may
    // run while a call on another thread is blocked, never frees the handle (see there).
    Ok(&h.comm)
}

fn handle(c: Comm) -> ncclComm_t {
    Box::into_raw(Box::new(ncclComm { magic: AtomicU64::new(LIVE), comm: c }))
}

/// The OxCCL communicator behind a handle of this library (for Rust tools such as
/// `oxccl perf --api nccl`); `None` for NULL or a destroyed handle.
///
/// # Safety
///
/// `c` is NULL or a handle of this library that stays alive while the reference is used.
pub unsafe fn communicator<'a>(c: ncclComm_t) -> Option<&'a Communicator> {
    // SAFETY: the caller keeps the handle alive while the reference is used.
    let h = unsafe { c.as_ref() }?;
    (h.magic.load(Ordering::Relaxed) == LIVE).then_some(&h.comm.inner)
}

/// Frees a handle (the communicator lives on while a call still holds it).
///
/// # Safety
///
/// `c` came from [`handle`] and is not used afterwards.
unsafe fn free_handle(c: ncclComm_t) {
    // SAFETY: the caller's promise; the magic is spoiled first so that a later use is told.
    unsafe {
        (*c).magic.store(DEAD, Ordering::SeqCst);
        drop(Box::from_raw(c));
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// The longest last-error message kept (NUL included).
const LAST_BYTES: usize = 2048;

thread_local! {
    /// This thread's last error, NUL-terminated: a buffer that lives as long as the thread,
    /// so the pointer ncclGetLastError gives stays valid (later errors overwrite the text).
    static LAST: std::cell::UnsafeCell<[u8; LAST_BYTES]> = const { std::cell::UnsafeCell::new([0; LAST_BYTES]) };
}

fn set_last(msg: &str) {
    tracing::debug!("{msg}");
    let mut n = msg.len().min(LAST_BYTES - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    let _ = LAST.try_with(|l| {
        // SAFETY: this thread's own buffer; no reference to it is held across this write (the
        // C caller holds a pointer, and reads it only between calls, as with NCCL's buffer).
        let b = unsafe { &mut *l.get() };
        b[..n].copy_from_slice(&msg.as_bytes()[..n]);
        b[n] = 0;
        b[..n].iter_mut().filter(|c| **c == 0).for_each(|c| *c = b' ');
    });
}

/// Runs `f`, turning its failure (or a panic) into a result code and the last error.
#[inline(always)]
fn run(f: impl FnOnce() -> Result<(), Fail>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ncclSuccess,
        Ok(Err(e)) => {
            set_last(&e.msg);
            e.code
        }
        Err(p) => panicked(&*p),
    }
}

/// A panic (a bug in OxCCL), as the caller sees it.
#[cold]
#[inline(never)]
fn panicked(p: &(dyn std::any::Any + Send)) -> ncclResult_t {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    set_last(&format!("internal error (please report it): {what}"));
    ncclInternalError
}

/// The communicator behind a live handle (`None`: NULL or dead; the checked path says which).
#[inline(always)]
fn live<'a>(c: ncclComm_t) -> Option<&'a Comm> {
    // SAFETY: as in `comm_of`.
    let h = unsafe { c.as_ref() }?;
    (h.magic.load(Ordering::Relaxed) == LIVE).then_some(&h.comm)
}

/// The result of a fast-path call that failed in the engine (kept out of line).
#[cold]
#[inline(never)]
fn failed(c: &Comm, e: oxccl::Error) -> ncclResult_t {
    let f = Fail::from(e);
    c.note(&f);
    set_last(&f.msg);
    f.code
}

/// Runs `f` on the communicator behind `c`; a failure that failed the communicator becomes
/// its async error.
#[inline(always)]
fn with_comm(c: ncclComm_t, f: impl FnOnce(&Comm) -> Result<(), Fail>) -> ncclResult_t {
    run(|| {
        let r = comm_of(c).and_then(|comm| {
            let r = f(comm);
            if let Err(e) = &r {
                comm.note(e);
            }
            r
        });
        if let Err(e) = &r {
            group_failed(e);
        }
        r
    })
}

fn out<T>(p: *mut T, what: &str) -> Result<&'static mut T, Fail> {
    // SAFETY: non-null output pointers are the caller's to give (as with NCCL).
    unsafe { p.as_mut() }.ok_or_else(|| Fail::arg(format!("{what} is NULL")))
}

// ---------------------------------------------------------------------------------------
// Buffers and calls

#[inline(always)]
fn kind_of(p: *const c_void) -> MemKind {
    #[cfg(feature = "cuda")]
    {
        oxccl::gpu::mem_kind(p as *const u8)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = p;
        MemKind::Host
    }
}

#[inline(always)]
fn buf(p: *const c_void, count: usize, dtype: DataType) -> Result<RawBuf, Fail> {
    Ok(RawBuf { addr: (p as *const u8).expose_provenance(), count, dtype, kind: kind_of(p) })
}

fn on_gpu(b: &RawBuf) -> bool {
    matches!(b.kind, MemKind::Device(_))
}

fn rank_arg(r: c_int, comm: &Comm, what: &str) -> Result<usize, Fail> {
    let w = comm.inner.world_size();
    usize::try_from(r)
        .ok()
        .filter(|&r| r < w)
        .ok_or_else(|| Fail::arg(format!("{what} {r} is out of range for a communicator of {w} ranks")))
}

/// A collective ready to go: the call, its buffers, and a scratch buffer it reads from when
/// a pre-multiply needed one (kept until the call completes).
struct Ready {
    call: RawCall,
    send: RawBuf,
    recv: RawBuf,
    _scratch: Option<Vec<u8>>,
    /// The caller's stream (what orders a call on GPU buffers).
    stream: usize,
}

/// Prepares a reducing collective: a pre-multiply runs now, into `recv` (all_reduce) or a
/// scratch copy of `send`, and the call becomes a sum.
#[inline(always)]
fn reducing(
    comm: &Comm,
    op: c_int,
    make: impl Fn(ReduceOp) -> RawCall,
    send: RawBuf,
    recv: RawBuf,
    in_place_ok: bool,
) -> Result<Ready, Fail> {
    match comm.op(op, send.dtype)? {
        Op::Plain(o) => Ok(Ready { call: make(o), send, recv, _scratch: None, stream: 0 }),
        Op::PreMul(_) if on_gpu(&send) || on_gpu(&recv) => Err(Fail::usage(
            "an operator made by ncclRedOpCreatePreMulSum on GPU buffers: not supported yet (its pre-multiply runs \
             on the host); use ncclSum and scale the result",
        )),
        Op::PreMul(p) => {
            for (what, b) in [("sendbuff", &send), ("recvbuff", &recv)] {
                if b.count > 0 && b.addr == 0 {
                    return Err(Fail::arg(format!("{what} is NULL")));
                }
            }
            if in_place_ok && send.count == recv.count {
                // SAFETY: send is readable and recv writable for count elements (the call's
                // contract; counts checked equal).
                unsafe { p.scale(send.ptr_const(), recv.ptr_mut(), send.count)? };
                return Ok(Ready { call: make(ReduceOp::Sum), send: recv, recv, _scratch: None, stream: 0 });
            }
            let bytes = send.bytes().ok_or_else(|| Fail::arg("the send buffer's size overflows"))?;
            let mut scratch = vec![0u8; bytes];
            // SAFETY: send readable for its count; scratch holds as many bytes.
            unsafe { p.scale(send.ptr_const(), scratch.as_mut_ptr(), send.count)? };
            let s = RawBuf { addr: scratch.as_ptr().expose_provenance(), kind: MemKind::Host, ..send };
            Ok(Ready { call: make(ReduceOp::Sum), send: s, recv, _scratch: Some(scratch), stream: 0 })
        }
    }
}

trait Ptrs {
    fn ptr_const(&self) -> *const u8;
    fn ptr_mut(&self) -> *mut u8;
}

impl Ptrs for RawBuf {
    fn ptr_const(&self) -> *const u8 {
        std::ptr::with_exposed_provenance(self.addr)
    }
    fn ptr_mut(&self) -> *mut u8 {
        std::ptr::with_exposed_provenance_mut(self.addr)
    }
}

// ---------------------------------------------------------------------------------------
// Groups

/// A communicator a group's operation uses: NCCL requires it to stay alive until
/// `ncclGroupEnd` returns.
#[derive(Clone, Copy)]
struct CommRef(*const Comm);

// SAFETY: a Comm is Sync (its parts are: the communicator, atomics, a mutex); a group's ends
// on other threads (splits made at ncclGroupEnd) only share it for the group's duration.
unsafe impl Send for CommRef {}

impl std::ops::Deref for CommRef {
    type Target = Comm;
    fn deref(&self) -> &Comm {
        // SAFETY: the communicator outlives the group (NCCL's rule, above).
        unsafe { &*self.0 }
    }
}

/// What a group holds until `ncclGroupEnd`.
enum Deferred {
    Coll { comm: CommRef, ready: Ready },
    P2p { comm: CommRef, send: bool, buf: RawBuf, peer: usize, stream: usize },
    Init { out: usize, nranks: c_int, id: ncclUniqueId, rank: c_int, name: Option<String> },
    Split { comm: CommRef, out: usize, color: Option<u32>, key: c_int, conf: Box<Config> },
    Shrink { comm: CommRef, out: usize, excluded: Vec<usize>, abort: bool },
}

thread_local! {
    /// How deep in ncclGroupStart this thread is (checked on every call: a constant-
    /// initialised cell, the cheapest thread-local there is).
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// What the group holds until the outermost ncclGroupEnd.
    static GROUP: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
    /// The first call of the open group that failed: the group then issues nothing, and
    /// ncclGroupEnd returns it (as NCCL does).
    static GROUP_ERR: RefCell<Option<Fail>> = const { RefCell::new(None) };
}

/// Notes a call's failure against the open group, if any.
fn group_failed(f: &Fail) {
    if in_group() {
        GROUP_ERR.with(|e| {
            e.borrow_mut().get_or_insert_with(|| f.clone());
        });
    }
}

#[inline(always)]
fn in_group() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

fn defer(d: Deferred) {
    GROUP.with(|g| g.borrow_mut().push(d));
}

/// Runs a collective now (blocking on host buffers, queued on the stream for GPU buffers) or
/// at the group's end.
#[inline(always)]
fn collective(comm: &Comm, ready: Ready) -> Result<(), Fail> {
    if in_group() {
        defer(Deferred::Coll { comm: CommRef(comm), ready });
        return Ok(());
    }
    if on_gpu(&ready.send) || on_gpu(&ready.recv) {
        // SAFETY: NCCL's contract for GPU buffers: valid until the operation has run on the
        // stream; the work is not waited for (its failure fails the communicator).
        let _work =
            unsafe { comm.inner.submit_on_stream(&ready.call, ready.send, ready.recv, StreamHandle(ready.stream)) }?;
        return Ok(());
    }
    // SAFETY: the buffers are the caller's, valid for the whole call (NCCL's contract for
    // host memory: until the call returns, which is after completion here); the scratch
    // buffer lives in `ready` until then.
    unsafe { comm.inner.call_raw(&ready.call, ready.send, ready.recv) }?;
    Ok(())
}

#[inline(always)]
fn point_to_point(comm: &Comm, send: bool, buf: RawBuf, peer: usize, stream: usize) -> Result<(), Fail> {
    if in_group() {
        defer(Deferred::P2p { comm: CommRef(comm), send, buf, peer, stream });
        return Ok(());
    }
    if on_gpu(&buf) {
        // SAFETY: as in `collective`.
        let _work = unsafe { on_stream_p2p(comm, send, buf, peer, stream) }?;
        return Ok(());
    }
    // SAFETY: as in `collective`.
    unsafe {
        if send {
            comm.inner.send_raw(buf, peer)
        } else {
            comm.inner.recv_raw(buf, peer)
        }
    }?;
    Ok(())
}

/// A send or receive of GPU memory queued on `stream`.
///
/// # Safety
/// NCCL's contract: the buffer stays valid until the operation has run on the stream.
unsafe fn on_stream_p2p(comm: &Comm, send: bool, buf: RawBuf, peer: usize, stream: usize) -> oxccl::Result<Work<()>> {
    // SAFETY: forwarded.
    unsafe {
        if send {
            comm.inner.send_on_stream(buf, peer, StreamHandle(stream))
        } else {
            comm.inner.recv_on_stream(buf, peer, StreamHandle(stream))
        }
    }
}

/// Issues a group's operations: communicators first (each on a thread of its own: they
/// meet their peers, which may be in this same group), then every operation in call order,
/// each progressing on its own (sends and receives as non-blocking flights, so a group of
/// them never deadlocks), then waits for all.
fn end_group(ops: Vec<Deferred>) -> Result<(), Fail> {
    let mut first: Option<Fail> = None;
    let mut keep = |r: Result<(), Fail>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    // Communicators first: made, split or shrunk, each on a thread (their peers may be
    // other ranks this same thread drives), then written to the caller's outputs.
    let (makes, rest): (Vec<_>, Vec<_>) = ops
        .into_iter()
        .partition(|d| matches!(d, Deferred::Init { .. } | Deferred::Split { .. } | Deferred::Shrink { .. }));
    let made: Vec<(usize, Result<Option<Comm>, Fail>)> = std::thread::scope(|s| {
        let hs: Vec<_> = makes
            .into_iter()
            .map(|d| match d {
                Deferred::Init { out, nranks, id, rank, name } => {
                    (out, s.spawn(move || init_rank(nranks, id, rank, name.as_deref()).map(Some)))
                }
                Deferred::Split { comm, out, color, key, conf } => (
                    out,
                    s.spawn(move || {
                        let comm = comm;
                        Ok(comm.inner.split_with_config(color, key as i64, *conf)?.map(Comm::new))
                    }),
                ),
                Deferred::Shrink { comm, out, excluded, abort } => (
                    out,
                    s.spawn(move || {
                        let comm = comm;
                        shrink(&comm, &excluded, abort).map(Some)
                    }),
                ),
                _ => unreachable!("partitioned above"),
            })
            .collect();
        hs.into_iter()
            .map(|(o, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Fail::new(ncclInternalError, "a thread making a communicator panicked")));
                (o, r)
            })
            .collect()
    });
    for (o, r) in made {
        let p = std::ptr::with_exposed_provenance_mut::<ncclComm_t>(o);
        match r {
            // SAFETY: `o` is the caller's output pointer, checked non-null when deferred.
            Ok(c) => unsafe { *p = c.map_or(std::ptr::null_mut(), handle) },
            Err(e) => {
                // SAFETY: as above.
                unsafe { *p = std::ptr::null_mut() };
                keep(Err(e));
            }
        }
    }
    // Sends to this rank itself meet the receives from it in call order: copied here (the
    // engine has no link to itself).
    let rest = match self_pairs(rest) {
        Ok(r) => r,
        Err(e) => {
            keep(Err(e));
            return first.map_or(Ok(()), Err);
        }
    };
    // GPU operations go in one batch per communicator and stream, as NCCL's group: each
    // batch's stream end is marked before any of them is held, the operations are queued in
    // call order and progress together, and each stream is held for its batch at the end
    // (the group end returns without waiting, as NCCL's does).
    let gpu_of = |d: &Deferred| -> Option<(*const Comm, usize, u32)> {
        let (comm, bufs, stream) = match d {
            Deferred::Coll { comm, ready } => (comm, [ready.send, ready.recv], ready.stream),
            Deferred::P2p { comm, buf, stream, .. } => (comm, [*buf, *buf], *stream),
            _ => return None,
        };
        bufs.iter().find_map(|b| match b.kind {
            MemKind::Device(n) => Some((comm.0, stream, n)),
            _ => None,
        })
    };
    let mut batches: Vec<((*const Comm, usize), oxccl::StreamBatch<'static>)> = Vec::new();
    for d in &rest {
        if let Some((c, stream, n)) = gpu_of(d) {
            if batches.iter().any(|(k, _)| *k == (c, stream)) {
                continue;
            }
            // SAFETY: NCCL's rule: the communicator outlives the group.
            let comm: &'static Comm = unsafe { &*c };
            match comm.inner.stream_batch(n, StreamHandle(stream)) {
                Ok(b) => batches.push(((c, stream), b)),
                Err(e) => {
                    let f = Fail::from(e);
                    comm.note(&f);
                    keep(Err(f));
                }
            }
        }
    }
    let mut works: Vec<(CommRef, Work<()>, Option<Ready>)> = Vec::new();
    for d in rest {
        if let Some((c, stream, _)) = gpu_of(&d) {
            let Some((_, batch)) = batches.iter_mut().find(|(k, _)| *k == (c, stream)) else { continue };
            // SAFETY: NCCL's contract for GPU buffers: valid until the operations have run on
            // the stream (see `collective`).
            let queued = unsafe {
                match &d {
                    Deferred::Coll { ready, .. } => batch.submit(&ready.call, ready.send, ready.recv),
                    Deferred::P2p { send: true, buf, peer, .. } => batch.send(*buf, *peer),
                    Deferred::P2p { buf, peer, .. } => batch.recv(*buf, *peer),
                    _ => unreachable!("only operations have buffers"),
                }
            };
            if let Err(e) = queued {
                let f = Fail::from(e);
                // SAFETY: as above.
                unsafe { &*c }.note(&f);
                keep(Err(f));
            }
            continue;
        }
        let (comm, posted, ready) = match d {
            Deferred::Coll { comm, ready } => {
                // SAFETY: the caller keeps the buffers valid until ncclGroupEnd returns (NCCL's
                // contract), which is after every work below completed; scratch is in `ready`.
                let w = unsafe { comm.inner.submit_raw(&ready.call, ready.send, ready.recv) };
                (comm, w, Some(ready))
            }
            Deferred::P2p { comm, send, buf, peer, .. } => {
                // SAFETY: as above.
                let w = unsafe {
                    if send {
                        comm.inner.send_async_raw(buf, peer)
                    } else {
                        comm.inner.recv_async_raw(buf, peer)
                    }
                };
                (comm, w, None)
            }
            Deferred::Init { .. } | Deferred::Split { .. } | Deferred::Shrink { .. } => {
                unreachable!("made before the operations")
            }
        };
        match posted {
            Ok(w) => works.push((comm, w, ready)),
            Err(e) => {
                let f = Fail::from(e);
                comm.note(&f);
                keep(Err(f));
            }
        }
    }
    for (_, b) in batches {
        if let Err(e) = b.finish() {
            keep(Err(Fail::from(e)));
        }
    }
    for (comm, w, ready) in works {
        if let Err(e) = w.wait() {
            let f = Fail::from(e);
            comm.note(&f);
            keep(Err(f));
        }
        drop(ready);
    }
    first.map_or(Ok(()), Err)
}

/// Takes the group's sends to this rank itself and its receives from itself out of `ops`,
/// pairing them in call order (per communicator) and copying each send into its receive.
fn self_pairs(ops: Vec<Deferred>) -> Result<Vec<Deferred>, Fail> {
    let mut rest = Vec::with_capacity(ops.len());
    // (communicator, send?, buffer), in call order.
    let mut own: Vec<(*const Comm, bool, RawBuf)> = Vec::new();
    for d in ops {
        match d {
            Deferred::P2p { comm, send, buf, peer, .. } if peer == comm.inner.rank() => {
                if on_gpu(&buf) {
                    return Err(Fail::usage(
                        "a send to this rank itself of GPU memory in a group: not supported yet (copy it on the stream)",
                    ));
                }
                own.push((comm.0, send, buf))
            }
            d => rest.push(d),
        }
    }
    let comms: Vec<*const Comm> = own.iter().fold(Vec::new(), |mut v, (c, _, _)| {
        if !v.contains(c) {
            v.push(*c);
        }
        v
    });
    for c in comms {
        let sends: Vec<RawBuf> = own.iter().filter(|o| o.0 == c && o.1).map(|o| o.2).collect();
        let recvs: Vec<RawBuf> = own.iter().filter(|o| o.0 == c && !o.1).map(|o| o.2).collect();
        if sends.len() != recvs.len() {
            return Err(Fail::usage(format!(
                "the group has {} send(s) to this rank itself but {} receive(s) from it: they pair up in order",
                sends.len(),
                recvs.len()
            )));
        }
        for (s, r) in sends.iter().zip(&recvs) {
            let (sb, rb) = (s.bytes().unwrap_or(usize::MAX), r.bytes().unwrap_or(usize::MAX));
            if sb != rb {
                return Err(Fail::usage(format!(
                    "a send of {sb} bytes to this rank itself meets a receive of {rb} bytes"
                )));
            }
            if sb > 0 && (s.addr == 0 || r.addr == 0) {
                return Err(Fail::arg("a send to or receive from this rank itself has a NULL buffer"));
            }
            // SAFETY: both buffers are the caller's for the group's duration, `sb` bytes each;
            // `copy` allows them to overlap.
            unsafe { std::ptr::copy(s.ptr_const(), r.ptr_mut(), sb) };
        }
    }
    Ok(rest)
}

// ---------------------------------------------------------------------------------------
// Making communicators

fn config_fields(cfg: *const ncclConfig_t) -> Result<Option<ncclConfig_t>, Fail> {
    if cfg.is_null() {
        return Ok(None);
    }
    // The header (size, magic, version) is in every version's struct; the rest only up to
    // `size`. Read field by field, never as a whole struct the caller's may be shorter than.
    // SAFETY: a non-null config is the caller's, with at least its header (NCCL's contract).
    let (size, magic) = unsafe {
        (std::ptr::addr_of!((*cfg).size).read_unaligned(), std::ptr::addr_of!((*cfg).magic).read_unaligned())
    };
    if magic != NCCL_CONFIG_MAGIC {
        return Err(Fail::arg("the ncclConfig_t was not set up with NCCL_CONFIG_INITIALIZER (its magic is wrong)"));
    }
    let header = std::mem::offset_of!(ncclConfig_t, blocking);
    if size < header {
        return Err(Fail::arg(format!("the ncclConfig_t's size ({size}) is smaller than its header")));
    }
    // Only the fields within `size` are read (the header among them); the rest keep their
    // "undefined" values.
    let mut v = ncclConfig_t::initializer();
    let n = size.min(std::mem::size_of::<ncclConfig_t>());
    // SAFETY: copies the first n bytes, which the caller's struct has (n <= its size) and
    // ours has (n <= size_of).
    unsafe { std::ptr::copy_nonoverlapping(cfg as *const u8, &mut v as *mut ncclConfig_t as *mut u8, n) };
    Ok(Some(v))
}

fn comm_name(cfg: Option<&ncclConfig_t>) -> Option<String> {
    let p = cfg?.commName;
    // SAFETY: a non-null commName is a NUL-terminated string the caller keeps (NCCL's contract).
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn config_for(name: Option<&str>, size: usize, base: Option<&Communicator>) -> Result<Config, Fail> {
    let mut c = match base {
        Some(b) => b.config(),
        None => Config::from_env()?,
    };
    class::apply(&mut c, class::Facts { name, size })?;
    Ok(c)
}

fn init_rank(nranks: c_int, id: ncclUniqueId, rank: c_int, name: Option<&str>) -> Result<Comm, Fail> {
    let world = usize::try_from(nranks)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Fail::arg(format!("nranks {nranks} must be at least 1")))?;
    let me = usize::try_from(rank)
        .ok()
        .filter(|&r| r < world)
        .ok_or_else(|| Fail::arg(format!("rank {rank} is out of range for {world} ranks")))?;
    let mut c = config_for(name, world, None)?;
    let (store, auth) = id::store_of(&id, c.timeout, &c.auth)?;
    // net-tcp links prove the same secret as the store's connections.
    c.set_auth(auth);
    Ok(Comm::new(Communicator::init(store, me, world, c)?))
}

/// `ncclGetVersion`.
#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    run(|| {
        *out(version, "version")? = NCCL_VERSION_CODE;
        Ok(())
    })
}

/// `ncclGetUniqueId`: this process hosts the rendezvous store (id.rs).
#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(unique_id: *mut ncclUniqueId) -> ncclResult_t {
    run(|| {
        let o = out(unique_id, "uniqueId")?;
        *o = id::new_id()?;
        Ok(())
    })
}

/// `ncclCommInitRank`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    comm_id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    // SAFETY: forwarded.
    unsafe { ncclCommInitRankConfig(comm, nranks, comm_id, rank, std::ptr::null_mut()) }
}

/// `ncclCommInitRankConfig`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    comm_id: ncclUniqueId,
    rank: c_int,
    config: *mut ncclConfig_t,
) -> ncclResult_t {
    run(|| {
        let o = out(comm, "comm")?;
        *o = std::ptr::null_mut();
        let cfg = config_fields(config).inspect_err(group_failed)?;
        if in_group() {
            // Made at ncclGroupEnd, with the group's other communicators (one thread may make
            // several ranks of one communicator that way).
            let name = comm_name(cfg.as_ref());
            defer(Deferred::Init { out: (comm as *mut u8).expose_provenance(), nranks, id: comm_id, rank, name });
            return Ok(());
        }
        *o = handle(init_rank(nranks, comm_id, rank, comm_name(cfg.as_ref()).as_deref())?);
        Ok(())
    })
}

/// `ncclCommInitRankScalable`: as `ncclCommInitRankConfig` with the first of the ids (one
/// rendezvous store serves any number of ranks; the others are not needed).
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankScalable(
    comm: *mut ncclComm_t,
    nranks: c_int,
    rank: c_int,
    n_id: c_int,
    comm_ids: *mut ncclUniqueId,
    config: *mut ncclConfig_t,
) -> ncclResult_t {
    if n_id < 1 || comm_ids.is_null() {
        return run(|| Err(Fail::arg(format!("nId is {n_id} and commIds is {comm_ids:?}: at least one id is needed"))));
    }
    // SAFETY: commIds holds nId >= 1 ids (the caller's promise); forwarded.
    unsafe { ncclCommInitRankConfig(comm, nranks, *comm_ids, rank, config) }
}

/// `ncclMemAlloc`: NCCL allocates GPU memory there; this build moves host memory only.
#[no_mangle]
pub unsafe extern "C" fn ncclMemAlloc(ptr: *mut *mut c_void, size: usize) -> ncclResult_t {
    let _ = (ptr, size);
    run(|| {
        Err(Fail::usage(
            "ncclMemAlloc allocates GPU memory: this build of OxCCL's NCCL library moves host memory only (use malloc)",
        ))
    })
}

/// `ncclMemFree`: see `ncclMemAlloc`.
#[no_mangle]
pub unsafe extern "C" fn ncclMemFree(ptr: *mut c_void) -> ncclResult_t {
    let _ = ptr;
    run(|| {
        Err(Fail::usage("ncclMemFree frees what ncclMemAlloc gave, and this build gives nothing (host memory only)"))
    })
}

/// `ncclGroupSimulateEnd`: NCCL estimates a group's time from its GPU tuning model, which
/// OxCCL does not have.
#[no_mangle]
pub unsafe extern "C" fn ncclGroupSimulateEnd(sim_info: *mut c_void) -> ncclResult_t {
    let _ = sim_info;
    run(|| Err(Fail::usage("ncclGroupSimulateEnd: OxCCL has no GPU tuning model to simulate a group with")))
}

/// `ncclCommInitAll`: `ndev` ranks of one communicator in this process (a store in memory;
/// `devlist` is not used by host memory).
#[no_mangle]
pub unsafe extern "C" fn ncclCommInitAll(comms: *mut ncclComm_t, ndev: c_int, devlist: *const c_int) -> ncclResult_t {
    let _ = devlist;
    run(|| {
        let n = usize::try_from(ndev)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Fail::arg(format!("ndev {ndev} must be at least 1")))?;
        if comms.is_null() {
            return Err(Fail::arg("comm is NULL"));
        }
        let store: Arc<dyn oxccl::Store> = Arc::new(oxccl::MemStore::new());
        let cfg = config_for(None, n, None)?;
        let made: Vec<Result<Communicator, oxccl::Error>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let (store, cfg) = (store.clone(), cfg.clone());
                    s.spawn(move || Communicator::init(store, r, n, cfg))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(oxccl::Error::Internal("a rank's thread panicked".into()))))
                .collect()
        });
        let mut first = None;
        for (r, m) in made.into_iter().enumerate() {
            // SAFETY: comms has room for ndev handles (the caller's promise).
            let slot = unsafe { &mut *comms.add(r) };
            match m {
                Ok(c) => *slot = handle(Comm::new(c)),
                Err(e) => {
                    *slot = std::ptr::null_mut();
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => {
                for r in 0..n {
                    // SAFETY: as above; the handles made are freed (all or none).
                    unsafe {
                        let slot = &mut *comms.add(r);
                        if !slot.is_null() {
                            comm_of(*slot).map(|c| c.inner.abort()).ok();
                            free_handle(*slot);
                            *slot = std::ptr::null_mut();
                        }
                    }
                }
                Err(e.into())
            }
        }
    })
}

/// `ncclCommFinalize`: the orderly end of the communicator's operations (it may then only
/// be destroyed).
#[no_mangle]
pub unsafe extern "C" fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    with_comm(comm, |c| {
        c.finalized.store(true, Ordering::SeqCst);
        c.inner.close()?;
        Ok(())
    })
}

/// `ncclCommDestroy`: finalizes the communicator if that was not done, then frees it.
#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    run(|| {
        let c = comm_of(comm)?;
        let pending = GROUP.with(|g| {
            g.borrow().iter().any(|d| match d {
                Deferred::Coll { comm: r, .. }
                | Deferred::P2p { comm: r, .. }
                | Deferred::Split { comm: r, .. }
                | Deferred::Shrink { comm: r, .. } => std::ptr::eq(r.0, c),
                Deferred::Init { .. } => false,
            })
        });
        if pending {
            return Err(Fail::usage(
                "the communicator has operations in the open group: end the group before destroying it",
            ));
        }
        if !c.finalized.swap(true, Ordering::SeqCst) {
            // A failed communicator lets go at once; its error was reported already.
            let _ = c.inner.close();
        }
        // SAFETY: checked live above; the caller gives it up (NCCL: no call on it may run
        // meanwhile).
        unsafe { free_handle(comm) };
        Ok(())
    })
}

/// `ncclCommAbort`: ends every operation in flight (a call blocked on another thread
/// returns with an error) and lets go of the communicator's links, transports, NIC
/// endpoints and threads. The handle and the communicator's bookkeeping (a few kilobytes,
/// and its connection to the rendezvous store) are kept, marked dead, never freed: a call
/// still running on another thread may be reading them, and a later call on the handle is
/// told it is gone instead of reading freed memory.
#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    run(|| {
        let c = comm_of(comm)?;
        // Dead first: no new call starts on it.
        // SAFETY: checked live above; only the mark changes, the memory stays.
        unsafe { (*comm).magic.store(DEAD, Ordering::SeqCst) };
        c.inner.abort();
        c.finalized.store(true, Ordering::SeqCst);
        // Waits for a blocked call to come out (it ends at once: aborted), then lets go.
        let _ = c.inner.close();
        Ok(())
    })
}

/// `ncclCommSplit`: ranks of equal `color` form a communicator, ordered by `key`;
/// `NCCL_SPLIT_NOCOLOR` takes no part (`*newcomm` is NULL).
#[no_mangle]
pub unsafe extern "C" fn ncclCommSplit(
    comm: ncclComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut ncclComm_t,
    config: *mut ncclConfig_t,
) -> ncclResult_t {
    with_comm(comm, |c| {
        let o = out(newcomm, "newcomm")?;
        *o = std::ptr::null_mut();
        let color = match color {
            NCCL_SPLIT_NOCOLOR => None,
            c if c < 0 => return Err(Fail::arg(format!("color {c} is negative (NCCL_SPLIT_NOCOLOR is -1)"))),
            c => Some(c as u32),
        };
        let cfg = config_fields(config)?;
        // The class rules see the new communicator's name; its size is known only after the
        // split, so a size rule applies to the parent's.
        let conf = config_for(comm_name(cfg.as_ref()).as_deref(), c.inner.world_size(), Some(&c.inner))?;
        if in_group() {
            // Made at ncclGroupEnd, with the group's other splits (one thread may split
            // several ranks' communicators that way).
            defer(Deferred::Split {
                comm: CommRef(c),
                out: (newcomm as *mut u8).expose_provenance(),
                color,
                key,
                conf: Box::new(conf),
            });
            return Ok(());
        }
        if let Some(n) = c.inner.split_with_config(color, key as i64, conf)? {
            *o = handle(Comm::new(n));
        }
        Ok(())
    })
}

fn shrink(c: &Comm, excluded: &[usize], abort: bool) -> Result<Comm, Fail> {
    if abort {
        c.inner.abort();
    }
    Ok(Comm::new(c.inner.shrink(excluded)?))
}

/// `ncclCommShrink`: every rank but those listed (`NCCL_SHRINK_ABORT`: abort the parent's
/// operations first).
#[no_mangle]
pub unsafe extern "C" fn ncclCommShrink(
    comm: ncclComm_t,
    exclude: *mut c_int,
    exclude_count: c_int,
    newcomm: *mut ncclComm_t,
    config: *mut ncclConfig_t,
    flags: c_int,
) -> ncclResult_t {
    with_comm(comm, |c| {
        let o = out(newcomm, "newcomm")?;
        *o = std::ptr::null_mut();
        let n = usize::try_from(exclude_count)
            .map_err(|_| Fail::arg(format!("excludeRanksCount {exclude_count} is negative")))?;
        if n > 0 && exclude.is_null() {
            return Err(Fail::arg("excludeRanksList is NULL"));
        }
        // SAFETY: exclude holds n ints (the caller's promise).
        let list = if n == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(exclude, n) } };
        let excluded = list.iter().map(|&r| rank_arg(r, c, "excluded rank")).collect::<Result<Vec<_>, _>>()?;
        let _ = config_fields(config)?;
        let abort = flags & NCCL_SHRINK_ABORT != 0;
        if in_group() {
            defer(Deferred::Shrink {
                comm: CommRef(c),
                out: (newcomm as *mut u8).expose_provenance(),
                excluded,
                abort,
            });
            return Ok(());
        }
        *o = handle(shrink(c, &excluded, abort)?);
        Ok(())
    })
}

/// `ncclCommGetAsyncError`: the error that failed the communicator, or `ncclSuccess`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(comm: ncclComm_t, async_error: *mut ncclResult_t) -> ncclResult_t {
    with_comm(comm, |c| {
        let o = out(async_error, "asyncError")?;
        let mut e = c.async_error.load(Ordering::SeqCst);
        if e == ncclSuccess && c.inner.is_aborted() {
            // Failed by an operation whose error went elsewhere, or aborted.
            e = ncclRemoteError;
            set_last("the communicator failed or was aborted; the failing call's error says why");
        }
        *o = e;
        Ok(())
    })
}

/// `ncclCommCount`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    with_comm(comm, |c| {
        *out(count, "count")? = c.inner.world_size() as c_int;
        Ok(())
    })
}

/// `ncclCommUserRank`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    with_comm(comm, |c| {
        *out(rank, "rank")? = c.inner.rank() as c_int;
        Ok(())
    })
}

/// `ncclCommCuDevice`: these communicators move host memory; they have no CUDA device.
#[no_mangle]
pub unsafe extern "C" fn ncclCommCuDevice(comm: ncclComm_t, device: *mut c_int) -> ncclResult_t {
    with_comm(comm, |_| {
        let _ = out(device, "device")?;
        Err(Fail::usage("this communicator has no CUDA device: this build of OxCCL's NCCL library moves host memory"))
    })
}

/// `ncclGetErrorString`.
#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: ncclResult_t) -> *const c_char {
    result_str(result).as_ptr()
}

/// `ncclGetLastError`: this thread's last error (the communicator is not needed).
#[no_mangle]
pub extern "C" fn ncclGetLastError(comm: ncclComm_t) -> *const c_char {
    let _ = comm;
    LAST.try_with(|l| l.get() as *const c_char).unwrap_or(c"".as_ptr())
}

// ---------------------------------------------------------------------------------------
// Registration (accepted: OxCCL registers what it needs itself)

#[derive(Debug)]
struct Registered {
    magic: u64,
}

fn registration() -> *mut c_void {
    Box::into_raw(Box::new(Registered { magic: LIVE })) as *mut c_void
}

unsafe fn unregister(h: *mut c_void) -> Result<(), Fail> {
    let r = h as *mut Registered;
    // SAFETY: a non-null handle came from `registration` (the caller's promise); the magic
    // tells a handle given back twice.
    if r.is_null() || unsafe { (*r).magic } != LIVE {
        return Err(Fail::arg(
            "the handle is NULL, or was not made by this library's registration, or was given back already",
        ));
    }
    // SAFETY: as above.
    unsafe {
        (*r).magic = DEAD;
        drop(Box::from_raw(r));
    }
    Ok(())
}

/// `ncclCommRegister`: accepted; the handle is only given back.
#[no_mangle]
pub unsafe extern "C" fn ncclCommRegister(
    comm: ncclComm_t,
    buff: *mut c_void,
    size: usize,
    handle_out: *mut *mut c_void,
) -> ncclResult_t {
    let _ = (buff, size);
    with_comm(comm, |_| {
        *out(handle_out, "handle")? = registration();
        Ok(())
    })
}

/// `ncclCommDeregister`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommDeregister(comm: ncclComm_t, handle_in: *mut c_void) -> ncclResult_t {
    // SAFETY: forwarded.
    with_comm(comm, |_| unsafe { unregister(handle_in) })
}

/// `ncclCommWindowRegister`: accepted, as `ncclCommRegister`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommWindowRegister(
    comm: ncclComm_t,
    buff: *mut c_void,
    size: usize,
    win: *mut *mut c_void,
    flags: c_int,
) -> ncclResult_t {
    let _ = (buff, size, flags);
    with_comm(comm, |_| {
        *out(win, "win")? = registration();
        Ok(())
    })
}

/// `ncclCommWindowDeregister`.
#[no_mangle]
pub unsafe extern "C" fn ncclCommWindowDeregister(comm: ncclComm_t, win: *mut c_void) -> ncclResult_t {
    // SAFETY: forwarded.
    with_comm(comm, |_| unsafe { unregister(win) })
}

// ---------------------------------------------------------------------------------------
// Operators made at run time

/// `ncclRedOpCreatePreMulSum`.
#[no_mangle]
pub unsafe extern "C" fn ncclRedOpCreatePreMulSum(
    op: *mut c_int,
    scalar: *mut c_void,
    datatype: c_int,
    residence: c_int,
    comm: ncclComm_t,
) -> ncclResult_t {
    with_comm(comm, |c| {
        let o = out(op, "op")?;
        let dtype = dtype(datatype, true)?;
        if scalar.is_null() {
            return Err(Fail::arg("scalar is NULL"));
        }
        if matches!(kind_of(scalar), MemKind::Device(_)) {
            return Err(Fail::usage("the scalar is in GPU memory: this build moves host memory only"));
        }
        let scalar = match residence {
            ncclScalarHostImmediate => {
                // SAFETY: scalar points to one value of the type (the caller's promise).
                Scalar::Value(unsafe { std::slice::from_raw_parts(scalar as *const u8, dtype.size()) }.to_vec())
            }
            ncclScalarDevice => Scalar::At((scalar as *const u8).expose_provenance()),
            r => {
                return Err(Fail::arg(format!(
                    "residence {r} is neither ncclScalarDevice (0) nor ncclScalarHostImmediate (1)"
                )))
            }
        };
        let mut ops = c.ops.lock().unwrap_or_else(|e| e.into_inner());
        let i = match ops.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                ops.push(None);
                ops.len() - 1
            }
        };
        ops[i] = Some(PreMul { dtype, scalar });
        *o = NCCL_NUM_OPS + i as c_int;
        Ok(())
    })
}

/// `ncclRedOpDestroy`.
#[no_mangle]
pub unsafe extern "C" fn ncclRedOpDestroy(op: c_int, comm: ncclComm_t) -> ncclResult_t {
    with_comm(comm, |c| {
        let mut ops = c.ops.lock().unwrap_or_else(|e| e.into_inner());
        let slot = op
            .checked_sub(NCCL_NUM_OPS)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| ops.get_mut(i))
            .filter(|s| s.is_some());
        match slot {
            Some(s) => {
                *s = None;
                Ok(())
            }
            None => {
                Err(Fail::arg(format!("operator {op} was not made by ncclRedOpCreatePreMulSum on this communicator")))
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Collectives

/// `ncclAllReduce`.
#[no_mangle]
pub unsafe extern "C" fn ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    // The common case first, with nothing between the caller and the engine (a small
    // all_reduce's whole cost is a few hundred nanoseconds): a live communicator, a built-in
    // operator and type, host buffers, no group. Anything else takes the checked path below.
    if let (Some(c), Some(o), Ok(d), false) = (live(comm), builtin_op(op), dtype(datatype, true), in_group()) {
        let (sk, rk) = (kind_of(sendbuff), kind_of(recvbuff));
        if sk == MemKind::Host && rk == MemKind::Host {
            let s = RawBuf { addr: (sendbuff as *const u8).expose_provenance(), count, dtype: d, kind: sk };
            let r = RawBuf { addr: (recvbuff as *const u8).expose_provenance(), count, dtype: d, kind: rk };
            // SAFETY: as in `collective`. (No panic guard here: it cost 10 ns of the 8-byte
            // call's 370, measured. A panic, a bug, then ends the process, as Rust ends any
            // that unwinds out of a C function, instead of returning ncclInternalError.)
            return match unsafe { c.inner.call_raw(&RawCall::AllReduce { op: o }, s, r) } {
                Ok(()) => ncclSuccess,
                Err(e) => failed(c, e),
            };
        }
    }
    with_comm(comm, |c| {
        let d = dtype(datatype, true)?;
        let (s, r) = (buf(sendbuff, count, d)?, buf(recvbuff, count, d)?);
        let ready = reducing(c, op, |op| RawCall::AllReduce { op }, s, r, true)?;
        collective(c, Ready { stream, ..ready })
    })
}

/// `ncclBroadcast`: `sendbuff` is read on the root only.
#[no_mangle]
pub unsafe extern "C" fn ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    with_comm(comm, |c| {
        let d = dtype(datatype, false)?;
        let root = rank_arg(root, c, "root")?;
        let send = if c.inner.rank() == root { buf(sendbuff, count, d)? } else { RawBuf::none(d) };
        let recv = buf(recvbuff, count, d)?;
        collective(c, Ready { call: RawCall::Broadcast { root }, send, recv, _scratch: None, stream })
    })
}

/// `ncclBcast`: in place.
#[no_mangle]
pub unsafe extern "C" fn ncclBcast(
    buff: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    // SAFETY: forwarded.
    unsafe { ncclBroadcast(buff, buff, count, datatype, root, comm, stream) }
}

/// `ncclReduce`: `recvbuff` is written on the root only.
#[no_mangle]
pub unsafe extern "C" fn ncclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    with_comm(comm, |c| {
        let d = dtype(datatype, true)?;
        let root = rank_arg(root, c, "root")?;
        let recv = if c.inner.rank() == root { buf(recvbuff, count, d)? } else { RawBuf::none(d) };
        let ready = reducing(c, op, |op| RawCall::Reduce { op, root }, buf(sendbuff, count, d)?, recv, false)?;
        collective(c, Ready { stream, ..ready })
    })
}

/// `ncclAllGather`: `recvbuff` holds `nranks * sendcount` elements.
#[no_mangle]
pub unsafe extern "C" fn ncclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    with_comm(comm, |c| {
        let d = dtype(datatype, false)?;
        let total = total(sendcount, c)?;
        collective(
            c,
            Ready {
                call: RawCall::AllGather,
                send: buf(sendbuff, sendcount, d)?,
                recv: buf(recvbuff, total, d)?,
                _scratch: None,
                stream,
            },
        )
    })
}

/// `ncclReduceScatter`: `sendbuff` holds `nranks * recvcount` elements.
#[no_mangle]
pub unsafe extern "C" fn ncclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    op: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    with_comm(comm, |c| {
        let d = dtype(datatype, true)?;
        let total = total(recvcount, c)?;
        let ready = reducing(
            c,
            op,
            |op| RawCall::ReduceScatter { op },
            buf(sendbuff, total, d)?,
            buf(recvbuff, recvcount, d)?,
            false,
        )?;
        collective(c, Ready { stream, ..ready })
    })
}

/// `ncclAlltoAll`: `count` elements to and from each rank.
#[no_mangle]
pub unsafe extern "C" fn ncclAlltoAll(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    with_comm(comm, |c| {
        let d = dtype(datatype, false)?;
        let total = total(count, c)?;
        let (send, recv) = (buf(sendbuff, total, d)?, buf(recvbuff, total, d)?);
        let bytes = send.bytes().ok_or_else(|| Fail::arg("the buffers' size overflows"))?;
        // Buffers that overlap (in place): the blocks go out from a copy.
        let overlap =
            bytes > 0 && send.addr < recv.addr.saturating_add(bytes) && recv.addr < send.addr.saturating_add(bytes);
        if overlap && send.addr != 0 && (on_gpu(&send) || on_gpu(&recv)) {
            return Err(Fail::usage(
                "ncclAlltoAll with overlapping GPU buffers (in place): not supported yet; pass separate buffers",
            ));
        }
        if overlap && send.addr != 0 {
            let mut scratch = vec![0u8; bytes];
            // SAFETY: send is readable for `bytes` (the call's contract).
            unsafe { std::ptr::copy_nonoverlapping(send.ptr_const(), scratch.as_mut_ptr(), bytes) };
            let s = RawBuf { addr: scratch.as_ptr().expose_provenance(), kind: MemKind::Host, ..send };
            return collective(c, Ready { call: RawCall::AllToAll, send: s, recv, _scratch: Some(scratch), stream });
        }
        collective(c, Ready { call: RawCall::AllToAll, send, recv, _scratch: None, stream })
    })
}

fn total(count: usize, c: &Comm) -> Result<usize, Fail> {
    count.checked_mul(c.inner.world_size()).ok_or_else(|| Fail::arg(format!("count {count} times the ranks overflows")))
}

/// `ncclSend` and `ncclRecv`: the buffer, checked, to or from `peer`.
fn send_or_recv(
    send: bool,
    p: *const c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: ncclComm_t,
    stream: usize,
) -> ncclResult_t {
    with_comm(comm, |c| {
        let d = dtype(datatype, false)?;
        let peer = rank_arg(peer, c, "peer")?;
        point_to_point(c, send, buf(p, count, d)?, peer, stream)
    })
}

/// `ncclSend`.
#[no_mangle]
pub unsafe extern "C" fn ncclSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    send_or_recv(true, sendbuff, count, datatype, peer, comm, stream)
}

/// `ncclRecv`.
#[no_mangle]
pub unsafe extern "C" fn ncclRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: ncclComm_t,
    stream: *mut c_void,
) -> ncclResult_t {
    let stream = stream as usize;
    send_or_recv(false, recvbuff, count, datatype, peer, comm, stream)
}

/// `ncclGroupStart`: calls until the matching `ncclGroupEnd` are issued together then.
#[no_mangle]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    run(|| {
        DEPTH.with(|d| d.set(d.get() + 1));
        Ok(())
    })
}

/// `ncclGroupEnd`: the outermost one issues the group's calls and waits for them.
#[no_mangle]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    run(|| {
        let ops = match DEPTH.with(|d| d.get()) {
            0 => return Err(Fail::usage("ncclGroupEnd without ncclGroupStart")),
            1 => {
                DEPTH.with(|d| d.set(0));
                Some(GROUP.with(|g| std::mem::take(&mut *g.borrow_mut())))
            }
            n => {
                DEPTH.with(|d| d.set(n - 1));
                None
            }
        };
        let failed = if ops.is_some() { GROUP_ERR.with(|e| e.borrow_mut().take()) } else { None };
        match (ops, failed) {
            // A call of the group failed: nothing of it is issued (its communicators were
            // not made; its operations would leave the peers waiting), and the error is the
            // group's.
            (Some(_), Some(f)) => Err(Fail { msg: format!("the group was not issued: {}", f.msg), ..f }),
            (Some(ops), None) => end_group(ops),
            (None, _) => Ok(()),
        }
    })
}
