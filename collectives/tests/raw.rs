//! Calls on raw buffers (what the Python package and the C library use), with ranks as
//! threads: each collective gives what the typed call gives, in place and out of place,
//! blocking and queued; bad buffers are refused before anything moves.

mod common;
use common::run_ranks;

use oxccl::{Communicator, DataType, Error, MemKind, RawBuf, RawCall, ReduceOp};

fn buf(v: &[f32]) -> RawBuf {
    RawBuf::host(v.as_ptr() as *const u8, v.len(), DataType::F32)
}

fn buf_mut(v: &mut [f32]) -> RawBuf {
    RawBuf::host(v.as_mut_ptr() as *const u8, v.len(), DataType::F32)
}

/// `call` from `send` (none: an empty buffer) into `recv` (none: likewise), blocking.
fn raw(c: &Communicator, call: RawCall, send: Option<&[f32]>, recv: Option<&mut [f32]>) -> oxccl::Result<()> {
    let none = RawBuf::none(DataType::F32);
    let (s, r) = (send.map_or(none, buf), recv.map_or(none, buf_mut));
    // SAFETY: both borrows last for the whole call; recv is borrowed mutably.
    unsafe { c.call_raw(&call, s, r) }
}

/// `call` in place on `v`: blocking, or queued and waited for.
fn raw_in_place(c: &Communicator, call: RawCall, v: &mut [f32], queued: bool) -> oxccl::Result<()> {
    let b = buf_mut(v);
    // SAFETY: the mutable borrow lasts until the call (or its work) has completed.
    unsafe {
        if queued {
            c.submit_raw(&call, b, b)?.wait()
        } else {
            c.call_raw(&call, b, b)
        }
    }
}

#[test]
fn raw_calls_match_the_typed_ones() {
    run_ranks(3, |c| {
        let (r, w) = (c.rank(), c.world_size());
        let mine: Vec<f32> = (0..6).map(|i| (r * 10 + i) as f32).collect();
        let sum = RawCall::AllReduce { op: ReduceOp::Sum };
        // all_reduce, out of place and in place, blocking and queued.
        let mut out = vec![0f32; 6];
        raw(&c, sum.clone(), Some(&mine), Some(&mut out)).unwrap();
        let mut typed = vec![0f32; 6];
        c.all_reduce(&mine, &mut typed, ReduceOp::Sum).unwrap();
        assert_eq!(out, typed);
        for queued in [false, true] {
            let mut v = mine.clone();
            raw_in_place(&c, RawCall::AllReduce { op: ReduceOp::Max }, &mut v, queued).unwrap();
            assert_eq!(v, (0..6).map(|i| ((w - 1) * 10 + i) as f32).collect::<Vec<_>>());
        }
        // broadcast from 1: non-roots pass no send buffer.
        raw(&c, RawCall::Broadcast { root: 1 }, (r == 1).then_some(&mine[..]), Some(&mut out)).unwrap();
        assert_eq!(out, (0..6).map(|i| (10 + i) as f32).collect::<Vec<_>>());
        // reduce to 2: non-roots pass no receive buffer.
        let call = RawCall::Reduce { op: ReduceOp::Sum, root: 2 };
        raw(&c, call, Some(&mine), (r == 2).then_some(&mut out[..])).unwrap();
        if r == 2 {
            assert_eq!(out, typed);
        }
        // all_gather and reduce_scatter.
        let mut all = vec![0f32; 6 * w];
        raw(&c, RawCall::AllGather, Some(&mine), Some(&mut all)).unwrap();
        let mut want = vec![0f32; 6 * w];
        c.all_gather(&mine, &mut want).unwrap();
        assert_eq!(all, want);
        let mut part = vec![0f32; 6];
        raw(&c, RawCall::ReduceScatter { op: ReduceOp::Sum }, Some(&all), Some(&mut part)).unwrap();
        assert_eq!(part, want[6 * r..6 * r + 6].iter().map(|x| x * w as f32).collect::<Vec<_>>());
        // all_to_all and barrier.
        raw(&c, RawCall::AllToAll, Some(&mine), Some(&mut out)).unwrap();
        c.all_to_all(&mine, &mut typed).unwrap();
        assert_eq!(out, typed);
        raw(&c, RawCall::Barrier, None, None).unwrap();
        // Point-to-point: each posts its receive, then its send.
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let (into, from) = (buf_mut(&mut out), buf(&mine));
        // SAFETY: `out` and `mine` are not touched until both works completed.
        let (rx, tx) = unsafe { (c.recv_async_raw(into, prev).unwrap(), c.send_async_raw(from, next).unwrap()) };
        rx.wait().unwrap();
        tx.wait().unwrap();
        assert_eq!(out, (0..6).map(|i| (prev * 10 + i) as f32).collect::<Vec<_>>());
        if r == 0 {
            // SAFETY: `mine` outlives the blocking call.
            unsafe { c.send_raw(buf(&mine), 1) }.unwrap();
        } else if r == 1 {
            // SAFETY: `out` is borrowed mutably for the blocking call.
            unsafe { c.recv_raw(buf_mut(&mut out), 0) }.unwrap();
            assert_eq!(out, (0..6).map(|i| i as f32).collect::<Vec<_>>());
        }
    });
}

