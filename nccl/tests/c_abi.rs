//! The NCCL-compatible library from outside, as its users see it: a C program built with
//! only the project's `nccl.h` (compiled here by the system's C compiler), a Python ctypes
//! client written as vLLM's wrapper is, and `nm -D` for the exported symbols. Every job is
//! several real processes on host memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The library built with these tests: `target/<profile>/deps/liboxccl_nccl.so`, next to
/// the test binary (cargo test builds the cdylib there, with the test profile; the copy in
/// `target/<profile>/` is `cargo build`'s, and may be older).
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().join("liboxccl_nccl.so");
    assert!(lib.exists(), "{} was not built (cargo builds the cdylib with the tests)", lib.display());
    lib
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("oxccl-nccl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The C test program, compiled once against `include/nccl.h` and the library.
fn c_program() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let lib = library();
        let dir = scratch("cbuild");
        let bin = dir.join("nccl_test");
        // Linked as a program is linked against NCCL: -lnccl, through the names
        // scripts/install-nccl makes (the library's SONAME is libnccl.so.2).
        let libdir = dir.join("lib");
        let out = Command::new("scripts/install-nccl")
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .arg("--prefix")
            .arg(&dir)
            .arg("--lib")
            .arg(&lib)
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/install-nccl: {}", String::from_utf8_lossy(&out.stderr));
        for f in ["liboxccl_nccl.so", "libnccl.so.2", "libnccl.so"] {
            assert!(libdir.join(f).exists(), "install-nccl made no {f}");
        }
        assert!(dir.join("include/nccl.h").exists());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O1", "-o"])
            .arg(&bin)
            .arg(root.join("tests/c/nccl_test.c"))
            .arg("-I")
            .arg(dir.join("include"))
            .arg("-L")
            .arg(&libdir)
            .arg(format!("-Wl,-rpath,{}", libdir.display()))
            .args(["-lnccl", "-lpthread", "-lm"])
            .output()
            .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e} (install gcc)"));
        assert!(out.status.success(), "compiling nccl_test.c failed:\n{}", String::from_utf8_lossy(&out.stderr));
        bin
    })
}

/// Waits for every child, killing all at `limit`.
fn wait_all(mut kids: Vec<Child>, limit: Duration) -> Vec<Output> {
    let until = Instant::now() + limit;
    loop {
        if kids.iter_mut().all(|k| k.try_wait().unwrap().is_some()) {
            break;
        }
        if Instant::now() > until {
            for k in kids.iter_mut() {
                let _ = k.kill();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect()
}

fn show(outs: &[Output]) -> String {
    outs.iter()
        .enumerate()
        .map(|(r, o)| {
            format!(
                "--- rank {r}: {}\n{}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .collect()
}

/// Runs `scenario` of the C program on `n` ranks (each a process).
fn run_c(scenario: &str, n: usize, env: &[(&str, &str)]) -> Vec<Output> {
    let bin = c_program();
    let dir = scratch(&format!("{scenario}-{n}"));
    let idfile = dir.join("id");
    let kids = (0..n)
        .map(|r| {
            Command::new(bin)
                .args([scenario, &r.to_string(), &n.to_string()])
                .arg(&idfile)
                .env("OXCCL_TIMEOUT", "30s")
                .env("OXCCL_NCCL_ADDR", "127.0.0.1")
                .envs(env.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_all(kids, Duration::from_secs(120))
}

fn assert_passed(scenario: &str, outs: &[Output], ranks: impl IntoIterator<Item = usize>) {
    for r in ranks {
        let o = &outs[r];
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(&format!("PASS {scenario} rank {r}")),
            "{}",
            show(outs)
        );
    }
}

#[test]
fn every_call_from_c_on_two_and_three_ranks() {
    for n in [2, 3] {
        let outs = run_c("all", n, &[]);
        assert_passed("all", &outs, 0..n);
    }
}

#[test]
fn init_all_makes_several_ranks_in_one_process() {
    let outs = run_c("initall", 1, &[]);
    assert_passed("initall", &outs, [0]);
}

#[test]
fn a_lost_rank_is_ncclremoteerror_on_the_others() {
    let outs = run_c("lost", 3, &[]);
    assert_eq!(outs[2].status.code(), Some(9), "{}", show(&outs));
    assert_passed("lost", &outs, [0, 1]);
}

#[test]
fn abort_from_another_thread_ends_a_blocked_call() {
    let outs = run_c("abort", 2, &[]);
    assert_passed("abort", &outs, [0, 1]);
}

/// The vLLM-style ctypes client, on the library under NCCL's own file name.
#[test]
fn a_ctypes_client_written_like_vllms_runs_on_libnccl_so_2() {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("-c").arg("pass").output().is_ok_and(|o| o.status.success()));
    let Some(python) = python else {
        panic!("no python3 on PATH: the ctypes client needs one");
    };
    let dir = scratch("ctypes");
    let so = dir.join("libnccl.so.2");
    std::fs::copy(library(), &so).unwrap();
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ctypes_client.py");
    for n in [2, 3] {
        let idfile = dir.join(format!("id{n}"));
        let kids = (0..n)
            .map(|r| {
                Command::new(python)
                    .arg(&client)
                    .args([&r.to_string(), &n.to_string()])
                    .arg(&idfile)
                    .env("VLLM_NCCL_SO_PATH", &so)
                    .env("OXCCL_TIMEOUT", "30s")
                    .env("OXCCL_NCCL_ADDR", "127.0.0.1")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs = wait_all(kids, Duration::from_secs(120));
        assert_passed("ctypes", &outs, 0..n);
    }
}

/// Every symbol the issue lists is exported, by that name, from the shared library.
#[test]
fn nm_shows_every_symbol() {
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(library()).output().expect("nm (binutils) runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let have: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.split_whitespace().nth(2).filter(|_| l.contains(" T "))).collect();
    let want = [
        "ncclGetVersion",
        "ncclGetUniqueId",
        "ncclCommInitRank",
        "ncclCommInitRankConfig",
        "ncclCommInitAll",
        "ncclCommFinalize",
        "ncclCommDestroy",
        "ncclCommAbort",
        "ncclCommSplit",
        "ncclCommShrink",
        "ncclCommGetAsyncError",
        "ncclCommCount",
        "ncclCommUserRank",
        "ncclCommCuDevice",
        "ncclGetErrorString",
        "ncclGetLastError",
        "ncclAllReduce",
        "ncclBroadcast",
        "ncclBcast",
        "ncclReduce",
        "ncclAllGather",
        "ncclReduceScatter",
        "ncclAlltoAll",
        "ncclSend",
        "ncclRecv",
        "ncclGroupStart",
        "ncclGroupEnd",
        "ncclRedOpCreatePreMulSum",
        "ncclRedOpDestroy",
        "ncclCommRegister",
        "ncclCommDeregister",
        "ncclCommWindowRegister",
        "ncclCommWindowDeregister",
        // Beyond the list: the rest of NCCL 2.27's functions, each with its answer.
        "ncclCommInitRankScalable",
        "ncclMemAlloc",
        "ncclMemFree",
        "ncclGroupSimulateEnd",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|s| !have.contains(s)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    // NCCL's SONAME, which the C program (linked with -lnccl) then needs.
    let dynamic = |f: &Path| {
        let o = Command::new("readelf").arg("-d").arg(f).output().expect("readelf (binutils) runs");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(dynamic(&library()).contains("Library soname: [libnccl.so.2]"), "{}", dynamic(&library()));
    let prog = dynamic(c_program());
    assert!(prog.contains("Shared library: [libnccl.so.2]"), "{prog}");
}
