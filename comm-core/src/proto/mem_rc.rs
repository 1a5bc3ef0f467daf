//! An in-memory pair of reliable connected queue pairs ([`RcQueue`]), for tests: what an
//! ibverbs RC queue pair does, without a device. Each side posts receive slots, consumed in
//! order; sends and RDMA writes with immediate are carried out when either side polls (as a
//! NIC does, later than the post: the source is read then), in order per direction, each into
//! the receiver's next slot; a sender finding no slot posted waits (RNR retry), never fails;
//! a send queue holds a bounded number of work requests. A side that goes drops what it has
//! not carried out (its queue pair is destroyed): a goodbye reaches the peer only if it was
//! carried out (polled) before.

use std::collections::{HashMap, VecDeque};
use std::os::raw::c_void;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::link::{MemSlice, TransportKind};

use super::rc::{RcEvent, RcQueue};

/// A registration of the in-memory queue pairs: its key and where it starts.
pub struct RcMr {
    key: u64,
    base: usize,
    fabric: Arc<Mutex<Fabric>>,
}

impl std::fmt::Debug for RcMr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcMr").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Drop for RcMr {
    fn drop(&mut self) {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner()).regions.remove(&self.key);
    }
}

enum Kind {
    Send,
    Write { addr: u64, key: u64 },
}

struct Op {
    buf: usize,
    len: usize,
    imm: u32,
    wr: u64,
    kind: Kind,
}

#[derive(Default)]
struct Side {
    /// Posted receive slots, in order: (buffer, length, slot number).
    slots: VecDeque<(usize, usize, u32)>,
    /// Sends and writes posted, not carried out yet.
    queue: VecDeque<Op>,
    events: Vec<RcEvent>,
    closed: bool,
}

#[derive(Default)]
struct Fabric {
    sides: [Side; 2],
    regions: HashMap<u64, (usize, usize)>,
    next_key: u64,
    /// Most work requests a send queue holds.
    depth: usize,
    /// Operations carried out so far, each direction (sends, writes).
    counts: [(u64, u64); 2],
}

// SAFETY: the raw addresses are of posted slots and sources whose posters keep them valid
// until their completions (the RcQueue contract); the fabric is used under its mutex.
unsafe impl Send for Fabric {}

/// One side of an in-memory RC queue pair pair.
pub struct MemRc {
    fabric: Arc<Mutex<Fabric>>,
    me: usize,
}

impl std::fmt::Debug for MemRc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRc").field("me", &self.me).finish_non_exhaustive()
    }
}

