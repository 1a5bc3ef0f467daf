//! GPU to GPU between processes of one host: a [`P2pLink`] writes each message straight into
//! the receiver's device buffer with the GPU's copy engine, through CUDA IPC.
//!
//! The receiver announces each receive it posts (**ready to receive**: the CUDA IPC handle of
//! its buffer's allocation and the offset, or of a scratch buffer for a reducing receive); the
//! sender opens that memory in its own process (once per allocation, then cached), starts one
//! device-to-device copy from its buffer into it, and when the copy has completed says
//! **done**; the receiver then has the bytes (a reducing receive first runs the reduction
//! kernel from its scratch buffer). Every byte is read once and written once, as in
//! `cuMemcpyDtoD`. The small control messages, and messages between host buffers, travel over
//! a link that moves host memory (host-staging's), kept in order.
//!
//! The GPU is reached through [`DeviceIpc`] (CUDA in the `cuda` feature, a simulated GPU in
//! tests), so the protocol is written and tested once, here.
//!
//! Messages between a host buffer on one side and a GPU buffer on the other: a host send into
//! a GPU receive is copied by the copy engine too; a GPU send into a host receive is refused
//! with an error saying so (`OXCCL_P2P=off` stages every GPU message through host memory).

use std::collections::VecDeque;
use std::fmt;

use crate::dtype::{DataType, ReduceOp};
use crate::error::{Error, Result};
use crate::link::{mismatch_error, Link, MemSlice, RecvMode, Tag, TransportKind};
use crate::mem::{MemKind, Scratch};

/// Memory of another process, as a process shares it: the CUDA IPC handle of an allocation
/// and an offset into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcRef {
    /// The allocation's handle (`cuIpcGetMemHandle`).
    pub handle: [u8; 64],
    /// Where the buffer starts in it.
    pub offset: u64,
}

/// What a [`P2pLink`] needs of this process's GPU.
pub trait DeviceIpc: Send + fmt::Debug {
    /// The GPU, in words.
    fn describe(&self) -> String;
    /// Its ordinal in this process.
    fn ordinal(&self) -> u32;
    /// The handle of device memory at `ptr` (`len` bytes) for another process.
    fn export(&mut self, ptr: *const u8, len: usize) -> Result<IpcRef>;
    /// Another process's memory, opened in this one (once per allocation; kept open).
    fn import(&mut self, r: &IpcRef) -> Result<*mut u8>;
    /// Starts copying `len` bytes from `src` to `dst` (device memory, either of this process
    /// or imported; `src` may be host memory), after every operation started before. Returns
    /// its number (0, 1, 2, ...).
    ///
    /// # Safety
    /// Both ranges stay valid and untouched until [`DeviceIpc::completed`] counts the copy.
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64>;
    /// Starts `dst[i] = local[i] op src[i]` over `count` elements, in order with the copies.
    ///
    /// # Safety
    /// As for [`DeviceIpc::copy`]; the three ranges are device memory of this process.
    unsafe fn reduce(
        &self,
        dtype: DataType,
        op: ReduceOp,
        dst: *mut u8,
        local: *const u8,
        src: *const u8,
        count: usize,
    ) -> Result<u64>;
    /// How many operations have completed (in order). Never blocks.
    fn completed(&self) -> Result<u64>;
    /// Device memory of at least `bytes` (scratch of reducing receives).
    fn scratch(&mut self, bytes: usize) -> Result<Scratch>;
}

/// The tag of control messages on the host link (never an operation's: its op code is 0xff).
const CTL_TAG: Tag = Tag(0xff << 56);
/// Control message size.
const CTL: usize = 96;

/// Kinds of control message.
const READY_DEVICE: u32 = 1;
const READY_HOST: u32 = 2;
const DONE: u32 = 3;
const DATA: u32 = 4;
const MISMATCH: u32 = 5;

/// A control message: kind, the message's tag and length, and for a ready-to-receive on the
/// GPU, where to write.
#[derive(Debug, Clone, Copy)]
struct Ctl {
    kind: u32,
    tag: Tag,
    len: u64,
    at: IpcRef,
}

