//! The host-wide endpoint ledger: one file per host identity, shared by every process of the
//! host, holding one lease per line (JSON). Every read-modify-write happens under an
//! exclusive `flock` on a companion `.lock` file, and the data file is replaced by rename, so
//! a process killed mid-write leaves the previous version intact.
//!
//! A lease whose process is gone (no `/proc/PID`, or a different start time: the pid was
//! reused) is dropped the next time anyone reads the ledger.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oxccl_core::budget::{self, Budget, Lease, Policy, TrafficClass};
use oxccl_core::{Error, Result};

/// How long a process waits for the ledger's lock before giving up (holders keep it for
/// microseconds; only a stopped process can hold it longer).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The ledger of one host.
#[derive(Debug, Clone)]
pub struct Ledger {
    data: PathBuf,
    lock: PathBuf,
}

/// Start time of `pid` in clock ticks after boot (field 22 of /proc/PID/stat), if it runs.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn alive(l: &Lease) -> bool {
    start_time(l.pid) == Some(l.start)
}

/// FNV-1a, for a file name from a host identity.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

impl Ledger {
    /// The ledger of host `host_id` in `dir` (`OXCCL_LEDGER_DIR`).
    pub fn for_host(dir: &str, host_id: &str) -> Ledger {
        let base = PathBuf::from(if dir.is_empty() { "/dev/shm" } else { dir });
        let name = format!("oxccl-ledger-{:016x}", fnv(host_id));
        Ledger { data: base.join(&name), lock: base.join(format!("{name}.lock")) }
    }

    /// The ledger of this machine: keyed by the kernel's boot id, so that containers of one
    /// machine (with different hostnames) that share `OXCCL_LEDGER_DIR` share one budget;
    /// by `OXCCL_HOST_ID` when that is set (tests make several "hosts" of one machine).
    pub fn for_config(cfg: &oxccl_core::config::Config) -> Ledger {
        let key = match &cfg.host_id {
            Some(h) => h.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| format!("boot/{}", s.trim()))
                .unwrap_or_else(|_| crate::host::host_id(None)),
        };
        Ledger::for_host(&cfg.ledger_dir, &key)
    }

    /// The data file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.data
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Internal(format!("endpoint ledger {}: {what}: {e}", self.data.display()))
    }

    /// Runs `f` on the live leases under the lock; writes them back if `f` says they changed
    /// (or dead ones were dropped).
    fn locked<R>(&self, f: impl FnOnce(&mut Vec<Lease>) -> (R, bool)) -> Result<R> {
        // Every user of the host shares the files: created readable and writable by all
        // (flock needs only a read-only descriptor, for a lock file someone else created).
        let lockf = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o666)
            .open(&self.lock)
            .or_else(|_| std::fs::File::open(&self.lock))
            .map_err(|e| self.err("cannot open its lock file", e))?;
        let _ = std::fs::set_permissions(&self.lock, std::fs::Permissions::from_mode(0o666));
        let until = Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(self.err("flock", e));
            }
            if Instant::now() >= until {
                return Err(self.err("lock held by another process for over 10 s", "is one stopped?"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let text = match std::fs::read_to_string(&self.data) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.err("cannot read", e)),
        };
        let mut leases = Vec::new();
        let mut dropped = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Lease>(line) {
                Ok(l) if alive(&l) => leases.push(l),
                Ok(l) => {
                    tracing::info!(
                        pid = l.pid,
                        nic = %l.nic,
                        class = %l.class,
                        comm = %l.comm,
                        "endpoint ledger: reclaimed {} endpoint(s) of a process that is gone",
                        l.endpoints
                    );
                    dropped += 1;
                }
                Err(e) => {
                    tracing::warn!("endpoint ledger {}: dropped a malformed line: {e}", self.data.display());
                    dropped += 1;
                }
            }
        }
        let (r, changed) = f(&mut leases);
        if (changed || dropped > 0) && leases.is_empty() {
            // Nothing held: no file (the lock file stays; removing it would let two
            // processes lock two different files).
            match std::fs::remove_file(&self.data) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.err("cannot remove", e)),
            }
        } else if changed || dropped > 0 {
            let tmp = self.data.with_extension(format!("tmp{}", std::process::id()));
            let mut out = String::new();
            for l in &leases {
                out += &serde_json::to_string(l).map_err(|e| self.err("encode", e))?;
                out.push('\n');
            }
            let mut file = std::fs::File::create(&tmp).map_err(|e| self.err("cannot write", e))?;
            file.write_all(out.as_bytes()).map_err(|e| self.err("cannot write", e))?;
            drop(file);
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666));
            std::fs::rename(&tmp, &self.data).map_err(|e| self.err("cannot replace", e))?;
        }
        // The lock goes with the descriptor.
        drop(lockf);
        Ok(r)
    }

    /// Every live lease of the host.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        self.locked(|v| (v.clone(), false))
    }

    /// Leases `want` endpoints of `nic` for `class` if the policy allows.
    pub fn take(
        &self,
        nic: &str,
        reported_limit: usize,
        policy: &Policy,
        class: TrafficClass,
        comm: &str,
        want: usize,
    ) -> Result<Take> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| self.err("no /proc/self/stat", "cannot identify this process"))?;
        let limit = policy.limit(nic, reported_limit);
        let r = self.locked(|leases| match budget::decide(nic, limit, policy, class, want, leases) {
            (true, b) => {
                let lease = Lease {
                    id: format!("{pid}-{start}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
                    pid,
                    start,
                    nic: nic.to_string(),
                    class,
                    comm: comm.to_string(),
                    endpoints: want,
                };
                leases.push(lease.clone());
                (Ok((lease, b)), true)
            }
            (false, b) => (Err(b), false),
        })?;
        // The guard is made only once the lease is written (and the lock let go): a failed
        // write leaves nothing to release.
        Ok(match r {
            Ok((lease, b)) => Take::Granted(LeaseGuard { ledger: self.clone(), lease }, b),
            Err(b) => Take::Refused(b),
        })
    }

    fn release(&self, id: &str) -> Result<()> {
        self.locked(|v| {
            let before = v.len();
            v.retain(|l| l.id != id);
            ((), v.len() != before)
        })
    }
}

