//! One conformance suite for the [`Link`] contract, written once and run against every
//! transport: the simulator, host-staging, net-tcp, net-libfabric (each with a
//! [`LinkPair`] that makes connected pairs of its links).
//!
//! What it checks, each on a fresh pair: messages arrive in posting order whatever their
//! sizes (0 B to several MiB, small after large and the reverse); a send counted done
//! reaches its receiver without its sender progressing any more, even once the sender's link
//! is dropped; every size class and
//! piece boundary; reduce-on-receive for every data type; zero-length messages; mismatched
//! tags and lengths fail the receive with `InvalidUsage`; both directions at once; posts
//! never block and sends beyond what the transport can hold wait for the receiver; dropping
//! links with operations in flight returns promptly; a peer that closes mid-message fails the
//! receives waiting on it instead of leaving them to hang. Every wait is bounded: a check
//! that does not finish in time fails, naming itself and the transport.

use std::time::{Duration, Instant};

use crate::dtype::{DataType, ReduceOp};
use crate::error::Error;
use crate::link::{Link, MemSlice, RecvMode, Tag};
use crate::mem::{LocalMem, MemKind};

std::thread_local! {
    /// The kind of memory the checks being run hand to the links, and its kernels.
    static MEMORY: std::cell::Cell<(MemKind, &'static dyn LocalMem)> =
        const { std::cell::Cell::new((MemKind::Host, &crate::mem::HOST)) };
}

/// Makes connected pairs of one transport's links, for the suite.
pub trait LinkPair {
    /// The transport, as failures name it ("host-staging", "net-libfabric over shm").
    fn name(&self) -> String;
    /// The largest piece the transport cuts a message into (sizes around its multiples are
    /// checked).
    fn piece(&self) -> usize;
    /// A fresh pair: rank 0's link to rank 1, and rank 1's link to rank 0.
    fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>);
    /// Whether a link notices, by itself, that its peer's link was dropped. Where it does not
    /// (connectionless endpoints), the engine's loss detection does, and the suite says so.
    fn notices_a_closed_peer(&self) -> Result<(), String> {
        Ok(())
    }
    /// The kind of memory of the buffers the checks post (they read and write them as host
    /// memory: a simulated device's memory is host memory labelled so), with its kernels.
    fn memory(&self) -> (MemKind, &'static dyn LocalMem) {
        (MemKind::Host, &crate::mem::HOST)
    }
}

/// One check of the suite.
type Check = fn(&mut dyn LinkPair);

/// How long one check may take.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs every check against `h`, panicking with the check's and the transport's names on the
/// first failure.
pub fn run(h: &mut dyn LinkPair) {
    MEMORY.with(|m| m.set(h.memory()));
    let checks: [(&str, Check); 10] = [
        ("order, every size, small after large and the reverse", order_and_sizes),
        ("a send counted done needs nothing more of its sender, nor its link", done_sends_need_no_sender),
        ("piece boundaries", piece_boundaries),
        ("reduce on receive, every data type", reduce_on_receive),
        ("zero-length messages", zero_length),
        ("mismatched tags and lengths", mismatches),
        ("both directions at once", both_directions),
        ("back-pressure: posts never block, sends wait for the receiver", back_pressure),
        ("drop with operations in flight", drop_in_flight),
        ("a peer that closes mid-message", peer_closes),
    ];
    for (what, check) in checks {
        if what == "a peer that closes mid-message" {
            if let Err(why) = h.notices_a_closed_peer() {
                println!("{}: {what}: not checked on the link: {why}", h.name());
                continue;
            }
        }
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(h)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: {what}: {msg}", h.name());
        }
        println!("{}: {what}: ok ({:?})", h.name(), start.elapsed());
    }
}

fn slice(v: &mut [u8]) -> MemSlice {
    let kind = MEMORY.with(|m| m.get().0);
    // SAFETY: every check keeps its buffers alive, untouched, until its links are dropped.
    unsafe { MemSlice::new_in(v.as_mut_ptr(), v.len(), kind) }
}

