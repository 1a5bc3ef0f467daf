//! Scenarios of the endpoint budget and bandwidth priority.

use std::time::Duration;

use oxccl::{Communicator, Error, ReduceOp, TransportKind};
use oxccl_tests::report;

/// The situation the budget manager exists for (run by tests/tests/budget.rs over two
/// namespaces): rank 0 is trainer t0 on host A (NIC limit 2), rank 1 trainer t1 and rank 2
/// inference rank i0 on host B (limit 3); `OXCCL_RESERVE=gradient:1,pipeline_stage:1`. Over a
/// net-tcp base communicator, three children are created in the order `order` (0..6) names:
/// Gradient {t0, t1}, WeightRefit {t0, i0}, PipelineStage {t0, t1}, on net-libfabric.
pub(crate) fn budget(c: &Communicator, order: u64) -> usize {
    use oxccl::TrafficClass::{self, *};
    assert_eq!(c.world_size(), 3, "the budget scenario has 3 ranks");
    const ORDERS: [[TrafficClass; 3]; 6] = [
        [Gradient, WeightRefit, PipelineStage],
        [Gradient, PipelineStage, WeightRefit],
        [WeightRefit, Gradient, PipelineStage],
        [WeightRefit, PipelineStage, Gradient],
        [PipelineStage, Gradient, WeightRefit],
        [PipelineStage, WeightRefit, Gradient],
    ];
    let seq = ORDERS[order as usize % 6];
    let r = c.rank();
    let mut base = c.config();
    base.set("OXCCL_NET", "libfabric,tcp").unwrap();
    let fallback = base.budget.tcp_fallback[WeightRefit.index()];
    let pos = |k: TrafficClass| seq.iter().position(|x| *x == k).unwrap();
    let mut comms: Vec<(TrafficClass, Communicator)> = Vec::new();
    let mut refit_err = None;
    for class in seq {
        let member = match class {
            WeightRefit => r != 1,
            _ => r != 2,
        };
        let mut cfg = base.clone();
        cfg.set("OXCCL_CLASS", class.name()).unwrap();
        match c.split_with_config(member.then_some(class.index() as u32), 0, cfg) {
            Ok(Some(x)) => comms.push((class, x)),
            Ok(None) => assert!(!member),
            Err(e) if class == WeightRefit => refit_err = Some(e),
            Err(e) => panic!("rank {r}: creating the {class} communicator: {e}"),
        }
    }
    let mut checks = 0;
    // t0's refit finds no endpoint of its own on host A (limit 2, gradient and pipeline
    // reserve 1 each) and, when it comes first, no endpoint of its process to share.
    let refit_first = pos(WeightRefit) < pos(Gradient) && pos(WeightRefit) < pos(PipelineStage);
    let refit_fails = refit_first && !fallback;
    if r != 1 {
        assert_eq!(refit_err.is_some(), refit_fails, "rank {r}: refit error: {refit_err:?}");
    }
    if let Some(e) = &refit_err {
        let m = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(m.contains("has no endpoint") && m.contains("limit 2 (OXCCL_NIC_ENDPOINTS)"), "{m}");
        assert!(m.contains("weight_refit may not fall back to net-tcp"), "{m}");
        assert!(m.contains("1 more for gradient") && m.contains("1 more for pipeline_stage"), "{m}");
        assert!(m.contains("rank 0 cannot reach rank 1"), "every member gets the same error: {m}");
        checks += 1;
    }
    for (class, x) in &comms {
        let ex = x.explain();
        let json = serde_json::to_value(&ex).unwrap();
        assert_eq!(json["class"], class.name(), "{json}");
        assert_eq!(x.class(), *class);
        // Every child moves data and gets it right.
        let n = 1 << 18;
        let mut v: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + x.rank() as f32).collect();
        if *class == WeightRefit {
            x.broadcast_in_place(&mut v, 0).unwrap();
            assert!(v.iter().enumerate().all(|(i, &y)| y == (i % 97) as f32), "{class} broadcast");
        } else {
            x.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
            assert!(v.iter().enumerate().all(|(i, &y)| y == 2.0 * (i % 97) as f32 + 1.0), "{class} all_reduce");
        }
        let links = x.links();
        assert_eq!(links.len(), 1, "{links:?}");
        let ex = x.explain();
        let json = serde_json::to_value(&ex).unwrap();
        let ep = &json["endpoint"];
        let on_a = r == 0;
        match class {
            Gradient | PipelineStage => {
                // Reserved classes get a dedicated endpoint on net-libfabric, in every order,
                // and never net-tcp.
                assert_eq!(links[0].1, TransportKind::NetLibfabric, "{class}: {json}");
                assert_eq!(ep["dedicated"], true, "{json}");
                assert_eq!(ep["lease"]["class"], class.name(), "{json}");
                assert_eq!(ep["limit"], if on_a { 2 } else { 3 }, "{json}");
                assert_eq!(ep["limit_from"], "OXCCL_NIC_ENDPOINTS", "{json}");
                assert!(ep["provider_limits"]["ep_cnt"].as_u64().unwrap() > 0, "{json}");
                assert!(ep["provider_limits"]["mr_mode"].is_string(), "{json}");
                assert_eq!(json["net_note"], "", "{json}");
                let nic = &json["nics"][0];
                assert_eq!(nic["nic"], ep["nic"], "{json}");
                let holders = nic["holders"].as_array().unwrap();
                assert!(holders.iter().any(|h| h["comm"] == ep["lease"]["comm"]), "{json}");
                assert_eq!(nic["leased"].as_u64().unwrap() as usize, holders.len(), "{json}");
                assert_eq!(json["peers"][0]["transport"], "net-libfabric", "{json}");
            }
            _ if on_a && refit_first => {
                // Fell back to net-tcp, said so, with the budget's words.
                assert_eq!(links[0].1, TransportKind::NetTcp, "{json}");
                assert!(ep.is_null(), "{json}");
                let note = json["net_note"].as_str().unwrap();
                assert!(
                    note.contains("net-tcp instead of net-libfabric") && note.contains("has no endpoint"),
                    "{note}"
                );
                assert!(json["peers"][0]["reason"].as_str().unwrap().contains("has no endpoint"), "{json}");
            }
            _ if on_a => {
                // Shares an endpoint of its process: the one opened for the lowest class.
                assert_eq!(links[0].1, TransportKind::NetLibfabric, "{json}");
                assert_eq!(ep["dedicated"], false, "{json}");
                assert!(ep["lease"].is_null(), "{json}");
                let want = if pos(PipelineStage) < pos(WeightRefit) { "pipeline_stage" } else { "gradient" };
                assert_eq!(ep["opened_for"], want, "{json}");
            }
            _ => {
                // i0 on host B: its own endpoint (limit 3 leaves one for refit in any order),
                // given back at once when t0 could offer only net-tcp.
                if refit_first {
                    assert_eq!(links[0].1, TransportKind::NetTcp, "{json}");
                    assert!(ep.is_null(), "an endpoint no link uses is not kept: {json}");
                    assert!(json["peers"][0]["reason"].as_str().unwrap().contains("rank 0: net-tcp instead"), "{json}");
                } else {
                    assert_eq!(links[0].1, TransportKind::NetLibfabric, "{json}");
                    assert_eq!(ep["dedicated"], true, "{json}");
                }
            }
        }
        checks += 1;
    }
    // The process-wide view lists every child (and the base communicator).
    let all = oxccl::explain_process();
    assert_eq!(all.communicators.len(), comms.len() + 1, "{}", all.to_text());
    for (_, x) in comms {
        x.close().unwrap();
    }
    checks
}

