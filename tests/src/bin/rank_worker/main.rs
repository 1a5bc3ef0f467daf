//! One rank of a multi-process test: `rank_worker SCENARIO [SEED]`, started by the tests in
//! tests/tests/ (or by `oxccl launch -n N`); `rank_worker --list` names the scenarios.
//!
//! Each scenario is one function, in the module of its area: `collectives` (conformance,
//! order, split, non-blocking work, bad input, lazy links, mismatches), `faults` (loss,
//! abort, idle waits, held links, the store outliving its host), `budget` (endpoint leases,
//! bandwidth priority), `soak`. A scenario returns how many checks passed; its assertions say
//! what differed. The rank reports events and its outcome as JSON lines (`oxccl_tests::report`)
//! and exits 0; a failed check panics (exit 101).

mod budget;
mod collectives;
mod diagnosis;
mod faults;
mod soak;

use oxccl::{Communicator, Error};
use oxccl_tests::report;

/// A scenario: its name on the command line, what it checks, and its function (the
/// communicator, the seed).
struct Scenario {
    name: &'static str,
    about: &'static str,
    run: fn(&Communicator, u64) -> usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "conformance",
        about: "every collective, type and op, sizes 0 to multi-chunk",
        run: collectives::conformance,
    },
    Scenario {
        name: "order",
        about: "random small and large messages between every pair, in order",
        run: collectives::order,
    },
    Scenario { name: "split", about: "split by parity and by one color", run: |c, _| collectives::split(c) },
    Scenario { name: "async", about: "Work handles in order with blocking calls", run: |c, _| collectives::asynch(c) },
    Scenario {
        name: "errors",
        about: "bad input is refused before any byte moves",
        run: |c, _| collectives::errors(c),
    },
    Scenario { name: "lazy", about: "links made on first use do not deadlock", run: |c, _| collectives::lazy(c) },
    Scenario {
        name: "mismatch",
        about: "different collectives fail on both ranks",
        run: |c, _| collectives::mismatch(c),
    },
    Scenario { name: "idle", about: "a waiting rank sleeps", run: |c, _| faults::idle(c) },
    Scenario { name: "hold", about: "connect, say ready, wait to be killed", run: |c, _| faults::hold(c) },
    Scenario {
        name: "store_outlives",
        about: "the store outlives the rank hosting it",
        run: |c, _| faults::store_outlives(c),
    },
    Scenario { name: "loss", about: "a rank killed or stopped mid-collective", run: faults::loss },
    Scenario { name: "abort", about: "abort() from another thread", run: |c, _| faults::abort(c) },
    Scenario {
        name: "budget",
        about: "trainer and inference communicators compete for endpoints",
        run: budget::budget,
    },
    Scenario { name: "lease_hold", about: "hold a dedicated endpoint for SEED seconds", run: budget::lease_hold },
    Scenario {
        name: "priority",
        about: "gradient all_reduce during a weight-refit broadcast",
        run: |c, _| budget::priority(c),
    },
    Scenario {
        name: "stopped",
        about: "a rank stopped past the deadline is named by every survivor, and told",
        run: |c, _| diagnosis::stopped(c),
    },
    Scenario {
        name: "closed",
        about: "ranks 1 and 2 close; the others, waiting on them, name them at once",
        run: |c, _| diagnosis::closed(c),
    },
    Scenario {
        name: "p2p",
        about: "non-blocking sends and receives progress independently (irecv before isend)",
        run: |c, _| diagnosis::p2p(c),
    },
    Scenario {
        name: "behind",
        about: "the last rank is held back before a collective the others are in (OXCCL_TEST_DIR)",
        run: |c, _| diagnosis::behind(c),
    },
    Scenario {
        name: "late",
        about: "the last rank computes past the deadline before a collective: blamed by sequence number",
        run: |c, _| diagnosis::late(c),
    },
    Scenario {
        name: "split_fails",
        about: "a split whose part fails on rank 2 (no NIC endpoint) fails on every member",
        run: |c, _| diagnosis::split_fails(c),
    },
    Scenario {
        name: "p2p_lost",
        about: "rank 0 is killed while rank 1 waits on a recv_async from it: named at once",
        run: |c, _| diagnosis::p2p_lost(c),
    },
    Scenario {
        name: "device",
        about: "every collective and send/recv on simulated GPU buffers equals the host result",
        run: oxccl_tests::device::device,
    },
    Scenario {
        name: "device_streams",
        about: "batches, sends and receives on the caller's stream of a real GPU (cuda feature)",
        #[cfg(feature = "cuda")]
        run: oxccl_tests::device::device_streams,
        #[cfg(not(feature = "cuda"))]
        run: |_, _| panic!("device_streams needs a build with the cuda feature"),
    },
    Scenario { name: "soak", about: "random checked operations, memory and threads", run: soak::soak },
    Scenario { name: "steady", about: "300 checked all_reduces while strangers knock", run: |c, _| soak::steady(c) },
    Scenario {
        name: "until_stopped",
        about: "checked all_reduces until $OXCCL_TEST_DIR/stop appears",
        run: |c, _| soak::until_stopped(c),
    },
    Scenario {
        name: "explained",
        about: "print explain's text, then one checked all_reduce",
        run: |c, _| explained(c),
    },
];

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "conformance".into());
    if name == "--list" {
        for s in SCENARIOS {
            println!("{:<16} {}", s.name, s.about);
        }
        println!("{:<16} creating the communicator must fail: no endpoint for it", "lease_refused");
        println!("{:<16} creating the communicator must fail; the error is reported", "create_fails");
        return;
    }
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    // Logs to stderr as the `oxccl` command does (OXCCL_LOG, default warn): tests read them.
    let filter = std::env::var("OXCCL_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    if name == "lease_refused" {
        return lease_refused();
    }
    if name == "create_fails" {
        return create_fails();
    }
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        panic!("no scenario {name:?}; there are: {}, lease_refused", names.join(", "));
    };
    let comm = Communicator::from_env().expect("communicator from the launcher environment");
    let checks = (scenario.run)(&comm, seed);
    comm.close().expect("close");
    report::emit(serde_json::json!({ "scenario": name, "rank": comm.rank(), "checks": checks }));
}