#[test]
fn bad_raw_buffers_are_refused_and_change_nothing() {
    run_ranks(2, |c| {
        let v = vec![1f32; 4];
        let ints = [1i32; 4];
        let sum = RawCall::AllReduce { op: ReduceOp::Sum };
        let cases: Vec<(RawBuf, RawBuf, &str)> = vec![
            (
                buf(&v),
                RawBuf::host(ints.as_ptr() as *const u8, 4, DataType::I32),
                "send holds float but recv holds int32",
            ),
            (buf(&v), RawBuf { addr: 0, ..buf(&v) }, "null address"),
            (buf(&v), RawBuf { count: usize::MAX, ..buf(&v) }, "overflows"),
            (buf(&v), RawBuf { count: 3, ..buf(&v) }, "send has 4 elements but recv has 3"),
            (buf(&v), RawBuf { kind: MemKind::Device(0), ..buf(&v) }, "send is in host memory but recv is in"),
        ];
        for (s, r, says) in cases {
            // SAFETY: refused before any byte moves (what this test checks).
            let e = unsafe { c.call_raw(&sum, s, r) }.unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            assert!(e.to_string().contains(says), "{e} does not say {says:?}");
        }
        let dev = RawBuf { kind: MemKind::Device(0), ..buf(&v) };
        // SAFETY: refused before any byte moves.
        let e = unsafe { c.call_raw(&sum, dev, dev) }.unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "device memory over host transports: {e:?}");
        let e = raw(&c, RawCall::Broadcast { root: 5 }, Some(&v), Some(&mut [0f32; 4])).unwrap_err();
        assert!(e.to_string().contains("root 5 is out of range"), "{e}");
        // Still usable.
        let mut x = vec![1f32; 4];
        c.all_reduce_in_place(&mut x, ReduceOp::Sum).unwrap();
        assert_eq!(x, vec![2f32; 4]);
    });
}

/// Tagged sends and receives match in call order; a receive posted for another tag than the
/// next message's fails with `InvalidUsage` naming both tags, and takes none of its data.
#[test]
fn tagged_point_to_point_checks_the_tags() {
    run_ranks(2, |c| {
        let r = c.rank();
        let peer = 1 - r;
        // In the same order on both sides: delivered.
        let (a, b) = ([1f32, 2.0], [3f32, 4.0, 5.0]);
        let (mut x, mut y) = ([0f32; 2], [0f32; 3]);
        // SAFETY: every buffer outlives the works, which are waited for below.
        unsafe {
            if r == 0 {
                let w1 = c.send_async_raw_tagged(buf(&a), peer, 7).unwrap();
                let w2 = c.send_async_raw_tagged(buf(&b), peer, 9).unwrap();
                w1.wait().unwrap();
                w2.wait().unwrap();
            } else {
                let w1 = c.recv_async_raw_tagged(buf_mut(&mut x), peer, 7).unwrap();
                let w2 = c.recv_async_raw_tagged(buf_mut(&mut y), peer, 9).unwrap();
                w1.wait().unwrap();
                w2.wait().unwrap();
                assert_eq!((x, y), (a, b));
            }
        }
        c.barrier().unwrap();
        // Tags in another order on the receiving side: an error naming both, nothing written.
        let mut z = [0f32; 2];
        // SAFETY: as above.
        unsafe {
            if r == 0 {
                // The send may complete (it reached the peer's link) or fail with the
                // communicator; the receiver's error is what is checked.
                let _ = c.send_async_raw_tagged(buf(&a), peer, 1).unwrap().wait();
            } else {
                let e = c.recv_async_raw_tagged(buf_mut(&mut z), peer, 2).unwrap().wait().unwrap_err();
                let msg = e.to_string();
                assert!(matches!(e, Error::InvalidUsage(_)), "{e:?}");
                assert!(msg.contains("send/recv (tag 2)") && msg.contains("send/recv (tag 1)"), "{msg}");
                assert!(msg.contains("call order"), "{msg}");
                assert_eq!(z, [0.0; 2], "a mismatched receive wrote into its buffer");
            }
        }
    });
}

