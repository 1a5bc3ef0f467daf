//! The `oxccl` command end to end: perf over local ranks, launch, env.

use std::process::Command;

fn oxccl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxccl"))
}

#[test]
fn perf_runs_every_operation_on_local_ranks_and_checks_results() {
    for op in ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all", "sendrecv"] {
        let out = oxccl()
            .args(["perf", op, "-b", "8", "-e", "64K", "-f", "64", "-n", "3", "-w", "1", "--ranks", "3", "-r", "1"])
            .output()
            .expect("oxccl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{op}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("[0] ") && !l.contains('#')).collect();
        assert_eq!(rows.len(), 3, "{op}: one row per size (8, 512, 32768 bytes): {text}");
        for r in rows {
            let f: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(f.get(9), Some(&"0"), "{op}: #wrong must be 0: {r}");
            if op == "sendrecv" {
                // Latency percentiles: p50 <= p99 <= p99.9, all positive.
                let p: Vec<f64> = f[10..13].iter().map(|x| x.parse().unwrap()).collect();
                assert!(p[0] > 0.0 && p[0] <= p[1] && p[1] <= p[2], "{op}: percentiles {p:?}: {r}");
            } else {
                assert_eq!(f.len(), 10, "{op}: no latency columns: {r}");
            }
        }
        assert!(text.contains("Avg bus bandwidth"), "{op}: {text}");
    }
}

