//! Scenarios of the collectives themselves: conformance, order, split, non-blocking work, bad
//! input, lazy links, mismatched calls.

use std::time::Duration;

use oxccl::{half, Communicator, DataType, Error, ReduceOp, TransportKind};
use oxccl_tests::report;
use oxccl_tests::{mix, TestElem};

pub(crate) const SIZES: &[usize] = &[0, 1, 7, 13, 1000, 70_001];

/// Every collective, every dtype and op, sizes 0 to multi-chunk, in place and out of place.
pub(crate) fn conformance(c: &Communicator, seed: u64) -> usize {
    let mut n = 0;
    macro_rules! each_type {
        ($($t:ty),*) => {$( n += typed::<$t>(c, seed); )*};
    }
    each_type!(f32, f64, half::f16, half::bf16, i8, u8, i32, u32, i64, u64);
    c.barrier().unwrap();
    // Every link uses the transport the host layout calls for.
    let me = &c.peers()[c.rank()].host_id;
    let links = c.links();
    assert_eq!(links.len(), c.world_size() - 1, "this suite talks to every peer: {links:?}");
    // Across hosts: the first transport OXCCL_NET names (every test names one).
    let net = match std::env::var("OXCCL_NET").unwrap_or_default().split(',').next().unwrap_or("") {
        "libfabric" => TransportKind::NetLibfabric,
        _ => TransportKind::NetTcp,
    };
    for (peer, kind) in links {
        let want = if &c.peers()[peer].host_id == me { TransportKind::HostStaging } else { net };
        assert_eq!(kind, want, "link to rank {peer}");
    }
    n + 2
}

pub(crate) fn ops_for(d: DataType) -> Vec<ReduceOp> {
    ReduceOp::ALL.into_iter().filter(|o| o.check(d).is_ok()).collect()
}

