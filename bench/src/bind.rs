//! Where `oxccl launch` puts local ranks: one core each, as MPI launchers do.
//!
//! Two ranks left to the scheduler often start on one core and stay there for a while; then
//! every message between them waits for a context switch (~35 µs here instead of ~0.4 µs).
//! So each rank is bound to CPUs of its own:
//!
//! * the CPUs are those the launcher may use (its affinity mask: `taskset`, cgroup cpusets),
//!   grouped into physical cores and NUMA nodes from `/sys/devices/system/cpu`;
//! * when the ranks fit on distinct cores, each gets a whole core (all its hardware threads).
//!   One or two ranks go on the first node (neighbours talk through one memory controller);
//!   more are spread over the NUMA nodes in contiguous blocks, in proportion to each node's
//!   cores, so consecutive ranks share a node and every node's memory bandwidth is used
//!   (Open MPI's defaults: map by core for two ranks, by NUMA domain above);
//! * with more ranks than cores but not more than hardware threads, each gets one thread;
//! * with more ranks than CPUs nothing is bound (ranks would share CPUs anyway), and the
//!   launcher says so.

use std::collections::BTreeMap;
use std::path::Path;

/// How `oxccl launch` binds ranks to CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Bind {
    /// One core (or hardware thread) per rank, NUMA-aware.
    #[default]
    Core,
    /// No binding: the scheduler places ranks.
    None,
}

/// One CPU (hardware thread) the launcher may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// Its number, as `sched_setaffinity` and `taskset` name it.
    pub id: usize,
    /// Its NUMA node.
    pub node: usize,
    /// Its physical package (socket).
    pub package: usize,
    /// Its core within the package.
    pub core: usize,
}

/// The CPUs each rank is bound to, or why nothing is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `cpus[rank]`: the CPUs of that rank.
    Bound(Vec<Vec<usize>>),
    /// Nothing bound, and why.
    Unbound(String),
}

/// The CPUs this process may run on, with their topology (each its own core on node 0 where
/// `/sys` does not say).
pub fn usable_cpus() -> Result<Vec<Cpu>, String> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(format!("cannot read this process's CPU affinity: {}", std::io::Error::last_os_error()));
    }
    let sys = Path::new("/sys/devices/system/cpu");
    let read = |p: &Path| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<usize>().ok());
    let mut cpus = Vec::new();
    for id in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: id < CPU_SETSIZE, the set's capacity.
        if !unsafe { libc::CPU_ISSET(id, &set) } {
            continue;
        }
        let dir = sys.join(format!("cpu{id}"));
        let node = std::fs::read_dir(&dir)
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("node")?.parse::<usize>().ok()).next()
            })
            .unwrap_or(0);
        let package = read(&dir.join("topology/physical_package_id")).unwrap_or(0);
        let core = read(&dir.join("topology/core_id")).unwrap_or(id);
        cpus.push(Cpu { id, node, package, core });
    }
    Ok(cpus)
}

/// Splits `n` ranks over groups of the given capacities, in proportion (largest remainder),
/// never more than a group holds. `n` must not exceed the total.
fn share(n: usize, caps: &[usize]) -> Vec<usize> {
    let total: usize = caps.iter().sum();
    let mut got: Vec<usize> = caps.iter().map(|c| n * c / total).collect();
    let mut order: Vec<usize> = (0..caps.len()).collect();
    // Largest remainder first; ties to the earlier group.
    order.sort_by_key(|&i| std::cmp::Reverse((n * caps[i]) % total));
    let mut left = n - got.iter().sum::<usize>();
    for &i in order.iter().cycle().take(caps.len() * 2) {
        if left == 0 {
            break;
        }
        if got[i] < caps[i] {
            got[i] += 1;
            left -= 1;
        }
    }
    got
}