/// Reports explain's text, then checks one all_reduce.
fn explained(c: &Communicator) -> usize {
    report::emit(serde_json::json!({ "explain": c.explain().to_text() }));
    let mut v = vec![1.0f64 + c.rank() as f64; 4096];
    c.all_reduce_in_place(&mut v, oxccl::ReduceOp::Sum).expect("all_reduce");
    let want: f64 = (0..c.world_size()).map(|r| 1.0 + r as f64).sum();
    assert!(v.iter().all(|&x| x == want), "all_reduce result");
    1
}

/// The communicator must not be created: the NIC budget is spent.
fn lease_refused() {
    let e = match Communicator::from_env() {
        Err(e) => e,
        Ok(c) => panic!("rank {}: the communicator was created despite the budget", c.rank()),
    };
    println!("refused: {e}");
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("has no endpoint") && m.contains("rank 0 cannot reach rank 1"), "{m}");
    let rank: u64 = std::env::var("OXCCL_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    report::emit(serde_json::json!({ "scenario": "lease_refused", "rank": rank, "checks": 1 }));
}

/// The communicator must not be created; the error (its kind and words) is reported for the
/// test to check.
fn create_fails() {
    let e = match Communicator::from_env() {
        Err(e) => e,
        Ok(c) => panic!("rank {}: the communicator was created", c.rank()),
    };
    let rank: u64 = std::env::var("OXCCL_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    let kind = format!("{e:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string();
    report::emit(serde_json::json!({ "error": e.to_string(), "kind": kind }));
    report::emit(serde_json::json!({ "scenario": "create_fails", "rank": rank, "checks": 1 }));
}
