//! `p2p` as a registered transport, on the simulated GPU (`OXCCL_GPU=simulated`): ranks as
//! threads of one process, where the simulated GPU's "IPC handle" (a pointer) opens a peer's
//! buffer. The routes, the transports each rank opens, the links' protocol and explain are
//! the ones a real GPU takes; only the copies are the simulated GPU's (late, so that a done
//! said too early shows as wrong bytes).

use std::sync::Arc;

use oxccl::{Communicator, Config, MemStore, Store, TransportKind};

/// Runs `f` on `world` ranks (threads), each on the simulated GPU, with `tweak` applied to
/// its settings; returns what each rank's `f` returned.
fn ranks<T: Send + 'static>(
    world: usize,
    tweak: impl Fn(usize, &mut Config) + Send + Sync + 'static,
    f: impl Fn(&Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (f, tweak) = (Arc::new(f), Arc::new(tweak));
    let ranks: Vec<_> = (0..world)
        .map(|r| {
            let (s, f, tweak) = (store.clone(), f.clone(), tweak.clone());
            std::thread::spawn(move || {
                let mut cfg = Config::defaults();
                cfg.set("OXCCL_GPU", "simulated").unwrap();
                cfg.set("OXCCL_TIMEOUT", "60s").unwrap();
                tweak(r, &mut cfg);
                let c = Communicator::init(s, r, world, cfg).unwrap();
                f(&c)
            })
        })
        .collect();
    ranks.into_iter().map(|r| r.join().expect("a rank panicked")).collect()
}

/// Every collective and send/recv on device buffers, over p2p, equals the call on host
/// buffers (the `device` scenario of the multi-process suite); every pair is routed over p2p
/// and explain says GPU to GPU; no host-staging transport is opened beside it. Then with rank
/// 1 at `OXCCL_P2P=off`: its pairs are staged over host-staging, the pair 0-2 keeps p2p, and
/// both transports work side by side on ranks 0 and 2.
#[test]
fn p2p_carries_every_collective_and_pairs_without_it_are_staged() {
    for off in [None, Some(1usize)] {
        let out = ranks(
            3,
            move |r, cfg| {
                if Some(r) == off {
                    cfg.set("OXCCL_P2P", "off").unwrap();
                }
            },
            move |c| {
                let checks = oxccl_tests::device::device(c, 7);
                let e = c.explain();
                let me = c.rank();
                for p in &e.peers {
                    let staged = off == Some(me) || off == Some(p.peer);
                    let want = if staged { TransportKind::HostStaging } else { TransportKind::P2p };
                    assert_eq!(p.transport, Some(want), "rank {me} -> {}: {}", p.peer, e.to_text());
                    let g = p.gpu_data.as_deref().unwrap_or_default();
                    if staged {
                        assert!(g.starts_with("GPU data staged through host memory (host-staging"), "{g}");
                    } else {
                        assert!(g.starts_with("GPU data moves GPU to GPU (p2p: the sender's copy engine"), "{g}");
                        assert!(p.reason.contains("p2p is the first of rank"), "{}", p.reason);
                    }
                }
                // Opened: p2p where a pair takes it, host-staging where one is staged.
                let opened: Vec<TransportKind> = e.transports.iter().map(|t| t.transport).collect();
                let want = match off {
                    None => vec![TransportKind::P2p],
                    Some(o) if o == me => vec![TransportKind::HostStaging],
                    Some(_) => vec![TransportKind::P2p, TransportKind::HostStaging],
                };
                assert_eq!(opened, want, "rank {me}");
                (checks, e.to_text())
            },
        );
        for (r, (checks, text)) in out.iter().enumerate() {
            assert!(*checks > 100, "rank {r}: {checks} checks");
            println!("OXCCL_P2P=off on rank {off:?}: rank {r}: {checks} checks\n{text}");
        }
    }
}

/// A rank that destroys its communicator right after its last operation (no barrier) does
/// not fail its peers still finishing theirs: a p2p link receives a control message only when
/// one is due, so the closed peer's link fails no receive that nobody needed.
#[test]
fn a_rank_that_closes_after_its_last_operation_fails_nobody() {
    use oxccl::{DataType, MemKind, RawBuf, RawCall, ReduceOp};
    // Five times: whether a peer's close lands while a rank still waits is a matter of timing.
    for _ in 0..5 {
        let out = ranks(
            3,
            |_, cfg| cfg.set("OXCCL_TIMEOUT", "20s").unwrap(),
            |c| {
                let w = c.world_size();
                for round in 0..3 {
                    let send = vec![1.0f32 + round as f32; 3 * w];
                    let mut got = vec![0.0f32; 3];
                    let sb = RawBuf {
                        addr: send.as_ptr() as usize,
                        count: 3 * w,
                        dtype: DataType::F32,
                        kind: MemKind::Device(0),
                    };
                    let rb = RawBuf {
                        addr: got.as_mut_ptr() as usize,
                        count: 3,
                        dtype: DataType::F32,
                        kind: MemKind::Device(0),
                    };
                    // SAFETY: both buffers live until the call returns.
                    unsafe { c.call_raw(&RawCall::ReduceScatter { op: ReduceOp::Sum }, sb, rb) }.unwrap();
                    assert_eq!(got, vec![w as f32 * (1.0 + round as f32); 3]);
                }
                c.explain().peers.iter().all(|p| p.transport == Some(TransportKind::P2p))
            },
        );
        assert!(out.iter().all(|&p2p| p2p), "every pair over p2p");
    }
}
