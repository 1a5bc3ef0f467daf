//! In-memory verbs: a tagged, reliable, connectionless fabric inside one process, shaped like
//! a libfabric RDM endpoint, so the protocol core runs (and the link conformance suite runs
//! on it) with no I/O. Sends match posted receives by [`WireId`]; a send with no receive
//! posted waits as an unexpected message (copied at once, as an eager protocol does), up to
//! a capacity beyond which posts find no room; RMA writes land in memory registered for
//! them, and tell the target their cookie. [`MemLink`] is a [`Link`] over a [`Channel`] and
//! these verbs, as a transport's link is over its own.

use std::collections::{HashMap, VecDeque};
use std::os::raw::c_void;
use std::sync::{Arc, Mutex};

use crate::budget::TrafficClass;
use crate::error::{Error, Result};
use crate::link::{MemSlice, TransportKind};

use super::channel::ChannelCfg;
use super::verbs::{Event, EventVerbs, Verbs, WireId};
use super::verbs_link::VerbsLink;
use super::wire::Wire;

/// A registration: its key and where it starts.
#[derive(Debug)]
pub struct MemMr {
    key: u64,
    base: usize,
    fabric: Arc<Mutex<Fabric>>,
}

impl Drop for MemMr {
    fn drop(&mut self) {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner()).regions.remove(&self.key);
    }
}

struct Posted {
    buf: *mut u8,
    len: usize,
    id: WireId,
    op: u32,
}

struct Unexpected {
    data: Vec<u8>,
    id: WireId,
}

#[derive(Default)]
struct Endpoint {
    posted: Vec<Posted>,
    unexpected: VecDeque<Unexpected>,
    events: VecDeque<Event>,
}

/// The fabric two [`MemVerbs`] share.
#[derive(Default)]
pub struct Fabric {
    ends: [Endpoint; 2],
    /// key -> (start, length) of memory registered for remote writes.
    regions: HashMap<u64, (usize, usize)>,
    next_key: u64,
    next_cookie: u32,
    /// Unexpected messages an endpoint holds before sends to it find no room.
    capacity: usize,
    /// Registrations of GPU memory made.
    device_regs: usize,
}

// SAFETY: the raw pointers are of posted receives, whose buffers their posters keep valid
// (the Verbs contract); the fabric is used under its mutex.
unsafe impl Send for Fabric {}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

/// One side's verbs on a shared [`Fabric`].
#[derive(Debug, Clone)]
pub struct MemVerbs {
    fabric: Arc<Mutex<Fabric>>,
    me: usize,
}

