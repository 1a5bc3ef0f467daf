//! The protocol core's [`Verbs`] over a reliable connected queue pair (ibverbs RC), which has
//! no tag matching: [`RcVerbs`] matches in software, as UCX does.
//!
//! * A tagged send goes as a send with immediate data; the immediate carries the message's
//!   [`WireId`] (20 bits of sequence number, 12 of part, as net-libfabric's tags). It lands
//!   in the next of the receiver's posted *slots* (an RC queue pair consumes its receives in
//!   order), and is copied from there into the receive the core posted for that id, or, if
//!   that receive is not posted yet, kept as an early message until it is.
//! * An RMA write goes as an RDMA write with immediate; the immediate is the cookie the
//!   receiver handed out, which routes the landed bytes back to its receive. It takes a slot
//!   too (no bytes land in it).
//! * The slots are posted again as soon as their bytes are copied out. A sender that finds
//!   no slot posted waits in the queue pair (RNR retry), never fails.
//!
//! The queue pair itself is an [`RcQueue`]: net-ibverbs' over a real QP, and an in-memory
//! one for the tests (`mem_rc`), so everything above the verbs runs without a device.

use std::collections::HashMap;
use std::os::raw::c_void;

use crate::error::{Error, Result};
use crate::link::{MemSlice, TransportKind};

use super::verbs::{Event, EventVerbs, Part, Verbs, WireId};

/// What a completion of an [`RcQueue`] says.
#[derive(Debug)]
pub enum RcEvent {
    /// A send or write posted with work request `wr` completed (bytes, or the error).
    Sent {
        /// Its work request number.
        wr: u64,
        /// Bytes, or the error in words.
        result: std::result::Result<usize, String>,
    },
    /// Slot `slot` received a send with immediate `imm` of `len` bytes.
    Received {
        /// The slot.
        slot: u32,
        /// The immediate data.
        imm: u32,
        /// Bytes in the slot, or the error in words.
        result: std::result::Result<usize, String>,
    },
    /// An RDMA write with immediate `imm` of `len` bytes landed (consuming slot `slot`).
    Written {
        /// The slot its completion took.
        slot: u32,
        /// The immediate data (a cookie).
        imm: u32,
        /// Bytes written, or the error in words.
        result: std::result::Result<usize, String>,
    },
}

/// A reliable connected queue pair, as [`RcVerbs`] uses it.
pub trait RcQueue {
    /// A memory registration.
    type Mr;
    /// Registers `s` (for the peer's RDMA writes too, when `remote`).
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<Self::Mr>;
    /// The descriptor a post passes for memory inside `mr` (its local key).
    fn desc(mr: &Self::Mr) -> *mut c_void;
    /// Where the peer writes `s` inside `mr`: the address and the remote key.
    fn rma_target(&self, mr: &Self::Mr, s: MemSlice) -> (u64, u64);
    /// Posts receive slot `slot`: `len` bytes at `buf`, inside a registration (`desc`).
    ///
    /// # Safety
    /// `buf` holds `len` writable bytes until the slot's completion is polled.
    unsafe fn post_slot(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, slot: u32) -> Result<()>;
    /// Posts a send of `len` bytes at `buf` with immediate `imm`; `Ok(false)`: the send queue
    /// is full, nothing posted.
    ///
    /// # Safety
    /// `buf` holds `len` bytes, unchanged until the completion of `wr` is polled.
    unsafe fn send_imm(&mut self, buf: *const u8, len: usize, desc: *mut c_void, imm: u32, wr: u64) -> Result<bool>;
    /// Posts an RDMA write of `len` bytes at `buf` to the peer's `addr` (`key`) with
    /// immediate `imm`; `Ok(false)`: the send queue is full.
    ///
    /// # Safety
    /// As [`RcQueue::send_imm`]; the target lies in the peer's registration of `key`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn write_imm(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        addr: u64,
        key: u64,
        imm: u32,
        wr: u64,
    ) -> Result<bool>;
    /// Appends the completions since the last call.
    fn poll(&mut self, out: &mut Vec<RcEvent>);
    /// An operation ended (see [`EventVerbs::op_end`]). By default: nothing.
    fn op_end(&mut self) {}
}

