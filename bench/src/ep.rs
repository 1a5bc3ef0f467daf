//! `oxccl perf ep`: expert-parallel (MoE) dispatch and combine, as all_to_all_v calls with the
//! shapes a MoE layer produces. Each rank has `tokens` tokens of `hidden` elements; each
//! token goes to `topk` distinct experts of `experts`, drawn with a Zipf-like popularity
//! (expert e is chosen with weight 1/(e+1)^zipf; experts are spread over the ranks in
//! blocks, so the popular ones crowd the first ranks). The choices change at every step.
//!
//! One step is what a MoE layer does: the counts go out (an all_to_all of one count per
//! rank), the tokens go to their experts (dispatch: all_to_all_v), and come back (combine:
//! all_to_all_v the other way). The combine returns exactly what the dispatch sent, so every
//! step is checked: each rank gets its own rows back. With small per-peer messages the
//! dispatch takes the low-latency path instead: all_to_all_v_dynamic, whose counts travel
//! with the tokens (one exchange instead of two).

use std::time::Instant;

use oxccl::{Communicator, Element, ReduceOp, Result};

/// The shape of the benchmark (options of `oxccl perf ep`).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Tokens per rank.
    pub tokens: usize,
    /// Elements per token.
    pub hidden: usize,
    /// Experts per token.
    pub topk: usize,
    /// Experts in all.
    pub experts: usize,
    /// Popularity skew (0: uniform).
    pub zipf: f64,
    /// Seed of the choices.
    pub seed: u64,
    /// Dispatch with all_to_all_v_dynamic (the counts travel with the data) instead of an
    /// all_to_all of the counts then all_to_all_v.
    pub dynamic: bool,
}

