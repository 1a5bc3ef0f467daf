//! Faults, between processes: a rank SIGKILLed or SIGSTOPped in the middle of a collective on
//! every transport, the store's host dying, `abort()` from another thread, mismatched calls,
//! and `shrink` after a loss. Every survivor must fail (never hang): with an error naming the
//! lost rank for SIGKILL, a timeout for SIGSTOP. Each test prints the time from the signal to
//! each survivor's error (the figure docs/reliability.md quotes).

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, run_ranks};

fn worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rank_worker"))
}

/// A number a rank reported under `key`.
fn field(out: &str, key: &str) -> Option<u64> {
    oxccl_tests::report::get(out, key)?.as_u64()
}

/// Runs the `loss` scenario on `n` ranks; the victim must die by the signal, every survivor
/// pass. Prints and returns each survivor's delay from the signal to its error, in ms.
fn lose(what: &str, n: usize, victim: usize, env: &[(&str, &str)]) -> Vec<f64> {
    let v = victim.to_string();
    let mut all = vec![("OXCCL_TEST_VICTIM", v.as_str()), ("OXCCL_TIMEOUT", "30s")];
    all.extend_from_slice(env);
    let res = run_ranks(worker(), n, &["loss", "1234"], &all, Duration::from_secs(200));
    let (code, out, err) = &res[victim];
    assert_eq!(*code, None, "the victim was not killed by a signal:\n{out}\n{err}");
    let sent = field(out, "at_ns").expect("the victim says when it sent its signal");
    let mut delays = Vec::new();
    let survivors: Vec<_> = res.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, r)| r.clone()).collect();
    assert_all_ok(what, &survivors);
    for (i, r) in res.iter().enumerate().filter(|(i, _)| *i != victim) {
        oxccl_tests::report::passed(i, &r.1);
        let seen = field(&r.1, "noticed_ns").expect("each survivor says when it noticed");
        delays.push(seen.saturating_sub(sent) as f64 / 1e6);
    }
    println!("{what}: signal to error on the survivors: {delays:.1?} ms");
    delays
}

const HS: [(&str, &str); 0] = [];
const TCP: [(&str, &str); 3] = [("OXCCL_HOST_ID", "host{rank}"), ("OXCCL_SOCKET_IFNAME", "lo"), ("OXCCL_NET", "tcp")];

#[test]
fn sigkill_mid_collective_over_host_staging_then_shrink() {
    lose("host-staging, 4 ranks, rank 2 SIGKILLed", 4, 2, &[HS.as_slice(), &[("OXCCL_TEST_SHRINK", "1")]].concat());
}

/// After a kill, one survivor (the first to fail, or the first to read the store's record of
/// the loss) logs every rank's flight record, the lost rank without an answer.
#[test]
fn after_a_kill_one_survivor_logs_the_flight_records() {
    let env = [("OXCCL_TEST_STAY_MS", "1500")];
    let res = run_ranks(
        worker(),
        3,
        &["loss", "7"],
        &[&env[..], &[("OXCCL_TEST_VICTIM", "1"), ("OXCCL_TIMEOUT", "30s")]].concat(),
        Duration::from_secs(120),
    );
    assert_eq!(res[1].0, None, "the victim was not killed by a signal");
    let tables: Vec<&str> =
        res.iter().map(|r| r.2.as_str()).filter(|e| e.contains("every rank's flight record")).collect();
    assert_eq!(tables.len(), 1, "one table: {res:?}");
    assert!(tables[0].contains("rank 1: NO ANSWER"), "{}", tables[0]);
}

#[test]
fn sigkill_mid_collective_over_net_tcp_then_shrink() {
    lose("net-tcp, 3 hosts, rank 1 SIGKILLed", 3, 1, &[TCP.as_slice(), &[("OXCCL_TEST_SHRINK", "1")]].concat());
}

/// Two ranks per "host": the victim's host-staging neighbour sees its process exit, the
/// ranks on the other host learn it from the store.
#[test]
fn sigkill_across_host_staging_and_net_tcp() {
    let env = [("OXCCL_HOST_ID", "host{rank/2}"), ("OXCCL_SOCKET_IFNAME", "lo"), ("OXCCL_NET", "tcp")];
    lose("2 hosts x 2 ranks, rank 3 SIGKILLed", 4, 3, &env);
}

#[test]
fn sigkill_mid_collective_over_net_libfabric() {
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let env = [
        ("OXCCL_HOST_ID", "host{rank}"),
        ("OXCCL_NET", "libfabric"),
        ("OXCCL_LIBFABRIC_PROVIDER", "tcp"),
        ("OXCCL_TEST_SHRINK", "1"),
    ];
    lose("net-libfabric (tcp;ofi_rxm), 3 hosts, rank 2 SIGKILLed", 3, 2, &env);
}

/// A stopped rank is not dead: the survivors wait for it until the deadline, then time out.
#[test]
fn sigstop_gives_a_timeout() {
    let d = lose(
        "host-staging, 3 ranks, rank 1 SIGSTOPped (per-call deadline 3 s)",
        3,
        1,
        &[("OXCCL_TEST_SIGNAL", "STOP")],
    );
    assert!(d.iter().all(|&ms| ms >= 2000.0), "a survivor gave up long before its deadline: {d:?} ms");
}