/// Byte `i` of message `k`.
fn pattern(k: usize, i: usize) -> u8 {
    (i.wrapping_mul(131) ^ k.wrapping_mul(7919)) as u8
}

fn filled(k: usize, n: usize) -> Vec<u8> {
    (0..n).map(|i| pattern(k, i)).collect()
}

/// Progresses both links until `done` holds; an error of either link is returned with the
/// side it came from (0 or 1). Fails the check after [`LIMIT`].
fn drive(
    a: &mut dyn Link,
    b: &mut dyn Link,
    mut done: impl FnMut(&dyn Link, &dyn Link) -> bool,
) -> Result<(), (usize, Error)> {
    let end = Instant::now() + LIMIT;
    while !done(a, b) {
        a.progress().map_err(|e| (0, e))?;
        b.progress().map_err(|e| (1, e))?;
        assert!(
            Instant::now() < end,
            "no progress for {LIMIT:?}: sends {}/{}, receives {}/{}",
            a.sends_done(),
            b.sends_done(),
            a.recvs_done(),
            b.recvs_done()
        );
    }
    Ok(())
}

/// Sends messages of `sizes` from `a` to `b` (all posted before any is received) and checks
/// each arrives whole, in order.
fn one_way(a: &mut dyn Link, b: &mut dyn Link, sizes: &[usize]) {
    let mut src: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &n)| filled(k, n)).collect();
    let mut dst: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xEE; n]).collect();
    let (s0, r0) = (a.sends_done(), b.recvs_done());
    for (k, s) in src.iter_mut().enumerate() {
        assert_eq!(a.post_send(Tag(k as u64 + 1), slice(s)).unwrap(), s0 + k as u64, "send sequence numbers");
    }
    for (k, d) in dst.iter_mut().enumerate() {
        assert_eq!(b.post_recv(Tag(k as u64 + 1), slice(d), RecvMode::Copy).unwrap(), r0 + k as u64);
    }
    let n = sizes.len() as u64;
    drive(a, b, |a, b| a.sends_done() == s0 + n && b.recvs_done() == r0 + n)
        .unwrap_or_else(|(s, e)| panic!("side {s}: {e}"));
    for (k, (s, d)) in src.iter().zip(&dst).enumerate() {
        assert!(s == d, "message {k} ({} bytes) arrived wrong", s.len());
    }
}

fn order_and_sizes(h: &mut dyn LinkPair) {
    let p = h.piece();
    let mb = 1 << 20;
    let sizes = [
        0,
        1,
        7,
        8,
        31,
        32,
        33,
        63,
        64,
        65,
        4064,
        4065,
        4080,
        4081,
        4095,
        4096,
        4097,
        p - 1,
        p,
        p + 1,
        3 * p + 5,
        4 * mb + 3,
        8,
        0,
        1,
        100_000,
        2 * mb,
        3,
    ];
    let (mut a, mut b) = h.connect();
    one_way(&mut *a, &mut *b, &sizes);
    // Small after large, then large after small, in the other direction.
    let mut rev = sizes;
    rev.sort_unstable_by(|x, y| y.cmp(x));
    one_way(&mut *b, &mut *a, &rev);
    rev.reverse();
    one_way(&mut *b, &mut *a, &rev);
}

fn piece_boundaries(h: &mut dyn LinkPair) {
    let p = h.piece();
    let sizes: Vec<usize> = (1..=4).flat_map(|k| [k * p - 1, k * p, k * p + 1]).collect();
    let (mut a, mut b) = h.connect();
    one_way(&mut *a, &mut *b, &sizes);
}