impl Ctl {
    fn new(kind: u32, tag: Tag, len: usize) -> Ctl {
        Ctl { kind, tag, len: len as u64, at: IpcRef { handle: [0; 64], offset: 0 } }
    }
    fn encode(&self) -> [u8; CTL] {
        let mut b = [0u8; CTL];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.at.offset.to_le_bytes());
        b[32..96].copy_from_slice(&self.at.handle);
        b
    }
    fn decode(b: &[u8; CTL]) -> Ctl {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let mut handle = [0u8; 64];
        handle.copy_from_slice(&b[32..96]);
        Ctl {
            kind: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            tag: Tag(u64_at(8)),
            len: u64_at(16),
            at: IpcRef { handle, offset: u64_at(24) },
        }
    }
}

fn is_device(s: &MemSlice) -> bool {
    matches!(s.kind(), MemKind::Device(_))
}

/// A send as posted, and how far it got.
struct OutMsg {
    tag: Tag,
    src: MemSlice,
    /// The copy into the receiver's buffer started (its number; `u64::MAX`: nothing to copy).
    copy: Option<u64>,
    /// Matched with a receive into host memory: goes as data over the host link, in turn.
    host: bool,
    /// Matched with a receive it does not fit: the receiver is told in turn (after the done
    /// of every earlier send), then the link fails with this error.
    refused: Option<Error>,
    /// The host link's number of its last send (done, or the payload).
    last: Option<u64>,
}

/// A receive as posted, and how far it got.
struct InMsg {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    /// Announced to the sender.
    ready: bool,
    /// The scratch buffer the data waits in (a reducing receive into device memory, or a
    /// buffer CUDA IPC cannot share).
    slot: Option<usize>,
    /// The reduction or copy out of the scratch buffer started (its number), once the data
    /// is in.
    reduce: Option<u64>,
    /// The bytes are in `dst` (or the reduction is counted above).
    landed: bool,
}

/// What the one receive posted on the host link is for.
enum Want {
    /// The next control message.
    Ctl(u64),
    /// The payload of a host message for receive `msg` (its number on the host link).
    Payload { seq: u64, msg: u64 },
}

/// GPU to GPU through CUDA IPC over a host link for control (see the module's documentation).
pub struct P2pLink {
    // Declared first: dropping it waits for the copies it started.
    dev: Box<dyn DeviceIpc>,
    inner: Box<dyn Link>,
    me: usize,
    sends: VecDeque<OutMsg>,
    sends_base: u64,
    /// Ready-to-receive messages from the peer not yet matched with a send.
    readies: VecDeque<Ctl>,
    recvs: VecDeque<InMsg>,
    recvs_base: u64,
    /// Scratch of reducing receives: two buffers (one fills while the other reduces), and
    /// which are busy.
    scratch: [Option<Scratch>; 2],
    busy: [bool; 2],
    ctl_in: Box<[u8; CTL]>,
    want: Option<Want>,
    /// Control messages posted on the host link, kept until sent.
    ctl_out: VecDeque<(u64, Box<[u8; CTL]>)>,
    posted: [u64; 2],
    done: [u64; 2],
    failed: Option<Error>,
}

// SAFETY: the raw pointers inside are addresses the posters promised valid (see `MemSlice`),
// or of the link's own memory; one thread uses the link at a time.
unsafe impl Send for P2pLink {}

impl fmt::Debug for P2pLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2pLink")
            .field("peer", &self.inner.peer())
            .field("device", &self.dev.describe())
            .finish_non_exhaustive()
    }
}

impl P2pLink {
    /// Rank `me`'s link over `inner` (a host link to the same peer), writing through `dev`.
    pub fn new(inner: Box<dyn Link>, dev: Box<dyn DeviceIpc>, me: usize) -> P2pLink {
        P2pLink {
            dev,
            inner,
            me,
            sends: VecDeque::new(),
            sends_base: 0,
            readies: VecDeque::new(),
            recvs: VecDeque::new(),
            recvs_base: 0,
            scratch: [None, None],
            busy: [false; 2],
            ctl_in: Box::new([0; CTL]),
            want: None,
            ctl_out: VecDeque::new(),
            posted: [0, 0],
            done: [0, 0],
            failed: None,
        }
    }