/// Rank 0 hosts the store itself and is killed: the others name rank 0 (host-staging
/// neighbours through its process; everyone through the store vanishing).
#[test]
fn sigkill_of_the_rank_hosting_the_store() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("tcp://127.0.0.1:{port}");
    let env = [("OXCCL_STORE", store.as_str()), ("OXCCL_STORE_HOSTED", "0")];
    lose("host-staging, 3 ranks, rank 0 (the store's host) SIGKILLed", 3, 0, &env);
    let tcp_env = [&env[..], TCP.as_slice()].concat();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("tcp://127.0.0.1:{port}");
    let tcp_env: Vec<(&str, &str)> =
        tcp_env.into_iter().map(|(k, v)| if k == "OXCCL_STORE" { (k, store.as_str()) } else { (k, v) }).collect();
    lose("net-tcp, 3 hosts, rank 0 (the store's host) SIGKILLed", 3, 0, &tcp_env);
}

#[test]
fn abort_from_another_thread_ends_the_operation_on_every_rank() {
    for env in [&HS[..], &TCP[..]] {
        let res = run_ranks(worker(), 2, &["abort"], env, Duration::from_secs(100));
        assert_all_ok(&format!("abort {env:?}"), &res);
    }
}

/// Rank 0 of the store's launch dies before the others connect: they fail at once with the
/// store's words, not at the deadline, and never hang.
#[test]
fn the_store_host_dying_during_init_is_an_error() {
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("tcp://127.0.0.1:{port}");
    // Rank 0 of 3 starts the store, waits for the others in vain, and is killed.
    let mut r0 = Command::new(worker())
        .arg("conformance")
        .env("OXCCL_RANK", "0")
        .env("OXCCL_WORLD_SIZE", "3")
        .env("OXCCL_STORE", &store)
        .env("OXCCL_STORE_HOSTED", "0")
        .env("OXCCL_TIMEOUT", "60s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Rank 1 starts once rank 0's store answers, and connects to it at once.
    let up = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < up, "rank 0 never started its store");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = std::time::Instant::now();
    let r1 = Command::new(worker())
        .arg("conformance")
        .env("OXCCL_RANK", "1")
        .env("OXCCL_WORLD_SIZE", "3")
        .env("OXCCL_STORE", &store)
        .env("OXCCL_TIMEOUT", "60s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    r0.kill().unwrap();
    r0.wait().unwrap();
    let out = r1.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 1 succeeded without rank 0?");
    assert!(err.contains("store"), "rank 1's error does not name the store: {err}");
    println!("rank 1 failed {:?} after start (deadline 60 s): {}", t0.elapsed(), err.lines().last().unwrap_or(""));
    assert!(!err.contains("timed out"), "rank 1 waited for the deadline instead of seeing the store go: {err}");
}

/// While 2 ranks run checked all_reduces over net-tcp, strangers send garbage, absurd
/// lengths, truncated frames and wrong versions to the store's port and to both ranks'
/// net-tcp listeners: every hostile connection is dropped, the ranks finish with correct
/// results, the store still serves.
#[test]
fn hostile_connections_during_a_run_change_nothing() {
    use oxccl::bootstrap::tcp_store::TcpStore;
    use oxccl_core::store::Store;
    use std::io::Write;
    let (server, auth, secret) = oxccl_tests::job_store();
    let store_addr = server.local_addr();
    let store = format!("tcp://{store_addr}");
    let env = [
        ("OXCCL_JOB_SECRET", secret.as_str()),
        ("OXCCL_STORE", store.as_str()),
        ("OXCCL_STORE_HOSTED", "1"),
        ("OXCCL_HOST_ID", "host{rank}"),
        ("OXCCL_SOCKET_IFNAME", "lo"),
        ("OXCCL_NET", "tcp"),
        ("OXCCL_TIMEOUT", "60s"),
    ];
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let ranks = std::thread::spawn(move || {
        let cmds = (0..2).map(|_| std::process::Command::new(worker())).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        oxccl_tests::run_commands(cmds, &["steady"], &env, Duration::from_secs(120))
    });
    let client = TcpStore::connect(store_addr, Duration::from_secs(10), &auth).unwrap();
    let mut targets = vec![store_addr.to_string()];
    for r in 0..2 {
        let a = client.get(&format!("oxccl/c1/tcp/addr/{r}"), Duration::from_secs(60)).unwrap();
        targets.push(String::from_utf8(a).unwrap());
    }
    let junk: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],                                      // absurd lengths everywhere
        vec![0x0b, 0, 0, 0, 0x01, b'O', b'X'],               // a truncated store hello
        b"OXTC".iter().chain(&[99u8, 0]).copied().collect(), // a net-tcp hello of version 99
        vec![0; 3],
    ];
    let mut sent = 0;
    while !ranks.is_finished() && sent < 2000 {
        for t in &targets {
            for j in &junk {
                if let Ok(mut s) = std::net::TcpStream::connect(t) {
                    let _ = s.write_all(j);
                    sent += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let res = ranks.join().unwrap();
    assert_all_ok("steady over net-tcp under hostile connections", &res);
    for (i, r) in res.iter().enumerate() {
        assert_eq!(oxccl_tests::report::passed(i, &r.1).checks, 300, "rank {i}: every all_reduce checked");
    }
    client.set("after", b"ok").unwrap();
    assert_eq!(client.get("after", Duration::from_secs(5)).unwrap(), b"ok");
    println!("{sent} hostile connections during the run");
    assert!(sent > 0);
}
