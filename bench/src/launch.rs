//! `oxccl launch`: runs N ranks of a program on this host.
//!
//! The launcher hosts the rendezvous store (a [`TcpStoreServer`] on 127.0.0.1) and starts
//! each rank with `OXCCL_RANK`, `OXCCL_WORLD_SIZE`, `OXCCL_LOCAL_RANK`,
//! `OXCCL_LOCAL_WORLD_SIZE`, `OXCCL_STORE` and `OXCCL_STORE_HOSTED=1`. Every line a rank
//! prints is re-printed whole, prefixed with `[RANK] `, on the launcher's stdout or stderr.
//! When a rank fails, the others get SIGTERM, then SIGKILL 3 s later. Each rank runs in its
//! own process group, so whatever it starts is stopped with it; SIGINT, SIGTERM and SIGHUP
//! sent to the launcher are passed on to the ranks. Ranks read no stdin. Each rank is bound to
//! CPUs of its own unless told otherwise ([`crate::bind`]), told to it in `OXCCL_LAUNCH_CPUS`.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use oxccl::bootstrap::TcpStoreServer;
use oxccl::{Auth, JobSecret};

use crate::bind::{self, Bind, Placement};

/// Time between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(10);
/// Longer lines are re-printed in pieces of this size.
const MAX_LINE: u64 = 64 << 10;
/// How long to wait for output pipes after every rank has exited (a rank's background
/// processes may hold them open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchOpts {
    /// Number of ranks.
    pub n: usize,
    /// The program each rank runs.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// More environment variables for every rank.
    pub extra_env: Vec<(String, String)>,
    /// How ranks are bound to CPUs.
    pub bind: Bind,
}

/// Where re-printed lines go.
type Sink = Arc<Mutex<dyn Write + Send>>;

/// The last signal the launcher received (0: none), set by [`on_signal`].
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP while alive; restores the old handlers on drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> Result<SignalGuard, String> {
        let mut guard = SignalGuard { old: Vec::new() };
        for sig in FORWARDED {
            // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) to fill in.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            // SAFETY: same as above; `old` is overwritten by sigaction.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are to live sigaction values; the handler only does an
            // atomic store, which is async-signal-safe.
            if unsafe { libc::sigaction(sig, &act, &mut old) } != 0 {
                return Err(format!("cannot install a handler for signal {sig}: {}", std::io::Error::last_os_error()));
            }
            guard.old.push((sig, old));
        }
        Ok(guard)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in &self.old {
            // SAFETY: `old` is the action sigaction returned for `sig`; putting it back is sound.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// Runs the ranks and returns the exit code the launcher should exit with: 0 when every rank
/// succeeded, else the first failure's exit code, or 128 + signal number.
pub fn run(opts: &LaunchOpts) -> Result<i32, String> {
    PENDING_SIGNAL.store(0, Ordering::SeqCst);
    let _signals = SignalGuard::install()?;
    launch(opts, Arc::new(Mutex::new(std::io::stdout())), Arc::new(Mutex::new(std::io::stderr())))
}

struct Rank {
    child: Child,
    done: bool,
}

/// Writes one whole line under the sink's lock.
fn emit(sink: &Sink, line: &[u8]) {
    let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
    // A closed stdout must not stop the ranks; the line is lost.
    let _ = w.write_all(line).and_then(|()| w.flush());
}

fn say(sink: &Sink, msg: &str) {
    tracing::debug!("{msg}");
    emit(sink, format!("oxccl launch: {msg}\n").as_bytes());
}

/// Copies `pipe` to `sink` line by line, each line prefixed with `[rank] `.
fn spawn_reader(
    rank: usize,
    pipe: impl Read + Send + 'static,
    sink: Sink,
    done: mpsc::Sender<()>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("oxccl-launch-out-{rank}")).spawn(move || {
        let mut rd = BufReader::new(pipe);
        let prefix = format!("[{rank}] ");
        let mut line = Vec::new();
        loop {
            line.clear();
            line.extend_from_slice(prefix.as_bytes());
            match (&mut rd).take(MAX_LINE).read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    emit(&sink, &line);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(rank, "reading the output of rank {rank} failed: {e}");
                    break;
                }
            }
        }
        let _ = done.send(());
    })?;
    Ok(())
}

