//! Diagnosis, between processes: every error names the real culprit and cause. Each test
//! reproduces a case a user met (issue 17) and checks the words every rank gets.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{report, run_ranks};

fn worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rank_worker"))
}

/// Runs `create_fails` on `n` ranks with `env`; every rank must fail to create the
/// communicator with an error of `kind` containing each of `says`. Returns the errors.
fn creation_fails(n: usize, env: &[(&str, &str)], kind: &str, says: &[&str]) -> Vec<String> {
    let res = run_ranks(worker(), n, &["create_fails"], env, Duration::from_secs(60));
    let mut errors = Vec::new();
    for (i, (code, out, err)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {i} ({env:?}):\n{out}\n{err}");
        report::passed(i, out);
        let e = report::get(out, "error").and_then(|v| v.as_str().map(String::from)).expect("an error");
        let k = report::get(out, "kind").and_then(|v| v.as_str().map(String::from)).expect("its kind");
        assert_eq!(k, kind, "rank {i} ({env:?}): {e}");
        for s in says {
            assert!(e.contains(s), "rank {i} ({env:?}): {e:?} does not say {s:?}");
        }
        errors.push(e);
    }
    errors
}

const TCP: [(&str, &str); 3] = [("OXCCL_HOST_ID", "host{rank}"), ("OXCCL_SOCKET_IFNAME", "lo"), ("OXCCL_NET", "tcp")];

/// Ranks started with different `OXCCL_TCP_STREAMS` used to blame each other for closing
/// the connection ("the peer closed the connection", "Broken pipe"); the cause was in a WARN
/// line on one rank. Now every rank fails at creation, naming the setting and both values.
#[test]
fn different_tcp_streams_are_named_at_creation() {
    let env = [&TCP[..], &[("OXCCL_TCP_STREAMS", "{pick:4,4,1}"), ("OXCCL_TIMEOUT", "20s")]].concat();
    creation_fails(3, &env, "InvalidUsage", &["OXCCL_TCP_STREAMS: rank 0 has 4, rank 2 has 1"]);
}

/// Settings that choose algorithms or ring layouts, different on one rank, used to surface
/// as "the ranks called different operations, counts or data types".
#[test]
fn settings_that_must_agree_are_compared_at_creation() {
    for (k, v, says) in [
        ("OXCCL_STAGING_BYTES", "{pick:4M,1M}", "OXCCL_STAGING_BYTES: rank 0 has 4194304, rank 1 has 1048576"),
        ("OXCCL_ALGO", "{pick:auto,ring}", "OXCCL_ALGO: rank 0 has auto, rank 1 has ring"),
        ("OXCCL_RD_MAX_BYTES", "{pick:16K,64K}", "OXCCL_RD_MAX_BYTES: rank 0 has 16384, rank 1 has 65536"),
        ("OXCCL_SEGMENT_BYTES", "{pick:1M,64K}", "OXCCL_SEGMENT_BYTES: rank 0 has 1048576, rank 1 has 65536"),
    ] {
        creation_fails(2, &[(k, v), ("OXCCL_TIMEOUT", "20s")], "InvalidUsage", &[says, "docs/settings.md"]);
    }
    // Equal meanings agree: 1M and 1048576 are one size; settings that may differ do.
    let env = [("OXCCL_SEGMENT_BYTES", "{pick:1M,1048576}"), ("OXCCL_SPIN_US", "{pick:30,0}")];
    let res = run_ranks(worker(), 2, &["conformance"], &env, Duration::from_secs(120));
    oxccl_tests::assert_all_ok("equal sizes written two ways", &res);
}

/// Out-of-range values are errors on the rank that has them, never silently changed.
#[test]
fn out_of_range_settings_are_refused() {
    for (k, v) in [("OXCCL_TIMEOUT", "0"), ("OXCCL_SEGMENT_BYTES", "1"), ("OXCCL_SEGMENT_BYTES", "0")] {
        creation_fails(2, &[(k, v)], "InvalidArgument", &[k, &format!("{v:?}")]);
    }
}

/// Makes the next process ids straddle 9999/10000 (root only): shm endpoint names hold the
/// process id, so ranks started now get names of different lengths. False when it cannot.
fn pids_across_a_digit_boundary() -> bool {
    let max: u64 =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    max > 20_000 && std::fs::write("/proc/sys/kernel/ns_last_pid", "9996").is_ok()
}

