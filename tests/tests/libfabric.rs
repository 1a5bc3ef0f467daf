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
    oxccl_tests::libfabric_ready()
}

fn run(n: usize, scenario: &str, env: &[(&str, &str)]) {
    let mut all = vec![("OXCCL_NET", "libfabric"), ("OXCCL_TIMEOUT", "60s")];
    all.extend_from_slice(env);
    let res = run_ranks(worker(), n, &[scenario, "13"], &all, Duration::from_secs(240));
    assert_all_ok(&format!("{scenario} with {n} ranks over net-libfabric {env:?}"), &res);
    for (i, r) in res.iter().enumerate() {
        oxccl_tests::report::passed(i, &r.1);
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

/// Run-time probing: with no usable provider (here a name no provider has; on a machine
/// without libfabric, or a build without the feature, the same), net-libfabric is not
/// offered. Ranks on different hosts that may also use net-tcp move on to it; told to use
/// only net-libfabric, creation fails on every rank with an error that says why.
#[test]
fn an_unusable_provider_moves_selection_on_or_fails_when_it_was_the_only_choice() {
    use oxccl::{Communicator, Config, MemStore, TransportKind};
    use std::sync::Arc;
    for only in [false, true] {
        let store: Arc<dyn oxccl::Store> = Arc::new(MemStore::new());
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut cfg = Config::defaults();
                    cfg.set("OXCCL_NET", if only { "libfabric" } else { "libfabric,tcp" }).unwrap();
                    cfg.set("OXCCL_LIBFABRIC_PROVIDER", "no-such-provider").unwrap();
                    cfg.set("OXCCL_HOST_ID", &format!("probehost{r}")).unwrap();
                    // Two "hosts" on one machine: net-tcp stays on loopback (no secret needed).
                    cfg.set("OXCCL_SOCKET_IFNAME", "lo").unwrap();
                    cfg.set("OXCCL_TIMEOUT", "20s").unwrap();
                    match Communicator::init(store, r, 2, cfg) {
                        Ok(c) if !only => {
                            let mut v = vec![1.0f64; 10_000];
                            c.all_reduce_in_place(&mut v, oxccl::ReduceOp::Sum).unwrap();
                            assert!(v.iter().all(|&x| x == 2.0));
                            // Links are made on first use: the all_reduce made this one.
                            assert_eq!(c.links(), vec![(1 - r, TransportKind::NetTcp)]);
                            c.close().unwrap();
                            String::new()
                        }
                        Ok(_) => panic!("rank {r}: created with no usable transport"),
                        Err(e) => {
                            assert!(only, "rank {r}: {e}");
                            e.to_string()
                        }
                    }
                })
            })
            .collect();
        for t in ranks {
            let e = t.join().unwrap();
            if only {
                println!("{e}");
                assert!(e.contains("net-libfabric"), "{e}");
                assert!(
                    e.contains("no-such-provider") || e.contains("built without the libfabric feature"),
                    "the error says why: {e}"
                );
            }
        }
    }
}
