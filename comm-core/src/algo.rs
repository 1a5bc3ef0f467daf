//! Algorithm generators: pure functions from `(rank, world size, sizes)` to a [`Schedule`].
//!
//! Notation used throughout: `n` ranks, this rank `r`, `next = (r+1) mod n`,
//! `prev = (r-1) mod n`, `es` the element size in bytes, counts in elements. Long buffers are
//! cut into *segments* of at most `seg` elements so that consecutive segments overlap in the
//! pipeline (segment `j` runs step `t-j` at global step `t`). Every generator produces
//! schedules in which each pair of ranks posts its sends and receives in the same order, so
//! the in-order links of the transports match them one to one.

use crate::schedule::{Action, BufId, Region, Schedule};

/// Which algorithm an operation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    /// Ring: reduce-scatter then all-gather (all_reduce), ring passes (all_gather,
    /// reduce_scatter). Bandwidth-optimal: each rank sends `2(n-1)/n` of the buffer.
    Ring,
    /// Recursive doubling (all_reduce): `ceil(log2 n)` exchanges of the whole buffer.
    /// Latency-optimal for small messages.
    RecursiveDoubling,
    /// Pipelined chain (broadcast, reduce): segments flow down a chain of ranks.
    Chain,
    /// Binomial tree (broadcast): `ceil(log2 n)` hops.
    Tree,
    /// Pairwise exchange (all_to_all).
    Pairwise,
    /// Hierarchical (all_reduce across hosts): reduce within each host to its first rank,
    /// ring all-reduce among those, broadcast within each host.
    Hierarchical,
    /// Striped (broadcast from several roots): each source sends its own stripes down a
    /// chain of the receivers, which relay them ([`broadcast_striped`]).
    Striped,
}

impl Algo {
    /// Name used by `OXCCL_ALGO` and in logs.
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::RecursiveDoubling => "rd",
            Algo::Chain => "chain",
            Algo::Tree => "tree",
            Algo::Pairwise => "pairwise",
            Algo::Hierarchical => "hier",
            Algo::Striped => "striped",
        }
    }
    /// Parses a name as `OXCCL_ALGO` spells it.
    pub fn parse(s: &str) -> Option<Algo> {
        Some(match s {
            "ring" => Algo::Ring,
            "rd" | "recursive_doubling" | "recursive-doubling" => Algo::RecursiveDoubling,
            "chain" | "pipeline" => Algo::Chain,
            "tree" | "binomial" => Algo::Tree,
            "pairwise" => Algo::Pairwise,
            "hier" | "hierarchical" => Algo::Hierarchical,
            "striped" => Algo::Striped,
            _ => return None,
        })
    }
}

/// The algorithms each collective has (the first is the default above the small-message
/// threshold); `None` for an unknown collective name.
pub fn allowed(collective: &str) -> Option<&'static [Algo]> {
    Some(match collective {
        "all_reduce" => &[Algo::Ring, Algo::RecursiveDoubling, Algo::Hierarchical],
        "broadcast" => &[Algo::Chain, Algo::Tree, Algo::Hierarchical],
        "reduce" => &[Algo::Chain],
        "all_gather" => &[Algo::Ring, Algo::Hierarchical],
        "reduce_scatter" => &[Algo::Ring],
        "all_to_all" | "all_to_all_v" | "send/recv" | "barrier" => &[Algo::Pairwise],
        _ => return None,
    })
}

/// Sizes common to every generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// This rank.
    pub rank: usize,
    /// World size.
    pub n: usize,
    /// Element size in bytes.
    pub es: usize,
    /// Segment length in elements (pipelining granularity); at least 1.
    pub seg: usize,
}

impl Shape {
    fn next(&self) -> usize {
        (self.rank + 1) % self.n
    }
    fn prev(&self) -> usize {
        (self.rank + self.n - 1) % self.n
    }
    /// `(r + k) mod n` for any signed `k`.
    fn rel(&self, k: isize) -> usize {
        (self.rank as isize + k).rem_euclid(self.n as isize) as usize
    }
    fn reg(&self, buf: BufId, off: usize, len: usize) -> Region {
        Region::elems(buf, off, len, self.es)
    }
}