/// net-libfabric over shm, 5 ranks on 3 interleaved "hosts", a split after a few hundred
/// operations: the split failed with "its endpoint address is 19 bytes, this rank's 20: the
/// ranks use different providers" although both used shm (shm's names hold the process id).
/// Ranks are now matched by provider name (`addr::tests` gives names of different lengths).
#[test]
fn split_over_libfabric_shm_with_names_of_different_lengths() {
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let env = [
        ("OXCCL_NET", "libfabric"),
        ("OXCCL_LIBFABRIC_PROVIDER", "shm"),
        ("OXCCL_HOST_ID", "{pick:h0,h1,h2,h0,h1}"),
        ("OXCCL_TIMEOUT", "60s"),
    ];
    for attempt in 0..3 {
        let forced = pids_across_a_digit_boundary();
        let res = run_ranks(worker(), 5, &["split", "7"], &env, Duration::from_secs(120));
        oxccl_tests::assert_all_ok("split over shm", &res);
        let digits: Vec<usize> = res
            .iter()
            .map(|r| report::get(&r.1, "pid").and_then(|p| p.as_u64()).expect("pid").to_string().len())
            .collect();
        println!("attempt {attempt}: pid digits {digits:?} (next pid forced: {forced})");
        if !forced {
            oxccl_tests::skip(
                oxccl_tests::Need::Netns,
                "cannot set /proc/sys/kernel/ns_last_pid (not root): names may all have one length",
            );
            return;
        }
        if digits.iter().any(|&d| d != digits[0]) {
            return;
        }
    }
    panic!("the ranks never got process ids of different lengths");
}

/// 3 ranks, one SIGSTOPped during a ring all_reduce for longer than the deadline: the
/// survivor waiting on it used to report the other survivor's record ("rank 0 timed out
/// first: ... waiting on ranks [2]"), naming a healthy rank, and copied durations read
/// "after 0ns". Every survivor must name the stopped rank, from the evidence (it does not
/// answer for its flight record), with its own wait; the stopped rank, let go, learns the
/// others gave up on it. Each victim in turn.
#[test]
fn a_stopped_rank_is_named_by_every_survivor() {
    for v in ["1", "2"] {
        let env = [("OXCCL_TIMEOUT", "4s"), ("OXCCL_ALGO", "all_reduce=ring"), ("OXCCL_TEST_VICTIM", v)];
        let res = run_ranks(worker(), 3, &["stopped"], &env, Duration::from_secs(120));
        oxccl_tests::assert_all_ok(&format!("rank {v} stopped"), &res);
        // The first rank to time out prints every rank's flight record, once.
        let tables: Vec<&str> =
            res.iter().map(|r| r.2.as_str()).filter(|e| e.contains("every rank's flight record")).collect();
        assert_eq!(tables.len(), 1, "one table, by the first rank to fail: {res:?}");
        assert!(tables[0].contains(&format!("rank {v}: NO ANSWER")), "{}", tables[0]);
        assert!(tables[0].contains("RUNNING"), "{}", tables[0]);
        for (i, r) in res.iter().enumerate() {
            report::passed(i, &r.1);
            println!("rank {v} stopped; rank {i}: {}", report::get(&r.1, "error").unwrap_or_default());
        }
    }
}

/// A rank that closed its communicator cleanly used to leave the others waiting for it
/// until their deadline (5 ranks, 30 s): now they name it within moments, with how far it
/// got. Over host-staging and over net-tcp.
#[test]
fn a_rank_that_closed_is_named_at_once() {
    for env in [&[("OXCCL_TIMEOUT", "60s")][..], &[&TCP[..], &[("OXCCL_TIMEOUT", "60s")]].concat()] {
        let res = run_ranks(worker(), 5, &["closed"], env, Duration::from_secs(120));
        oxccl_tests::assert_all_ok("closed", &res);
        let tables: Vec<&str> =
            res.iter().map(|r| r.2.as_str()).filter(|e| e.contains("every rank's flight record")).collect();
        assert_eq!(tables.len(), 1, "one table, by the first rank to fail: {res:?}");
        assert!(tables[0].contains("closed the communicator after 5 operations"), "{}", tables[0]);
        println!("{}", tables[0]);
        for (i, r) in res.iter().enumerate() {
            report::passed(i, &r.1);
            if let Some(e) = report::get(&r.1, "error") {
                println!("rank {i} ({:?} ms): {e}", report::get(&r.1, "ms").unwrap_or_default());
            }
        }
    }
}

