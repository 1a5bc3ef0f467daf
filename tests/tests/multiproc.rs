//! The conformance suite, multi-process over host-staging, with 1 to 4 ranks; plus message
//! order, split, non-blocking work and argument checks. Every run is bounded in time.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::{assert_all_ok, run_ranks};

fn worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rank_worker"))
}

const LIMIT: Duration = Duration::from_secs(240);

fn run(n: usize, scenario: &str, env: &[(&str, &str)]) {
    let res = run_ranks(worker(), n, &[scenario, "7"], env, LIMIT);
    assert_all_ok(&format!("{scenario} with {n} ranks"), &res);
    for (i, r) in res.iter().enumerate() {
        oxccl_tests::report::passed(i, &r.1);
    }
}

#[test]
fn conformance_1_rank() {
    run(1, "conformance", &[("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn conformance_2_ranks() {
    run(2, "conformance", &[("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn conformance_3_ranks() {
    run(3, "conformance", &[("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn conformance_4_ranks() {
    run(4, "conformance", &[("OXCCL_TIMEOUT", "60s")]);
}

/// Many segments and pieces: tiny pipelining segments, tiny staging rings, both algorithms.
#[test]
fn conformance_3_ranks_many_segments_ring() {
    run(
        3,
        "conformance",
        &[
            ("OXCCL_SEGMENT_BYTES", "1K"),
            ("OXCCL_CHUNK_BYTES", "4K"),
            ("OXCCL_STAGING_BYTES", "16K"),
            ("OXCCL_ALGO", "all_reduce=ring,broadcast=chain"),
            ("OXCCL_TIMEOUT", "60s"),
        ],
    );
}

#[test]
fn conformance_4_ranks_small_message_algorithms() {
    run(4, "conformance", &[("OXCCL_ALGO", "all_reduce=rd,broadcast=tree"), ("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn mixed_small_and_large_messages_keep_order() {
    run(2, "order", &[("OXCCL_CHUNK_BYTES", "64K"), ("OXCCL_STAGING_BYTES", "256K")]);
    run(3, "order", &[]);
}

/// Single copy (`OXCCL_SINGLE_COPY_BYTES`) between processes: messages read by address, the
/// large ones (from 512 KiB) with the copy shared by the writer; order, content and every
/// collective stay right.
#[test]
fn single_copy_and_shared_copies_keep_order_and_results() {
    run(3, "order", &[("OXCCL_SINGLE_COPY_BYTES", "64K")]);
    run(4, "conformance", &[("OXCCL_SINGLE_COPY_BYTES", "64K"), ("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn split_communicators() {
    run(4, "split", &[]);
    run(3, "split", &[]);
}

#[test]
fn work_handles() {
    run(3, "async", &[]);
    run(1, "async", &[]);
}

#[test]
fn bad_input_is_refused_before_any_byte_moves() {
    run(3, "errors", &[]);
}

#[test]
fn an_idle_rank_sleeps_instead_of_burning_a_core() {
    run(2, "idle", &[]);
}

#[test]
fn lazy_connections_do_not_deadlock_point_to_point() {
    run(3, "lazy", &[("OXCCL_TIMEOUT", "30s")]);
}

#[test]
fn mismatched_collectives_fail_on_both_ranks_and_poison_the_communicator() {
    run(2, "mismatch", &[("OXCCL_TIMEOUT", "60s")]);
}

#[test]
fn the_store_rank_0_hosts_outlives_every_communicator() {
    // Rank 0 hosts the store itself here (not the test harness): a free port for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("tcp://127.0.0.1:{port}");
    run(4, "store_outlives", &[("OXCCL_STORE", &store), ("OXCCL_STORE_HOSTED", "0"), ("OXCCL_TIMEOUT", "30s")]);
}

/// Several "hosts" on one machine (OXCCL_HOST_ID): same-host pairs use host-staging, the
/// others net-tcp over loopback; the whole conformance suite, 2 hosts x 2 ranks.
#[test]
fn conformance_2_hosts_x_2_ranks_over_host_staging_and_net_tcp() {
    run(
        4,
        "conformance",
        &[
            ("OXCCL_HOST_ID", "host{rank/2}"),
            ("OXCCL_SOCKET_IFNAME", "lo"),
            ("OXCCL_NET", "tcp"),
            ("OXCCL_TIMEOUT", "60s"),
        ],
    );
}

/// The multi-process conformance suite over net-ibverbs on a real HCA: 2 "hosts" x 2 ranks on
/// this machine, the pairs across "hosts" through the HCA (loopback between processes), those
/// within one over host-staging. Needs an RDMA device and a build with the `ibverbs` feature:
/// `OXCCL_TEST_IB_DEVICE=mlx5_0:1 cargo test -p oxccl-tests --features ibverbs --test multiproc
/// -- --ignored ib_` (docs/transports.md; `rxe0:1` for soft-RoCE).
#[test]
#[ignore = "needs an RDMA device (OXCCL_TEST_IB_DEVICE=hca:port) and the ibverbs feature"]
fn ib_conformance_2_hosts_x_2_ranks_over_net_ibverbs() {
    let dev = std::env::var("OXCCL_TEST_IB_DEVICE").expect("OXCCL_TEST_IB_DEVICE=hca:port names the device");
    let hca = format!("={dev}");
    run(
        4,
        "conformance",
        &[
            ("OXCCL_HOST_ID", "host{rank/2}"),
            ("OXCCL_NET", "ibverbs"),
            ("OXCCL_IB_HCA", hca.as_str()),
            ("OXCCL_TIMEOUT", "120s"),
        ],
    );
}

/// 3 hosts x 1 rank: net-tcp only, one stream and three, tiny pieces (striping, many pieces).
#[test]
fn conformance_3_hosts_over_net_tcp() {
    run(
        3,
        "conformance",
        &[
            ("OXCCL_HOST_ID", "host{rank}"),
            ("OXCCL_SOCKET_IFNAME", "lo"),
            ("OXCCL_NET", "tcp"),
            ("OXCCL_TIMEOUT", "60s"),
        ],
    );
    run(
        3,
        "conformance",
        &[
            ("OXCCL_HOST_ID", "host{rank}"),
            ("OXCCL_SOCKET_IFNAME", "lo"),
            ("OXCCL_NET", "tcp"),
            ("OXCCL_TCP_STREAMS", "3"),
            ("OXCCL_TCP_CHUNK_BYTES", "4K"),
            ("OXCCL_TIMEOUT", "60s"),
        ],
    );
}

#[test]
fn order_and_errors_over_net_tcp() {
    let env = [
        ("OXCCL_HOST_ID", "host{rank}"),
        ("OXCCL_SOCKET_IFNAME", "lo"),
        ("OXCCL_NET", "tcp"),
        ("OXCCL_TCP_STREAMS", "4"),
    ];
    run(3, "order", &env);
    run(3, "lazy", &env);
    run(2, "idle", &env);
    run(
        2,
        "mismatch",
        &[
            ("OXCCL_HOST_ID", "host{rank}"),
            ("OXCCL_SOCKET_IFNAME", "lo"),
            ("OXCCL_NET", "tcp"),
            ("OXCCL_TIMEOUT", "60s"),
        ],
    );
}

/// The GPU data path's logic without a GPU: a simulated GPU (`OXCCL_GPU=simulated`, pieces of
/// 4 KiB so that every message of the suite is cut into many, 2 bounce buffers) under every
/// collective and send/recv, each equal byte for byte to the call on host buffers; over
/// host-staging (3 ranks on one host), net-tcp (3 "hosts"), and with rank 1 having no GPU (its
/// host buffers cross the same staged links).
#[test]
fn gpu_data_staged_through_host_memory_on_a_simulated_gpu() {
    let staged = [("OXCCL_STAGING_PIECE", "4K"), ("OXCCL_STAGING_BUFFERS", "2"), ("OXCCL_TIMEOUT", "60s")];
    let sim = [("OXCCL_GPU", "simulated")];
    let tcp = [("OXCCL_HOST_ID", "host{rank}"), ("OXCCL_NET", "tcp"), ("OXCCL_SOCKET_IFNAME", "lo")];
    let mixed = [("OXCCL_GPU", "{pick:simulated,off,simulated}")];
    for env in [[&staged[..], &sim].concat(), [&staged[..], &sim, &tcp].concat(), [&staged[..], &mixed].concat()] {
        let res = run_ranks(worker(), 3, &["device", "7"], &env, LIMIT);
        assert_all_ok(&format!("device {env:?}"), &res);
        for (i, r) in res.iter().enumerate() {
            oxccl_tests::report::passed(i, &r.1);
            for line in r.1.lines().filter(|l| l.contains("checks") || l.contains("GPU data")) {
                println!("rank {i}: {line}");
            }
        }
    }
}

/// Runs `scenario` on a real GPU (`OXCCL_GPU=auto`, every rank on GPU 0) with each number of
/// ranks in `sizes`, over p2p and staged (`OXCCL_P2P=off`); each rank's explain must say
/// which. Without a GPU (or without the `cuda` feature): `skipped: no GPU`.
fn on_a_real_gpu(scenario: &str, sizes: &[usize]) {
    #[cfg(feature = "cuda")]
    let why = oxccl::gpu::probe().err();
    #[cfg(not(feature = "cuda"))]
    let why = Some("this build has no cuda feature".to_string());
    if let Some(why) = why {
        oxccl_core::testing::skip(oxccl_core::testing::Need::Gpu, format!("no GPU ({why})"));
        return;
    }
    for p2p in ["auto", "off"] {
        for &n in sizes {
            let env = [("OXCCL_GPU", "auto"), ("OXCCL_P2P", p2p), ("OXCCL_TIMEOUT", "120s")];
            let res = run_ranks(worker(), n, &[scenario, "7"], &env, LIMIT);
            assert_all_ok(&format!("{scenario} on a real GPU, {n} ranks, OXCCL_P2P={p2p}"), &res);
            for (i, r) in res.iter().enumerate() {
                oxccl_tests::report::passed(i, &r.1);
                let want = if p2p == "auto" { "GPU data moves GPU to GPU (p2p" } else { "GPU data staged" };
                assert!(r.1.contains(want), "rank {i}: explain does not say {want:?}:\n{}", r.1);
                for line in r.1.lines().filter(|l| l.contains("checks") || l.contains("GPU data")) {
                    println!("{scenario}, OXCCL_P2P={p2p}, {n} ranks, rank {i}: {line}");
                }
            }
        }
    }
}

/// Batches (NCCL's groups), sends and receives on the caller's stream of a real GPU: 2 and 3
/// ranks sharing GPU 0, over p2p and staged (`OXCCL_P2P=off`): the results, copied to the host
/// on the same stream after the calls, are right (the `device_streams` scenario). Without a
/// GPU: `skipped: no GPU`. `bench/gpu/verify.sh` runs it on a GPU host.
#[test]
fn gpu_streams_on_a_real_gpu_batches_sends_and_receives() {
    on_a_real_gpu("device_streams", &[2, 3]);
}

/// The conformance of GPU buffers on a real GPU: every collective and send/recv on device
/// memory of 2 and 4 ranks sharing GPU 0, byte for byte what host buffers give (`OXCCL_GPU=auto`:
/// the scenario allocates and fills device memory), GPU to GPU (p2p, CUDA IPC) and staged
/// through host memory (`OXCCL_P2P=off`). Without a GPU (or without the `cuda` feature) it
/// says `skipped: no GPU`. `bench/gpu/verify.sh` runs it on a GPU host.
#[test]
fn gpu_buffers_on_a_real_gpu_2_and_4_ranks() {
    on_a_real_gpu("device", &[2, 4]);
}