/// Splits `len` elements into `parts` near-equal pieces; piece `k` is `(offset, length)`.
pub fn split(len: usize, parts: usize, k: usize) -> (usize, usize) {
    let base = len / parts;
    let rem = len % parts;
    let off = k * base + k.min(rem);
    (off, base + usize::from(k < rem))
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

/// Emits `slices` pipelined slices of `steps_per_slice` steps each: global step `t` runs step
/// `t - j` of every slice `j` that is in flight, in ascending `j`.
fn pipelined(
    s: &mut Schedule,
    slices: usize,
    steps_per_slice: usize,
    mut emit: impl FnMut(&mut Schedule, usize, usize),
) {
    if slices == 0 || steps_per_slice == 0 {
        return;
    }
    for t in 0..slices + steps_per_slice - 1 {
        let first = t.saturating_sub(steps_per_slice - 1);
        for j in first..=t.min(slices - 1) {
            emit(s, j, t - j);
        }
        s.end_step();
    }
}

fn copy_step(s: &mut Schedule, dst: Region, src: Region) {
    if dst.len > 0 {
        s.push(Action::Copy { dst, src });
        s.end_step();
    }
}

/// Ring all-reduce on `count` elements: reduce-scatter (`n-1` steps) then all-gather
/// (`n-1` steps) on each slice of `n * seg` elements. In step `s < n-1` rank `r` sends chunk
/// `r-s` (reduced so far) to `next` and folds chunk `r-s-1` arriving from `prev` into its own
/// data; after them it owns the fully reduced chunk `r+1`, which it scales (avg) and which
/// then travels once round the ring.
pub fn all_reduce_ring(sh: Shape, count: usize, avg: bool) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    if n == 1 {
        copy_step(&mut s, sh.reg(BufId::Recv, 0, count), sh.reg(BufId::Send, 0, count));
        return s;
    }
    let slice_len = sh.seg.saturating_mul(n);
    let slices = ceil_div(count, slice_len);
    pipelined(&mut s, slices, 2 * (n - 1), |s, j, step| {
        let base = j * slice_len;
        let len = slice_len.min(count - base);
        let chunk = |k: usize, buf: BufId| {
            let (o, l) = split(len, n, k);
            sh.reg(buf, base + o, l)
        };
        if step < n - 1 {
            let sc = sh.rel(-(step as isize));
            let src = chunk(sc, if step == 0 { BufId::Send } else { BufId::Recv });
            if src.len > 0 {
                s.push(Action::Send { peer: sh.next(), src });
            }
            let rc = sh.rel(-(step as isize) - 1);
            let dst = chunk(rc, BufId::Recv);
            if dst.len > 0 {
                s.push(Action::RecvReduce { peer: sh.prev(), dst, local: chunk(rc, BufId::Send) });
            }
        } else {
            let k = step - (n - 1);
            if k == 0 && avg {
                let own = chunk(sh.next(), BufId::Recv);
                if own.len > 0 {
                    s.push(Action::Scale { dst: own });
                }
            }
            let src = chunk(sh.rel(1 - k as isize), BufId::Recv);
            if src.len > 0 {
                s.push(Action::Send { peer: sh.next(), src });
            }
            let dst = chunk(sh.rel(-(k as isize)), BufId::Recv);
            if dst.len > 0 {
                s.push(Action::Recv { peer: sh.prev(), dst });
            }
        }
    });
    s
}

