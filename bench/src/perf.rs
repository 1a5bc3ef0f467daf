//! `oxccl perf`: nccl-tests for OxCCL. One rank per process; rank 0 prints.

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use oxccl::{Communicator, DataType, Element, ReduceOp, Result, TrafficClass};
use oxccl_core::half::{bf16, f16};

/// The operations `oxccl perf` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum PerfOp {
    /// all_reduce (busbw = algbw * 2(n-1)/n)
    AllReduce,
    /// broadcast from root (busbw = algbw)
    Broadcast,
    /// reduce to root (busbw = algbw)
    Reduce,
    /// all_gather (size = the gathered buffer; busbw = algbw * (n-1)/n)
    AllGather,
    /// reduce_scatter (size = the input buffer; busbw = algbw * (n-1)/n)
    ReduceScatter,
    /// all_to_all (size = the per-rank buffer; busbw = algbw * (n-1)/n)
    AllToAll,
    /// every rank sends to rank+1 and receives from rank-1 (busbw = algbw)
    Sendrecv,
    /// expert-parallel MoE dispatch and combine (all_to_all_v; --tokens, --hidden, --topk,
    /// --experts, --zipf set the shape; sizes are not used)
    Ep,
}

/// Options, as nccl-tests spells them.
#[derive(Debug, Clone, Args)]
pub struct PerfArgs {
    /// Operation to measure.
    #[arg(value_enum)]
    pub op: PerfOp,
    /// Smallest size in bytes (K, M, G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "8", value_parser = parse_size)]
    pub minbytes: usize,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "128M", value_parser = parse_size)]
    pub maxbytes: usize,
    /// Multiply the size by this factor between rows.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2, conflicts_with = "stepbytes",
          value_parser = crate::perf::at_least::<2>)]
    pub stepfactor: usize,
    /// Add this many bytes between rows instead.
    #[arg(short = 'i', long = "stepbytes", value_parser = parse_size)]
    pub stepbytes: Option<usize>,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20,
          value_parser = crate::perf::at_least::<1>)]
    pub iters: usize,
    /// Warm-up iterations per size.
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    pub warmup: usize,
    /// Before the first row, run its operation for at least this many milliseconds (links
    /// made, pages touched, clocks up), so the first row is not an outlier.
    #[arg(long = "warmup_ms", default_value_t = 100)]
    pub warmup_ms: u64,
    /// Run the whole sweep this many times, printing each.
    #[arg(short = 'N', long = "run_cycles", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub cycles: u64,
    /// Check results (1) or not (0).
    #[arg(short = 'c', long = "check", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub check: u8,
    /// Data type: float, double, half, bfloat16, int8, uint8, int32, uint32, int64, uint64.
    #[arg(short = 'd', long = "datatype", default_value = "float")]
    pub dtype: String,
    /// Reduction: sum, prod, min, max, avg.
    #[arg(short = 'o', long = "op", default_value = "sum")]
    pub redop: String,
    /// Root rank of broadcast and reduce.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub root: usize,
    /// broadcast: from several roots that hold the same data (broadcast_from_roots: each
    /// root sends its own stripes, the receivers relay them), e.g. 0,1; replaces -r.
    #[arg(long, value_delimiter = ',', value_name = "RANKS")]
    pub roots: Option<Vec<usize>>,
    /// Launch this many local ranks (ignored when started by a launcher).
    #[arg(long = "ranks", default_value_t = 1,
          value_parser = crate::perf::at_least::<1>)]
    pub ranks: usize,
    /// With --ranks: bind each rank to a core of its own (core) or not (none), as `oxccl
    /// launch --bind` does.
    #[arg(long, value_enum, default_value_t = crate::bind::Bind::Core)]
    pub bind: crate::bind::Bind,
    /// Run in place (all_reduce, broadcast, reduce; the others always run out of place).
    #[arg(long = "in-place")]
    pub in_place: bool,
    /// Print CSV instead of the table.
    #[arg(long)]
    pub csv: bool,
    /// Where the buffers live: host memory, or GPU 0's memory (a build with the cuda
    /// feature and a GPU; the calls take device buffers and return once done).
    #[arg(long, value_enum, default_value_t = Memory::Host)]
    pub memory: Memory,
    /// The API the operations go through: OxCCL's Rust calls, or the NCCL C ABI of
    /// liboxccl_nccl (its exported functions, called as a C program calls them).
    #[arg(long, value_enum, default_value_t = Api::Rust)]
    pub api: Api,
    /// Traffic class of the measured operations (a communicator of that class, split from
    /// the command's): gradient, expert_all_to_all, pipeline_stage, weight_refit, bulk.
    #[arg(long, value_parser = parse_class)]
    pub class: Option<TrafficClass>,
    /// Background traffic while the sweep runs, on a communicator of its own in the same
    /// processes: CLASS:OP:SIZE, OP one of broadcast (from rank 0), all_reduce, sendrecv
    /// (e.g. weight_refit:broadcast:64M, bulk:sendrecv:16M); a broadcast may name its roots
    /// after one more colon (weight_refit:broadcast:1G:0,1: broadcast_from_roots). It runs
    /// until the sweep ends.
    #[arg(long, value_parser = parse_load)]
    pub load: Option<Load>,
    /// Also draw the rows to this SVG file: bus bandwidth against size (for sendrecv, the
    /// latency percentiles), one line per cycle (-N) and per API (--api both).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// ep: tokens per rank (several values: one row each, e.g. 128,1024,4096).
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    pub tokens: Vec<usize>,
    /// ep: elements per token (the model's hidden size).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    /// ep: experts each token goes to.
    #[arg(long, default_value_t = 2)]
    pub topk: usize,
    /// ep: experts in all (default: 8 per rank).
    #[arg(long)]
    pub experts: Option<usize>,
    /// ep: popularity skew: expert e is chosen with weight 1/(e+1)^zipf (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// ep: seed of the experts chosen (they change at every step).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// ep: how the dispatch learns its counts: counts (an all_to_all of the counts, then
    /// all_to_all_v), dynamic (all_to_all_v_dynamic: the counts travel with the tokens, one
    /// exchange), or auto (dynamic when one rank can send another at most 64 KiB a step).
    #[arg(long, value_enum, default_value_t = Dispatch::Auto)]
    pub dispatch: Dispatch,
    /// broadcast: send only what changed (broadcast_delta), this fraction of the elements
    /// changing between two versions (e.g. 0.01); the row's bandwidth counts the whole
    /// buffer, as a refit does.
    #[arg(long, value_parser = parse_fraction)]
    pub delta: Option<f64>,
}

fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction from 0 to 1")),
    }
}

/// Background traffic of `oxccl perf --load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Its traffic class.
    pub class: TrafficClass,
    /// Its operation (broadcast, all_reduce or sendrecv).
    pub op: PerfOp,
    /// Bytes per operation.
    pub bytes: usize,
    /// A broadcast's roots (more than one: broadcast_from_roots).
    pub roots: Vec<usize>,
}

fn parse_class(s: &str) -> std::result::Result<TrafficClass, String> {
    TrafficClass::parse(s).ok_or_else(|| {
        format!("'{s}' is not a traffic class (gradient, expert_all_to_all, pipeline_stage, weight_refit, bulk)")
    })
}

fn parse_load(s: &str) -> std::result::Result<Load, String> {
    let bad = || format!("'{s}' is not CLASS:OP:SIZE[:ROOTS] (e.g. weight_refit:broadcast:64M)");
    let mut it = s.split(':');
    let (Some(c), Some(o), Some(z), r, None) = (it.next(), it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    let class = parse_class(c)?;
    let op = match o {
        "broadcast" => PerfOp::Broadcast,
        "all_reduce" => PerfOp::AllReduce,
        "sendrecv" => PerfOp::Sendrecv,
        _ => return Err(format!("--load: operation '{o}' is not broadcast, all_reduce or sendrecv")),
    };
    let bytes = parse_size(z)?;
    if bytes < 4 {
        return Err(format!("--load: {bytes} bytes is less than one float"));
    }
    let roots = match r {
        None => vec![0],
        Some(_) if op != PerfOp::Broadcast => return Err(format!("--load: only a broadcast has roots ('{s}')")),
        Some(r) => r
            .split(',')
            .map(|x| x.trim().parse::<usize>().map_err(|_| format!("--load: '{r}' is not a list of ranks such as 0,1")))
            .collect::<std::result::Result<Vec<_>, _>>()?,
    };
    Ok(Load { class, op, bytes, roots })
}

/// How `oxccl perf ep` dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dispatch {
    /// dynamic for small per-peer messages (at most 64 KiB), else counts.
    Auto,
    /// An all_to_all of the counts, then all_to_all_v.
    Counts,
    /// all_to_all_v_dynamic: the counts travel with the tokens.
    Dynamic,
}

/// Where `oxccl perf`'s buffers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Memory {
    /// Host memory.
    Host,
    /// GPU 0's memory.
    Gpu,
}

/// The API `oxccl perf` measures through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// oxccl's Rust API.
    Rust,
    /// The NCCL-compatible C ABI (ncclAllReduce, ...), on a communicator made by
    /// ncclCommInitRank from an id rank 0 got from ncclGetUniqueId.
    Nccl,
    /// Both, side by side on the same communicator (the one the C ABI made): each size
    /// through the Rust API then the C ABI, a row each (the last column says which), so
    /// that the rows differ by the API alone.
    Both,
}

impl PerfArgs {
    /// What clap cannot check alone: the sizes give at least one row.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.minbytes > self.maxbytes {
            return Err(format!(
                "-b/--minbytes {} is larger than -e/--maxbytes {}: no size to measure",
                self.minbytes, self.maxbytes
            ));
        }
        if self.stepbytes == Some(0) {
            return Err("-i/--stepbytes 0 would measure one size forever; give a positive step".into());
        }
        if self.delta.is_some() && (self.op != PerfOp::Broadcast || self.api != Api::Rust) {
            return Err("--delta measures broadcast through the Rust API only".into());
        }
        if let Some(r) = &self.roots {
            if self.op != PerfOp::Broadcast || self.api != Api::Rust || self.delta.is_some() {
                return Err("--roots measures broadcast (not --delta) through the Rust API only".into());
            }
            if r.is_empty() {
                return Err("--roots needs at least one rank, e.g. --roots 0,1".into());
            }
        }
        Ok(())
    }

    /// The rank whose data every broadcast receiver checks against: the root, or the first
    /// of the roots (they all hold the same data).
    fn data_root(&self) -> usize {
        self.roots.as_ref().and_then(|r| r.first().copied()).unwrap_or(self.root)
    }

    fn is_root(&self, rank: usize) -> bool {
        match &self.roots {
            Some(r) => r.contains(&rank),
            None => rank == self.root,
        }
    }
}

/// A whole number of at least `MIN` (clap parser: says so, instead of quoting a range).
pub fn at_least<const MIN: usize>(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= MIN => Ok(v),
        _ => Err(format!("expected a whole number of at least {MIN}")),
    }
}

fn parse_size(s: &str) -> std::result::Result<usize, String> {
    oxccl_core::config::parse_size(s).ok_or_else(|| format!("'{s}' is not a size (e.g. 8, 64K, 128M, 1G)"))
}

impl PerfOp {
    /// Whether its rows give latency percentiles (the pipeline-stage link: sendrecv).
    fn latencies(self) -> bool {
        self == PerfOp::Sendrecv
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            PerfOp::AllReduce => "all_reduce",
            PerfOp::Broadcast => "broadcast",
            PerfOp::Reduce => "reduce",
            PerfOp::AllGather => "all_gather",
            PerfOp::ReduceScatter => "reduce_scatter",
            PerfOp::AllToAll => "all_to_all",
            PerfOp::Sendrecv => "sendrecv",
            PerfOp::Ep => "ep",
        }
    }
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            PerfOp::AllReduce => 2.0 * (n - 1.0) / n,
            PerfOp::AllGather | PerfOp::ReduceScatter | PerfOp::AllToAll => (n - 1.0) / n,
            PerfOp::Broadcast | PerfOp::Reduce | PerfOp::Sendrecv | PerfOp::Ep => 1.0,
        }
    }
    fn reduces(self) -> bool {
        matches!(self, PerfOp::AllReduce | PerfOp::Reduce | PerfOp::ReduceScatter)
    }
    fn rooted(self) -> bool {
        matches!(self, PerfOp::Broadcast | PerfOp::Reduce)
    }
}

