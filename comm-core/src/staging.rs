//! GPU data over a link that moves host memory: **GPU data staged through host memory**.
//!
//! A transport whose links move host memory only (host-staging's shared-memory ring,
//! net-tcp, net-libfabric without FI_HMEM) carries device buffers through a [`StagedLink`]
//! around its link. A device message is cut into pieces; each piece is copied by the GPU's
//! copy engine into a page-locked (pinned) bounce buffer (device to host), sent from there
//! over the host link, received into a pinned bounce buffer on the other side and copied to
//! the device (host to device), or reduced into device memory by a GPU kernel that reads
//! the bounce buffer. Several bounce buffers per direction keep the stages busy at once:
//! while piece *i* crosses the host link, piece *i+1* is being copied off the GPU and piece
//! *i-1* onto the other GPU.
//!
//! The copies are started through [`DeviceCopies`] (CUDA streams and events in the `cuda`
//! feature; a simulated device in tests), which is all this module knows of a GPU: the
//! pipelining and ordering logic is written once, here, and tested without a GPU.
//!
//! **The rule both sides follow.** A message of `n` bytes is sent as `k = max(1, ⌈n / P⌉)`
//! pieces of the host link (`P`, the piece size, the same on every rank): the first piece
//! holds the remainder (`n - (k-1)·P` bytes), the others `P` bytes each. Every piece but the
//! last carries the message's tag with [`CONTINUED`] set. The rule depends on the length
//! only, never on the kind of memory, so a device buffer on one side and a host buffer on
//! the other agree, and host buffers go as pieces of the user's own memory (no copy). A
//! receive of another length fails: the first pieces differ in length unless the two lengths
//! differ by a multiple of `P`, and then the last piece of one side meets a piece of the
//! other that is not last (its tag differs).
//!
//! Order: sends reach the host link in the order they were posted, piece after piece,
//! whatever their memory (a host piece waits behind a device piece being copied); receives
//! complete in posting order.

use std::collections::VecDeque;
use std::fmt;

use crate::dtype::{DataType, ReduceOp};
use crate::error::{Error, Result};
use crate::link::{Link, MemSlice, RecvMode, Tag, TransportKind};
use crate::mem::{MemKind, Scratch};

/// Set in the tag of every piece of a staged message but the last (the top bit of the
/// sequence number: operations never count that far).
pub const CONTINUED: u64 = 1 << 39;

/// Default piece size: 1 MiB.
pub const DEFAULT_PIECE: usize = 1 << 20;
/// Default number of bounce buffers per direction.
pub const DEFAULT_SLOTS: usize = 4;

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device to pinned host memory (before a send).
    ToHost,
    /// Pinned host memory to device (after a receive), plain or reducing.
    ToDevice,
}

/// Asynchronous copies between one GPU's memory and pinned host memory, as its copy engines
/// do them: each direction is an ordered queue (a CUDA stream), so copies of one direction
/// complete in the order they were started.
///
/// # Safety
/// Implementations start copies that outlive the call: the caller keeps both ranges valid
/// and untouched until [`DeviceCopies::completed`] counts the copy, and the implementation's
/// `Drop` waits for the copies it started (so dropping it before the memory is enough).
pub trait DeviceCopies: Send + fmt::Debug {
    /// The GPU, in words ("GPU 0 (NVIDIA H200)").
    fn describe(&self) -> String;
    /// Page-locked host memory of at least `bytes`, that this GPU copies from and to
    /// directly and its kernels can read.
    fn pinned(&self, bytes: usize) -> Result<Scratch>;
    /// Starts copying `len` bytes of device memory at `src` to pinned memory at `dst`, after
    /// every copy of [`Dir::ToHost`] started before. Returns its number in that direction
    /// (0, 1, 2, ...).
    ///
    /// # Safety
    /// `src` is device memory of this GPU, `dst` pinned memory from [`DeviceCopies::pinned`];
    /// both stay valid and untouched until the copy is counted complete.
    unsafe fn to_host(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64>;
    /// Starts copying `len` bytes of pinned memory at `src` to device memory at `dst` (in
    /// order with every [`Dir::ToDevice`] copy). Returns its number in that direction.
    ///
    /// # Safety
    /// As for [`DeviceCopies::to_host`], the other way.
    unsafe fn to_device(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64>;
    /// Starts `dst[i] = local[i] op src[i]` over `count` elements of `dtype`, `dst` and
    /// `local` in device memory (`local` may be `dst`), `src` pinned; ordered with the
    /// [`Dir::ToDevice`] copies. Returns its number in that direction.
    ///
    /// # Safety
    /// As for [`DeviceCopies::to_device`]; `local` is valid device memory of `count` elements.
    unsafe fn reduce_to_device(
        &self,
        dtype: DataType,
        op: ReduceOp,
        dst: *mut u8,
        local: *const u8,
        src: *const u8,
        count: usize,
    ) -> Result<u64>;
    /// How many copies of `dir` have completed (they complete in order). Never blocks.
    fn completed(&self, dir: Dir) -> Result<u64>;
}

/// Makes the copier of GPU `ordinal` for one link: called once, at the link's first device
/// buffer (a rank's GPU buffers are on one GPU, as NCCL's communicator is bound to one).
pub type DeviceSource = Box<dyn FnMut(u32) -> Result<Box<dyn DeviceCopies>> + Send>;

/// Pieces, bounce buffers and memory of a [`StagedLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staging {
    /// Piece size in bytes (a multiple of 16; the same on every rank).
    pub piece: usize,
    /// Bounce buffers per direction (at least 1; 2 or more overlap the stages).
    pub slots: usize,
}

impl Default for Staging {
    fn default() -> Self {
        Staging { piece: DEFAULT_PIECE, slots: DEFAULT_SLOTS }
    }
}

impl Staging {
    /// Checks the values, with an error naming what is wrong.
    pub fn check(&self) -> Result<()> {
        if self.piece < 4096 || self.piece % 16 != 0 {
            return Err(Error::invalid_usage(format!(
                "the staging piece must be a multiple of 16 bytes, at least 4 KiB; got {} bytes",
                self.piece
            )));
        }
        if self.slots == 0 || self.slots > 64 {
            return Err(Error::invalid_usage(format!(
                "the number of staging buffers must be 1 to 64; got {}",
                self.slots
            )));
        }
        Ok(())
    }