/// Two ranks that each call `recv_async` then `send_async` used to wait on each other until
/// the deadline (the progress thread ran them one at a time, in call order); MPI's
/// Irecv/Isend, gloo and torch's irecv/isend do not deadlock there. Over host-staging,
/// net-tcp and net-libfabric, 2 and 3 ranks.
#[test]
fn non_blocking_sends_and_receives_progress_independently() {
    let mut envs: Vec<Vec<(&str, &str)>> = vec![vec![], TCP.to_vec()];
    if oxccl_tests::libfabric_ready() {
        envs.push(vec![
            ("OXCCL_HOST_ID", "host{rank}"),
            ("OXCCL_NET", "libfabric"),
            ("OXCCL_LIBFABRIC_PROVIDER", "tcp"),
        ]);
    }
    for env in envs {
        for n in [2, 3] {
            let env = [&env[..], &[("OXCCL_TIMEOUT", "30s")]].concat();
            let res = run_ranks(worker(), n, &["p2p"], &env, Duration::from_secs(120));
            oxccl_tests::assert_all_ok(&format!("p2p {n} ranks {env:?}"), &res);
        }
    }
}

/// A hang read on demand. Three ranks; the last is held back before all_reduce #4, which the
/// others are in. The records gathered through the store (what `oxccl trace` prints) show
/// ranks 0 and 1 running #4 and waiting, and rank 2 at #3, outside OxCCL; the trace signal
/// (`OXCCL_TRACE_SIGNAL=USR1`) makes rank 0 print them to its stderr. Then the last rank
/// goes on and every rank's result is checked.
#[test]
fn a_hang_is_read_from_the_flight_records() {
    use oxccl::bootstrap::{connect_client, StoreAddr};
    let dir = std::env::temp_dir().join(format!("oxccl-behind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (server, auth, secret) = oxccl_tests::job_store();
    let addr = format!("tcp://{}", server.local_addr());
    let env: Vec<(String, String)> = [
        ("OXCCL_JOB_SECRET", secret.as_str()),
        ("OXCCL_STORE", addr.as_str()),
        ("OXCCL_STORE_HOSTED", "1"),
        ("OXCCL_TEST_DIR", dir.to_str().unwrap()),
        ("OXCCL_TRACE_SIGNAL", "USR1"),
        ("OXCCL_TIMEOUT", "60s"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let ranks = std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cmds = (0..3).map(|_| std::process::Command::new(worker())).collect();
        oxccl_tests::run_commands(cmds, &["behind"], &env, Duration::from_secs(120))
    });
    let t0 = std::time::Instant::now();
    let pids: Vec<i32> = loop {
        let p: Vec<Option<i32>> = (0..3)
            .map(|r| std::fs::read_to_string(dir.join(format!("ready.{r}"))).ok().and_then(|s| s.trim().parse().ok()))
            .collect();
        if p.iter().all(Option::is_some) {
            break p.into_iter().flatten().collect();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the ranks never got ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Ranks 0 and 1 go into #4 right after writing their file.
    std::thread::sleep(Duration::from_millis(300));
    let store = connect_client(&StoreAddr::parse(&addr).unwrap(), Duration::from_secs(5), &auth).unwrap();
    let traces = oxccl::trace::gather(&*store, Duration::from_secs(5)).unwrap();
    let text = oxccl::trace::report(&traces, 0);
    println!("{text}");
    assert_eq!(traces.len(), 3, "one communicator, three ranks: {text}");
    for t in &traces {
        assert_eq!(t.world, 3);
        let running = t.running().map(|o| (o.seq, o.op.clone()));
        if t.rank == 2 {
            assert_eq!((t.last_seq, running), (3, None), "rank 2 is outside OxCCL after #3: {text}");
        } else {
            assert_eq!(running, Some((4, "all_reduce".to_string())), "rank {} is in #4: {text}", t.rank);
            assert_eq!(t.last_seq, 4);
        }
        assert_eq!(t.ops.iter().filter(|o| o.state == oxccl::trace::OpState::Done).count(), 3, "{text}");
    }
    assert!(text.contains("all_reduce #4 1024xfloat: RUNNING"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("  | all_reduce")).count(), 4, "a row per collective: {text}");
    // SAFETY: kill on rank 0's pid, which it wrote.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGUSR1) }, 0);
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(dir.join("go"), b"").unwrap();
    let res = ranks.join().unwrap();
    oxccl_tests::assert_all_ok("behind", &res);
    let err0 = &res[0].2;
    assert!(err0.contains("flight records (OXCCL_TRACE_SIGNAL)"), "rank 0 printed nothing on SIGUSR1:\n{err0}");
    assert!(err0.contains("all_reduce #4"), "{err0}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank that is alive but late (computing outside OxCCL past the deadline) is blamed from
/// the sequence numbers the ranks reached, not from silence: "has not reached all_reduce
/// #4 ... its last collective is #3". Also with the flight recorder off
/// (`OXCCL_TRACE_BUFFER=0`), which keeps sequence numbers.
#[test]
fn a_late_rank_is_blamed_by_the_collective_it_has_not_reached() {
    for buffer in ["1000", "0"] {
        let env = [("OXCCL_TIMEOUT", "3s"), ("OXCCL_TRACE_BUFFER", buffer)];
        let res = run_ranks(worker(), 3, &["late"], &env, Duration::from_secs(120));
        oxccl_tests::assert_all_ok(&format!("late, OXCCL_TRACE_BUFFER={buffer}"), &res);
        for (i, r) in res.iter().enumerate() {
            report::passed(i, &r.1);
        }
    }
}

/// A `split` that failed on two members used to leave the rest with a communicator whose
/// calls waited for them until the deadline. Now a part that fails anywhere fails the split
/// on every member, naming the rank and its words: rank 2's NIC (net-libfabric over tcp) has
/// no endpoint for a gradient communicator, which may not fall back to net-tcp; the parent
/// stays usable. (A failure no other rank can see, after routes are chosen, is caught by the
/// last "ready" round: `comm::tests::a_part_that_failed_fails_creation_everywhere`.)
#[test]
fn a_split_that_fails_on_one_member_fails_on_every_member() {
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let ledger = std::env::temp_dir().join(format!("oxccl-split-fails-{}", std::process::id()));
    for r in 0..3 {
        std::fs::create_dir_all(ledger.join(r.to_string())).unwrap();
    }
    // A ledger per rank: each "host" has a NIC of its own.
    let dir = format!("{}/{{rank}}", ledger.display());
    let env = [
        ("OXCCL_HOST_ID", "splithost{rank}"),
        ("OXCCL_NET", "libfabric,tcp"),
        ("OXCCL_SOCKET_IFNAME", "lo"),
        ("OXCCL_LIBFABRIC_PROVIDER", "tcp"),
        // Rank 2's NIC has no endpoint: its bulk parent falls back to net-tcp (allowed by
        // default), its gradient part may not.
        ("OXCCL_NIC_ENDPOINTS", "{pick:*:4,*:4,*:0}"),
        ("OXCCL_RESERVE", "none"),
        ("OXCCL_LEDGER_DIR", dir.as_str()),
        ("OXCCL_TIMEOUT", "30s"),
    ];
    let res = run_ranks(worker(), 3, &["split_fails"], &env, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&ledger);
    oxccl_tests::assert_all_ok("split fails on rank 2", &res);
    for (i, r) in res.iter().enumerate() {
        report::passed(i, &r.1);
    }
}

/// A rank killed while its peer waits on a `recv_async` from it is named within moments,
/// over host-staging (its process is seen gone) and net-tcp (its sockets close), as for a
/// blocking receive; the flights used to be checked only at their deadline.
#[test]
fn a_peer_lost_under_a_pending_receive_is_named_at_once() {
    for env in [&[("OXCCL_TIMEOUT", "60s")][..], &[&TCP[..], &[("OXCCL_TIMEOUT", "60s")]].concat()] {
        let res = run_ranks(worker(), 2, &["p2p_lost"], env, Duration::from_secs(120));
        assert_eq!(res[0].0, None, "rank 0 was not killed: {res:?}");
        oxccl_tests::assert_all_ok("p2p lost", &res[1..]);
        report::passed(1, &res[1].1);
        println!("{env:?}: {:?} ms", report::get(&res[1].1, "ms"));
    }
}
