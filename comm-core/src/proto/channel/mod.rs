//! The protocol's state machine for one link ([`Channel`]): ordered send and receive
//! queues, heads, pieces, the CTS + remote-write rendezvous, reduce-on-receive through
//! bounce buffers, the in-flight limit per direction, and the class gate. It moves bytes only
//! through a transport's [`Verbs`], and is told of their completions. The sending side is in
//! `send.rs`, the receiving side in `recv.rs`.

use std::collections::VecDeque;
use std::os::raw::c_void;
use std::sync::Arc;

use crate::budget::{ClassGate, TrafficClass};
use crate::error::{Error, Result};
use crate::link::{MemSlice, RecvMode, Tag, TransportKind};

mod recv;
mod send;

use super::verbs::{Part, Verbs, WireId};
use super::wire::{self, Wire, BYE_BYTES, SMALL_HEAD};

/// Most bytes an injected message may have (the buffer it is built in).
pub(super) const INJECT_MAX: usize = 4096;

/// Bytes of a CTS receive buffer (a CTS is [`CTS_BYTES`]).
const CTS_SLOT: usize = 64;

/// What a channel is made with.
#[derive(Debug, Clone)]
pub struct ChannelCfg {
    /// The transport (it names errors).
    pub kind: TransportKind,
    /// This rank and the peer's.
    pub me: usize,
    /// The peer's rank.
    pub peer: usize,
    /// Heads and pieces as the transport shapes them.
    pub wire: Wire,
    /// Bytes of a head buffer (at least a small message's head and [`Wire::inline`] bytes).
    pub head_bytes: usize,
    /// Head buffers per direction (messages whose head is in flight).
    pub head_slots: usize,
    /// Bounce buffers for reducing receives.
    pub bounce_slots: usize,
    /// Piece sizes: messages are cut by the receiver's setting (the peer's, for sends).
    pub send_chunk: usize,
    /// This side's piece size (for receives).
    pub recv_chunk: usize,
    /// Rendezvous thresholds: for sends the peer's, for receives this side's (0: none).
    pub rma_min_send: usize,
    /// This side's rendezvous threshold.
    pub rma_min_recv: usize,
    /// Whether this side may ask the peer for RMA writes (both ends can).
    pub rma_recv: bool,
    /// Whether this side can write a peer's memory (it serves RMA CTS).
    pub has_rma: bool,
    /// Register every buffer, needed or not.
    pub register: bool,
    /// Most bytes, head and payload, a message sent whole by [`Verbs::inject`] may have (0:
    /// no inject).
    pub inject_bytes: usize,
    /// Operations in flight per direction.
    pub max_inflight: usize,
    /// The process's gate for this NIC, and the communicator's class.
    pub gate: Arc<ClassGate>,
    /// The communicator's traffic class.
    pub class: TrafficClass,
    /// This pair of links' incarnation, the same on both sides (a goodbye that carries
    /// another is a stale one, from an earlier link of a reused slot).
    pub nonce: u64,
    /// The kernels of this side's GPU where the transport moves GPU memory itself (FI_HMEM:
    /// pieces and RMA writes go straight from and to device memory, registered as such);
    /// the few bytes of a small message's head are copied between device and host memory
    /// with them. `None`: GPU buffers are refused.
    pub device: Option<&'static dyn crate::mem::LocalMem>,
}

impl ChannelCfg {
    /// Refuses a GPU buffer where this channel moves host memory only.
    pub fn check_memory(&self, s: &MemSlice) -> Result<()> {
        match (s.kind(), self.device) {
            (crate::mem::MemKind::Device(n), None) if !s.is_empty() => Err(Error::invalid_usage(format!(
                "{}: a buffer in memory of GPU {n}, but this link moves host memory only (its GPU data is staged \
                 through host memory by the layer above)",
                self.kind
            ))),
            _ => Ok(()),
        }
    }

