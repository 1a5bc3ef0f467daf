//! net-libfabric on the providers this machine has (`tcp;ofi_rxm`, `shm`): endpoints and links
//! within one process (two communicator slots on the shared endpoint). Without libfabric or a
//! provider the tests print `skipped: <why>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::link::{Link, MemSlice, RecvMode, Tag};
use oxccl_core::store::MemStore;
use oxccl_core::testing::{skip, Need};
use oxccl_core::{DataType, ReduceOp};

use super::fabric::*;
use super::*;

fn cfg(register_always: bool) -> Option<LibfabricConfig> {
    let c = LibfabricConfig { provider: Some("tcp".into()), register_always, ..Default::default() };
    match available(&c) {
        Ok(_) => Some(c),
        Err(e) => {
            skip(Need::Libfabric, e);
            None
        }
    }
}

#[test]
fn an_endpoint_sends_to_itself() {
    let Some(c) = cfg(true) else { return };
    let want = probe(&c).unwrap();
    let mut ep = Endpoint::open(|p| p.name == want.name && p.domain == want.domain, 128).expect("open");
    send_to_itself(&mut ep, MemIface::Host);
}

/// FI_HMEM registration (`fi_mr_regattr`, the path GPU memory takes) runs here on host memory
/// registered as FI_HMEM_SYSTEM, over shm, which offers FI_HMEM; device memory on an endpoint
/// opened without FI_HMEM is refused with an error that says so. (FI_HMEM_CUDA itself needs a
/// GPU: issue 6.)
#[test]
fn fi_hmem_registration_moves_data_and_is_refused_without_fi_hmem() {
    let c = LibfabricConfig { provider: Some("shm".into()), ..Default::default() };
    let want = match available(&c) {
        Ok(p) => p,
        Err(e) => {
            skip(Need::Libfabric, e);
            return;
        }
    };
    let pick = |p: &Provider| p.name == want.name && p.domain == want.domain;
    let mut ep = Endpoint::open_with(pick, 128, true).expect("open");
    if !ep.provider().has_hmem() {
        skip(Need::Libfabric, format!("{} offers no FI_HMEM on this machine", want.name));
        return;
    }
    send_to_itself(&mut ep, MemIface::HmemSystem);
    let mut plain = Endpoint::open_with(pick, 128, false).expect("open");
    if plain.provider().has_hmem() {
        println!("note: {} gives FI_HMEM unasked; the refusal without it is not checked", want.name);
    } else {
        let x = [0u8; 64];
        // SAFETY: x outlives the call; nothing is registered (the call fails).
        let e = unsafe { plain.register_on(x.as_ptr(), x.len(), false, MemIface::Cuda(0)) }.unwrap_err();
        assert!(e.contains("memory of GPU 0") && e.contains("without FI_HMEM"), "{e}");
    }
}

/// Sends 100,000 bytes from `ep` to itself, both buffers registered as `mem` (the receive
/// also for remote writes), and checks what arrived.
fn send_to_itself(ep: &mut Endpoint, mem: MemIface) {
    let me = ep.name().to_vec();
    let a = ep.insert(&me).expect("insert");
    let src: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0u8; 100_000];
    let mut cs = OpCtx::new(1);
    let mut cr = OpCtx::new(2);
    // SAFETY: both vectors outlive their registrations and the operations (awaited below).
    let mr = unsafe { ep.register_on(src.as_ptr(), src.len(), false, mem) }.unwrap();
    // SAFETY: as above.
    let mr2 = unsafe { ep.register_on(dst.as_ptr(), dst.len(), true, mem) }.unwrap();
    // SAFETY: dst and the context outlive the operation (awaited below).
    assert!(unsafe { ep.trecv(dst.as_mut_ptr(), dst.len(), mr2.desc(), 42, &mut *cr) }.unwrap());
    let mut out = Vec::new();
    let t = Instant::now();
    // -FI_EAGAIN (the connection is still being made): progress, then post again.
    // SAFETY: src and the context outlive the operation (awaited below).
    while !unsafe { ep.tsend(src.as_ptr(), src.len(), mr.desc(), a, 42, &mut *cs) }.unwrap() {
        ep.poll(&mut out, 16).unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    while out.len() < 2 && t.elapsed() < Duration::from_secs(10) {
        ep.poll(&mut out, 16).unwrap();
    }
    assert_eq!(out.len(), 2, "{mem}: {out:?}");
    assert!(out.iter().all(|c| c.result.is_ok()), "{mem}: {out:?}");
    // Only a receive's completion reports a length.
    assert!(out.iter().any(|c| c.id == 2 && c.result.as_ref().is_ok_and(|n| *n == 100_000)), "{mem}: {out:?}");
    assert!(dst == src, "{mem}: the data differ");
}