/// Recursive-doubling all-reduce. With `p` the largest power of two `<= n` and
/// `extra = n - p`, ranks `2i` and `2i+1` (`i < extra`) first fold into the odd one; the `p`
/// remaining ranks exchange their whole vectors with partners at distance 1, 2, 4, ... (in a
/// virtual numbering), combining after each exchange; the folded ranks then get the result.
/// The first exchange of a rank that was not folded into sends its input directly and combines
/// on receipt (`recv = send op incoming`): with two ranks the whole operation is one step.
/// Not when `in_place` (input and output are one buffer, which the receive would modify while
/// the send may still read it).
pub fn all_reduce_rd(sh: Shape, count: usize, avg: bool, in_place: bool) -> Schedule {
    let mut s = Schedule::new();
    let (n, r) = (sh.n, sh.rank);
    if count == 0 {
        return s;
    }
    let all = sh.reg(BufId::Recv, 0, count);
    let input = sh.reg(BufId::Send, 0, count);
    if n == 1 {
        copy_step(&mut s, all, input);
        return s;
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - p;
    let tmp = sh.reg(BufId::Scratch, 0, count);
    let combine = Action::Reduce { dst: all, a: all, b: tmp };
    if r < 2 * extra && r % 2 == 0 {
        s.push(Action::Send { peer: r + 1, src: input });
        s.end_step();
        s.push(Action::Recv { peer: r + 1, dst: all });
        s.end_step();
        return s;
    }
    s.scratch_bytes = count * sh.es;
    // `fresh`: `all` does not hold this rank's data yet (its input is still only in `send`).
    let mut fresh = !in_place;
    let mut pending = false;
    if r < 2 * extra {
        s.push(Action::RecvReduce { peer: r - 1, dst: all, local: input });
        s.end_step();
        fresh = false;
    }
    let vr = if r < 2 * extra { r / 2 } else { r - extra };
    let mut mask = 1;
    while mask < p {
        let pv = vr ^ mask;
        let partner = if pv < extra { 2 * pv + 1 } else { pv + extra };
        if pending {
            s.push(combine);
        }
        if fresh {
            s.push(Action::Send { peer: partner, src: input });
            s.push(Action::RecvReduce { peer: partner, dst: all, local: input });
            fresh = false;
        } else {
            s.push(Action::Send { peer: partner, src: all });
            s.push(Action::Recv { peer: partner, dst: tmp });
            pending = true;
        }
        s.end_step();
        mask <<= 1;
    }
    if pending {
        s.push(combine);
    }
    if avg {
        s.push(Action::Scale { dst: all });
    }
    s.end_step();
    if r < 2 * extra {
        s.push(Action::Send { peer: r - 1, src: all });
        s.end_step();
    }
    s
}

/// Where `rank` sits in a host layout: (host index, index among that host's ranks).
fn locate(hosts: &[Vec<usize>], rank: usize) -> Option<(usize, usize)> {
    hosts.iter().enumerate().find_map(|(h, g)| g.iter().position(|&r| r == rank).map(|i| (h, i)))
}

/// Hierarchical all-reduce over hosts. `hosts[h]` lists the ranks of host `h` in rank
/// order; its first rank is the host's leader. Stage 1: a pipelined chain reduce within each
/// host into the leader's output (host-staging links); stage 2: a ring all-reduce among the
/// leaders, in place on the output (the only traffic between hosts: `2(H-1)/H` of the buffer
/// per leader instead of per rank); stage 3: a pipelined chain broadcast within each host.
/// avg divides once at the end, by the world size.
pub fn all_reduce_hier(rank: usize, hosts: &[Vec<usize>], es: usize, seg: usize, count: usize, avg: bool) -> Schedule {
    let mut s = Schedule::new();
    if count == 0 {
        return s;
    }
    let Some((h, li)) = locate(hosts, rank) else { return s };
    let local = &hosts[h];
    let lsh = Shape { rank: li, n: local.len(), es, seg };
    s.append(reduce_chain(lsh, count, 0, false).map_peers(|p| local[p]));
    if li == 0 && hosts.len() > 1 {
        let leaders: Vec<usize> = hosts.iter().map(|g| g[0]).collect();
        let gsh = Shape { rank: h, n: hosts.len(), es, seg };
        s.append(all_reduce_ring(gsh, count, false).map_buf(BufId::Send, BufId::Recv).map_peers(|p| leaders[p]));
    }
    s.append(broadcast_chain(lsh, count, 0).map_buf(BufId::Send, BufId::Recv).map_peers(|p| local[p]));
    if avg {
        s.push(Action::Scale { dst: Region::elems(BufId::Recv, 0, count, es) });
        s.end_step();
    }
    s
}

/// Hierarchical broadcast over hosts (`hosts` as for [`all_reduce_hier`]): a pipelined chain
/// among one rank per host (the root on its own host, the first rank elsewhere), then a
/// pipelined chain within each host from that rank. The buffer crosses each host boundary
/// once.
pub fn broadcast_hier(rank: usize, hosts: &[Vec<usize>], es: usize, seg: usize, count: usize, root: usize) -> Schedule {
    let mut s = Schedule::new();
    if count == 0 {
        return s;
    }
    let (Some((h, li)), Some((hr, _))) = (locate(hosts, rank), locate(hosts, root)) else { return s };
    let heads: Vec<usize> = (0..hosts.len()).map(|k| if k == hr { root } else { hosts[k][0] }).collect();
    let local = &hosts[h];
    let head_pos = local.iter().position(|&r| r == heads[h]).unwrap_or(0);
    if rank == heads[h] {
        s.append(broadcast_chain(Shape { rank: h, n: hosts.len(), es, seg }, count, hr).map_peers(|p| heads[p]));
    }
    let lsh = Shape { rank: li, n: local.len(), es, seg };
    let inner = broadcast_chain(lsh, count, head_pos).map_peers(|p| local[p]);
    // The host's head already holds the data in its output after the first stage.
    s.append(if rank == heads[h] { inner.map_buf(BufId::Send, BufId::Recv) } else { inner });
    s
}

/// One stripe of a broadcast from several roots: elements `offset..offset + len`, sent by
/// `chain[0]` (a source) down the chain of receivers, each relaying to the next.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stripe {
    /// First element.
    pub offset: usize,
    /// Elements.
    pub len: usize,
    /// The source, then every receiver in the order the stripe reaches them.
    pub chain: Vec<usize>,
}

