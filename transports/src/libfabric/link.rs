//! The net-libfabric link: ordered messages to one peer over the process's shared endpoint.
//!
//! Every message starts with a *head*. A message of at most `INLINE` bytes is its head alone,
//! one libfabric send: 16 bytes (magic, version, the operation's tag) and the payload, whose
//! length is what arrives after them; where the provider delivers injected data at the call
//! (shm), it goes by `fi_tinject` when no send is queued ahead of it and is done at once. A
//! larger message has a 32-byte head (magic, version, tag, length) and follows it as
//! pieces of at most `chunk` bytes sent straight from the caller's buffer into the peer's
//! (registered when the provider asks for it, or always with `register_always`); a reducing
//! receive lands its pieces in bounce buffers and combines them into the destination. The
//! receiver checks each head against what it expects: another operation's tag or length is
//! `InvalidUsage` naming both sides; a malformed head fails the link.
//!
//! A message of at least the receiver's `rma_min` bytes goes by *rendezvous*: the receiver,
//! as soon as the receive is posted, sends a clear-to-send (CTS) naming the operation it
//! expects and, when the receive is a plain copy and both ends have RMA, where to write (the
//! buffer's address or offset, its registration key and a 32-bit cookie). The sender checks
//! the CTS against its own message (a mismatch is `InvalidUsage` on this side as on the
//! other: no byte is written) and then writes the pieces with `fi_writedata`, each carrying
//! the cookie to the receiver's completion queue, where it counts them; or, for a reducing
//! receive, sends them as tagged pieces into bounce buffers. The head still goes first and
//! is checked as for any message.
//!
//! At most `max_inflight` libfabric operations per link are outstanding; `-FI_EAGAIN` stops
//! posting until the next progress call. Receives and sends complete in posted order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::budget::{ClassGate, TrafficClass};
use oxccl_core::link::{Link, MemSlice, RecvMode, Tag, TransportKind};
use oxccl_core::proto::{self, Cts, Wire, CTS_BYTES, LARGE_HEAD, SMALL_HEAD};
use oxccl_core::{Error, Result};

use super::fabric::{Completion, Mr, OpCtx};
use super::mrcache::Reg;
use super::{EndpointState, LibfabricConfig, SharedEndpoint, T};

/// Bytes of a head buffer: a small message's head and payload, or a large message's head,
/// or a CTS.
const HEAD_BYTES: usize = 4096;
/// Largest message sent whole in its head (one libfabric send).
pub const INLINE: usize = HEAD_BYTES - LARGE_HEAD;
/// Head buffers per direction (messages whose head is in flight).
const HEAD_SLOTS: usize = 16;
/// Bounce buffers for reducing receives.
const BOUNCE_SLOTS: usize = 4;
/// Pieces per message the tag can number (12 bits; piece 0 is the head, the last number is
/// the rendezvous CTS).
const MAX_PIECES: usize = (1 << 12) - 2;
/// The tag's piece number of a CTS.
const CTS_PIECE: usize = (1 << 12) - 1;
/// The protocol (heads, pieces, rendezvous) as this transport shapes it.
const WIRE: Wire = Wire { inline: INLINE, max_pieces: MAX_PIECES };

fn wire_tag(slot: u16, src: usize, seq: u64, piece: usize) -> u64 {
    (u64::from(slot) << 52) | ((src as u64 & 0xF_FFFF) << 32) | ((seq & 0xF_FFFF) << 12) | piece as u64
}

/// The protocol core's errors about what the peer sent, named as this transport's.
fn named(e: Error) -> Error {
    match e {
        Error::Remote { rank, what } => Error::Remote { rank, what: format!("net-libfabric: {what}") },
        e => e,
    }
}

/// A set of equal buffers in one registered allocation.
struct Pool {
    mem: Vec<u64>,
    size: usize,
    free: Vec<usize>,
    mr: Option<Mr>,
}

impl Pool {
    fn new(endpoint: &mut EndpointState, count: usize, size: usize, register: bool) -> Result<Pool> {
        let mem = vec![0u64; count * size / 8];
        let mr = if register {
            // SAFETY: the pool's memory is never reallocated and outlives the registration
            // (Pool's drop deregisters first).
            Some(
                unsafe { endpoint.ep.register(mem.as_ptr() as *const u8, mem.len() * 8, false) }
                    .map_err(fab_err("fi_mr_reg", None))?,
            )
        } else {
            None
        };
        Ok(Pool { mem, size, free: (0..count).rev().collect(), mr })
    }
    fn ptr(&mut self, i: usize) -> *mut u8 {
        // SAFETY: i < count, so the offset stays inside mem.
        unsafe { (self.mem.as_mut_ptr() as *mut u8).add(i * self.size) }
    }
    fn desc(&self) -> *mut std::os::raw::c_void {
        self.mr.as_ref().map_or(std::ptr::null_mut(), |m| m.desc())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Deregister before the memory goes.
        self.mr = None;
    }
}

