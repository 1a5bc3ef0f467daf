//! Segments are unlinked as soon as both sides have mapped them: after a run, nothing of ours
//! is left in /dev/shm. (Alone in its test binary, so no other test's files interfere.)

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, run_ranks};

fn ours() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("oxccl-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn no_shared_memory_files_left_behind() {
    let before = ours();
    let res =
        run_ranks(Path::new(env!("CARGO_BIN_EXE_rank_worker")), 4, &["order", "3"], &[], Duration::from_secs(120));
    assert_all_ok("order with 4 ranks", &res);
    let left: Vec<String> = ours().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}