impl MemVerbs {
    /// The two sides of a fabric on which at most `capacity` unexpected messages wait per
    /// side.
    pub fn pair(capacity: usize) -> (MemVerbs, MemVerbs) {
        let fabric = Arc::new(Mutex::new(Fabric { capacity, next_key: 1, ..Default::default() }));
        (MemVerbs { fabric: fabric.clone(), me: 0 }, MemVerbs { fabric, me: 1 })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fabric> {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(f: &mut Fabric, to: usize, data: &[u8], id: WireId) -> bool {
        if let Some(i) = f.ends[to].posted.iter().position(|p| p.id == id) {
            let p = f.ends[to].posted.remove(i);
            let r = if data.len() > p.len {
                Err(format!("truncated: {} bytes for a {}-byte receive", data.len(), p.len))
            } else {
                // SAFETY: the receive's buffer holds p.len >= data.len() writable bytes
                // (Verbs::recv contract).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.buf, data.len()) };
                Ok(data.len())
            };
            f.ends[to].events.push_back(Event::Done(p.op, r));
            return true;
        }
        // A goodbye always finds room (providers keep room for small control messages).
        if f.ends[to].unexpected.len() >= f.capacity && id.part != super::verbs::Part::Bye {
            return false;
        }
        f.ends[to].unexpected.push_back(Unexpected { data: data.to_vec(), id });
        true
    }
}

impl Verbs for MemVerbs {
    type Mr = MemMr;
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<MemMr> {
        let mut f = self.lock();
        if matches!(s.kind(), crate::mem::MemKind::Device(_)) {
            f.device_regs += 1;
        }
        let key = f.next_key;
        f.next_key += 1;
        if remote {
            f.regions.insert(key, (s.ptr() as usize, s.len()));
        }
        Ok(MemMr { key, base: s.ptr() as usize, fabric: self.fabric.clone() })
    }
    fn register_pool(&mut self, s: MemSlice) -> Result<MemMr> {
        self.register(s, false)
    }
    fn desc(mr: &MemMr) -> *mut c_void {
        mr.key as *mut c_void
    }
    fn rma_target(&self, mr: &MemMr, s: MemSlice) -> (u64, u64) {
        // Offsets in the registration, as providers without FI_MR_VIRT_ADDR take them.
        ((s.ptr() as usize - mr.base) as u64, mr.key)
    }
    unsafe fn send(&mut self, buf: *const u8, len: usize, _: *mut c_void, id: WireId, op: u32) -> Result<bool> {
        // SAFETY: the caller's contract: buf holds len bytes.
        let data = unsafe { std::slice::from_raw_parts(buf, len) };
        let mut f = self.lock();
        if !Self::deliver(&mut f, 1 - self.me, data, id) {
            return Ok(false);
        }
        f.ends[self.me].events.push_back(Event::Done(op, Ok(len)));
        Ok(true)
    }
    unsafe fn recv(&mut self, buf: *mut u8, len: usize, _: *mut c_void, id: WireId, op: u32) -> Result<bool> {
        let mut f = self.lock();
        let me = self.me;
        if let Some(i) = f.ends[me].unexpected.iter().position(|u| u.id == id) {
            let u = f.ends[me].unexpected.remove(i).expect("found above");
            let r = if u.data.len() > len {
                Err(format!("truncated: {} bytes for a {len}-byte receive", u.data.len()))
            } else {
                // SAFETY: the caller's contract: buf holds len >= data bytes.
                unsafe { std::ptr::copy_nonoverlapping(u.data.as_ptr(), buf, u.data.len()) };
                Ok(u.data.len())
            };
            f.ends[me].events.push_back(Event::Done(op, r));
            return Ok(true);
        }
        f.ends[me].posted.push(Posted { buf, len, id, op });
        Ok(true)
    }
    unsafe fn write(
        &mut self,
        buf: *const u8,
        len: usize,
        _: *mut c_void,
        cookie: u32,
        addr: u64,
        key: u64,
        op: u32,
    ) -> Result<bool> {
        let mut f = self.lock();
        let Some(&(start, size)) = f.regions.get(&key) else {
            return Err(Error::Transport {
                transport: TransportKind::Sim,
                op: "write",
                peer: Some(1 - self.me),
                source: format!("no registration with key {key}").into(),
            });
        };
        let r = if addr as usize + len > size {
            Err(format!("write of {len} bytes at offset {addr} past a {size}-byte registration"))
        } else {
            // SAFETY: inside the peer's registered, live memory (its registration is still
            // in the table) and the caller's source of len bytes.
            unsafe { std::ptr::copy_nonoverlapping(buf, (start + addr as usize) as *mut u8, len) };
            Ok(len)
        };
        f.ends[1 - self.me].events.push_back(Event::Landed(cookie, r.clone()));
        f.ends[self.me].events.push_back(Event::Done(op, r));
        Ok(true)
    }
    fn inject(&mut self, bytes: &[u8], id: WireId) -> Result<bool> {
        let mut f = self.lock();
        Ok(Self::deliver(&mut f, 1 - self.me, bytes, id))
    }
    fn new_cookie(&mut self) -> u32 {
        let mut f = self.lock();
        f.next_cookie += 1;
        f.next_cookie
    }
    fn drop_cookie(&mut self, _: u32) {}
}

impl EventVerbs for MemVerbs {
    fn events(&mut self, out: &mut Vec<Event>) -> Result<()> {
        out.extend(self.lock().ends[self.me].events.drain(..));
        Ok(())
    }
    fn cancel_all(&mut self) {
        self.lock().ends[self.me].posted.clear();
    }
}

/// The protocol's shape in these tests: libfabric's (4 KiB heads, 12-bit piece numbers).
pub const WIRE: Wire = Wire { inline: 4096 - super::LARGE_HEAD, max_pieces: (1 << 12) - 2 };

/// A [`Link`] over a [`Channel`] and [`MemVerbs`].
pub type MemLink = VerbsLink<MemVerbs>;

/// How a pair of [`MemLink`]s is set up.
#[derive(Debug, Clone, Copy)]
pub struct MemLinkCfg {
    /// Piece size.
    pub chunk: usize,
    /// Rendezvous threshold of each side (0: none).
    pub rma_min: usize,
    /// Whether the sides can write each other's memory.
    pub rma: bool,
    /// Register every buffer.
    pub register: bool,
    /// Inject small messages.
    pub inject: bool,
    /// Unexpected messages a side holds.
    pub capacity: usize,
    /// The device kernels GPU buffers are moved with (a simulated GPU in tests); `None`:
    /// GPU buffers refused.
    pub device: Option<&'static dyn crate::mem::LocalMem>,
}

impl MemLink {
    /// Two connected links (rank 0's to rank 1, and rank 1's to rank 0).
    pub fn pair(c: MemLinkCfg) -> (MemLink, MemLink) {
        let (a, b) = MemVerbs::pair(c.capacity);
        (MemLink::on(a, c, 7), MemLink::on(b, c, 7))
    }

    /// The link of `verbs`' side, for the pair incarnation `nonce`.
    pub fn on(verbs: MemVerbs, c: MemLinkCfg, nonce: u64) -> MemLink {
        let gate = crate::budget::gate(&format!("mem-verbs-{:p}", Arc::as_ptr(&verbs.fabric)), 1.0);
        let me = verbs.me;
        let cfg = ChannelCfg {
            kind: TransportKind::Sim,
            me,
            peer: 1 - me,
            wire: WIRE,
            head_bytes: 4096,
            head_slots: 16,
            bounce_slots: 4,
            send_chunk: c.chunk,
            recv_chunk: c.chunk,
            rma_min_send: c.rma_min,
            rma_min_recv: c.rma_min,
            rma_recv: c.rma && c.rma_min > 0,
            has_rma: c.rma,
            register: c.register,
            inject_bytes: if c.inject { 4096 } else { 0 },
            max_inflight: 16,
            gate,
            class: TrafficClass::Bulk,
            nonce,
            device: c.device,
        };
        VerbsLink::over(verbs, cfg).expect("in-memory channel")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, LinkPair};
    use crate::link::{Link, RecvMode, Tag};

    struct Pairs(MemLinkCfg, &'static str);

    impl LinkPair for Pairs {
        fn name(&self) -> String {
            let gpu = if self.0.device.is_some() { ", GPU buffers" } else { "" };
            format!("protocol core over in-memory verbs{gpu} ({})", self.1)
        }
        fn piece(&self) -> usize {
            self.0.chunk
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            let (a, b) = MemLink::pair(self.0);
            (Box::new(a), Box::new(b))
        }
        fn memory(&self) -> (crate::mem::MemKind, &'static dyn crate::mem::LocalMem) {
            match self.0.device {
                Some(mem) => (crate::mem::MemKind::Device(0), mem),
                None => (crate::mem::MemKind::Host, &crate::mem::HOST),
            }
        }
    }

    const BASE: MemLinkCfg = MemLinkCfg {
        chunk: 64 << 10,
        rma_min: 1 << 20,
        rma: true,
        register: false,
        inject: true,
        capacity: 64,
        device: None,
    };

    #[test]
    fn the_protocol_core_keeps_the_link_contract() {
        conformance::run(&mut Pairs(BASE, "RMA writes from 1 MiB, inject"));
        conformance::run(&mut Pairs(
            MemLinkCfg { rma: false, register: true, inject: false, capacity: 4, ..BASE },
            "no RMA, every buffer registered, 4 unexpected messages",
        ));
        conformance::run(&mut Pairs(
            MemLinkCfg { chunk: 4 << 10, rma_min: 8 << 10, ..BASE },
            "4 KiB pieces, RMA writes from 8 KiB",
        ));
    }

    /// A goodbye left over from an earlier link of the same slots (another incarnation) is
    /// ignored; the current peer's goodbye fails what waits on it.
    #[test]
    fn a_stale_goodbye_is_ignored() {
        let (va, vb) = MemVerbs::pair(64);
        let old = MemLink::on(va.clone(), BASE, 1);
        drop(old); // says goodbye, incarnation 1, to side 1
        let mut b = MemLink::on(vb, BASE, 2);
        let mut a = MemLink::on(va, BASE, 2);
        let mut x = vec![5u8; 10];
        let mut y = vec![0u8; 10];
        let mut z = vec![0u8; 10];
        // SAFETY: the buffers outlive the links (dropped below).
        let s = |v: &mut Vec<u8>| unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) };
        b.post_recv(Tag(1), s(&mut y), RecvMode::Copy).unwrap();
        for _ in 0..10 {
            b.progress().unwrap();
        }
        a.post_send(Tag(1), s(&mut x)).unwrap();
        for _ in 0..10 {
            a.progress().unwrap();
            b.progress().unwrap();
        }
        assert_eq!((b.recvs_done(), &y), (1, &x), "the stale goodbye failed nothing");
        b.post_recv(Tag(2), s(&mut z), RecvMode::Copy).unwrap();
        drop(a);
        let e = (0..10).find_map(|_| b.progress().err()).expect("the peer's goodbye fails the waiting receive");
        assert!(matches!(e, Error::Remote { rank: 0, .. }) && e.to_string().contains("closed its link"), "{e}");
        drop(b);
    }

    /// Progresses both links until `n` sends of `a` and `n` receives of `b` are done (at most
    /// 10 000 rounds).
    fn drive_until(a: &mut MemLink, b: &mut MemLink, n: u64) {
        for _ in 0..10_000 {
            a.progress().unwrap();
            b.progress().unwrap();
            if b.recvs_done() == n && a.sends_done() == n {
                break;
            }
        }
        assert_eq!((a.sends_done(), b.recvs_done()), (n, n));
    }

    /// What goes how: small messages injected, rendezvous ones written, reducing ones as
    /// tagged pieces.
    #[test]
    fn each_message_takes_its_path() {
        let (mut a, mut b) = MemLink::pair(BASE);
        let mut small = vec![1u8; 100];
        let mut big = vec![2u8; 3 << 20];
        let mut y_small = vec![0u8; 100];
        let mut y_big = vec![0u8; 3 << 20];
        // SAFETY: the buffers outlive the operations (driven to completion below).
        let s = |v: &mut Vec<u8>| unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) };
        b.post_recv(Tag(1), s(&mut y_small), RecvMode::Copy).unwrap();
        b.post_recv(Tag(2), s(&mut y_big), RecvMode::Copy).unwrap();
        a.post_send(Tag(1), s(&mut small)).unwrap();
        a.post_send(Tag(2), s(&mut big)).unwrap();
        drive_until(&mut a, &mut b, 2);
        assert!(y_small == small && y_big == big);
        // The small one injected; the big one's 48 pieces of 64 KiB written.
        assert_eq!(a.counts(), (48, 0, 1));
    }

    /// A simulated GPU's kernels that count the calls made on them (host memory underneath).
    #[derive(Debug)]
    struct Counting;
    static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static REDUCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static COUNTING: Counting = Counting;
    impl crate::mem::LocalMem for Counting {
        fn kinds(&self) -> crate::mem::MemKinds {
            crate::mem::MemKinds::ALL
        }
        unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
            COPIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: forwarded.
            unsafe { crate::mem::HOST.copy(dst, src, len) }
        }
        unsafe fn reduce(
            &self,
            dtype: crate::dtype::DataType,
            op: crate::dtype::ReduceOp,
            dst: *mut u8,
            a: *const u8,
            b: *const u8,
            count: usize,
        ) {
            REDUCES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // SAFETY: forwarded.
            unsafe { crate::mem::HOST.reduce(dtype, op, dst, a, b, count) }
        }
        unsafe fn scale(&self, dtype: crate::dtype::DataType, dst: *mut u8, count: usize, n: usize) {
            // SAFETY: forwarded.
            unsafe { crate::mem::HOST.scale(dtype, dst, count, n) }
        }
        fn scratch(&self, bytes: usize) -> Result<crate::mem::Scratch> {
            crate::mem::HOST.scratch(bytes)
        }
    }

    /// GPU buffers moved by the transport itself (FI_HMEM): the whole Link contract holds;
    /// pieces and RMA writes go straight from and to the buffers, always registered (the
    /// provider must know device memory); the bytes of a small message's head are copied
    /// between host and device memory by the device's kernels, never by the CPU; a reducing
    /// receive's pieces land in device bounce buffers and are reduced there. Without a
    /// device, a GPU buffer is refused before anything moves.
    #[test]
    fn gpu_buffers_moved_by_the_transport_itself() {
        use std::sync::atomic::Ordering::SeqCst;
        let dev = MemLinkCfg { device: Some(&COUNTING), ..BASE };
        conformance::run(&mut Pairs(dev, "RMA writes from 1 MiB, inject"));
        conformance::run(&mut Pairs(
            MemLinkCfg { rma: false, register: false, inject: false, ..dev },
            "no RMA, no registration asked for",
        ));
        // One small send and one small receive, one large copy and a reducing receive.
        let (mut a, mut b) = MemLink::pair(MemLinkCfg { inject: false, ..dev });
        let mut small = vec![3u8; 100];
        let mut y_small = vec![0u8; 100];
        let mut big: Vec<u8> = (0..3usize << 20).map(|i| i as u8).collect();
        let mut y_big = vec![0u8; 3 << 20];
        let mut ones = vec![1.0f32; 100_000];
        let mut acc = vec![2.0f32; 100_000];
        // SAFETY: the buffers outlive the links (driven to completion, then dropped, below).
        let d = |p: *mut u8, n: usize| unsafe { MemSlice::new_in(p, n, crate::mem::MemKind::Device(0)) };
        let (c0, r0, regs0) = (COPIES.load(SeqCst), REDUCES.load(SeqCst), a.verbs().lock().device_regs);
        b.post_recv(Tag(1), d(y_small.as_mut_ptr(), 100), RecvMode::Copy).unwrap();
        b.post_recv(Tag(2), d(y_big.as_mut_ptr(), 3 << 20), RecvMode::Copy).unwrap();
        let local = d(acc.as_mut_ptr() as *mut u8, 400_000);
        let mode = RecvMode::Reduce {
            dtype: crate::dtype::DataType::F32,
            op: crate::dtype::ReduceOp::Sum,
            local,
            mem: &COUNTING,
        };
        b.post_recv(Tag(3), local, mode).unwrap();
        a.post_send(Tag(1), d(small.as_mut_ptr(), 100)).unwrap();
        a.post_send(Tag(2), d(big.as_mut_ptr(), 3 << 20)).unwrap();
        a.post_send(Tag(3), d(ones.as_mut_ptr() as *mut u8, 400_000)).unwrap();
        drive_until(&mut a, &mut b, 3);
        assert!(y_small == small && y_big == big && acc.iter().all(|&x| x == 3.0));
        // The small message: one copy off the device into its head, one onto it; the
        // reducing receive's 7 pieces (64 KiB) land in device bounce buffers and are reduced
        // there, no copy.
        let pieces = 400_000usize.div_ceil(64 << 10);
        assert_eq!(COPIES.load(SeqCst) - c0, 2, "copies through the device's kernels: the small message's only");
        assert_eq!(REDUCES.load(SeqCst) - r0, pieces, "one reduction on the device per piece");
        // Registered: the large send's buffer and the reducing send's (sender side), the
        // RMA target and the device bounce buffers (receiver side), although no registration
        // was asked for.
        assert!(a.verbs().lock().device_regs - regs0 >= 4, "GPU buffers are always registered");
        drop((a, b));
        // Without a device: refused, saying why.
        let (mut a, _b) = MemLink::pair(BASE);
        let e = a.post_send(Tag(1), d(small.as_mut_ptr(), 100)).unwrap_err();
        assert!(e.to_string().contains("moves host memory only"), "{e}");
    }
}