fn fab_err(op: &'static str, peer: Option<usize>) -> impl Fn(String) -> Error {
    move |e| Error::Transport { transport: T, op, peer, source: e.into() }
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

struct SendMsg {
    tag: Tag,
    src: MemSlice,
    n: usize,
    chunk: usize,
    /// Next part to post: 0 the head, 1..=n the pieces.
    next: usize,
    outstanding: usize,
    mr: Option<Reg>,
    rdv: Rdv,
}

struct RecvMsg {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    n: usize,
    chunk: usize,
    next: usize,
    outstanding: usize,
    head_seen: bool,
    mr: Option<Reg>,
    /// Rendezvous: whether a CTS is due, and whether it went out.
    rdv: bool,
    cts_sent: bool,
    /// Remote writes still to land (RMA rendezvous), and the cookie they carry.
    rma_left: usize,
    cookie: Option<u32>,
}

#[derive(Clone, Copy)]
enum Part {
    SendHead(usize),
    SendPiece,
    /// The sender's receive of the CTS (a head-pool slot).
    CtsIn(usize),
    RecvHead(usize),
    RecvPiece {
        piece: usize,
        bounce: Option<usize>,
    },
    /// The receiver's CTS going out (a head-pool slot).
    CtsOut(usize),
}

struct Op {
    seq: u64,
    part: Part,
    /// Whether it holds a slot at the class gate.
    gated: bool,
}

/// Operations in flight, by slot. A slot's context is allocated once and reused: the
/// context's id (link id, slot) routes its completion back here.
struct Ops {
    slots: Vec<(Option<Op>, *mut OpCtx)>,
    free: Vec<u32>,
    live: usize,
}

impl Ops {
    fn insert(&mut self, link: u32, op: Op) -> (*mut OpCtx, u32) {
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                let n = self.slots.len() as u32;
                self.slots.push((None, Box::into_raw(OpCtx::new((u64::from(link) << 32) | u64::from(n)))));
                n
            }
        };
        self.slots[n as usize].0 = Some(op);
        self.live += 1;
        (self.slots[n as usize].1, n)
    }
    fn remove(&mut self, n: u32) -> Option<Op> {
        let op = self.slots.get_mut(n as usize)?.0.take()?;
        self.free.push(n);
        self.live -= 1;
        Some(op)
    }
    fn in_flight(&self) -> impl Iterator<Item = *mut OpCtx> + '_ {
        self.slots.iter().filter(|s| s.0.is_some()).map(|s| s.1)
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        if self.live > 0 {
            // The provider may still write these contexts (see LibfabricLink's drop): leak.
            return;
        }
        for (_, ctx) in self.slots.drain(..) {
            // SAFETY: allocated by Box::into_raw in insert; no operation uses it any more.
            drop(unsafe { Box::from_raw(ctx) });
        }
    }
}

/// What a link needs of its peer: rank, address handle, communicator slot and piece size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerEnd {
    pub(crate) rank: usize,
    pub(crate) addr: u64,
    pub(crate) slot: u16,
    pub(crate) chunk: usize,
    /// The peer's rendezvous threshold (0: it takes no rendezvous, and writes none).
    pub(crate) rma_min: usize,
}

/// A link to one peer over net-libfabric.
pub struct LibfabricLink {
    st: LinkState,
    /// Last field: dropped after every registration `st` holds (they belong to its domain).
    endpoint: Arc<SharedEndpoint>,
}

/// Everything of a link but its endpoint: its methods take the endpoint, locked, as an
/// argument, so that a progress call locks once and clones nothing.
struct LinkState {
    id: u32,
    me: usize,
    peer: usize,
    addr: u64,
    my_slot: u16,
    peer_slot: u16,
    /// Piece sizes: messages are cut by the receiver's setting (the peer's for sends).
    send_chunk: usize,
    recv_chunk: usize,
    register: bool,
    /// Rendezvous thresholds: for sends the peer's, for receives this side's (0: none).
    rma_min_send: usize,
    rma_min_recv: usize,
    /// Whether the receiver may ask for RMA writes (both ends can).
    rma_recv: bool,
    /// The provider's FI_RMA (with remote CQ data) and FI_MR_VIRT_ADDR.
    has_rma: bool,
    virt_addr: bool,
    /// Most bytes, head and payload, a message sent whole by `fi_tinject` may have: what
    /// the provider delivers at the call (`Provider::inject_delivered`; 0: no inject).
    inject_bytes: usize,
    /// Whether an operation used the link since the last `op_end`.
    used: bool,
    /// Cookies of finished rendezvous receives, returned under the next lock.
    stale_cookies: Vec<u32>,
    /// Pieces sent so far as RMA writes and as tagged sends; messages sent whole by inject.
    writes: u64,
    tagged: u64,
    injected: u64,
    heads_out: Pool,
    heads_in: Pool,
    /// CTS receives of rendezvous sends: a pool of their own, so that receive heads waiting
    /// for the peer can never keep a send from asking where to write.
    cts_in: Pool,
    bounce: Option<Pool>,
    sends: VecDeque<SendMsg>,
    recvs: VecDeque<RecvMsg>,
    base: [u64; 2],
    posted: [u64; 2],
    /// Messages, sends and receives, with parts still to post (the rest are only waited for).
    to_post: [usize; 2],
    done: [u64; 2],
    ops: Ops,
    /// Completions taken from the endpoint's stash (kept to reuse its memory).
    mine: Vec<Completion>,
    /// Operations in flight, sends and receives: each direction has its own limit, so
    /// receives posted ahead can never keep this side's sends (which the peer waits for) out.
    inflight: [usize; 2],
    max_inflight: usize,
    failed: Option<String>,
    /// Registrations of finished messages, closed under the endpoint's lock on the next
    /// progress call (the domain is FI_THREAD_DOMAIN: every call on it is serialised).
    parked: Vec<Reg>,
    /// Traffic class of the communicator, and the process's gate for this NIC: a send
    /// goes out only when the gate says so (bandwidth priority between classes).
    class: TrafficClass,
    gate: Arc<ClassGate>,
    /// Gate slots this link holds (one per gated send operation in flight).
    gated: usize,
    /// Whether the operation being posted goes through the gate.
    next_gated: bool,
    /// Whether this link counts as busy at the gate (messages queued or in flight).
    busy: bool,
}

// SAFETY: raw pointers (posted buffers, contexts) are owned by the link or covered by the
// MemSlice contract; the link is used by one thread at a time and the shared endpoint is
// behind the SharedEndpoint's lock.
unsafe impl Send for LibfabricLink {}

impl std::fmt::Debug for LibfabricLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibfabricLink").field("me", &self.st.me).field("peer", &self.st.peer).finish_non_exhaustive()
    }
}