/// Two ranks of one communicator in this process, each with its slot on the shared endpoint.
/// Two communicator slots on an endpoint of their own (tests running at once would share
/// the process's endpoint otherwise, and see each other's counters).
fn pair(c: &LibfabricConfig) -> (LibfabricTransport, LibfabricTransport, Arc<MemStore>) {
    let store = Arc::new(MemStore::new());
    let endpoint = SharedEndpoint::open(c, None).unwrap();
    let a = LibfabricTransport::on(endpoint.clone(), &*store, 0, 2, c.clone()).unwrap();
    let b = LibfabricTransport::on(endpoint, &*store, 1, 2, c.clone()).unwrap();
    (a, b, store)
}

fn drive(links: &mut [&mut LibfabricLink], until: impl Fn(&[&mut LibfabricLink]) -> bool) {
    let t = Instant::now();
    while !until(links) {
        for l in links.iter_mut() {
            l.progress().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no progress");
    }
}

#[test]
fn messages_of_every_size_arrive_whole_and_in_order() {
    for register in [false, true] {
        let Some(c) = cfg(register) else { return };
        let c = LibfabricConfig { chunk: 64 << 10, ..c };
        let (mut ta, mut tb, store) = pair(&c);
        let mut a = ta.connect(&*store, 1).unwrap().unwrap();
        let mut b = tb.connect(&*store, 0).unwrap().unwrap();
        let sizes = [0usize, 1, 8, INLINE_PROBE, INLINE_PROBE + 1, 100_000, 1 << 20, 3 << 20];
        let (srcs, dsts) = send_sizes(&mut a, &mut b, &sizes, 4);
        assert_eq!(dsts, srcs, "register = {register}");
    }
}

/// Sends one message of each size from `a` to `b` (tags 0, 1, ...): receives for the first
/// `early` posted before the sends, the rest after (unexpected messages at the receiver).
/// Returns (what was sent, what arrived).
fn send_sizes(
    a: &mut LibfabricLink,
    b: &mut LibfabricLink,
    sizes: &[usize],
    early: usize,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let srcs: Vec<Vec<u8>> =
        sizes.iter().enumerate().map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7) as u8).collect()).collect();
    let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let (s0, r0) = (a.sends_done(), b.recvs_done());
    for (i, d) in dsts.iter_mut().enumerate().take(early) {
        // SAFETY: the buffers outlive the link's use of them (driven to completion below).
        b.post_recv(Tag(i as u64), unsafe { MemSlice::new(d.as_mut_ptr(), d.len()) }, RecvMode::Copy).unwrap();
    }
    for (i, s) in srcs.iter().enumerate() {
        // SAFETY: as above.
        a.post_send(Tag(i as u64), unsafe { MemSlice::new(s.as_ptr() as *mut u8, s.len()) }).unwrap();
    }
    for _ in 0..50 {
        a.progress().unwrap();
    }
    for (i, d) in dsts.iter_mut().enumerate().skip(early) {
        // SAFETY: as above.
        b.post_recv(Tag(i as u64), unsafe { MemSlice::new(d.as_mut_ptr(), d.len()) }, RecvMode::Copy).unwrap();
    }
    let n = sizes.len() as u64;
    drive(&mut [a, b], |l| l[0].sends_done() == s0 + n && l[1].recvs_done() == r0 + n);
    (srcs, dsts)
}

