//! Helpers of the OxCCL test suite: deterministic inputs, expected results with stated
//! tolerances, and a harness that runs N rank processes.
//!
//! Tolerance for floating-point reductions: over `n` ranks a result goes through at most
//! `n-1` roundings of the type's unit roundoff `u` (2^-24 f32, 2^-53 f64, 2^-11 f16, 2^-8
//! bf16), in an order the algorithm chooses; the recursive-summation bound gives
//! `|got - exact| <= g * sum(|x_i|)`, `g = (n-1)u / (1-(n-1)u)`, and `|exact| * n u / (1 - n u)`
//! for products (inputs near 1, so no overflow or underflow). Avg adds one rounding of the
//! division. The exact value is computed in f64 (for f64 inputs the reference's own rounding
//! doubles the bound). Integers wrap and must match exactly; min and max must match exactly.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oxccl::{half, DataType, Element, ReduceOp};

pub mod device;
pub mod netns;
pub mod report;

pub use oxccl_core::testing::{skip, Need};

/// Whether net-libfabric can run here: the `libfabric` feature is built and libfabric's tools
/// are installed. Otherwise the calling test is skipped (or fails: [`skip`]).
pub fn libfabric_ready() -> bool {
    if !cfg!(feature = "libfabric") {
        skip(Need::Libfabric, "built without the libfabric feature (cargo test --features libfabric)");
        return false;
    }
    if Command::new("fi_info").arg("-l").output().is_err() {
        skip(Need::Libfabric, "no fi_info on PATH (apt-get install libfabric-bin)");
        return false;
    }
    true
}

/// 64-bit mix of a few integers (splitmix64 steps).
pub fn mix(parts: &[u64]) -> u64 {
    let mut z: u64 = 0x9e37_79b9_7f4a_7c15;
    for p in parts {
        z = z.wrapping_add(*p).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

/// An element type the suite can generate and check.
pub trait TestElem: Element {
    /// Deterministic input of `rank` at index `i` for `op`.
    fn gen(op: ReduceOp, seed: u64, rank: usize, i: usize) -> Self;
    /// True if `got` is `op` over `xs` within the stated tolerance.
    fn check(op: ReduceOp, xs: &[Self], got: Self) -> bool;
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl TestElem for $t {
            fn gen(op: ReduceOp, seed: u64, rank: usize, i: usize) -> Self {
                let h = mix(&[seed, rank as u64, i as u64]);
                if op == ReduceOp::Prod { ((h % 7) as i64 - 3) as $t } else { h as $t }
            }
            fn check(op: ReduceOp, xs: &[Self], got: Self) -> bool {
                let want = match op {
                    ReduceOp::Sum => xs.iter().fold(0 as $t, |a, b| a.wrapping_add(*b)),
                    ReduceOp::Prod => xs.iter().fold(1 as $t, |a, b| a.wrapping_mul(*b)),
                    ReduceOp::Min => *xs.iter().min().expect("at least one rank"),
                    ReduceOp::Max => *xs.iter().max().expect("at least one rank"),
                    ReduceOp::Avg => return false,
                };
                got == want
            }
        }
    )*};
}
int_elem!(i8, u8, i32, u32, i64, u64);

fn unit_roundoff(d: DataType) -> f64 {
    d.unit_roundoff().expect("a floating-point type")
}

fn float_check(d: DataType, op: ReduceOp, xs: &[f64], got: f64) -> bool {
    let n = xs.len();
    let u = unit_roundoff(d);
    let g = |k: usize| (k as f64 * u) / (1.0 - k as f64 * u);
    let abs: f64 = xs.iter().map(|x| x.abs()).sum();
    let (want, mut tol) = match op {
        ReduceOp::Sum => (xs.iter().sum::<f64>(), g(n - 1) * abs),
        ReduceOp::Avg => {
            let w = xs.iter().sum::<f64>() / n as f64;
            (w, g(n - 1) * abs / n as f64 + u * w.abs())
        }
        ReduceOp::Prod => {
            let p: f64 = xs.iter().product();
            (p, g(n) * p.abs())
        }
        ReduceOp::Min => (xs.iter().cloned().fold(f64::INFINITY, f64::min), 0.0),
        ReduceOp::Max => (xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max), 0.0),
    };
    if d == DataType::F64 {
        tol *= 2.0;
    }
    (got - want).abs() <= tol * 1.000_001
}

macro_rules! float_elem {
    ($($t:ty => $from:expr, $to:expr);*) => {$(
        impl TestElem for $t {
            fn gen(op: ReduceOp, seed: u64, rank: usize, i: usize) -> Self {
                let h = mix(&[seed, rank as u64, i as u64]);
                let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
                let v = if op == ReduceOp::Prod { 0.8 + 0.45 * unit } else { unit * 8.0 - 4.0 };
                ($from)(v)
            }
            fn check(op: ReduceOp, xs: &[Self], got: Self) -> bool {
                let v: Vec<f64> = xs.iter().map(|x| ($to)(*x)).collect();
                float_check(<$t as Element>::DTYPE, op, &v, ($to)(got))
            }
        }
    )*};
}
float_elem!(
    f32 => |v: f64| v as f32, |x: f32| x as f64;
    f64 => |v: f64| v, |x: f64| x;
    half::f16 => half::f16::from_f64, |x: half::f16| x.to_f64();
    half::bf16 => half::bf16::from_f64, |x: half::bf16| x.to_f64()
);