impl MemRc {
    /// Two connected queue pairs whose send queues hold `depth` work requests each.
    pub fn pair(depth: usize) -> (MemRc, MemRc) {
        let fabric = Arc::new(Mutex::new(Fabric { depth, next_key: 1, ..Default::default() }));
        (MemRc { fabric: fabric.clone(), me: 0 }, MemRc { fabric, me: 1 })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fabric> {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends and writes carried out from this side so far.
    pub fn counts(&self) -> (u64, u64) {
        self.lock().counts[self.me]
    }

    /// Carries out what `from` has queued, in order, while `to` has slots.
    fn deliver(f: &mut Fabric, from: usize) {
        let to = 1 - from;
        while let Some(op) = f.sides[from].queue.front() {
            if f.sides[to].closed {
                let op = f.sides[from].queue.pop_front().expect("checked");
                let e = "the peer's queue pair is gone (retry exceeded)".to_string();
                f.sides[from].events.push(RcEvent::Sent { wr: op.wr, result: Err(e) });
                continue;
            }
            let Some(&(buf, cap, slot)) = f.sides[to].slots.front() else { break };
            let (len, imm) = (op.len, op.imm);
            let result: std::result::Result<usize, String> = match op.kind {
                Kind::Send if len > cap => Err(format!("a {len}-byte send into a {cap}-byte receive")),
                Kind::Send => {
                    // SAFETY: the slot holds `cap >= len` writable bytes and the source `len`
                    // bytes, both valid until their completions (RcQueue contract).
                    unsafe { std::ptr::copy_nonoverlapping(op.buf as *const u8, buf as *mut u8, len) };
                    Ok(len)
                }
                Kind::Write { addr, key } => match f.regions.get(&key) {
                    Some(&(start, size)) if addr as usize + len <= size => {
                        // SAFETY: inside the peer's live registration, and the source's
                        // `len` bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(op.buf as *const u8, (start + addr as usize) as *mut u8, len)
                        };
                        Ok(len)
                    }
                    Some(&(_, size)) => Err(format!("a write of {len} bytes at {addr} past a {size}-byte region")),
                    None => Err(format!("a write to key {key}, which is not registered")),
                },
            };
            let op = f.sides[from].queue.pop_front().expect("checked");
            f.sides[to].slots.pop_front();
            let written = matches!(op.kind, Kind::Write { .. });
            let c = &mut f.counts[from];
            if written {
                c.1 += 1;
                f.sides[to].events.push(RcEvent::Written { slot, imm, result: result.clone() });
            } else {
                c.0 += 1;
                f.sides[to].events.push(RcEvent::Received { slot, imm, result: result.clone() });
            }
            f.sides[from].events.push(RcEvent::Sent { wr: op.wr, result });
        }
    }

    fn post(&mut self, op: Op) -> Result<bool> {
        let mut f = self.lock();
        if f.sides[self.me].queue.len() >= f.depth {
            return Ok(false);
        }
        f.sides[self.me].queue.push_back(op);
        Ok(true)
    }
}

impl Drop for MemRc {
    fn drop(&mut self) {
        let mut f = self.lock();
        // Destroyed: what was not carried out yet is dropped (as ibv_destroy_qp flushes it);
        // its sources may be gone already.
        let me = self.me;
        f.sides[me].queue.clear();
        f.sides[me].slots.clear();
        f.sides[me].closed = true;
    }
}

impl RcQueue for MemRc {
    type Mr = RcMr;
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<RcMr> {
        let mut f = self.lock();
        let key = f.next_key;
        f.next_key += 1;
        if remote {
            f.regions.insert(key, (s.ptr() as usize, s.len()));
        }
        Ok(RcMr { key, base: s.ptr() as usize, fabric: self.fabric.clone() })
    }
    fn desc(mr: &RcMr) -> *mut c_void {
        mr.key as *mut c_void
    }
    fn rma_target(&self, mr: &RcMr, s: MemSlice) -> (u64, u64) {
        ((s.ptr() as usize - mr.base) as u64, mr.key)
    }
    unsafe fn post_slot(&mut self, buf: *mut u8, len: usize, _: *mut c_void, slot: u32) -> Result<()> {
        let me = self.me;
        let mut f = self.lock();
        if f.sides[me].closed {
            return Err(Error::Internal("a slot posted on a destroyed queue pair".into()));
        }
        f.sides[me].slots.push_back((buf as usize, len, slot));
        Ok(())
    }
    unsafe fn send_imm(&mut self, buf: *const u8, len: usize, _: *mut c_void, imm: u32, wr: u64) -> Result<bool> {
        self.post(Op { buf: buf as usize, len, imm, wr, kind: Kind::Send })
    }
    unsafe fn write_imm(
        &mut self,
        buf: *const u8,
        len: usize,
        _: *mut c_void,
        addr: u64,
        key: u64,
        imm: u32,
        wr: u64,
    ) -> Result<bool> {
        self.post(Op { buf: buf as usize, len, imm, wr, kind: Kind::Write { addr, key } })
    }
    fn poll(&mut self, out: &mut Vec<RcEvent>) {
        let mut f = self.lock();
        Self::deliver(&mut f, 0);
        Self::deliver(&mut f, 1);
        out.append(&mut f.sides[self.me].events);
    }
}

/// What a link over these queue pairs is named in errors.
pub const KIND: TransportKind = TransportKind::Sim;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::TrafficClass;
    use crate::conformance::{self, LinkPair};
    use crate::link::Link;
    use crate::proto::mem_verbs::WIRE;
    use crate::proto::rc::RcVerbs;
    use crate::proto::ChannelCfg;
    use crate::proto::VerbsLink;

    /// Receive slots per link, and their size: a head buffer, or a piece.
    const SLOTS: usize = 32;