/// A summing f32 receive of `n` elements on `b` of what `a` sends (x[i] = i onto local
/// 2i); returns the result, which should be 3i.
fn reduce_f32(a: &mut LibfabricLink, b: &mut LibfabricLink, n: usize, tag: u64) -> Vec<f32> {
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let local: Vec<f32> = (0..n).map(|i| 2.0 * i as f32).collect();
    let mut out = vec![0f32; n];
    // SAFETY: buffers outlive the operations (driven to completion below).
    let (sx, so, sl) = unsafe {
        (
            MemSlice::new(x.as_ptr() as *mut u8, 4 * n),
            MemSlice::new(out.as_mut_ptr() as *mut u8, 4 * n),
            MemSlice::new(local.as_ptr() as *mut u8, 4 * n),
        )
    };
    let before = (a.sends_done(), b.recvs_done());
    a.post_send(Tag(tag), sx).unwrap();
    b.post_recv(
        Tag(tag),
        so,
        RecvMode::Reduce { dtype: DataType::F32, op: ReduceOp::Sum, local: sl, mem: &oxccl_core::mem::HOST },
    )
    .unwrap();
    drive(&mut [a, b], |l| l[0].sends_done() > before.0 && l[1].recvs_done() > before.1);
    out
}

const INLINE_PROBE: usize = link::INLINE;

/// On shm a small message with no send queued ahead of it goes whole by `fi_tinject` and is
/// done when `post_send` returns; behind a queued message it waits its turn (order kept). On
/// tcp;ofi_rxm, which may hold injected data until a later progress call, nothing is injected.
#[test]
fn small_messages_are_injected_only_where_the_provider_delivers_them_at_once() {
    for (provider, injects) in [("shm", true), ("tcp", false)] {
        let c = LibfabricConfig { provider: Some(provider.into()), chunk: 16 << 10, ..Default::default() };
        if let Err(e) = available(&c) {
            skip(Need::Libfabric, format!("{provider}: {e}"));
            continue;
        }
        let (mut ta, mut tb, store) = pair(&c);
        let mut a = ta.connect(&*store, 1).unwrap().unwrap();
        let mut b = tb.connect(&*store, 0).unwrap().unwrap();
        // The first message also makes the connection (shm and tcp may say -FI_EAGAIN until
        // then, and the message takes the usual path).
        let (srcs, dsts) = send_sizes(&mut a, &mut b, &[8], 1);
        assert_eq!(dsts, srcs, "{provider}");
        let before = a.injected();
        let x = 0x1122_3344_5566_7788u64.to_le_bytes();
        let mut y = [0u8; 8];
        // SAFETY: x and y outlive the operations (driven to completion below).
        b.post_recv(Tag(50), unsafe { MemSlice::new(y.as_mut_ptr(), 8) }, RecvMode::Copy).unwrap();
        let done = a.sends_done();
        // SAFETY: as above.
        a.post_send(Tag(50), unsafe { MemSlice::new(x.as_ptr() as *mut u8, 8) }).unwrap();
        assert_eq!(a.sends_done() == done + 1, injects, "{provider}: done at the call only when injected");
        assert_eq!(a.injected() - before, u64::from(injects), "{provider}");
        let r = b.recvs_done();
        drive(&mut [&mut a, &mut b], |l| l[0].sends_done() == done + 1 && l[1].recvs_done() == r + 1);
        assert_eq!(y, x, "{provider}");
        // An empty message too: injected on shm, and on tcp sent the usual way.
        let before = a.injected();
        let done = a.sends_done();
        // SAFETY: an empty slice is read by nobody.
        a.post_send(Tag(51), unsafe { MemSlice::new(y.as_mut_ptr(), 0) }).unwrap();
        assert_eq!(a.injected() - before, u64::from(injects), "{provider}: an empty message");
        let r = b.recvs_done();
        // SAFETY: as above.
        b.post_recv(Tag(51), unsafe { MemSlice::new(y.as_mut_ptr(), 0) }, RecvMode::Copy).unwrap();
        drive(&mut [&mut a, &mut b], |l| l[0].sends_done() == done + 1 && l[1].recvs_done() == r + 1);
        // A large message queued ahead: the small ones behind it are not injected past it,
        // and everything arrives whole and in order.
        let before = a.injected();
        let (srcs, dsts) = send_sizes(&mut a, &mut b, &[100_000, 8, 1, 8, 200_000, 16], 3);
        assert_eq!(dsts, srcs, "{provider}");
        assert_eq!(a.injected(), before, "{provider}: nothing injected past a queued message");
    }
}