/// What [`Ledger::take`] decided.
#[derive(Debug)]
pub enum Take {
    /// The lease, and the budget as it was before it.
    Granted(LeaseGuard, Budget),
    /// The budget that had nothing for the class.
    Refused(Budget),
}

impl Take {
    /// The lease, if granted.
    pub fn granted(self) -> Option<LeaseGuard> {
        match self {
            Take::Granted(g, _) => Some(g),
            Take::Refused(_) => None,
        }
    }
}

/// A lease held: released when dropped.
#[derive(Debug)]
pub struct LeaseGuard {
    ledger: Ledger,
    /// What is held.
    pub lease: Lease,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        match self.ledger.release(&self.lease.id) {
            Ok(()) => tracing::debug!(nic = %self.lease.nic, comm = %self.lease.comm, "endpoint lease released"),
            Err(e) => tracing::warn!("releasing endpoint lease {}: {e}", self.lease.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            reserve: budget::parse_reserve("gradient:1").unwrap(),
            nic_endpoints: vec![],
            tcp_fallback: [false; 5],
            share: 0.1,
        }
    }

    /// A fresh directory, removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir() -> Dir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "oxccl-ledger-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    #[test]
    fn leases_are_recorded_refused_and_released() {
        let d = dir();
        let l = Ledger::for_host(d.path().to_str().unwrap(), "host-a");
        let p = policy();
        let Take::Granted(g1, b) = l.take("nic0", 2, &p, TrafficClass::Gradient, "grad", 1).unwrap() else {
            panic!("refused")
        };
        assert_eq!(b.free_for_class, 2);
        // Bulk: limit 2, gradient holds 1 and has used its reservation: one left.
        let g2 = l.take("nic0", 2, &p, TrafficClass::Bulk, "bulk", 1).unwrap().granted().unwrap();
        let Take::Refused(refused) = l.take("nic0", 2, &p, TrafficClass::WeightRefit, "refit", 1).unwrap() else {
            panic!("granted")
        };
        let why = refused.refusal(TrafficClass::WeightRefit, "refit");
        assert!(why.contains("limit 2") && why.contains("grad (gradient") && why.contains("bulk (bulk"), "{why}");
        // Another host's ledger is another file.
        let other = Ledger::for_host(d.path().to_str().unwrap(), "host-b");
        assert!(other.leases().unwrap().is_empty());
        assert_eq!(l.leases().unwrap().len(), 2);
        drop(g2);
        assert_eq!(l.leases().unwrap().len(), 1);
        assert!(l.take("nic0", 2, &p, TrafficClass::WeightRefit, "refit", 1).unwrap().granted().is_some());
        drop(g1);
        assert!(l.leases().unwrap().is_empty());
        assert!(!l.path().exists(), "an empty ledger leaves no data file");
    }

    #[test]
    fn leases_of_a_dead_process_are_reclaimed() {
        let d = dir();
        let l = Ledger::for_host(d.path().to_str().unwrap(), "host");
        // A child that has exited: its pid is gone (or reused with another start time).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        let dead = Lease {
            id: "dead-1".into(),
            pid,
            start,
            nic: "nic0".into(),
            class: TrafficClass::Bulk,
            comm: "gone".into(),
            endpoints: 1,
        };
        let garbage = "{not json\n";
        std::fs::write(l.path(), format!("{}\n{garbage}", serde_json::to_string(&dead).unwrap())).unwrap();
        let p = policy();
        assert!(l.take("nic0", 1, &p, TrafficClass::Gradient, "grad", 1).unwrap().granted().is_some());
        let left = l.leases().unwrap();
        assert!(left.iter().all(|x| x.pid == std::process::id()), "{left:?}");
        assert!(!l.path().exists(), "the dead lease and the garbage are gone");
    }
}
