//! Every schedule simulated in memory: world sizes 1..=17, every op and dtype, sizes 0, 1,
//! odd, not divisible by the world size, and many segments (tiny segment lengths).
//!
//! Tolerance for floating-point results (stated once, used everywhere): a reduction over `n`
//! ranks performs at most `n-1` roundings in some order, so with `u` the unit roundoff of the
//! type (2^-24 f32, 2^-53 f64, 2^-11 f16, 2^-8 bf16) the classic bound for recursive summation
//! gives `|got - exact| <= g * sum(|x_i|)` with `g = (n-1)u / (1-(n-1)u)`; the same bound on
//! `log|x|` holds for products of positive values, and avg adds one rounding of the division.
//! Integers (wrapping) and min/max must match exactly.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::algo::{self, Shape};
use crate::dtype::{DataType, ReduceOp};
use crate::exec::{Bufs, Exec};
use crate::link::Tag;
use crate::schedule::{BufId, Schedule};
use crate::sim::SimWorld;

/// One rank's buffers as u64 words (8-byte alignment for every type).
struct RankBufs {
    send: Vec<u64>,
    recv: Vec<u64>,
    scratch: Vec<u64>,
}

fn words(bytes: usize) -> usize {
    bytes.div_ceil(8).max(1)
}

fn bytes_of(v: &[u64]) -> &[u8] {
    // SAFETY: u64 storage viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) }
}
fn bytes_of_mut(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 storage viewed as bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 8) }
}

