//! net-libfabric between processes of this machine, as if on different hosts
//! (`OXCCL_HOST_ID`): the conformance suite over the `tcp;ofi_rxm` provider (with and without
//! registering every buffer, with tiny pieces), host staging plus libfabric with two ranks per
//! "host", the `shm` provider, message order, lazy connections and mismatched calls.
//! `tests/tests/netns.rs` runs it between network namespaces. Built without the `libfabric`
//! feature, or with no provider, each test prints `skipped: <why>`.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, run_ranks};

fn worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rank_worker"))
}

fn enabled() -> bool {
    if !cfg!(feature = "libfabric") {
        println!("skipped: built without the libfabric feature (cargo test --features libfabric)");
        return false;
    }
    if std::process::Command::new("fi_info").arg("-l").output().is_err() {
        println!("skipped: no fi_info on PATH (apt-get install libfabric-bin)");
        return false;
    }
    true
}

fn run(n: usize, scenario: &str, env: &[(&str, &str)]) {
    let mut all = vec![("OXCCL_NET", "libfabric"), ("OXCCL_TIMEOUT", "60s")];
    all.extend_from_slice(env);
    let res = run_ranks(worker(), n, &[scenario, "13"], &all, Duration::from_secs(240));
    assert_all_ok(&format!("{scenario} with {n} ranks over net-libfabric {env:?}"), &res);
    for (i, r) in res.iter().enumerate() {
        assert!(r.1.contains("checks passed"), "rank {i} printed no result: {}", r.1);
    }
}

const TCP: (&str, &str) = ("OXCCL_LIBFABRIC_PROVIDER", "tcp");

#[test]
fn conformance_3_hosts_over_the_tcp_provider() {
    if !enabled() {
        return;
    }
    run(3, "conformance", &[("OXCCL_HOST_ID", "host{rank}"), TCP]);
    // Every buffer registered (the path EFA's FI_MR_LOCAL needs), tiny pieces.
    run(
        3,
        "conformance",
        &[
            ("OXCCL_HOST_ID", "host{rank}"),
            TCP,
            ("OXCCL_LIBFABRIC_REGISTER", "always"),
            ("OXCCL_LIBFABRIC_CHUNK_BYTES", "4K"),
        ],
    );
}

#[test]
fn conformance_2_hosts_x_2_ranks_over_host_staging_and_libfabric() {
    if !enabled() {
        return;
    }
    run(4, "conformance", &[("OXCCL_HOST_ID", "host{rank/2}"), TCP]);
}

#[test]
fn conformance_over_the_shm_provider() {
    if !enabled() {
        return;
    }
    run(2, "conformance", &[("OXCCL_HOST_ID", "host{rank}"), ("OXCCL_LIBFABRIC_PROVIDER", "shm")]);
}

#[test]
fn order_lazy_connections_and_mismatches_over_libfabric() {
    if !enabled() {
        return;
    }
    let env = [("OXCCL_HOST_ID", "host{rank}"), TCP];
    run(3, "order", &env);
    run(3, "lazy", &env);
    run(2, "mismatch", &[("OXCCL_HOST_ID", "host{rank}"), TCP, ("OXCCL_TIMEOUT", "60s")]);
}
