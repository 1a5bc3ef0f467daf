//! `oxccl trace`: every rank's flight record from a running job, side by side.

use std::process::ExitCode;
use std::time::Duration;

use oxccl::bootstrap::StoreAddr;
use oxccl::Auth;

/// The job secret and TLS files in an environment (`OXCCL_JOB_SECRET` or
/// `OXCCL_JOB_SECRET_FILE`, `OXCCL_TLS_*`).
fn auth_of(get: impl Fn(&str) -> Option<String>) -> Result<Auth, String> {
    Auth::from_vars(get).map_err(|e| e.to_string())
}

/// Where the job's store is and the job secret that opens it: `--store` (and this process's
/// secret), else the environment of process `pid` (or of its first descendant that has a store
/// in its environment: `oxccl launch`'s ranks, whose secret the launcher made), else this
/// process's environment.
fn store_addr(store: Option<&str>, pid: Option<u32>) -> Result<(StoreAddr, Auth), String> {
    let own = || auth_of(|k| std::env::var(k).ok());
    if let Some(s) = store {
        return Ok((StoreAddr::parse(s).map_err(|e| e.to_string())?, own()?));
    }
    if let Some(pid) = pid {
        let mut queue = vec![pid];
        let mut looked = 0;
        while let Some(p) = queue.first().copied() {
            queue.remove(0);
            looked += 1;
            if looked > 256 {
                break;
            }
            let env = match std::fs::read(format!("/proc/{p}/environ")) {
                Ok(v) => v,
                Err(e) if p == pid => return Err(format!("cannot read the environment of process {pid}: {e}")),
                Err(_) => continue,
            };
            let vars: Vec<(String, String)> = env
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect();
            let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            match StoreAddr::from_vars(get) {
                Ok(Some(a)) => return Ok((a, auth_of(get).map_err(|e| format!("process {p}: {e}"))?)),
                Ok(None) => {}
                Err(e) => return Err(format!("process {p}: {e}")),
            }
            queue.extend(children(p));
        }
        return Err(format!(
            "neither process {pid} nor its children name a store (OXCCL_STORE, or MASTER_ADDR and MASTER_PORT)"
        ));
    }
    match StoreAddr::from_vars(|k| std::env::var(k).ok()) {
        Ok(Some(a)) => Ok((a, own()?)),
        Ok(None) => Err("no store to ask: give --store host:port or --pid of a rank (or of its launcher), \
                         or set OXCCL_STORE"
            .into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The children of process `pid` (every thread's list).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}

pub fn run(store: Option<&str>, pid: Option<u32>, wait: Duration, rows: usize, json: bool) -> ExitCode {
    let (addr, auth) = match store_addr(store, pid) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("oxccl trace: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store = match oxccl::bootstrap::connect_client(&addr, Duration::from_secs(5), &auth) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("oxccl trace: cannot reach the store at {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let traces = match oxccl::trace::gather(&*store, wait) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("oxccl trace: the store at {addr} refused the request: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string(&traces) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("oxccl trace: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", oxccl::trace::report(&traces, rows));
    }
    if traces.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