/// The immediate of a tagged send: 20 bits of sequence number, 12 of part.
fn imm_of(id: WireId) -> u32 {
    let part = match id.part {
        Part::Head => 0,
        Part::Piece(n) => n as u32,
        Part::Cts => (1 << 12) - 2,
        Part::Bye => (1 << 12) - 1,
    };
    (((id.seq & 0xF_FFFF) as u32) << 12) | (part & 0xFFF)
}

/// A receive the core posted, waiting for its message.
struct Posted {
    buf: *mut u8,
    len: usize,
    op: u32,
}

// SAFETY: the address is of a receive buffer its poster keeps valid until the completion
// (Verbs::recv contract), whichever thread drives the verbs; one thread does at a time.
unsafe impl Send for Posted {}

/// The protocol core's verbs over an [`RcQueue`] (see the module's documentation).
pub struct RcVerbs<Q: RcQueue> {
    q: Q,
    /// The slots' memory, its registration, and each slot's size.
    slots: Vec<u8>,
    slots_mr: Option<Q::Mr>,
    slot_bytes: usize,
    /// Receives the core posted, by immediate.
    posted: HashMap<u32, Posted>,
    /// Messages that came before their receive, by immediate.
    early: HashMap<u32, Vec<u8>>,
    events: Vec<Event>,
    polled: Vec<RcEvent>,
    next_cookie: u32,
    /// Why the queue pair failed, once it did.
    failed: Option<String>,
    /// The transport and the peer, as errors name them.
    kind: TransportKind,
    peer: usize,
}

impl<Q: RcQueue> std::fmt::Debug for RcVerbs<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcVerbs")
            .field("slots", &(self.slots.len() / self.slot_bytes.max(1)))
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

impl<Q: RcQueue> RcVerbs<Q> {
    /// Verbs over `q` (to `peer`, of transport `kind`: errors name them) with `count`
    /// receive slots of `slot_bytes` each (at least the largest tagged message: a head
    /// buffer, a piece), posted now.
    pub fn new(mut q: Q, count: usize, slot_bytes: usize, (kind, peer): (TransportKind, usize)) -> Result<RcVerbs<Q>> {
        let mut slots = vec![0u8; count * slot_bytes];
        // SAFETY: the slots live in `slots`, whose heap buffer never moves or shrinks while
        // the verbs live (the registration is dropped first, in `Drop`).
        let s = unsafe { MemSlice::new(slots.as_mut_ptr(), slots.len()) };
        let mr = q.register(s, false)?;
        let mut v = RcVerbs {
            q,
            slots,
            slots_mr: None,
            slot_bytes,
            posted: HashMap::new(),
            early: HashMap::new(),
            events: Vec::new(),
            polled: Vec::new(),
            next_cookie: 0,
            failed: None,
            kind,
            peer,
        };
        v.slots_mr = Some(mr);
        for k in 0..count as u32 {
            v.repost(k)?;
        }
        Ok(v)
    }

    fn slot_ptr(&mut self, k: u32) -> *mut u8 {
        // SAFETY: k < count (slot numbers are the ones posted).
        unsafe { self.slots.as_mut_ptr().add(k as usize * self.slot_bytes) }
    }

    fn repost(&mut self, k: u32) -> Result<()> {
        let p = self.slot_ptr(k);
        let desc = Q::desc(self.slots_mr.as_ref().expect("registered at creation"));
        // SAFETY: the slot is `slot_bytes` of the registered slots, not read again until its
        // next completion.
        unsafe { self.q.post_slot(p, self.slot_bytes, desc, k) }
    }

    /// The queue pair.
    pub fn queue(&self) -> &Q {
        &self.q
    }

