//! The host-staging link: two ordered message streams through one shared segment.
//!
//! Segment of the pair `(a, b)`, `a < b`; direction 0 is `a -> b`, direction 1 `b -> a`:
//!
//! ```text
//! [ header (4 KiB) | ctl 0 | ctl 1 | desc ring 0 | desc ring 1 | staging 0 | staging 1 ]
//! ctl d     = three cache lines: head (descriptors published), tail (descriptors consumed),
//!             data_tail (staging bytes released), all monotonic u64
//! desc ring = NDESC descriptors of 64 bytes: tag, message length, staging position,
//!             piece length, and up to INLINE payload bytes
//! staging   = a byte ring of `staging_bytes`
//! ```
//!
//! Every message, whatever its size, goes through the descriptor ring in posting order: a
//! message of at most `INLINE` bytes travels inside its descriptor; a longer one is cut into
//! pieces of at most `chunk_bytes`, each copied into the staging ring and announced by a
//! descriptor. The receiver takes descriptors strictly in order, so a small message can never
//! overtake a large one. Producer and consumer only ever write their own counters (single
//! producer, single consumer), with release/acquire ordering on the counters.
//!
//! A message of at least `single_copy` bytes in host memory may instead go *by address*
//! (single copy): its descriptor carries the sender's address, the receiver reads the bytes
//! straight from the sender's memory into its own buffer (`process_vm_readv`, the kernel's
//! cross-memory attach, as Open MPI's vader does) and then consumes the descriptor; the send
//! completes once it has. Each side probes, once, that it can read the other's memory (same
//! segment seen through the other's address), and says so in the header; a sender only
//! goes by address to a reader that said yes. Order is unchanged: it is one descriptor in
//! the same ring. Sends complete in posting order.
//!
//! A reader of a large message (at least [`HELP_MIN`] bytes, a plain copy) shares the copy
//! with its writer: it asks, in the descriptor's unused inline bytes, for the last three
//! quarters to be written into its buffer (`process_vm_writev`), and reads the first quarter
//! itself. A
//! writer waiting for its send takes the request (WANTED → HELPING → DONE); a reader that
//! finishes its half first withdraws the request (WANTED → WITHDRAWN) and reads the rest
//! itself, so nobody ever waits on a writer that is busy elsewhere. A rank that receives from
//! many (the popular expert of an all-to-all) then gets help from every sender instead of
//! copying everything alone.
//!
//! A side whose link is dropped marks the segment closed for its direction (after its last
//! descriptor): the other side's receives that the ring cannot complete then fail naming it,
//! and its sends that find no room fail too, instead of waiting for a peer that is gone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oxccl_core::link::{Link, MemSlice, RecvMode, Tag, TransportKind};
use oxccl_core::{Error, Result};

use super::bells::Doorbells;
use super::shm::Mapping;

/// Descriptors per direction.
pub const NDESC: usize = 256;
/// Largest message carried inside its descriptor.
pub const INLINE: usize = 32;
const MAGIC: u64 = 0x4f58_4343_4c48_5304;
/// Descriptor flag: the message is in the sender's memory at `data_pos` (single copy).
const BY_ADDRESS: u32 = 1;
/// Bytes a receiver reads by address per progress call (other links get their turn).
const READ_BUDGET: usize = 4 << 20;
/// Smallest message by address whose copy the reader shares with its writer.
pub const HELP_MIN: usize = 512 << 10;
/// States of a shared copy (the first word of a by-address descriptor's inline bytes).
mod help {
    pub const WANTED: u64 = 1;
    pub const HELPING: u64 = 2;
    pub const DONE: u64 = 3;
    pub const WITHDRAWN: u64 = 4;
    pub const FAILED: u64 = 5;
}
const HEADER: usize = 4096;
const CTL: usize = 256;