impl LibfabricLink {
    pub(crate) fn new(
        endpoint: Arc<SharedEndpoint>,
        me: usize,
        my_slot: u16,
        peer: PeerEnd,
        cfg: &LibfabricConfig,
    ) -> Result<LibfabricLink> {
        let PeerEnd { rank: peer, addr, slot: peer_slot, chunk: peer_chunk, rma_min: peer_rma_min } = peer;
        let can_rma = endpoint.provider().has_rma() && cfg.rma_min > 0;
        let rma_min_recv = if can_rma { cfg.rma_min.max(INLINE + 1) } else { 0 };
        let register = cfg.register_always || endpoint.provider().needs_local_mr();
        let tx = endpoint.provider().tx_size.max(8);
        let (heads_out, heads_in, cts_in) = {
            let mut g = endpoint.lock();
            (
                Pool::new(&mut g, HEAD_SLOTS, HEAD_BYTES, register)?,
                Pool::new(&mut g, HEAD_SLOTS, HEAD_BYTES, register)?,
                Pool::new(&mut g, HEAD_SLOTS, 64, register)?,
            )
        };
        // Nothing fails from here: the link's id and its place at the gate are given back
        // by its drop.
        let id = endpoint.new_link_id();
        let gate = endpoint.gate.clone();
        gate.join(cfg.class);
        let (has_rma, virt_addr) = (endpoint.provider().has_rma(), endpoint.provider().virt_addr());
        let inject_bytes = endpoint.provider().inject_delivered().min(SMALL_HEAD + INLINE);
        let st = LinkState {
            id,
            has_rma,
            inject_bytes,
            virt_addr,
            me,
            peer,
            addr,
            my_slot,
            peer_slot,
            send_chunk: peer_chunk.max(64),
            recv_chunk: cfg.chunk.max(64),
            register,
            rma_min_send: peer_rma_min,
            rma_min_recv,
            rma_recv: can_rma && peer_rma_min > 0,
            used: false,
            stale_cookies: Vec::new(),
            writes: 0,
            tagged: 0,
            injected: 0,
            heads_out,
            heads_in,
            cts_in,
            bounce: None,
            sends: VecDeque::new(),
            recvs: VecDeque::new(),
            base: [0; 2],
            posted: [0; 2],
            to_post: [0; 2],
            done: [0; 2],
            ops: Ops { slots: Vec::new(), free: Vec::new(), live: 0 },
            mine: Vec::new(),
            inflight: [0; 2],
            max_inflight: (tx / 2).clamp(4, 64),
            failed: None,
            parked: Vec::new(),
            class: cfg.class,
            gate,
            gated: 0,
            next_gated: false,
            busy: false,
        };
        Ok(LibfabricLink { st, endpoint })
    }

    /// Pieces this link has sent as RMA writes and as tagged sends (heads not counted).
    pub fn pieces_sent(&self) -> (u64, u64) {
        (self.st.writes, self.st.tagged)
    }

    /// Messages this link has sent whole with `fi_tinject`.
    pub fn injected(&self) -> u64 {
        self.st.injected
    }

    fn run(&mut self) -> Result<usize> {
        let mut g = self.endpoint.lock();
        self.st.run_locked(&mut g)?;
        drop(g);
        self.st.run_unlocked()
    }