    /// Copies `n` bytes from `src` to `dst`, either of which may be GPU memory (`kinds`: is
    /// each device memory), with the device's kernels; host to host by the CPU.
    ///
    /// # Safety
    /// Both ranges hold `n` bytes; device memory only where this channel has a device
    /// ([`ChannelCfg::check_memory`] passed).
    pub(crate) unsafe fn copy(&self, dst: *mut u8, src: *const u8, n: usize, device: (bool, bool)) {
        if n == 0 {
            return; // a large message's head carries no payload: no device call for nothing
        }
        match (device, self.device) {
            ((false, false), _) | (_, None) => {
                // SAFETY: the caller's contract (host memory on both sides).
                unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
            }
            // SAFETY: the caller's contract.
            (_, Some(mem)) => unsafe { mem.copy(dst, src, n) },
        }
    }
}

/// Whether `s` is GPU memory.
pub(crate) fn on_device(s: &MemSlice) -> bool {
    matches!(s.kind(), crate::mem::MemKind::Device(_))
}

/// `dst = local op src` over `count` elements, where `src` is host memory (a head or bounce
/// buffer) and `dst`, `local` are memory that `mem`'s kernels reach. For a GPU buffer the
/// bytes are first copied to the device (`tmp`, grown as needed: kernels read device memory),
/// then reduced there; `mem`'s calls complete before they return.
///
/// # Safety
/// The three ranges hold `count` elements of `dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn reduce_from_host(
    mem: &dyn crate::mem::LocalMem,
    tmp: &mut Option<crate::mem::Scratch>,
    (dtype, op): (crate::dtype::DataType, crate::dtype::ReduceOp),
    dst: MemSlice,
    off: usize,
    local: MemSlice,
    src: *const u8,
    count: usize,
) -> Result<()> {
    let bytes = count * dtype.size();
    // SAFETY: the caller's contract: `off + bytes` lies inside dst and local.
    let (d, l) = unsafe { (dst.ptr().add(off), local.ptr().add(off) as *const u8) };
    if !on_device(&dst) {
        // SAFETY: host memory, the caller's contract.
        unsafe { mem.reduce(dtype, op, d, l, src, count) };
        return Ok(());
    }
    if tmp.as_ref().is_none_or(|t| t.len() < bytes) {
        *tmp = None;
        *tmp = Some(mem.scratch(bytes)?);
    }
    let t = tmp.as_ref().expect("made above").ptr();
    // SAFETY: `t` holds `bytes` bytes of device memory; the copy completes before the
    // reduction starts, and both before this returns.
    unsafe {
        mem.copy(t, src, bytes);
        mem.reduce(dtype, op, d, l, t, count);
    }
    Ok(())
}

/// A set of equal buffers in one allocation, registered when the transport asks for it.
struct Pool<M> {
    /// First field: deregistered before the memory goes.
    mr: Option<M>,
    mem: Vec<u64>,
    /// Device memory instead of `mem`: the bounce buffers of reducing receives into GPU
    /// buffers, where the transport moves GPU memory itself (the pieces land on the GPU and
    /// its kernel reduces them there).
    dev: Option<crate::mem::Scratch>,
    size: usize,
    free: Vec<usize>,
}

impl<M> Pool<M> {
    /// `count` buffers of `size` bytes in device memory of `kind`, from `mem`, registered (as
    /// device memory: FI_HMEM).
    fn new_device<V: Verbs<Mr = M>>(
        v: &mut V,
        count: usize,
        size: usize,
        (mem, kind): (&dyn crate::mem::LocalMem, crate::mem::MemKind),
    ) -> Result<Pool<M>> {
        let size = size.div_ceil(64) * 64;
        let d = mem.scratch(count * size)?;
        // SAFETY: the pool's own device memory, alive as long as the registration (field
        // order: the registration goes first).
        let s = unsafe { MemSlice::new_in(d.ptr(), count * size, kind) };
        let mr = Some(v.register_pool(s)?);
        Ok(Pool { mr, mem: Vec::new(), dev: Some(d), size, free: (0..count).rev().collect() })
    }