#[repr(C, align(64))]
struct Desc {
    tag: u64,
    msg_len: u64,
    data_pos: u64,
    piece_len: u32,
    flags: u32,
    inline: [u8; INLINE],
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    staging_bytes: u64,
    ndesc: u64,
    /// Set by the higher rank once it has mapped the segment (the name may go then).
    attached: AtomicU64,
    /// `closed[d]`: the writer of direction `d` dropped its link.
    closed: [AtomicU64; 2],
    /// Each side's process id and the address it mapped the segment at (side 0: the lower
    /// rank), for single-copy reads.
    pid: [AtomicU64; 2],
    base: [AtomicU64; 2],
    /// `readable[d]`: whether the reader of direction `d` can read its writer's memory (0:
    /// not probed yet, 1: yes, 2: no or not wanted).
    readable: [AtomicU64; 2],
}

/// Segment size for a given staging size per direction.
pub fn segment_bytes(staging: usize) -> usize {
    HEADER + 2 * CTL + 2 * NDESC * 64 + 2 * staging
}

fn ctl_off(d: usize) -> usize {
    HEADER + d * CTL
}
fn desc_off(d: usize) -> usize {
    HEADER + 2 * CTL + d * NDESC * 64
}
fn data_off(d: usize, staging: usize) -> usize {
    HEADER + 2 * CTL + 2 * NDESC * 64 + d * staging
}

/// Initializes a fresh (zeroed) segment; the magic is written last.
pub fn init_segment(m: &Mapping, staging: usize) {
    // SAFETY: the mapping is at least segment_bytes(staging) and page aligned; we are its
    // only user until the name is published.
    let h = unsafe { &*(m.ptr() as *const Header) };
    // SAFETY: as above; plain fields written before the magic is released.
    unsafe {
        std::ptr::addr_of_mut!((*(m.ptr() as *mut Header)).staging_bytes).write(staging as u64);
        std::ptr::addr_of_mut!((*(m.ptr() as *mut Header)).ndesc).write(NDESC as u64);
    }
    h.magic.store(MAGIC, Ordering::Release);
}

/// Marks a segment as mapped by the second side.
pub fn mark_attached(m: &Mapping) {
    // SAFETY: the mapping holds a Header at offset 0 (checked by check_segment).
    let h = unsafe { &*(m.ptr() as *const Header) };
    h.attached.store(1, Ordering::Release);
}

/// Checks a segment mapped from a peer.
pub fn check_segment(m: &Mapping, staging: usize) -> Result<()> {
    // SAFETY: mapping at least HEADER bytes (checked by Mapping::open against the size).
    let h = unsafe { &*(m.ptr() as *const Header) };
    if h.magic.load(Ordering::Acquire) != MAGIC {
        return Err(Error::Internal("host-staging segment has no valid header (different OxCCL version?)".into()));
    }
    // SAFETY: the magic was released after these fields were written.
    let (s, nd) = unsafe { ((*(m.ptr() as *const Header)).staging_bytes, (*(m.ptr() as *const Header)).ndesc) };
    if s != staging as u64 || nd != NDESC as u64 {
        return Err(Error::invalid_usage(format!(
            "host-staging segment was made with OXCCL_STAGING_BYTES={s}, this rank uses {staging}: every rank must use the same setting"
        )));
    }
    Ok(())
}

/// Addresses inside a mapped segment (a copyable view, so loops can hold it while they
/// mutate the link's queues).
#[derive(Clone, Copy)]
struct Seg {
    base: *mut u8,
    staging: usize,
}

impl Seg {
    fn header(&self) -> &Header {
        // SAFETY: the mapping holds a Header at offset 0 (checked by check_segment), shared
        // fields accessed atomically only.
        unsafe { &*(self.base as *const Header) }
    }
    fn ctl(&self, d: usize, which: usize) -> &AtomicU64 {
        // SAFETY: ctl lines are inside the mapping, 64-byte aligned, accessed atomically only;
        // the mapping outlives every Seg (both live in the link).
        unsafe { &*(self.base.add(ctl_off(d) + which * 64) as *const AtomicU64) }
    }
    fn desc(&self, d: usize, i: u64) -> *mut Desc {
        // SAFETY: index reduced modulo NDESC stays within the ring.
        unsafe { self.base.add(desc_off(d) + (i as usize % NDESC) * 64) as *mut Desc }
    }
    /// A by-address descriptor's shared-copy words: state, the reader's destination address,
    /// the bytes asked for (in its otherwise unused inline bytes).
    fn help(&self, d: usize, i: u64) -> &[AtomicU64; 3] {
        // SAFETY: `inline` is 32 bytes at offset 32 of a 64-byte-aligned descriptor, so three
        // 8-byte-aligned words fit; both sides touch them only atomically, and only while the
        // descriptor is published and not yet consumed.
        unsafe { &*((*self.desc(d, i)).inline.as_ptr() as *const [AtomicU64; 3]) }
    }