/// broadcast_delta: every density gives exactly the root's buffer, with the encoding the
/// density calls for; a receiver with a buffer of another length is told.
#[test]
fn delta_broadcast_is_exact_at_every_density() {
    use oxccl::DeltaEncoding;
    run_ranks(3, |c| {
        let n = 10_000;
        let previous: Vec<f32> = (0..n).map(|i| i as f32).collect();
        for (changed, want) in [
            (0usize, DeltaEncoding::Unchanged),
            (1, DeltaEncoding::Indices),
            (100, DeltaEncoding::Indices),
            (1_000, DeltaEncoding::Bitmask),
            (3_000, DeltaEncoding::Bitmask),
            (6_000, DeltaEncoding::Full),
        ] {
            // Every 10000/changed-th element changes (spread over the buffer).
            let next: Vec<f32> = previous
                .iter()
                .enumerate()
                .map(|(i, &v)| if changed > 0 && i * changed % n < changed { -v - 1.0 } else { v })
                .collect();
            let k = previous.iter().zip(&next).filter(|(a, b)| a != b).count();
            let mut buf = if c.rank() == 1 { next.clone() } else { previous.clone() };
            let prev: &[f32] = if c.rank() == 1 { &previous } else { &[] };
            let s = c.broadcast_delta(&mut buf, prev, 1).unwrap();
            assert_eq!(buf, next, "rank {} after {changed} changes", c.rank());
            assert_eq!((s.encoding, s.changed), (want, k), "{changed} changed");
            if want != DeltaEncoding::Full {
                assert!(s.bytes < n * 4 / 2, "{s:?}");
            }
        }
        // A receiver whose buffer has another length: InvalidUsage, on that rank.
        let mut short = vec![0f32; if c.rank() == 2 { 5 } else { 10 }];
        let prev = vec![1f32; 10];
        let r = c.broadcast_delta(&mut short, if c.rank() == 0 { &prev } else { &[] }, 0);
        if c.rank() == 2 {
            assert!(matches!(r, Err(Error::InvalidUsage(ref m)) if m.contains("5 elements")), "{r:?}");
        }
    });
}

/// Runs `f` on ranks as threads whose host identities are `hosts` (so ranks of other
/// "hosts" talk over net-tcp on loopback, those of one host over host staging).
fn run_on_hosts<F>(hosts: &[&str], f: F)
where
    F: Fn(Communicator) + Send + Sync + 'static,
{
    let store: std::sync::Arc<dyn oxccl::Store> = std::sync::Arc::new(oxccl::MemStore::new());
    let f = std::sync::Arc::new(f);
    let n = hosts.len();
    let handles: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(r, h)| {
            let (s, f, h) = (store.clone(), f.clone(), h.to_string());
            std::thread::spawn(move || {
                let mut cfg = oxccl::Config::defaults();
                cfg.set("OXCCL_TIMEOUT", "20s").unwrap();
                cfg.set("OXCCL_HOST_ID", &h).unwrap();
                f(Communicator::init(s, r, n, cfg).unwrap())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// broadcast_from_roots over two "hosts" of three ranks: every rank ends with the roots'
/// data for several root sets (one root; two on one host; one per host; every rank), in and
/// out of place and across segments; explain names the sources and chains; bad roots are
/// argument errors that leave the communicator usable.
#[test]
fn broadcast_from_roots_gives_everyone_the_roots_data() {
    run_on_hosts(&["a", "a", "a", "b", "b", "b"], |c| {
        let me = c.rank();
        let n = 300_001; // odd, and over the default segment: several segments per stripe
        let data: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        for roots in [vec![4], vec![0, 1], vec![5, 1], vec![0, 1, 2, 3, 4, 5]] {
            let is_root = roots.contains(&me);
            let mut out = vec![7u32; n];
            let send = if is_root { data.clone() } else { Vec::new() };
            c.broadcast_from_roots(&send, &mut out, &roots).unwrap();
            assert!(out == data, "rank {me}, roots {roots:?}");
            let mut buf = if is_root { data.clone() } else { vec![0u32; n] };
            c.broadcast_from_roots_in_place(&mut buf, &roots).unwrap();
            assert!(buf == data, "rank {me}, roots {roots:?}, in place");
        }
        // Roots on both hosts: one sender per host, and explain says so.
        let plan = c.plan_broadcast_from_roots(n, &[5, 1, 2]).unwrap();
        assert_eq!(plan.sources, vec![5, 1]);
        let mut buf = if [5, 1, 2].contains(&me) { data.clone() } else { vec![0u32; n] };
        c.broadcast_from_roots_in_place(&mut buf, &[5, 1, 2]).unwrap();
        assert!(buf == data);
        let text = c.explain().to_text();
        assert!(text.contains("broadcast from roots [5, 1, 2]") && text.contains("sources [5, 1]"), "{text}");
        assert!(text.contains("one root per host sends") && text.contains("stripe 0:"), "{text}");
        assert_eq!(c.explain().striped, Some(plan));
        // Bad roots: told before anything moves, on every rank; the communicator goes on.
        for (roots, says) in [(vec![], "no roots"), (vec![1, 1], "named twice"), (vec![6], "out of range")] {
            let r = c.broadcast_from_roots_in_place(&mut buf, &roots);
            assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains(says)), "{roots:?}: {r:?}");
        }
        let mut short = vec![0u32; 3];
        let r = c.broadcast_from_roots(&[1u32, 2], &mut short, &[0]);
        if me == 0 {
            assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("send has 2")), "{r:?}");
        } else {
            // The root refused and left: the others are told it closed, instead of waiting.
            assert!(matches!(r, Err(Error::Remote { rank: 0, .. })), "{r:?}");
        }
    });
}

