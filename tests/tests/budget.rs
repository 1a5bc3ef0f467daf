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
    if !oxccl_tests::libfabric_ready() {
        return None;
    }
    Hosts::create_or_skip(2)
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
            oxccl_tests::report::passed(i, &r.1);
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

/// Starts a pair of ranks: rank 0 on "host" `leasehost0` with a NIC limit of 1, rank 1 on
/// `leasehost1`; net-libfabric only, no fallback.
fn pair(
    dir: &Dir,
    scenario: &str,
    arg: &str,
) -> (oxccl::bootstrap::tcp_store::TcpStoreServer, Vec<std::process::Child>) {
    use std::process::{Command, Stdio};
    let server =
        oxccl::bootstrap::tcp_store::TcpStoreServer::start("127.0.0.1:0".parse().unwrap(), &oxccl::Auth::none())
            .unwrap();
    let store = format!("tcp://{}", server.local_addr());
    let kids = (0..2)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_rank_worker"))
                .args([scenario, arg])
                .env("OXCCL_RANK", r.to_string())
                .env("OXCCL_WORLD_SIZE", "2")
                .env("OXCCL_STORE", &store)
                .env("OXCCL_STORE_HOSTED", "1")
                .env("OXCCL_HOST_ID", format!("leasehost{r}"))
                .env("OXCCL_NIC_ENDPOINTS", if r == 0 { "*:1" } else { "*:4" })
                .env("OXCCL_RESERVE", "none")
                .env("OXCCL_TCP_FALLBACK", "none")
                .env("OXCCL_NET", "libfabric,tcp")
                .env("OXCCL_LIBFABRIC_PROVIDER", "tcp")
                .env("OXCCL_LEDGER_DIR", dir.path())
                .env("OXCCL_TIMEOUT", "30s")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    (server, kids)
}