    /// Takes the queue pair's completions and turns them into the core's events.
    fn pump(&mut self) -> Result<()> {
        let mut polled = std::mem::take(&mut self.polled);
        self.q.poll(&mut polled);
        let mut r = Ok(());
        for e in polled.drain(..) {
            let one = match e {
                RcEvent::Sent { wr, result } => {
                    self.events.push(Event::Done(wr as u32, result));
                    Ok(())
                }
                RcEvent::Written { slot, imm, result } => match result {
                    Ok(n) => {
                        self.events.push(Event::Landed(imm, Ok(n)));
                        self.repost(slot)
                    }
                    Err(e) => Err(self.broken(e)),
                },
                RcEvent::Received { slot, imm, result } => self.received(slot, imm, result),
            };
            if r.is_ok() {
                r = one;
            }
        }
        self.polled = polled;
        r
    }

    fn received(&mut self, slot: u32, imm: u32, result: std::result::Result<usize, String>) -> Result<()> {
        let len = match result {
            Ok(n) => n,
            Err(e) => {
                // A failed receive completion (its immediate is undefined): the queue pair is
                // in error and receives nothing more. Every receive waiting fails with it.
                return Err(self.broken(e));
            }
        };
        let src = self.slot_ptr(slot);
        match self.posted.remove(&imm) {
            Some(p) => {
                let r = if len > p.len {
                    Err(format!("truncated: {len} bytes for a {}-byte receive", p.len))
                } else {
                    // SAFETY: the slot holds `len` received bytes; the receive's buffer holds
                    // `p.len >= len` (Verbs::recv contract).
                    unsafe { std::ptr::copy_nonoverlapping(src, p.buf, len) };
                    Ok(len)
                };
                self.events.push(Event::Done(p.op, r));
            }
            None => {
                // SAFETY: the slot holds `len` received bytes.
                let data = unsafe { std::slice::from_raw_parts(src, len) }.to_vec();
                if self.early.insert(imm, data).is_some() {
                    // 2^20 messages ahead of their receives: the ids wrapped.
                    return Err(self.broken(format!("two early messages with the id {imm:#x}")));
                }
            }
        }
        self.repost(slot)
    }
}

impl<Q: RcQueue> RcVerbs<Q> {
    /// An error if the queue pair failed.
    fn alive(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(what) => Err(Error::Transport {
                transport: self.kind,
                op: "post",
                peer: Some(self.peer),
                source: format!("the queue pair failed earlier: {what}").into(),
            }),
        }
    }

    /// The queue pair failed (`what`): every receive waiting fails with it; the error to
    /// return.
    fn broken(&mut self, what: String) -> Error {
        for (_, p) in self.posted.drain() {
            self.events.push(Event::Done(p.op, Err(what.clone())));
        }
        self.failed = Some(what.clone());
        Error::Transport { transport: self.kind, op: "completion", peer: Some(self.peer), source: what.into() }
    }
}

impl<Q: RcQueue> Drop for RcVerbs<Q> {
    fn drop(&mut self) {
        // The registration goes before the memory it covers.
        self.slots_mr = None;
    }
}