    /// How many pieces a message of `n` bytes goes as.
    pub fn pieces(&self, n: usize) -> usize {
        n.div_ceil(self.piece).max(1)
    }

    /// Offset and length of piece `i` of a message of `n` bytes (the first holds the
    /// remainder).
    pub fn piece_at(&self, n: usize, i: usize) -> (usize, usize) {
        let k = self.pieces(n);
        let first = n - (k - 1) * self.piece;
        if i == 0 {
            (0, first)
        } else {
            (first + (i - 1) * self.piece, self.piece)
        }
    }

    /// The tag of piece `i` of `k`.
    pub fn piece_tag(tag: Tag, i: usize, k: usize) -> Tag {
        if i + 1 < k {
            Tag(tag.0 ^ CONTINUED)
        } else {
            tag
        }
    }

    /// Pinned memory a link holds once it has moved device data: both directions' buffers.
    pub fn pinned_bytes(&self) -> usize {
        2 * self.slots * self.piece
    }
}

fn is_device(s: &MemSlice) -> bool {
    matches!(s.kind(), MemKind::Device(_))
}

/// An empty slice of host memory (what a zero-length piece is, whatever the buffer's kind).
fn empty() -> MemSlice {
    // SAFETY: an empty slice is valid anywhere.
    unsafe { MemSlice::new(std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8, 0) }
}

/// A slice of `s` (same kind).
fn sub(s: &MemSlice, off: usize, len: usize) -> MemSlice {
    debug_assert!(off + len <= s.len());
    // SAFETY: a part of a slice whose owner promised it valid for the operation.
    unsafe { MemSlice::new_in(s.ptr().wrapping_add(off), len, s.kind()) }
}

/// Bounce buffers of one direction, allocated on first use.
struct Slots {
    mem: Option<Scratch>,
    free: Vec<usize>,
}

impl Slots {
    fn new() -> Slots {
        Slots { mem: None, free: Vec::new() }
    }
    /// A free buffer's index and address, allocating them all on first use.
    fn take(&mut self, dev: &dyn DeviceCopies, st: &Staging) -> Result<Option<(usize, *mut u8)>> {
        if self.mem.is_none() {
            self.mem = Some(dev.pinned(st.slots * st.piece)?);
            self.free = (0..st.slots).rev().collect();
        }
        let base = self.mem.as_ref().map_or(std::ptr::null_mut(), |m| m.ptr());
        Ok(self.free.pop().map(|i| (i, base.wrapping_add(i * st.piece))))
    }
}

/// A send as posted.
struct OutMsg {
    tag: Tag,
    src: MemSlice,
    pieces: usize,
    /// Pieces handed to the copy engine or queued for the host link.
    started: usize,
    /// Pieces posted to the host link, and the host link's number of the last one.
    posted: usize,
    last: u64,
}

/// A piece ready for the host link once its copy (if any) completes.
struct Ready {
    copy: Option<u64>,
    slot: Option<usize>,
    tag: Tag,
    data: MemSlice,
    /// Which send (counted from the first ever posted).
    msg: u64,
}

/// A receive as posted.
struct InMsg {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    pieces: usize,
    /// Pieces posted to the host link.
    posted: usize,
    /// Pieces whose bytes are in `dst`.
    landed: usize,
}

/// A piece receive posted to the host link.
struct Incoming {
    seq: u64,
    msg: u64,
    /// A bounce buffer (device destination): where the piece lands, and the part of the
    /// destination it goes to.
    slot: Option<(usize, *mut u8)>,
    off: usize,
    len: usize,
}

/// A link that carries device buffers over a link that moves host memory, staging them
/// through pinned bounce buffers (see the module's documentation). Host buffers go through
/// as pieces of themselves.
pub struct StagedLink {
    // Declared before the bounce buffers: dropping it waits for the copies it started.
    dev: Option<Box<dyn DeviceCopies>>,
    /// The GPU `dev` copies for, and where a copier comes from.
    ordinal: Option<u32>,
    source: Option<DeviceSource>,
    inner: Box<dyn Link>,
    st: Staging,
    out_slots: Slots,
    in_slots: Slots,
    sends: VecDeque<OutMsg>,
    /// Index (from the first send ever) of `sends[0]`.
    sends_base: u64,
    /// The first send with pieces not yet started.
    start_at: usize,
    ready: VecDeque<Ready>,
    /// Host-link sends posted, with the bounce buffer each holds.
    on_link: VecDeque<(u64, Option<usize>)>,
    recvs: VecDeque<InMsg>,
    recvs_base: u64,
    post_at: usize,
    incoming: VecDeque<Incoming>,
    /// Copies to the device started: (its number, the buffer, which receive).
    landing: VecDeque<(u64, usize, u64)>,
    posted: [u64; 2],
    done: [u64; 2],
}

// SAFETY: the raw pointers inside are addresses of memory the poster promised valid (see
// `MemSlice`) or of the link's own bounce buffers; the link is used by one thread at a time.
unsafe impl Send for Incoming {}
// SAFETY: as above.
unsafe impl Send for Ready {}

impl fmt::Debug for StagedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagedLink")
            .field("peer", &self.inner.peer())
            .field("over", &self.inner.kind())
            .field("device", &self.dev.as_ref().map(|d| d.describe()))
            .field("staging", &self.st)
            .finish_non_exhaustive()
    }
}

