//! Several "hosts" on one machine: network namespaces joined by veth pairs on a bridge.
//!
//! Each [`Hosts`] gets its own bridge namespace, so instances never share a network, and
//! addresses `198.18.0.1`, `198.18.0.2`, ... (`198.18.0.0/15` is reserved for benchmarking)
//! exist only inside namespaces this harness created. The root namespace is never touched:
//! veth ends are created directly inside their namespaces. Everything is removed on drop,
//! also when a test fails; namespaces left by a killed test process (whose pid is gone) are
//! removed by the next harness that starts.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);
const PREFIX: &str = "oxccl-t";

/// A set of namespace "hosts".
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<String>,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    let out = Command::new("ip").args(&a).stdin(Stdio::null()).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Removes namespaces of earlier test processes that are gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else { continue };
        let pid: i32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        // SAFETY: kill with signal 0 only checks whether the process exists.
        if pid > 0 && unsafe { libc::kill(pid, 0) } != 0 {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Hosts {
    /// Why namespaces cannot be used here, if they cannot (tests then print `skipped: ...`).
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("network namespaces need root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Some("iproute2 (ip) is not installed".into());
        }
        None
    }

    /// [`Hosts::create`], or `None` after skipping the calling test ([`crate::skip`]) when
    /// namespaces cannot be made here.
    pub fn create_or_skip(n: usize) -> Option<Hosts> {
        match Hosts::create(n) {
            Ok(h) => Some(h),
            Err(why) => {
                crate::skip(crate::Need::Netns, why);
                None
            }
        }
    }

    /// `n` hosts on one bridge; host `i` has `eth0` = `198.18.0.{i+1}/24`.
    pub fn create(n: usize) -> Result<Hosts, String> {
        if let Some(why) = Self::unavailable() {
            return Err(why);
        }
        remove_stale();
        let tag = format!("{PREFIX}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut h = Hosts { hosts: Vec::new(), bridge: format!("{tag}-br") };
        ip(&["netns", "add", &h.bridge])?;
        in_ns(&h.bridge, &["ip", "link", "set", "lo", "up"])?;
        in_ns(&h.bridge, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&h.bridge, &["ip", "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{tag}-h{i}");
            ip(&["netns", "add", &ns])?;
            h.hosts.push(ns.clone());
            in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &h.bridge])?;
            in_ns(&ns, &["ip", "addr", "add", &format!("{}/24", h.addr(i)), "dev", "eth0"])?;
            in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(&h.bridge, &["ip", "link", "set", &port, "master", "br0"])?;
            in_ns(&h.bridge, &["ip", "link", "set", &port, "up"])?;
        }
        Ok(h)
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }
    /// True with no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
    /// Every namespace this harness made (hosts, then the bridge).
    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().chain(std::iter::once(&self.bridge)).cloned().collect()
    }
    /// The address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("198.18.0.{}", i + 1)
    }
    /// A command that runs `program` inside host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]]).arg(program);
        c
    }
    /// Shapes host `i`'s outgoing traffic with a token bucket (e.g. `rate = "1gbit"`).
    pub fn shape(&self, i: usize, rate: &str, burst: &str, latency: &str) -> Result<(), String> {
        in_ns(
            &self.hosts[i],
            &["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", latency],
        )
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.bridge)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
