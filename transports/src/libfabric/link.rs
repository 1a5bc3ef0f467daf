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
//!
//! All of that is the protocol core's ([`oxccl_core::proto::Channel`]); this file supplies
//! its verbs (tagged sends and receives, `fi_writedata`, `fi_tinject`, registrations, cookies)
//! over the process's shared endpoint, and routes the endpoint's completions to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::link::{Link, MemSlice, RecvMode, Tag, TransportKind};
use oxccl_core::proto::{Channel, ChannelCfg, Part, Verbs, Wire, WireId, LARGE_HEAD, SMALL_HEAD};
use oxccl_core::{Error, Result};

use super::fabric::{Completion, OpCtx};
use super::fabric::{MemIface, Mr};
use super::{EndpointState, LibfabricConfig, SharedEndpoint, T};
use crate::mrcache::Reg;

/// Bytes of a head buffer: a small message's head and payload, or a large message's head,
/// or a CTS.
const HEAD_BYTES: usize = 4096;
/// Largest message sent whole in its head (one libfabric send).
pub const INLINE: usize = HEAD_BYTES - LARGE_HEAD;
/// Head buffers per direction (messages whose head is in flight).
const HEAD_SLOTS: usize = 16;
/// Bounce buffers for reducing receives.
const BOUNCE_SLOTS: usize = 4;
/// Pieces per message the tag can number (12 bits; piece 0 is the head, the last two numbers
/// are the rendezvous CTS and the goodbye).
const MAX_PIECES: usize = (1 << 12) - 3;
/// The tag's piece number of a CTS, and of a goodbye.
const CTS_PIECE: usize = (1 << 12) - 2;
const BYE_PIECE: usize = (1 << 12) - 1;
/// The protocol (heads, pieces, rendezvous) as this transport shapes it.
const WIRE: Wire = Wire { inline: INLINE, max_pieces: MAX_PIECES };

fn wire_tag(slot: u16, src: usize, seq: u64, piece: usize) -> u64 {
    (u64::from(slot) << 52) | ((src as u64 & 0xF_FFFF) << 32) | ((seq & 0xF_FFFF) << 12) | piece as u64
}