impl<Q: RcQueue> Verbs for RcVerbs<Q> {
    type Mr = Q::Mr;
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<Q::Mr> {
        self.q.register(s, remote)
    }
    fn register_pool(&mut self, s: MemSlice) -> Result<Q::Mr> {
        self.q.register(s, false)
    }
    fn desc(mr: &Q::Mr) -> *mut c_void {
        Q::desc(mr)
    }
    fn rma_target(&self, mr: &Q::Mr, s: MemSlice) -> (u64, u64) {
        self.q.rma_target(mr, s)
    }
    unsafe fn send(&mut self, buf: *const u8, len: usize, desc: *mut c_void, id: WireId, op: u32) -> Result<bool> {
        self.alive()?;
        if len > self.slot_bytes {
            return Err(Error::Internal(format!("a {len}-byte message for {}-byte receive slots", self.slot_bytes)));
        }
        // SAFETY: the caller's contract.
        unsafe { self.q.send_imm(buf, len, desc, imm_of(id), u64::from(op)) }
    }
    unsafe fn recv(&mut self, buf: *mut u8, len: usize, _: *mut c_void, id: WireId, op: u32) -> Result<bool> {
        self.alive()?;
        let imm = imm_of(id);
        if let Some(data) = self.early.remove(&imm) {
            let r = if data.len() > len {
                Err(format!("truncated: {} bytes for a {len}-byte receive", data.len()))
            } else {
                // SAFETY: the caller's contract: buf holds len >= data bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
                Ok(data.len())
            };
            self.events.push(Event::Done(op, r));
            return Ok(true);
        }
        if self.posted.insert(imm, Posted { buf, len, op }).is_some() {
            return Err(Error::Internal(format!("two receives posted for the same message ({id:?})")));
        }
        Ok(true)
    }
    unsafe fn write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        cookie: u32,
        addr: u64,
        key: u64,
        op: u32,
    ) -> Result<bool> {
        self.alive()?;
        // SAFETY: the caller's contract.
        unsafe { self.q.write_imm(buf, len, desc, addr, key, cookie, u64::from(op)) }
    }
    fn inject(&mut self, _: &[u8], _: WireId) -> Result<bool> {
        // Never called: a channel over RC has no inject (inject_bytes 0).
        Ok(false)
    }
    fn new_cookie(&mut self) -> u32 {
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        self.next_cookie
    }
    fn drop_cookie(&mut self, _: u32) {}
}

impl<Q: RcQueue> EventVerbs for RcVerbs<Q> {
    fn events(&mut self, out: &mut Vec<Event>) -> Result<()> {
        let r = self.pump();
        out.append(&mut self.events);
        r
    }
    fn cancel_all(&mut self) {
        self.posted.clear();
    }
    fn op_end(&mut self) {
        self.q.op_end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mem_rc::{MemRc, KIND};

    /// A failed receive completion (here: a message larger than the slot it landed in) fails
    /// every receive waiting, and the verbs refuse further posts, naming the peer: a side
    /// that only receives does not wait forever on a queue pair in error.
    #[test]
    fn a_failed_receive_completion_fails_every_waiting_receive() {
        let (mut qa, qb) = MemRc::pair(8);
        let mut b = RcVerbs::new(qb, 2, 64, (KIND, 0)).unwrap();
        let mut buf = vec![0u8; 64];
        let id = WireId { seq: 1, part: Part::Head };
        let other = WireId { seq: 2, part: Part::Head };
        // SAFETY: `buf` outlives the verbs' use of it (the receives fail below).
        unsafe {
            assert!(b.recv(buf.as_mut_ptr(), 64, std::ptr::null_mut(), id, 5).unwrap());
            assert!(b.recv(buf.as_mut_ptr(), 64, std::ptr::null_mut(), other, 6).unwrap());
        }
        let big = [1u8; 100];
        // SAFETY: `big` outlives the send (carried out at the next poll).
        assert!(unsafe { qa.send_imm(big.as_ptr(), 100, std::ptr::null_mut(), imm_of(id), 1) }.unwrap());
        let mut ev = Vec::new();
        let e = b.events(&mut ev).unwrap_err();
        assert!(matches!(e, Error::Transport { peer: Some(0), .. }), "{e}");
        let mut failed: Vec<u32> = ev
            .iter()
            .filter_map(|e| {
                matches!(e, Event::Done(_, Err(_))).then_some(match e {
                    Event::Done(op, _) => *op,
                    _ => 0,
                })
            })
            .collect();
        failed.sort();
        assert_eq!(failed, vec![5, 6], "both waiting receives failed: {ev:?}");
        // SAFETY: refused before any use of the buffer.
        let again =
            unsafe { b.recv(buf.as_mut_ptr(), 64, std::ptr::null_mut(), WireId { seq: 3, part: Part::Head }, 7) };
        assert!(again.unwrap_err().to_string().contains("failed earlier"));
        drop(b);
    }
}