    /// Sends a small message whole with `fi_tinject` when no send is queued ahead of it: it
    /// is done when the call returns (no completion to wait for, no head buffer held). It
    /// takes and gives back a gate slot at once (its bytes count for the lower classes'
    /// credit) but never marks the link busy. True if it went; false: post it the usual way.
    fn inject(&mut self, tag: Tag, src: MemSlice) -> Result<bool> {
        let st = &mut self.st;
        let len = src.len();
        if SMALL_HEAD + len > st.inject_bytes || !st.sends.is_empty() || st.failed.is_some() {
            return Ok(false);
        }
        let bytes = SMALL_HEAD + len;
        let gated = st.gate.contended();
        if gated && !st.gate.try_take(st.class, st.max_inflight, bytes) {
            return Ok(false);
        }
        let h = proto::small_head(tag);
        // Not zeroed (4 KiB on the latency path): only the first `bytes` are written and read.
        let mut buf = [const { std::mem::MaybeUninit::<u8>::uninit() }; HEAD_BYTES];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: buf holds HEAD_BYTES > SMALL_HEAD + INLINE bytes and len <= INLINE; the
        // source holds len bytes (MemSlice contract). The slice covers exactly the bytes
        // written.
        let msg = unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), p, SMALL_HEAD);
            std::ptr::copy_nonoverlapping(src.ptr() as *const u8, p.add(SMALL_HEAD), len);
            std::slice::from_raw_parts(p as *const u8, bytes)
        };
        let wire = wire_tag(st.peer_slot, st.me, st.base[0], 0);
        let mut g = self.endpoint.lock();
        let r = g.ep.tinject(msg, st.addr, wire);
        drop(g);
        if gated {
            match r {
                // Nothing stays in flight: the slot is back at once, the credit spent.
                Ok(true) => st.gate.done(st.class),
                _ => st.gate.undo(st.class, bytes),
            }
        }
        match r {
            Ok(true) => {
                st.used = true;
                st.posted[0] += 1;
                st.base[0] += 1;
                st.done[0] += 1;
                st.injected += 1;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                let e = st.err("fi_tinject", e);
                st.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Counts a message just queued in direction `dir` (0 sends, 1 receives), posts it at
    /// once if it is alone, and returns its sequence number.
    fn queued(&mut self, dir: usize) -> Result<u64> {
        self.st.used = true;
        self.st.to_post[dir] += 1;
        self.st.posted[dir] += 1;
        self.st.mark_busy();
        self.post_now(dir == 0)?;
        Ok(self.st.posted[dir] - 1)
    }

    /// Posts a message just queued at once when nothing is queued ahead of it in its
    /// direction (the latency path: no wait for the next progress call). A failure fails the
    /// link, as in `progress`.
    fn post_now(&mut self, send: bool) -> Result<()> {
        let alone = if send { self.st.sends.len() == 1 } else { self.st.recvs.len() == 1 };
        if !alone || self.st.failed.is_some() {
            return Ok(());
        }
        let mut g = self.endpoint.lock();
        let r = if send { self.st.post_sends(&mut g) } else { self.st.post_recvs(&mut g) };
        drop(g);
        if let Err(e) = &r {
            self.st.failed = Some(e.to_string());
            self.st.mark_busy();
        }
        r
    }
}

impl LinkState {
    fn err(&self, op: &'static str, e: String) -> Error {
        Error::Transport { transport: T, op, peer: Some(self.peer), source: e.into() }
    }

    fn new_ctx(&mut self, seq: u64, part: Part) -> (*mut OpCtx, u32) {
        self.ops.insert(self.id, Op { seq, part, gated: self.next_gated })
    }

    /// Forgets an operation that was not posted after all (-FI_EAGAIN).
    fn unpost(&mut self, n: u32) {
        self.ops.remove(n);
    }

    fn register(&self, g: &mut EndpointState, s: MemSlice, remote: bool) -> Result<Option<Reg>> {
        if !(self.register || remote) || s.is_empty() {
            return Ok(None);
        }
        let EndpointState { cache, ep, .. } = g;
        // SAFETY: the slice is valid until its operation completes (MemSlice contract) and
        // the operation ends (the engine's op_end) after that; the cache lets idle
        // registrations of caller memory go then.
        unsafe { cache.get(ep, s.ptr(), s.len(), s.kind(), remote) }.map(Some).map_err(|e| self.err("fi_mr_reg", e))
    }

    /// Posts what it can of queued messages; false once the provider or the in-flight limit
    /// says stop.
    fn post_sends(&mut self, g: &mut EndpointState) -> Result<()> {
        for k in 0..self.sends.len() {
            let seq = self.base[0] + k as u64;
            while self.sends[k].next <= self.sends[k].n {
                if self.inflight[0] >= self.max_inflight {
                    return Ok(());
                }
                let m = &self.sends[k];
                if m.next >= 1 && matches!(m.rdv, Rdv::Want | Rdv::Posted) {
                    break; // its pieces wait for the CTS; later messages may go on
                }
                let bytes = if m.next == 0 { WIRE.head_len(m.src.len()) } else { m.chunk };
                // One class alone on this NIC in the process: no gate (one atomic load).
                let gated = self.gate.contended();
                if gated && !self.gate.try_take(self.class, self.max_inflight, bytes) {
                    return Ok(());
                }
                // Given back below if the provider says -FI_EAGAIN or the post fails.
                self.gated += usize::from(gated);
                self.next_gated = gated;
                let r = self.post_one_send(g, k, seq);
                self.next_gated = false;
                if gated && !matches!(r, Ok(true)) {
                    self.gated -= 1;
                    self.gate.undo(self.class, bytes);
                }
                if !r? {
                    return Ok(());
                }
                self.inflight[0] += 1;
                let m = &mut self.sends[k];
                m.next += 1;
                m.outstanding += 1;
                if m.next > m.n {
                    self.to_post[0] -= 1;
                }
            }
        }
        Ok(())
    }

    /// Posts the next operation of send `k` (head or piece); false if the provider said
    /// -FI_EAGAIN (nothing was posted).
    fn post_one_send(&mut self, g: &mut EndpointState, k: usize, seq: u64) -> Result<bool> {
        let m = &self.sends[k];
        let tag = wire_tag(self.peer_slot, self.me, seq, m.next);
        if m.next == 0 && m.rdv == Rdv::Want {
            // The CTS's receive goes first (the receiver may have sent it already).
            let Some(slot) = self.cts_in.free.pop() else { return Ok(false) };
            let p = self.cts_in.ptr(slot);
            let desc = self.cts_in.desc();
            // Not gated: the gate slot taken for this call is the head's.
            let (ctx, n) = self.ops.insert(self.id, Op { seq, part: Part::CtsIn(slot), gated: false });
            let ctag = wire_tag(self.my_slot, self.peer, seq, CTS_PIECE);
            // SAFETY: the 64-byte CTS slot is ours until the completion; ctx is live.
            let ok = unsafe { g.ep.trecv(p, 64, desc, ctag, ctx) }.map_err(|e| self.err("fi_trecv", e))?;
            if !ok {
                self.unpost(n);
                self.cts_in.free.push(slot);
                return Ok(false);
            }
            let m = &mut self.sends[k];
            m.rdv = Rdv::Posted;
            m.outstanding += 1;
            self.inflight[0] += 1;
        }
        let m = &self.sends[k];
        if m.next == 0 {
            let Some(slot) = self.heads_out.free.pop() else { return Ok(false) };
            let (src, len, mtag) = (m.src, m.src.len(), m.tag);
            let p = self.heads_out.ptr(slot);
            let mut h = [0u8; LARGE_HEAD];
            let (at, inline) = if len <= INLINE {
                h[..SMALL_HEAD].copy_from_slice(&proto::small_head(mtag));
                (SMALL_HEAD, len)
            } else {
                h = proto::large_head(mtag, len);
                (LARGE_HEAD, 0)
            };
            // SAFETY: the head slot holds HEAD_BYTES >= at + inline; the source holds len
            // bytes (MemSlice contract) and inline <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), p, at);
                std::ptr::copy_nonoverlapping(src.ptr() as *const u8, p.add(at), inline);
            }
            let desc = self.heads_out.desc();
            let (ctx, n) = self.new_ctx(seq, Part::SendHead(slot));
            // SAFETY: the head slot is ours until this operation completes (it is
            // returned to the pool only then); ctx is a live heap context.
            let ok = unsafe { g.ep.tsend(p, at + inline, desc, self.addr, tag, ctx) }
                .map_err(|e| self.err("fi_tsend", e))?;
            if !ok {
                self.unpost(n);
                self.heads_out.free.push(slot);
                return Ok(false);
            }
        } else {
            if m.next == 1 && m.mr.is_none() {
                let src = m.src;
                let mr = self.register(g, src, false)?;
                self.sends[k].mr = mr;
            }
            let m = &self.sends[k];
            let off = (m.next - 1) * m.chunk;
            let len = m.chunk.min(m.src.len() - off);
            // SAFETY: off < len of the source (piece numbering).
            let p = unsafe { m.src.ptr().add(off) } as *const u8;
            let desc = m.mr.as_ref().map_or(std::ptr::null_mut(), |r| r.mr.desc());
            let rdv = m.rdv;
            let (ctx, n) = self.new_ctx(seq, Part::SendPiece);
            let ok = match rdv {
                Rdv::Rma { addr, key, cookie } => {
                    let at = addr + off as u64;
                    // SAFETY: the CTS named a registered buffer of exactly this message's
                    // length (checked on arrival), so off + len stays inside it; the source
                    // stays valid until the message completes, which waits for this write;
                    // ctx is live.
                    unsafe { g.ep.write(p, len, desc, u64::from(cookie), self.addr, at, key, ctx) }
                        .map_err(|e| self.err("fi_writedata", e))?
                }
                // SAFETY: the caller's buffer stays valid until the message completes
                // (MemSlice contract), which waits for this operation; ctx is live.
                _ => unsafe { g.ep.tsend(p, len, desc, self.addr, tag, ctx) }.map_err(|e| self.err("fi_tsend", e))?,
            };
            if !ok {
                self.unpost(n);
                return Ok(false);
            }
            match rdv {
                Rdv::Rma { .. } => self.writes += 1,
                _ => self.tagged += 1,
            }
        }
        Ok(true)
    }

    fn post_recvs(&mut self, g: &mut EndpointState) -> Result<()> {
        for k in 0..self.recvs.len() {
            let seq = self.base[1] + k as u64;
            while self.recvs[k].next <= self.recvs[k].n {
                if self.inflight[1] >= self.max_inflight {
                    return Ok(());
                }
                let m = &self.recvs[k];
                let tag = wire_tag(self.my_slot, self.peer, seq, m.next);
                if m.next == 0 && m.rdv && !m.cts_sent && !self.send_cts(g, k, seq)? {
                    return Ok(());
                }
                let m = &self.recvs[k];
                if m.next == 0 {
                    let Some(slot) = self.heads_in.free.pop() else { return Ok(()) };
                    let p = self.heads_in.ptr(slot);
                    let desc = self.heads_in.desc();
                    let (ctx, n) = self.new_ctx(seq, Part::RecvHead(slot));
                    // SAFETY: the head slot is ours until the completion; ctx is live.
                    let ok =
                        unsafe { g.ep.trecv(p, HEAD_BYTES, desc, tag, ctx) }.map_err(|e| self.err("fi_trecv", e))?;
                    if !ok {
                        self.unpost(n);
                        self.heads_in.free.push(slot);
                        return Ok(());
                    }
                } else {
                    let piece = m.next;
                    let off = (piece - 1) * m.chunk;
                    let len = m.chunk.min(m.dst.len() - off);
                    let (p, desc, bounce) = match m.mode {
                        RecvMode::Copy => {
                            if piece == 1 && m.mr.is_none() {
                                let dst = m.dst;
                                let mr = self.register(g, dst, false)?;
                                self.recvs[k].mr = mr;
                            }
                            let m = &self.recvs[k];
                            // SAFETY: off < dst.len() (piece numbering).
                            (
                                unsafe { m.dst.ptr().add(off) },
                                m.mr.as_ref().map_or(std::ptr::null_mut(), |r| r.mr.desc()),
                                None,
                            )
                        }
                        RecvMode::Reduce { .. } => {
                            if self.bounce.is_none() {
                                let size = WIRE.piece_size(m.dst.len(), self.recv_chunk);
                                self.bounce = Some(Pool::new(g, BOUNCE_SLOTS, size, self.register)?);
                            }
                            let b = self.bounce.as_mut().expect("made above");
                            if b.size < len {
                                // A bigger message than the pool was made for: remake it once
                                // nothing is in it.
                                if b.free.len() < BOUNCE_SLOTS {
                                    return Ok(());
                                }
                                self.bounce = Some(Pool::new(g, BOUNCE_SLOTS, len.div_ceil(64) * 64, self.register)?);
                            }
                            let b = self.bounce.as_mut().expect("made above");
                            let Some(i) = b.free.pop() else { return Ok(()) };
                            (b.ptr(i), b.desc(), Some(i))
                        }
                    };
                    let (ctx, n) = self.new_ctx(seq, Part::RecvPiece { piece, bounce });
                    // SAFETY: the destination (caller's buffer or our bounce slot) stays valid
                    // until this operation completes; ctx is live.
                    let ok = unsafe { g.ep.trecv(p, len, desc, tag, ctx) }.map_err(|e| self.err("fi_trecv", e))?;
                    if !ok {
                        self.unpost(n);
                        if let (Some(i), Some(b)) = (bounce, self.bounce.as_mut()) {
                            b.free.push(i);
                        }
                        return Ok(());
                    }
                }
                self.inflight[1] += 1;
                let m = &mut self.recvs[k];
                m.next += 1;
                m.outstanding += 1;
                if m.next == 1 && m.cookie.is_some() {
                    // RMA rendezvous: the pieces arrive as remote writes, none is posted.
                    m.next = m.n + 1;
                }
                if m.next > m.n {
                    self.to_post[1] -= 1;
                }
            }
        }
        Ok(())
    }

    /// Sends receive `k`'s CTS: where to write it (a plain copy, with RMA on both ends) or
    /// that tagged pieces are wanted. False: no room now (nothing was sent).
    fn send_cts(&mut self, g: &mut EndpointState, k: usize, seq: u64) -> Result<bool> {
        if self.heads_out.free.is_empty() {
            return Ok(false);
        }
        let (dst, mode) = (self.recvs[k].dst, self.recvs[k].mode);
        let rma = self.rma_recv && matches!(mode, RecvMode::Copy);
        if rma && self.recvs[k].cookie.is_none() {
            let reg = self.register(g, dst, true)?.expect("a rendezvous message is not empty");
            let cookie = g.new_cookie(self.id);
            let m = &mut self.recvs[k];
            m.mr = Some(reg);
            m.cookie = Some(cookie);
            m.rma_left = m.n;
        }
        let m = &self.recvs[k];
        let cts = match (&m.mr, m.cookie) {
            (Some(reg), Some(cookie)) if rma => {
                let addr = if self.virt_addr { dst.ptr() as u64 } else { (dst.ptr() as usize - reg.base) as u64 };
                Cts::Rma { addr, key: reg.mr.key(), cookie }
            }
            _ => Cts::Tagged,
        };
        let c = proto::write_cts(m.tag, dst.len(), cts);
        let slot = self.heads_out.free.pop().expect("checked above");
        let p = self.heads_out.ptr(slot);
        // SAFETY: the slot holds HEAD_BYTES >= CTS_BYTES.
        unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), p, CTS_BYTES) };
        let desc = self.heads_out.desc();
        let (ctx, n) = self.new_ctx(seq, Part::CtsOut(slot));
        let tag = wire_tag(self.peer_slot, self.me, seq, CTS_PIECE);
        // SAFETY: the slot is ours until this send completes; ctx is live.
        let ok = unsafe { g.ep.tsend(p, CTS_BYTES, desc, self.addr, tag, ctx) }.map_err(|e| self.err("fi_tsend", e))?;
        if !ok {
            self.unpost(n);
            self.heads_out.free.push(slot);
            return Ok(false);
        }
        self.inflight[1] += 1;
        let m = &mut self.recvs[k];
        m.cts_sent = true;
        m.outstanding += 1;
        Ok(true)
    }

    /// The CTS for send `seq` arrived in head slot `slot`: check it names this message.
    fn take_cts(&mut self, seq: u64, slot: usize, bytes: usize) -> Result<()> {
        let k = (seq - self.base[0]) as usize;
        let p = self.cts_in.ptr(slot);
        let mut c = [0u8; CTS_BYTES];
        // SAFETY: the slot holds 64 >= CTS_BYTES bytes (those past `bytes` are not read as
        // the CTS's: a CTS of another length is refused).
        unsafe { std::ptr::copy_nonoverlapping(p, c.as_mut_ptr(), CTS_BYTES) };
        let m = &self.sends[k];
        let cts = proto::check_cts(&c, bytes, self.me, self.peer, m.tag, m.src.len(), self.has_rma).map_err(named)?;
        self.sends[k].rdv = match cts {
            Cts::Rma { addr, key, cookie } => Rdv::Rma { addr, key, cookie },
            Cts::Tagged => Rdv::Tagged,
        };
        Ok(())
    }

    /// A remote write carrying `cookie` landed: one piece of an RMA rendezvous receive.
    fn landed(&mut self, cookie: u32, bytes: usize) -> Result<()> {
        let Some(m) = self.recvs.iter_mut().find(|m| m.cookie == Some(cookie)) else {
            return Err(Error::Remote {
                rank: self.peer,
                what: format!("net-libfabric: a remote write (cookie {cookie}) for no receive in progress"),
            });
        };
        if m.rma_left == 0 || bytes > m.chunk {
            return Err(Error::Remote {
                rank: self.peer,
                what: format!(
                    "net-libfabric: a remote write of {bytes} bytes with {} pieces of at most {} bytes due",
                    m.rma_left, m.chunk
                ),
            });
        }
        m.rma_left -= 1;
        Ok(())
    }

    fn complete(&mut self, c: Completion) -> Result<()> {
        if let Some(data) = c.remote {
            return self.landed(data as u32, c.result.map_err(|e| self.err("remote write", e.text))?);
        }
        let n = c.id as u32;
        let Some(op) = self.ops.remove(n) else {
            return Err(Error::Internal(format!("net-libfabric: completion for unknown operation {n}")));
        };
        let recv = matches!(op.part, Part::RecvHead(_) | Part::RecvPiece { .. } | Part::CtsOut(_));
        self.inflight[usize::from(recv)] -= 1;
        if op.gated {
            self.gated -= 1;
            self.gate.done(self.class);
        }
        let bytes = match c.result {
            Ok(b) => b,
            Err(e) => {
                let call = match op.part {
                    Part::SendHead(_) | Part::CtsOut(_) => "fi_tsend completion",
                    Part::SendPiece => match self.sends.get((op.seq - self.base[0]) as usize).map(|m| m.rdv) {
                        Some(Rdv::Rma { .. }) => "fi_writedata completion",
                        _ => "fi_tsend completion",
                    },
                    _ => "fi_trecv completion",
                };
                return Err(self.err(call, e.text));
            }
        };
        match op.part {
            Part::SendHead(slot) => {
                self.heads_out.free.push(slot);
                self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1;
            }
            Part::SendPiece => self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1,
            Part::CtsIn(slot) => {
                let r = self.take_cts(op.seq, slot, bytes);
                self.cts_in.free.push(slot);
                r?;
                self.sends[(op.seq - self.base[0]) as usize].outstanding -= 1;
            }
            Part::CtsOut(slot) => {
                self.heads_out.free.push(slot);
                self.recvs[(op.seq - self.base[1]) as usize].outstanding -= 1;
            }
            Part::RecvHead(slot) => {
                let r = self.check_head(op.seq, slot, bytes);
                self.heads_in.free.push(slot);
                r?;
                let m = &mut self.recvs[(op.seq - self.base[1]) as usize];
                m.head_seen = true;
                m.outstanding -= 1;
            }
            Part::RecvPiece { piece, bounce } => {
                let k = (op.seq - self.base[1]) as usize;
                let (dst, mode, chunk) = (self.recvs[k].dst, self.recvs[k].mode, self.recvs[k].chunk);
                let off = (piece - 1) * chunk;
                let want = chunk.min(dst.len() - off);
                if bytes != want {
                    return Err(Error::Remote {
                        rank: self.peer,
                        what: format!("net-libfabric: piece {piece} carried {bytes} bytes where {want} were due"),
                    });
                }
                if let (RecvMode::Reduce { dtype, op: rop, local, mem }, Some(i)) = (mode, bounce) {
                    let b = self.bounce.as_mut().expect("bounce pool exists while a piece is in it");
                    let src = b.ptr(i);
                    // SAFETY: dst and local hold the whole message; the piece starts at a
                    // multiple of 64 bytes; the bounce slot is 8-aligned and holds `want`.
                    unsafe {
                        mem.reduce(dtype, rop, dst.ptr().add(off), local.ptr().add(off), src, want / dtype.size())
                    };
                    b.free.push(i);
                }
                self.recvs[k].outstanding -= 1;
            }
        }
        Ok(())
    }

    fn check_head(&mut self, seq: u64, slot: usize, bytes: usize) -> Result<()> {
        let k = (seq - self.base[1]) as usize;
        let (tag, dst, mode) = (self.recvs[k].tag, self.recvs[k].dst, self.recvs[k].mode);
        let p = self.heads_in.ptr(slot);
        let mut h = [0u8; LARGE_HEAD];
        // SAFETY: the slot holds HEAD_BYTES >= LARGE_HEAD bytes (those past `bytes` are not
        // read as the message's).
        unsafe { std::ptr::copy_nonoverlapping(p, h.as_mut_ptr(), LARGE_HEAD) };
        WIRE.check_head(&h, bytes, self.me, self.peer, tag, dst.len()).map_err(named)?;
        let small = dst.len() <= INLINE;
        if small && !dst.is_empty() {
            let n = dst.len();
            // SAFETY: the slot holds SMALL_HEAD + n bytes that arrived; dst holds n bytes
            // (MemSlice contract), local likewise for a reduction. The payload starts 16
            // bytes into an 8-aligned slot.
            unsafe {
                let src = p.add(SMALL_HEAD);
                match mode {
                    RecvMode::Copy => std::ptr::copy_nonoverlapping(src, dst.ptr(), n),
                    RecvMode::Reduce { dtype, op, local, mem } => {
                        mem.reduce(dtype, op, dst.ptr(), local.ptr(), src, n / dtype.size())
                    }
                }
            }
        }
        Ok(())
    }

    fn retire(&mut self) {
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
    }

    /// A progress call's part under the endpoint's lock: closes finished registrations,
    /// posts what it can, and reads completions into `mine`.
    fn run_locked(&mut self, g: &mut EndpointState) -> Result<()> {
        self.parked.clear();
        for c in self.stale_cookies.drain(..) {
            g.drop_cookie(c);
        }
        // Sends first: on the latency path the peer is waiting for them, while a receive
        // posted a moment later is still long ahead of the peer's answer.
        if self.to_post[0] > 0 {
            self.post_sends(g)?;
        }
        if self.to_post[1] > 0 {
            self.post_recvs(g)?;
        }
        if !g.stash.is_empty() {
            if let Some(mut v) = g.stash.remove(&self.id) {
                self.mine.append(&mut v);
            }
        }
        g.poll_for(self.id, &mut self.mine).map_err(|e| self.err("fi_cq_read", e))?;
        Ok(())
    }

    /// The rest of a progress call, without the lock: handles the completions read.
    fn run_unlocked(&mut self) -> Result<usize> {
        if self.mine.is_empty() {
            // Nothing completed: nothing to retire (the busy mark may still be due, if
            // another class came).
            self.mark_busy();
            return Ok(0);
        }
        let mut mine = std::mem::take(&mut self.mine);
        let work = mine.len();
        // Every completion is accounted for, even after an error: its operation is over.
        let mut r = Ok(());
        for c in mine.drain(..) {
            let one = self.complete(c);
            if r.is_ok() {
                r = one;
            }
        }
        self.mine = mine;
        r?;
        self.retire();
        self.mark_busy();
        Ok(work)
    }

    /// Tells the gate whether this link has sends queued or in flight (receives use no
    /// wire of this side). Only while another class shares the NIC: alone, nobody looks (a
    /// link busy when a second class joins is marked at its next post or progress call).
    fn mark_busy(&mut self) {
        let busy = !self.sends.is_empty() && self.failed.is_none() && self.gate.contended();
        if busy != self.busy {
            self.busy = busy;
            self.gate.set_busy(self.class, busy);
        }
    }
}

