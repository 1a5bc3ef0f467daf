//! Soak: random operations across 4 ranks over host-staging, every result checked; resident
//! memory after warm-up and at the end printed by each rank, no thread and no /dev/shm file
//! left behind. The short version runs in the normal suite; the full 100,000 operations:
//!
//! ```text
//! cargo test --release -p oxccl-tests --test soak -- --ignored soak --nocapture
//! ```

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, report, run_ranks};

use oxccl_tests::shm_files as ours;

/// Runs `ops` random operations on 4 ranks; returns (rss after warm-up, rss at the end) in
/// KiB per rank.
fn soak(ops: usize, limit: Duration) -> Vec<(u64, u64)> {
    let before = ours();
    let n = ops.to_string();
    let res = run_ranks(
        Path::new(env!("CARGO_BIN_EXE_rank_worker")),
        4,
        &["soak", "99"],
        &[("OXCCL_SOAK_OPS", n.as_str()), ("OXCCL_TIMEOUT", "120s")],
        limit,
    );
    assert_all_ok(&format!("soak of {ops} operations"), &res);
    let rss = res
        .iter()
        .map(|r| {
            if let Some(line) = r.1.lines().find(|l| l.starts_with("soak rank")) {
                println!("{line}");
            }
            let num =
                |key: &str| report::get(&r.1, key).and_then(|v| v.as_u64()).expect("each rank reports its memory");
            (num("rss_warm_kib"), num("rss_end_kib"))
        })
        .collect();
    let left: Vec<String> = ours().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
    rss
}

#[test]
fn soak_short() {
    soak(300, Duration::from_secs(600));
}

#[test]
#[ignore = "about 100,000 operations: long; run with --ignored soak"]
fn soak_100k_operations() {
    let rss = soak(100_000, Duration::from_secs(4 * 3600));
    for (r, (warm, end)) in rss.iter().enumerate() {
        let grew = *end as f64 / *warm as f64;
        assert!(grew <= 1.05, "rank {r}: resident memory grew from {warm} to {end} KiB ({grew:.3}x)");
    }
}