/// all_to_all_v_dynamic: the receivers learn their counts from the messages; blocks land
/// packed in rank order; zero counts, uneven counts and a self block work; a recv buffer too
/// small is an argument error on that rank that loses nothing (the next call works).
#[test]
fn all_to_all_v_dynamic_learns_the_counts() {
    run_ranks(4, |c| {
        let (me, n) = (c.rank(), c.world_size());
        for round in 0..6usize {
            // From rank r to rank k: (r * 3 + k * 5 + round) % 7 elements (some zero).
            let count = |r: usize, k: usize| (r * 3 + k * 5 + round) % 7 * (1 + round * 300);
            let send_counts: Vec<usize> = (0..n).map(|k| count(me, k)).collect();
            let send: Vec<u32> = (0..n)
                .flat_map(|k| (0..send_counts[k]).map(move |i| (me * 1_000_000 + k * 10_000 + i) as u32))
                .collect();
            let mut recv = vec![0u32; 40_000];
            let got = c.all_to_all_v_dynamic(&send, &send_counts, &mut recv).unwrap();
            let want_counts: Vec<usize> = (0..n).map(|r| count(r, me)).collect();
            assert_eq!(got, want_counts, "round {round}");
            let want: Vec<u32> =
                (0..n).flat_map(|r| (0..count(r, me)).map(move |i| (r * 1_000_000 + me * 10_000 + i) as u32)).collect();
            assert!(recv[..want.len()] == want[..], "rank {me}, round {round}");
        }
        // Rank 2's buffer is too small for what comes: it is told; the others are not.
        let send_counts = vec![100usize; n];
        let send = vec![me as u32; 100 * n];
        let mut recv = vec![0u32; if me == 2 { 150 } else { 400 }];
        let r = c.all_to_all_v_dynamic(&send, &send_counts, &mut recv);
        if me == 2 {
            assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("400 elements arrived")), "{r:?}");
        } else {
            assert_eq!(r.unwrap(), vec![100; n]);
        }
        // Bad counts: told before anything moves.
        let r = c.all_to_all_v_dynamic(&send, &[1, 2], &mut recv);
        assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("2 send counts")), "{r:?}");
        let r = c.all_to_all_v_dynamic(&send, &vec![1000; n], &mut recv);
        assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("need 4000")), "{r:?}");
        // Still usable everywhere.
        let mut recv = vec![0u32; 400];
        assert_eq!(c.all_to_all_v_dynamic(&send, &send_counts, &mut recv).unwrap(), vec![100; n]);
        assert!((0..n).all(|r| recv[r * 100..(r + 1) * 100].iter().all(|&v| v == r as u32)));
    });
}

/// broadcast_delta on 1- and 8-byte elements and lengths that are not a multiple of 64
/// (the change mask's words): every encoding gives exactly the root's buffer.
#[test]
fn delta_broadcast_is_exact_for_every_width() {
    use oxccl::DeltaEncoding;
    run_ranks(2, |c| {
        fn check<T: oxccl::Element + From<u8>>(c: &Communicator, n: usize) {
            let previous: Vec<T> = (0..n).map(|i| T::from((i % 200) as u8)).collect();
            for (every, want) in [
                (0usize, DeltaEncoding::Unchanged),
                (97, DeltaEncoding::Indices),
                (5, DeltaEncoding::Bitmask),
                (1, DeltaEncoding::Full),
            ] {
                let next: Vec<T> = previous
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if every > 0 && i % every == every - 1 { T::from(250) } else { v })
                    .collect();
                let mut buf = if c.rank() == 0 { next.clone() } else { previous.clone() };
                let prev: &[T] = if c.rank() == 0 { &previous } else { &[] };
                let s = c.broadcast_delta(&mut buf, prev, 0).unwrap();
                assert!(buf == next, "rank {}, n {n}, every {every}", c.rank());
                if std::mem::size_of::<T>() == 8 || want != DeltaEncoding::Indices {
                    assert_eq!(s.encoding, want, "n {n}, every {every}, {} bytes", std::mem::size_of::<T>());
                }
            }
        }
        check::<u8>(&c, 1001);
        check::<f64>(&c, 777);
        check::<u8>(&c, 63);
    });
}