/// How a broadcast from several roots that hold the same data is split
/// ([`striped_plan`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StripedPlan {
    /// The roots the caller named (they hold the data and receive nothing).
    pub roots: Vec<usize>,
    /// The roots that send: one per host when the roots span several hosts (two senders on
    /// one host would share its NIC), every root when they share one host.
    pub sources: Vec<usize>,
    /// The stripes, in buffer order.
    pub stripes: Vec<Stripe>,
}

/// Plans a broadcast of `count` elements from `roots` (distinct ranks that hold the same
/// data) over `hosts` (as for [`all_reduce_hier`]). The buffer is cut into
/// `sources x receiving hosts` stripes; stripe `i` leaves source `i mod S` and goes first to
/// the receivers on the source's own host (host staging), then host by host, in an order
/// rotated by `i / S`, so every host is the last of a chain (and forwards nothing) for an
/// equal share of the stripes. Each stripe crosses each host boundary once; each source NIC
/// sends `1/S` of the buffer and each receiving host forwards at most `(H-1)/H` of it, against
/// the whole buffer through every link of a one-root chain.
pub fn striped_plan(hosts: &[Vec<usize>], count: usize, roots: &[usize]) -> StripedPlan {
    let host_of = |r: usize| locate(hosts, r).map_or(usize::MAX, |(h, _)| h);
    let mut root_hosts: Vec<usize> = Vec::new();
    let mut per_host: Vec<usize> = Vec::new();
    for &r in roots {
        if !root_hosts.contains(&host_of(r)) {
            root_hosts.push(host_of(r));
            per_host.push(r);
        }
    }
    let sources = if root_hosts.len() > 1 { per_host } else { roots.to_vec() };
    let receivers: Vec<Vec<usize>> =
        hosts.iter().map(|g| g.iter().copied().filter(|r| !roots.contains(r)).collect()).collect();
    let receiving: Vec<usize> = (0..hosts.len()).filter(|&h| !receivers[h].is_empty()).collect();
    let s = sources.len().max(1);
    let m = (s * receiving.len().max(1)).min(count);
    let mut stripes = Vec::with_capacity(m);
    let mut offset = 0;
    for i in 0..m {
        let src = sources[i % s];
        let home = host_of(src);
        let mut chain = vec![src];
        if let Some(local) = receivers.get(home) {
            chain.extend_from_slice(local);
        }
        let others: Vec<usize> = receiving.iter().copied().filter(|&h| h != home).collect();
        if !others.is_empty() {
            let k = (i / s) % others.len();
            for &h in others[k..].iter().chain(&others[..k]) {
                chain.extend_from_slice(&receivers[h]);
            }
        }
        let len = count / m + usize::from(i < count % m);
        stripes.push(Stripe { offset, len, chain });
        offset += len;
    }
    StripedPlan { roots: roots.to_vec(), sources, stripes }
}