fn piece_number(p: Part) -> usize {
    match p {
        Part::Head => 0,
        Part::Piece(n) => n,
        Part::Cts => CTS_PIECE,
        Part::Bye => BYE_PIECE,
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

/// The link's own part of its verbs: who it talks to, and one libfabric context per
/// operation number of its channel (allocated once, reused; the context's id — link id and
/// operation number — routes the completion back here).
struct Wiring {
    id: u32,
    me: usize,
    peer: usize,
    addr: u64,
    my_slot: u16,
    peer_slot: u16,
    virt_addr: bool,
    ctxs: Vec<*mut OpCtx>,
}

impl Wiring {
    fn ctx(&mut self, op: u32) -> *mut OpCtx {
        while self.ctxs.len() <= op as usize {
            let n = self.ctxs.len() as u64;
            self.ctxs.push(Box::into_raw(OpCtx::new((u64::from(self.id) << 32) | n)));
        }
        self.ctxs[op as usize]
    }
    fn err(&self, op: &'static str, e: String) -> Error {
        Error::Transport { transport: T, op, peer: Some(self.peer), source: e.into() }
    }
    /// Frees the contexts (none may be in use any more).
    fn free_ctxs(&mut self) {
        for ctx in self.ctxs.drain(..) {
            // SAFETY: allocated by Box::into_raw in `ctx`; no operation uses it any more.
            drop(unsafe { Box::from_raw(ctx) });
        }
    }
}

/// The protocol core's verbs on the shared endpoint, its lock held.
struct Fabric<'a> {
    g: &'a mut EndpointState,
    w: &'a mut Wiring,
}

impl Verbs for Fabric<'_> {
    type Mr = Reg<Mr>;
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<Reg<Mr>> {
        let EndpointState { cache, ep, .. } = &mut *self.g;
        // SAFETY: the slice is valid until its operation completes (MemSlice contract) and
        // the operation ends (the engine's op_end) after that; the cache lets idle
        // registrations of caller memory go then, and registers whole pages of it, mapped
        // while the slice is.
        unsafe { cache.get(s.ptr(), s.len(), s.kind(), remote, |p, l, r, k| ep.register_on(p, l, r, MemIface::of(k))) }
            .map_err(|e| self.w.err("fi_mr_reg", e))
    }
    fn register_pool(&mut self, s: MemSlice) -> Result<Reg<Mr>> {
        // SAFETY: the core's own pool memory (host memory, or device memory of a pool of GPU
        // bounce buffers), which outlives this registration (the pool holds both, the
        // registration dropped first).
        let mr = unsafe { self.g.ep.register_on(s.ptr(), s.len(), false, MemIface::of(s.kind())) }
            .map_err(|e| self.w.err("fi_mr_reg", e))?;
        Ok(Reg { mr: Arc::new(mr), base: s.ptr() as usize })
    }
    fn desc(mr: &Reg<Mr>) -> *mut std::os::raw::c_void {
        mr.mr.desc()
    }
    fn rma_target(&self, mr: &Reg<Mr>, s: MemSlice) -> (u64, u64) {
        let addr = if self.w.virt_addr { s.ptr() as u64 } else { (s.ptr() as usize - mr.base) as u64 };
        (addr, mr.mr.key())
    }
    unsafe fn send(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut std::os::raw::c_void,
        id: WireId,
        op: u32,
    ) -> Result<bool> {
        let tag = wire_tag(self.w.peer_slot, self.w.me, id.seq, piece_number(id.part));
        let (addr, ctx) = (self.w.addr, self.w.ctx(op));
        // SAFETY: the core's contract for the buffer; ctx is a live heap context.
        unsafe { self.g.ep.tsend(buf, len, desc, addr, tag, ctx) }.map_err(|e| self.w.err("fi_tsend", e))
    }
    unsafe fn recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        desc: *mut std::os::raw::c_void,
        id: WireId,
        op: u32,
    ) -> Result<bool> {
        let tag = wire_tag(self.w.my_slot, self.w.peer, id.seq, piece_number(id.part));
        let ctx = self.w.ctx(op);
        // SAFETY: the core's contract for the buffer; ctx is a live heap context.
        unsafe { self.g.ep.trecv(buf, len, desc, tag, ctx) }.map_err(|e| self.w.err("fi_trecv", e))
    }
    unsafe fn write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut std::os::raw::c_void,
        cookie: u32,
        addr: u64,
        key: u64,
        op: u32,
    ) -> Result<bool> {
        let (dest, ctx) = (self.w.addr, self.w.ctx(op));
        // SAFETY: the core's contract (the CTS named this registered range); ctx is live.
        unsafe { self.g.ep.write(buf, len, desc, u64::from(cookie), dest, addr, key, ctx) }
            .map_err(|e| self.w.err("fi_writedata", e))
    }
    fn inject(&mut self, bytes: &[u8], id: WireId) -> Result<bool> {
        let tag = wire_tag(self.w.peer_slot, self.w.me, id.seq, piece_number(id.part));
        self.g.ep.tinject(bytes, self.w.addr, tag).map_err(|e| self.w.err("fi_tinject", e))
    }
    fn new_cookie(&mut self) -> u32 {
        self.g.new_cookie(self.w.id)
    }
    fn drop_cookie(&mut self, cookie: u32) {
        self.g.drop_cookie(cookie);
    }
}

/// A link to one peer over net-libfabric.
pub struct LibfabricLink {
    ch: Channel<Reg<Mr>>,
    w: Wiring,
    /// Whether an operation used the link since the last `op_end`.
    used: bool,
    /// Completions taken from the endpoint (kept to reuse its memory).
    mine: Vec<Completion>,
    /// Last field: dropped after every registration `ch` holds (they belong to its domain).
    endpoint: Arc<SharedEndpoint>,
}

// SAFETY: raw pointers (posted buffers, contexts) are owned by the link or covered by the
// MemSlice contract; the link is used by one thread at a time and the shared endpoint is
// behind the SharedEndpoint's lock.
unsafe impl Send for LibfabricLink {}