impl Link for LibfabricLink {
    fn peer(&self) -> usize {
        self.st.peer
    }
    fn kind(&self) -> TransportKind {
        TransportKind::NetLibfabric
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        if self.inject(tag, src)? {
            return Ok(self.st.posted[0] - 1);
        }
        let len = src.len();
        self.st.sends.push_back(SendMsg {
            tag,
            src,
            n: WIRE.pieces(len, self.st.send_chunk),
            chunk: WIRE.piece_size(len, self.st.send_chunk),
            next: 0,
            outstanding: 0,
            mr: None,
            rdv: if WIRE.rendezvous(len, self.st.rma_min_send) { Rdv::Want } else { Rdv::No },
        });
        self.queued(0)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        let len = dst.len();
        self.st.recvs.push_back(RecvMsg {
            tag,
            dst,
            mode,
            n: WIRE.pieces(len, self.st.recv_chunk),
            chunk: WIRE.piece_size(len, self.st.recv_chunk),
            next: 0,
            outstanding: 0,
            head_seen: false,
            mr: None,
            rdv: WIRE.rendezvous(len, self.st.rma_min_recv),
            cts_sent: false,
            rma_left: 0,
            cookie: None,
        });
        self.queued(1)
    }
    fn progress(&mut self) -> Result<usize> {
        if let Some(e) = &self.st.failed {
            return Err(Error::Remote { rank: self.st.peer, what: e.clone() });
        }
        let r = self.run();
        if let Err(e) = &r {
            // A failed link holds no class back.
            self.st.failed = Some(e.to_string());
            self.st.mark_busy();
        }
        r
    }
    fn sends_done(&self) -> u64 {
        self.st.done[0]
    }
    fn recvs_done(&self) -> u64 {
        self.st.done[1]
    }
    fn op_end(&mut self) {
        if std::mem::take(&mut self.st.used) {
            let mut g = self.endpoint.lock();
            self.st.parked.clear();
            g.cache.release_idle();
        }
    }
    fn close(&mut self, deadline: Instant) {
        // Let what was sent reach the peer.
        while !self.st.sends.is_empty() && self.st.failed.is_none() && Instant::now() < deadline {
            if self.progress().is_err() {
                break;
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for LibfabricLink {
    fn drop(&mut self) {
        // Gate slots and the busy mark go whatever happens to the operations below.
        for _ in 0..std::mem::take(&mut self.st.gated) {
            self.st.gate.done(self.st.class);
        }
        if std::mem::take(&mut self.st.busy) {
            self.st.gate.set_busy(self.st.class, false);
        }
        self.st.gate.leave(self.st.class);
        let LibfabricLink { st, endpoint } = self;
        let mut g = endpoint.lock();
        // No more remote writes are routed here (their completions carry no context of ours).
        for c in st.stale_cookies.drain(..).chain(st.recvs.iter().filter_map(|m| m.cookie)) {
            g.drop_cookie(c);
        }
        // Completions read but not handled (a progress call failed after reading them):
        // their operations are over.
        for c in st.mine.drain(..) {
            if c.remote.is_none() {
                st.ops.remove(c.id as u32);
            }
        }
        if st.ops.live > 0 {
            // Operations still posted point at buffers that are about to go (the caller's,
            // our pools): cancel them and wait for their completions before anything is freed.
            for ctx in st.ops.in_flight() {
                // SAFETY: each context belongs to an operation posted on this endpoint that
                // has not completed (completed ones were removed from `ops`).
                unsafe { g.ep.cancel(ctx) };
            }
            // Wait for them without holding the endpoint between polls: other links and
            // communicators of the process share it and must not stall behind this one.
            drop(g);
            let until = Instant::now() + Duration::from_secs(2);
            while st.ops.live > 0 && Instant::now() < until {
                let mut g = endpoint.lock();
                if g.poll().is_err() {
                    break;
                }
                for c in g.stash.remove(&st.id).unwrap_or_default() {
                    if c.remote.is_none() {
                        st.ops.remove(c.id as u32);
                    }
                }
                drop(g);
                std::thread::yield_now();
            }
            g = endpoint.lock();
        }
        g.links.remove(&st.id);
        g.stash.remove(&st.id);
        if st.ops.live > 0 {
            tracing::error!(
                peer = st.peer,
                left = st.ops.live,
                "net-libfabric: operations did not finish or cancel within 2 s of closing the link; their \
                 contexts, buffers and registrations are leaked so the provider cannot write into freed memory"
            );
            let dead = |p: &mut Pool| {
                std::mem::forget(p.mr.take());
                std::mem::forget(std::mem::take(&mut p.mem));
            };
            dead(&mut st.heads_in);
            dead(&mut st.cts_in);
            dead(&mut st.heads_out);
            if let Some(b) = st.bounce.as_mut() {
                dead(b);
            }
            for m in st.sends.drain(..) {
                std::mem::forget(m.mr);
            }
            for m in st.recvs.drain(..) {
                std::mem::forget(m.mr);
            }
        }
        // Registrations are closed here, under the lock (FI_THREAD_DOMAIN), and before the
        // last reference to the endpoint can go (`endpoint` is the last field).
        st.sends.clear();
        st.recvs.clear();
        st.parked.clear();
        st.heads_in.mr = None;
        st.cts_in.mr = None;
        st.heads_out.mr = None;
        st.bounce = None;
        // A receive's registration for remote writes must not outlive the link: a peer still
        // running could write into a buffer its caller has back.
        g.cache.release_idle();
        drop(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_their_fields_apart() {
        let t = wire_tag(0xABC, 0xF_FFFF, 0x1_2345_6789, 0xFFF);
        assert_eq!(t >> 52, 0xABC);
        assert_eq!((t >> 32) & 0xF_FFFF, 0xF_FFFF);
        assert_eq!((t >> 12) & 0xF_FFFF, 0x5_6789);
        assert_eq!(t & 0xFFF, 0xFFF);
    }

    #[test]
    fn pieces_fit_the_tag_and_stay_aligned() {
        assert_eq!(WIRE.pieces(0, 1 << 18), 0);
        assert_eq!(WIRE.pieces(INLINE, 1 << 18), 0);
        assert_eq!(WIRE.pieces(INLINE + 1, 1 << 18), 1);
        assert_eq!(WIRE.pieces(1 << 20, 1 << 18), 4);
        for len in [1usize << 30, (1 << 34) + 7, 5 << 20] {
            let p = WIRE.pieces(len, 1 << 18);
            assert!(p <= MAX_PIECES, "{len}: {p}");
            assert_eq!(WIRE.piece_size(len, 1 << 18) % 64, 0);
            assert!(p * WIRE.piece_size(len, 1 << 18) >= len);
        }
    }
}