/// This rank's part of a [`StripedPlan`]: the roots copy their input to their output (out of
/// place); then every stripe is a pipelined chain broadcast, all at once. Segment `k` of a
/// stripe moves from chain position `p` to `p+1` at step `k + p`, so a relay receives
/// segment `k` while it forwards `k-1` (the double buffer is the output itself). Within a step
/// actions go in stripe order on every rank, so the messages on each link match their
/// receives in order.
pub fn broadcast_striped(rank: usize, plan: &StripedPlan, es: usize, seg: usize) -> Schedule {
    let mut s = Schedule::new();
    let count: usize = plan.stripes.iter().map(|st| st.len).sum();
    if count == 0 {
        return s;
    }
    let seg = seg.max(1);
    if plan.roots.contains(&rank) {
        copy_step(&mut s, Region::elems(BufId::Recv, 0, count, es), Region::elems(BufId::Send, 0, count, es));
    }
    let mine: Vec<(&Stripe, usize)> = plan
        .stripes
        .iter()
        .filter(|st| st.len > 0)
        .filter_map(|st| st.chain.iter().position(|&r| r == rank).map(|p| (st, p)))
        .collect();
    let steps = mine.iter().map(|(st, p)| ceil_div(st.len, seg) + p).max().unwrap_or(0);
    for t in 0..steps {
        let mut any = false;
        for &(st, p) in &mine {
            let nseg = ceil_div(st.len, seg);
            let part = |k: usize, buf| Region::elems(buf, st.offset + k * seg, seg.min(st.len - k * seg), es);
            if p >= 1 {
                if let Some(k) = t.checked_sub(p - 1).filter(|&k| k < nseg) {
                    s.push(Action::Recv { peer: st.chain[p - 1], dst: part(k, BufId::Recv) });
                    any = true;
                }
            }
            if p + 1 < st.chain.len() {
                if let Some(k) = t.checked_sub(p).filter(|&k| k < nseg) {
                    let buf = if p == 0 { BufId::Send } else { BufId::Recv };
                    s.push(Action::Send { peer: st.chain[p + 1], src: part(k, buf) });
                    any = true;
                }
            }
        }
        if any {
            s.end_step();
        }
    }
    s
}

/// Pipelined chain broadcast: ranks in the order `root, root+1, ...`; segment `t` leaves the
/// root at step `t`, and every other rank receives segment `t` while forwarding `t-1`.
pub fn broadcast_chain(sh: Shape, count: usize, root: usize) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    let pos = (sh.rank + n - root) % n;
    let nseg = ceil_div(count, sh.seg);
    let seg = |t: usize, buf: BufId| {
        let off = t * sh.seg;
        sh.reg(buf, off, sh.seg.min(count - off))
    };
    if pos == 0 {
        copy_step(&mut s, sh.reg(BufId::Recv, 0, count), sh.reg(BufId::Send, 0, count));
        if n > 1 {
            for t in 0..nseg {
                s.push(Action::Send { peer: sh.next(), src: seg(t, BufId::Send) });
                s.end_step();
            }
        }
        return s;
    }
    let has_next = pos < n - 1;
    for t in 0..=nseg {
        if t < nseg {
            s.push(Action::Recv { peer: sh.prev(), dst: seg(t, BufId::Recv) });
        }
        if t >= 1 && has_next {
            s.push(Action::Send { peer: sh.next(), src: seg(t - 1, BufId::Recv) });
        }
        s.end_step();
    }
    s
}