impl std::fmt::Debug for LibfabricLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibfabricLink").field("me", &self.w.me).field("peer", &self.w.peer).finish_non_exhaustive()
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
        let p = endpoint.provider();
        let can_rma = p.has_rma() && cfg.rma_min > 0;
        let ccfg = ChannelCfg {
            kind: TransportKind::NetLibfabric,
            me,
            peer,
            wire: WIRE,
            head_bytes: HEAD_BYTES,
            head_slots: HEAD_SLOTS,
            bounce_slots: BOUNCE_SLOTS,
            send_chunk: peer_chunk.max(64),
            recv_chunk: cfg.chunk.max(64),
            rma_min_send: peer_rma_min,
            rma_min_recv: if can_rma { cfg.rma_min.max(INLINE + 1) } else { 0 },
            rma_recv: can_rma && peer_rma_min > 0,
            has_rma: p.has_rma(),
            register: cfg.register_always || p.needs_local_mr(),
            inject_bytes: p.inject_delivered().min(SMALL_HEAD + INLINE),
            max_inflight: (p.tx_size.max(8) / 2).clamp(4, 64),
            gate: endpoint.gate.clone(),
            class: cfg.class,
            nonce: cfg.nonce,
            device: cfg.gpu.and_then(super::device_mem),
        };
        let id = endpoint.new_link_id();
        let mut w = Wiring { id, me, peer, addr, my_slot, peer_slot, virt_addr: p.virt_addr(), ctxs: Vec::new() };
        let mut g = endpoint.lock();
        let ch = Channel::new(ccfg, &mut Fabric { g: &mut g, w: &mut w });
        if ch.is_err() {
            // Nothing was posted: the link's id goes back.
            g.links.remove(&id);
        }
        drop(g);
        Ok(LibfabricLink { ch: ch?, w, used: false, mine: Vec::new(), endpoint })
    }

    /// Pieces this link has sent as RMA writes and as tagged sends (heads not counted).
    pub fn pieces_sent(&self) -> (u64, u64) {
        self.ch.pieces_sent()
    }

    /// Messages this link has sent whole with `fi_tinject`.
    pub fn injected(&self) -> u64 {
        self.ch.injected()
    }

    /// Runs `f` on the channel with its verbs, the endpoint locked; a failure fails the link.
    fn with_verbs<R>(&mut self, f: impl FnOnce(&mut Channel<Reg<Mr>>, &mut Fabric<'_>) -> Result<R>) -> Result<R> {
        let mut g = self.endpoint.lock();
        let r = f(&mut self.ch, &mut Fabric { g: &mut g, w: &mut self.w });
        drop(g);
        if let Err(e) = &r {
            self.ch.fail(e);
        }
        r
    }

    /// The completions of this link's operations, read (or found stashed by another link's
    /// read) while the endpoint is locked.
    fn run(&mut self) -> Result<usize> {
        let mut mine = std::mem::take(&mut self.mine);
        let id = self.w.id;
        let r = self.with_verbs(|ch, v| {
            ch.run(v)?;
            if !v.g.stash.is_empty() {
                if let Some(mut s) = v.g.stash.remove(&id) {
                    mine.append(&mut s);
                }
            }
            v.g.poll_for(id, &mut mine).map_err(|e| v.w.err("fi_cq_read", e))
        });
        if mine.is_empty() {
            self.mine = mine;
            // Nothing completed: nothing to retire (the busy mark may still be due, if
            // another class came).
            self.ch.mark_busy();
            return r.map(|_| 0);
        }
        let work = mine.len();
        // Every completion is accounted for, even after an error: its operation is over.
        let mut out = r.map(|_| ());
        for c in mine.drain(..) {
            let one = match c.remote {
                Some(data) => self.ch.landed(data as u32, c.result.map_err(|e| e.text)),
                None => self.ch.complete(c.id as u32, c.result.map_err(|e| e.text)),
            };
            if out.is_ok() {
                out = one;
            }
        }
        self.mine = mine;
        if let Err(e) = &out {
            self.ch.fail(e);
        }
        out?;
        let r = self.ch.finish();
        if let Err(e) = &r {
            self.ch.fail(e);
        }
        r.map(|_| work)
    }
}