    fn new<V: Verbs<Mr = M>>(v: &mut V, count: usize, size: usize, register: bool) -> Result<Pool<M>> {
        let size = size.div_ceil(64) * 64;
        let mut mem = vec![0u64; count * size / 8];
        let mr = if register {
            // SAFETY: the pool's own memory, alive as long as the registration (field order).
            let s = unsafe { MemSlice::new(mem.as_mut_ptr() as *mut u8, mem.len() * 8) };
            Some(v.register_pool(s)?)
        } else {
            None
        };
        Ok(Pool { mr, mem, dev: None, size, free: (0..count).rev().collect() })
    }
    fn ptr(&mut self, i: usize) -> *mut u8 {
        match &self.dev {
            // SAFETY: i < count, so the slot lies inside the device allocation.
            Some(d) => unsafe { d.ptr().add(i * self.size) },
            // SAFETY: i < count, so the slot lies inside `mem`.
            None => unsafe { (self.mem.as_mut_ptr() as *mut u8).add(i * self.size) },
        }
    }
    fn desc<V: Verbs<Mr = M>>(&self) -> *mut c_void {
        self.mr.as_ref().map_or(std::ptr::null_mut(), V::desc)
    }
    /// Never frees its memory or registration (the provider may still write them).
    fn leak(&mut self) {
        std::mem::forget(self.mr.take());
        std::mem::forget(std::mem::take(&mut self.mem));
        std::mem::forget(self.dev.take());
    }
}

/// Where a send stands in the rendezvous.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rdv {
    /// An eager message: pieces follow the head at once.
    No,
    /// The CTS receive is still to be posted.
    Want,
    /// Waiting for the CTS.
    Posted,
    /// The receiver wants tagged pieces.
    Tagged,
    /// Write the pieces at `addr` (+ offset) with `key`, telling the receiver `cookie`.
    Rma { addr: u64, key: u64, cookie: u32 },
}

struct SendMsg<M> {
    tag: Tag,
    src: MemSlice,
    n: usize,
    chunk: usize,
    /// Next part to post: 0 the head, 1..=n the pieces.
    next: usize,
    outstanding: usize,
    mr: Option<M>,
    rdv: Rdv,
}

struct RecvMsg<M> {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    n: usize,
    chunk: usize,
    next: usize,
    outstanding: usize,
    head_seen: bool,
    mr: Option<M>,
    /// Rendezvous: whether a CTS is due, and whether it went out.
    rdv: bool,
    cts_sent: bool,
    /// Remote writes still to land (RMA rendezvous), and the cookie they carry.
    rma_left: usize,
    cookie: Option<u32>,
}

#[derive(Clone, Copy)]
enum OpPart {
    SendHead(usize),
    SendPiece,
    /// The sender's receive of the CTS (a CTS-pool slot).
    CtsIn(usize),
    RecvHead(usize),
    RecvPiece {
        piece: usize,
        bounce: Option<usize>,
    },
    /// The receiver's CTS going out (a head-pool slot).
    CtsOut(usize),
    /// The receive of the peer's goodbye, and this side's going out.
    ByeIn,
    ByeOut,
}

struct Op {
    seq: u64,
    part: OpPart,
    /// Whether it holds a slot at the class gate.
    gated: bool,
}

