//! Bandwidth priority between traffic classes (docs/budget.md): two network namespaces
//! joined by a link shaped to 1 Gbit/s (tc tbf), one process per "host", each with a
//! Gradient and a WeightRefit communicator on net-libfabric (`tcp;ofi_rxm`). Times a 16 MiB
//! Gradient all_reduce alone and while a 1 GiB WeightRefit broadcast runs from the same
//! processes over the same link, with priority on (`OXCCL_CLASS_SHARE`, default 0.1) and off
//! (`OXCCL_CLASS_SHARE=1`), alternating per launch.
//!
//! Run as root: `cargo bench -p oxccl-tests --features libfabric --bench priority [-- LAUNCHES [RATE]]`.

use std::path::Path;
use std::time::Duration;

use oxccl_tests::netns::Hosts;
use oxccl_tests::{assert_all_ok, run_commands};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let launches: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let rate = args.get(1).cloned().unwrap_or_else(|| "1gbit".into());
    if !cfg!(feature = "libfabric") {
        println!("skipped: built without the libfabric feature");
        return;
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_rank_worker"));
    let variants = [("priority on (OXCCL_CLASS_SHARE=0.1)", "0.1"), ("priority off (OXCCL_CLASS_SHARE=1)", "1")];
    let mut ratios = vec![Vec::new(); variants.len()];
    println!("16 MiB Gradient all_reduce, alone vs during a 1 GiB WeightRefit broadcast; link {rate}");
    for launch in 0..launches {
        for (vi, (name, share)) in variants.iter().enumerate() {
            let h = match Hosts::create(2) {
                Ok(h) => h,
                Err(why) => {
                    println!("skipped: {why}");
                    return;
                }
            };
            for i in 0..2 {
                h.shape(i, &rate, "256kb", "50ms").expect("tc tbf");
            }
            let store = format!("tcp://{}:29751", h.addr(0));
            let cmds = (0..2).map(|i| h.command(i, exe)).collect();
            let env = [
                ("OXCCL_STORE", store.as_str()),
                ("OXCCL_STORE_HOSTED", "0"),
                ("OXCCL_HOST_ID", "prio{rank}"),
                ("OXCCL_SOCKET_IFNAME", "eth0"),
                ("OXCCL_TIMEOUT", "120s"),
                ("OXCCL_NET", "tcp"),
                ("OXCCL_LIBFABRIC_PROVIDER", "tcp"),
                ("OXCCL_CLASS_SHARE", share),
            ];
            let res = run_commands(cmds, &["priority", "0"], &env, Duration::from_secs(300));
            assert_all_ok(name, &res);
            let figure = |k: &str| {
                oxccl_tests::report::get(&res[0].1, k).and_then(|v| v.as_f64()).expect("rank 0 reports its figures")
            };
            let (alone, busy, refit) = (figure("alone_ms"), figure("contended_ms"), figure("refit_s"));
            let ratio = busy / alone;
            ratios[vi].push(ratio);
            println!(
                "launch {launch}  {name:<36} alone {alone:7.1} ms  during refit {busy:7.1} ms  ratio {ratio:5.2}  \
                 (refit 1 GiB took {refit:.1} s)"
            );
        }
    }
    for (vi, (name, _)) in variants.iter().enumerate() {
        println!("median ratio, {name}: {:.2} over {launches} launches", median(&mut ratios[vi]));
    }
}