/// Test values: small integers, so float sums and products are exact and checks can be.
trait Val: Element {
    fn from_i64(v: i64) -> Self;
    fn to_f64(self) -> f64;
    fn float() -> bool;
}
macro_rules! val_int {
    ($($t:ty),*) => {$(impl Val for $t {
        fn from_i64(v: i64) -> Self { v as $t }
        fn to_f64(self) -> f64 { self as f64 }
        fn float() -> bool { false }
    })*};
}
val_int!(i8, u8, i32, u32, i64, u64);
impl Val for f32 {
    fn from_i64(v: i64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn float() -> bool {
        true
    }
}
impl Val for f64 {
    fn from_i64(v: i64) -> Self {
        v as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn float() -> bool {
        true
    }
}
impl Val for f16 {
    fn from_i64(v: i64) -> Self {
        f16::from_f64(v as f64)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn float() -> bool {
        true
    }
}
impl Val for bf16 {
    fn from_i64(v: i64) -> Self {
        bf16::from_f64(v as f64)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn float() -> bool {
        true
    }
}

fn value(op: ReduceOp, rank: usize, i: usize) -> i64 {
    let k = (i * 7 + rank * 3) % 11;
    match op {
        ReduceOp::Prod => [1, 1, 2, 1, -1, 1, 1, 1, -1, 1, 1][k],
        _ => k as i64 - 5,
    }
}

/// The expected element: `op` over ranks of `v(rank)`, rounded/wrapped as type `T`.
fn expected<T: Val>(op: ReduceOp, n: usize, v: impl Fn(usize) -> i64) -> T {
    let xs = (0..n).map(&v);
    let r: i64 = match op {
        ReduceOp::Sum | ReduceOp::Avg => xs.fold(0i64, |a, b| a.wrapping_add(b)),
        ReduceOp::Prod => xs.fold(1i64, |a, b| a.wrapping_mul(b)),
        ReduceOp::Min => xs.min().unwrap_or(0),
        ReduceOp::Max => xs.max().unwrap_or(0),
    };
    if op == ReduceOp::Avg {
        return T::from_i64(0); // compared separately (see `matches`)
    }
    T::from_i64(r)
}

fn matches<T: Val>(op: ReduceOp, n: usize, got: T, v: impl Fn(usize) -> i64) -> bool {
    if op == ReduceOp::Avg {
        let sum: i64 = (0..n).map(v).sum();
        let want = sum as f64 / n as f64;
        // One rounding of the type (at most 2^-8 relative for bf16) on an exact sum.
        return (got.to_f64() - want).abs() <= want.abs() * 2f64.powi(-7) + 1e-12;
    }
    if T::float() {
        got.to_f64() == expected::<T>(op, n, v).to_f64()
    } else {
        got == expected::<T>(op, n, v)
    }
}

struct Row {
    bytes: usize,
    count: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: u64,
    /// p50, p99, p99.9 of one iteration, in microseconds (sendrecv).
    lat: Option<[f64; 3]>,
}

/// Runs the whole sweep on this rank; returns the number of wrong elements seen by any rank.
pub fn run(comm: &Communicator, a: &PerfArgs) -> Result<u64> {
    let dtype: DataType = a.dtype.parse()?;
    if a.op == PerfOp::Ep {
        macro_rules! ep {
            ($($d:ident => $t:ty),*) => {
                match dtype { $(DataType::$d => run_ep::<$t>(comm, a),)* }
            };
        }
        return ep!(F32 => f32, F64 => f64, F16 => f16, Bf16 => bf16, I8 => i8, U8 => u8, I32 => i32, U32 => u32, I64 => i64, U64 => u64);
    }
    let op: ReduceOp = a.redop.parse()?;
    macro_rules! go {
        ($($d:ident => $t:ty),*) => {
            match dtype { $(DataType::$d => sweep::<$t>(comm, a, op),)* }
        };
    }
    go!(F32 => f32, F64 => f64, F16 => f16, Bf16 => bf16, I8 => i8, U8 => u8, I32 => i32, U32 => u32, I64 => i64, U64 => u64)
}

fn sweep<T: Val>(comm: &Communicator, a: &PerfArgs, op: ReduceOp) -> Result<u64> {
    // The measured operations' communicator: the command's, or one of --class.
    let classed = match a.class {
        Some(c) => comm.split_with_class(Some(0), comm.rank() as i64, c)?,
        None => None,
    };
    let measured = classed.as_ref().unwrap_or(comm);
    if let Some(bad) =
        a.roots.iter().chain(a.load.as_ref().map(|l| &l.roots)).flatten().find(|&&r| r >= comm.world_size())
    {
        return Err(oxccl::Error::invalid_arg(format!("root {bad} is out of range for {} ranks", comm.world_size())));
    }
    let background = match &a.load {
        Some(l) => Some(Background::start(comm, l.clone())?),
        None => None,
    };
    let nccl = match a.api {
        Api::Rust => None,
        Api::Nccl | Api::Both => Some(crate::nccl_api::NcclComm::new(comm)?),
    };
    let nccl = nccl.as_ref();
    // The APIs each row is measured through, in turn.
    let apis: Vec<Via<'_>> = match (a.api, nccl) {
        (Api::Nccl, Some(nc)) => vec![Via::Nccl(nc)],
        (Api::Both, Some(nc)) => vec![Via::Rust(nc.communicator()), Via::Nccl(nc)],
        _ => vec![Via::Rust(measured)],
    };
    let both = a.api == Api::Both;
    let lat_cols = a.op.latencies();
    let n = comm.world_size();
    let es = std::mem::size_of::<T>();
    if a.op.reduces() {
        op.check(T::DTYPE)?;
    }
    if a.op.rooted() && a.root >= n {
        return Err(oxccl::Error::invalid_arg(format!("root {} is out of range for {n} ranks", a.root)));
    }
    if sizes(a, es).next().is_none() {
        return Err(oxccl::Error::invalid_arg(format!(
            "-e/--maxbytes {} is smaller than one {} element ({es} bytes): no size to measure",
            a.maxbytes,
            T::DTYPE.name()
        )));
    }
    let me = comm.rank() == 0;
    let redop = if a.op.reduces() { op.name() } else { "none" };
    let root: i64 = if a.op.rooted() { a.root as i64 } else { -1 };
    if me {
        // The transports rank 0 reaches its peers with (or will, links being made on first use).
        let mut kinds: Vec<&str> = comm.explain().peers.iter().filter_map(|p| p.transport).map(|k| k.name()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let links = kinds.join(" + ");
        if a.csv {
            println!(
                "op,ranks,size_bytes,count,type,redop,root,time_us,algbw_gbs,busbw_gbs,wrong{}{}",
                if lat_cols { ",p50_us,p99_us,p999_us" } else { "" },
                if both { ",api" } else { "" }
            );
        } else {
            println!(
                "# oxccl perf {}: {n} ranks ({}), {} {redop}, {} .. {} bytes, {} iters, {} warm-up{}, check {}{}{}",
                a.op.name(),
                if n > 1 { links.as_str() } else { "no links" },
                T::DTYPE.name(),
                a.minbytes,
                a.maxbytes,
                a.iters,
                a.warmup,
                if a.warmup_ms > 0 { format!(" (first row: {} ms more)", a.warmup_ms) } else { String::new() },
                if a.check != 0 { "on" } else { "off" },
                if a.in_place { ", in place" } else { "" },
                match a.api {
                    Api::Rust => "",
                    Api::Nccl => ", through the NCCL C ABI",
                    Api::Both => ", through the Rust API and the NCCL C ABI in turn",
                }
            );
            if a.class.is_some() || a.load.is_some() {
                println!(
                    "# class {}{}",
                    measured.class().name(),
                    a.load.as_ref().map_or(String::new(), |l| format!(
                        "; alongside: {} {}{} of {} bytes, repeated (its class share: OXCCL_CLASS_SHARE)",
                        l.class.name(),
                        l.op.name(),
                        if l.roots.len() > 1 { format!(" from roots {:?}", l.roots) } else { String::new() },
                        l.bytes
                    ))
                );
            }
            if let Some(roots) = &a.roots {
                // What the striped broadcast does with these roots, for the largest size.
                let plan = measured.plan_broadcast_from_roots(a.maxbytes / es, roots)?;
                print!(
                    "#{}",
                    oxccl::describe_striped(&plan, &measured.explain().hosts, "the largest size")
                        .replace('\n', "\n#")
                        .trim_end_matches('#')
                );
            }
            println!(
                "#{:>12} {:>12} {:>9} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}{}{}",
                "size",
                "count",
                "type",
                "redop",
                "root",
                "time",
                "algbw",
                "busbw",
                "#wrong",
                if lat_cols { format!(" {:>9} {:>9} {:>9}", "p50", "p99", "p99.9") } else { String::new() },
                if both { "  api" } else { "" }
            );
            println!(
                "#{:>12} {:>12} {:>9} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}{}",
                "(B)",
                "(elements)",
                "",
                "",
                "",
                "(us)",
                "(GB/s)",
                "(GB/s)",
                "",
                if lat_cols { format!(" {:>9} {:>9} {:>9}", "(us)", "(us)", "(us)") } else { String::new() }
            );
            if lat_cols && a.iters < 1000 {
                println!("# p99.9 needs at least 1000 iterations (-n); with {} it is the slowest one", a.iters);
            }
        }
    }
    let mut busbw_sum = 0.0;
    let mut rows = 0;
    // What --plot draws: the rows of each cycle.
    let mut drawn: Vec<(String, Vec<crate::plot::CsvRow>)> = Vec::new();
    let mut total_wrong = 0u64;
    // Each API's communicator gets the first row's warm-up.
    let mut warm = vec![Duration::from_millis(a.warmup_ms); apis.len()];
    let rows_of = (0..a.cycles).flat_map(|c| sizes(a, es).enumerate().map(move |(i, b)| (c, i, b)));
    // With both APIs, odd cycles take them in the other order (neither always goes second).
    let order = |c: u64| -> Vec<(usize, Via<'_>)> {
        let mut v: Vec<(usize, Via<'_>)> = apis.iter().copied().enumerate().collect();
        if c % 2 == 1 {
            v.reverse();
        }
        v
    };
    for ((cycle, row, bytes), (k, via)) in rows_of.flat_map(|r| order(r.0).into_iter().map(move |v| (r, v))) {
        if me && !a.csv && a.cycles > 1 && row == 0 && k == 0 {
            println!("# cycle {} of {}", cycle + 1, a.cycles);
        }
        let label = match (both, via) {
            (false, _) => "",
            (true, Via::Rust(_)) => "rust",
            (true, Via::Nccl(_)) => "nccl",
        };
        let row = match a.delta {
            Some(f) => measure_delta::<T>(comm, a, f, bytes)?,
            None => measure::<T>(comm, via, a, op, bytes, std::mem::take(&mut warm[k]))?,
        };
        total_wrong += row.wrong;
        busbw_sum += row.busbw;
        rows += 1;
        if me && a.plot.is_some() {
            let run = if a.cycles > 1 { format!("cycle {}", cycle + 1) } else { a.op.name().to_string() };
            if drawn.last().is_none_or(|(r, _)| *r != run) {
                drawn.push((run, Vec::new()));
            }
            if let Some((_, v)) = drawn.last_mut() {
                v.push(crate::plot::CsvRow {
                    op: a.op.name().into(),
                    bytes: row.bytes as f64,
                    busbw: row.busbw,
                    lat: row.lat,
                    api: both.then(|| label.to_string()),
                });
            }
        }
        if me {
            if a.csv {
                println!(
                    "{},{n},{},{},{},{redop},{root},{:.3},{:.3},{:.3},{}{}{}{label}",
                    a.op.name(),
                    row.bytes,
                    row.count,
                    T::DTYPE.name(),
                    row.time_us,
                    row.algbw,
                    row.busbw,
                    row.wrong,
                    row.lat.map_or(String::new(), |l| format!(",{:.3},{:.3},{:.3}", l[0], l[1], l[2])),
                    if both { "," } else { "" }
                );
            } else {
                println!(
                    " {:>12} {:>12} {:>9} {:>6} {:>5} {:>10.2} {:>8.2} {:>8.2} {:>7}{}{}",
                    row.bytes,
                    row.count,
                    T::DTYPE.name(),
                    redop,
                    root,
                    row.time_us,
                    row.algbw,
                    row.busbw,
                    if a.check != 0 { row.wrong.to_string() } else { "N/A".into() },
                    row.lat.map_or(String::new(), |l| format!(" {:>9.2} {:>9.2} {:>9.2}", l[0], l[1], l[2])),
                    if both { format!("  {label}") } else { String::new() }
                );
            }
        }
    }
    if me && !a.csv {
        println!("# Out of bounds values : {total_wrong} {}", if total_wrong == 0 { "OK" } else { "FAILED" });
        println!("# Avg bus bandwidth    : {:.3}", if rows > 0 { busbw_sum / rows as f64 } else { 0.0 });
    }
    if let (true, Some(path)) = (me, &a.plot) {
        let (lines, latency) = crate::plot::series_of(&drawn);
        let title = format!("oxccl perf {}: {n} ranks, {}", a.op.name(), T::DTYPE.name());
        crate::plot::draw(path, &title, &lines, latency).map_err(oxccl::Error::InvalidArgument)?;
        if !a.csv {
            println!("# Plot                 : {}", path.display());
        }
    }
    if let Some(b) = background {
        let (ops, secs) = b.stop(comm)?;
        if me && !a.csv {
            let l = b_load(a);
            println!(
                "# Load ({} {} of {} bytes, alongside): {ops} operations in {secs:.2} s, {:.3} GB/s",
                l.class.name(),
                l.op.name(),
                l.bytes,
                (ops as f64 * l.bytes as f64) / secs.max(1e-9) / 1e9
            );
        }
    }
    Ok(total_wrong)
}

fn b_load(a: &PerfArgs) -> &Load {
    a.load.as_ref().expect("a background load was started")
}

/// `--load`: an operation repeated on a communicator of its own, on a thread, while the
/// sweep runs.
struct Background {
    comm: std::sync::Arc<Communicator>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
    started: Instant,
}

impl Background {
    fn start(comm: &Communicator, l: Load) -> Result<Background> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let c = comm
            .split_with_class(Some(0), comm.rank() as i64, l.class)?
            .ok_or_else(|| oxccl::Error::Internal("every rank takes part in the load's split".into()))?;
        let c = Arc::new(c);
        let stop = Arc::new(AtomicBool::new(false));
        let (lc, ls) = (c.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("oxccl-perf-load".into())
            .spawn(move || {
                let (n, r) = (lc.world_size(), lc.rank());
                let mut buf = vec![1f32; l.bytes / 4];
                let mut other = vec![0f32; l.bytes / 4];
                let mut ops = 0u64;
                loop {
                    // Every rank stops at the same iteration: a one-byte max of the flags.
                    let mut flag = [u8::from(ls.load(Ordering::Relaxed))];
                    if lc.all_reduce_in_place(&mut flag, ReduceOp::Max).is_err() || flag[0] == 1 {
                        break;
                    }
                    let done = match l.op {
                        PerfOp::Broadcast if l.roots.len() > 1 => lc.broadcast_from_roots_in_place(&mut buf, &l.roots),
                        PerfOp::Broadcast => lc.broadcast_in_place(&mut buf, l.roots[0]),
                        PerfOp::AllReduce => lc.all_reduce_in_place(&mut buf, ReduceOp::Max),
                        _ => {
                            let mut g = lc.group();
                            g.send(&buf, (r + 1) % n)
                                .and_then(|g| g.recv(&mut other, (r + n - 1) % n))
                                .map(|_| ())
                                .and_then(|_| g.run())
                        }
                    };
                    if done.is_err() {
                        break;
                    }
                    ops += 1;
                }
                ops
            })
            .map_err(|e| oxccl::Error::Internal(format!("cannot start the load's thread: {e}")))?;
        Ok(Background { comm: c, stop, thread, started: Instant::now() })
    }

    /// Stops it once every rank has finished measuring (the ranks agree on the last
    /// iteration): operations done and seconds taken.
    fn stop(self, comm: &Communicator) -> Result<(u64, f64)> {
        comm.barrier()?;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ops = self.thread.join().map_err(|_| oxccl::Error::Internal("the load's thread panicked".into()))?;
        let secs = self.started.elapsed().as_secs_f64();
        let _ = self.comm.close();
        Ok((ops, secs))
    }
}

/// What a row's operations go through. (Barriers and the timing's reductions always use
/// the command's own communicator.)
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    /// The Rust API, on this communicator.
    Rust(&'a Communicator),
    /// The NCCL C ABI.
    Nccl(&'a crate::nccl_api::NcclComm),
}

/// `oxccl perf ep`: one row per --tokens value.
fn run_ep<T: Val + Default>(comm: &Communicator, a: &PerfArgs) -> Result<u64> {
    let n = comm.world_size();
    let experts = a.experts.unwrap_or(8 * n);
    if experts == 0 || a.topk == 0 || a.hidden == 0 || a.tokens.is_empty() || a.tokens.contains(&0) {
        return Err(oxccl::Error::invalid_arg("ep: --tokens, --hidden, --topk and --experts must be at least 1"));
    }
    if !(0.0..=10.0).contains(&a.zipf) {
        return Err(oxccl::Error::invalid_arg(format!("ep: --zipf {} must be from 0 to 10", a.zipf)));
    }
    let me = comm.rank() == 0;
    if me {
        if a.csv {
            println!("op,ranks,tokens,hidden,topk,experts,zipf,type,step_us,dispatch_bytes,algbw_gbs,hottest,p50_us,p99_us,p999_us,wrong,dispatch");
        } else {
            println!(
                "# oxccl perf ep: {n} ranks, {} elements per token, top-{} of {experts} experts (zipf {}), {} steps, {} warm-up",
                T::DTYPE.name(),
                a.topk,
                a.zipf,
                a.iters,
                a.warmup
            );
            println!(
                "# a step: counts (all_to_all), dispatch and combine (all_to_all_v); with dispatch 'dynamic' the counts travel with the tokens (all_to_all_v_dynamic), then combine; the choices change every step"
            );
            println!(
                "#{:>8} {:>7} {:>9} {:>11} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}  dispatch",
                "tokens", "hidden", "type", "step", "dispatch", "algbw", "hottest", "p50", "p99", "p99.9", "#wrong"
            );
            println!(
                "#{:>8} {:>7} {:>9} {:>11} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}",
                "", "", "", "(us)", "(B/rank)", "(GB/s)", "(share)", "(us)", "(us)", "(us)", ""
            );
        }
    }
    let mut wrong = 0;
    for &tokens in &a.tokens {
        let mut shape = crate::ep::Shape {
            tokens,
            hidden: a.hidden,
            topk: a.topk,
            experts,
            zipf: a.zipf,
            seed: a.seed,
            dynamic: false,
        };
        shape.dynamic = match a.dispatch {
            Dispatch::Dynamic => true,
            Dispatch::Counts => false,
            Dispatch::Auto => shape.max_block_bytes(std::mem::size_of::<T>()) <= 64 << 10,
        };
        let r = crate::ep::measure::<T>(comm, &shape, a.iters, a.warmup, T::from_i64)?;
        wrong += r.wrong;
        if me {
            if a.csv {
                println!(
                    "ep,{n},{tokens},{},{},{experts},{},{},{:.3},{:.0},{:.3},{:.3},{:.3},{:.3},{:.3},{},{}",
                    a.hidden,
                    a.topk,
                    a.zipf,
                    T::DTYPE.name(),
                    r.step_us,
                    r.dispatch_bytes,
                    r.algbw,
                    r.hottest,
                    r.lat[0],
                    r.lat[1],
                    r.lat[2],
                    r.wrong,
                    if shape.dynamic { "dynamic" } else { "counts" }
                );
            } else {
                println!(
                    " {:>8} {:>7} {:>9} {:>11.2} {:>12.0} {:>8.2} {:>8.3} {:>9.2} {:>9.2} {:>9.2} {:>7}  {}",
                    tokens,
                    a.hidden,
                    T::DTYPE.name(),
                    r.step_us,
                    r.dispatch_bytes,
                    r.algbw,
                    r.hottest,
                    r.lat[0],
                    r.lat[1],
                    r.lat[2],
                    r.wrong,
                    if shape.dynamic { "dynamic" } else { "counts" }
                );
            }
        }
    }
    if me && !a.csv {
        println!("# Out of bounds values : {wrong} {}", if wrong == 0 { "OK" } else { "FAILED" });
    }
    Ok(wrong)
}

/// The sizes of one sweep, smallest first.
fn sizes(a: &PerfArgs, es: usize) -> impl Iterator<Item = usize> {
    let (max, step, factor) = (a.maxbytes, a.stepbytes, a.stepfactor);
    std::iter::successors(Some(a.minbytes.max(es)), move |&b| {
        let next = match step {
            Some(s) => b.saturating_add(s),
            None => b.saturating_mul(factor),
        };
        (next != b).then_some(next)
    })
    .take_while(move |&b| b <= max)
}

/// Runs `once` until every rank has run it for `at_least` (all ranks stop together: they
/// agree after every batch, of 8 operations below 1 MiB, else of 1, so a large first size
/// does not overshoot much).
fn warm_up(comm: &Communicator, at_least: Duration, bytes: usize, mut once: impl FnMut() -> Result<()>) -> Result<()> {
    let batch = if bytes < 1 << 20 { 8 } else { 1 };
    let t0 = Instant::now();
    loop {
        for _ in 0..batch {
            once()?;
        }
        let mut done = [u8::from(t0.elapsed() >= at_least)];
        comm.all_reduce_in_place(&mut done, ReduceOp::Min)?;
        if done[0] == 1 {
            return Ok(());
        }
    }
}

/// broadcast --delta: two versions that differ in `frac` of their elements; each iteration
/// the root sends the other one as a delta from the one the receivers hold.
fn measure_delta<T: Val>(comm: &Communicator, a: &PerfArgs, frac: f64, bytes: usize) -> Result<Row> {
    let (r, es) = (comm.rank(), std::mem::size_of::<T>());
    let count = bytes / es;
    let v0: Vec<T> = (0..count).map(|i| T::from_i64(value(ReduceOp::Sum, 0, i))).collect();
    // Changed elements spread evenly over the buffer.
    let changed = |i: usize| frac > 0.0 && ((i as f64 * frac).floor() != ((i + 1) as f64 * frac).floor());
    let v1: Vec<T> =
        (0..count).map(|i| if changed(i) { T::from_i64(value(ReduceOp::Sum, 1, i) + 17) } else { v0[i] }).collect();
    // The root keeps both versions and sends from one against the other (no copy in the
    // timed loop); the receivers keep one buffer, which turns into the version sent.
    let root = a.root;
    let mut versions = if r == root { vec![v0.clone(), v1.clone()] } else { Vec::new() };
    let mut buf = v0.clone();
    let mut held = 0usize; // the version the receivers hold
    let mut once = |buf: &mut Vec<T>| -> Result<()> {
        let next = 1 - held;
        if r == root {
            let (x, y) = versions.split_at_mut(1);
            let (cur, prev) = if next == 1 { (&mut y[0], &x[0]) } else { (&mut x[0], &y[0]) };
            comm.broadcast_delta(cur, prev, root)?;
        } else {
            comm.broadcast_delta(buf, &[], root)?;
        }
        held = next;
        Ok(())
    };
    for _ in 0..a.warmup {
        once(&mut buf)?;
    }
    comm.barrier()?;
    let t0 = Instant::now();
    for _ in 0..a.iters {
        once(&mut buf)?;
    }
    let mut t = [t0.elapsed().as_secs_f64() / a.iters.max(1) as f64];
    comm.all_reduce_in_place(&mut t, ReduceOp::Max)?;
    let want = if held == 1 { &v1 } else { &v0 };
    let got = if r == root { &versions[held] } else { &buf };
    let mut wrong = [if a.check != 0 { got.iter().zip(want).filter(|(x, y)| x != y).count() as u64 } else { 0 }];
    comm.all_reduce_in_place(&mut wrong, ReduceOp::Sum)?;
    let algbw = (count * es) as f64 / t[0] / 1e9;
    Ok(Row { bytes: count * es, count, time_us: t[0] * 1e6, algbw, busbw: algbw, wrong: wrong[0], lat: None })
}

fn measure<T: Val>(
    comm: &Communicator,
    via: Via<'_>,
    a: &PerfArgs,
    op: ReduceOp,
    bytes: usize,
    warm: Duration,
) -> Result<Row> {
    let n = comm.world_size();
    let r = comm.rank();
    let es = std::mem::size_of::<T>();
    // count = elements of the size the row names; per-rank blocks for the gather/scatter ops.
    let mut count = bytes / es;
    let block = match a.op {
        PerfOp::AllGather | PerfOp::ReduceScatter | PerfOp::AllToAll => {
            count -= count % n;
            count / n
        }
        _ => count,
    };
    let (slen, rlen) = match a.op {
        PerfOp::AllGather => (block, count),
        PerfOp::ReduceScatter => (count, block),
        _ => (count, count),
    };
    let vop = if a.op.reduces() { op } else { ReduceOp::Sum };
    // Broadcast roots all hold the root's data (with --roots, the first root's).
    let from = if a.op == PerfOp::Broadcast && a.is_root(r) { a.data_root() } else { r };
    let send: Vec<T> = (0..slen).map(|i| T::from_i64(value(vop, from, i))).collect();
    let mut recv: Vec<T> = vec![T::default(); rlen];
    let root = a.root;
    let once = |send: &[T], recv: &mut [T]| -> Result<()> {
        let comm = match via {
            Via::Nccl(nc) => return nc.call(a.op, a.in_place, send, recv, op, root),
            Via::Rust(c) => c,
        };
        match (a.op, a.in_place) {
            (PerfOp::AllReduce, false) => comm.all_reduce(send, recv, op),
            (PerfOp::AllReduce, true) => comm.all_reduce_in_place(recv, op),
            (PerfOp::Broadcast, false) => match &a.roots {
                Some(roots) => comm.broadcast_from_roots(send, recv, roots),
                None => comm.broadcast(send, recv, root),
            },
            (PerfOp::Broadcast, true) => match &a.roots {
                Some(roots) => comm.broadcast_from_roots_in_place(recv, roots),
                None => comm.broadcast_in_place(recv, root),
            },
            (PerfOp::Reduce, false) => comm.reduce(send, recv, op, root),
            (PerfOp::Reduce, true) => comm.reduce_in_place(recv, op, root),
            (PerfOp::AllGather, _) => comm.all_gather(send, recv),
            (PerfOp::ReduceScatter, _) => comm.reduce_scatter(send, recv, op),
            (PerfOp::AllToAll, _) => comm.all_to_all(send, recv),
            (PerfOp::Sendrecv, _) => {
                let mut g = comm.group();
                g.send(send, (r + 1) % n)?;
                g.recv(recv, (r + n - 1) % n)?;
                g.run()
            }
            (PerfOp::Ep, _) => Err(oxccl::Error::Internal("ep is measured by run_ep".into())),
        }
    };
    let in_place_input = a.in_place && matches!(a.op, PerfOp::AllReduce | PerfOp::Broadcast | PerfOp::Reduce);
    // GPU buffers: the same calls on device copies of `send` and `recv`.
    let gpu = if a.memory == Memory::Gpu { Some(gpu::Bufs::new(&send, &recv)?) } else { None };
    let once = |send: &[T], recv: &mut [T]| -> Result<()> {
        match &gpu {
            Some(g) => g.call(comm, a, op, T::DTYPE),
            None => once(send, recv),
        }
    };
    if !warm.is_zero() {
        warm_up(comm, warm, bytes, || once(&send, &mut recv))?;
    }
    for _ in 0..a.warmup {
        once(&send, &mut recv)?;
    }
    // sendrecv (pipeline-stage links) times each iteration too, for its latency percentiles.
    let per_iter = a.op.latencies();
    let mut samples: Vec<f64> = Vec::with_capacity(if per_iter { a.iters } else { 0 });
    comm.barrier()?;
    let t0 = Instant::now();
    if per_iter {
        let mut last = t0;
        for _ in 0..a.iters {
            once(&send, &mut recv)?;
            let now = Instant::now();
            samples.push(now.duration_since(last).as_secs_f64());
            last = now;
        }
    } else {
        for _ in 0..a.iters {
            once(&send, &mut recv)?;
        }
    }
    let mut t = [t0.elapsed().as_secs_f64() / a.iters.max(1) as f64];
    comm.all_reduce_in_place(&mut t, ReduceOp::Max)?;
    // Each rank's percentiles; the row gives the slowest rank's.
    let lat = if per_iter {
        let mut p = percentiles(&mut samples);
        comm.all_reduce_in_place(&mut p, ReduceOp::Max)?;
        Some(p.map(|x| x * 1e6))
    } else {
        None
    };
    let mut wrong = [0u64];
    if a.check != 0 {
        if in_place_input {
            recv.copy_from_slice(&send);
            if let Some(g) = &gpu {
                g.reset_recv(&recv);
            }
        }
        once(&send, &mut recv)?;
        if let Some(g) = &gpu {
            g.download(&mut recv);
        }
        wrong[0] = count_wrong(a, op, r, n, block, &recv);
        comm.all_reduce_in_place(&mut wrong, ReduceOp::Sum)?;
    }
    // Bandwidth of the bytes the row names as moved (count * size; 0 when the size does not
    // fill one element per rank).
    let algbw = (count * es) as f64 / t[0] / 1e9;
    Ok(Row {
        bytes: count * es,
        count,
        time_us: t[0] * 1e6,
        algbw,
        busbw: algbw * a.op.bus_factor(n),
        wrong: wrong[0],
        lat,
    })
}

/// p50, p99 and p99.9 of `samples` (nearest rank; with fewer than 1000 samples p99.9 is the
/// largest).
pub(crate) fn percentiles(samples: &mut [f64]) -> [f64; 3] {
    if samples.is_empty() {
        return [0.0; 3];
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    [at(0.5), at(0.99), at(0.999)]
}

fn count_wrong<T: Val>(a: &PerfArgs, op: ReduceOp, r: usize, n: usize, block: usize, recv: &[T]) -> u64 {
    let mut wrong = 0u64;
    let mut chk = |ok: bool| {
        if !ok {
            wrong += 1
        }
    };
    let sum = ReduceOp::Sum;
    match a.op {
        PerfOp::AllReduce => recv.iter().enumerate().for_each(|(i, g)| chk(matches(op, n, *g, |k| value(op, k, i)))),
        PerfOp::Reduce if r == a.root => {
            recv.iter().enumerate().for_each(|(i, g)| chk(matches(op, n, *g, |k| value(op, k, i))))
        }
        PerfOp::Reduce => {}
        PerfOp::Broadcast => {
            recv.iter().enumerate().for_each(|(i, g)| chk(*g == T::from_i64(value(sum, a.data_root(), i))))
        }
        PerfOp::AllGather => recv
            .iter()
            .enumerate()
            .for_each(|(j, g)| chk(*g == T::from_i64(value(sum, j / block.max(1), j % block.max(1))))),
        PerfOp::ReduceScatter => {
            recv.iter().enumerate().for_each(|(i, g)| chk(matches(op, n, *g, |k| value(op, k, r * block + i))))
        }
        PerfOp::AllToAll => recv.iter().enumerate().for_each(|(j, g)| {
            let (from, i) = (j / block.max(1), j % block.max(1));
            chk(*g == T::from_i64(value(sum, from, r * block + i)))
        }),
        PerfOp::Sendrecv => {
            recv.iter().enumerate().for_each(|(i, g)| chk(*g == T::from_i64(value(sum, (r + n - 1) % n, i))))
        }
        PerfOp::Ep => {}
    }
    wrong
}

/// `--memory gpu`: the buffers on GPU 0, the calls on raw device buffers.
mod gpu {
    use super::PerfArgs;
    #[cfg(feature = "cuda")]
    use super::PerfOp;
    use oxccl::{Communicator, DataType, ReduceOp, Result};

    #[cfg(feature = "cuda")]
    pub(super) struct Bufs {
        send: oxccl_core::mem::Scratch,
        recv: oxccl_core::mem::Scratch,
        sbytes: usize,
        rbytes: usize,
    }

    #[cfg(feature = "cuda")]
    impl Bufs {
        fn gpu() -> Result<&'static oxccl::gpu::gpu::Gpu> {
            oxccl::gpu::gpu::gpu(0)
        }
        /// Device copies of `send` and `recv`.
        pub(super) fn new<T>(send: &[T], recv: &[T]) -> Result<Bufs> {
            use oxccl_core::mem::LocalMem;
            let g = Self::gpu()?;
            let (sbytes, rbytes) = (std::mem::size_of_val(send), std::mem::size_of_val(recv));
            let (s, r) = (g.scratch(sbytes)?, g.scratch(rbytes)?);
            // SAFETY: device buffers of those sizes; unified addressing reads host memory.
            unsafe {
                g.copy(s.ptr(), send.as_ptr() as *const u8, sbytes);
                g.copy(r.ptr(), recv.as_ptr() as *const u8, rbytes);
            }
            Ok(Bufs { send: s, recv: r, sbytes, rbytes })
        }
        pub(super) fn reset_recv<T>(&self, recv: &[T]) {
            use oxccl_core::mem::LocalMem;
            // SAFETY: as in `new`.
            unsafe { Self::gpu().expect("GPU 0").copy(self.recv.ptr(), recv.as_ptr() as *const u8, self.rbytes) };
        }
        pub(super) fn download<T>(&self, recv: &mut [T]) {
            use oxccl_core::mem::LocalMem;
            // SAFETY: as in `new`, the other way.
            unsafe { Self::gpu().expect("GPU 0").copy(recv.as_mut_ptr() as *mut u8, self.recv.ptr(), self.rbytes) };
        }
        /// One call of the measured operation on the device buffers.
        pub(super) fn call(&self, comm: &Communicator, a: &PerfArgs, op: ReduceOp, dtype: DataType) -> Result<()> {
            use oxccl::{MemKind, RawBuf, RawCall};
            let (n, r) = (comm.world_size(), comm.rank());
            let es = dtype.size();
            let buf = |s: &oxccl_core::mem::Scratch, bytes: usize| RawBuf {
                addr: s.ptr() as usize,
                count: bytes / es,
                dtype,
                kind: MemKind::Device(0),
            };
            let (send, recv) = (buf(&self.send, self.sbytes), buf(&self.recv, self.rbytes));
            let send = if a.in_place { recv } else { send };
            let call = match a.op {
                PerfOp::AllReduce => RawCall::AllReduce { op },
                PerfOp::Broadcast => match &a.roots {
                    Some(roots) => RawCall::BroadcastRoots { roots: roots.clone() },
                    None => RawCall::Broadcast { root: a.root },
                },
                PerfOp::Reduce => RawCall::Reduce { op, root: a.root },
                PerfOp::AllGather => RawCall::AllGather,
                PerfOp::ReduceScatter => RawCall::ReduceScatter { op },
                PerfOp::AllToAll => RawCall::AllToAll,
                PerfOp::Sendrecv => {
                    let mut g = comm.group();
                    // SAFETY: device buffers alive for the call.
                    unsafe {
                        g.send_raw(send, (r + 1) % n)?;
                        g.recv_raw(recv, (r + n - 1) % n)?;
                    }
                    return g.run();
                }
                PerfOp::Ep => return Err(oxccl::Error::invalid_arg("perf ep has no --memory gpu yet")),
            };
            // SAFETY: device buffers of the sizes the operation takes, alive for the call.
            unsafe { comm.call_raw(&call, send, recv) }
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub(super) struct Bufs;

    #[cfg(not(feature = "cuda"))]
    impl Bufs {
        pub(super) fn new<T>(_: &[T], _: &[T]) -> Result<Bufs> {
            Err(oxccl::Error::Unsupported(
                "--memory gpu: this oxccl was built without the cuda feature (cargo build --release --features cuda)"
                    .into(),
            ))
        }
        pub(super) fn reset_recv<T>(&self, _: &[T]) {}
        pub(super) fn download<T>(&self, _: &mut [T]) {}
        pub(super) fn call(&self, _: &Communicator, _: &PerfArgs, _: ReduceOp, _: DataType) -> Result<()> {
            unreachable!("never made without the cuda feature")
        }
    }
}