#[test]
fn a_reducing_receive_combines_every_piece() {
    let Some(c) = cfg(true) else { return };
    let c = LibfabricConfig { chunk: 4096, ..c };
    let (mut ta, mut tb, store) = pair(&c);
    let mut a = ta.connect(&*store, 1).unwrap().unwrap();
    let mut b = tb.connect(&*store, 0).unwrap().unwrap();
    for n in [3usize, 1000, 100_000] {
        let out = reduce_f32(&mut a, &mut b, n, 9);
        assert!(out.iter().enumerate().all(|(i, v)| *v == 3.0 * i as f32), "n = {n}");
    }
}

#[test]
fn a_mismatched_message_is_an_error_naming_both_sides() {
    let Some(c) = cfg(false) else { return };
    let (mut ta, mut tb, store) = pair(&c);
    let mut a = ta.connect(&*store, 1).unwrap().unwrap();
    let mut b = tb.connect(&*store, 0).unwrap().unwrap();
    let x = [1u8; 64];
    let mut y = [0u8; 32];
    // SAFETY: buffers outlive the links (dropped at the end of the test, cancelling).
    a.post_send(Tag::new(1, 5, 1), unsafe { MemSlice::new(x.as_ptr() as *mut u8, 64) }).unwrap();
    // SAFETY: as above.
    b.post_recv(Tag::new(2, 5, 1), unsafe { MemSlice::new(y.as_mut_ptr(), 32) }, RecvMode::Copy).unwrap();
    let t = Instant::now();
    let err = loop {
        a.progress().unwrap();
        if let Err(e) = b.progress() {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    };
    let s = err.to_string();
    assert!(matches!(err, oxccl_core::Error::InvalidUsage(_)), "{s}");
    assert!(s.contains("64") && s.contains("32"), "{s}");
}

#[test]
fn a_provider_that_is_not_there_is_unavailable_with_the_reason() {
    if let Err(e) = fabric::providers() {
        skip(Need::Libfabric, e);
        return;
    }
    let c = LibfabricConfig { provider: Some("no-such-provider".into()), ..Default::default() };
    let e = available(&c).unwrap_err();
    assert!(e.contains("OXCCL_LIBFABRIC_PROVIDER=no-such-provider") && e.contains("tcp;ofi_rxm"), "{e}");
    let e = LibfabricTransport::new(&MemStore::new(), 0, 2, c).unwrap_err().to_string();
    assert!(e.contains("no-such-provider"), "{e}");
}

#[test]
fn both_directions_at_once_with_many_pieces_do_not_deadlock() {
    // Each side posts its receive (hundreds of pieces) before its send: receives must not
    // take the in-flight budget the sends need.
    let Some(c) = cfg(false) else { return };
    let c = LibfabricConfig { chunk: 4096, ..c };
    let (mut ta, mut tb, store) = pair(&c);
    let mut a = ta.connect(&*store, 1).unwrap().unwrap();
    let mut b = tb.connect(&*store, 0).unwrap().unwrap();
    let n = 1 << 20;
    let xa: Vec<u8> = (0..n).map(|i| i as u8).collect();
    let xb: Vec<u8> = (0..n).map(|i| (i * 3) as u8).collect();
    let (mut ya, mut yb) = (vec![0u8; n], vec![0u8; n]);
    // SAFETY: the buffers outlive the operations (driven to completion below).
    unsafe {
        a.post_recv(Tag(1), MemSlice::new(ya.as_mut_ptr(), n), RecvMode::Copy).unwrap();
        b.post_recv(Tag(1), MemSlice::new(yb.as_mut_ptr(), n), RecvMode::Copy).unwrap();
        a.post_send(Tag(1), MemSlice::new(xa.as_ptr() as *mut u8, n)).unwrap();
        b.post_send(Tag(1), MemSlice::new(xb.as_ptr() as *mut u8, n)).unwrap();
    }
    drive(&mut [&mut a, &mut b], |l| l.iter().all(|x| x.sends_done() == 1 && x.recvs_done() == 1));
    assert!(ya == xb && yb == xa);
}

#[test]
fn ranks_with_different_piece_sizes_still_agree() {
    // Messages are cut by the receiver's setting, which it publishes with its address.
    let Some(c) = cfg(true) else { return };
    let store = Arc::new(MemStore::new());
    let endpoint = SharedEndpoint::open(&c, None).unwrap();
    let mut ta =
        LibfabricTransport::on(endpoint.clone(), &*store, 0, 2, LibfabricConfig { chunk: 4096, ..c.clone() }).unwrap();
    let mut tb = LibfabricTransport::on(endpoint, &*store, 1, 2, LibfabricConfig { chunk: 64 << 10, ..c }).unwrap();
    let mut a = ta.connect(&*store, 1).unwrap().unwrap();
    let mut b = tb.connect(&*store, 0).unwrap().unwrap();
    let n = 300_001;
    let xa: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let xb: Vec<u8> = (0..n).map(|i| (i % 13) as u8).collect();
    let (mut ya, mut yb) = (vec![0u8; n], vec![0u8; n]);
    // SAFETY: the buffers outlive the operations (driven to completion below).
    unsafe {
        a.post_send(Tag(4), MemSlice::new(xa.as_ptr() as *mut u8, n)).unwrap();
        b.post_send(Tag(4), MemSlice::new(xb.as_ptr() as *mut u8, n)).unwrap();
        a.post_recv(Tag(4), MemSlice::new(ya.as_mut_ptr(), n), RecvMode::Copy).unwrap();
        b.post_recv(Tag(4), MemSlice::new(yb.as_mut_ptr(), n), RecvMode::Copy).unwrap();
    }
    drive(&mut [&mut a, &mut b], |l| l.iter().all(|x| x.sends_done() == 1 && x.recvs_done() == 1));
    assert!(ya == xb && yb == xa);
}

#[test]
fn dropping_a_link_with_posted_receives_cancels_them_promptly() {
    let Some(c) = cfg(true) else { return };
    let (mut ta, mut tb, store) = pair(&c);
    let mut a = ta.connect(&*store, 1).unwrap().unwrap();
    let _b = tb.connect(&*store, 0).unwrap().unwrap();
    let mut y = vec![0u8; 1 << 20];
    // SAFETY: the link is dropped (cancelling the receive) before `y`.
    a.post_recv(Tag(1), unsafe { MemSlice::new(y.as_mut_ptr(), y.len()) }, RecvMode::Copy).unwrap();
    for _ in 0..10 {
        a.progress().unwrap();
    }
    let t = Instant::now();
    drop(a);
    assert!(t.elapsed() < Duration::from_secs(1), "cancel took {:?}", t.elapsed());
    y[0] = 1; // the buffer is ours again
              // The endpoint still works for the next link.
    let mut a2 = ta.connect(&*store, 1).unwrap().unwrap();
    let x = [5u8; 8];
    let mut z = [0u8; 8];
    let mut b2 = tb.connect(&*store, 0).unwrap().unwrap();
    // SAFETY: buffers outlive the operations (driven to completion below).
    unsafe {
        a2.post_send(Tag(2), MemSlice::new(x.as_ptr() as *mut u8, 8)).unwrap();
        b2.post_recv(Tag(2), MemSlice::new(z.as_mut_ptr(), 8), RecvMode::Copy).unwrap();
    }
    drive(&mut [&mut a2, &mut b2], |l| l[0].sends_done() == 1 && l[1].recvs_done() == 1);
    assert_eq!(z, x);
}

/// A pair of links with rendezvous from 64 KiB and 16 KiB pieces.
fn rdv_pair(c: &LibfabricConfig) -> (LibfabricLink, LibfabricLink, LibfabricTransport, LibfabricTransport) {
    let c = LibfabricConfig { chunk: 16 << 10, rma_min: 64 << 10, ..c.clone() };
    let (mut ta, mut tb, store) = pair(&c);
    let a = ta.connect(&*store, 1).unwrap().unwrap();
    let b = tb.connect(&*store, 0).unwrap().unwrap();
    (a, b, ta, tb)
}

#[test]
fn large_messages_are_written_with_rma_into_the_receivers_buffer() {
    for register in [false, true] {
        let Some(c) = cfg(register) else { return };
        if !probe(&c).unwrap().has_rma() {
            skip(Need::Libfabric, "the provider offers no RMA with remote completion data");
            return;
        }
        let (mut a, mut b, _ta, _tb) = rdv_pair(&c);
        // Below, at and above the threshold; one not a multiple of the piece size. Receives
        // posted before and after the sends.
        let sizes = [(64 << 10) - 1, 64 << 10, 1 << 20, (3 << 20) + 12_345];
        let (srcs, dsts) = send_sizes(&mut a, &mut b, &sizes, 2);
        assert!(dsts == srcs, "register = {register}");
        // Every piece of the three rendezvous messages went as a write; the first message
        // (below the threshold) as tagged pieces.
        let want: u64 = sizes[1..].iter().map(|&s| s.div_ceil(16 << 10) as u64).sum();
        assert_eq!(a.pieces_sent(), (want, ((64 << 10) - 1usize).div_ceil(16 << 10) as u64), "register = {register}");
    }
}

#[test]
fn a_reducing_receive_asks_for_tagged_pieces_in_a_rendezvous() {
    let Some(c) = cfg(false) else { return };
    let (mut a, mut b, _ta, _tb) = rdv_pair(&c);
    let n = 300_000;
    let out = reduce_f32(&mut a, &mut b, n, 9);
    assert!(out.iter().enumerate().all(|(i, v)| *v == 3.0 * i as f32));
    assert_eq!(a.pieces_sent(), (0, (4 * n).div_ceil(16 << 10) as u64));
}

#[test]
fn a_mismatched_rendezvous_fails_on_both_sides_and_writes_nothing() {
    let Some(c) = cfg(false) else { return };
    let (mut a, mut b, _ta, _tb) = rdv_pair(&c);
    let x = vec![7u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    // SAFETY: the buffers outlive the links (dropped first, cancelling what is posted).
    unsafe {
        a.post_send(Tag::new(2, 1, 1), MemSlice::new(x.as_ptr() as *mut u8, x.len())).unwrap();
        b.post_recv(Tag::new(3, 1, 1), MemSlice::new(y.as_mut_ptr(), y.len()), RecvMode::Copy).unwrap();
    }
    let t = Instant::now();
    let (mut ea, mut eb) = (None, None);
    while (ea.is_none() || eb.is_none()) && t.elapsed() < Duration::from_secs(10) {
        if ea.is_none() {
            ea = a.progress().err();
        }
        if eb.is_none() {
            eb = b.progress().err();
        }
    }
    let (ea, eb) = (ea.expect("the sender fails"), eb.expect("the receiver fails"));
    assert!(matches!(ea, oxccl_core::Error::InvalidUsage(_)), "{ea}");
    assert!(matches!(eb, oxccl_core::Error::InvalidUsage(_)), "{eb}");
    assert!(ea.to_string().contains("all_reduce") && ea.to_string().contains("broadcast"), "{ea}");
    drop((a, b));
    assert!(y.iter().all(|&v| v == 0), "a mismatched rendezvous wrote into the receiver's buffer");
    assert_eq!(x[0], 7);
}

#[test]
fn registrations_are_cached_while_an_operation_runs_and_let_go_at_its_end() {
    {
        let Some(c) = cfg(true) else { return };
        let c = LibfabricConfig { chunk: 64 << 10, rma_min: 0, ..c };
        // An endpoint of its own: links of other tests never end their operations, so
        // their idle registrations would stay in a shared endpoint's cache.
        let store = Arc::new(MemStore::new());
        let own = SharedEndpoint::open(&c, None).unwrap();
        let mut ta = LibfabricTransport::on(own.clone(), &*store, 0, 2, c.clone()).unwrap();
        let mut tb = LibfabricTransport::on(own, &*store, 1, 2, c.clone()).unwrap();
        let mut a = ta.connect(&*store, 1).unwrap().unwrap();
        let mut b = tb.connect(&*store, 0).unwrap().unwrap();
        let endpoint = ta.endpoint().clone();
        let (regs0, hits0, _) = endpoint.mr_stats();
        let x: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let mut y = vec![0u8; 1 << 20];
        // Ten messages from halves and wholes of one buffer into one buffer: one
        // registration each side, hits after.
        for i in 0..10u64 {
            let len = if i % 2 == 0 { x.len() } else { x.len() / 2 };
            // SAFETY: the buffers outlive the operations (driven to completion below).
            unsafe {
                b.post_recv(Tag(i), MemSlice::new(y.as_mut_ptr(), len), RecvMode::Copy).unwrap();
                a.post_send(Tag(i), MemSlice::new(x.as_ptr() as *mut u8, len)).unwrap();
            }
            drive(&mut [&mut a, &mut b], |l| l[0].sends_done() == i + 1 && l[1].recvs_done() == i + 1);
        }
        assert_eq!(y, x);
        let (regs, hits, held) = endpoint.mr_stats();
        assert_eq!(regs - regs0, 2);
        assert_eq!(hits - hits0, 18);
        assert_eq!(held, 2);
        a.op_end();
        b.op_end();
        let (_, _, held) = endpoint.mr_stats();
        assert_eq!(held, 0, "idle registrations close when the operation ends");
        // One still in use when an operation ends (another communicator's) serves its
        // holder, but no new lookup finds it: that buffer may have been freed and remapped.
        let mut g = endpoint.lock();
        let EndpointState { cache, ep, .. } = &mut *g;
        let host = oxccl_core::mem::MemKind::Host;
        // SAFETY: x outlives both registrations (dropped below, before x).
        let held_reg = unsafe {
            cache.get(x.as_ptr(), x.len(), host, false, |p, l, r, k| ep.register_on(p, l, r, MemIface::of(k)))
        }
        .unwrap();
        cache.release_idle();
        let (m0, h0) = (cache.misses, cache.hits);
        // SAFETY: as above.
        let again = unsafe {
            cache.get(x.as_ptr(), x.len(), host, false, |p, l, r, k| ep.register_on(p, l, r, MemIface::of(k)))
        }
        .unwrap();
        assert_eq!((cache.misses - m0, cache.hits - h0, cache.len()), (1, 0, 2));
        drop((held_reg, again));
        cache.release_idle();
        assert_eq!(cache.len(), 0);
    }
}

/// Pairs of net-libfabric links of two communicator slots of this process's endpoint.
struct Pairs {
    c: LibfabricConfig,
    what: &'static str,
    /// The transports stay until the suite ends (their slots must outlive their links).
    keep: Vec<(LibfabricTransport, LibfabricTransport)>,
}

impl oxccl_core::conformance::LinkPair for Pairs {
    fn name(&self) -> String {
        format!(
            "net-libfabric over {} ({}, {} B pieces)",
            self.c.provider.as_deref().unwrap_or("?"),
            self.what,
            self.c.chunk
        )
    }
    fn piece(&self) -> usize {
        self.c.chunk
    }
    fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
        let (mut ta, mut tb, store) = pair(&self.c);
        let a = ta.connect(&*store, 1).unwrap().unwrap();
        let b = tb.connect(&*store, 0).unwrap().unwrap();
        self.keep.push((ta, tb));
        (Box::new(a), Box::new(b))
    }
}

#[test]
fn net_libfabric_keeps_the_link_contract() {
    for (provider, register, rma_min, what) in [
        ("tcp", false, 1 << 20, "RMA writes from 1 MiB"),
        ("tcp", true, 0, "every buffer registered, no RMA"),
        ("shm", false, 256 << 10, "RMA writes from 256 KiB"),
    ] {
        let c = LibfabricConfig {
            provider: Some(provider.into()),
            register_always: register,
            rma_min,
            chunk: 64 << 10,
            ..Default::default()
        };
        if let Err(e) = available(&c) {
            skip(Need::Libfabric, format!("{provider}: {e}"));
            continue;
        }
        oxccl_core::conformance::run(&mut Pairs { c, what, keep: Vec::new() });
    }
}