    fn data(&self, d: usize, pos: u64) -> *mut u8 {
        // SAFETY: pos reduced modulo the ring size stays within the staging ring.
        unsafe { self.base.add(data_off(d, self.staging) + (pos as usize % self.staging)) }
    }
}

struct SendOp {
    tag: Tag,
    src: MemSlice,
    sent: usize,
}

/// A published send not yet complete: `Some(i)`: sent by address in descriptor `i`, complete
/// once the reader consumed it; `None`: complete (it waits behind an earlier one).
type Unacked = Option<u64>;

struct RecvOp {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    got: usize,
    /// By address: where this side's own reading stops (the writer was asked for the rest);
    /// 0 until the message is first touched.
    own_end: usize,
}

/// A link to one peer on this host.
pub struct HostStagingLink {
    seg: Seg,
    _map: Mapping,
    me: usize,
    peer: usize,
    out: usize,
    staging: usize,
    chunk: usize,
    bells: Arc<Doorbells>,
    peer_bell: usize,
    sends: VecDeque<SendOp>,
    recvs: VecDeque<RecvOp>,
    /// Published sends that may not count as done yet (one went by address before them).
    unacked: VecDeque<Unacked>,
    /// Smallest message sent by address (0: never).
    single_copy: usize,
    /// This side has probed the peer's memory (or decided not to).
    probed: bool,
    /// The peer's process, once probed readable.
    peer_pid: Option<libc::pid_t>,
    /// Where a reduce receive by address lands before it is combined.
    bounce: Vec<u64>,
    posted: [u64; 2],
    done: [u64; 2],
    // producer state (direction `out`)
    head: u64,
    tail_seen: u64,
    data_head: u64,
    data_tail_seen: u64,
    // consumer state (direction `1 - out`)
    tail: u64,
    head_seen: u64,
}

impl std::fmt::Debug for HostStagingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStagingLink").field("me", &self.me).field("peer", &self.peer).finish_non_exhaustive()
    }
}

// SAFETY: the link owns its mapping; the raw buffers in queued operations are covered by the
// MemSlice contract.
unsafe impl Send for HostStagingLink {}