/// Places `n` ranks on `cpus` (see the module documentation).
pub fn place(cpus: &[Cpu], n: usize) -> Placement {
    if cpus.is_empty() {
        return Placement::Unbound("no CPU is known".into());
    }
    // node -> (package, core) -> hardware threads, all ordered.
    let mut nodes: BTreeMap<usize, BTreeMap<(usize, usize), Vec<usize>>> = BTreeMap::new();
    for c in cpus {
        nodes.entry(c.node).or_default().entry((c.package, c.core)).or_default().push(c.id);
    }
    let cores: usize = nodes.values().map(|m| m.len()).sum();
    // The units a rank may get, per node: whole cores, or single threads (first threads of
    // every core before second ones).
    let units: Vec<Vec<Vec<usize>>> = if n <= cores {
        nodes.values().map(|m| m.values().cloned().collect()).collect()
    } else if n <= cpus.len() {
        nodes
            .values()
            .map(|m| {
                let deepest = m.values().map(|t| t.len()).max().unwrap_or(0);
                (0..deepest).flat_map(|k| m.values().filter_map(move |t| t.get(k).map(|&c| vec![c]))).collect()
            })
            .collect()
    } else {
        return Placement::Unbound(format!(
            "{n} ranks on {} CPUs: not binding (ranks share CPUs; expect slow small messages)",
            cpus.len()
        ));
    };
    let per_node = if n <= 2 && units[0].len() >= n {
        // Neighbours on one node.
        let mut v = vec![0; units.len()];
        v[0] = n;
        v
    } else {
        share(n, &units.iter().map(|u| u.len()).collect::<Vec<_>>())
    };
    let mut out = Vec::with_capacity(n);
    for (u, k) in units.iter().zip(per_node) {
        out.extend(u.iter().take(k).cloned());
    }
    Placement::Bound(out)
}

/// `cpus` as a cpu_set_t, for `sched_setaffinity`.
pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: c < CPU_SETSIZE, the set's capacity.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// `0-3,8` style, as `taskset -c` and `/proc/self/status` write CPU lists.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if j == i { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nodes` NUMA nodes (one package each) of `cores` cores with `threads` threads, numbered
    /// as Linux does: first threads of every core, then second threads.
    fn machine(nodes: usize, cores: usize, threads: usize) -> Vec<Cpu> {
        let mut v = Vec::new();
        for t in 0..threads {
            for node in 0..nodes {
                for core in 0..cores {
                    v.push(Cpu { id: t * nodes * cores + node * cores + core, node, package: node, core });
                }
            }
        }
        v
    }

    fn bound(p: Placement) -> Vec<Vec<usize>> {
        match p {
            Placement::Bound(v) => v,
            Placement::Unbound(why) => panic!("unbound: {why}"),
        }
    }

    #[test]
    fn two_cpus_two_ranks_one_each() {
        assert_eq!(bound(place(&machine(1, 2, 1), 2)), vec![vec![0], vec![1]]);
        assert_eq!(bound(place(&machine(1, 2, 1), 1)), vec![vec![0]]);
    }

    #[test]
    fn whole_cores_with_their_threads_and_two_ranks_on_one_node() {
        // 2 nodes x 4 cores x 2 threads: cpu c and c+8 are one core.
        let m = machine(2, 4, 2);
        assert_eq!(bound(place(&m, 2)), vec![vec![0, 8], vec![1, 9]]);
    }

    #[test]
    fn more_ranks_spread_over_nodes_in_blocks() {
        let m = machine(2, 4, 2);
        assert_eq!(bound(place(&m, 4)), vec![vec![0, 8], vec![1, 9], vec![4, 12], vec![5, 13]]);
        let p = bound(place(&m, 3));
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], vec![0, 8]);
        // Every rank has distinct CPUs.
        let mut all: Vec<usize> = p.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn more_ranks_than_cores_get_single_threads_then_nothing() {
        let m = machine(1, 4, 2);
        let p = bound(place(&m, 6));
        assert_eq!(p, vec![vec![0], vec![1], vec![2], vec![3], vec![4], vec![5]]);
        match place(&m, 9) {
            Placement::Unbound(why) => assert!(why.contains("9 ranks on 8 CPUs"), "{why}"),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn uneven_nodes_share_in_proportion() {
        assert_eq!(share(5, &[2, 6]), vec![1, 4]);
        assert_eq!(share(3, &[1, 1, 1]), vec![1, 1, 1]);
        assert_eq!(share(7, &[4, 4]), vec![4, 3]);
        assert_eq!(share(4, &[1, 8]), vec![0, 4]);
        assert_eq!(share(2, &[1, 1, 5]).iter().sum::<usize>(), 2);
    }

    #[test]
    fn cpu_lists_read_like_taskset() {
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[3]), "3");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn this_machine_has_usable_cpus() {
        let cpus = usable_cpus().unwrap();
        assert!(!cpus.is_empty());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
        let ids: Vec<usize> = cpus.iter().map(|c| c.id).collect();
        assert_eq!(cpu_list(&ids), list, "the CPUs found are those /proc/self/status lists");
    }
}
