//! One rank of a multi-process test. `rank_worker SCENARIO [SEED]`; started by the tests in
//! tests/tests/ (or by `oxccl launch -n N`). Exits 0 when every check passed; panics
//! (exit 101) with the failing check otherwise.

use std::time::Duration;

use oxccl::{half, Communicator, DataType, Error, ReduceOp, TransportKind};
use oxccl_tests::{mix, TestElem};

fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| "conformance".into());
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    // Logs to stderr as the `oxccl` command does (OXCCL_LOG, default warn): tests read them.
    let filter = std::env::var("OXCCL_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let comm = match Communicator::from_env() {
        // The communicator must not be created: the NIC budget is spent.
        Err(e) if scenario == "lease_refused" => {
            println!("refused: {e}");
            assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
            let m = e.to_string();
            assert!(m.contains("has no endpoint") && m.contains("rank 0 cannot reach rank 1"), "{m}");
            println!("lease_refused: 1 checks passed");
            return;
        }
        r => r.expect("communicator from the launcher environment"),
    };
    let checks = match scenario.as_str() {
        "conformance" => conformance(&comm, seed),
        "order" => order(&comm, seed),
        "split" => split(&comm),
        "async" => asynch(&comm),
        "errors" => errors(&comm),
        "idle" => idle(&comm),
        "lazy" => lazy(&comm),
        "mismatch" => mismatch(&comm),
        "hold" => hold(&comm),
        "store_outlives" => store_outlives(&comm),
        "budget" => budget(&comm, seed),
        "lease_hold" => lease_hold(&comm, seed),
        "priority" => priority(&comm),
        "loss" => loss(&comm, seed),
        "abort" => abort(&comm),
        "soak" => soak(&comm, seed),
        "steady" => steady(&comm),
        "lease_refused" => panic!("rank {}: the communicator was created despite the budget", comm.rank()),
        other => panic!("unknown scenario {other}"),
    };
    comm.close().expect("close");
    println!("rank {}: {scenario}: {checks} checks passed", comm.rank());
}

const SIZES: &[usize] = &[0, 1, 7, 13, 1000, 70_001];