/// A TCP store on loopback with a fresh job secret, and that secret (for `OXCCL_JOB_SECRET`),
/// as `oxccl launch` makes them.
pub fn job_store() -> (oxccl::bootstrap::TcpStoreServer, oxccl::Auth, String) {
    let secret = oxccl::JobSecret::generate("the test's secret").expect("random source");
    let hex = String::from_utf8_lossy(secret.expose()).into_owned();
    let auth = oxccl::Auth::with_secret(secret);
    let server =
        oxccl::bootstrap::tcp_store::TcpStoreServer::start("127.0.0.1:0".parse().expect("valid address"), &auth)
            .expect("store starts");
    (server, auth, hex)
}

/// Runs `n` copies of `exe` as ranks 0..n with a TCP store hosted here, as `oxccl launch`
/// does: a fresh job secret for the store and every rank; each gets `args` and `env`. Returns
/// each rank's (exit status, stdout, stderr). Kills everything at `timeout`.
pub fn run_ranks(
    exe: &Path,
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Vec<(Option<i32>, String, String)> {
    let (server, _, hex) = job_store();
    let store = format!("tcp://{}", server.local_addr());
    let cmds = (0..n).map(|_| Command::new(exe)).collect();
    let env: Vec<(&str, &str)> =
        [("OXCCL_STORE", store.as_str()), ("OXCCL_STORE_HOSTED", "1"), ("OXCCL_JOB_SECRET", hex.as_str())]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
    run_commands(cmds, args, &env, timeout)
}

/// Runs `cmds[r]` as rank `r` of `cmds.len()` with `args` and `env` (values may use
/// `{rank}`, `{rank/K}` and `{pick:a,b,..}`); later entries of `env` win. Kills everything at `timeout`.
pub fn run_commands(
    cmds: Vec<Command>,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Vec<(Option<i32>, String, String)> {
    let n = cmds.len();
    // Like a launcher, give the ranks a job secret unless the test chose how they authenticate.
    let chosen = env.iter().any(|(k, _)| k.starts_with("OXCCL_JOB_SECRET") || *k == "OXCCL_ALLOW_UNAUTHENTICATED");
    let made = (!chosen).then(|| {
        let s = oxccl::JobSecret::generate("the test's secret").expect("random source");
        String::from_utf8_lossy(s.expose()).into_owned()
    });
    let mut kids: Vec<Child> = cmds
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            c.args(args)
                .env("OXCCL_RANK", r.to_string())
                .env("OXCCL_WORLD_SIZE", n.to_string())
                .env("OXCCL_LOCAL_RANK", r.to_string())
                .env("OXCCL_LOCAL_WORLD_SIZE", n.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(hex) = &made {
                c.env("OXCCL_JOB_SECRET", hex);
            }
            for (k, v) in env {
                // "{rank}" and "{rank/K}" in a value become this rank's number, or its
                // number divided by K (OXCCL_HOST_ID=h{rank/2}: two ranks per "host").
                let mut v = v.replace("{rank}", &r.to_string());
                for k in 1..=8 {
                    v = v.replace(&format!("{{rank/{k}}}"), &(r / k).to_string());
                }
                // "{pick:a,b,c}": rank 0 gets a, rank 1 b, every later rank c (settings that
                // differ between ranks).
                if let Some(start) = v.find("{pick:") {
                    if let Some(len) = v[start..].find('}') {
                        let choices: Vec<&str> = v[start + 6..start + len].split(',').collect();
                        let pick = choices[r.min(choices.len() - 1)].to_string();
                        v.replace_range(start..start + len + 1, &pick);
                    }
                }
                c.env(k, v);
            }
            c.spawn().expect("rank process starts")
        })
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let done = kids.iter_mut().all(|k| matches!(k.try_wait(), Ok(Some(_))));
        if done {
            break;
        }
        if Instant::now() > deadline {
            for k in kids.iter_mut() {
                let _ = k.kill();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kids.into_iter()
        .map(|k| {
            let o = k.wait_with_output().expect("collect output");
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .collect()
}

/// Asserts every rank exited 0, printing all output otherwise.
pub fn assert_all_ok(what: &str, res: &[(Option<i32>, String, String)]) {
    let bad: Vec<usize> = res.iter().enumerate().filter(|(_, r)| r.0 != Some(0)).map(|(i, _)| i).collect();
    if !bad.is_empty() {
        for (i, r) in res.iter().enumerate() {
            eprintln!("--- rank {i}: status {:?}\n{}\n{}", r.0, r.1, r.2);
        }
        panic!("{what}: ranks {bad:?} failed");
    }
}

/// All data types, for iterating scenarios.
pub fn dtypes() -> [DataType; 10] {
    DataType::ALL
}

/// OxCCL's shared-memory segments and doorbells in /dev/shm now (names starting `oxccl-`;
/// not the host-wide budget ledger, whose leases of dead processes are reclaimed by the next
/// reader: docs/budget.md).
pub fn shm_files() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("oxccl-") && !n.starts_with("oxccl-ledger"))
                .collect()
        })
        .unwrap_or_default()
}