/// Runs one schedule per rank to completion in a simulated world; polls ranks in a seeded
/// random order; fails (instead of hanging) when a full round moves nothing.
fn simulate(
    scheds: &[Schedule],
    bufs: &mut [RankBufs],
    dtype: DataType,
    op: ReduceOp,
    capacity: usize,
    seed: u64,
    in_place: bool,
) {
    let n = scheds.len();
    let world = SimWorld::new(n, capacity);
    let mut links: Vec<_> = (0..n).map(|r| world.links(r)).collect();
    let mut execs: Vec<_> = scheds
        .iter()
        .zip(bufs.iter_mut())
        .map(|(s, b)| {
            b.scratch = vec![0; words(s.scratch_bytes)];
            let recv = b.recv.as_mut_ptr() as *mut u8;
            let send = if in_place { recv as *const u8 } else { b.send.as_ptr() as *const u8 };
            // SAFETY: the test checked bounds (check_bounds below) and keeps buffers alive.
            unsafe { Exec::new(s, Bufs::host(send, recv, b.scratch.as_mut_ptr() as *mut u8), Tag(7), dtype, op, n) }
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut done = vec![false; n];
    let mut order: Vec<usize> = (0..n).collect();
    let mut idle_rounds = 0;
    while done.iter().any(|d| !d) {
        for i in (1..n).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let mut work = 0;
        for &r in &order {
            if done[r] {
                continue;
            }
            let st = execs[r].poll(&mut links[r]).unwrap_or_else(|e| panic!("rank {r}: {e}"));
            work += st.work;
            done[r] = st.done;
        }
        idle_rounds = if work == 0 { idle_rounds + 1 } else { 0 };
        assert!(idle_rounds < 3, "deadlock: ranks not done {:?}", (0..n).filter(|&r| !done[r]).collect::<Vec<_>>());
    }
    assert_eq!(world.in_flight(), 0, "unmatched messages left");
}

/// Test values as f64 (exactly representable in the type) or i128.
fn gen_value(dtype: DataType, op: ReduceOp, rng: &mut SmallRng) -> f64 {
    match (dtype.is_float(), op) {
        (true, ReduceOp::Prod) => rng.gen_range(0.8..1.25),
        (true, _) => rng.gen_range(-4.0..4.0),
        (false, ReduceOp::Prod) => rng.gen_range(-3i64..=3) as f64,
        (false, _) => match dtype {
            DataType::I8 => rng.gen_range(-128i64..=127) as f64,
            DataType::U8 => rng.gen_range(0i64..=255) as f64,
            DataType::I32 => rng.gen_range(i32::MIN as i64..=i32::MAX as i64) as f64,
            DataType::U32 => rng.gen_range(0..=u32::MAX as i64) as f64,
            _ => rng.gen_range(-(1i64 << 52)..(1i64 << 52)) as f64,
        },
    }
}

fn put(dtype: DataType, buf: &mut [u8], i: usize, v: f64) {
    let es = dtype.size();
    let b = &mut buf[i * es..(i + 1) * es];
    match dtype {
        DataType::F32 => b.copy_from_slice(&(v as f32).to_ne_bytes()),
        DataType::F64 => b.copy_from_slice(&v.to_ne_bytes()),
        DataType::F16 => b.copy_from_slice(&half::f16::from_f64(v).to_ne_bytes()),
        DataType::Bf16 => b.copy_from_slice(&half::bf16::from_f64(v).to_ne_bytes()),
        DataType::I8 => b.copy_from_slice(&(v as i64 as i8).to_ne_bytes()),
        DataType::U8 => b.copy_from_slice(&(v as i64 as u8).to_ne_bytes()),
        DataType::I32 => b.copy_from_slice(&(v as i64 as i32).to_ne_bytes()),
        DataType::U32 => b.copy_from_slice(&(v as i64 as u32).to_ne_bytes()),
        DataType::I64 => b.copy_from_slice(&(v as i64).to_ne_bytes()),
        DataType::U64 => b.copy_from_slice(&(v as i64 as u64).to_ne_bytes()),
    }
}

#[derive(Clone, Copy, Debug)]
enum V {
    F(f64),
    I(i128),
}

fn get(dtype: DataType, buf: &[u8], i: usize) -> V {
    let es = dtype.size();
    let b = &buf[i * es..(i + 1) * es];
    match dtype {
        DataType::F32 => V::F(f32::from_ne_bytes(b.try_into().unwrap()) as f64),
        DataType::F64 => V::F(f64::from_ne_bytes(b.try_into().unwrap())),
        DataType::F16 => V::F(half::f16::from_ne_bytes(b.try_into().unwrap()).to_f64()),
        DataType::Bf16 => V::F(half::bf16::from_ne_bytes(b.try_into().unwrap()).to_f64()),
        DataType::I8 => V::I(i8::from_ne_bytes(b.try_into().unwrap()) as i128),
        DataType::U8 => V::I(u8::from_ne_bytes(b.try_into().unwrap()) as i128),
        DataType::I32 => V::I(i32::from_ne_bytes(b.try_into().unwrap()) as i128),
        DataType::U32 => V::I(u32::from_ne_bytes(b.try_into().unwrap()) as i128),
        DataType::I64 => V::I(i64::from_ne_bytes(b.try_into().unwrap()) as i128),
        DataType::U64 => V::I(u64::from_ne_bytes(b.try_into().unwrap()) as i128),
    }
}

fn unit_roundoff(d: DataType) -> f64 {
    d.unit_roundoff().expect("a floating-point type")
}

/// `n u / (1 - n u)`: the relative error bound of `n` multiplications.
fn gamma_n(n: usize, u: f64) -> f64 {
    let k = n as f64 * u;
    k / (1.0 - k)
}

fn wrap(dtype: DataType, v: i128) -> i128 {
    match dtype {
        DataType::I8 => v as i8 as i128,
        DataType::U8 => v as u8 as i128,
        DataType::I32 => v as i32 as i128,
        DataType::U32 => v as u32 as i128,
        DataType::I64 => v as i64 as i128,
        _ => v as u64 as i128,
    }
}

/// Checks `got` against the reduction of `inputs` (one value per rank).
fn check_reduced(dtype: DataType, op: ReduceOp, inputs: &[V], got: V, ctx: &dyn Fn() -> String) {
    let n = inputs.len();
    match got {
        V::I(g) => {
            let xs: Vec<i128> = inputs.iter().map(|v| if let V::I(x) = v { *x } else { unreachable!() }).collect();
            let want = match op {
                ReduceOp::Sum => wrap(dtype, xs.iter().fold(0i128, |a, b| a.wrapping_add(*b))),
                ReduceOp::Prod => wrap(dtype, xs.iter().fold(1i128, |a, b| wrap(dtype, a.wrapping_mul(*b)))),
                ReduceOp::Min => *xs.iter().min().unwrap(),
                ReduceOp::Max => *xs.iter().max().unwrap(),
                ReduceOp::Avg => unreachable!("avg on integers is rejected"),
            };
            assert_eq!(g, want, "{}", ctx());
        }
        V::F(g) => {
            let xs: Vec<f64> = inputs.iter().map(|v| if let V::F(x) = v { *x } else { unreachable!() }).collect();
            let u = unit_roundoff(dtype);
            let k = (n.saturating_sub(1)) as f64 * u;
            let gamma = k / (1.0 - k);
            let (want, tol) = match op {
                ReduceOp::Sum => (xs.iter().sum::<f64>(), gamma * xs.iter().map(|x| x.abs()).sum::<f64>()),
                ReduceOp::Avg => {
                    let s: f64 = xs.iter().sum();
                    let w = s / n as f64;
                    (w, gamma * xs.iter().map(|x| x.abs()).sum::<f64>() / n as f64 + u * w.abs())
                }
                ReduceOp::Prod => {
                    let p: f64 = xs.iter().product();
                    (p, p.abs() * gamma_n(n, u))
                }
                ReduceOp::Min => (xs.iter().cloned().fold(f64::INFINITY, f64::min), 0.0),
                ReduceOp::Max => (xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max), 0.0),
            };
            // The f64 reference is itself computed in f64, with the same bound again.
            let tol = if dtype == DataType::F64 { 2.0 * tol } else { tol };
            assert!((g - want).abs() <= tol * 1.000001, "got {g}, want {want} ± {tol}: {}", ctx());
        }
    }
}

const SIZES: [usize; 6] = [0, 1, 2, 7, 13, 50];

fn fill(dtype: DataType, op: ReduceOp, bytes: &mut [u8], count: usize, rng: &mut SmallRng) {
    for i in 0..count {
        put(dtype, bytes, i, gen_value(dtype, op, rng));
    }
}

/// A host layout for `n` ranks: up to 4 hosts, ranks assigned out of rank order (so leaders
/// and host groups are not contiguous), every host non-empty.
fn layout(n: usize, seed: u64) -> Vec<Vec<usize>> {
    let hosts = 1 + (seed as usize % n.min(4));
    let mut g: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    for r in 0..n {
        let h = if r < hosts { r } else { (r * 7 + seed as usize) % hosts };
        g[h].push(r);
    }
    for v in &mut g {
        v.sort_unstable();
    }
    g
}

fn shapes(n: usize, es: usize) -> impl Iterator<Item = (usize, Shape)> {
    // (rank-independent) segment lengths: one big segment, and tiny ones for many segments.
    [1usize << 20, 1, 3].into_iter().map(move |seg| (seg, Shape { rank: 0, n, es, seg }))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Coll {
    AllReduceHier,
    AllReduceRing,
    AllReduceRd,
    ReduceScatter,
    Reduce,
}

#[allow(clippy::too_many_arguments)]
fn run_reducing(
    coll: Coll,
    n: usize,
    dtype: DataType,
    op: ReduceOp,
    count: usize,
    seg: usize,
    in_place: bool,
    seed: u64,
) {
    let es = dtype.size();
    let mut rng = SmallRng::seed_from_u64(seed);
    let root = (seed as usize) % n;
    let (send_count, recv_count) = match coll {
        Coll::ReduceScatter => (count * n, count),
        _ => (count, count),
    };
    let in_place = in_place && coll != Coll::ReduceScatter;
    let mut bufs: Vec<RankBufs> = (0..n)
        .map(|_| {
            let mut b = RankBufs {
                send: vec![0; words(send_count * es)],
                recv: vec![0; words(recv_count * es)],
                scratch: vec![],
            };
            fill(dtype, op, bytes_of_mut(&mut b.send), send_count, &mut rng);
            if in_place {
                b.recv = b.send.clone();
            }
            b
        })
        .collect();
    let inputs: Vec<Vec<u8>> = bufs.iter().map(|b| bytes_of(&b.send).to_vec()).collect();
    let avg = op == ReduceOp::Avg;
    let scheds: Vec<Schedule> = (0..n)
        .map(|rank| {
            let sh = Shape { rank, n, es, seg };
            let s = match coll {
                Coll::AllReduceRing => algo::all_reduce_ring(sh, count, avg),
                Coll::AllReduceRd => algo::all_reduce_rd(sh, count, avg, in_place),
                Coll::ReduceScatter => algo::reduce_scatter_ring(sh, count, avg),
                Coll::AllReduceHier => algo::all_reduce_hier(rank, &layout(n, seed), es, seg, count, avg),
                Coll::Reduce => algo::reduce_chain(sh, count, root, avg),
            };
            s.check_bounds(send_count * es, recv_count * es).unwrap();
            s
        })
        .collect();
    simulate(&scheds, &mut bufs, dtype, op, 1 + (seed as usize % 3), seed, in_place);
    for (rank, b) in bufs.iter().enumerate() {
        if coll == Coll::Reduce && rank != root {
            continue;
        }
        let out = bytes_of(&b.recv);
        for i in 0..recv_count {
            let src_i = if coll == Coll::ReduceScatter { rank * count + i } else { i };
            let xs: Vec<V> = inputs.iter().map(|inp| get(dtype, inp, src_i)).collect();
            check_reduced(dtype, op, &xs, get(dtype, out, i), &|| {
                format!("{coll:?} n={n} {dtype} {op} count={count} seg={seg} in_place={in_place} rank={rank} i={i}")
            });
        }
    }
}

#[test]
fn reducing_collectives_every_world_op_dtype_size() {
    let mut seed = 1u64;
    for n in 1..=17 {
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                if op.check(dtype).is_err() {
                    continue;
                }
                for coll in
                    [Coll::AllReduceRing, Coll::AllReduceRd, Coll::ReduceScatter, Coll::Reduce, Coll::AllReduceHier]
                {
                    for (i, (seg, _)) in shapes(n, dtype.size()).enumerate() {
                        for &count in &SIZES {
                            // Keep the matrix affordable: tiny segments with the sizes that matter.
                            if i > 0 && count < 7 {
                                continue;
                            }
                            seed += 1;
                            run_reducing(coll, n, dtype, op, count, seg, seed % 2 == 0, seed);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sizes_not_divisible_and_many_segments() {
    for n in [2, 3, 5, 8, 13, 17] {
        for count in [n * 3 + 1, n * 7 - 1, 257] {
            for seg in [1, 2, 5, 64] {
                run_reducing(
                    Coll::AllReduceRing,
                    n,
                    DataType::F32,
                    ReduceOp::Sum,
                    count,
                    seg,
                    false,
                    (n * count + seg) as u64,
                );
                run_reducing(
                    Coll::AllReduceRing,
                    n,
                    DataType::I32,
                    ReduceOp::Sum,
                    count,
                    seg,
                    true,
                    (n + count + seg) as u64,
                );
                run_reducing(Coll::ReduceScatter, n, DataType::I64, ReduceOp::Max, count, seg, false, 3);
                run_reducing(Coll::Reduce, n, DataType::U8, ReduceOp::Sum, count, seg, false, 11);
            }
        }
    }
}

/// Broadcast, all_gather, all_to_all(v), barrier: data movement only, so every byte is checked
/// exactly.
#[test]
fn movement_collectives_every_world_and_size() {
    for n in 1..=17usize {
        for (seg, _) in shapes(n, 4) {
            for &count in &SIZES {
                for in_place in [false, true] {
                    let seed = (n * 1000 + count * 10 + seg) as u64;
                    movement(n, count, seg, in_place, seed);
                }
            }
        }
        barrier(n);
    }
}

fn pattern(rank: usize, i: usize) -> u32 {
    (rank as u32).wrapping_mul(0x9e37_79b9) ^ (i as u32).wrapping_mul(0x85eb_ca6b) ^ 0x5bd1
}

fn movement(n: usize, count: usize, seg: usize, in_place: bool, seed: u64) {
    let es = 4;
    let dtype = DataType::U32;
    let op = ReduceOp::Sum;
    let root = seed as usize % n;
    // broadcast (chain and tree)
    for variant in 0..3 {
        let mut bufs: Vec<RankBufs> = (0..n)
            .map(|r| {
                let mut b =
                    RankBufs { send: vec![0; words(count * es)], recv: vec![0; words(count * es)], scratch: vec![] };
                for i in 0..count {
                    put(dtype, bytes_of_mut(&mut b.send), i, pattern(r, i) as f64);
                }
                if in_place {
                    b.recv = b.send.clone();
                }
                b
            })
            .collect();
        let scheds: Vec<Schedule> = (0..n)
            .map(|rank| {
                let sh = Shape { rank, n, es, seg };
                match variant {
                    0 => algo::broadcast_chain(sh, count, root),
                    1 => algo::broadcast_tree(sh, count, root),
                    _ => algo::broadcast_hier(rank, &layout(n, seed), es, seg, count, root),
                }
            })
            .collect();
        simulate(&scheds, &mut bufs, dtype, op, 2, seed, in_place);
        for (r, b) in bufs.iter().enumerate() {
            for i in 0..count {
                let V::I(g) = get(dtype, bytes_of(&b.recv), i) else { unreachable!() };
                assert_eq!(
                    g as u32,
                    pattern(root, i),
                    "broadcast variant={variant} n={n} count={count} seg={seg} rank={r} i={i}"
                );
            }
        }
    }
    // all_gather, ring and hierarchical (out of place; in place = send region is the own
    // block of recv)
    for hier in [false, true] {
        let mut bufs: Vec<RankBufs> = (0..n)
            .map(|r| {
                let mut b = RankBufs {
                    send: vec![0; words(count * es)],
                    recv: vec![0; words(n * count * es)],
                    scratch: vec![],
                };
                for i in 0..count {
                    put(dtype, bytes_of_mut(&mut b.send), i, pattern(r, i) as f64);
                }
                b
            })
            .collect();
        let scheds: Vec<Schedule> = (0..n)
            .map(|rank| {
                if hier {
                    algo::all_gather_hier(rank, &layout(n, seed), es, seg, count)
                } else {
                    algo::all_gather_ring(Shape { rank, n, es, seg }, count)
                }
            })
            .collect();
        simulate(&scheds, &mut bufs, dtype, op, 1, seed, false);
        for (r, b) in bufs.iter().enumerate() {
            for k in 0..n {
                for i in 0..count {
                    let V::I(g) = get(dtype, bytes_of(&b.recv), k * count + i) else { unreachable!() };
                    assert_eq!(
                        g as u32,
                        pattern(k, i),
                        "all_gather hier={hier} n={n} count={count} seg={seg} rank={r} block={k}"
                    );
                }
            }
        }
    }
    // all_to_all and all_to_all_v (uneven counts, some zero)
    for uneven in [false, true] {
        let cnt = |from: usize, to: usize| {
            if uneven {
                (from * 3 + to * 5 + count) % 4
            } else {
                count
            }
        };
        let mut bufs: Vec<RankBufs> = (0..n)
            .map(|r| {
                let total_s: usize = (0..n).map(|k| cnt(r, k)).sum();
                let total_r: usize = (0..n).map(|k| cnt(k, r)).sum();
                let mut b = RankBufs {
                    send: vec![0; words(total_s * es)],
                    recv: vec![0; words(total_r * es)],
                    scratch: vec![],
                };
                let mut off = 0;
                for k in 0..n {
                    for i in 0..cnt(r, k) {
                        put(dtype, bytes_of_mut(&mut b.send), off + i, pattern(r * 31 + k, i) as f64);
                    }
                    off += cnt(r, k);
                }
                b
            })
            .collect();
        let scheds: Vec<Schedule> = (0..n)
            .map(|rank| {
                let sc: Vec<usize> = (0..n).map(|k| cnt(rank, k)).collect();
                let rc: Vec<usize> = (0..n).map(|k| cnt(k, rank)).collect();
                algo::all_to_all_pairwise(Shape { rank, n, es, seg }, &sc, &rc, uneven, BufId::Send)
            })
            .collect();
        simulate(&scheds, &mut bufs, dtype, op, 1, seed, false);
        for (r, b) in bufs.iter().enumerate() {
            let mut off = 0;
            for k in 0..n {
                for i in 0..cnt(k, r) {
                    let V::I(g) = get(dtype, bytes_of(&b.recv), off + i) else { unreachable!() };
                    assert_eq!(
                        g as u32,
                        pattern(k * 31 + r, i),
                        "all_to_all uneven={uneven} n={n} rank={r} from={k} i={i}"
                    );
                }
                off += cnt(k, r);
            }
        }
    }
}

fn barrier(n: usize) {
    let scheds: Vec<Schedule> = (0..n).map(|rank| algo::barrier(Shape { rank, n, es: 1, seg: 1 })).collect();
    let mut bufs: Vec<RankBufs> = (0..n).map(|_| RankBufs { send: vec![0], recv: vec![0], scratch: vec![] }).collect();
    simulate(&scheds, &mut bufs, DataType::U8, ReduceOp::Sum, 1, n as u64, false);
    // Each rank's barrier posts ceil(log2 n) sends.
    let rounds = if n == 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() };
    assert!(scheds.iter().all(|s| s.steps() == rounds as usize));
}

/// A barrier must not let a rank finish before every rank has entered: simulate it with one
/// rank never polled and check that nobody else finishes.
#[test]
fn barrier_waits_for_everyone() {
    for n in 2..=9 {
        let scheds: Vec<Schedule> = (0..n).map(|rank| algo::barrier(Shape { rank, n, es: 1, seg: 1 })).collect();
        let world = SimWorld::new(n, 4);
        let mut links: Vec<_> = (0..n).map(|r| world.links(r)).collect();
        let mut one = [0u8; 8];
        let p = one.as_mut_ptr();
        let mut execs: Vec<_> = scheds
            .iter()
            .map(|s| {
                // SAFETY: barrier regions are empty.
                unsafe { Exec::new(s, Bufs::host(p, p, p), Tag(1), DataType::U8, ReduceOp::Sum, n) }
            })
            .collect();
        for _ in 0..50 {
            for r in 1..n {
                assert!(
                    !execs[r].poll(&mut links[r]).unwrap().done,
                    "rank {r} left the barrier before rank 0 entered (n={n})"
                );
            }
        }
    }
}

/// Tags and lengths are checked: a receive that meets another operation's message fails with
/// InvalidUsage instead of corrupting memory.
#[test]
fn mismatch_is_an_error() {
    let sh = |rank| Shape { rank, n: 2, es: 4, seg: 1 << 20 };
    let s0 = algo::all_reduce_ring(sh(0), 8, false);
    let s1 = algo::broadcast_chain(sh(1), 8, 0);
    let world = SimWorld::new(2, 4);
    let mut l0 = world.links(0);
    let mut l1 = world.links(1);
    let mut b0 = [0u64; 8];
    let mut b1 = [0u64; 8];
    let p0 = b0.as_mut_ptr() as *mut u8;
    let p1 = b1.as_mut_ptr() as *mut u8;
    // SAFETY: 64-byte buffers cover 8 f32 elements.
    let mut e0 = unsafe { Exec::new(&s0, Bufs::host(p0, p0, p0), Tag(1), DataType::F32, ReduceOp::Sum, 2) };
    // SAFETY: as above.
    let mut e1 = unsafe { Exec::new(&s1, Bufs::host(p1, p1, p1), Tag(2), DataType::F32, ReduceOp::Sum, 2) };
    let mut err = None;
    for _ in 0..10 {
        if let Err(e) = e0.poll(&mut l0) {
            err = Some(e);
            break;
        }
        if let Err(e) = e1.poll(&mut l1) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("mismatch detected");
    assert!(matches!(e, crate::Error::InvalidUsage(_)), "{e}");
}

/// Lazy connections never deadlock a valid program: the higher rank of a pair can connect
/// only after the lower one asked for the link, so a rank whose next link is still
/// connecting must keep pushing what it already posted. Ranks 1 and 2 have never talked:
/// rank 2 posts {send to 0, recv from 1}; rank 0 receives from 2, then sends to 1; rank 1
/// receives from 0, then sends to 2.
#[test]
fn a_connecting_link_does_not_stall_posted_sends() {
    use crate::schedule::{Action, Region};
    let r = |len| Region { buf: BufId::Send, off: 0, len };
    let w = |len| Region { buf: BufId::Recv, off: 0, len };
    let mut s0 = Schedule::new();
    s0.push(Action::Recv { peer: 2, dst: w(8) });
    s0.end_step();
    s0.push(Action::Send { peer: 1, src: r(8) });
    s0.end_step();
    let mut s1 = Schedule::new();
    s1.push(Action::Recv { peer: 0, dst: w(8) });
    s1.end_step();
    s1.push(Action::Send { peer: 2, src: r(8) });
    s1.end_step();
    let mut s2 = Schedule::new();
    s2.push(Action::Send { peer: 0, src: r(8) });
    s2.push(Action::Recv { peer: 1, dst: w(8) });
    s2.end_step();
    // Rank 2 asks for its link to 1 before rank 1 does: it must not wait there.
    s2 = {
        let mut t = Schedule::new();
        t.push(Action::Recv { peer: 1, dst: w(8) });
        t.push(Action::Send { peer: 0, src: r(8) });
        t.end_step();
        t
    };
    let scheds = [s0, s1, s2];
    let mut bufs: Vec<RankBufs> =
        (0..3).map(|k| RankBufs { send: vec![k as u64 + 100], recv: vec![0], scratch: vec![] }).collect();
    // Poll in a fixed order that exposes the stall: rank 2 first.
    let world = SimWorld::new(3, 4);
    let mut links: Vec<_> = (0..3).map(|k| world.links(k)).collect();
    let mut execs: Vec<_> = scheds
        .iter()
        .zip(bufs.iter_mut())
        .map(|(s, b)| {
            let p = b.recv.as_mut_ptr() as *mut u8;
            // SAFETY: 8-byte buffers cover every region.
            unsafe {
                Exec::new(s, Bufs::host(b.send.as_ptr() as *const u8, p, p), Tag(3), DataType::U64, ReduceOp::Sum, 3)
            }
        })
        .collect();
    let mut done = [false; 3];
    for _ in 0..100 {
        for k in [2, 0, 1] {
            if !done[k] {
                done[k] = execs[k].poll(&mut links[k]).unwrap().done;
            }
        }
    }
    assert_eq!(done, [true; 3], "lazy connection stalled the program");
    drop(execs);
    assert_eq!(bufs[0].recv[0], 102);
    assert_eq!(bufs[1].recv[0], 100);
    assert_eq!(bufs[2].recv[0], 101);
}

/// Runs hand-written schedules on 8-word buffers (send word `i` of rank `k`: `100k + i`;
/// receive word: `1000(k+1) + i`), polling ranks in order; rank 0 polls `slow` times alone
/// before the others start. Returns the buffers and whether every rank finished.
fn run_scheds(scheds: &[Schedule], slow: usize) -> (Vec<RankBufs>, bool) {
    let n = scheds.len();
    let mut bufs: Vec<RankBufs> = (0..n as u64)
        .map(|k| RankBufs {
            send: (0..8).map(|i| 100 * k + i).collect(),
            recv: (0..8).map(|i| 1000 * (k + 1) + i).collect(),
            scratch: vec![],
        })
        .collect();
    let world = SimWorld::new(n, 4);
    let mut links: Vec<_> = (0..n).map(|k| world.links(k)).collect();
    let mut done = vec![false; n];
    {
        let mut execs: Vec<_> = scheds
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| {
                let p = b.recv.as_mut_ptr() as *mut u8;
                // SAFETY: 64-byte buffers cover every region of the schedules below.
                unsafe {
                    Exec::new(
                        s,
                        Bufs::host(b.send.as_ptr() as *const u8, p, p),
                        Tag(5),
                        DataType::U64,
                        ReduceOp::Sum,
                        n,
                    )
                }
            })
            .collect();
        for i in 0..slow + 50 {
            for k in 0..n {
                if !done[k] && (k == 0 || i >= slow) {
                    done[k] = execs[k].poll(&mut links[k]).unwrap().done;
                }
            }
        }
    }
    (bufs, done.iter().all(|d| *d))
}

#[test]
fn the_next_steps_independent_actions_go_out_while_a_step_waits() {
    use crate::schedule::{Action, Region};
    let send = |w: usize| Region { buf: BufId::Send, off: 8 * w, len: 8 };
    let recv = |w: usize| Region { buf: BufId::Recv, off: 8 * w, len: 8 };
    // Each rank first waits for the other's step-1 message: only a look-ahead that posts the
    // step-1 sends (which read the send buffer, untouched by step 0) lets this finish.
    let cross = |peer| {
        let mut s = Schedule::new();
        s.push(Action::Recv { peer, dst: recv(0) });
        s.end_step();
        s.push(Action::Send { peer, src: send(1) });
        s.end_step();
        s
    };
    let (bufs, done) = run_scheds(&[cross(1), cross(0)], 0);
    assert!(done, "the next step's send was not posted ahead");
    assert_eq!((bufs[0].recv[0], bufs[1].recv[0]), (101, 1));
}

#[test]
fn the_look_ahead_never_touches_memory_the_current_step_writes() {
    use crate::schedule::{Action, Region};
    let send = |w: usize| Region { buf: BufId::Send, off: 8 * w, len: 8 };
    let recv = |w: usize| Region { buf: BufId::Recv, off: 8 * w, len: 8 };
    // Rank 0 forwards what it receives in step 0 (read after write), and receives into a word
    // step 0 is still reading (write after read) and into one it is writing (write after
    // write). Rank 1 is slow: rank 0 polls many times before rank 1 sends anything.
    let mut s0 = Schedule::new();
    s0.push(Action::Recv { peer: 1, dst: recv(0) });
    s0.push(Action::Send { peer: 1, src: recv(1) });
    s0.end_step();
    s0.push(Action::Recv { peer: 1, dst: recv(2) });
    s0.push(Action::Send { peer: 1, src: recv(0) });
    s0.end_step();
    s0.push(Action::Recv { peer: 1, dst: recv(1) });
    s0.end_step();
    s0.push(Action::Recv { peer: 1, dst: recv(0) });
    s0.end_step();
    let mut s1 = Schedule::new();
    s1.push(Action::Send { peer: 0, src: send(0) });
    s1.push(Action::Recv { peer: 0, dst: recv(0) });
    s1.end_step();
    s1.push(Action::Send { peer: 0, src: send(1) });
    s1.push(Action::Recv { peer: 0, dst: recv(1) });
    s1.end_step();
    s1.push(Action::Send { peer: 0, src: send(2) });
    s1.end_step();
    s1.push(Action::Send { peer: 0, src: send(3) });
    s1.end_step();
    for slow in [0, 5, 50] {
        let (bufs, done) = run_scheds(&[s0.clone(), s1.clone()], slow);
        assert!(done, "slow = {slow}");
        // Rank 1 got rank 0's original word 1, then the word rank 0 received first (100).
        assert_eq!(&bufs[1].recv[..2], &[1001, 100], "slow = {slow}");
        // Rank 0: word 0 from the last step, word 1 from step 2, word 2 from step 1.
        assert_eq!(&bufs[0].recv[..3], &[103, 102, 101], "slow = {slow}");
    }
}

#[test]
fn a_group_sends_to_peers_in_posting_order_and_copies_to_itself() {
    // 3 ranks; each sends words 0-1 and then 4-7 of its send buffer to the next rank, words
    // 2-3 to itself, and receives the same shapes from the previous rank and from itself.
    let n = 3;
    let mut bufs: Vec<RankBufs> = (0..n as u64)
        .map(|k| RankBufs { send: (0..8).map(|i| 100 * k + i).collect(), recv: vec![0; 8], scratch: vec![] })
        .collect();
    let scheds: Vec<Schedule> = bufs
        .iter_mut()
        .enumerate()
        .map(|(r, b)| {
            let (s, d) = (b.send.as_ptr() as usize, b.recv.as_mut_ptr() as usize);
            let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
            let op = |peer, send, addr, len| crate::algo::P2pOp { peer, send, addr, len };
            crate::algo::group(
                r,
                &[
                    op(next, true, s, 16),
                    op(r, true, s + 16, 16),
                    op(prev, false, d, 16),
                    op(r, false, d + 16, 16),
                    op(next, true, s + 32, 32),
                    op(prev, false, d + 32, 32),
                ],
            )
        })
        .collect();
    simulate(&scheds, &mut bufs, DataType::U64, ReduceOp::Sum, 2, 1, false);
    for (r, b) in bufs.iter().enumerate() {
        let (prev, me) = (((r + n - 1) % n) as u64, r as u64);
        let want: Vec<u64> = (0..8).map(|i| if i == 2 || i == 3 { 100 * me + i } else { 100 * prev + i }).collect();
        assert_eq!(b.recv, want, "rank {r}");
    }
}

/// Broadcast from several roots: every world size, host layout, root set (one root, roots
/// on one host, roots spread over hosts, every rank a root), size and segment length; every
/// byte checked on every rank, in and out of place, with the roots' data equal.
#[test]
fn striped_broadcast_every_world_layout_and_root_set() {
    for n in 1..=13usize {
        for (seg, _) in shapes(n, 4) {
            for &count in &SIZES {
                for in_place in [false, true] {
                    let seed = (n * 977 + count * 13 + seg) as u64;
                    let hosts = layout(n, seed);
                    let mut root_sets: Vec<Vec<usize>> = vec![vec![seed as usize % n], (0..n).collect()];
                    root_sets.push(hosts[0].iter().copied().take(2).collect());
                    root_sets.push(hosts.iter().map(|g| *g.last().expect("host")).rev().collect());
                    for roots in root_sets {
                        striped(n, &hosts, &roots, count, seg, in_place, seed);
                    }
                }
            }
        }
    }
}

fn striped(n: usize, hosts: &[Vec<usize>], roots: &[usize], count: usize, seg: usize, in_place: bool, seed: u64) {
    let es = 4;
    let dtype = DataType::U32;
    let plan = algo::striped_plan(hosts, count, roots);
    // Shape of the plan: the stripes tile the buffer; each chain starts at a source and
    // reaches every non-root once; no root receives.
    let mut next = 0;
    for st in &plan.stripes {
        assert_eq!(st.offset, next, "{plan:?}");
        next += st.len;
        assert!(plan.sources.contains(&st.chain[0]), "{plan:?}");
        let mut got: Vec<usize> = st.chain[1..].to_vec();
        got.sort_unstable();
        let want: Vec<usize> = (0..n).filter(|r| !roots.contains(r)).collect();
        assert_eq!(got, want, "stripe chain of {plan:?}");
    }
    assert_eq!(next, count, "{plan:?}");
    let mut bufs: Vec<RankBufs> = (0..n)
        .map(|r| {
            let mut b =
                RankBufs { send: vec![0; words(count * es)], recv: vec![0; words(count * es)], scratch: vec![] };
            for i in 0..count {
                // The roots hold the data; every other rank holds something else.
                let v = if roots.contains(&r) { pattern(n, i) } else { pattern(r, i) };
                put(dtype, bytes_of_mut(&mut b.send), i, v as f64);
            }
            if in_place {
                b.recv = b.send.clone();
            }
            b
        })
        .collect();
    let scheds: Vec<Schedule> = (0..n).map(|rank| algo::broadcast_striped(rank, &plan, es, seg)).collect();
    simulate(&scheds, &mut bufs, dtype, ReduceOp::Sum, 2, seed, in_place);
    for (r, b) in bufs.iter().enumerate() {
        for i in 0..count {
            let V::I(g) = get(dtype, bytes_of(&b.recv), i) else { unreachable!() };
            assert_eq!(
                g as u32,
                pattern(n, i),
                "striped n={n} hosts={hosts:?} roots={roots:?} count={count} seg={seg} rank={r} i={i}"
            );
        }
    }
}

/// Where the striped plan sends: two roots on two of four one-rank hosts each send half, and
/// each of the two receivers forwards half (a one-root chain sends the whole buffer through
/// three links); roots on one host each send their share.
#[test]
fn striped_plan_shares_the_senders_and_relays() {
    let hosts: Vec<Vec<usize>> = (0..4).map(|r| vec![r]).collect();
    let plan = algo::striped_plan(&hosts, 1000, &[0, 1]);
    assert_eq!(plan.sources, vec![0, 1]);
    let sent = |r: usize| -> usize {
        plan.stripes
            .iter()
            .filter(|st| st.chain.iter().position(|&x| x == r).is_some_and(|p| p + 1 < st.chain.len()))
            .map(|st| st.len)
            .sum()
    };
    assert_eq!([sent(0), sent(1), sent(2), sent(3)], [500, 500, 500, 500], "{plan:?}");
    // Two roots on one host of two: both send, and only one of them per host when spread.
    let two: Vec<Vec<usize>> = vec![vec![0, 1], vec![2, 3]];
    assert_eq!(algo::striped_plan(&two, 100, &[0, 1]).sources, vec![0, 1]);
    assert_eq!(algo::striped_plan(&two, 100, &[0, 1, 2]).sources, vec![0, 2]);
    // Ranks on a source's host come first in its chains (host staging before the NIC), and
    // every stripe crosses into the other host once.
    let p = algo::striped_plan(&two, 100, &[0, 2]);
    for st in &p.stripes {
        assert_eq!(st.chain.len(), 3);
        let home = if st.chain[0] == 0 { 0 } else { 1 };
        assert!(two[home].contains(&st.chain[1]), "{p:?}");
    }
}