impl StagedLink {
    /// Wraps `inner`. `source` makes the copier of this rank's GPU at the first device
    /// buffer; without one (a rank with no GPU talking to a rank with one), host buffers still
    /// go by the same rule and a device buffer is an error.
    pub fn new(inner: Box<dyn Link>, source: Option<DeviceSource>, st: Staging) -> Result<StagedLink> {
        st.check()?;
        Ok(StagedLink {
            dev: None,
            ordinal: None,
            source,
            inner,
            st,
            out_slots: Slots::new(),
            in_slots: Slots::new(),
            sends: VecDeque::new(),
            sends_base: 0,
            start_at: 0,
            ready: VecDeque::new(),
            on_link: VecDeque::new(),
            recvs: VecDeque::new(),
            recvs_base: 0,
            post_at: 0,
            incoming: VecDeque::new(),
            landing: VecDeque::new(),
            posted: [0, 0],
            done: [0, 0],
        })
    }

    /// The link it wraps.
    pub fn inner(&self) -> &dyn Link {
        &*self.inner
    }

    fn no_device(&self, what: &str) -> Error {
        Error::invalid_usage(format!(
            "{what} is in GPU memory, but this rank's link to rank {} has no GPU to stage it through (no GPU \
             was found here, or OXCCL_GPU=off)",
            self.inner.peer()
        ))
    }

    /// Makes sure a copier for `s`'s GPU is there (a device buffer), or says why not.
    fn device_for(&mut self, s: &MemSlice, what: &str) -> Result<()> {
        let MemKind::Device(n) = s.kind() else { return Ok(()) };
        if s.is_empty() {
            return Ok(());
        }
        match self.ordinal {
            Some(o) if o == n => Ok(()),
            Some(o) => Err(Error::invalid_usage(format!(
                "{what} is in memory of GPU {n}, but this rank's GPU data goes through GPU {o}: the GPU buffers of a \
                 communicator must be on one GPU, as NCCL's"
            ))),
            None => {
                let Some(source) = self.source.as_mut() else { return Err(self.no_device(what)) };
                self.dev = Some(source(n)?);
                self.ordinal = Some(n);
                Ok(())
            }
        }
    }

    /// Starts copies and queues pieces for the host link, in posting order, as far as the
    /// bounce buffers allow.
    fn start_sends(&mut self) -> Result<usize> {
        let mut work = 0;
        while self.start_at < self.sends.len() {
            let msg = self.sends_base + self.start_at as u64;
            let s = &mut self.sends[self.start_at];
            while s.started < s.pieces {
                let (off, len) = self.st.piece_at(s.src.len(), s.started);
                let tag = Staging::piece_tag(s.tag, s.started, s.pieces);
                if !is_device(&s.src) || len == 0 {
                    let data = if len == 0 { empty() } else { sub(&s.src, off, len) };
                    self.ready.push_back(Ready { copy: None, slot: None, tag, data, msg });
                } else {
                    let dev = self.dev.as_deref().expect("checked when posted");
                    let Some((slot, at)) = self.out_slots.take(dev, &self.st)? else {
                        return Ok(work);
                    };
                    // SAFETY: `src` is device memory valid until this send completes, which
                    // is after the copy and the host link's send; the slot is ours until the
                    // host link has sent it.
                    let copy = unsafe { dev.to_host(at, s.src.ptr().wrapping_add(off), len)? };
                    // SAFETY: the slot's bytes, pinned host memory.
                    let data = unsafe { MemSlice::new_in(at, len, MemKind::PinnedHost) };
                    self.ready.push_back(Ready { copy: Some(copy), slot: Some(slot), tag, data, msg });
                }
                s.started += 1;
                work += 1;
            }
            self.start_at += 1;
        }
        Ok(work)
    }

    /// Posts to the host link the pieces whose copies are done, in order.
    fn post_ready(&mut self) -> Result<usize> {
        let mut work = 0;
        let copied = match &self.dev {
            Some(d) if self.ready.iter().any(|r| r.copy.is_some()) => d.completed(Dir::ToHost)?,
            _ => 0,
        };
        while let Some(r) = self.ready.front() {
            if r.copy.is_some_and(|c| c >= copied) {
                break;
            }
            let r = self.ready.pop_front().expect("checked");
            let seq = self.inner.post_send(r.tag, r.data)?;
            let s = &mut self.sends[(r.msg - self.sends_base) as usize];
            s.posted += 1;
            s.last = seq;
            self.on_link.push_back((seq, r.slot));
            work += 1;
        }
        Ok(work)
    }

    /// Frees the bounce buffers the host link has sent and counts the sends done.
    fn finish_sends(&mut self) -> usize {
        let sent = self.inner.sends_done();
        let mut work = 0;
        while let Some(&(seq, slot)) = self.on_link.front() {
            if seq >= sent {
                break;
            }
            self.on_link.pop_front();
            if let Some(i) = slot {
                self.out_slots.free.push(i);
            }
        }
        while let Some(s) = self.sends.front() {
            if s.posted < s.pieces || s.last >= sent {
                break;
            }
            self.sends.pop_front();
            self.sends_base += 1;
            self.start_at = self.start_at.saturating_sub(1);
            self.done[0] += 1;
            work += 1;
        }
        work
    }