    fn send_ctl(&mut self, c: Ctl) -> Result<u64> {
        let buf = Box::new(c.encode());
        // SAFETY: the box lives in `ctl_out` until the host link has sent it.
        let s = unsafe { MemSlice::new(buf.as_ptr() as *mut u8, CTL) };
        let seq = self.inner.post_send(CTL_TAG, s)?;
        self.ctl_out.push_back((seq, buf));
        Ok(seq)
    }

    /// Announces the receives posted, in order (a reducing one into device memory waits for a
    /// free scratch buffer).
    fn announce(&mut self) -> Result<usize> {
        let mut work = 0;
        for i in 0..self.recvs.len() {
            if self.recvs[i].ready {
                continue;
            }
            let (tag, dst, mode) = (self.recvs[i].tag, self.recvs[i].dst, self.recvs[i].mode);
            let mut c = Ctl::new(if is_device(&dst) { READY_DEVICE } else { READY_HOST }, tag, dst.len());
            if is_device(&dst) && !dst.is_empty() {
                // A plain receive hands out its own buffer; one whose memory CUDA IPC cannot
                // share (stream-ordered pools: cudaMallocAsync, cudarc's allocations where the
                // driver has them) and a reducing one hand out a scratch buffer instead, copied
                // or reduced into the buffer once the data is in.
                let own = match mode {
                    RecvMode::Copy => self.dev.export(dst.ptr(), dst.len()).ok(),
                    RecvMode::Reduce { .. } => None,
                };
                c.at = match own {
                    Some(at) => at,
                    None => {
                        let Some(k) = (0..2).find(|&k| !self.busy[k]) else { break };
                        if self.scratch[k].as_ref().is_none_or(|s| s.len() < dst.len()) {
                            self.scratch[k] = None;
                            self.scratch[k] = Some(self.dev.scratch(dst.len())?);
                        }
                        self.busy[k] = true;
                        self.recvs[i].slot = Some(k);
                        let s = self.scratch[k].as_ref().expect("made above");
                        self.dev.export(s.ptr(), dst.len())?
                    }
                };
            }
            self.send_ctl(c)?;
            self.recvs[i].ready = true;
            work += 1;
        }
        Ok(work)
    }

    /// Matches sends with the peer's ready-to-receive messages, in order, and starts them.
    fn start_sends(&mut self) -> Result<usize> {
        let mut work = 0;
        for i in 0..self.sends.len() {
            if self.sends[i].refused.is_some() {
                break;
            }
            if self.sends[i].copy.is_some() || self.sends[i].host {
                continue;
            }
            let Some(r) = self.readies.pop_front() else { break };
            let (tag, src) = (self.sends[i].tag, self.sends[i].src);
            if r.tag != tag || r.len != src.len() as u64 {
                // The receiver is told in turn (it must fail too), then this side fails.
                let e = mismatch_error(self.me, self.inner.peer(), r.len as usize, r.tag, src.len() as u64, tag);
                self.sends[i].refused = Some(e);
                break;
            }
            match r.kind {
                READY_DEVICE => {
                    let copy = if src.is_empty() {
                        None
                    } else {
                        let at = self.dev.import(&r.at)?;
                        // SAFETY: the receiver keeps its buffer until our done; ours stays
                        // valid until this send completes, after the copy.
                        Some(unsafe { self.dev.copy(at, src.ptr(), src.len())? })
                    };
                    // An empty message needs no copy: done at once.
                    self.sends[i].copy = Some(copy.unwrap_or(u64::MAX));
                }
                _ if is_device(&src) && !src.is_empty() => {
                    self.sends[i].refused = Some(Error::invalid_usage(format!(
                        "rank {} sends {} bytes of GPU memory to rank {}, which receives them into host memory: a \
                         p2p link moves GPU to GPU, and host memory into GPU memory, but not GPU memory into host \
                         memory (set OXCCL_P2P=off to stage every GPU message through host memory)",
                        self.me,
                        src.len(),
                        self.inner.peer()
                    )));
                    break;
                }
                // Sent in turn (after every earlier send said done), by `finish_sends`.
                _ => self.sends[i].host = true,
            }
            work += 1;
        }
        Ok(work)
    }