/// Binomial-tree broadcast: in virtual numbering `v = (r - root) mod n`, rank `v` receives
/// from `v` minus its lowest set bit, then sends to `v + m` for each power of two `m` below
/// that bit (largest subtree first). `ceil(log2 n)` hops: the small-message choice.
pub fn broadcast_tree(sh: Shape, count: usize, root: usize) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    let v = (sh.rank + n - root) % n;
    let all_recv = sh.reg(BufId::Recv, 0, count);
    let to_rank = |vv: usize| (vv + root) % n;
    let (src, mut mask) = if v == 0 {
        copy_step(&mut s, all_recv, sh.reg(BufId::Send, 0, count));
        (sh.reg(BufId::Send, 0, count), n.next_power_of_two() >> 1)
    } else {
        let low = v & v.wrapping_neg();
        s.push(Action::Recv { peer: to_rank(v - low), dst: all_recv });
        s.end_step();
        (all_recv, low >> 1)
    };
    while mask > 0 {
        if v + mask < n {
            s.push(Action::Send { peer: to_rank(v + mask), src });
        }
        mask >>= 1;
    }
    s.end_step();
    s
}

/// Pipelined chain reduce toward `root`: segments start at the rank farthest from the root
/// (`root-1`) and move one rank closer per step, each rank folding in its own data on the way.
/// Middle ranks hold a segment in one of two scratch slots between receiving and forwarding.
pub fn reduce_chain(sh: Shape, count: usize, root: usize, avg: bool) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    if n == 1 {
        copy_step(&mut s, sh.reg(BufId::Recv, 0, count), sh.reg(BufId::Send, 0, count));
        return s;
    }
    let pos = (sh.rank + n - root) % n;
    let nseg = ceil_div(count, sh.seg);
    let seg_len = |t: usize| sh.seg.min(count - t * sh.seg);
    let seg = |t: usize, buf: BufId| sh.reg(buf, t * sh.seg, seg_len(t));
    let up = sh.prev();
    let down = sh.next();
    if pos == n - 1 {
        for t in 0..nseg {
            s.push(Action::Send { peer: up, src: seg(t, BufId::Send) });
            s.end_step();
        }
    } else if pos == 0 {
        for t in 0..nseg {
            s.push(Action::RecvReduce { peer: down, dst: seg(t, BufId::Recv), local: seg(t, BufId::Send) });
            s.end_step();
        }
        if avg {
            s.push(Action::Scale { dst: sh.reg(BufId::Recv, 0, count) });
            s.end_step();
        }
    } else {
        let slot_elems = sh.seg.min(count);
        s.scratch_bytes = 2 * slot_elems * sh.es;
        let slot = |t: usize| sh.reg(BufId::Scratch, (t % 2) * slot_elems, seg_len(t));
        for t in 0..=nseg {
            if t < nseg {
                s.push(Action::RecvReduce { peer: down, dst: slot(t), local: seg(t, BufId::Send) });
            }
            if t >= 1 {
                s.push(Action::Send { peer: up, src: slot(t - 1) });
            }
            s.end_step();
        }
    }
    s
}