    /// Posts piece receives to the host link, in order, as far as the bounce buffers allow.
    fn post_recvs(&mut self) -> Result<usize> {
        let mut work = 0;
        while self.post_at < self.recvs.len() {
            let msg = self.recvs_base + self.post_at as u64;
            let r = &mut self.recvs[self.post_at];
            let device = is_device(&r.dst);
            while r.posted < r.pieces {
                let (off, len) = self.st.piece_at(r.dst.len(), r.posted);
                let tag = Staging::piece_tag(r.tag, r.posted, r.pieces);
                let (seq, slot) = if len == 0 {
                    (self.inner.post_recv(tag, empty(), RecvMode::Copy)?, None)
                } else if !device {
                    let mode = match r.mode {
                        RecvMode::Copy => RecvMode::Copy,
                        RecvMode::Reduce { dtype, op, local, mem } => {
                            RecvMode::Reduce { dtype, op, local: sub(&local, off, len), mem }
                        }
                    };
                    (self.inner.post_recv(tag, sub(&r.dst, off, len), mode)?, None)
                } else {
                    let dev = self.dev.as_deref().expect("checked when posted");
                    let Some((slot, at)) = self.in_slots.take(dev, &self.st)? else {
                        return Ok(work);
                    };
                    // SAFETY: the slot's bytes, ours until its copy to the device is done.
                    let land = unsafe { MemSlice::new_in(at, len, MemKind::PinnedHost) };
                    (self.inner.post_recv(tag, land, RecvMode::Copy)?, Some((slot, at)))
                };
                self.incoming.push_back(Incoming { seq, msg, slot, off, len });
                r.posted += 1;
                work += 1;
            }
            self.post_at += 1;
        }
        Ok(work)
    }

    /// Starts the copies to the device of the pieces the host link delivered, frees the
    /// buffers whose copies are done and counts the receives done.
    fn finish_recvs(&mut self) -> Result<usize> {
        let mut work = 0;
        let got = self.inner.recvs_done();
        while let Some(inc) = self.incoming.front() {
            if inc.seq >= got {
                break;
            }
            let inc = self.incoming.pop_front().expect("checked");
            let r = &mut self.recvs[(inc.msg - self.recvs_base) as usize];
            match inc.slot {
                None => r.landed += 1,
                Some((slot, at)) => {
                    let dev = self.dev.as_deref().expect("a slot means a device");
                    let dst = r.dst.ptr().wrapping_add(inc.off);
                    // SAFETY: `dst` (and `local`) are device memory promised valid until this
                    // receive completes, which waits for this copy; the slot holds the piece.
                    let n = unsafe {
                        match r.mode {
                            RecvMode::Copy => dev.to_device(dst, at, inc.len)?,
                            RecvMode::Reduce { dtype, op, local, .. } => dev.reduce_to_device(
                                dtype,
                                op,
                                dst,
                                local.ptr().wrapping_add(inc.off),
                                at,
                                inc.len / dtype.size(),
                            )?,
                        }
                    };
                    self.landing.push_back((n, slot, inc.msg));
                }
            }
            work += 1;
        }
        if !self.landing.is_empty() {
            let copied = self.dev.as_deref().expect("copies need a device").completed(Dir::ToDevice)?;
            while let Some(&(n, slot, msg)) = self.landing.front() {
                if n >= copied {
                    break;
                }
                self.landing.pop_front();
                self.in_slots.free.push(slot);
                self.recvs[(msg - self.recvs_base) as usize].landed += 1;
                work += 1;
            }
        }
        while let Some(r) = self.recvs.front() {
            if r.landed < r.pieces {
                break;
            }
            self.recvs.pop_front();
            self.recvs_base += 1;
            self.post_at = self.post_at.saturating_sub(1);
            self.done[1] += 1;
            work += 1;
        }
        Ok(work)
    }
}

impl Link for StagedLink {
    fn peer(&self) -> usize {
        self.inner.peer()
    }
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.device_for(&src, "a send buffer")?;
        let pieces = self.st.pieces(src.len());
        self.sends.push_back(OutMsg { tag, src, pieces, started: 0, posted: 0, last: 0 });
        self.posted[0] += 1;
        Ok(self.posted[0] - 1)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        crate::link::check_reducing_recv(&dst, &mode)?;
        self.device_for(&dst, "a receive buffer")?;
        let pieces = self.st.pieces(dst.len());
        self.recvs.push_back(InMsg { tag, dst, mode, pieces, posted: 0, landed: 0 });
        self.posted[1] += 1;
        Ok(self.posted[1] - 1)
    }
    fn progress(&mut self) -> Result<usize> {
        let mut work = self.start_sends()?;
        work += self.post_ready()?;
        work += self.post_recvs()?;
        work += self.inner.progress()?;
        work += self.finish_sends();
        work += self.finish_recvs()?;
        // Buffers freed by this round can take the next pieces at once.
        work += self.start_sends()?;
        work += self.post_ready()?;
        work += self.post_recvs()?;
        Ok(work)
    }
    fn sends_done(&self) -> u64 {
        self.done[0]
    }
    fn recvs_done(&self) -> u64 {
        self.done[1]
    }
    fn wait_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        self.inner.wait_fds(out)
    }
    fn busy_unsignalled(&self) -> bool {
        // Copies of the GPU in flight: their completion rings no bell.
        self.ready.iter().any(|r| r.copy.is_some()) || !self.landing.is_empty() || self.inner.busy_unsignalled()
    }
    fn close(&mut self, deadline: std::time::Instant) {
        self.inner.close(deadline)
    }
    fn op_end(&mut self) {
        self.inner.op_end()
    }
}