/// `count` elements of `dtype` with small integer values (exact in every type).
fn values(dtype: DataType, count: usize, seed: usize) -> Vec<u8> {
    let es = dtype.size();
    let mut v = vec![0u8; count * es];
    for i in 0..count {
        let x = ((i * 7 + seed * 3) % 11) as i64 + 1;
        let b = &mut v[i * es..(i + 1) * es];
        match dtype {
            DataType::F32 => b.copy_from_slice(&(x as f32).to_ne_bytes()),
            DataType::F64 => b.copy_from_slice(&(x as f64).to_ne_bytes()),
            DataType::F16 => b.copy_from_slice(&half::f16::from_f64(x as f64).to_ne_bytes()),
            DataType::Bf16 => b.copy_from_slice(&half::bf16::from_f64(x as f64).to_ne_bytes()),
            DataType::I8 => b.copy_from_slice(&(x as i8).to_ne_bytes()),
            DataType::U8 => b.copy_from_slice(&(x as u8).to_ne_bytes()),
            DataType::I32 => b.copy_from_slice(&(x as i32).to_ne_bytes()),
            DataType::U32 => b.copy_from_slice(&(x as u32).to_ne_bytes()),
            DataType::I64 => b.copy_from_slice(&x.to_ne_bytes()),
            DataType::U64 => b.copy_from_slice(&(x as u64).to_ne_bytes()),
        }
    }
    v
}

fn reduce_on_receive(h: &mut dyn LinkPair) {
    let p = h.piece();
    let (mut a, mut b) = h.connect();
    for (k, &dtype) in DataType::ALL.iter().enumerate() {
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            // Across a piece boundary, with the local operand the destination itself and apart.
            let count = (p / dtype.size()) + 3;
            let mut incoming = values(dtype, count, k);
            let local = values(dtype, count, k + 5);
            let mut want = vec![0u8; local.len()];
            // SAFETY: three buffers of `count` elements of `dtype`.
            unsafe {
                crate::reduce::reduce_raw(dtype, op, want.as_mut_ptr(), local.as_ptr(), incoming.as_ptr(), count)
            };
            let mut in_place = local.clone();
            let mut apart_local = local.clone();
            let mut apart_dst = vec![0u8; local.len()];
            let mut incoming2 = incoming.clone();
            let s0 = a.sends_done();
            let r0 = b.recvs_done();
            a.post_send(Tag(1), slice(&mut incoming)).unwrap();
            a.post_send(Tag(2), slice(&mut incoming2)).unwrap();
            let mem = MEMORY.with(|m| m.get().1);
            let l1 = slice(&mut in_place);
            b.post_recv(Tag(1), l1, RecvMode::Reduce { dtype, op, local: l1, mem }).unwrap();
            let l2 = slice(&mut apart_local);
            b.post_recv(Tag(2), slice(&mut apart_dst), RecvMode::Reduce { dtype, op, local: l2, mem }).unwrap();
            drive(&mut *a, &mut *b, |a, b| a.sends_done() == s0 + 2 && b.recvs_done() == r0 + 2)
                .unwrap_or_else(|(s, e)| panic!("{dtype} {op:?}: side {s}: {e}"));
            assert!(in_place == want, "{dtype} {op:?}: reduce into the local operand");
            assert!(apart_dst == want, "{dtype} {op:?}: reduce into another buffer");
            assert!(apart_local == local, "{dtype} {op:?}: the local operand was written");
        }
    }
}

fn zero_length(h: &mut dyn LinkPair) {
    let (mut a, mut b) = h.connect();
    one_way(&mut *a, &mut *b, &[0, 0, 5, 0]);
    // A zero-length message of another operation is a mismatch like any other.
    let (mut e0, mut e1) = (Vec::new(), Vec::new());
    a.post_send(Tag(9), slice(&mut e0)).unwrap();
    b.post_recv(Tag(10), slice(&mut e1), RecvMode::Copy).unwrap();
    let err = drive(&mut *a, &mut *b, |_, b| b.recvs_done() > 4).expect_err("a zero-length mismatch went unnoticed");
    assert!(matches!(err, (_, Error::InvalidUsage(_))), "{err:?}");
}