pub(crate) fn typed<T: TestElem>(c: &Communicator, seed: u64) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let mut checks = 0;
    let gen = |op, rank, i| T::gen(op, seed, rank, i);
    for (si, &count) in SIZES.iter().enumerate() {
        // Large sizes only for f32 and u8 (the byte paths are the same for every type).
        if count > 1000 && !matches!(T::DTYPE, DataType::F32 | DataType::U8) {
            continue;
        }
        for op in ops_for(T::DTYPE) {
            let s: Vec<T> = (0..count).map(|i| gen(op, r, i)).collect();
            let xs = |i: usize| (0..w).map(|k| gen(op, k, i)).collect::<Vec<T>>();
            // all_reduce out of place and in place
            let mut out = vec![T::default(); count];
            c.all_reduce(&s, &mut out, op).unwrap();
            let mut inp = s.clone();
            c.all_reduce_in_place(&mut inp, op).unwrap();
            for i in 0..count {
                assert!(T::check(op, &xs(i), out[i]), "all_reduce {} {op} n={count} i={i}: {:?}", T::DTYPE, out[i]);
                assert!(out[i] == inp[i], "all_reduce in place differs at {i}");
            }
            // reduce to a root that moves with the size
            let root = (si + 1) % w;
            let mut out = vec![T::default(); if r == root { count } else { 0 }];
            c.reduce(&s, &mut out, op, root).unwrap();
            let mut inp = s.clone();
            c.reduce_in_place(&mut inp, op, root).unwrap();
            if r == root {
                for i in 0..count {
                    assert!(T::check(op, &xs(i), out[i]), "reduce {} {op} n={count} i={i}", T::DTYPE);
                    assert!(out[i] == inp[i], "reduce in place differs at {i}");
                }
            }
            // reduce_scatter: block k of everyone's input reduced into rank k
            let big: Vec<T> = (0..count * w).map(|i| gen(op, r, i)).collect();
            let mut out = vec![T::default(); count];
            c.reduce_scatter(&big, &mut out, op).unwrap();
            let mut inp = big.clone();
            c.reduce_scatter_in_place(&mut inp, op).unwrap();
            for i in 0..count {
                let xs: Vec<T> = (0..w).map(|k| gen(op, k, r * count + i)).collect();
                assert!(T::check(op, &xs, out[i]), "reduce_scatter {} {op} n={count} i={i}", T::DTYPE);
                assert!(out[i] == inp[r * count + i], "reduce_scatter in place differs at {i}");
            }
            checks += 5;
        }
        let sum = ReduceOp::Sum;
        // broadcast from every root
        for root in 0..w {
            let s: Vec<T> = (0..count).map(|i| gen(sum, r, i)).collect();
            let mut out = vec![T::default(); count];
            c.broadcast(if r == root { &s[..] } else { &[] }, &mut out, root).unwrap();
            let mut inp = s.clone();
            c.broadcast_in_place(&mut inp, root).unwrap();
            for i in 0..count {
                let want = gen(sum, root, i);
                assert!(out[i] == want && inp[i] == want, "broadcast {} root={root} n={count} i={i}", T::DTYPE);
            }
            checks += 2;
        }
        // all_gather
        let s: Vec<T> = (0..count).map(|i| gen(sum, r, i)).collect();
        let mut out = vec![T::default(); count * w];
        c.all_gather(&s, &mut out).unwrap();
        let mut inp = vec![T::default(); count * w];
        inp[r * count..(r + 1) * count].copy_from_slice(&s);
        c.all_gather_in_place(&mut inp).unwrap();
        for j in 0..count * w {
            let want = gen(sum, j / count, j % count);
            assert!(out[j] == want && inp[j] == want, "all_gather {} n={count} j={j}", T::DTYPE);
        }
        // all_to_all: block k of rank r's input is gen(r, k*count + i)
        let s: Vec<T> = (0..count * w).map(|i| gen(sum, r, i)).collect();
        let mut out = vec![T::default(); count * w];
        c.all_to_all(&s, &mut out).unwrap();
        let mut inp = s.clone();
        c.all_to_all_in_place(&mut inp).unwrap();
        for j in 0..count * w {
            let (from, i) = (j / count, j % count);
            let want = gen(sum, from, r * count + i);
            assert!(out[j] == want && inp[j] == want, "all_to_all {} n={count} j={j}", T::DTYPE);
        }
        // all_to_all_v: uneven, some blocks empty
        let cnt =
            |from: usize, to: usize| (mix(&[seed, from as u64, to as u64, count as u64]) % (count as u64 + 1)) as usize;
        let sc: Vec<usize> = (0..w).map(|k| cnt(r, k)).collect();
        let rc: Vec<usize> = (0..w).map(|k| cnt(k, r)).collect();
        let s: Vec<T> = (0..sc.iter().sum::<usize>()).map(|i| gen(sum, r, i)).collect();
        let mut out = vec![T::default(); rc.iter().sum()];
        c.all_to_all_v(&s, &sc, &mut out, &rc).unwrap();
        let mut off = 0;
        for (k, &n_k) in rc.iter().enumerate() {
            let start: usize = (0..r).map(|x| cnt(k, x)).sum();
            for i in 0..n_k {
                assert!(out[off + i] == gen(sum, k, start + i), "all_to_all_v {} from {k} i={i}", T::DTYPE);
            }
            off += n_k;
        }
        // grouped send/recv around the ring, both directions at once
        let s: Vec<T> = (0..count).map(|i| gen(sum, r, i)).collect();
        let mut from_prev = vec![T::default(); count];
        let mut from_next = vec![T::default(); count];
        let mut g = c.group();
        g.send(&s, (r + 1) % w).unwrap();
        g.send(&s, (r + w - 1) % w).unwrap();
        g.recv(&mut from_prev, (r + w - 1) % w).unwrap();
        g.recv(&mut from_next, (r + 1) % w).unwrap();
        // (A rank alone sends to and receives from itself: local copies.)
        g.run().unwrap();
        for i in 0..count {
            assert!(from_prev[i] == gen(sum, (r + w - 1) % w, i), "group send/recv from prev {} i={i}", T::DTYPE);
            assert!(from_next[i] == gen(sum, (r + 1) % w, i), "group send/recv from next {} i={i}", T::DTYPE);
        }
        checks += 5;
    }
    checks
}