    /// In send order: says done for each copy that completed, sends the data of each send
    /// matched with a host receive; and counts the sends done.
    fn finish_sends(&mut self) -> Result<usize> {
        let mut work = 0;
        let copied = if self.sends.iter().any(|s| s.copy.is_some_and(|c| c != u64::MAX) && s.last.is_none()) {
            self.dev.completed()?
        } else {
            0
        };
        for i in 0..self.sends.len() {
            let s = &self.sends[i];
            let (tag, src) = (s.tag, s.src);
            if let Some(e) = &s.refused {
                let e = e.duplicate();
                self.send_ctl(Ctl::new(MISMATCH, tag, src.len()))?;
                return Err(e);
            }
            match (s.copy, s.last, s.host) {
                (_, Some(_), _) => {}
                (Some(c), None, _) if c == u64::MAX || c < copied => {
                    self.sends[i].last = Some(self.send_ctl(Ctl::new(DONE, tag, src.len()))?);
                    work += 1;
                }
                (None, None, true) => {
                    self.send_ctl(Ctl::new(DATA, tag, src.len()))?;
                    let data = if src.is_empty() {
                        // SAFETY: an empty slice is valid anywhere.
                        unsafe { MemSlice::new(std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8, 0) }
                    } else {
                        src
                    };
                    self.sends[i].last = Some(self.inner.post_send(tag, data)?);
                    work += 1;
                }
                // A copy not done yet, or a send not matched yet: the later ones wait.
                _ => break,
            }
        }
        let sent = self.inner.sends_done();
        while let Some(&(seq, _)) = self.ctl_out.front() {
            if seq >= sent {
                break;
            }
            self.ctl_out.pop_front();
        }
        while let Some(s) = self.sends.front() {
            // Done once its last message has left on the host link (done, after the copy
            // completed; or the payload): nothing of it is left that needs this side polled.
            match s.last {
                Some(l) if l < sent => {}
                _ => break,
            }
            self.sends.pop_front();
            self.sends_base += 1;
            self.done[0] += 1;
            work += 1;
        }
        Ok(work)
    }

    /// The oldest receive announced and not yet landed.
    fn waiting_recv(&self) -> Option<usize> {
        self.recvs.iter().position(|r| r.ready && !r.landed && r.reduce.is_none())
    }

    /// Whether a control message from the peer is due: a send waits for its ready to receive,
    /// or an announced receive for its done (or data, or mismatch).
    fn expects_ctl(&self) -> bool {
        let unmatched = self.sends.iter().filter(|s| s.copy.is_none() && !s.host && s.refused.is_none()).count();
        unmatched > self.readies.len() || self.waiting_recv().is_some()
    }