fn mismatches(h: &mut dyn LinkPair) {
    let p = h.piece();
    for (what, stag, slen, rtag, rlen) in [
        ("tag", 3u64, 100usize, 4u64, 100usize),
        ("length", 3, 100, 3, 101),
        ("length of a large message", 3, 2 * p + 1, 3, 2 * p),
    ] {
        let (mut a, mut b) = h.connect();
        let mut x = filled(1, slen);
        let mut y = vec![0u8; rlen];
        a.post_send(Tag(stag), slice(&mut x)).unwrap();
        b.post_recv(Tag(rtag), slice(&mut y), RecvMode::Copy).unwrap();
        let end = Instant::now() + LIMIT;
        let e = loop {
            // The sender may notice too (rendezvous protocols); the receiver must.
            let _ = a.progress();
            if let Err(e) = b.progress() {
                break e;
            }
            assert!(b.recvs_done() == 0, "{what}: a mismatched receive completed");
            assert!(Instant::now() < end, "{what}: the mismatch went unnoticed");
        };
        assert!(matches!(e, Error::InvalidUsage(_)), "{what}: {e}");
        assert!(e.to_string().contains("expected"), "{what}: the error names both sides: {e}");
        drop((a, b));
    }
}

/// The engine stops progressing a link once the operations it waits on are done: a send
/// counted done must reach its receiver with only the receiver's link progressed (nothing of
/// it may be left queued on the sender's side, a control message say).
fn done_sends_need_no_sender(h: &mut dyn LinkPair) {
    let p = h.piece();
    let cases = [vec![9usize], vec![0, 4096], vec![p + 17, 300_000, 16]];
    for (sizes, close) in cases.iter().flat_map(|c| [(c.clone(), false), (c.clone(), true)]) {
        let mut src: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &n)| filled(k, n)).collect();
        let mut dst: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xEE; n]).collect();
        // Made after the buffers, so dropped before them even when a check fails.
        let (mut a, mut b) = h.connect();
        for (k, d) in dst.iter_mut().enumerate() {
            b.post_recv(Tag(k as u64), slice(d), RecvMode::Copy).unwrap();
        }
        for (k, s) in src.iter_mut().enumerate() {
            a.post_send(Tag(k as u64), slice(s)).unwrap();
        }
        let n = sizes.len() as u64;
        // Both sides progressed until the sends are done (the receiver may have to say where
        // to write), then the receiver alone; the sender's link is dropped then too, as a rank
        // that destroys its communicator right after its last operation does.
        drive(&mut *a, &mut *b, |a, _| a.sends_done() == n).unwrap_or_else(|(s, e)| panic!("side {s}: {e}"));
        if close {
            drop(a);
        }
        let end = Instant::now() + LIMIT;
        while b.recvs_done() < n {
            b.progress().unwrap_or_else(|e| panic!("{sizes:?}: receiver (sender's link dropped: {close}): {e}"));
            assert!(
                Instant::now() < end,
                "{sizes:?}: the sends were done but the receiver got {}/{n} without the sender progressing{}",
                b.recvs_done(),
                if close { " (its link dropped)" } else { "" }
            );
        }
        assert!(src == dst, "{sizes:?}: a message arrived wrong");
    }
}

fn both_directions(h: &mut dyn LinkPair) {
    let p = h.piece();
    let sizes: Vec<usize> = (0..40).map(|k| [0, 9, 4096, p + 17, 300_000, 2 * p][k % 6]).collect();
    let (mut a, mut b) = h.connect();
    let mut src_a: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &n)| filled(k, n)).collect();
    let mut src_b: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &n)| filled(k + 1000, n)).collect();
    let mut dst_a: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0; n]).collect();
    let mut dst_b: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0; n]).collect();
    for k in 0..sizes.len() {
        let t = Tag(k as u64);
        a.post_send(t, slice(&mut src_a[k])).unwrap();
        b.post_send(t, slice(&mut src_b[k])).unwrap();
        a.post_recv(t, slice(&mut dst_a[k]), RecvMode::Copy).unwrap();
        b.post_recv(t, slice(&mut dst_b[k]), RecvMode::Copy).unwrap();
    }
    let n = sizes.len() as u64;
    drive(&mut *a, &mut *b, |a, b| {
        a.sends_done() == n && b.sends_done() == n && a.recvs_done() == n && b.recvs_done() == n
    })
    .unwrap_or_else(|(s, e)| panic!("side {s}: {e}"));
    assert!(dst_b == src_a && dst_a == src_b, "a message arrived wrong");
}