impl Shape {
    /// The most one rank can send another in a step, in bytes (every token of the rank to
    /// experts of that one rank).
    pub fn max_block_bytes(&self, es: usize) -> usize {
        self.tokens * self.topk * self.hidden * es
    }
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Rows (token copies) this rank sends to each rank at `step`.
fn rows_to(s: &Shape, rank: usize, world: usize, step: u64) -> Vec<usize> {
    let cdf: Vec<f64> = (0..s.experts)
        .scan(0.0, |acc, e| {
            *acc += 1.0 / ((e + 1) as f64).powf(s.zipf);
            Some(*acc)
        })
        .collect();
    let total = *cdf.last().unwrap_or(&1.0);
    let per_rank = s.experts.div_ceil(world);
    let mut rng = Rng(s.seed ^ (step << 20) ^ (rank as u64).wrapping_mul(0x1000_0001));
    let mut rows = vec![0usize; world];
    let mut picked = Vec::with_capacity(s.topk);
    for _ in 0..s.tokens {
        picked.clear();
        while picked.len() < s.topk.min(s.experts) {
            let u = rng.unit() * total;
            let e = cdf.partition_point(|&c| c < u).min(s.experts - 1);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        for &e in &picked {
            rows[(e / per_rank).min(world - 1)] += 1;
        }
    }
    rows
}

/// What one configuration measured.
#[derive(Debug)]
pub struct EpRow {
    /// Mean step time, microseconds (the slowest rank's).
    pub step_us: f64,
    /// p50, p99, p99.9 of one step, microseconds.
    pub lat: [f64; 3],
    /// Bytes this rank dispatched per step, on average (to other ranks).
    pub dispatch_bytes: f64,
    /// Bytes per second each rank moved out and in (dispatch and combine), GB/s.
    pub algbw: f64,
    /// Largest share of all rows one rank received in a step (1/world: balanced).
    pub hottest: f64,
    /// Elements that did not come back as they went.
    pub wrong: u64,
}

/// Runs `warmup + iters` steps of dispatch and combine of elements `T`.
pub fn measure<T: Element + Default>(
    comm: &Communicator,
    s: &Shape,
    iters: usize,
    warmup: usize,
    val: impl Fn(i64) -> T,
) -> Result<EpRow> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let h = s.hidden;
    let es = std::mem::size_of::<T>();
    let mut samples = Vec::with_capacity(iters);
    let (mut moved, mut hottest, mut wrong) = (0.0f64, 0.0f64, 0u64);
    let mut counts_in = vec![0u64; world];
    // Buffers made once, for the most a step can send or receive, and touched once (as a
    // framework's caching allocator keeps them): the steps time the communication only.
    let most_out = s.tokens * s.topk * h;
    let mut send: Vec<T> = vec![val(1); most_out];
    let mut back: Vec<T> = vec![val(1); most_out];
    let mut at_experts: Vec<T> = vec![val(1); world * most_out];
    comm.barrier()?;
    for step in 0..(warmup + iters) as u64 {
        let rows = rows_to(s, rank, world, step);
        let send_counts: Vec<usize> = rows.iter().map(|r| r * h).collect();
        let total_out: usize = send_counts.iter().sum();
        // The rows, each tagged by where it comes from (rank, position).
        for (i, x) in send[..total_out].iter_mut().enumerate() {
            *x = val(((rank * 7 + i + step as usize) % 61) as i64);
        }
        let (send, back) = (&send[..total_out], &mut back[..total_out]);
        // Timed: what the MoE layer's communication takes (not making this step's data).
        let t = Instant::now();
        let recv_counts = if s.dynamic {
            // 1+2. The counts travel with the tokens.
            let rc = comm.all_to_all_v_dynamic(send, &send_counts, &mut at_experts)?;
            let got: usize = rc.iter().sum();
            // 3. Combine.
            comm.all_to_all_v(&at_experts[..got], &rc, back, &send_counts)?;
            rc
        } else {
            // 1. The counts.
            let counts_out: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
            comm.all_to_all(&counts_out, &mut counts_in)?;
            let recv_counts: Vec<usize> = counts_in.iter().map(|&c| c as usize).collect();
            let got: usize = recv_counts.iter().sum();
            // 2. Dispatch, 3. combine (the experts' output goes back where it came from).
            comm.all_to_all_v(send, &send_counts, &mut at_experts[..got], &recv_counts)?;
            comm.all_to_all_v(&at_experts[..got], &recv_counts, back, &send_counts)?;
            recv_counts
        };
        let took = t.elapsed().as_secs_f64();
        if step as usize >= warmup {
            samples.push(took);
            let off_rank =
                |c: &[usize]| c.iter().enumerate().filter(|(d, _)| *d != rank).map(|(_, &c)| c).sum::<usize>();
            moved += ((off_rank(&send_counts) + off_rank(&recv_counts)) * es * 2) as f64;
            let got: usize = recv_counts.iter().sum();
            hottest = hottest.max(got as f64 / (s.tokens * s.topk * world * h).max(1) as f64);
            wrong += back.iter().zip(send).filter(|(a, b)| a != b).count() as u64;
        }
    }
    let total = samples.iter().sum::<f64>();
    let mut t = [total / iters.max(1) as f64];
    comm.all_reduce_in_place(&mut t, ReduceOp::Max)?;
    let mut lat = crate::perf::percentiles(&mut samples);
    comm.all_reduce_in_place(&mut lat, ReduceOp::Max)?;
    let mut hot = [hottest];
    comm.all_reduce_in_place(&mut hot, ReduceOp::Max)?;
    let mut w = [wrong];
    comm.all_reduce_in_place(&mut w, ReduceOp::Sum)?;
    Ok(EpRow {
        step_us: t[0] * 1e6,
        lat: lat.map(|x| x * 1e6),
        dispatch_bytes: moved / 4.0 / iters.max(1) as f64,
        algbw: moved / 2.0 / total.max(1e-12) / 1e9,
        hottest: hot[0],
        wrong: w[0],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_skewed_distinct_and_repeatable() {
        let s = Shape { tokens: 1000, hidden: 1, topk: 2, experts: 16, zipf: 1.2, seed: 7, dynamic: false };
        let a = rows_to(&s, 0, 4, 3);
        assert_eq!(a, rows_to(&s, 0, 4, 3), "the same step, the same choices");
        assert_ne!(a, rows_to(&s, 0, 4, 4), "choices change every step");
        assert_eq!(a.iter().sum::<usize>(), 2000, "top-2 of 1000 tokens");
        // The first rank hosts the most popular experts.
        assert!(a[0] > a[3] * 2, "{a:?}");
        let flat = Shape { zipf: 0.0, ..s };
        let b = rows_to(&flat, 0, 4, 3);
        assert!(b.iter().all(|&r| (400..600).contains(&r)), "uniform: {b:?}");
        // Top-k never exceeds the experts there are.
        let few = Shape { topk: 8, experts: 3, ..s };
        assert_eq!(rows_to(&few, 1, 2, 0).iter().sum::<usize>(), 3000);
    }
}
