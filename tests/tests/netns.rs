//! Multi-host tests: ranks in separate network namespaces ("hosts") joined by veth pairs on a
//! bridge, 198.18.0.0/15 addresses; host-staging within a host, net-tcp (or net-libfabric over
//! the tcp provider) between hosts.
//! Without root or iproute2 every test prints `skipped: <why>` and passes nothing else.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::netns::Hosts;
use oxccl_tests::{assert_all_ok, run_commands};

fn hosts(n: usize) -> Option<Hosts> {
    Hosts::create_or_skip(n)
}

/// Runs `ranks_per_host` ranks in each host; rank 0 (in host 0) hosts the store.
fn run(h: &Hosts, ranks_per_host: usize, scenario: &str, extra: &[(&str, &str)]) {
    let exe = Path::new(env!("CARGO_BIN_EXE_rank_worker"));
    let n = h.len() * ranks_per_host;
    let cmds = (0..n).map(|r| h.command(r / ranks_per_host, exe)).collect();
    let store = format!("tcp://{}:29731", h.addr(0));
    let host_id = format!("nshost{{rank/{ranks_per_host}}}");
    let mut env: Vec<(&str, &str)> = vec![
        ("OXCCL_STORE", &store),
        ("OXCCL_STORE_HOSTED", "0"),
        ("OXCCL_HOST_ID", &host_id),
        ("OXCCL_SOCKET_IFNAME", "eth0"),
        ("OXCCL_TIMEOUT", "60s"),
        // net-tcp unless a test says otherwise (the default list puts libfabric first).
        ("OXCCL_NET", "tcp"),
    ];
    env.extend_from_slice(extra);
    let res = run_commands(cmds, &[scenario, "11"], &env, Duration::from_secs(240));
    assert_all_ok(&format!("{scenario} on {} hosts x {ranks_per_host}", h.len()), &res);
    for (i, r) in res.iter().enumerate() {
        oxccl_tests::report::passed(i, &r.1);
    }
}

#[test]
fn conformance_2_hosts_x_2_ranks() {
    let Some(h) = hosts(2) else { return };
    run(&h, 2, "conformance", &[]);
}

#[test]
fn conformance_3_hosts_x_1_rank() {
    let Some(h) = hosts(3) else { return };
    run(&h, 1, "conformance", &[("OXCCL_TCP_STREAMS", "3")]);
}

#[test]
fn order_and_lazy_connections_across_hosts() {
    let Some(h) = hosts(3) else { return };
    run(&h, 1, "order", &[]);
    run(&h, 1, "lazy", &[]);
}

/// The harness leaves nothing behind: after a Hosts is dropped, none of its namespaces exist.
#[test]
fn namespaces_are_removed() {
    let Some(h) = hosts(2) else { return };
    let names = h.names();
    let list = || {
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned()
    };
    let before = list();
    assert_eq!(names.len(), 3);
    for ns in &names {
        assert!(
            before.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())),
            "{ns} was not created: {before}"
        );
    }
    drop(h);
    let after = list();
    for ns in &names {
        assert!(!after.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())), "{ns} still exists: {after}");
    }
}

/// The hierarchical all_reduce, broadcast and all_gather (auto-picked for 2 hosts x 2 ranks
/// above the small-message thresholds) and the flat algorithms, each forced.
#[test]
fn hierarchical_and_flat_all_reduce_across_hosts() {
    let Some(h) = hosts(2) else { return };
    run(&h, 2, "conformance", &[("OXCCL_ALGO", "all_reduce=hier,broadcast=hier,all_gather=hier")]);
    run(&h, 2, "conformance", &[("OXCCL_ALGO", "all_reduce=ring,all_gather=ring,broadcast=chain")]);
}

/// net-libfabric over the `tcp;ofi_rxm` provider between namespaces, host staging within them.
#[test]
fn conformance_over_libfabric_2_hosts_x_2_ranks() {
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let Some(h) = hosts(2) else { return };
    run(&h, 2, "conformance", &[("OXCCL_NET", "libfabric"), ("OXCCL_LIBFABRIC_PROVIDER", "tcp")]);
    run(&h, 2, "order", &[("OXCCL_NET", "libfabric"), ("OXCCL_LIBFABRIC_PROVIDER", "tcp")]);
}

/// TLS on the store and every net-tcp link between hosts (`OXCCL_TLS_*`, a certificate per
/// rank under one CA), with the job secret inside: the conformance suite passes, and explain
/// says which links are over TLS.
#[test]
fn conformance_with_tls_between_hosts() {
    let Some(h) = hosts(2) else { return };
    let dir = std::env::temp_dir().join(format!("oxccl-netns-tls-{}", std::process::id()));
    let names: Vec<String> = (0..4).map(|r| format!("r{r}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (ca, _) = oxccl_transports::tls::testing::make(&dir, &names);
    let cert = format!("{}/r{{rank}}.pem", dir.display());
    let key = format!("{}/r{{rank}}.key", dir.display());
    let tls = [("OXCCL_TLS_CERT", cert.as_str()), ("OXCCL_TLS_KEY", key.as_str()), ("OXCCL_TLS_CA", ca.as_str())];
    run(&h, 2, "conformance", &tls);
    // Explain, per link.
    let exe = Path::new(env!("CARGO_BIN_EXE_rank_worker"));
    let cmds = (0..2).map(|r| h.command(r, exe)).collect();
    let store = format!("tcp://{}:29732", h.addr(0));
    let mut env: Vec<(&str, &str)> = vec![
        ("OXCCL_STORE", &store),
        ("OXCCL_HOST_ID", "nshost{rank}"),
        ("OXCCL_SOCKET_IFNAME", "eth0"),
        ("OXCCL_NET", "tcp"),
    ];
    env.extend_from_slice(&tls);
    let res = run_commands(cmds, &["explained"], &env, Duration::from_secs(120));
    assert_all_ok("explained over TLS", &res);
    let explain = oxccl_tests::report::get(&res[0].1, "explain").and_then(|v| v.as_str().map(String::from));
    let explain = explain.unwrap_or_default();
    assert!(explain.contains("TLS on the store and net-tcp"), "{explain}");
    assert!(
        explain.lines().any(|l| l.contains("peer    1") && l.contains("net-tcp") && l.contains("over TLS")),
        "{explain}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
