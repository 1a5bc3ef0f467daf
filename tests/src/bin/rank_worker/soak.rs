//! The soak and the steady load.

use std::time::Duration;

use oxccl::{half, Communicator, ReduceOp};
use oxccl_tests::TestElem;

/// Resident memory of this process in KiB.
pub(crate) fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64 / 1024
}

pub(crate) fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// One operation of the soak: `kind` on `count` elements of `T`, checked.
pub(crate) fn soak_op<T: TestElem>(c: &Communicator, kind: u64, count: usize, seed: u64, asynch: bool) {
    let (r, w) = (c.rank(), c.world_size());
    let ops = crate::collectives::ops_for(T::DTYPE);
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
pub(crate) fn soak(c: &Communicator, seed: u64) -> usize {
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
    oxccl_tests::report::emit(
        serde_json::json!({ "rss_warm_kib": warm, "rss_end_kib": end, "threads_before": t0, "threads_after": t1 }),
    );
    assert!(t1 <= t0, "threads left behind: {t0} before the soak, {t1} after close");
    n + 8
}

/// 300 checked all_reduces of 64 KiB, 3 ms apart (about a second and a half of traffic),
/// while tests/tests/reliability.rs sends garbage to the store and to the net-tcp listeners.
pub(crate) fn steady(c: &Communicator) -> usize {
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

/// Checked all_reduces until the test creates `$OXCCL_TEST_DIR/stop` (at most two minutes):
/// a job at work while the test does things beside it. Rank 0 decides when to stop and tells
/// the others with a broadcast, so every rank runs the same number of operations.
pub(crate) fn until_stopped(c: &Communicator) -> usize {
    let dir = std::env::var("OXCCL_TEST_DIR").expect("OXCCL_TEST_DIR names the test's directory");
    let stop = std::path::Path::new(&dir).join("stop");
    let end = std::time::Instant::now() + Duration::from_secs(120);
    let (r, w) = (c.rank(), c.world_size());
    let mut checks = 0;
    for it in 0usize.. {
        let mut v: Vec<u32> = (0..1 << 12).map(|i| (i * (r + 1) + it) as u32).collect();
        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        let want = |i: usize| (0..w).map(|k| (i * (k + 1) + it) as u32).fold(0u32, u32::wrapping_add);
        assert!(v.iter().enumerate().all(|(i, x)| *x == want(i)), "iteration {it}");
        checks += 1;
        let mut flag = [u8::from(stop.exists() || std::time::Instant::now() > end)];
        c.broadcast_in_place(&mut flag, 0).unwrap();
        if flag[0] != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    checks
}