/// Hierarchical all-gather over hosts (`hosts` as for [`all_reduce_hier`]; each host's first
/// rank is its head). Stage 1: every rank sends its block to its head. Stage 2: the heads pass
/// the hosts' blocks round a ring (one message per block, so hosts need not hold contiguous
/// ranks): in step `s` head `h` forwards host `h-s`'s blocks and receives host `h-s-1`'s.
/// Stage 3: a pipelined chain broadcast of the whole output within each host. Only heads
/// talk across hosts, each host's data crossing each boundary once.
pub fn all_gather_hier(rank: usize, hosts: &[Vec<usize>], es: usize, seg: usize, count: usize) -> Schedule {
    let mut s = Schedule::new();
    if count == 0 {
        return s;
    }
    let Some((h, li)) = locate(hosts, rank) else { return s };
    let n: usize = hosts.iter().map(|g| g.len()).sum();
    let local = &hosts[h];
    let head = local[0];
    let block = |r: usize, buf: BufId| Region::elems(buf, r * count, count, es);
    // Stage 1: gather to the head.
    if li == 0 {
        s.push(Action::Copy { dst: block(rank, BufId::Recv), src: Region::elems(BufId::Send, 0, count, es) });
        for &r in &local[1..] {
            s.push(Action::Recv { peer: r, dst: block(r, BufId::Recv) });
        }
    } else {
        s.push(Action::Send { peer: head, src: Region::elems(BufId::Send, 0, count, es) });
    }
    s.end_step();
    // Stage 2: ring of heads.
    let nh = hosts.len();
    if li == 0 && nh > 1 {
        let next = hosts[(h + 1) % nh][0];
        let prev = hosts[(h + nh - 1) % nh][0];
        for step in 0..nh - 1 {
            let sg = (h + nh - step) % nh;
            let rg = (h + 2 * nh - step - 1) % nh;
            for &r in &hosts[sg] {
                s.push(Action::Send { peer: next, src: block(r, BufId::Recv) });
            }
            for &r in &hosts[rg] {
                s.push(Action::Recv { peer: prev, dst: block(r, BufId::Recv) });
            }
            s.end_step();
        }
    }
    // Stage 3: the whole output from the head to the host's other ranks.
    let lsh = Shape { rank: li, n: local.len(), es, seg };
    s.append(broadcast_chain(lsh, n * count, 0).map_buf(BufId::Send, BufId::Recv).map_peers(|p| local[p]));
    s
}

/// Ring all-gather: `count` elements per rank; block `k` of the output is rank `k`'s input.
/// In step `s` rank `r` forwards block `r-s` to `next` and receives block `r-s-1` from `prev`.
pub fn all_gather_ring(sh: Shape, count: usize) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    s.push(Action::Copy { dst: sh.reg(BufId::Recv, sh.rank * count, count), src: sh.reg(BufId::Send, 0, count) });
    if n == 1 {
        s.end_step();
        return s;
    }
    let nseg = ceil_div(count, sh.seg);
    pipelined(&mut s, nseg, n - 1, |s, j, step| {
        let off = j * sh.seg;
        let len = sh.seg.min(count - off);
        let sb = sh.rel(-(step as isize));
        let src = if step == 0 { sh.reg(BufId::Send, off, len) } else { sh.reg(BufId::Recv, sb * count + off, len) };
        s.push(Action::Send { peer: sh.next(), src });
        let rb = sh.rel(-(step as isize) - 1);
        s.push(Action::Recv { peer: sh.prev(), dst: sh.reg(BufId::Recv, rb * count + off, len) });
    });
    s
}

/// Ring reduce-scatter: input block `k` (`count` elements) is reduced across ranks into rank
/// `k`'s output. In step `s` rank `r` sends its partial of block `r-s-1` and folds block
/// `r-s-2` from `prev` into its own data; partials live in two scratch slots, and the last
/// step (block `r`) lands in the output.
pub fn reduce_scatter_ring(sh: Shape, count: usize, avg: bool) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    if count == 0 {
        return s;
    }
    let out = sh.reg(BufId::Recv, 0, count);
    if n == 1 {
        copy_step(&mut s, out, sh.reg(BufId::Send, 0, count));
        return s;
    }
    if n > 2 {
        s.scratch_bytes = 2 * count * sh.es;
    }
    let nseg = ceil_div(count, sh.seg);
    pipelined(&mut s, nseg, n - 1, |s, j, step| {
        let off = j * sh.seg;
        let len = sh.seg.min(count - off);
        let slot = |st: usize| sh.reg(BufId::Scratch, (st % 2) * count + off, len);
        let sb = sh.rel(-(step as isize) - 1);
        let src = if step == 0 { sh.reg(BufId::Send, sb * count + off, len) } else { slot(step - 1) };
        s.push(Action::Send { peer: sh.next(), src });
        let rb = sh.rel(-(step as isize) - 2);
        let dst = if step == n - 2 { sh.reg(BufId::Recv, off, len) } else { slot(step) };
        s.push(Action::RecvReduce { peer: sh.prev(), dst, local: sh.reg(BufId::Send, rb * count + off, len) });
    });
    if avg {
        s.push(Action::Scale { dst: out });
        s.end_step();
    }
    s
}