/// One link's protocol state. Its methods that post take the transport's verbs; the
/// transport reports completions with [`Channel::complete`] and [`Channel::landed`], then
/// calls [`Channel::finish`].
pub struct Channel<M> {
    cfg: ChannelCfg,
    heads_out: Pool<M>,
    heads_in: Pool<M>,
    /// CTS receives of rendezvous sends: a pool of their own, so that receive heads waiting
    /// for the peer can never keep a send from asking where to write.
    cts_in: Pool<M>,
    bounce: Option<Pool<M>>,
    /// Bounce buffers in device memory, for reducing receives into GPU buffers.
    dev_bounce: Option<Pool<M>>,
    /// Device memory a reducing receive into a GPU buffer copies a host head's payload to
    /// before its kernel runs.
    dev_tmp: Option<crate::mem::Scratch>,
    /// One slot each: the peer's goodbye coming in, this side's going out.
    bye_in: Pool<M>,
    bye_out: Pool<M>,
    /// Whether the goodbye receive is posted; how many messages the peer said it sent in
    /// full when it went; whether this side said goodbye.
    bye_posted: bool,
    peer_sent: Option<u64>,
    bye_said: bool,
    sends: VecDeque<SendMsg<M>>,
    recvs: VecDeque<RecvMsg<M>>,
    base: [u64; 2],
    posted: [u64; 2],
    /// Messages, sends and receives, with parts still to post.
    to_post: [usize; 2],
    done: [u64; 2],
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    live: usize,
    /// Operations in flight, sends and receives: each direction has its own limit, so
    /// receives posted ahead can never keep this side's sends (which the peer waits for) out.
    inflight: [usize; 2],
    failed: Option<String>,
    /// Registrations of finished messages and cookies of finished receives, let go at the
    /// next call with verbs.
    parked: Vec<M>,
    stale_cookies: Vec<u32>,
    /// Gate slots held (one per gated send operation in flight), whether the operation being
    /// posted goes through the gate, and whether this link counts as busy there.
    gated: usize,
    next_gated: bool,
    busy: bool,
    /// Whether it still stands at the gate.
    joined: bool,
    /// Pieces sent as RMA writes and as tagged sends; messages sent whole by inject.
    writes: u64,
    tagged: u64,
    injected: u64,
}

impl<M> std::fmt::Debug for Channel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("me", &self.cfg.me)
            .field("peer", &self.cfg.peer)
            .field("done", &self.done)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

// SAFETY: raw pointers (posted buffers) are covered by the MemSlice contract; the channel is
// used by one thread at a time.
unsafe impl<M: Send> Send for Channel<M> {}

impl<M> Channel<M> {
    /// A channel with its head and CTS pools (registered through `v` when `cfg.register`).
    pub fn new<V: Verbs<Mr = M>>(mut cfg: ChannelCfg, v: &mut V) -> Result<Channel<M>> {
        // An injected message is a small message's head and payload, built on the stack.
        cfg.inject_bytes = cfg.inject_bytes.min(INJECT_MAX).min(SMALL_HEAD + cfg.wire.inline);
        let heads_out = Pool::new(v, cfg.head_slots, cfg.head_bytes, cfg.register)?;
        let heads_in = Pool::new(v, cfg.head_slots, cfg.head_bytes, cfg.register)?;
        let cts_in = Pool::new(v, cfg.head_slots, CTS_SLOT, cfg.register)?;
        let bye_in = Pool::new(v, 1, CTS_SLOT, cfg.register)?;
        let bye_out = Pool::new(v, 1, CTS_SLOT, cfg.register)?;
        // Nothing fails from here: the place at the gate is given back by the drop.
        cfg.gate.join(cfg.class);
        Ok(Channel {
            cfg,
            heads_out,
            heads_in,
            cts_in,
            bounce: None,
            dev_bounce: None,
            dev_tmp: None,
            bye_in,
            bye_out,
            bye_posted: false,
            peer_sent: None,
            bye_said: false,
            sends: VecDeque::new(),
            recvs: VecDeque::new(),
            base: [0; 2],
            posted: [0; 2],
            to_post: [0; 2],
            done: [0; 2],
            ops: Vec::new(),
            free_ops: Vec::new(),
            live: 0,
            inflight: [0; 2],
            failed: None,
            parked: Vec::new(),
            stale_cookies: Vec::new(),
            gated: 0,
            next_gated: false,
            busy: false,
            joined: true,
            writes: 0,
            tagged: 0,
            injected: 0,
        })
    }

    /// The transport (as its errors name it).
    pub fn kind(&self) -> TransportKind {
        self.cfg.kind
    }

