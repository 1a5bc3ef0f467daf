//! Where `oxccl launch` puts local ranks: one core each, as MPI launchers do.
//!
//! Two ranks left to the scheduler often start on one core and stay there for a while; then
//! every message between them waits for a context switch (~35 µs here instead of ~0.4 µs).
//! So each rank is bound to cores of its own:
//!
//! * the CPUs are those the launcher may use (its affinity mask: `taskset`, cgroup cpusets),
//!   grouped into physical cores (`topology/core_cpus_list`) and NUMA nodes from
//!   `/sys/devices/system/cpu`;
//! * a single rank is not bound (it has the machine to itself);
//! * when the ranks fit on distinct cores, each gets a contiguous block of whole cores (all
//!   their hardware threads), the cores of a node shared out evenly among the ranks placed
//!   there, so a rank's own threads (OpenMP, BLAS, data loaders) have room. Two ranks go on
//!   the first node (neighbours talk through one memory controller); more are spread over
//!   the NUMA nodes in contiguous blocks, in proportion to each node's cores, so
//!   consecutive ranks share a node and every node's memory is used;
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
    /// Its physical core: the same for every hardware thread of one core (the smallest CPU
    /// number of the core).
    pub core: usize,
}

/// The CPUs each rank is bound to, or why nothing is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `cpus[rank]`: the CPUs of that rank, in increasing order.
    Bound(Vec<Vec<usize>>),
    /// One rank: nothing to keep apart.
    Alone,
    /// Nothing bound, and why (a warning for the user).
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
    let read = |p: &Path| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
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
        // The threads of one core, as the kernel lists them; a CPU alone where it says nothing.
        let core = ["topology/core_cpus_list", "topology/thread_siblings_list"]
            .iter()
            .find_map(|f| read(&dir.join(f)).and_then(|l| parse_cpu_list(&l)).and_then(|v| v.first().copied()))
            .unwrap_or(id);
        cpus.push(Cpu { id, node, core });
    }
    Ok(cpus)
}

/// Parses `0-3,8` (a CPU list as the kernel writes one).
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse::<usize>().ok()?),
            None => v.push(part.trim().parse().ok()?),
        }
    }
    Some(v)
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
    if n <= 1 {
        return Placement::Alone;
    }
    if cpus.is_empty() {
        return Placement::Unbound("no CPU is known: not binding".into());
    }
    // node -> core -> hardware threads, all ordered.
    let mut nodes: BTreeMap<usize, BTreeMap<usize, Vec<usize>>> = BTreeMap::new();
    for c in cpus {
        nodes.entry(c.node).or_default().entry(c.core).or_default().push(c.id);
    }
    let cores: usize = nodes.values().map(|m| m.len()).sum();
    // The units ranks are made of, per node: whole cores, or single threads (first threads of
    // every core before second ones).
    let whole_cores = n <= cores;
    let units: Vec<Vec<Vec<usize>>> = if whole_cores {
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
        // k ranks share the node's cores evenly, in contiguous blocks (the first ones one
        // more when they do not divide); hardware threads go one per rank.
        let mut at = 0;
        for i in 0..k {
            let take = if whole_cores { u.len() / k + usize::from(i < u.len() % k) } else { 1 };
            let mut mine: Vec<usize> = u[at..at + take].iter().flatten().copied().collect();
            mine.sort_unstable();
            out.push(mine);
            at += take;
        }
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

    /// `nodes` NUMA nodes of `cores` cores with `threads` threads, numbered as Linux does:
    /// first threads of every core, then second threads.
    fn machine(nodes: usize, cores: usize, threads: usize) -> Vec<Cpu> {
        let mut v = Vec::new();
        for t in 0..threads {
            for node in 0..nodes {
                for core in 0..cores {
                    let first = node * cores + core;
                    v.push(Cpu { id: t * nodes * cores + first, node, core: first });
                }
            }
        }
        v
    }

    fn bound(p: Placement) -> Vec<Vec<usize>> {
        match p {
            Placement::Bound(v) => v,
            other => panic!("not bound: {other:?}"),
        }
    }

    #[test]
    fn two_cpus_two_ranks_one_each_and_one_rank_alone() {
        assert_eq!(bound(place(&machine(1, 2, 1), 2)), vec![vec![0], vec![1]]);
        assert_eq!(place(&machine(1, 2, 1), 1), Placement::Alone);
    }

    #[test]
    fn two_ranks_share_the_first_node_in_whole_cores() {
        // 2 nodes x 4 cores x 2 threads: cpu c and c+8 are one core.
        let m = machine(2, 4, 2);
        assert_eq!(bound(place(&m, 2)), vec![vec![0, 1, 8, 9], vec![2, 3, 10, 11]]);
    }

    #[test]
    fn more_ranks_spread_over_nodes_in_blocks() {
        let m = machine(2, 4, 2);
        assert_eq!(
            bound(place(&m, 4)),
            vec![vec![0, 1, 8, 9], vec![2, 3, 10, 11], vec![4, 5, 12, 13], vec![6, 7, 14, 15]]
        );
        // 3 ranks: two on the first node, one with the whole second node.
        assert_eq!(bound(place(&m, 3)), vec![vec![0, 1, 8, 9], vec![2, 3, 10, 11], vec![4, 5, 6, 7, 12, 13, 14, 15]]);
        // 5 ranks on 8 cores: 3 then 2; the first of a node gets the spare core.
        let p = bound(place(&m, 5));
        assert_eq!(p[0], vec![0, 1, 8, 9]);
        assert_eq!(p[1], vec![2, 10]);
        assert_eq!(p[2], vec![3, 11]);
        let mut all: Vec<usize> = p.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 16, "every CPU used, none twice: {p:?}");
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
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn this_machine_has_usable_cpus() {
        // Those this process may use (sched_getaffinity: online ones) are all in its mask and
        // all online.
        let cpus = usable_cpus().unwrap();
        assert!(!cpus.is_empty());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let mask = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap();
        let mask = parse_cpu_list(mask).unwrap();
        let online = parse_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap()).unwrap();
        for c in &cpus {
            assert!(mask.contains(&c.id) && online.contains(&c.id), "{c:?} not in {mask:?} / {online:?}");
        }
    }
}