/// Creates the communicator (done by `main`), checks it got a dedicated NIC endpoint and
/// moves data; then says so on stdout and holds it for `secs` seconds (tests kill it).
pub(crate) fn lease_hold(c: &Communicator, secs: u64) -> usize {
    use std::io::Write;
    let ex = c.explain();
    let ep = ex.endpoint.as_ref().expect("a NIC endpoint");
    assert!(ep.dedicated, "{ex:?}");
    let mut v = vec![1.0f32; 1 << 16];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|&x| x == c.world_size() as f32));
    report::emit(serde_json::json!({ "event": "holding", "pid": std::process::id(), "comm": ex.name, "nic": ep.nic }));
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(secs));
    2
}

/// The bandwidth-priority workload of `cargo bench -p oxccl-tests --bench priority`: two
/// ranks on two hosts, a Gradient and a WeightRefit communicator over net-libfabric; times a
/// 16 MiB all_reduce alone, then while a 1 GiB broadcast runs on the refit communicator.
pub(crate) fn priority(c: &Communicator) -> usize {
    use oxccl::TrafficClass::{self, *};
    use std::time::Instant;
    let mut cfg = c.config();
    cfg.set("OXCCL_NET", "libfabric,tcp").unwrap();
    let make = |class: TrafficClass| {
        let mut k = cfg.clone();
        k.set("OXCCL_CLASS", class.name()).unwrap();
        c.split_with_config(Some(class.index() as u32), 0, k).unwrap().expect("member")
    };
    let grad = make(Gradient);
    let refit = make(WeightRefit);
    let n = (16 << 20) / 4;
    let mut g = vec![1.0f32; n];
    let time_one = |g: &mut Vec<f32>| {
        g.iter_mut().for_each(|x| *x = 1.0);
        let t = Instant::now();
        grad.all_reduce_in_place(g, ReduceOp::Sum).unwrap();
        let dt = t.elapsed().as_secs_f64() * 1e3;
        assert!(g.iter().all(|&x| x == 2.0));
        dt
    };
    time_one(&mut g);
    let mut warm = vec![0u8; 1 << 20];
    refit.broadcast_in_place(&mut warm, 0).unwrap();
    for (_, k) in grad.links().into_iter().chain(refit.links()) {
        assert_eq!(k, TransportKind::NetLibfabric);
    }
    let mut alone: Vec<f64> = (0..5).map(|_| time_one(&mut g)).collect();
    c.barrier().unwrap();
    let rank = c.rank();
    let refit_run = std::thread::spawn(move || {
        let mut big = vec![0u8; 1 << 30];
        if rank == 0 {
            big.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 251) as u8);
        }
        let t = Instant::now();
        refit.broadcast_in_place(&mut big, 0).unwrap();
        let dt = t.elapsed().as_secs_f64();
        assert!(big.iter().enumerate().step_by(4093).all(|(i, &x)| x == (i % 251) as u8));
        dt
    });
    // Let the broadcast fill the link (rank 0 fills its buffer first).
    std::thread::sleep(Duration::from_millis(1500));
    grad.barrier().unwrap();
    let mut busy: Vec<f64> = (0..8).map(|_| time_one(&mut g)).collect();
    let refit_s = refit_run.join().unwrap();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (alone_ms, contended_ms) = (med(&mut alone), med(&mut busy));
    println!("priority: rank {rank} alone_ms={alone_ms:.1} contended_ms={contended_ms:.1} refit_s={refit_s:.2}");
    report::emit(serde_json::json!({ "alone_ms": alone_ms, "contended_ms": contended_ms, "refit_s": refit_s }));
    1
}