/// Sends `sig` to the process group of every rank still running.
fn signal_all(ranks: &[Rank], sig: libc::c_int) {
    for r in ranks.iter().filter(|r| !r.done) {
        let Ok(pid) = libc::pid_t::try_from(r.child.id()) else {
            continue;
        };
        // SAFETY: kill has no memory effects. The child is not reaped yet, so its pid and
        // process group id (the same, see `process_group(0)`) still name it.
        if unsafe { libc::kill(-pid, sig) } != 0 {
            // The rank may have left its group; signal it alone.
            // SAFETY: as above.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

fn exit_code(st: ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGINT => " (SIGINT)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            format!("signal {s}{name}")
        }
        (None, None) => format!("{st}"),
    }
}

/// Waits for every rank; on the first failure (or a signal to the launcher) stops the others.
fn supervise(ranks: &mut [Rank], err: &Sink) -> i32 {
    let mut failure: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        let mut stop = false;
        for (i, r) in ranks.iter_mut().enumerate().filter(|(_, r)| !r.done) {
            let st = match r.child.try_wait() {
                Ok(None) => continue,
                Ok(Some(st)) => st,
                Err(e) => {
                    r.done = true;
                    if failure.is_none() {
                        say(err, &format!("cannot wait for rank {i}: {e}; stopping the others"));
                        failure = Some(1);
                        stop = true;
                    }
                    continue;
                }
            };
            r.done = true;
            tracing::debug!(rank = i, "rank exited with status {}", describe(st));
            if !st.success() && failure.is_none() {
                say(err, &format!("rank {i} exited with status {}; stopping the others", describe(st)));
                failure = Some(exit_code(st));
                stop = true;
            }
        }
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if kill_at.is_none() {
                say(err, &format!("received signal {sig}; stopping the ranks"));
                signal_all(ranks, sig);
                kill_at = Some(Instant::now() + KILL_GRACE);
            } else {
                signal_all(ranks, libc::SIGKILL);
                killed = true;
            }
            failure.get_or_insert(128 + sig);
        }
        if stop && kill_at.is_none() {
            signal_all(ranks, libc::SIGTERM);
            kill_at = Some(Instant::now() + KILL_GRACE);
        }
        if ranks.iter().all(|r| r.done) {
            return failure.unwrap_or(0);
        }
        if !killed && kill_at.is_some_and(|t| Instant::now() >= t) {
            let left = ranks.iter().filter(|r| !r.done).count();
            say(err, &format!("{left} rank(s) still running {KILL_GRACE:?} after SIGTERM; sending SIGKILL"));
            signal_all(ranks, libc::SIGKILL);
            killed = true;
        }
        std::thread::sleep(POLL);
    }
}

/// Kills and reaps the ranks started so far (when starting the rest failed).
fn abandon(ranks: &mut [Rank]) {
    signal_all(ranks, libc::SIGKILL);
    for r in ranks.iter_mut() {
        let _ = r.child.wait();
        r.done = true;
    }
}

/// The CPUs of each rank (empty: none bound), saying on `err` why ranks are not bound when
/// binding was asked for but cannot be done.
fn placement(opts: &LaunchOpts, err: &Sink) -> Vec<Vec<usize>> {
    if opts.bind == Bind::None {
        return Vec::new();
    }
    match bind::usable_cpus().map(|c| bind::place(&c, opts.n)) {
        Ok(Placement::Alone) => Vec::new(),
        Ok(Placement::Bound(v)) => {
            for (rank, c) in v.iter().enumerate() {
                tracing::info!(rank, "rank {rank} bound to CPUs {}", bind::cpu_list(c));
            }
            v
        }
        Ok(Placement::Unbound(why)) | Err(why) => {
            say(err, &why);
            Vec::new()
        }
    }
}