/// Every collective, every dtype and op, sizes 0 to multi-chunk, in place and out of place.
fn conformance(c: &Communicator, seed: u64) -> usize {
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

fn ops_for(d: DataType) -> Vec<ReduceOp> {
    ReduceOp::ALL.into_iter().filter(|o| o.check(d).is_ok()).collect()
}

fn typed<T: TestElem>(c: &Communicator, seed: u64) -> usize {
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
fn order(c: &Communicator, seed: u64) -> usize {
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
fn split(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
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
fn asynch(c: &Communicator) -> usize {
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

fn expect_arg(e: Result<(), Error>, what: &str) {
    match e {
        Err(Error::InvalidArgument(m)) => assert!(!m.is_empty(), "{what}"),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

/// Bad input: a clear error before any byte moves, and the communicator stays usable.
fn errors(c: &Communicator) -> usize {
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

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A rank waiting for a late peer spins briefly, yields, then sleeps: over a 1.5 s wait it
/// uses a small fraction of a core (the bound leaves room for the spin and yield phases and
/// for a noisy machine: under a quarter of the wall time).
fn idle(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    assert!(w >= 2, "idle needs two ranks");
    c.barrier().unwrap();
    if r == 1 {
        std::thread::sleep(Duration::from_millis(1500));
        c.send(&[42u64], 0).unwrap();
    } else if r == 0 {
        let mut v = [0u64];
        let (t0, c0) = (std::time::Instant::now(), thread_cpu());
        c.recv(&mut v, 1).unwrap();
        let (wall, cpu) = (t0.elapsed(), thread_cpu() - c0);
        assert_eq!(v[0], 42);
        assert!(wall >= Duration::from_millis(1400), "the wait was only {wall:?}");
        assert!(cpu * 4 < wall, "waiting {wall:?} used {cpu:?} of CPU: an idle rank must sleep");
        println!("rank 0 waited {wall:?} using {cpu:?} of CPU");
    }
    c.barrier().unwrap();
    1
}

/// Links are made on first use, the lower rank of a pair first. A program where rank 2 must
/// send to 0 while its link to 1 is still being set up must not deadlock: rank 2 posts
/// {send to 0, recv from 1}; rank 0 receives from 2, then sends to 1; rank 1 receives from 0,
/// then sends to 2.
fn lazy(c: &Communicator) -> usize {
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
fn mismatch(c: &Communicator) -> usize {
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

/// Connects every link an all_reduce, a barrier and an all_to_all need, says "ready", then
/// waits to be killed.
fn hold(c: &Communicator) -> usize {
    let w = c.world_size();
    let mut v = vec![1u32; 1 << 16];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    let mut a = vec![0u8; w * 100];
    c.all_to_all(&vec![1u8; w * 100], &mut a).unwrap();
    c.barrier().unwrap();
    println!("ready");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    1
}

/// Rank 0 hosts the store, splits the world in two and closes everything at once; the other
/// half connects its child communicator only afterwards, through the store rank 0 hosts.
fn store_outlives(c: &Communicator) -> usize {
    let r = c.rank();
    let child = c.split(Some((r / 2) as u32), 0).unwrap().expect("member");
    // Everybody closes the parent at once (a common pattern): only the children remain.
    c.close().unwrap();
    if r < 2 {
        child.close().unwrap();
        return 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut v = [1u32];
    child.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[0], 2);
    child.close().unwrap();
    1
}

/// The situation the budget manager exists for (run by tests/tests/budget.rs over two
/// namespaces): rank 0 is trainer t0 on host A (NIC limit 2), rank 1 trainer t1 and rank 2
/// inference rank i0 on host B (limit 3); `OXCCL_RESERVE=gradient:1,pipeline_stage:1`. Over a
/// net-tcp base communicator, three children are created in the order `order` (0..6) names:
/// Gradient {t0, t1}, WeightRefit {t0, i0}, PipelineStage {t0, t1}, on net-libfabric.
fn budget(c: &Communicator, order: u64) -> usize {
    use oxccl::TrafficClass::{self, *};
    assert_eq!(c.world_size(), 3, "the budget scenario has 3 ranks");
    const ORDERS: [[TrafficClass; 3]; 6] = [
        [Gradient, WeightRefit, PipelineStage],
        [Gradient, PipelineStage, WeightRefit],
        [WeightRefit, Gradient, PipelineStage],
        [WeightRefit, PipelineStage, Gradient],
        [PipelineStage, Gradient, WeightRefit],
        [PipelineStage, WeightRefit, Gradient],
    ];
    let seq = ORDERS[order as usize % 6];
    let r = c.rank();
    let mut base = c.config();
    base.set("OXCCL_NET", "libfabric,tcp").unwrap();
    let fallback = base.budget.tcp_fallback[WeightRefit.index()];
    let pos = |k: TrafficClass| seq.iter().position(|x| *x == k).unwrap();
    let mut comms: Vec<(TrafficClass, Communicator)> = Vec::new();
    let mut refit_err = None;
    for class in seq {
        let member = match class {
            WeightRefit => r != 1,
            _ => r != 2,
        };
        let mut cfg = base.clone();
        cfg.set("OXCCL_CLASS", class.name()).unwrap();
        match c.split_with_config(member.then_some(class.index() as u32), 0, cfg) {
            Ok(Some(x)) => comms.push((class, x)),
            Ok(None) => assert!(!member),
            Err(e) if class == WeightRefit => refit_err = Some(e),
            Err(e) => panic!("rank {r}: creating the {class} communicator: {e}"),
        }
    }
    let mut checks = 0;
    // t0's refit finds no endpoint of its own on host A (limit 2, gradient and pipeline
    // reserve 1 each) and, when it comes first, no endpoint of its process to share.
    let refit_first = pos(WeightRefit) < pos(Gradient) && pos(WeightRefit) < pos(PipelineStage);
    let refit_fails = refit_first && !fallback;
    if r != 1 {
        assert_eq!(refit_err.is_some(), refit_fails, "rank {r}: refit error: {refit_err:?}");
    }
    if let Some(e) = &refit_err {
        let m = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(m.contains("has no endpoint") && m.contains("limit 2 (OXCCL_NIC_ENDPOINTS)"), "{m}");
        assert!(m.contains("weight_refit may not fall back to net-tcp"), "{m}");
        assert!(m.contains("1 more for gradient") && m.contains("1 more for pipeline_stage"), "{m}");
        assert!(m.contains("rank 0 cannot reach rank 1"), "every member gets the same error: {m}");
        checks += 1;
    }
    for (class, x) in &comms {
        let ex = x.explain();
        let json = serde_json::to_value(&ex).unwrap();
        assert_eq!(json["class"], class.name(), "{json}");
        assert_eq!(x.class(), *class);
        // Every child moves data and gets it right.
        let n = 1 << 18;
        let mut v: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + x.rank() as f32).collect();
        if *class == WeightRefit {
            x.broadcast_in_place(&mut v, 0).unwrap();
            assert!(v.iter().enumerate().all(|(i, &y)| y == (i % 97) as f32), "{class} broadcast");
        } else {
            x.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
            assert!(v.iter().enumerate().all(|(i, &y)| y == 2.0 * (i % 97) as f32 + 1.0), "{class} all_reduce");
        }
        let links = x.links();
        assert_eq!(links.len(), 1, "{links:?}");
        let ex = x.explain();
        let json = serde_json::to_value(&ex).unwrap();
        let ep = &json["endpoint"];
        let on_a = r == 0;
        match class {
            Gradient | PipelineStage => {
                // Reserved classes get a dedicated endpoint on net-libfabric, in every order,
                // and never net-tcp.
                assert_eq!(links[0].1, TransportKind::NetLibfabric, "{class}: {json}");
                assert_eq!(ep["dedicated"], true, "{json}");
                assert_eq!(ep["lease"]["class"], class.name(), "{json}");
                assert_eq!(ep["limit"], if on_a { 2 } else { 3 }, "{json}");
                assert_eq!(ep["limit_from"], "OXCCL_NIC_ENDPOINTS", "{json}");
                assert!(ep["provider_limits"]["ep_cnt"].as_u64().unwrap() > 0, "{json}");
                assert!(ep["provider_limits"]["mr_mode"].is_string(), "{json}");
                assert_eq!(json["net_note"], "", "{json}");
                let nic = &json["nics"][0];
                assert_eq!(nic["nic"], ep["nic"], "{json}");
                let holders = nic["holders"].as_array().unwrap();
                assert!(holders.iter().any(|h| h["comm"] == ep["lease"]["comm"]), "{json}");
                assert_eq!(nic["leased"].as_u64().unwrap() as usize, holders.len(), "{json}");
                assert_eq!(json["peers"][0]["transport"], "net-libfabric", "{json}");
            }
            _ if on_a && refit_first => {
                // Fell back to net-tcp, said so, with the budget's words.
                assert_eq!(links[0].1, TransportKind::NetTcp, "{json}");
                assert!(ep.is_null(), "{json}");
                let note = json["net_note"].as_str().unwrap();
                assert!(
                    note.contains("net-tcp instead of net-libfabric") && note.contains("has no endpoint"),
                    "{note}"
                );
                assert!(json["peers"][0]["reason"].as_str().unwrap().contains("has no endpoint"), "{json}");
            }
            _ if on_a => {
                // Shares an endpoint of its process: the one opened for the lowest class.
                assert_eq!(links[0].1, TransportKind::NetLibfabric, "{json}");
                assert_eq!(ep["dedicated"], false, "{json}");
                assert!(ep["lease"].is_null(), "{json}");
                let want = if pos(PipelineStage) < pos(WeightRefit) { "pipeline_stage" } else { "gradient" };
                assert_eq!(ep["opened_for"], want, "{json}");
            }
            _ => {
                // i0 on host B: its own endpoint (limit 3 leaves one for refit in any order),
                // given back at once when t0 could offer only net-tcp.
                if refit_first {
                    assert_eq!(links[0].1, TransportKind::NetTcp, "{json}");
                    assert!(ep.is_null(), "an endpoint no link uses is not kept: {json}");
                    assert!(json["peers"][0]["reason"].as_str().unwrap().contains("rank 0: net-tcp instead"), "{json}");
                } else {
                    assert_eq!(links[0].1, TransportKind::NetLibfabric, "{json}");
                    assert_eq!(ep["dedicated"], true, "{json}");
                }
            }
        }
        checks += 1;
    }
    // The process-wide view lists every child (and the base communicator).
    let all = oxccl::explain_process();
    assert_eq!(all.communicators.len(), comms.len() + 1, "{}", all.to_text());
    for (_, x) in comms {
        x.close().unwrap();
    }
    checks
}

/// Creates the communicator (done by `main`), checks it got a dedicated NIC endpoint and
/// moves data; then says so on stdout and holds it for `secs` seconds (tests kill it).
fn lease_hold(c: &Communicator, secs: u64) -> usize {
    use std::io::Write;
    let ex = c.explain();
    let ep = ex.endpoint.as_ref().expect("a NIC endpoint");
    assert!(ep.dedicated, "{ex:?}");
    let mut v = vec![1.0f32; 1 << 16];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|&x| x == c.world_size() as f32));
    println!("holding: pid {} comm '{}' endpoint on '{}'", std::process::id(), ex.name, ep.nic);
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(secs));
    2
}

/// The bandwidth-priority workload of `cargo bench -p oxccl-tests --bench priority`: two
/// ranks on two hosts, a Gradient and a WeightRefit communicator over net-libfabric; times a
/// 16 MiB all_reduce alone, then while a 1 GiB broadcast runs on the refit communicator.
fn priority(c: &Communicator) -> usize {
    use oxccl::TrafficClass::{self, *};
    use std::time::Instant;
    let mut cfg = c.config();
    cfg.set("OXCCL_NET", "libfabric,tcp").unwrap();
    let make = |class: TrafficClass| {
        let mut k = cfg.clone();
        k.set("OXCCL_CLASS", class.name()).unwrap();
        c.split_with_config(Some(class.index() as u32), 0, k).unwrap().expect("member")
    };
    let grad = make(Gradient);
    let refit = make(WeightRefit);
    let n = (16 << 20) / 4;
    let mut g = vec![1.0f32; n];
    let time_one = |g: &mut Vec<f32>| {
        g.iter_mut().for_each(|x| *x = 1.0);
        let t = Instant::now();
        grad.all_reduce_in_place(g, ReduceOp::Sum).unwrap();
        let dt = t.elapsed().as_secs_f64() * 1e3;
        assert!(g.iter().all(|&x| x == 2.0));
        dt
    };
    time_one(&mut g);
    let mut warm = vec![0u8; 1 << 20];
    refit.broadcast_in_place(&mut warm, 0).unwrap();
    for (_, k) in grad.links().into_iter().chain(refit.links()) {
        assert_eq!(k, TransportKind::NetLibfabric);
    }
    let mut alone: Vec<f64> = (0..5).map(|_| time_one(&mut g)).collect();
    c.barrier().unwrap();
    let rank = c.rank();
    let refit_run = std::thread::spawn(move || {
        let mut big = vec![0u8; 1 << 30];
        if rank == 0 {
            big.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8);
        }
        let t = Instant::now();
        refit.broadcast_in_place(&mut big, 0).unwrap();
        let dt = t.elapsed().as_secs_f64();
        assert!(big.iter().enumerate().step_by(4093).all(|(i, &x)| x == (i % 251) as u8));
        dt
    });
    // Let the broadcast fill the link (rank 0 fills its buffer first).
    std::thread::sleep(Duration::from_millis(1500));
    grad.barrier().unwrap();
    let mut busy: Vec<f64> = (0..8).map(|_| time_one(&mut g)).collect();
    let refit_s = refit_run.join().unwrap();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "priority: rank {rank} alone_ms={:.1} contended_ms={:.1} refit_s={refit_s:.2}",
        med(&mut alone),
        med(&mut busy)
    );
    1
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A rank is lost mid-collective: `OXCCL_TEST_VICTIM` (default the last rank) stops or kills
/// itself (`OXCCL_TEST_SIGNAL=KILL` or `STOP`) from a second thread a few milliseconds into
/// its 20th all_reduce, and prints when. The survivors must fail with an error naming it
/// (`Remote`) for KILL, a `Timeout` for STOP; later calls return `Aborted`. They print when
/// they noticed. With `OXCCL_TEST_SHRINK=1` they then shrink the communicator without it and
/// pass the conformance suite on the new one.
fn loss(c: &Communicator, seed: u64) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let victim: usize = std::env::var("OXCCL_TEST_VICTIM").ok().and_then(|v| v.parse().ok()).unwrap_or(w - 1);
    let signal = std::env::var("OXCCL_TEST_SIGNAL").unwrap_or_else(|_| "KILL".into());
    let count = 1 << 16;
    let mut v = vec![0f32; count];
    let mut checks = 0;
    for it in 0..1000u32 {
        if r == victim && it == 20 {
            let sig = if signal == "STOP" { libc::SIGSTOP } else { libc::SIGKILL };
            let delay = Duration::from_micros(200 + seed % 3000);
            let signal = signal.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                use std::io::Write;
                println!("signal {signal} at {}", unix_ns());
                std::io::stdout().flush().unwrap();
                // SAFETY: kill on our own pid.
                unsafe { libc::kill(libc::getpid(), sig) };
            });
        }
        v.iter_mut().enumerate().for_each(|(i, x)| *x = (r + i % 7) as f32);
        let t0 = std::time::Instant::now();
        // With STOP, a per-call deadline (3 s) below the communicator's (OXCCL_TIMEOUT).
        let res = if signal == "STOP" {
            c.with_timeout(Duration::from_secs(3), |c| c.all_reduce_in_place(&mut v, ReduceOp::Sum))
        } else {
            c.all_reduce_in_place(&mut v, ReduceOp::Sum)
        };
        match res {
            Ok(()) => {
                let want = |i: usize| (0..w).map(|k| (k + i % 7) as f32).sum::<f32>();
                assert!(v.iter().enumerate().all(|(i, x)| *x == want(i)), "iteration {it}: wrong sum");
                checks += 1;
            }
            Err(e) => {
                let at = unix_ns();
                assert_ne!(r, victim, "the victim itself failed: {e}");
                println!("noticed at {at} after {:?}: {e}", t0.elapsed());
                match (&*signal, &e) {
                    ("KILL", Error::Remote { rank, .. }) => assert_eq!(*rank, victim, "{e}"),
                    // The timeout names the operation, its sequence number, the step and
                    // the ranks waited on (here, or on the rank that timed out first).
                    ("STOP", Error::Timeout { what, .. }) => assert!(
                        what.contains("all_reduce #") && what.contains("step") && what.contains("waiting on ranks"),
                        "{what}"
                    ),
                    _ => panic!("rank {r}: unexpected error for {signal} of rank {victim}: {e:?}"),
                }
                assert!(it >= 20, "failed before the victim did anything: {e}");
                // Sticky: the communicator is unusable now.
                assert!(matches!(c.all_reduce_in_place(&mut v, ReduceOp::Sum), Err(Error::Aborted(_))));
                checks += 2;
                break;
            }
        }
    }
    assert!(checks > 20, "the victim was never lost");
    if signal == "STOP" {
        // A stopped rank never ends by itself: the lowest survivor ends it.
        if r == (0..w).find(|&k| k != victim).unwrap_or(0) {
            // SAFETY: kill on the victim's pid, published at creation.
            unsafe { libc::kill(c.peers()[victim].pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    if std::env::var("OXCCL_TEST_SHRINK").as_deref() == Ok("1") {
        let c2 = c.shrink(&[victim]).expect("shrink");
        assert_eq!(c2.world_size(), w - 1);
        assert_eq!(c2.rank(), if r > victim { r - 1 } else { r });
        checks += conformance(&c2, seed);
        c2.close().unwrap();
    }
    checks
}

/// `abort()` from another thread ends an operation in flight with `Aborted` (rank 0 aborts
/// a receive from rank 1, which never sends), and every later call returns it too; rank 1,
/// waiting for rank 0 in the same way, learns of the abort and fails naming rank 0.
fn abort(c: &Communicator) -> usize {
    assert_eq!(c.world_size(), 2);
    let mut v = vec![1u32; 1 << 10];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    c.set_timeout(Duration::from_secs(60));
    let t0 = std::time::Instant::now();
    if c.rank() == 1 {
        let e = c.recv(&mut v, 0).unwrap_err();
        assert!(matches!(&e, Error::Remote { rank: 0, what } if what.contains("aborted")), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(30), "noticed only after {:?}", t0.elapsed());
        return 2;
    }
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            c.abort();
        });
        c.recv(&mut v, 1).unwrap_err()
    });
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(30), "abort took {:?}", t0.elapsed());
    assert!(matches!(c.barrier(), Err(Error::Aborted(_))));
    3
}

/// Resident memory of this process in KiB.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64 / 1024
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// One operation of the soak: `kind` on `count` elements of `T`, checked.
fn soak_op<T: TestElem>(c: &Communicator, kind: u64, count: usize, seed: u64, asynch: bool) {
    let (r, w) = (c.rank(), c.world_size());
    let ops = ops_for(T::DTYPE);
    let op = ops[(seed % ops.len() as u64) as usize];
    let gen = |rank, i| T::gen(op, seed, rank, i);
    let xs = |i: usize| (0..w).map(|k| gen(k, i)).collect::<Vec<T>>();
    let root = (seed / 7 % w as u64) as usize;
    match kind {
        0 => {
            let mut v: Vec<T> = (0..count).map(|i| gen(r, i)).collect();
            if asynch {
                v = c.all_reduce_async(v, op).unwrap().wait().unwrap();
            } else {
                c.all_reduce_in_place(&mut v, op).unwrap();
            }
            assert!((0..count).all(|i| T::check(op, &xs(i), v[i])), "all_reduce {} {op} n={count}", T::DTYPE);
        }
        1 => {
            let mut v: Vec<T> = (0..count).map(|i| gen(r, i)).collect();
            c.broadcast_in_place(&mut v, root).unwrap();
            assert!((0..count).all(|i| v[i] == gen(root, i)), "broadcast {} n={count}", T::DTYPE);
        }
        2 => {
            let s: Vec<T> = (0..count).map(|i| gen(r, i)).collect();
            let mut out = vec![T::default(); if r == root { count } else { 0 }];
            c.reduce(&s, &mut out, op, root).unwrap();
            assert!(out.iter().enumerate().all(|(i, x)| T::check(op, &xs(i), *x)), "reduce {} n={count}", T::DTYPE);
        }
        3 => {
            let s: Vec<T> = (0..count).map(|i| gen(r, i)).collect();
            let mut out = vec![T::default(); count * w];
            c.all_gather(&s, &mut out).unwrap();
            assert!((0..count * w).all(|j| out[j] == gen(j / count.max(1), j % count.max(1))), "all_gather");
        }
        4 => {
            let s: Vec<T> = (0..count * w).map(|i| gen(r, i)).collect();
            let mut out = vec![T::default(); count];
            c.reduce_scatter(&s, &mut out, op).unwrap();
            assert!(
                (0..count).all(|i| T::check(op, &xs(r * count + i), out[i])),
                "reduce_scatter {} n={count}",
                T::DTYPE
            );
        }
        5 => {
            let s: Vec<T> = (0..count * w).map(|i| gen(r, i)).collect();
            let mut out = vec![T::default(); count * w];
            c.all_to_all(&s, &mut out).unwrap();
            assert!(
                (0..count * w).all(|j| out[j] == gen(j / count.max(1), r * count + j % count.max(1))),
                "all_to_all"
            );
        }
        6 => {
            // A ring of sends and receives, grouped.
            let s: Vec<T> = (0..count).map(|i| gen(r, i)).collect();
            let mut out = vec![T::default(); count];
            let mut g = c.group();
            g.send(&s, (r + 1) % w).unwrap();
            g.recv(&mut out, (r + w - 1) % w).unwrap();
            g.run().unwrap();
            assert!((0..count).all(|i| out[i] == gen((r + w - 1) % w, i)), "send/recv");
        }
        _ => c.barrier().unwrap(),
    }
}

/// Random operations (`OXCCL_SOAK_OPS`, default 400): every collective and grouped
/// send/recv, every data type, sizes 0 to 16 MiB (log-uniform), some through `Work`
/// handles; every result checked. Prints resident memory after a warm-up (each kind once at
/// 16 MiB) and at the end, and checks that no thread was left behind.
fn soak(c: &Communicator, seed: u64) -> usize {
    use rand::{Rng, SeedableRng};
    let n: usize = std::env::var("OXCCL_SOAK_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let w = c.world_size();
    const MAX: usize = 16 << 20;
    // The same sequence on every rank.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let run = |kind: u64, dt: usize, bytes: usize, s: u64, asynch: bool| {
        macro_rules! go {
            ($t:ty) => {{
                let es = std::mem::size_of::<$t>();
                // Buffers of count x world elements stay within MAX.
                let count = if (3..=5).contains(&kind) { bytes / es / w } else { bytes / es };
                soak_op::<$t>(c, kind, count, s, asynch)
            }};
        }
        match dt {
            0 => go!(f32),
            1 => go!(f64),
            2 => go!(half::f16),
            3 => go!(half::bf16),
            4 => go!(i8),
            5 => go!(u8),
            6 => go!(i32),
            7 => go!(u32),
            8 => go!(i64),
            _ => go!(u64),
        }
    };
    let t0 = threads();
    // Warm-up: every kind at the largest size with every rank as the root once, and through a
    // Work handle (which starts the progress thread).
    for kind in 0..8 {
        for root in 0..w as u64 {
            run(kind, 0, MAX, root * 7, kind == 0 && root == 0);
        }
    }
    let warm = rss_kib();
    let start = std::time::Instant::now();
    for k in 0..n {
        let kind = rng.gen_range(0..8u64);
        let dt = rng.gen_range(0..10usize);
        let exp = rng.gen_range(0..=24u32);
        let bytes = rng.gen_range(0..=1usize << exp).min(MAX);
        let asynch = rng.gen_bool(0.1);
        run(kind, dt, bytes, rng.gen(), asynch);
        if c.rank() == 0 && (k + 1) % 10_000 == 0 {
            println!("soak: {} ops in {:?}, rss {} KiB", k + 1, start.elapsed(), rss_kib());
        }
    }
    c.barrier().unwrap();
    let end = rss_kib();
    // Closing ends the progress thread: the process is back to the threads it had.
    c.close().unwrap();
    let t1 = threads();
    println!("soak rank {}: {n} ops in {:?}; rss after warm-up {warm} KiB, at the end {end} KiB; threads {t0} before, {t1} after close", c.rank(), start.elapsed());
    assert!(t1 <= t0, "threads left behind: {t0} before the soak, {t1} after close");
    n + 8
}

/// 300 checked all_reduces of 64 KiB, 3 ms apart (about a second and a half of traffic),
/// while tests/tests/reliability.rs sends garbage to the store and to the net-tcp listeners.
fn steady(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    for it in 0..300usize {
        let mut v: Vec<u32> = (0..1 << 14).map(|i| (i * (r + 1) + it) as u32).collect();
        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        let want = |i: usize| (0..w).map(|k| (i * (k + 1) + it) as u32).fold(0u32, u32::wrapping_add);
        assert!(v.iter().enumerate().all(|(i, x)| *x == want(i)), "iteration {it}");
        std::thread::sleep(Duration::from_millis(3));
    }
    300
}