impl HostStagingLink {
    /// Wraps a mapped, checked segment. `me < peer` decides the direction this rank writes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        map: Mapping,
        me: usize,
        peer: usize,
        staging: usize,
        chunk: usize,
        single_copy: usize,
        bells: Arc<Doorbells>,
        peer_bell: usize,
    ) -> HostStagingLink {
        let out = usize::from(me > peer);
        {
            // SAFETY: the mapping holds a checked Header at offset 0; shared fields atomic.
            let h = unsafe { &*(map.ptr() as *const Header) };
            h.base[out].store(map.ptr() as u64, Ordering::Relaxed);
            h.pid[out].store(u64::from(std::process::id()), Ordering::Release);
        }
        let mut link = HostStagingLink {
            seg: Seg { base: map.ptr(), staging },
            _map: map,
            me,
            peer,
            out: usize::from(me > peer),
            staging,
            chunk: chunk.min(staging / 2).max(64) / 64 * 64,
            bells,
            peer_bell,
            sends: VecDeque::with_capacity(64),
            recvs: VecDeque::with_capacity(64),
            unacked: VecDeque::new(),
            single_copy,
            probed: false,
            peer_pid: None,
            bounce: Vec::new(),
            posted: [0; 2],
            done: [0; 2],
            head: 0,
            tail_seen: 0,
            data_head: 0,
            data_tail_seen: 0,
            tail: 0,
            head_seen: 0,
        };
        link.probe();
        link
    }

    /// Once the peer's process is known: checks that this side can read the peer's memory
    /// (the header as the peer mapped it must read back as ours), and tells the peer whether
    /// it may send by address.
    fn probe(&mut self) {
        if self.probed {
            return;
        }
        let (h, other, inbound) = (self.seg.header(), 1 - self.out, 1 - self.out);
        if self.single_copy == 0 {
            h.readable[inbound].store(2, Ordering::Release);
            self.probed = true;
            return;
        }
        let pid = h.pid[other].load(Ordering::Acquire);
        if pid == 0 {
            return; // the peer has not made its link yet
        }
        let base = h.base[other].load(Ordering::Relaxed);
        let mut theirs = [0u64; 3];
        let want = [MAGIC, self.staging as u64, NDESC as u64];
        let ok = pid <= i32::MAX as u64
            && read_remote(pid as libc::pid_t, base as usize, theirs.as_mut_ptr() as *mut u8, 24).is_ok()
            && theirs == want;
        if ok {
            self.peer_pid = Some(pid as libc::pid_t);
        } else {
            tracing::debug!(
                me = self.me,
                peer = self.peer,
                "host-staging: cannot read the peer's memory; staging only"
            );
        }
        h.readable[inbound].store(if ok { 1 } else { 2 }, Ordering::Release);
        tracing::debug!(me = self.me, peer = self.peer, single_copy = ok, "host-staging: probed the peer's memory");
        self.probed = true;
    }

    /// Counts published sends as done, in posting order, as far as the reader consumed the
    /// ones that went by address. Returns how many.
    fn retire(&mut self) -> usize {
        let mut n = 0;
        while let Some(&front) = self.unacked.front() {
            if let Some(i) = front {
                if self.tail_seen <= i {
                    self.tail_seen = self.seg.ctl(self.out, 1).load(Ordering::Acquire);
                    if self.tail_seen <= i {
                        break;
                    }
                }
            }
            self.unacked.pop_front();
            self.done[0] += 1;
            n += 1;
        }
        n
    }

    /// Writer: takes the reader's requests to write the second half of messages this side
    /// sent by address (see the module's documentation). Returns how many it wrote.
    fn help_reader(&mut self) -> usize {
        let (d, seg) = (self.out, self.seg);
        let mut n = 0;
        for &i in self.unacked.iter().flatten() {
            let h = seg.help(d, i);
            if h[0].load(Ordering::Acquire) != help::WANTED
                || h[0].compare_exchange(help::WANTED, help::HELPING, Ordering::AcqRel, Ordering::Acquire).is_err()
            {
                continue;
            }
            let (dst, want) = (h[1].load(Ordering::Relaxed), h[2].load(Ordering::Relaxed));
            // SAFETY: descriptor i is published and not consumed (its send is unacked).
            let (src, len) = unsafe { ((*seg.desc(d, i)).data_pos, (*seg.desc(d, i)).msg_len) };
            let pid = seg.header().pid[1 - d].load(Ordering::Acquire);
            let ok = want <= len
                && pid > 0
                && pid <= i32::MAX as u64
                && write_remote(pid as libc::pid_t, dst as usize, (src + len - want) as *const u8, want as usize)
                    .is_ok();
            h[0].store(if ok { help::DONE } else { help::FAILED }, Ordering::Release);
            n += 1;
        }
        if n > 0 {
            self.bells.ring(self.peer_bell);
        }
        n
    }

    /// A send whose bytes are all published.
    fn sent_one(&mut self) {
        if self.unacked.is_empty() {
            self.done[0] += 1;
        } else {
            self.unacked.push_back(None);
        }
    }

    /// Whether the peer dropped its link (it writes the other direction).
    fn peer_closed(&self) -> bool {
        self.seg.header().closed[1 - self.out].load(Ordering::Acquire) != 0
    }

    fn closed_error(&self, what: String) -> Error {
        Error::Remote { rank: self.peer, what: format!("closed its host-staging link {what}") }
    }

    /// Producer: moves queued sends into the ring. Returns pieces published.
    fn push(&mut self) -> Result<usize> {
        let d = self.out;
        let seg = self.seg;
        let mut n = 0;
        let mut budget = 2 * self.chunk;
        while let Some(op) = self.sends.front_mut() {
            if self.head - self.tail_seen >= NDESC as u64 {
                self.tail_seen = seg.ctl(d, 1).load(Ordering::Acquire);
                if self.head - self.tail_seen >= NDESC as u64 {
                    if self.peer_closed() {
                        return Err(self.closed_error(format!("with {} send(s) undelivered", self.sends.len())));
                    }
                    break;
                }
            }
            let len = op.src.len();
            let dp = seg.desc(d, self.head);
            if op.sent == 0
                && self.single_copy > 0
                && len >= self.single_copy
                && op.src.kind() == oxccl_core::mem::MemKind::Host
                && seg.header().readable[d].load(Ordering::Acquire) == 1
            {
                // SAFETY: the descriptor slot is ours (head - tail < NDESC).
                unsafe {
                    (*dp).tag = op.tag.0;
                    (*dp).msg_len = len as u64;
                    (*dp).data_pos = op.src.ptr() as u64;
                    (*dp).piece_len = 0;
                    (*dp).flags = BY_ADDRESS;
                }
                seg.help(d, self.head)[0].store(0, Ordering::Relaxed);
                self.unacked.push_back(Some(self.head));
                self.head += 1;
                seg.ctl(d, 0).store(self.head, Ordering::Release);
                self.sends.pop_front();
                n += 1;
                continue;
            }
            if len <= INLINE {
                // SAFETY: the descriptor slot is ours (head - tail < NDESC); src is valid for
                // len bytes (MemSlice contract).
                unsafe {
                    (*dp).tag = op.tag.0;
                    (*dp).msg_len = len as u64;
                    (*dp).piece_len = len as u32;
                    (*dp).flags = 0;
                    std::ptr::copy_nonoverlapping(op.src.ptr(), (*dp).inline.as_mut_ptr(), len);
                }
                op.sent = len;
            } else {
                let piece = (len - op.sent).min(self.chunk);
                let cap = self.staging as u64;
                let mut pos = self.data_head;
                let off = pos % cap;
                if off + piece as u64 > cap {
                    pos += cap - off;
                }
                if pos + piece as u64 - self.data_tail_seen > cap {
                    self.data_tail_seen = seg.ctl(d, 2).load(Ordering::Acquire);
                    if pos + piece as u64 - self.data_tail_seen > cap {
                        if self.peer_closed() {
                            return Err(self.closed_error(format!("with {} send(s) undelivered", self.sends.len())));
                        }
                        break;
                    }
                }
                // SAFETY: [pos, pos+piece) is free staging (checked against data_tail), does
                // not wrap (checked above); src has `len` valid bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(op.src.ptr().add(op.sent), seg.data(d, pos), piece);
                    (*dp).tag = op.tag.0;
                    (*dp).msg_len = len as u64;
                    (*dp).data_pos = pos;
                    (*dp).piece_len = piece as u32;
                    (*dp).flags = 0;
                }
                self.data_head = (pos + piece as u64).next_multiple_of(64);
                op.sent += piece;
                budget = budget.saturating_sub(piece);
            }
            self.head += 1;
            seg.ctl(d, 0).store(self.head, Ordering::Release);
            n += 1;
            if op.sent == len {
                self.sends.pop_front();
                self.sent_one();
            }
            if budget == 0 {
                break;
            }
        }
        Ok(n)
    }

    /// Consumer: delivers arrived pieces into posted receives, in order.
    fn pull(&mut self) -> Result<usize> {
        let d = 1 - self.out;
        let seg = self.seg;
        let mut n = 0;
        let mut released = None;
        let mut budget = 2 * self.chunk;
        while let Some(op) = self.recvs.front_mut() {
            if self.tail == self.head_seen {
                // Read before the head: a close seen here comes after every descriptor the
                // peer published, so an empty ring then means nothing more will come.
                let closed = seg.header().closed[d].load(Ordering::Acquire) != 0;
                self.head_seen = seg.ctl(d, 0).load(Ordering::Acquire);
                if self.tail == self.head_seen {
                    if closed {
                        let (got, len, waiting) = (op.got, op.dst.len(), self.recvs.len());
                        return Err(self.closed_error(format!(
                            "with {got} of {len} bytes of a message delivered ({waiting} receive(s) waiting)"
                        )));
                    }
                    break;
                }
            }
            let dp = seg.desc(d, self.tail) as *const Desc;
            // SAFETY: the descriptor was published (tail < head, acquire above) and the
            // producer does not touch it until we advance tail.
            let (tag, msg_len, pos, piece, flags) =
                unsafe { ((*dp).tag, (*dp).msg_len as usize, (*dp).data_pos, (*dp).piece_len as usize, (*dp).flags) };
            if op.got == 0 && (tag != op.tag.0 || msg_len != op.dst.len()) {
                return Err(oxccl_core::link::mismatch_error(
                    self.me,
                    self.peer,
                    op.dst.len(),
                    op.tag,
                    msg_len as u64,
                    Tag(tag),
                ));
            }
            if flags & BY_ADDRESS != 0 {
                let Some(pid) = self.peer_pid else {
                    return Err(Error::Remote {
                        rank: self.peer,
                        what: "sent a message by address to a rank that cannot read its memory".into(),
                    });
                };
                let len = op.dst.len();
                let h = seg.help(d, self.tail);
                if op.own_end == 0 {
                    // First touch: ask the writer for the last three quarters of a large copy
                    // (a rank that receives from many has the most to copy; measured with the
                    // MoE step of bench/ep_mpi.py, a quarter did better than a half and no
                    // worse than an eighth).
                    op.own_end = len;
                    if matches!(op.mode, RecvMode::Copy) && len >= HELP_MIN {
                        let split = len / 4 / 64 * 64;
                        h[1].store(op.dst.ptr() as u64 + split as u64, Ordering::Relaxed);
                        h[2].store((len - split) as u64, Ordering::Relaxed);
                        h[0].store(help::WANTED, Ordering::Release);
                        op.own_end = split;
                    }
                }
                if op.got == op.own_end && op.own_end < len {
                    match h[0].compare_exchange(help::WANTED, help::WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
                        // Not taken: the rest is this side's.
                        Ok(_) | Err(help::FAILED) => op.own_end = len,
                        Err(help::DONE) => {
                            op.got = len;
                            op.own_end = len;
                        }
                        Err(_) => {
                            // The writer is writing: wait for it (it rings when done), unless
                            // it left.
                            if seg.header().closed[d].load(Ordering::Acquire) != 0 {
                                return Err(self.closed_error(format!(
                                    "while writing its half of a {len}-byte message it sent by address"
                                )));
                            }
                            break;
                        }
                    }
                }
                let take = (op.own_end - op.got).min(READ_BUDGET);
                let at = pos as usize + op.got;
                let peer = self.peer;
                let gone = |e: std::io::Error| Error::Remote {
                    rank: peer,
                    what: format!(
                        "its memory could not be read for a {}-byte message ({e}): is it gone?",
                        op.dst.len()
                    ),
                };
                match op.mode {
                    _ if take == 0 => {}
                    RecvMode::Copy => {
                        // SAFETY: dst is valid for the whole message (MemSlice contract).
                        read_remote(pid, at, unsafe { op.dst.ptr().add(op.got) }, take).map_err(gone)?
                    }
                    RecvMode::Reduce { dtype, op: rop, local, mem } => {
                        let es = dtype.size();
                        if take % es != 0 {
                            return Err(Error::Remote {
                                rank: self.peer,
                                what: format!("sent {} bytes, not whole {dtype} elements", op.dst.len()),
                            });
                        }
                        let cap = (self.chunk / es).max(1) * es;
                        if self.bounce.len() * 8 < cap {
                            self.bounce.resize(cap.div_ceil(8), 0);
                        }
                        let mut done = 0;
                        while done < take {
                            let k = (take - done).min(cap);
                            let b = self.bounce.as_mut_ptr() as *mut u8;
                            read_remote(pid, at + done, b, k).map_err(gone)?;
                            // SAFETY: dst and local are valid for the message; the bounce
                            // buffer holds k read bytes, 8-byte aligned.
                            unsafe {
                                let o = op.got + done;
                                mem.reduce(dtype, rop, op.dst.ptr().add(o), local.ptr().add(o), b, k / es)
                            }
                            done += k;
                        }
                    }
                }
                // A sender that gave up (failed, aborted) drops its link, which marks it
                // closed, before its caller gets the buffer back: what was read may then be
                // memory reused since, so the receive fails instead of delivering it.
                std::sync::atomic::fence(Ordering::SeqCst);
                if seg.header().closed[d].load(Ordering::Acquire) != 0 {
                    let len = op.dst.len();
                    return Err(
                        self.closed_error(format!("while a {len}-byte message it sent by address was being read"))
                    );
                }
                op.got += take;
                budget = budget.saturating_sub(take);
                if op.got < op.dst.len() {
                    // The rest on the next call (the descriptor stays); this was work, so the
                    // driver does not go to sleep on it.
                    n += 1;
                    break;
                }
                self.tail += 1;
                seg.ctl(d, 1).store(self.tail, Ordering::Release);
                n += 1;
                self.recvs.pop_front();
                self.done[1] += 1;
                if budget == 0 {
                    break;
                }
                continue;
            }
            let whole = match op.mode {
                RecvMode::Reduce { dtype, .. } => piece % dtype.size() == 0,
                RecvMode::Copy => true,
            };
            if op.got + piece > op.dst.len()
                || !whole
                || (msg_len > INLINE && (pos % 64 != 0 || (pos as usize % self.staging) + piece > self.staging))
                || (msg_len <= INLINE && piece > INLINE)
            {
                return Err(Error::Remote {
                    rank: self.peer,
                    what: format!("sent a piece past the end of a {}-byte message", op.dst.len()),
                });
            }
            let src = if msg_len <= INLINE {
                // SAFETY: as above; inline bytes live in the descriptor.
                unsafe { (*dp).inline.as_ptr() }
            } else {
                seg.data(d, pos) as *const u8
            };
            // SAFETY: dst (and local) are valid for the whole message (MemSlice contract);
            // src holds `piece` published bytes; pieces are element-aligned (chunks are
            // multiples of 64 bytes, staging positions 64-aligned, inline data 32-aligned).
            unsafe {
                let dst = op.dst.ptr().add(op.got);
                match op.mode {
                    RecvMode::Copy => std::ptr::copy_nonoverlapping(src, dst, piece),
                    RecvMode::Reduce { dtype, op: rop, local, mem } => {
                        mem.reduce(dtype, rop, dst, local.ptr().add(op.got), src, piece / dtype.size())
                    }
                }
            }
            op.got += piece;
            self.tail += 1;
            if msg_len > INLINE {
                released = Some(pos + piece as u64);
                budget = budget.saturating_sub(piece);
            }
            seg.ctl(d, 1).store(self.tail, Ordering::Release);
            n += 1;
            if op.got == op.dst.len() {
                self.recvs.pop_front();
                self.done[1] += 1;
            }
            if budget == 0 {
                break;
            }
        }
        if let Some(p) = released {
            seg.ctl(d, 2).store(p, Ordering::Release);
        }
        Ok(n)
    }
}

