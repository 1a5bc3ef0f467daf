//! Segments are unlinked as soon as both sides have mapped them: after a run, nothing of ours
//! is left in /dev/shm. (Alone in its test binary, so no other test's files interfere.)

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, run_ranks};

use oxccl_tests::shm_files as ours;

#[test]
fn no_shared_memory_files_left_behind() {
    let before = ours();
    let res =
        run_ranks(Path::new(env!("CARGO_BIN_EXE_rank_worker")), 4, &["order", "3"], &[], Duration::from_secs(120));
    assert_all_ok("order with 4 ranks", &res);
    let left: Vec<String> = ours().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

/// Killed mid-run (SIGKILL, no destructor runs): every segment was unlinked as soon as both
/// sides had mapped it, so nothing is left behind either.
#[test]
fn nothing_left_behind_after_sigkill() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let before = ours();
    let server =
        oxccl::bootstrap::tcp_store::TcpStoreServer::start("127.0.0.1:0".parse().unwrap(), &oxccl::Auth::none())
            .unwrap();
    let n = 4;
    let mut kids: Vec<_> = (0..n)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_rank_worker"))
                .arg("hold")
                .env("OXCCL_RANK", r.to_string())
                .env("OXCCL_WORLD_SIZE", n.to_string())
                .env("OXCCL_STORE", format!("tcp://{}", server.local_addr()))
                .env("OXCCL_STORE_HOSTED", "1")
                .env("OXCCL_TIMEOUT", "30s")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for k in kids.iter_mut() {
        let mut line = String::new();
        BufReader::new(k.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let said = oxccl_tests::report::parse_line(&line);
        assert_eq!(
            said.and_then(|v| v.get("event").cloned()),
            Some("ready".into()),
            "a rank failed before connecting: {line:?}"
        );
    }
    for k in kids.iter_mut() {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    let left: Vec<String> = ours().difference(&before).cloned().collect();
    assert!(left.is_empty(), "left in /dev/shm after SIGKILL: {left:?}");
}