/// A simulated GPU for tests: "device memory" is host memory labelled [`MemKind::Device`],
/// and copies are done late: a copy is carried out only when [`DeviceCopies::completed`]
/// has been asked about it a pseudo-random number of times (0 to `max_delay`), so a piece
/// sent before its copy is done carries stale bytes and a test sees it.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::{DeviceCopies, Dir};
    use crate::dtype::{DataType, ReduceOp};
    use crate::error::Result;
    use crate::mem::{LocalMem, MemKinds, Scratch, HOST};

    /// An operation waiting to be carried out: a copy, or a reduction `dst = local op src`.
    #[derive(Debug)]
    struct Pending {
        dst: usize,
        local: usize,
        src: usize,
        len: usize,
        reduce: Option<(DataType, ReduceOp)>,
        delay: u32,
    }

    /// One in-order queue of a simulated GPU (a stream): each operation is carried out only
    /// after [`LateOps::completed`] has been asked a pseudo-random number of times (0 to
    /// `max_delay`), and the first not yet due holds back those behind it. Dropping it carries
    /// out what is left (as a real stream is synchronised before its memory goes).
    #[derive(Debug)]
    pub struct LateOps {
        /// (started, done, waiting)
        q: Mutex<(u64, u64, VecDeque<Pending>)>,
        rng: Mutex<u64>,
        max_delay: u32,
        most: AtomicUsize,
    }

    impl LateOps {
        /// Delays drawn from `seed`, from 0 to `max_delay` questions.
        pub fn new(seed: u64, max_delay: u32) -> LateOps {
            LateOps {
                q: Mutex::new((0, 0, VecDeque::new())),
                rng: Mutex::new(seed | 1),
                max_delay,
                most: AtomicUsize::new(0),
            }
        }

        /// Starts `dst = src` (`len` bytes), or with `reduce`, `dst = local op src` (`len`
        /// elements); returns its number.
        ///
        /// # Safety
        /// The ranges stay valid until [`LateOps::completed`] counts it.
        pub unsafe fn start(
            &self,
            dst: *mut u8,
            local: *const u8,
            src: *const u8,
            len: usize,
            reduce: Option<(DataType, ReduceOp)>,
        ) -> u64 {
            let delay = {
                let mut s = self.rng.lock().expect("rng");
                *s ^= *s << 13;
                *s ^= *s >> 7;
                *s ^= *s << 17;
                (*s % (self.max_delay as u64 + 1)) as u32
            };
            let mut q = self.q.lock().expect("queue");
            q.2.push_back(Pending { dst: dst as usize, local: local as usize, src: src as usize, len, reduce, delay });
            self.most.fetch_max(q.2.len(), Ordering::Relaxed);
            q.0 += 1;
            q.0 - 1
        }

        /// How many have been carried out (in order); carries out those that are due.
        pub fn completed(&self) -> u64 {
            let mut q = self.q.lock().expect("queue");
            while let Some(p) = q.2.front_mut() {
                if p.delay > 0 {
                    p.delay -= 1;
                    break;
                }
                let p = q.2.pop_front().expect("checked");
                // SAFETY: the starter promised the ranges valid until this is counted, now.
                unsafe {
                    match p.reduce {
                        None => std::ptr::copy_nonoverlapping(p.src as *const u8, p.dst as *mut u8, p.len),
                        Some((d, op)) => {
                            HOST.reduce(d, op, p.dst as *mut u8, p.local as *const u8, p.src as *const u8, p.len)
                        }
                    }
                }
                q.1 += 1;
            }
            q.1
        }

        /// The most operations that waited at once.
        pub fn most_in_flight(&self) -> usize {
            self.most.load(Ordering::Relaxed)
        }
    }

    impl Drop for LateOps {
        fn drop(&mut self) {
            while self.q.lock().map_or(0, |q| q.2.len()) > 0 {
                self.completed();
            }
        }
    }

    /// The simulated GPU: one [`LateOps`] per direction.
    #[derive(Debug)]
    pub struct FakeGpu {
        queues: [LateOps; 2],
        /// Pinned bytes handed out.
        pub pinned: AtomicUsize,
    }

    impl FakeGpu {
        /// A device whose copies complete after 0 to `max_delay` questions, drawn from `seed`.
        pub fn new(seed: u64, max_delay: u32) -> FakeGpu {
            FakeGpu {
                queues: [LateOps::new(seed, max_delay), LateOps::new(seed.wrapping_mul(31), max_delay)],
                pinned: AtomicUsize::new(0),
            }
        }
        /// The most copies of one direction that were in flight at once.
        pub fn most_in_flight(&self) -> usize {
            self.queues.iter().map(LateOps::most_in_flight).max().unwrap_or(0)
        }
    }

    impl DeviceCopies for FakeGpu {
        fn describe(&self) -> String {
            "simulated GPU".into()
        }
        fn pinned(&self, bytes: usize) -> Result<Scratch> {
            self.pinned.fetch_add(bytes, Ordering::Relaxed);
            HOST.scratch(bytes)
        }
        unsafe fn to_host(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
            // SAFETY: forwarded contract.
            Ok(unsafe { self.queues[Dir::ToHost as usize].start(dst, std::ptr::null(), src, len, None) })
        }
        unsafe fn to_device(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
            // SAFETY: forwarded contract.
            Ok(unsafe { self.queues[Dir::ToDevice as usize].start(dst, std::ptr::null(), src, len, None) })
        }
        unsafe fn reduce_to_device(
            &self,
            dtype: DataType,
            op: ReduceOp,
            dst: *mut u8,
            local: *const u8,
            src: *const u8,
            count: usize,
        ) -> Result<u64> {
            // SAFETY: forwarded contract.
            Ok(unsafe { self.queues[Dir::ToDevice as usize].start(dst, local, src, count, Some((dtype, op))) })
        }
        fn completed(&self, dir: Dir) -> Result<u64> {
            Ok(self.queues[dir as usize].completed())
        }
    }

    /// The local memory work of the simulated GPU's "device memory" (host kernels).
    #[derive(Debug)]
    pub struct FakeDeviceMem;

    /// The one value of it.
    pub static FAKE_DEVICE_MEM: FakeDeviceMem = FakeDeviceMem;

    impl LocalMem for FakeDeviceMem {
        fn kinds(&self) -> MemKinds {
            MemKinds::ALL
        }
        unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
            // SAFETY: the caller's contract.
            unsafe { HOST.copy(dst, src, len) }
        }
        unsafe fn reduce(&self, dtype: DataType, op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, n: usize) {
            // SAFETY: the caller's contract.
            unsafe { HOST.reduce(dtype, op, dst, a, b, n) }
        }
        unsafe fn scale(&self, dtype: DataType, dst: *mut u8, count: usize, n: usize) {
            // SAFETY: the caller's contract.
            unsafe { HOST.scale(dtype, dst, count, n) }
        }
        fn scratch(&self, bytes: usize) -> Result<Scratch> {
            HOST.scratch(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeGpu, FAKE_DEVICE_MEM};
    use super::*;
    use crate::conformance::{self, LinkPair};
    use crate::mem::{LocalMem, HOST};
    use crate::sim::SimWorld;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    const PIECE: usize = 64 << 10;

    /// A source of simulated GPUs (GPU 0 only).
    fn fake_source(seed: u64, max_delay: u32) -> Option<DeviceSource> {
        Some(Box::new(move |n| {
            assert_eq!(n, 0, "the tests use GPU 0");
            Ok(Box::new(FakeGpu::new(seed, max_delay)) as Box<dyn DeviceCopies>)
        }))
    }

    /// Pairs of staged links over the simulator, both sides' buffers of `kind`.
    struct Pairs {
        kind: MemKind,
        slots: usize,
        seed: u64,
    }

    impl LinkPair for Pairs {
        fn name(&self) -> String {
            format!("GPU data staged through host memory ({} buffers, {} per direction)", self.kind, self.slots)
        }
        fn piece(&self) -> usize {
            PIECE
        }
        fn memory(&self) -> (MemKind, &'static dyn LocalMem) {
            match self.kind {
                MemKind::Device(_) => (self.kind, &FAKE_DEVICE_MEM),
                _ => (self.kind, &HOST),
            }
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            self.seed += 1;
            let (a, b) = SimWorld::new(2, 4).pair(0, 1);
            let st = Staging { piece: PIECE, slots: self.slots };
            let gpu = |s| fake_source(s, 3);
            (
                Box::new(StagedLink::new(Box::new(a), gpu(self.seed), st).unwrap()),
                Box::new(StagedLink::new(Box::new(b), gpu(self.seed * 7), st).unwrap()),
            )
        }
    }

    #[test]
    fn staged_links_keep_the_link_contract_for_device_and_host_buffers() {
        for slots in [1, 2, 4] {
            conformance::run(&mut Pairs { kind: MemKind::Device(0), slots, seed: slots as u64 });
        }
        conformance::run(&mut Pairs { kind: MemKind::Host, slots: 2, seed: 9 });
    }

    #[test]
    fn the_piece_rule() {
        let st = Staging { piece: 4096, slots: 2 };
        assert_eq!(st.pieces(0), 1);
        assert_eq!(st.piece_at(0, 0), (0, 0));
        assert_eq!(st.pieces(4096), 1);
        assert_eq!(st.pieces(4097), 2);
        assert_eq!(st.piece_at(4097, 0), (0, 1));
        assert_eq!(st.piece_at(4097, 1), (1, 4096));
        assert_eq!(st.piece_at(10_000, 0), (0, 10_000 - 2 * 4096));
        assert_eq!(st.piece_at(10_000, 2), (10_000 - 4096, 4096));
        assert_eq!(Staging::piece_tag(Tag(5), 0, 2), Tag(5 ^ CONTINUED));
        assert_eq!(Staging::piece_tag(Tag(5), 1, 2), Tag(5));
        assert!(Staging { piece: 1000, slots: 2 }.check().is_err());
        assert!(Staging { piece: 4096, slots: 0 }.check().is_err());
        assert!(Staging::default().check().is_ok());
    }

    fn dev_slice(v: &mut [u8]) -> MemSlice {
        // SAFETY: every test keeps its buffers alive until its links are dropped.
        unsafe { MemSlice::new_in(v.as_mut_ptr(), v.len(), MemKind::Device(0)) }
    }
    fn host_slice(v: &mut [u8]) -> MemSlice {
        // SAFETY: as above.
        unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) }
    }

    fn drive(a: &mut dyn Link, b: &mut dyn Link, n_a: u64, n_b: u64) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while a.sends_done() < n_a || b.recvs_done() < n_b {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end, "stuck: {} sends, {} receives", a.sends_done(), b.recvs_done());
        }
    }

    /// A device buffer on one side and a host buffer on the other agree (the rule depends on
    /// the length only), both ways, and every piece's bytes are the right ones.
    #[test]
    fn device_on_one_side_host_on_the_other() {
        for (dev_sends, n) in [(true, 5 * PIECE + 123), (false, 3 * PIECE), (true, 17), (false, PIECE + 1)] {
            let (a, b) = SimWorld::new(2, 2).pair(0, 1);
            let st = Staging { piece: PIECE, slots: 2 };
            let gpu = || fake_source(n as u64, 4);
            let mut a = StagedLink::new(Box::new(a), gpu(), st).unwrap();
            let mut b = StagedLink::new(Box::new(b), gpu(), st).unwrap();
            let mut src: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; n];
            let (s, d) = if dev_sends {
                (dev_slice(&mut src), host_slice(&mut dst))
            } else {
                (host_slice(&mut src), dev_slice(&mut dst))
            };
            a.post_send(Tag(3), s).unwrap();
            b.post_recv(Tag(3), d, RecvMode::Copy).unwrap();
            drive(&mut a, &mut b, 1, 1);
            drop((a, b));
            assert!(src == dst, "{n} bytes, device sends: {dev_sends}");
        }
    }

    /// Several bounce buffers keep several copies in flight (the stages overlap); one buffer
    /// keeps one; the pinned memory is what the settings say, allocated on first use only.
    #[test]
    fn bounce_buffers_pipeline_the_copies() {
        for slots in [1, 4] {
            let (a, b) = SimWorld::new(2, 8).pair(0, 1);
            let st = Staging { piece: PIECE, slots };
            let ga = Arc::new(FakeGpu::new(11, 6));
            let gb = Arc::new(FakeGpu::new(12, 6));
            #[derive(Debug)]
            struct Shared(Arc<FakeGpu>);
            impl DeviceCopies for Shared {
                fn describe(&self) -> String {
                    self.0.describe()
                }
                fn pinned(&self, bytes: usize) -> Result<Scratch> {
                    self.0.pinned(bytes)
                }
                unsafe fn to_host(&self, d: *mut u8, s: *const u8, n: usize) -> Result<u64> {
                    // SAFETY: forwarded contract.
                    unsafe { self.0.to_host(d, s, n) }
                }
                unsafe fn to_device(&self, d: *mut u8, s: *const u8, n: usize) -> Result<u64> {
                    // SAFETY: forwarded contract.
                    unsafe { self.0.to_device(d, s, n) }
                }
                unsafe fn reduce_to_device(
                    &self,
                    t: DataType,
                    o: ReduceOp,
                    d: *mut u8,
                    l: *const u8,
                    s: *const u8,
                    n: usize,
                ) -> Result<u64> {
                    // SAFETY: forwarded contract.
                    unsafe { self.0.reduce_to_device(t, o, d, l, s, n) }
                }
                fn completed(&self, dir: Dir) -> Result<u64> {
                    self.0.completed(dir)
                }
            }
            let shared = |g: &Arc<FakeGpu>| -> Option<DeviceSource> {
                let g = g.clone();
                Some(Box::new(move |_| Ok(Box::new(Shared(g.clone())) as Box<dyn DeviceCopies>)))
            };
            let mut a = StagedLink::new(Box::new(a), shared(&ga), st).unwrap();
            let mut b = StagedLink::new(Box::new(b), shared(&gb), st).unwrap();
            // Host buffers only: no pinned memory yet.
            let mut h = vec![7u8; 100];
            let mut h2 = vec![0u8; 100];
            a.post_send(Tag(1), host_slice(&mut h)).unwrap();
            b.post_recv(Tag(1), host_slice(&mut h2), RecvMode::Copy).unwrap();
            drive(&mut a, &mut b, 1, 1);
            assert_eq!(ga.pinned.load(Ordering::Relaxed) + gb.pinned.load(Ordering::Relaxed), 0);
            let n = 16 * PIECE;
            let mut src: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
            let mut dst = vec![0u8; n];
            a.post_send(Tag(2), dev_slice(&mut src)).unwrap();
            b.post_recv(Tag(2), dev_slice(&mut dst), RecvMode::Copy).unwrap();
            drive(&mut a, &mut b, 2, 2);
            drop((a, b));
            assert!(src == dst);
            assert_eq!(ga.pinned.load(Ordering::Relaxed), slots * PIECE, "sender: one direction's buffers");
            assert_eq!(gb.pinned.load(Ordering::Relaxed), slots * PIECE, "receiver: one direction's buffers");
            let most = ga.most_in_flight().max(gb.most_in_flight());
            if slots == 1 {
                assert_eq!(most, 1, "one buffer: one copy at a time");
            } else {
                assert!(most >= 2, "{slots} buffers: copies overlap (at most {most} at once)");
                assert!(most <= slots, "never more copies than buffers: {most}");
            }
        }
    }

    /// Reducing receives into device memory go through the GPU's kernel from the bounce
    /// buffer, in place and apart, across pieces, for every data type.
    #[test]
    fn reducing_receives_into_device_memory() {
        for dtype in DataType::ALL {
            let (a, b) = SimWorld::new(2, 2).pair(0, 1);
            let st = Staging { piece: 4096, slots: 2 };
            let gpu = |s| fake_source(s, 2);
            let mut a = StagedLink::new(Box::new(a), gpu(1), st).unwrap();
            let mut b = StagedLink::new(Box::new(b), gpu(2), st).unwrap();
            let count = 3 * 4096 / dtype.size() + 5;
            let bytes = count * dtype.size();
            let mut incoming: Vec<u8> = (0..bytes).map(|i| (i % 7) as u8).collect();
            let local: Vec<u8> = (0..bytes).map(|i| (i % 5) as u8).collect();
            let mut want = vec![0u8; bytes];
            // SAFETY: three buffers of `count` elements.
            unsafe {
                crate::reduce::reduce_raw(
                    dtype,
                    ReduceOp::Max,
                    want.as_mut_ptr(),
                    local.as_ptr(),
                    incoming.as_ptr(),
                    count,
                )
            };
            let mut in_place = local.clone();
            let l = dev_slice(&mut in_place);
            a.post_send(Tag(1), dev_slice(&mut incoming)).unwrap();
            let mode = RecvMode::Reduce { dtype, op: ReduceOp::Max, local: l, mem: &FAKE_DEVICE_MEM };
            b.post_recv(Tag(1), l, mode).unwrap();
            drive(&mut a, &mut b, 1, 1);
            drop((a, b));
            assert!(in_place == want, "{dtype}");
        }
    }

    /// A rank without a GPU still speaks the rule with host buffers, and says why it cannot
    /// take a device buffer; mixed kinds in a reducing receive are refused.
    #[test]
    fn without_a_gpu_device_buffers_are_refused_with_the_reason() {
        let (a, _b) = SimWorld::new(2, 2).pair(0, 1);
        let mut a = StagedLink::new(Box::new(a), None, Staging::default()).unwrap();
        let mut x = vec![0u8; 64];
        let e = a.post_send(Tag(1), dev_slice(&mut x)).unwrap_err();
        assert!(e.to_string().contains("no GPU to stage it through"), "{e}");
        let e = a.post_recv(Tag(1), dev_slice(&mut x), RecvMode::Copy).unwrap_err();
        assert!(e.to_string().contains("GPU memory"), "{e}");
        let mut y = vec![0u8; 64];
        let mode = RecvMode::Reduce { dtype: DataType::F32, op: ReduceOp::Sum, local: host_slice(&mut y), mem: &HOST };
        let e = a.post_recv(Tag(2), dev_slice(&mut x), mode).unwrap_err();
        assert!(e.to_string().contains("same kind of memory"), "{e}");
        assert!(Staging { piece: 100, slots: 1 }.check().is_err());
        // Buffers of two GPUs on one link: refused, naming both.
        let (c, _d) = SimWorld::new(2, 2).pair(0, 1);
        let mut c = StagedLink::new(Box::new(c), fake_source(1, 0), Staging::default()).unwrap();
        c.post_send(Tag(1), dev_slice(&mut x)).unwrap();
        // SAFETY: refused before use.
        let other = unsafe { MemSlice::new_in(y.as_mut_ptr(), y.len(), MemKind::Device(1)) };
        let e = c.post_send(Tag(2), other).unwrap_err();
        assert!(e.to_string().contains("GPU 1") && e.to_string().contains("GPU 0"), "{e}");
        drop(c);
    }

    /// Lengths that differ by whole pieces have the same first pieces: the tag of the last
    /// piece tells them apart, and the receive fails instead of completing short.
    #[test]
    fn lengths_that_differ_by_whole_pieces_are_refused() {
        for (sent, want) in [(3 * PIECE, 2 * PIECE), (2 * PIECE, 3 * PIECE), (PIECE + 5, 2 * PIECE + 5)] {
            let (a, b) = SimWorld::new(2, 8).pair(0, 1);
            let st = Staging { piece: PIECE, slots: 2 };
            let gpu = || fake_source(5, 1);
            let mut a = StagedLink::new(Box::new(a), gpu(), st).unwrap();
            let mut b = StagedLink::new(Box::new(b), gpu(), st).unwrap();
            let mut x = vec![1u8; sent];
            let mut y = vec![0u8; want];
            a.post_send(Tag(4), dev_slice(&mut x)).unwrap();
            b.post_recv(Tag(4), dev_slice(&mut y), RecvMode::Copy).unwrap();
            let e = (0..1000)
                .find_map(|_| {
                    let _ = a.progress();
                    b.progress().err()
                })
                .unwrap_or_else(|| panic!("{sent} bytes sent, {want} expected: no error"));
            assert_eq!(b.recvs_done(), 0, "{sent} sent, {want} expected: the receive completed");
            assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
            drop((a, b));
        }
    }

    /// While the GPU copies a piece, the link says it is busy with work no doorbell will
    /// signal (a waiting rank then naps briefly); idle links say they are not.
    #[test]
    fn gpu_copies_in_flight_are_reported() {
        let (a, b) = SimWorld::new(2, 4).pair(0, 1);
        let st = Staging { piece: PIECE, slots: 2 };
        let mut a = StagedLink::new(Box::new(a), fake_source(3, 50), st).unwrap();
        let mut b = StagedLink::new(Box::new(b), fake_source(4, 50), st).unwrap();
        assert!(!a.busy_unsignalled() && !b.busy_unsignalled());
        let mut x = vec![5u8; 3 * PIECE];
        let mut y = vec![0u8; 3 * PIECE];
        a.post_send(Tag(1), dev_slice(&mut x)).unwrap();
        b.post_recv(Tag(1), dev_slice(&mut y), RecvMode::Copy).unwrap();
        a.progress().unwrap();
        assert!(a.busy_unsignalled(), "copies off the GPU under way");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.recvs_done() < 1 || a.sends_done() < 1 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end);
        }
        assert!(!a.busy_unsignalled() && !b.busy_unsignalled());
        drop((a, b));
        assert!(x == y);
    }
}