    struct Pairs {
        chunk: usize,
        rma_min: usize,
        depth: usize,
    }

    fn link(q: MemRc, p: &Pairs) -> VerbsLink<RcVerbs<MemRc>> {
        let me = q.me;
        let gate = crate::budget::gate(&format!("mem-rc-{:p}", Arc::as_ptr(&q.fabric)), 1.0);
        let verbs = RcVerbs::new(q, SLOTS, p.chunk.max(4096), (KIND, 1 - me)).expect("slots");
        let cfg = ChannelCfg {
            kind: KIND,
            me,
            peer: 1 - me,
            wire: WIRE,
            head_bytes: 4096,
            head_slots: 16,
            bounce_slots: 4,
            send_chunk: p.chunk,
            recv_chunk: p.chunk,
            rma_min_send: p.rma_min,
            rma_min_recv: p.rma_min,
            rma_recv: p.rma_min > 0,
            has_rma: true,
            register: true,
            inject_bytes: 0,
            max_inflight: 16,
            gate,
            class: TrafficClass::Bulk,
            nonce: 7,
            device: None,
        };
        VerbsLink::over(verbs, cfg).expect("channel")
    }

    impl LinkPair for Pairs {
        fn name(&self) -> String {
            format!(
                "protocol core over in-memory RC queue pairs ({} B pieces, RMA writes from {} B, {} work requests)",
                self.chunk, self.rma_min, self.depth
            )
        }
        fn piece(&self) -> usize {
            self.chunk
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            let (a, b) = MemRc::pair(self.depth);
            (Box::new(link(a, self)), Box::new(link(b, self)))
        }
    }

    /// The Link contract over RC queue pairs, with the software matching of [`RcVerbs`]:
    /// heads and small messages as sends with immediate into receive slots (early ones kept
    /// until their receive is posted), large copies as RDMA writes with immediate, reducing
    /// receives as tagged pieces; senders waiting for slots (RNR) and for room in the send
    /// queue.
    #[test]
    fn the_protocol_core_keeps_the_link_contract_over_rc() {
        conformance::run(&mut Pairs { chunk: 64 << 10, rma_min: 4096, depth: 64 });
        conformance::run(&mut Pairs { chunk: 4096, rma_min: 16 << 10, depth: 4 });
    }

    /// What goes how over RC: a small message as one send (its head), a large one as RDMA
    /// writes (one per piece) after its head; a receive posted after its message arrived
    /// takes it from the early messages.
    #[test]
    fn sends_and_writes_go_as_the_protocol_says() {
        let p = Pairs { chunk: 64 << 10, rma_min: 4096, depth: 64 };
        let (qa, qb) = MemRc::pair(p.depth);
        let (mut a, mut b) = (link(qa, &p), link(qb, &p));
        let mut small = vec![5u8; 100];
        let mut big: Vec<u8> = (0..1usize << 20).map(|i| (i * 7) as u8).collect();
        let (mut y_small, mut y_big) = (vec![0u8; 100], vec![0u8; 1 << 20]);
        // SAFETY: the buffers outlive the links' operations (driven to completion below).
        let s = |v: &mut Vec<u8>| unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) };
        a.post_send(crate::link::Tag(1), s(&mut small)).unwrap();
        for _ in 0..50 {
            a.progress().unwrap();
            b.progress().unwrap();
        }
        // Arrived before its receive: kept, then taken.
        b.post_recv(crate::link::Tag(1), s(&mut y_small), crate::link::RecvMode::Copy).unwrap();
        b.post_recv(crate::link::Tag(2), s(&mut y_big), crate::link::RecvMode::Copy).unwrap();
        a.post_send(crate::link::Tag(2), s(&mut big)).unwrap();
        for _ in 0..10_000 {
            a.progress().unwrap();
            b.progress().unwrap();
            if a.sends_done() == 2 && b.recvs_done() == 2 {
                break;
            }
        }
        assert_eq!((a.sends_done(), b.recvs_done()), (2, 2));
        assert!(y_small == small && y_big == big);
        let (sends, writes) = a.verbs().queue().counts();
        // Two heads sent; the big message's 16 pieces of 64 KiB written.
        assert_eq!((sends, writes), (2, 16));
    }
}