/// Pairwise all-to-all(v): block `k` of the input goes to rank `k`, block `k` of the output
/// comes from rank `k`; counts are per peer, blocks packed in rank order. Exchanges are posted
/// in the order `r+1, r+2, ...` (sends) and `r-1, r-2, ...` (receives), all in one step, so
/// every pair matches in order. With `send_empty`, zero-length blocks still travel (so a
/// count mismatch between two ranks is detected instead of waited on).
pub fn all_to_all_pairwise(
    sh: Shape,
    send_counts: &[usize],
    recv_counts: &[usize],
    send_empty: bool,
    src_buf: BufId,
) -> Schedule {
    let mut s = Schedule::new();
    let n = sh.n;
    let offs = |c: &[usize]| {
        let mut o = Vec::with_capacity(n);
        let mut acc = 0;
        for &x in c {
            o.push(acc);
            acc += x;
        }
        o
    };
    let (so, ro) = (offs(send_counts), offs(recv_counts));
    let r = sh.rank;
    if send_counts[r] > 0 {
        s.push(Action::Copy {
            dst: sh.reg(BufId::Recv, ro[r], recv_counts[r]),
            src: sh.reg(src_buf, so[r], send_counts[r]),
        });
    }
    for k in 1..n {
        let to = sh.rel(k as isize);
        let from = sh.rel(-(k as isize));
        if send_empty || send_counts[to] > 0 {
            s.push(Action::Send { peer: to, src: sh.reg(src_buf, so[to], send_counts[to]) });
        }
        if send_empty || recv_counts[from] > 0 {
            s.push(Action::Recv { peer: from, dst: sh.reg(BufId::Recv, ro[from], recv_counts[from]) });
        }
    }
    s.end_step();
    s
}

/// One point-to-point operation of a group (as `ncclGroupStart/End` batches them): a send
/// to or a receive from `peer` of `len` bytes at absolute address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pOp {
    /// The other rank.
    pub peer: usize,
    /// A send (else a receive).
    pub send: bool,
    /// The buffer's address ([`BufId::Abs`]).
    pub addr: usize,
    /// Its length in bytes.
    pub len: usize,
}

/// A group of sends and receives as one step: messages to `rank` itself become local copies,
/// its sends matched to its receives in posting order; the others are posted in the order
/// given (each link keeps that order).
pub fn group(rank: usize, ops: &[P2pOp]) -> Schedule {
    let mut s = Schedule::new();
    let reg = |p: &P2pOp| Region { buf: BufId::Abs, off: p.addr, len: p.len };
    let self_sends = ops.iter().filter(|p| p.peer == rank && p.send);
    let self_recvs = ops.iter().filter(|p| p.peer == rank && !p.send);
    for (a, b) in self_sends.zip(self_recvs) {
        s.push(Action::Copy { dst: reg(b), src: reg(a) });
    }
    for p in ops.iter().filter(|p| p.peer != rank) {
        s.push(if p.send {
            Action::Send { peer: p.peer, src: reg(p) }
        } else {
            Action::Recv { peer: p.peer, dst: reg(p) }
        });
    }
    s.end_step();
    s
}

/// Dissemination barrier: in round `k` (distance `d = 2^k`) send an empty message to `r+d`
/// and wait for one from `r-d`; after `ceil(log2 n)` rounds everyone has heard from everyone.
pub fn barrier(sh: Shape) -> Schedule {
    let mut s = Schedule::new();
    let mut d = 1;
    while d < sh.n {
        s.push(Action::Send { peer: sh.rel(d as isize), src: Region { buf: BufId::Send, off: 0, len: 0 } });
        s.push(Action::Recv { peer: sh.rel(-(d as isize)), dst: Region { buf: BufId::Recv, off: 0, len: 0 } });
        s.end_step();
        d <<= 1;
    }
    s
}