/// Every operation through the NCCL C ABI, and side by side with the Rust API (a row of each
/// per size, labelled), results checked.
#[test]
fn perf_through_the_nccl_c_abi() {
    for op in ["all_reduce", "broadcast", "reduce", "all_gather", "reduce_scatter", "all_to_all", "sendrecv"] {
        let out = oxccl()
            .args(["perf", op, "-b", "8", "-e", "64K", "-f", "64", "-n", "3", "-w", "1", "--ranks", "3", "-r", "1"])
            .args(["--api", "both", "--bind", "none"])
            .env("OXCCL_NCCL_ADDR", "127.0.0.1")
            .output()
            .expect("oxccl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{op}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("through the Rust API and the NCCL C ABI in turn"), "{op}: {text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("[0] ") && !l.contains('#')).collect();
        assert_eq!(rows.len(), 6, "{op}: a rust and an nccl row per size: {text}");
        for (i, r) in rows.iter().enumerate() {
            let f: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(f.get(9), Some(&"0"), "{op}: #wrong must be 0: {r}");
            let want = if i % 2 == 0 { "rust" } else { "nccl" };
            assert_eq!(f.last(), Some(&want), "{op}: api labelled: {r}");
        }
    }
}

/// sendrecv on a communicator of a class, with background traffic of another class on its
/// own communicator: percentiles, the load's line, results checked; bad values refused.
#[test]
fn perf_class_and_background_load() {
    let out = oxccl()
        .args(["perf", "sendrecv", "-b", "16K", "-e", "64K", "-f", "4", "-n", "50", "--ranks", "2", "--bind", "none"])
        .args(["--class", "pipeline_stage", "--load", "weight_refit:broadcast:1M"])
        .output()
        .expect("oxccl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("# class pipeline_stage; alongside: weight_refit broadcast of 1048576 bytes"), "{text}");
    assert!(text.contains("# Load (weight_refit broadcast of 1048576 bytes, alongside): "), "{text}");
    assert!(text.contains("Out of bounds values : 0 OK"), "{text}");
    for (args, want) in [
        (["--load", "weight_refit:gather:1M"], "is not broadcast, all_reduce or sendrecv"),
        (["--load", "urgent:broadcast:1M"], "is not a traffic class"),
        (["--load", "bulk:broadcast"], "is not CLASS:OP:SIZE"),
        (["--class", "fast"], "is not a traffic class"),
    ] {
        let out = oxccl().args(["perf", "sendrecv"]).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// --plot draws the run; `oxccl plot` draws several CSV runs, one line each; bad input is
/// an error naming the file.
#[test]
fn perf_plots_and_plot_draws_csv_runs() {
    let dir = std::env::temp_dir().join(format!("oxccl-plot-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("sr.svg");
    let out = oxccl()
        .args(["perf", "sendrecv", "-b", "1K", "-e", "64K", "-f", "8", "-n", "20", "--ranks", "2", "--bind", "none"])
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("latency per iteration") && text.contains("p99.9"), "{text}");
    let mut csvs = Vec::new();
    for (name, api) in [("one", "rust"), ("two", "both")] {
        let out = oxccl()
            .args([
                "perf",
                "all_reduce",
                "-b",
                "8",
                "-e",
                "64K",
                "-f",
                "16",
                "-n",
                "3",
                "--ranks",
                "2",
                "--bind",
                "none",
            ])
            .args(["--csv", "--api", api])
            .env("OXCCL_NCCL_ADDR", "127.0.0.1")
            .output()
            .unwrap();
        assert!(out.status.success());
        let f = dir.join(format!("{name}.csv"));
        std::fs::write(&f, &out.stdout).unwrap();
        csvs.push(f);
    }
    let chart = dir.join("ar.svg");
    let out = oxccl().arg("plot").arg("-o").arg(&chart).args(&csvs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(3 lines)"));
    let text = std::fs::read_to_string(&chart).unwrap();
    for label in ["bus bandwidth", "\none\n", "\ntwo rust\n", "\ntwo nccl\n"] {
        assert!(text.contains(label), "{label:?} missing from the chart");
    }
    let out = oxccl().arg("plot").arg("-o").arg(&chart).arg(dir.join("absent.csv")).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("absent.csv"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// MoE dispatch and combine: one row per token count, every step's rows come back intact,
/// through each dispatch path (auto takes the dynamic one for these small messages).
#[test]
fn perf_ep_runs_moe_steps_and_checks_them() {
    for (dispatch, path) in [("auto", "dynamic"), ("counts", "counts"), ("dynamic", "dynamic")] {
        let out = oxccl()
            .args(["perf", "ep", "--ranks", "3", "--bind", "none", "-n", "4", "-w", "1", "-d", "bf16"])
            .args(["--tokens", "16,64", "--hidden", "32", "--topk", "2", "--experts", "12", "--zipf", "1.2", "--csv"])
            .args(["--dispatch", dispatch])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<Vec<&str>> =
            text.lines().filter_map(|l| l.strip_prefix("[0] ep,")).map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 2, "{text}");
        for r in &rows {
            assert_eq!((r[14], r[15]), ("0", path), "wrong elements or path: {r:?}");
            let hottest: f64 = r[10].parse().unwrap();
            assert!(hottest > 1.0 / 3.0 && hottest <= 1.0, "skewed experts crowd a rank: {hottest}");
        }
    }
    let out = oxccl().args(["perf", "ep", "--topk", "0"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("at least 1"));
}

/// broadcast --delta: versions differing in a fraction of their elements go out as deltas;
/// the receivers end with the root's version exactly.
#[test]
fn perf_broadcast_delta() {
    for f in ["0", "0.01", "0.3", "0.9"] {
        let out = oxccl()
            .args([
                "perf",
                "broadcast",
                "-b",
                "4K",
                "-e",
                "1M",
                "-f",
                "16",
                "-n",
                "3",
                "--ranks",
                "3",
                "--bind",
                "none",
            ])
            .args(["-r", "1", "--delta", f])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{f}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("Out of bounds values : 0 OK"), "{f}: {text}");
    }
    for args in [["all_reduce", "--delta", "0.1"], ["broadcast", "--delta", "2"]] {
        let out = oxccl().arg("perf").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}

#[test]
fn perf_csv_and_bad_arguments() {
    let out = oxccl()
        .args(["perf", "all_reduce", "-b", "1K", "-e", "1K", "-d", "bf16", "-o", "avg", "--csv"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("op,ranks,size_bytes,count,type,redop,root,time_us,algbw_gbs,busbw_gbs,wrong"), "{text}");
    assert!(text.contains("all_reduce,1,1024,512,bfloat16,avg,-1,"), "{text}");
    let out = oxccl().args(["perf", "all_reduce", "-d", "int32", "-o", "avg", "-e", "64"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("avg is defined on floating-point types only"));
    let out = oxccl().args(["perf", "broadcast", "-r", "5", "-e", "64", "--ranks", "2"]).output().unwrap();
    assert!(!out.status.success(), "root out of range must fail");
    // Arguments that would measure nothing, or something other than what was asked, are
    // refused with words that say why; never a quiet exit 0.
    for (args, says) in [
        (&["--ranks", "0"][..], "at least 1"),
        (&["-b", "1G", "-e", "1K"], "larger than -e/--maxbytes"),
        (&["-n", "0"], "at least 1"),
        (&["-f", "1"], "at least 2"),
        (&["-c", "2"], "--check"),
        (&["-i", "0"], "positive step"),
        (&["-b", "1", "-e", "2"], "smaller than one float element"),
    ] {
        let out = oxccl().args(["perf", "all_reduce"]).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
    let out = oxccl().args(["launch", "-n", "0", "--", "true"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("at least 1"));
}

#[test]
fn launch_prefixes_lines_and_fails_when_a_rank_fails() {
    let out = oxccl()
        .args(["launch", "-n", "3", "--", "sh", "-c", "echo hello from $OXCCL_RANK of $OXCCL_WORLD_SIZE"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for r in 0..3 {
        assert!(text.contains(&format!("[{r}] hello from {r} of 3")), "{text}");
    }
    let t = std::time::Instant::now();
    let out = oxccl()
        .args(["launch", "-n", "2", "--", "sh", "-c", "if [ $OXCCL_RANK = 1 ]; then exit 4; fi; sleep 30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(t.elapsed().as_secs() < 20, "the other rank was stopped");
}

#[test]
fn env_lists_every_setting_with_its_source() {
    let out = oxccl().arg("env").env("OXCCL_TIMEOUT", "9s").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for k in oxccl_core::config::KNOBS {
        assert!(text.contains(k.name), "{} missing: {text}", k.name);
    }
    let line = text.lines().find(|l| l.starts_with("OXCCL_TIMEOUT")).unwrap();
    assert!(line.contains("9s") && line.contains("env"), "{line}");
    let out = oxccl().arg("env").env("OXCCL_TIMEOUT", "later").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OXCCL_TIMEOUT"));
}

/// `oxccl env` says how connections are authenticated, and never shows the secret.
#[test]
fn env_shows_authentication_and_hides_the_secret() {
    let secret = "0123456789abcdef-never-shown";
    let out = oxccl().arg("env").env("OXCCL_JOB_SECRET", secret).env_remove("OXCCL_JOB_SECRET_FILE").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(secret), "{text}");
    assert!(text.contains("(set, 28 bytes)"), "{text}");
    assert!(text.contains("authentication: every TCP connection proves the job secret"), "{text}");
    let out = oxccl()
        .arg("env")
        .env_remove("OXCCL_JOB_SECRET")
        .env_remove("OXCCL_JOB_SECRET_FILE")
        .env("OXCCL_ALLOW_UNAUTHENTICATED", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("authentication: UNAUTHENTICATED"), "{out:?}");
    // A store beyond loopback without a secret does not start, and says what to set.
    let out = oxccl()
        .args(["store", "--listen", "0.0.0.0:0"])
        .env_remove("OXCCL_JOB_SECRET")
        .env_remove("OXCCL_JOB_SECRET_FILE")
        .env_remove("OXCCL_ALLOW_UNAUTHENTICATED")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OXCCL_JOB_SECRET"), "{out:?}");
}

#[test]
fn explain_lists_every_peer_with_its_transport_and_reason() {
    let me = env!("CARGO_BIN_EXE_oxccl");
    let script = format!("OXCCL_HOST_ID=h$((OXCCL_RANK/2)) exec {me} explain --connect --json");
    let out = oxccl()
        .args(["launch", "-n", "3", "--", "sh", "-c", &script])
        .env("OXCCL_SOCKET_IFNAME", "lo")
        .env("OXCCL_NET", "tcp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut seen = 0;
    for line in text.lines() {
        let json = line.split_once("] ").map(|x| x.1).unwrap_or(line);
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line}"));
        let rank = v["rank"].as_u64().unwrap() as usize;
        assert_eq!(v["world"], 3);
        assert_eq!(v["hosts"], serde_json::json!([[0, 1], [2]]));
        assert_eq!(v["net"], serde_json::json!(["tcp"]));
        let peers = v["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2);
        for p in peers {
            let peer = p["peer"].as_u64().unwrap() as usize;
            let same = (peer / 2) == (rank / 2);
            assert_eq!(p["transport"], if same { "host-staging" } else { "net-tcp" }, "{line}");
            assert_eq!(p["connected"], true, "{line}");
            assert!(p["reason"].as_str().unwrap().contains(if same { "same host" } else { "other host" }), "{line}");
            assert_eq!(p["offers"], serde_json::json!(["net-tcp"]), "{line}");
        }
        seen += 1;
    }
    assert_eq!(seen, 3, "{text}");
}

#[test]
fn explain_says_why_a_peer_that_offers_no_network_transport_is_unreachable() {
    let me = env!("CARGO_BIN_EXE_oxccl");
    // Rank 1 is on another host and allows no network transport.
    let script = format!(
        "export OXCCL_HOST_ID=h$OXCCL_RANK; [ $OXCCL_RANK = 1 ] && export OXCCL_NET=none; exec {me} explain --json"
    );
    let out = oxccl()
        .args(["launch", "-n", "2", "--", "sh", "-c", &script])
        .env("OXCCL_SOCKET_IFNAME", "lo")
        .env("OXCCL_NET", "tcp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut seen = 0;
    for line in text.lines() {
        let json = line.split_once("] ").map(|x| x.1).unwrap_or(line);
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line}"));
        let rank = v["rank"].as_u64().unwrap();
        let p = &v["peers"][0];
        assert_eq!(p["transport"], serde_json::Value::Null, "{line}");
        assert_eq!(p["connected"], false, "{line}");
        let reason = p["reason"].as_str().unwrap();
        if rank == 0 {
            assert_eq!(v["offers"], serde_json::json!(["net-tcp"]), "{line}");
            assert_eq!(p["offers"], serde_json::json!([]), "{line}");
        }
        let blame = if rank == 0 { "rank 1 offers none" } else { "this rank offers none" };
        assert!(reason.contains("no network transport in common") && reason.contains(blame), "{line}");
        seen += 1;
    }
    assert_eq!(seen, 2, "{text}");
}

/// `oxccl trace --pid <launcher>` finds the job's store in its ranks' environment and prints
/// both ranks' records side by side while they run; without a store it says where to give
/// one; a store nobody answers on exits 2.
#[test]
fn trace_prints_a_running_jobs_records() {
    let mut job = oxccl()
        .args(["launch", "-n", "2", "--bind", "none", "--", env!("CARGO_BIN_EXE_oxccl")])
        .args(["perf", "all_reduce", "-b", "8", "-e", "8", "-n", "100000000", "-w", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = job.id().to_string();
    // Retry while the ranks start and make their communicator.
    let t0 = std::time::Instant::now();
    let text = loop {
        let out = oxccl().args(["trace", "--pid", &pid, "--wait", "3s"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("rank 1: pid") {
            break text;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // SAFETY: kill on the launcher's pid; it stops its ranks.
    unsafe { libc::kill(job.id() as libc::pid_t, libc::SIGTERM) };
    let _ = job.wait();
    println!("{text}");
    assert!(text.contains("flight recorder of") && text.contains("(2 ranks)"), "{text}");
    assert!(text.contains("rank 0: pid") && text.contains("all_reduce #"), "{text}");
    assert!(text.contains("earlier rows not shown"), "20 rows by default: {text}");
    assert!(text.lines().filter(|l| l.starts_with("  | all_reduce")).count() <= 20, "{text}");

    let out = oxccl().args(["trace"]).env_remove("OXCCL_STORE").env_remove("MASTER_ADDR").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store host:port or --pid"), "{out:?}");
    let out = oxccl().args(["trace", "--wait", "0s", "--store", "127.0.0.1:1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 100ms to 60s"), "{out:?}");
    let server = oxccl::bootstrap::TcpStoreServer::start("127.0.0.1:0".parse().unwrap(), &oxccl::Auth::none()).unwrap();
    let addr = server.local_addr().to_string();
    let out = oxccl().args(["trace", "--wait", "300ms", "--store", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no rank answered"), "{out:?}");
}

/// broadcast --roots: several roots send stripes; the header shows the plan; every receiver
/// checks the data; bad roots and other operations are refused.
#[test]
fn perf_broadcast_from_roots() {
    let out = oxccl()
        .args(["perf", "broadcast", "--ranks", "3", "--bind", "none", "--roots", "2,0", "-b", "4K", "-e", "1M"])
        .args(["-n", "3", "-w", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("broadcast from roots [2, 0]") && text.contains("stripe 0:"), "{text}");
    assert!(text.contains("Out of bounds values : 0 OK"), "{text}");
    let out = oxccl().args(["perf", "broadcast", "--ranks", "2", "--bind", "none", "--roots", "0,5"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("root 5 is out of range"));
    let out = oxccl().args(["perf", "all_reduce", "--roots", "0,1"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--roots measures broadcast"));
}