    /// Takes in the peer's control messages and payloads, one posted receive at a time.
    fn take_in(&mut self) -> Result<usize> {
        let mut work = 0;
        loop {
            let got = self.inner.recvs_done();
            match self.want {
                // A control message is received only when one is due (a peer that closes
                // after its last message must not fail a receive nobody needed).
                None if !self.expects_ctl() => return Ok(work),
                None => {
                    // SAFETY: the box lives as long as the link; nothing else reads it until
                    // this receive completes.
                    let s = unsafe { MemSlice::new(self.ctl_in.as_mut_ptr(), CTL) };
                    self.want = Some(Want::Ctl(self.inner.post_recv(CTL_TAG, s, RecvMode::Copy)?));
                    return Ok(work);
                }
                Some(Want::Ctl(seq)) if seq < got => {
                    self.want = None;
                    let c = Ctl::decode(&self.ctl_in);
                    work += 1;
                    match c.kind {
                        READY_DEVICE | READY_HOST => self.readies.push_back(c),
                        DONE | DATA | MISMATCH => {
                            let Some(i) = self.waiting_recv() else {
                                return Err(Error::Remote {
                                    rank: self.inner.peer(),
                                    what: format!("sent {} bytes that no posted receive announced", c.len),
                                });
                            };
                            let r = &self.recvs[i];
                            if c.kind == MISMATCH || c.tag != r.tag || c.len != r.dst.len() as u64 {
                                return Err(mismatch_error(
                                    self.me,
                                    self.inner.peer(),
                                    r.dst.len(),
                                    r.tag,
                                    c.len,
                                    c.tag,
                                ));
                            }
                            if c.kind == DATA {
                                let msg = self.recvs_base + i as u64;
                                let (dst, mode) = (r.dst, r.mode);
                                let dst = if dst.is_empty() {
                                    // SAFETY: an empty slice is valid anywhere.
                                    unsafe {
                                        MemSlice::new(std::ptr::NonNull::<u64>::dangling().as_ptr() as *mut u8, 0)
                                    }
                                } else {
                                    dst
                                };
                                let seq = self.inner.post_recv(c.tag, dst, mode)?;
                                self.want = Some(Want::Payload { seq, msg });
                                continue;
                            }
                            // Done: the sender's copy into our buffer has completed.
                            match (r.mode, r.slot) {
                                (RecvMode::Copy, Some(k)) if !r.dst.is_empty() => {
                                    let src = self.scratch[k].as_ref().expect("announced with it").ptr();
                                    // SAFETY: device memory of this process, valid until this
                                    // receive completes (after the copy).
                                    let n = unsafe { self.dev.copy(r.dst.ptr(), src, r.dst.len())? };
                                    self.recvs[i].reduce = Some(n);
                                }
                                (RecvMode::Reduce { dtype, op, local, .. }, Some(k)) if !r.dst.is_empty() => {
                                    let src = self.scratch[k].as_ref().expect("announced with it").ptr();
                                    // SAFETY: device memory of this process, valid until this
                                    // receive completes (after the reduction).
                                    let n = unsafe {
                                        self.dev.reduce(
                                            dtype,
                                            op,
                                            r.dst.ptr(),
                                            local.ptr(),
                                            src,
                                            r.dst.len() / dtype.size(),
                                        )?
                                    };
                                    self.recvs[i].reduce = Some(n);
                                }
                                _ => {
                                    if let Some(k) = r.slot {
                                        self.busy[k] = false;
                                    }
                                    self.recvs[i].landed = true;
                                }
                            }
                        }
                        k => {
                            return Err(Error::Remote {
                                rank: self.inner.peer(),
                                what: format!("sent a control message of unknown kind {k}"),
                            })
                        }
                    }
                }
                Some(Want::Payload { seq, msg }) if seq < got => {
                    self.want = None;
                    self.recvs[(msg - self.recvs_base) as usize].landed = true;
                    work += 1;
                }
                Some(_) => return Ok(work),
            }
        }
    }

    /// Counts the reductions that completed and the receives done, in order.
    fn finish_recvs(&mut self) -> Result<usize> {
        let mut work = 0;
        if self.recvs.iter().any(|r| r.reduce.is_some() && !r.landed) {
            let n = self.dev.completed()?;
            for r in self.recvs.iter_mut() {
                if let Some(x) = r.reduce {
                    if !r.landed && x < n {
                        r.landed = true;
                        if let Some(k) = r.slot {
                            self.busy[k] = false;
                        }
                    }
                }
            }
        }
        while self.recvs.front().is_some_and(|r| r.landed) {
            self.recvs.pop_front();
            self.recvs_base += 1;
            self.done[1] += 1;
            work += 1;
        }
        Ok(work)
    }

    /// Refuses a buffer of another GPU than the link's.
    fn check_gpu(&self, s: &MemSlice) -> Result<()> {
        match s.kind() {
            MemKind::Device(n) if n != self.dev.ordinal() && !s.is_empty() => Err(Error::invalid_usage(format!(
                "a buffer in memory of GPU {n}, but this rank's GPU data goes through GPU {}: the GPU buffers of a \
                 communicator must be on one GPU, as NCCL's",
                self.dev.ordinal()
            ))),
            _ => Ok(()),
        }
    }

    fn step(&mut self) -> Result<usize> {
        let mut work = self.announce()?;
        work += self.start_sends()?;
        work += self.inner.progress()?;
        work += self.take_in()?;
        work += self.finish_recvs()?;
        work += self.finish_sends()?;
        work += self.announce()?;
        work += self.start_sends()?;
        Ok(work)
    }
}