/// Random small and large messages between every pair, in both directions, delivered in
/// posted order with intact content (small ones travel inline, large ones through staging;
/// neither may overtake the other).
pub(crate) fn order(c: &Communicator, seed: u64) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let msgs = 200;
    let len = |from: usize, to: usize, k: usize| -> usize {
        let h = mix(&[seed, from as u64, to as u64, k as u64]);
        match h % 4 {
            0 => 0,
            1 => (h >> 8) as usize % 40,                // inline
            2 => 40 + (h >> 8) as usize % 5000,         // one piece
            _ => 300_000 + (h >> 8) as usize % 700_000, // several pieces
        }
    };
    let fill = |from: usize, to: usize, k: usize, n: usize| -> Vec<u8> {
        (0..n).map(|i| (mix(&[seed, from as u64, to as u64, k as u64]) as usize + i * 31) as u8).collect()
    };
    let mut checks = 0;
    for peer in 0..w {
        if peer == r {
            continue;
        }
        // Lower rank sends first, then receives; messages are posted one by one (the
        // receiver is never waiting on the exact message being sent, only on order).
        let sends: Vec<Vec<u8>> = (0..msgs).map(|k| fill(r, peer, k, len(r, peer, k))).collect();
        let mut recvs: Vec<Vec<u8>> = (0..msgs).map(|k| vec![0u8; len(peer, r, k)]).collect();
        let mut g = c.group();
        for s in &sends {
            g.send(s, peer).unwrap();
        }
        for b in recvs.iter_mut() {
            g.recv(b, peer).unwrap();
        }
        g.run().unwrap();
        for (k, b) in recvs.iter().enumerate() {
            assert_eq!(b, &fill(peer, r, k, len(peer, r, k)), "message {k} from rank {peer}");
            checks += 1;
        }
    }
    checks
}

/// split by parity and by a single color; collectives on the children.
pub(crate) fn split(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    report::emit(serde_json::json!({ "pid": std::process::id() }));
    let child = c.split(Some((r % 2) as u32), -(r as i64)).unwrap().expect("member");
    let members: Vec<usize> = (0..w).filter(|k| k % 2 == r % 2).collect();
    assert_eq!(child.world_size(), members.len());
    // key = -rank: highest parent rank first
    let expect_rank = members.iter().rev().position(|&k| k == r).unwrap();
    assert_eq!(child.rank(), expect_rank);
    let mut v = [r as u64];
    child.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[0], members.iter().map(|&k| k as u64).sum::<u64>());
    let none = c.split(if r == 0 { None } else { Some(7) }, 0).unwrap();
    assert_eq!(none.is_none(), r == 0);
    if let Some(cc) = none {
        let mut v = [1u32];
        cc.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v[0] as usize, w - 1);
    }
    // the parent still works after splitting
    let mut v = [1i32];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[0] as usize, w);
    4
}

/// Work handles: several in flight, in order with blocking calls.
pub(crate) fn asynch(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let a = c.all_reduce_async(vec![r as f64; 100_000], ReduceOp::Sum).unwrap();
    let b = c.broadcast_async(vec![r as u32; 1000], w - 1).unwrap();
    let mut v = [1u8];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap(); // runs after a and b
    assert_eq!(v[0] as usize, w);
    let g = c.all_gather_async(vec![r as i64; 3], vec![0; 3 * w]).unwrap();
    let peer = (r + 1) % w;
    let (s, rr) = if w > 1 {
        (
            Some(c.send_async(vec![r as u32; 5000], peer).unwrap()),
            Some(c.recv_async(vec![0u32; 5000], (r + w - 1) % w).unwrap()),
        )
    } else {
        (None, None)
    };
    let red = c.reduce_async(vec![r as i32 + 1; 777], vec![0; 777], ReduceOp::Prod, 0).unwrap();
    let rs = c.reduce_scatter_async(vec![1.5f32; 10 * w], vec![0.0; 10], ReduceOp::Sum).unwrap();
    let counts: Vec<usize> = (0..w).map(|k| k + 1).collect();
    let a2av = c
        .all_to_all_v_async(vec![r as u8; counts.iter().sum()], &counts, vec![0u8; (r + 1) * w], &vec![r + 1; w])
        .unwrap();
    let bar = c.barrier_async().unwrap();
    let a = a.wait().unwrap();
    assert!(a.iter().all(|x| *x == (0..w).map(|k| k as f64).sum::<f64>()));
    assert!(b.wait().unwrap().iter().all(|x| *x as usize == w - 1));
    let (_, gathered) = g.wait().unwrap();
    assert_eq!(gathered, (0..w).flat_map(|k| [k as i64; 3]).collect::<Vec<_>>());
    if let (Some(s), Some(rr)) = (s, rr) {
        s.wait().unwrap();
        assert!(rr.wait().unwrap().iter().all(|x| *x as usize == (r + w - 1) % w));
    }
    let (_, red) = red.wait().unwrap();
    if r == 0 {
        assert!(red.iter().all(|x| *x == (1..=w as i32).product::<i32>()), "{:?}", &red[..3]);
    }
    let (_, rs) = rs.wait().unwrap();
    assert!(rs.iter().all(|x| *x == 1.5 * w as f32));
    let (_, got) = a2av.wait().unwrap();
    assert_eq!(got, (0..w).flat_map(|k| vec![k as u8; r + 1]).collect::<Vec<_>>());
    let mut bar = bar;
    loop {
        match bar.wait_timeout(Duration::from_millis(10)) {
            Ok(res) => {
                res.unwrap();
                break;
            }
            Err(b) => bar = b,
        }
    }
    6
}