impl Link for HostStagingLink {
    fn peer(&self) -> usize {
        self.peer
    }
    fn kind(&self) -> TransportKind {
        TransportKind::HostStaging
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.sends.push_back(SendOp { tag, src, sent: 0 });
        self.posted[0] += 1;
        Ok(self.posted[0] - 1)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        self.recvs.push_back(RecvOp { tag, dst, mode, got: 0, own_end: 0 });
        self.posted[1] += 1;
        Ok(self.posted[1] - 1)
    }
    fn progress(&mut self) -> Result<usize> {
        if !self.probed {
            self.probe();
        }
        let pushed = if self.sends.is_empty() { 0 } else { self.push()? };
        let pulled = if self.recvs.is_empty() { 0 } else { self.pull()? };
        let helped = if self.unacked.is_empty() { 0 } else { self.help_reader() };
        let retired = if self.unacked.is_empty() { 0 } else { self.retire() };
        if !self.unacked.is_empty() && self.peer_closed() {
            // Read the tail once more: the peer may have consumed everything, then closed.
            if self.retire() == 0 && !self.unacked.is_empty() {
                return Err(self.closed_error(format!("with {} send(s) unread", self.unacked.len())));
            }
        }
        if pushed + pulled > 0 {
            self.bells.ring(self.peer_bell);
        }
        Ok(pushed + pulled + helped + retired)
    }
    fn sends_done(&self) -> u64 {
        self.done[0]
    }
    fn recvs_done(&self) -> u64 {
        self.done[1]
    }
    fn close(&mut self, deadline: std::time::Instant) {
        // The lower rank created the segment: its name must live until the peer has mapped
        // it, or sends this rank completed could never be received.
        if self.me > self.peer {
            return;
        }
        // SAFETY: the mapping holds a Header at offset 0.
        let h = unsafe { &*(self.seg.base as *const Header) };
        while h.attached.load(Ordering::Acquire) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for HostStagingLink {
    fn drop(&mut self) {
        // A receive whose writer was asked to write into its buffer: take the request back, or
        // let a write under way finish, before the buffer goes back to its owner (who may
        // reuse it). Bounded: a writer that died mid-write writes no more.
        if let Some(op) = self.recvs.front() {
            if op.own_end != 0 && op.own_end < op.dst.len() {
                let h = self.seg.help(1 - self.out, self.tail);
                let _ = h[0].compare_exchange(help::WANTED, help::WITHDRAWN, Ordering::AcqRel, Ordering::Acquire);
                let give_up = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while h[0].load(Ordering::Acquire) == help::HELPING && std::time::Instant::now() < give_up {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
        }
        // After every descriptor this side published (release): the peer's receives that the
        // ring cannot complete fail rather than wait.
        self.seg.header().closed[self.out].store(1, Ordering::Release);
        self.bells.ring(self.peer_bell);
    }
}

/// Which way a cross-memory copy goes.
#[derive(Clone, Copy)]
enum Cross {
    /// From the other process into ours (`process_vm_readv`).
    Read,
    /// From ours into the other process (`process_vm_writev`).
    Write,
}

/// Copies `len` bytes between `local` (this process) and `addr` in process `pid`, as `way`
/// says (several calls if the kernel moves less). Callers: `local` is valid for `len` bytes
/// of writes (read) or reads (write).
fn cross(way: Cross, pid: libc::pid_t, addr: usize, local: *mut u8, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let l = libc::iovec { iov_base: local.wrapping_add(done) as *mut libc::c_void, iov_len: len - done };
        let remote = libc::iovec { iov_base: (addr + done) as *mut libc::c_void, iov_len: len - done };
        // SAFETY: `local` is valid for `len` bytes the way `way` uses it (callers' contract);
        // the remote side is checked by the kernel.
        let r = unsafe {
            match way {
                Cross::Read => libc::process_vm_readv(pid, &l, 1, &remote, 1, 0),
                Cross::Write => libc::process_vm_writev(pid, &l, 1, &remote, 1, 0),
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "moved nothing"));
        }
        done += r as usize;
    }
    Ok(())
}

/// Reads `len` bytes at `addr` in process `pid` into `dst`.
fn read_remote(pid: libc::pid_t, addr: usize, dst: *mut u8, len: usize) -> std::io::Result<()> {
    cross(Cross::Read, pid, addr, dst, len)
}

/// Writes `len` bytes from `src` (this process) to `addr` in process `pid`.
fn write_remote(pid: libc::pid_t, addr: usize, src: *const u8, len: usize) -> std::io::Result<()> {
    cross(Cross::Write, pid, addr, src as *mut u8, len)
}