fn back_pressure(h: &mut dyn LinkPair) {
    // 48 MiB of sends before the receiver posts anything: more than any transport holds.
    let count = 48;
    let (mut a, mut b) = h.connect();
    let mut src: Vec<Vec<u8>> = (0..count).map(|k| filled(k, 1 << 20)).collect();
    let mut dst: Vec<Vec<u8>> = (0..count).map(|_| vec![0; 1 << 20]).collect();
    for (k, s) in src.iter_mut().enumerate() {
        a.post_send(Tag(k as u64), slice(s)).unwrap();
    }
    for _ in 0..200 {
        a.progress().unwrap();
        b.progress().unwrap();
    }
    assert!(a.sends_done() < count as u64, "48 MiB of sends completed with nobody receiving");
    for (k, d) in dst.iter_mut().enumerate() {
        b.post_recv(Tag(k as u64), slice(d), RecvMode::Copy).unwrap();
    }
    let n = count as u64;
    drive(&mut *a, &mut *b, |a, b| a.sends_done() == n && b.recvs_done() == n)
        .unwrap_or_else(|(s, e)| panic!("side {s}: {e}"));
    assert!(src == dst, "a message arrived wrong");
}

fn drop_in_flight(h: &mut dyn LinkPair) {
    let p = h.piece();
    let (mut a, mut b) = h.connect();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|k| filled(k, [16, 3 * p + 1, 2 << 20, 0][k % 4])).collect();
    let mut recv: Vec<Vec<u8>> = (0..8).map(|k| vec![0; [16, 3 * p + 1, 2 << 20, 0][k % 4]]).collect();
    for (k, x) in bufs.iter_mut().enumerate().take(6) {
        a.post_send(Tag(k as u64), slice(x)).unwrap();
    }
    for (k, y) in recv.iter_mut().enumerate() {
        b.post_recv(Tag(k as u64), slice(y), RecvMode::Copy).unwrap();
    }
    for _ in 0..5 {
        let _ = a.progress();
        let _ = b.progress();
    }
    let t = Instant::now();
    drop(a);
    drop(b);
    assert!(t.elapsed() < Duration::from_secs(5), "dropping links with operations in flight took {:?}", t.elapsed());
    // Only now may the buffers go.
    drop((bufs, recv));
}

fn peer_closes(h: &mut dyn LinkPair) {
    let (mut a, mut b) = h.connect();
    let big = 8 << 20;
    let mut x = filled(1, big);
    let mut y = vec![0u8; big];
    let mut z = vec![0u8; 64];
    a.post_send(Tag(1), slice(&mut x)).unwrap();
    b.post_recv(Tag(1), slice(&mut y), RecvMode::Copy).unwrap();
    b.post_recv(Tag(2), slice(&mut z), RecvMode::Copy).unwrap();
    for _ in 0..3 {
        a.progress().unwrap();
        b.progress().unwrap();
    }
    drop(a);
    let end = Instant::now() + LIMIT;
    let e = loop {
        match b.progress() {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < end, "the receiver still waits {LIMIT:?} after its peer closed"),
        }
    };
    assert!(b.recvs_done() < 2, "a receive nobody sent completed");
    let names_peer = matches!(e, Error::Remote { rank: 0, .. } | Error::Transport { peer: Some(0), .. });
    assert!(names_peer, "the error names the peer: {e}");
    drop(b);
    drop((x, y, z));
}