pub(crate) fn expect_arg(e: Result<(), Error>, what: &str) {
    match e {
        Err(Error::InvalidArgument(m)) => assert!(!m.is_empty(), "{what}"),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

/// Bad input: a clear error before any byte moves, and the communicator stays usable.
pub(crate) fn errors(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let s = vec![1.0f32; 10];
    let mut short = vec![0.0f32; 9];
    expect_arg(c.all_reduce(&s, &mut short, ReduceOp::Sum), "all_reduce with a short recv");
    expect_arg(c.all_reduce(&[1i32; 4], &mut [0i32; 4], ReduceOp::Avg), "avg on integers");
    expect_arg(c.broadcast_in_place(&mut [0u8; 4], w), "root out of range");
    expect_arg(c.reduce(&s, &mut [0.0f32; 10], ReduceOp::Sum, w + 3), "reduce root out of range");
    expect_arg(c.all_gather(&s, &mut vec![0.0f32; 10 * w + 1]), "all_gather recv length");
    expect_arg(c.reduce_scatter(&s, &mut [0.0f32; 7], ReduceOp::Sum), "reduce_scatter lengths");
    expect_arg(c.all_to_all(&s, &mut [0.0f32; 3]), "all_to_all lengths");
    expect_arg(c.all_to_all_v(&s, &[1], &mut [0.0f32; 3], &[1]), "all_to_all_v count lists");
    let huge = vec![usize::MAX / 2 + 1; w];
    expect_arg(c.all_to_all_v(&s, &huge, &mut [0.0f32; 3], &huge), "all_to_all_v counts that overflow");
    let mut sc = vec![0usize; w];
    sc[(r + 1) % w] = 11; // more than `s` holds
    expect_arg(c.all_to_all_v(&s, &sc, &mut [0.0f32; 30], &vec![0; w]), "all_to_all_v buffer shorter than its counts");
    expect_arg(c.send(&s, w), "send peer out of range");
    let mut g = c.group();
    expect_arg(g.recv(&mut short, w + 1).map(|_| ()), "group recv peer out of range");
    // An "infinite" per-call timeout is fine.
    c.with_timeout(Duration::MAX, |c| c.barrier()).unwrap();
    // Zero-sized operations are no-ops on every rank.
    c.all_reduce::<f32>(&[], &mut [], ReduceOp::Sum).unwrap();
    c.broadcast_in_place::<u8>(&mut [], 0).unwrap();
    c.all_gather::<i64>(&[], &mut []).unwrap();
    // Still usable after all those refusals.
    let mut v = [r as u32 + 1];
    c.all_reduce_in_place(&mut v, ReduceOp::Max).unwrap();
    assert_eq!(v[0] as usize, w);
    if w > 1 {
        assert!(c.links().iter().all(|(_, k)| *k == TransportKind::HostStaging), "{:?}", c.links());
    }
    // Use after close.
    c.close().unwrap();
    match c.all_reduce_in_place(&mut v, ReduceOp::Sum) {
        Err(Error::InvalidUsage(m)) => assert!(m.contains("closed"), "{m}"),
        other => panic!("use after close: {other:?}"),
    }
    13
}

/// Links are made on first use, the lower rank of a pair first. A program where rank 2 must
/// send to 0 while its link to 1 is still being set up must not deadlock: rank 2 posts
/// {send to 0, recv from 1}; rank 0 receives from 2, then sends to 1; rank 1 receives from 0,
/// then sends to 2.
pub(crate) fn lazy(c: &Communicator) -> usize {
    assert_eq!(c.world_size(), 3);
    let mut got = [0u64];
    match c.rank() {
        0 => {
            c.recv(&mut got, 2).unwrap();
            c.send(&[got[0] + 1], 1).unwrap();
        }
        1 => {
            c.recv(&mut got, 0).unwrap();
            c.send(&[got[0] + 1], 2).unwrap();
        }
        _ => {
            let mut g = c.group();
            g.recv(&mut got, 1).unwrap();
            g.send(&[40u64], 0).unwrap();
            g.run().unwrap();
            assert_eq!(got[0], 42);
        }
    }
    1
}

/// Two ranks call different collectives: the one that receives the other's message gets
/// InvalidUsage naming both operations, the other times out (or, over net-tcp, sees the
/// first one drop the connection: a Remote error naming it); both are poisoned afterwards
/// (Aborted, blocking and non-blocking), and nothing crashes.
pub(crate) fn mismatch(c: &Communicator) -> usize {
    assert_eq!(c.world_size(), 2);
    let r = c.rank();
    type Case = fn(&Communicator, usize) -> oxccl::Result<()>;
    // Each pair of calls differs in one thing: the collective, the count, the data type (same
    // bytes), the operator, the root.
    let cases: [(&str, Case); 5] = [
        ("collective", |c, r| {
            let mut v = [1.0f32; 10];
            if r == 0 {
                c.all_reduce_in_place(&mut v, ReduceOp::Sum)
            } else {
                c.broadcast_in_place(&mut v, 0)
            }
        }),
        ("count", |c, r| c.all_reduce_in_place(&mut vec![1.0f32; 10 + 2 * r], ReduceOp::Sum)),
        ("dtype", |c, r| {
            if r == 0 {
                c.all_reduce_in_place(&mut [1.0f32; 10], ReduceOp::Sum)
            } else {
                c.all_reduce_in_place(&mut [1i32; 10], ReduceOp::Sum)
            }
        }),
        ("op", |c, r| c.all_reduce_in_place(&mut [1.0f32; 10], if r == 0 { ReduceOp::Sum } else { ReduceOp::Max })),
        // Both think they are the root and only send: the broadcast itself may complete on
        // both; the stray message is found by the next call that receives.
        ("root", |c, r| c.broadcast_in_place(&mut [1u8; 100], r).and_then(|_| c.barrier())),
    ];
    let mut cur = None::<Communicator>;
    let mut checks = 0;
    for (what, f) in cases {
        let comm = cur.as_ref().unwrap_or(c);
        let t0 = std::time::Instant::now();
        // Both ranks get InvalidUsage: the one that finds the mismatch in the first message's
        // header, and the other (which may only wait) from the failure record.
        match f(comm, r) {
            Err(Error::InvalidUsage(m)) => {
                assert!(m.contains("expected") && m.contains("but the next message is"), "{what}: {m}");
                println!("rank {r}: {what} mismatch after {:?}: {m}", t0.elapsed());
            }
            other => panic!("rank {r}: {what} mismatch: unexpected {other:?}"),
        }
        // Sticky: nothing runs on it any more.
        assert!(matches!(comm.all_reduce_in_place(&mut [1.0f32], ReduceOp::Sum), Err(Error::Aborted(_))));
        assert!(matches!(comm.barrier_async(), Err(Error::Aborted(_))));
        // A fresh communicator of the same ranks for the next case.
        let next = comm.shrink(&[]).expect("shrink after a mismatch");
        let mut v = [r as u32 + 1];
        next.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v[0], 3);
        if let Some(old) = cur.replace(next) {
            old.close().unwrap();
        }
        checks += 4;
    }
    if let Some(c) = cur {
        c.close().unwrap();
    }
    checks
}
