//! The endpoint budget across processes and hosts: the single-NIC situation OxCCL exists for,
//! in every order of creation, over two network namespaces and net-libfabric (`tcp;ofi_rxm`).
//! Without root, iproute2 or the `libfabric` feature the namespace tests print `skipped: <why>`.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::netns::Hosts;
use oxccl_tests::{assert_all_ok, run_commands};

/// A ledger directory of its own, so that concurrent tests never share leases.
struct Dir(std::path::PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("oxccl-budget-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
    /// Lease files left (none once every communicator is closed).
    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ready() -> Option<Hosts> {
    if !cfg!(feature = "libfabric") {
        println!("skipped: built without the libfabric feature (cargo test --features libfabric)");
        return None;
    }
    match Hosts::create(2) {
        Ok(h) => Some(h),
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// Rank 0 (trainer t0) alone on host A with a NIC limit of 2; ranks 1 (trainer t1) and 2
/// (inference i0) on host B with 3. Every order of creating the Gradient, WeightRefit and
/// PipelineStage communicators.
fn situation(fallback: Option<&str>) {
    let Some(h) = ready() else { return };
    let exe = Path::new(env!("CARGO_BIN_EXE_rank_worker"));
    let store = format!("tcp://{}:29741", h.addr(0));
    for order in 0..6 {
        let dir = Dir::new(&format!("situation{order}{}", fallback.unwrap_or("")));
        let cmds = [(0, "2"), (1, "3"), (1, "3")]
            .iter()
            .map(|&(host, limit)| {
                let mut c = h.command(host, exe);
                c.env("OXCCL_HOST_ID", format!("budgethost{host}")).env("OXCCL_NIC_ENDPOINTS", format!("*:{limit}"));
                c
            })
            .collect();
        let mut env: Vec<(&str, &str)> = vec![
            ("OXCCL_STORE", &store),
            ("OXCCL_STORE_HOSTED", "0"),
            ("OXCCL_SOCKET_IFNAME", "eth0"),
            ("OXCCL_TIMEOUT", "60s"),
            // The base communicator runs on net-tcp and takes no endpoint.
            ("OXCCL_NET", "tcp"),
            ("OXCCL_LIBFABRIC_PROVIDER", "tcp"),
            ("OXCCL_RESERVE", "gradient:1,pipeline_stage:1"),
            ("OXCCL_LEDGER_DIR", dir.path()),
        ];
        if let Some(f) = fallback {
            env.push(("OXCCL_TCP_FALLBACK", f));
        }
        let seed = order.to_string();
        let res = run_commands(cmds, &["budget", &seed], &env, Duration::from_secs(120));
        assert_all_ok(&format!("budget situation, order {order}, fallback {fallback:?}"), &res);
        for (i, r) in res.iter().enumerate() {
            assert!(r.1.contains("checks passed"), "rank {i}: {}", r.1);
        }
        // A falling-back refit is said at warn level.
        let refit_first = order == 2 || order == 3;
        if refit_first && fallback.is_none() {
            assert!(res[0].2.contains("WARN") && res[0].2.contains("net-tcp instead of net-libfabric"), "{}", res[0].2);
        }
        assert!(dir.leases().is_empty(), "leases left after every communicator closed: {:?}", dir.leases());
    }
}

#[test]
fn the_gradient_communicator_keeps_its_endpoints_in_every_order() {
    situation(None);
}

#[test]
fn without_fallback_the_refit_communicator_shares_or_fails_with_the_budget() {
    situation(Some("none"));
}