impl Link for P2pLink {
    fn peer(&self) -> usize {
        self.inner.peer()
    }
    fn kind(&self) -> TransportKind {
        TransportKind::P2p
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.check_gpu(&src)?;
        self.sends.push_back(OutMsg { tag, src, copy: None, host: false, refused: None, last: None });
        self.posted[0] += 1;
        Ok(self.posted[0] - 1)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        crate::link::check_reducing_recv(&dst, &mode)?;
        self.check_gpu(&dst)?;
        self.recvs.push_back(InMsg { tag, dst, mode, ready: false, slot: None, reduce: None, landed: false });
        self.posted[1] += 1;
        Ok(self.posted[1] - 1)
    }
    fn progress(&mut self) -> Result<usize> {
        if let Some(e) = &self.failed {
            // Keep the host link moving (the peer may still need our last words).
            let _ = self.inner.progress();
            return Err(e.duplicate());
        }
        self.step().inspect_err(|e| self.failed = Some(e.duplicate()))
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
        // Copies into the peer's buffer or reductions in flight: their completion rings no bell.
        self.sends.iter().any(|s| s.copy.is_some_and(|c| c != u64::MAX) && s.last.is_none())
            || self.recvs.iter().any(|r| r.reduce.is_some() && !r.landed)
            || self.inner.busy_unsignalled()
    }
    fn close(&mut self, deadline: std::time::Instant) {
        self.inner.close(deadline)
    }
    fn op_end(&mut self) {
        self.inner.op_end()
    }
}