fn finish(kids: Vec<std::process::Child>, what: &str) -> Vec<String> {
    let out: Vec<_> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    let res: Vec<(Option<i32>, String, String)> = out
        .iter()
        .map(|o| {
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .collect();
    assert_all_ok(what, &res);
    res.into_iter().map(|r| r.1).collect()
}

/// Two processes of one host compete for its NIC's single endpoint through the ledger: the
/// second is refused with an error naming the holder; once the holder is killed (SIGKILL),
/// its lease is reclaimed and a third gets the endpoint.
#[test]
fn processes_compete_through_the_ledger_and_the_dead_lose_their_leases() {
    use std::io::BufRead;
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let dir = Dir::new("compete");
    let (_s1, mut holder) = pair(&dir, "lease_hold", "60");
    // Wait until the holder says it holds its endpoint.
    let mut line = String::new();
    std::io::BufReader::new(holder[0].stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let said = oxccl_tests::report::parse_line(&line);
    assert_eq!(
        said.as_ref().and_then(|v| v.get("event")).and_then(|e| e.as_str()),
        Some("holding"),
        "holder said {line:?}"
    );
    let holder_pid = holder[0].id();
    assert_eq!(dir.leases().len(), 2, "a ledger file per host, each holding a lease: {:?}", dir.leases());
    let (_s2, refused) = pair(&dir, "lease_refused", "0");
    let out = finish(refused, "the second pair is refused");
    assert!(out[0].contains("limit 1 (OXCCL_NIC_ENDPOINTS)"), "{}", out[0]);
    assert!(out[0].contains(&format!("pid {holder_pid}")), "the error names the holder: {}", out[0]);
    assert!(out[0].contains("may not fall back to net-tcp"), "{}", out[0]);
    assert!(
        out[1].contains("rank 0 cannot reach rank 1") && out[1].contains(&format!("pid {holder_pid}")),
        "{}",
        out[1]
    );
    // SIGKILL: no destructor runs, the lease stays in the file until someone looks.
    for k in holder.iter_mut() {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    let (_s3, third) = pair(&dir, "lease_hold", "0");
    let out = finish(third, "a third pair gets the dead holder's endpoint");
    assert_eq!(
        oxccl_tests::report::get(&out[0], "event").and_then(|e| e.as_str().map(String::from)).as_deref(),
        Some("holding"),
        "{}",
        out[0]
    );
    assert!(dir.leases().is_empty(), "{:?}", dir.leases());
}

/// A world of one creates no transport and asks no budget: the ledger is never touched. Two
/// ranks of one host use host staging and take no NIC endpoint either.
#[test]
fn a_world_of_one_and_a_single_host_take_no_endpoint() {
    use oxccl::{Communicator, Config, MemStore, TrafficClass};
    use std::sync::Arc;
    let dir = Dir::new("none");
    let mut cfg = Config::defaults();
    cfg.set("OXCCL_LEDGER_DIR", dir.path()).unwrap();
    cfg.set("OXCCL_NET", "libfabric,tcp").unwrap();
    cfg.set("OXCCL_CLASS", TrafficClass::WeightRefit.name()).unwrap();
    let one = Communicator::init(Arc::new(MemStore::new()), 0, 1, cfg.clone()).unwrap();
    let mut v = vec![3.0f32; 1000];
    one.broadcast_in_place(&mut v, 0).unwrap();
    let ex = one.explain();
    assert!(ex.endpoint.is_none() && ex.nics.is_empty() && ex.offers.is_empty(), "{ex:?}");
    assert_eq!(ex.class, TrafficClass::WeightRefit);
    let store: Arc<dyn oxccl::Store> = Arc::new(MemStore::new());
    let two: Vec<_> = (0..2)
        .map(|r| {
            let (store, cfg) = (store.clone(), cfg.clone());
            std::thread::spawn(move || {
                let c = Communicator::init(store, r, 2, cfg).unwrap();
                let mut v = vec![1.0f32; 1000];
                c.all_reduce_in_place(&mut v, oxccl::ReduceOp::Sum).unwrap();
                assert!(v.iter().all(|&x| x == 2.0));
                let ex = c.explain();
                assert!(ex.endpoint.is_none() && ex.offers.is_empty(), "{ex:?}");
                assert_eq!(c.links(), vec![(1 - r, oxccl::TransportKind::HostStaging)]);
            })
        })
        .collect();
    for t in two {
        t.join().unwrap();
    }
    let files: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(files.is_empty(), "the ledger was touched: {files:?}");
}

/// An aborted communicator lets go of its NIC endpoint and lease at once (and its close does
/// not wait for peers).
#[test]
fn an_aborted_communicator_gives_its_lease_back() {
    use oxccl::{Communicator, Config, MemStore};
    use std::sync::Arc;
    if !oxccl_tests::libfabric_ready() {
        return;
    }
    let dir = Dir::new("abort");
    let store: Arc<dyn oxccl::Store> = Arc::new(MemStore::new());
    let ts: Vec<_> = (0..2)
        .map(|r| {
            let store = store.clone();
            let path = dir.path().to_string();
            std::thread::spawn(move || {
                let mut cfg = Config::defaults();
                cfg.set("OXCCL_LEDGER_DIR", &path).unwrap();
                cfg.set("OXCCL_NET", "libfabric").unwrap();
                cfg.set("OXCCL_LIBFABRIC_PROVIDER", "tcp").unwrap();
                cfg.set("OXCCL_HOST_ID", &format!("aborthost{r}")).unwrap();
                cfg.set("OXCCL_CLASS", "gradient").unwrap();
                cfg.set("OXCCL_TIMEOUT", "30s").unwrap();
                let c = Communicator::init(store, r, 2, cfg).unwrap();
                let mut v = vec![1u32; 4096];
                c.all_reduce_in_place(&mut v, oxccl::ReduceOp::Sum).unwrap();
                assert!(v.iter().all(|&x| x == 2));
                let ex = c.explain();
                assert!(ex.endpoint.as_ref().is_some_and(|e| e.dedicated), "{ex:?}");
                c.abort();
                // Idle when aborted: the endpoint and its lease go at once, before any close.
                let mine = oxccl::ledger::Ledger::for_host(&path, &format!("aborthost{r}"));
                assert!(mine.leases().unwrap().is_empty(), "{:?}", mine.leases());
                let t = std::time::Instant::now();
                let _ = c.close();
                assert!(t.elapsed() < std::time::Duration::from_secs(5), "an aborted close returns at once");
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    assert!(dir.leases().is_empty(), "{:?}", dir.leases());
}