impl Link for LibfabricLink {
    fn peer(&self) -> usize {
        self.w.peer
    }
    fn kind(&self) -> TransportKind {
        TransportKind::NetLibfabric
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.ch.check_memory(&src)?;
        self.used = true;
        if self.ch.can_inject(src.len()) {
            if let Some(seq) = self.with_verbs(|ch, v| ch.inject(tag, src, v))? {
                return Ok(seq);
            }
        }
        let (seq, alone) = self.ch.queue_send(tag, src);
        if alone {
            // Alone in its queue: posted at once, not at the next progress call.
            self.with_verbs(|ch, v| ch.post_sends(v))?;
        }
        Ok(seq)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        oxccl_core::link::check_reducing_recv(&dst, &mode)?;
        self.ch.check_memory(&dst)?;
        self.used = true;
        let (seq, alone) = self.ch.queue_recv(tag, dst, mode);
        if alone {
            self.with_verbs(|ch, v| ch.post_recvs(v))?;
        }
        Ok(seq)
    }
    fn progress(&mut self) -> Result<usize> {
        if let Some(e) = self.ch.failed() {
            return Err(Error::Remote { rank: self.w.peer, what: e.to_string() });
        }
        self.run()
    }
    fn sends_done(&self) -> u64 {
        self.ch.sends_done()
    }
    fn recvs_done(&self) -> u64 {
        self.ch.recvs_done()
    }
    fn op_end(&mut self) {
        if std::mem::take(&mut self.used) {
            let mut g = self.endpoint.lock();
            self.ch.op_end();
            g.cache.release_idle();
        }
    }
    fn close(&mut self, deadline: Instant) {
        // Let what was sent reach the peer.
        while self.ch.sending() && self.ch.failed().is_none() && Instant::now() < deadline {
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
        self.ch.leave_gate();
        let LibfabricLink { ch, w, mine, endpoint, .. } = self;
        let mut g = endpoint.lock();
        // The peer learns the link is gone (its receives waiting on this side fail at once,
        // not at their deadline). Not waited for on its own: like every operation still
        // posted, it is cancelled (a send already on its way completes) and waited for below.
        let _ = ch.say_bye(&mut Fabric { g: &mut g, w });
        // No more remote writes are routed here (their completions carry no context of ours).
        for c in ch.cookies() {
            g.drop_cookie(c);
        }
        // Completions read but not handled (a progress call failed after reading them):
        // their operations are over.
        for c in mine.drain(..) {
            if c.remote.is_none() {
                ch.forget(c.id as u32);
            }
        }
        if ch.live() > 0 {
            // Operations still posted point at buffers that are about to go (the caller's,
            // the channel's pools): cancel them and wait for their completions before anything
            // is freed.
            let live: Vec<u32> = ch.live_ops().collect();
            for n in live {
                // SAFETY: each context belongs to an operation posted on this endpoint that
                // has not completed (completed ones were forgotten by the channel).
                unsafe { g.ep.cancel(w.ctx(n)) };
            }
            // Wait for them without holding the endpoint between polls: other links and
            // communicators of the process share it and must not stall behind this one.
            drop(g);
            let until = Instant::now() + Duration::from_secs(2);
            while ch.live() > 0 && Instant::now() < until {
                let mut g = endpoint.lock();
                if g.poll().is_err() {
                    break;
                }
                for c in g.stash.remove(&w.id).unwrap_or_default() {
                    if c.remote.is_none() {
                        ch.forget(c.id as u32);
                    }
                }
                drop(g);
                std::thread::yield_now();
            }
            g = endpoint.lock();
        }
        g.links.remove(&w.id);
        g.stash.remove(&w.id);
        if ch.live() > 0 {
            tracing::error!(
                peer = w.peer,
                left = ch.live(),
                "net-libfabric: operations did not finish or cancel within 2 s of closing the link; their \
                 contexts, the link's buffers and its registrations are leaked so the provider cannot write \
                 into memory freed here; the caller's buffers of those operations are the caller's again and \
                 could still be written by the provider (an operation failed mid-way: the communicator is \
                 poisoned, recreate it)"
            );
            ch.leak();
            w.ctxs.clear();
        } else {
            w.free_ctxs();
        }
        // Registrations are closed here, under the lock (FI_THREAD_DOMAIN), and before the
        // last reference to the endpoint can go (`endpoint` is the last field).
        ch.clear();
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