    /// The peer's rank.
    pub fn peer(&self) -> usize {
        self.cfg.peer
    }
    /// Sends completed so far.
    pub fn sends_done(&self) -> u64 {
        self.done[0]
    }
    /// Receives completed so far.
    pub fn recvs_done(&self) -> u64 {
        self.done[1]
    }
    /// Pieces sent as RMA writes and as tagged sends (heads not counted).
    pub fn pieces_sent(&self) -> (u64, u64) {
        (self.writes, self.tagged)
    }
    /// Messages sent whole by inject.
    pub fn injected(&self) -> u64 {
        self.injected
    }
    /// Whether sends are queued or in flight.
    pub fn sending(&self) -> bool {
        !self.sends.is_empty()
    }
    /// Whether anything is still to be posted.
    pub fn has_posts(&self) -> bool {
        self.to_post[0] + self.to_post[1] > 0
    }
    /// Why the channel failed, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// Operations posted and not completed (the transport cancels them when the link goes).
    pub fn live_ops(&self) -> impl Iterator<Item = u32> + '_ {
        self.ops.iter().enumerate().filter(|(_, o)| o.is_some()).map(|(n, _)| n as u32)
    }
    /// How many.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Marks the channel failed: every later call fails with `e`.
    pub fn fail(&mut self, e: &Error) {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        self.mark_busy();
    }

    fn err(&self, op: &'static str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Transport { transport: self.cfg.kind, op, peer: Some(self.cfg.peer), source: e.into() }
    }

    fn remote(&self, what: String) -> Error {
        Error::Remote { rank: self.cfg.peer, what: format!("{}: {what}", self.cfg.kind) }
    }

    fn named(&self, e: Error) -> Error {
        match e {
            Error::Remote { rank, what } => Error::Remote { rank, what: format!("{}: {what}", self.cfg.kind) },
            e => e,
        }
    }

    fn new_op(&mut self, seq: u64, part: OpPart, gated: bool) -> u32 {
        let n = self.free_ops.pop().unwrap_or_else(|| {
            self.ops.push(None);
            (self.ops.len() - 1) as u32
        });
        self.ops[n as usize] = Some(Op { seq, part, gated });
        self.live += 1;
        n
    }

    fn take_op(&mut self, n: u32) -> Option<Op> {
        let op = self.ops.get_mut(n as usize)?.take()?;
        self.free_ops.push(n);
        self.live -= 1;
        Some(op)
    }

    /// Forgets an operation the transport gave up on (cancelled when the link went): no
    /// completion of it will be handled.
    pub fn forget(&mut self, n: u32) {
        self.take_op(n);
    }

    fn queued(&mut self, dir: usize) -> (u64, bool) {
        self.to_post[dir] += 1;
        self.posted[dir] += 1;
        self.mark_busy();
        let alone = if dir == 0 { self.sends.len() == 1 } else { self.recvs.len() == 1 };
        (self.posted[dir] - 1, alone && self.failed.is_none())
    }

    /// The part of a progress call that needs the transport: lets go of finished
    /// registrations and cookies, then posts what it can, sends first (on the latency path
    /// the peer waits for them).
    pub fn run<V: Verbs<Mr = M>>(&mut self, v: &mut V) -> Result<()> {
        self.parked.clear();
        for c in self.stale_cookies.drain(..) {
            v.drop_cookie(c);
        }
        if !self.bye_posted && self.peer_sent.is_none() {
            self.post_bye_recv(v)?;
        }
        self.check_peer_gone()?;
        if self.to_post[0] > 0 {
            self.post_sends(v)?;
        }
        if self.to_post[1] > 0 {
            self.post_recvs(v)?;
        }
        Ok(())
    }

    /// Keeps a receive posted for the peer's goodbye (outside the in-flight limit: one per
    /// link).
    fn post_bye_recv<V: Verbs<Mr = M>>(&mut self, v: &mut V) -> Result<()> {
        let p = self.bye_in.ptr(0);
        let desc = self.bye_in.desc::<V>();
        let n = self.new_op(0, OpPart::ByeIn, false);
        // SAFETY: the slot is the channel's until the receive completes or is cancelled.
        let ok = unsafe { v.recv(p, CTS_SLOT, desc, WireId { seq: 0, part: Part::Bye }, n) };
        if !matches!(ok, Ok(true)) {
            self.take_op(n);
        }
        self.bye_posted = ok?;
        Ok(())
    }

    /// Says goodbye to the peer: how many messages this side sent in full. Posted once;
    /// `Ok(false)` when there was no room (the transport may try again). The transport calls
    /// it when the link goes, and waits a moment for [`Channel::bye_pending`] to clear.
    pub fn say_bye<V: Verbs<Mr = M>>(&mut self, v: &mut V) -> Result<bool> {
        if self.bye_said {
            return Ok(true);
        }
        let b = wire::write_bye(self.cfg.nonce, self.done[0]);
        let id = WireId { seq: 0, part: Part::Bye };
        if BYE_BYTES <= self.cfg.inject_bytes && v.inject(&b, id)? {
            self.bye_said = true;
            return Ok(true);
        }
        let p = self.bye_out.ptr(0);
        // SAFETY: the slot holds 64 >= BYE_BYTES bytes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, BYE_BYTES) };
        let desc = self.bye_out.desc::<V>();
        let n = self.new_op(0, OpPart::ByeOut, false);
        // SAFETY: the slot is the channel's until the send completes or is cancelled.
        let ok = unsafe { v.send(p, BYE_BYTES, desc, id, n) };
        if !matches!(ok, Ok(true)) {
            self.take_op(n);
        }
        self.bye_said = ok?;
        Ok(self.bye_said)
    }

    /// Whether this side's goodbye is still on its way.
    pub fn bye_pending(&self) -> bool {
        self.ops.iter().flatten().any(|o| matches!(o.part, OpPart::ByeOut))
    }

    /// The peer said goodbye: once everything it sent has arrived, a receive still waiting
    /// can never complete, and a send still waiting for the peer's word never goes.
    fn check_peer_gone(&self) -> Result<()> {
        let Some(sent) = self.peer_sent else { return Ok(()) };
        let stuck_recv = !self.recvs.is_empty() && self.done[1] >= sent;
        let stuck_send = self.sends.iter().any(|m| matches!(m.rdv, Rdv::Want | Rdv::Posted));
        if stuck_recv || stuck_send {
            return Err(self.remote(format!(
                "closed its link with {} receive(s) and {} send(s) of rank {} still waiting (it had sent {sent} \
                 message(s), all received)",
                self.recvs.len(),
                self.sends.len(),
                self.cfg.me
            )));
        }
        Ok(())
    }

    /// Lets go of the registrations of finished messages (the caller's buffers are the
    /// caller's again: an operation ended).
    pub fn op_end(&mut self) {
        self.parked.clear();
    }

    /// Refuses a GPU buffer where the channel moves host memory only.
    pub fn check_memory(&self, s: &MemSlice) -> Result<()> {
        self.cfg.check_memory(s)
    }

    /// Whether a reducing receive into `dst` lands its pieces in device bounce buffers (a
    /// GPU buffer, on a channel that moves GPU memory itself).
    pub(super) fn device_bounce(&self, dst: &MemSlice) -> bool {
        on_device(dst) && self.cfg.device.is_some()
    }

    fn register<V: Verbs<Mr = M>>(&self, v: &mut V, s: MemSlice, remote: bool) -> Result<Option<M>> {
        // GPU memory is always registered (FI_HMEM: the provider must know it is device memory).
        if !(self.cfg.register || remote || on_device(&s)) || s.is_empty() {
            return Ok(None);
        }
        v.register(s, remote).map(Some)
    }

    /// Operation `n` completed: `bytes` (received, or sent), or the error in words.
    pub fn complete(&mut self, n: u32, result: std::result::Result<usize, String>) -> Result<()> {
        let Some(op) = self.take_op(n) else {
            return Err(Error::Internal(format!("{}: completion for unknown operation {n}", self.cfg.kind)));
        };
        match op.part {
            OpPart::ByeOut => return result.map(|_| ()).map_err(|e| self.err("send completion", e)),
            OpPart::ByeIn => {
                self.bye_posted = false;
                let bytes = result.map_err(|e| self.err("receive completion", e))?;
                let mut b = [0u8; BYE_BYTES];
                // SAFETY: the slot holds 64 >= BYE_BYTES bytes (a goodbye of another length
                // is refused).
                unsafe { std::ptr::copy_nonoverlapping(self.bye_in.ptr(0), b.as_mut_ptr(), BYE_BYTES) };
                let (nonce, sent) = wire::read_bye(&b, bytes).map_err(|e| self.remote(e))?;
                if nonce == self.cfg.nonce {
                    self.peer_sent = Some(sent);
                }
                // Else a goodbye of an earlier link of this slot: the receive is posted again.
                return Ok(());
            }
            _ => {}
        }
        let recv = matches!(op.part, OpPart::RecvHead(_) | OpPart::RecvPiece { .. } | OpPart::CtsOut(_));
        self.inflight[usize::from(recv)] -= 1;
        if op.gated {
            self.gated -= 1;
            self.cfg.gate.done(self.cfg.class);
        }
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let call = match op.part {
                    OpPart::SendHead(_) | OpPart::CtsOut(_) => "send completion",
                    OpPart::SendPiece => match self.sends.get((op.seq - self.base[0]) as usize).map(|m| m.rdv) {
                        Some(Rdv::Rma { .. }) => "write completion",
                        _ => "send completion",
                    },
                    _ => "receive completion",
                };
                return Err(self.err(call, e));
            }
        };
        match op.part {
            OpPart::SendHead(slot) => {
                self.heads_out.free.push(slot);
                self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1;
            }
            OpPart::SendPiece => self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1,
            OpPart::CtsIn(slot) => {
                let r = self.take_cts(op.seq, slot, bytes);
                self.cts_in.free.push(slot);
                r?;
                self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1;
            }
            OpPart::CtsOut(slot) => {
                self.heads_out.free.push(slot);
                self.recvs[(op.seq - self.base[1]) as usize].outstanding -= 1;
            }
            // Handled before the in-flight count.
            OpPart::ByeIn | OpPart::ByeOut => {}
            OpPart::RecvHead(slot) => {
                let r = self.check_head(op.seq, slot, bytes);
                self.heads_in.free.push(slot);
                r?;
                let m = &mut self.recvs[(op.seq - self.base[1]) as usize];
                m.head_seen = true;
                m.outstanding -= 1;
            }
            OpPart::RecvPiece { piece, bounce } => {
                let k = (op.seq - self.base[1]) as usize;
                let (dst, mode, chunk) = (self.recvs[k].dst, self.recvs[k].mode, self.recvs[k].chunk);
                let off = (piece - 1) * chunk;
                let want = chunk.min(dst.len() - off);
                if bytes != want {
                    return Err(self.remote(format!("piece {piece} carried {bytes} bytes where {want} were due")));
                }
                if let (RecvMode::Reduce { dtype, op: rop, local, mem }, Some(i), true) =
                    (mode, bounce, self.device_bounce(&dst))
                {
                    let b = self.dev_bounce.as_mut().expect("bounce pool exists while a piece is in it");
                    let src = b.ptr(i);
                    // SAFETY: dst and local hold the whole message (device memory of `mem`); the
                    // piece starts at a multiple of 64 bytes; the device bounce slot holds
                    // `want` bytes; the kernel completes before this returns.
                    unsafe {
                        mem.reduce(dtype, rop, dst.ptr().add(off), local.ptr().add(off), src, want / dtype.size())
                    };
                    b.free.push(i);
                } else if let (RecvMode::Reduce { dtype, op: rop, local, mem }, Some(i)) = (mode, bounce) {
                    let b = self.bounce.as_mut().expect("bounce pool exists while a piece is in it");
                    let src = b.ptr(i);
                    // SAFETY: dst and local hold the whole message; the piece starts at a
                    // multiple of 64 bytes; the bounce slot is 8-aligned and holds `want`.
                    let r = unsafe {
                        reduce_from_host(
                            mem,
                            &mut self.dev_tmp,
                            (dtype, rop),
                            dst,
                            off,
                            local,
                            src,
                            want / dtype.size(),
                        )
                    };
                    self.bounce.as_mut().expect("still there").free.push(i);
                    r?;
                }
                self.recvs[k].outstanding -= 1;
            }
        }
        Ok(())
    }

    /// After a batch of completions: retires finished messages in order, tells the gate
    /// whether this link still sends, and fails what the peer's goodbye says can never
    /// complete.
    pub fn finish(&mut self) -> Result<()> {
        while self.sends.front().is_some_and(|m| m.next > m.n && m.outstanding == 0) {
            if let Some(mr) = self.sends.pop_front().and_then(|m| m.mr) {
                self.parked.push(mr);
            }
            self.base[0] += 1;
            self.done[0] += 1;
        }
        while self.recvs.front().is_some_and(|m| m.next > m.n && m.outstanding == 0 && m.head_seen && m.rma_left == 0) {
            let m = self.recvs.pop_front().expect("checked above");
            self.stale_cookies.extend(m.cookie);
            if let Some(mr) = m.mr {
                self.parked.push(mr);
            }
            self.base[1] += 1;
            self.done[1] += 1;
        }
        self.mark_busy();
        self.check_peer_gone()
    }

    /// Tells the gate whether this link has sends queued or in flight (receives use no wire
    /// of this side). Only while another class shares the NIC: alone, nobody looks (a link
    /// busy when a second class joins is marked at its next post or progress call).
    pub fn mark_busy(&mut self) {
        let busy = !self.sends.is_empty() && self.failed.is_none() && self.joined && self.cfg.gate.contended();
        if busy != self.busy {
            self.busy = busy;
            self.cfg.gate.set_busy(self.cfg.class, busy);
        }
    }

    /// Cookies the peer's writes still carry (stale ones and those of receives in
    /// progress): the transport stops routing them when the link goes.
    pub fn cookies(&mut self) -> Vec<u32> {
        let mut v: Vec<u32> = self.stale_cookies.drain(..).collect();
        v.extend(self.recvs.iter().filter_map(|m| m.cookie));
        v
    }

    /// Lets go of every message and registration at once (a transport whose registrations
    /// must close under a lock calls it there, when the link goes).
    pub fn clear(&mut self) {
        self.sends.clear();
        self.recvs.clear();
        self.parked.clear();
        self.heads_in.mr = None;
        self.cts_in.mr = None;
        self.heads_out.mr = None;
        self.bounce = None;
        self.dev_bounce = None;
        self.bye_in.mr = None;
        self.bye_out.mr = None;
    }

    /// The link is going with operations the transport could not get back: keeps every
    /// buffer and registration they may still use alive for ever, so nothing writes into
    /// freed memory.
    pub fn leak(&mut self) {
        self.heads_in.leak();
        self.cts_in.leak();
        self.heads_out.leak();
        self.bye_in.leak();
        self.bye_out.leak();
        for b in [self.bounce.as_mut(), self.dev_bounce.as_mut()].into_iter().flatten() {
            b.leak();
        }
        for m in self.sends.drain(..) {
            std::mem::forget(m.mr);
        }
        for m in self.recvs.drain(..) {
            std::mem::forget(m.mr);
        }
    }
}

impl<M> Drop for Channel<M> {
    fn drop(&mut self) {
        self.leave_gate();
    }
}

impl<M> Channel<M> {
    /// Gives back the gate slots it holds and its place at the gate, whatever happens to
    /// the operations still posted (a transport calls it first when the link goes; the drop
    /// does otherwise).
    pub fn leave_gate(&mut self) {
        for _ in 0..std::mem::take(&mut self.gated) {
            self.cfg.gate.done(self.cfg.class);
        }
        if std::mem::take(&mut self.busy) {
            self.cfg.gate.set_busy(self.cfg.class, false);
        }
        if std::mem::take(&mut self.joined) {
            self.cfg.gate.leave(self.cfg.class);
        }
    }
}