/// [`run`] with the output sinks given (tests capture them) and no signal handling.
fn launch(opts: &LaunchOpts, out: Sink, err: Sink) -> Result<i32, String> {
    if opts.n == 0 {
        return Err("the number of ranks must be at least 1".into());
    }
    // The job secret: the user's (OXCCL_JOB_SECRET or OXCCL_JOB_SECRET_FILE, which the ranks
    // inherit), else a fresh one handed to the ranks only. Other users of this host reach the
    // loopback store too: without the secret they learn nothing from it.
    let mine = Auth::from_vars(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    let (auth, made) = if mine.has_secret() {
        (mine, None)
    } else {
        let s = JobSecret::generate("the secret oxccl launch made").map_err(|e| e.to_string())?;
        let hex = String::from_utf8_lossy(s.expose()).into_owned();
        (mine.and_secret(s), Some(hex))
    };
    let server = TcpStoreServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &auth)
        .map_err(|e| format!("cannot start the rendezvous store: {e}"))?;
    let store = format!("tcp://{}", server.local_addr());
    tracing::info!(%store, n = opts.n, "launching {}", opts.program.to_string_lossy());
    let cpus = placement(opts, &err);
    let (done_tx, done_rx) = mpsc::channel();
    let mut ranks: Vec<Rank> = Vec::with_capacity(opts.n);
    let mut pipes = 0usize;
    for rank in 0..opts.n {
        let mut cmd = Command::new(&opts.program);
        cmd.args(&opts.args)
            .env("OXCCL_RANK", rank.to_string())
            .env("OXCCL_WORLD_SIZE", opts.n.to_string())
            .env("OXCCL_LOCAL_RANK", rank.to_string())
            .env("OXCCL_LOCAL_WORLD_SIZE", opts.n.to_string())
            .env("OXCCL_STORE", &store)
            .env("OXCCL_STORE_HOSTED", "1")
            .envs(opts.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(hex) = &made {
            cmd.env("OXCCL_JOB_SECRET", hex);
        }
        // Only the launcher says where a rank is bound (never an inherited value).
        cmd.env_remove("OXCCL_LAUNCH_CPUS");
        if let Some(mine) = cpus.get(rank) {
            let set = bind::cpu_set(mine);
            cmd.env("OXCCL_LAUNCH_CPUS", bind::cpu_list(mine));
            // SAFETY: the closure runs in the child between fork and exec; it only makes the
            // sched_setaffinity system call (async-signal-safe) on a set built before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                abandon(&mut ranks);
                return Err(format!("cannot start rank {rank} ({}): {e}", opts.program.to_string_lossy()));
            }
        };
        let readers = [
            child.stdout.take().map(|p| spawn_reader(rank, p, out.clone(), done_tx.clone())),
            child.stderr.take().map(|p| spawn_reader(rank, p, err.clone(), done_tx.clone())),
        ];
        ranks.push(Rank { child, done: false });
        for r in readers.into_iter().flatten() {
            if let Err(e) = r {
                abandon(&mut ranks);
                return Err(format!("cannot start an output thread for rank {rank}: {e}"));
            }
            pipes += 1;
        }
    }
    drop(done_tx);
    let code = supervise(&mut ranks, &err);
    let deadline = Instant::now() + DRAIN_GRACE;
    for _ in 0..pipes {
        if done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            tracing::warn!(
                "some rank output is still open after every rank exited (a background process?); not waiting"
            );
            break;
        }
    }
    drop(server);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (Sink, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (buf.clone(), buf)
    }

    fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
        String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
    }

    fn sh(n: usize, script: &str) -> LaunchOpts {
        LaunchOpts {
            n,
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            extra_env: vec![],
            bind: Bind::Core,
        }
    }

    /// Runs `opts`; returns the result, stdout, stderr and how long it took.
    fn go(opts: &LaunchOpts) -> (Result<i32, String>, String, String, Duration) {
        let ((o, obuf), (e, ebuf)) = (sink(), sink());
        let start = Instant::now();
        let r = launch(opts, o, e);
        (r, text(&obuf), text(&ebuf), start.elapsed())
    }

    #[test]
    fn all_ranks_succeed() {
        let (r, out, err, _) = go(&sh(2, "echo hi; exit 0"));
        assert_eq!(r, Ok(0), "stderr: {err}");
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["[0] hi", "[1] hi"]);
    }

    #[test]
    fn env_and_stderr_prefix() {
        let mut opts = sh(
            2,
            r#"case "$OXCCL_STORE" in tcp://127.0.0.1:*) ;; *) exit 9;; esac
               echo "$OXCCL_RANK/$OXCCL_WORLD_SIZE/$OXCCL_LOCAL_RANK/$OXCCL_LOCAL_WORLD_SIZE $OXCCL_STORE_HOSTED $FOO" >&2
               printf 'no newline'"#,
        );
        opts.extra_env.push(("FOO".into(), "bar".into()));
        let (r, out, err, _) = go(&opts);
        assert_eq!(r, Ok(0), "stderr: {err}");
        assert!(err.contains("[0] 0/2/0/2 1 bar\n") && err.contains("[1] 1/2/1/2 1 bar\n"), "{err}");
        assert!(out.contains("[0] no newline\n") && out.contains("[1] no newline\n"), "{out}");
    }

    #[test]
    fn failure_stops_the_others() {
        let (r, _, err, took) = go(&sh(3, "if [ $OXCCL_RANK = 1 ]; then exit 3; fi; sleep 30"));
        assert_eq!(r, Ok(3), "stderr: {err}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert!(err.contains("oxccl launch: rank 1 exited with status 3; stopping the others"), "{err}");
    }

    #[test]
    fn sigkill_after_grace_when_sigterm_is_ignored() {
        // Rank 1 ignores SIGTERM (and so does its `sleep`); rank 0 fails once that is set up.
        let ready = std::env::temp_dir().join(format!("oxccl-launch-ready-{}", std::process::id()));
        let mut opts = sh(
            2,
            r#"if [ $OXCCL_RANK = 1 ]; then trap '' TERM; : > "$READY"; exec sleep 30; fi
               i=0; while [ ! -e "$READY" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; exit 4"#,
        );
        opts.extra_env.push(("READY".into(), ready.to_string_lossy().into_owned()));
        let (r, _, err, took) = go(&opts);
        let _ = std::fs::remove_file(&ready);
        assert_eq!(r, Ok(4), "stderr: {err}");
        assert!(took >= KILL_GRACE && took < Duration::from_secs(10), "took {took:?}");
        assert!(err.contains("sending SIGKILL"), "{err}");
    }

    #[test]
    fn death_by_signal_is_128_plus_signal() {
        let (r, _, err, _) = go(&sh(1, "kill -9 $$"));
        assert_eq!(r, Ok(128 + libc::SIGKILL), "stderr: {err}");
        assert!(err.contains("rank 0 exited with status signal 9 (SIGKILL)"), "{err}");
    }

    /// Ranks get CPUs of their own (as many distinct ones as the machine allows); with
    /// `Bind::None`, or alone, a rank may run anywhere the launcher may.
    #[test]
    fn ranks_are_bound_to_cpus_of_their_own() {
        let all = bind::usable_cpus().unwrap();
        if all.len() < 2 {
            oxccl_core::testing::skip(oxccl_core::testing::Need::Cpus, "one CPU: nothing to bind ranks apart on");
            return;
        }
        let script = r#"echo "$(grep Cpus_allowed_list /proc/self/status | cut -f2) ${OXCCL_LAUNCH_CPUS:-unset}""#;
        let n = all.len().min(4);
        let (r, out, err, _) = go(&sh(n, script));
        assert_eq!(r, Ok(0), "stderr: {err}");
        let mut seen: Vec<String> = Vec::new();
        for line in out.lines() {
            let (_, rest) = line.split_once("] ").unwrap();
            let (allowed, told) = rest.split_once(' ').unwrap();
            assert_eq!(allowed, told, "the rank is told the CPUs it is bound to: {out}");
            seen.push(allowed.to_string());
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n, "each rank has CPUs of its own: {out}");
        // Unbound ranks (and a rank alone) keep the launcher's mask, and are told nothing.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let mask = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
        for (n, bind) in [(2, Bind::None), (1, Bind::Core)] {
            let mut opts = sh(n, script);
            opts.bind = bind;
            opts.extra_env.push(("OXCCL_LAUNCH_CPUS".into(), "inherited".into()));
            let (r, out, _, _) = go(&opts);
            assert_eq!(r, Ok(0));
            assert_eq!(out.lines().count(), n);
            for line in out.lines() {
                assert!(line.ends_with(&format!("] {mask} unset")), "{n} rank(s), {bind:?}: {out}");
            }
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut opts = sh(2, "true");
        opts.program = "/nonexistent/oxccl-no-such-program".into();
        let e = go(&opts).0.unwrap_err();
        assert!(e.contains("cannot start rank 0") && e.contains("oxccl-no-such-program"), "{e}");
        let e = go(&sh(0, "true")).0.unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
    }
}