/// A simulated GPU with CUDA IPC for tests, in one process: a handle is the address itself,
/// and operations are done late (after a pseudo-random number of polls), so a done said
/// before its copy completed delivers stale bytes and a test sees it.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use super::{DeviceIpc, IpcRef};
    use crate::dtype::{DataType, ReduceOp};
    use crate::error::Result;
    use crate::mem::{LocalMem, Scratch, HOST};
    use crate::staging::fake::LateOps;

    /// The simulated GPU of one side: one in-order queue of late operations.
    #[derive(Debug)]
    pub struct FakeIpc {
        ops: LateOps,
        /// Exports only its own scratch buffers, as CUDA IPC refuses memory of stream-ordered
        /// pools.
        scratch_only: bool,
        scratches: Vec<(usize, usize)>,
    }

    impl FakeIpc {
        /// Operations complete after 0 to `max_delay` polls, drawn from `seed`.
        pub fn new(seed: u64, max_delay: u32) -> FakeIpc {
            FakeIpc { ops: LateOps::new(seed, max_delay), scratch_only: false, scratches: Vec::new() }
        }
        /// As [`FakeIpc::new`], refusing to export any memory but its own scratch buffers.
        pub fn scratch_only(seed: u64, max_delay: u32) -> FakeIpc {
            FakeIpc { scratch_only: true, ..FakeIpc::new(seed, max_delay) }
        }
    }

    impl DeviceIpc for FakeIpc {
        fn describe(&self) -> String {
            "simulated GPU".into()
        }
        fn ordinal(&self) -> u32 {
            0
        }
        fn export(&mut self, ptr: *const u8, len: usize) -> Result<IpcRef> {
            let (a, b) = (ptr as usize, ptr as usize + len);
            if self.scratch_only && !self.scratches.iter().any(|&(s, e)| s <= a && b <= e) {
                return Err(crate::error::Error::Cuda {
                    call: "cuIpcGetMemHandle",
                    what: "simulated: memory of a stream-ordered pool".into(),
                });
            }
            let mut handle = [0u8; 64];
            handle[..8].copy_from_slice(&(ptr as u64).to_le_bytes());
            handle[8..16].copy_from_slice(b"oxcclsim");
            Ok(IpcRef { handle, offset: 0 })
        }
        fn import(&mut self, r: &IpcRef) -> Result<*mut u8> {
            assert_eq!(&r.handle[8..16], b"oxcclsim", "a handle this simulated GPU made");
            let base = u64::from_le_bytes(r.handle[..8].try_into().expect("8 bytes"));
            Ok((base + r.offset) as usize as *mut u8)
        }
        unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
            // SAFETY: forwarded contract.
            Ok(unsafe { self.ops.start(dst, std::ptr::null(), src, len, None) })
        }
        unsafe fn reduce(
            &self,
            dtype: DataType,
            op: ReduceOp,
            dst: *mut u8,
            local: *const u8,
            src: *const u8,
            count: usize,
        ) -> Result<u64> {
            // SAFETY: forwarded contract.
            Ok(unsafe { self.ops.start(dst, local, src, count, Some((dtype, op))) })
        }
        fn completed(&self) -> Result<u64> {
            Ok(self.ops.completed())
        }
        fn scratch(&mut self, bytes: usize) -> Result<Scratch> {
            let s = HOST.scratch(bytes)?;
            self.scratches.push((s.ptr() as usize, s.ptr() as usize + s.len()));
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeIpc;
    use super::*;
    use crate::conformance::{self, LinkPair};
    use crate::mem::{LocalMem, HOST};
    use crate::sim::SimWorld;
    use crate::staging::fake::FAKE_DEVICE_MEM;

    struct Pairs {
        kind: MemKind,
        seed: u64,
        /// The GPUs export only their scratch buffers (the callers' memory is of a
        /// stream-ordered pool, which CUDA IPC refuses).
        scratch_only: bool,
    }

    impl Pairs {
        fn gpu(&self, seed: u64) -> Box<dyn DeviceIpc> {
            Box::new(if self.scratch_only { FakeIpc::scratch_only(seed, 3) } else { FakeIpc::new(seed, 3) })
        }
    }

    impl LinkPair for Pairs {
        fn name(&self) -> String {
            format!("p2p over the simulator ({} buffers)", self.kind)
        }
        fn piece(&self) -> usize {
            64 << 10
        }
        fn memory(&self) -> (MemKind, &'static dyn LocalMem) {
            match self.kind {
                MemKind::Device(_) => (self.kind, &FAKE_DEVICE_MEM),
                _ => (self.kind, &HOST),
            }
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            self.seed += 2;
            let (a, b) = SimWorld::new(2, 4).pair(0, 1);
            (
                Box::new(P2pLink::new(Box::new(a), self.gpu(self.seed), 0)),
                Box::new(P2pLink::new(Box::new(b), self.gpu(self.seed + 1), 1)),
            )
        }
    }

    #[test]
    fn p2p_links_keep_the_link_contract_for_device_and_host_buffers() {
        conformance::run(&mut Pairs { kind: MemKind::Device(0), seed: 1, scratch_only: false });
        conformance::run(&mut Pairs { kind: MemKind::Host, seed: 100, scratch_only: false });
        // Receive buffers CUDA IPC cannot share: the sender writes a scratch buffer, copied
        // into the receive buffer once the data is in.
        conformance::run(&mut Pairs { kind: MemKind::Device(0), seed: 200, scratch_only: true });
    }

    fn dev(v: &mut [u8]) -> MemSlice {
        // SAFETY: the tests keep their buffers until the links are dropped.
        unsafe { MemSlice::new_in(v.as_mut_ptr(), v.len(), MemKind::Device(0)) }
    }
    fn host(v: &mut [u8]) -> MemSlice {
        // SAFETY: as above.
        unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) }
    }

    fn pair(seed: u64) -> (P2pLink, P2pLink) {
        let (a, b) = SimWorld::new(2, 4).pair(0, 1);
        (
            P2pLink::new(Box::new(a), Box::new(FakeIpc::new(seed, 4)), 0),
            P2pLink::new(Box::new(b), Box::new(FakeIpc::new(seed + 1, 4)), 1),
        )
    }

    /// A host send into a GPU receive is copied in; a GPU send into a host receive is refused
    /// on both sides, saying what to do.
    #[test]
    fn host_into_gpu_is_copied_gpu_into_host_is_refused() {
        let (mut a, mut b) = pair(7);
        let mut x: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
        let mut y = vec![0u8; x.len()];
        a.post_send(Tag(1), host(&mut x)).unwrap();
        b.post_recv(Tag(1), dev(&mut y), RecvMode::Copy).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.recvs_done() < 1 || a.sends_done() < 1 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end);
        }
        assert!(x == y);
        let mut z = vec![0u8; 64];
        let mut w = vec![1u8; 64];
        a.post_send(Tag(2), dev(&mut w)).unwrap();
        b.post_recv(Tag(2), host(&mut z), RecvMode::Copy).unwrap();
        let (mut ea, mut eb) = (None, None);
        for _ in 0..1000 {
            // The failed sender is still driven: its last words must reach the receiver.
            let (ra, rb) = (a.progress(), b.progress());
            ea = ea.or(ra.err());
            eb = eb.or(rb.err());
        }
        let ea = ea.expect("the sender refuses");
        assert!(ea.to_string().contains("OXCCL_P2P=off"), "{ea}");
        let eb = eb.expect("the receiver fails too");
        assert!(matches!(eb, Error::InvalidUsage(_)), "{eb}");
        assert_eq!(b.recvs_done(), 1, "nothing more completed");
        drop((a, b));
    }

    /// Every GPU message is one copy, by the sender, into the receiver's buffer.
    #[test]
    fn one_copy_per_message() {
        let (mut a, mut b) = pair(11);
        let mut x: Vec<u8> = (0..(1 << 20)).map(|i| (i % 13) as u8).collect();
        let mut y = vec![0u8; x.len()];
        for k in 0..5u64 {
            a.post_send(Tag(k), dev(&mut x)).unwrap();
            b.post_recv(Tag(k), dev(&mut y), RecvMode::Copy).unwrap();
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.recvs_done() < 5 || a.sends_done() < 5 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end);
        }
        assert!(x == y);
        let ops = a.dev.completed().unwrap();
        assert_eq!(ops, 5, "one copy per message");
        drop((a, b));
    }

    /// Many reducing receives into device memory in flight at once: two scratch buffers take
    /// turns, and one is not written again until its reduction has completed.
    #[test]
    fn reducing_receives_take_turns_on_the_scratch_buffers() {
        let (mut a, mut b) = pair(21);
        let count = 50_000;
        let k = 8;
        let mut inc: Vec<Vec<u8>> =
            (0..k).map(|m| (0..count).flat_map(|i| ((i + m) as f32).to_ne_bytes()).collect()).collect();
        let mut loc: Vec<Vec<u8>> =
            (0..k).map(|m| (0..count).flat_map(|_| (m as f32).to_ne_bytes()).collect()).collect();
        for m in 0..k {
            a.post_send(Tag(m as u64), dev(&mut inc[m])).unwrap();
            let l = dev(&mut loc[m]);
            let mode = RecvMode::Reduce { dtype: DataType::F32, op: ReduceOp::Sum, local: l, mem: &FAKE_DEVICE_MEM };
            b.post_recv(Tag(m as u64), l, mode).unwrap();
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.recvs_done() < k as u64 || a.sends_done() < k as u64 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end);
        }
        drop((a, b));
        for (m, l) in loc.iter().enumerate() {
            let want: Vec<u8> = (0..count).flat_map(|i| ((i + m) as f32 + m as f32).to_ne_bytes()).collect();
            assert!(*l == want, "reducing receive {m}");
        }
    }

    /// A buffer of another GPU than the link's is refused, naming both.
    #[test]
    fn a_buffer_of_another_gpu_is_refused() {
        let (mut a, _b) = pair(31);
        let mut x = vec![0u8; 64];
        // SAFETY: refused before use.
        let other = unsafe { MemSlice::new_in(x.as_mut_ptr(), 64, MemKind::Device(1)) };
        let e = a.post_send(Tag(1), other).unwrap_err();
        assert!(e.to_string().contains("GPU 1") && e.to_string().contains("GPU 0"), "{e}");
        let e = a.post_recv(Tag(1), other, RecvMode::Copy).unwrap_err();
        assert!(e.to_string().contains("GPU 1"), "{e}");
        assert_eq!(a.sends_done() + a.recvs_done(), 0);
    }
}
