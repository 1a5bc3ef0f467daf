//! The endpoint budget: traffic classes, per-NIC endpoint limits and reservations, the rule
//! that decides a lease, and the class gate that gives higher classes the wire first.
//!
//! Everything here is pure: the host-wide ledger file that holds the leases lives in the
//! `oxccl` crate, which reads it, calls [`decide`], and writes it back under a lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a communicator carries, in order of priority (the first is the highest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficClass {
    /// The trainer's gradient all-reduce: never starved.
    Gradient,
    /// Expert-parallel all-to-all.
    ExpertAllToAll,
    /// Pipeline-parallel stage links.
    PipelineStage,
    /// Trainer → generator weight transfer.
    WeightRefit,
    /// Everything else (the default).
    Bulk,
}

/// Number of classes.
pub const CLASSES: usize = 5;

impl TrafficClass {
    /// Every class, highest priority first.
    pub const ALL: [TrafficClass; CLASSES] = [
        TrafficClass::Gradient,
        TrafficClass::ExpertAllToAll,
        TrafficClass::PipelineStage,
        TrafficClass::WeightRefit,
        TrafficClass::Bulk,
    ];

    /// Name as settings and explain spell it.
    pub fn name(self) -> &'static str {
        match self {
            TrafficClass::Gradient => "gradient",
            TrafficClass::ExpertAllToAll => "expert_all_to_all",
            TrafficClass::PipelineStage => "pipeline_stage",
            TrafficClass::WeightRefit => "weight_refit",
            TrafficClass::Bulk => "bulk",
        }
    }

    /// 0 for the highest priority.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses a name (`gradient`, `expert_all_to_all` or `expert`, `pipeline_stage` or
    /// `pipeline`, `weight_refit` or `refit`, `bulk`; case and `-`/`_` ignored).
    pub fn parse(s: &str) -> Option<TrafficClass> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        Some(match s.as_str() {
            "gradient" | "grad" => TrafficClass::Gradient,
            "expert_all_to_all" | "expertalltoall" | "expert" => TrafficClass::ExpertAllToAll,
            "pipeline_stage" | "pipelinestage" | "pipeline" => TrafficClass::PipelineStage,
            "weight_refit" | "weightrefit" | "refit" => TrafficClass::WeightRefit,
            "bulk" => TrafficClass::Bulk,
            _ => return None,
        })
    }
}

impl std::fmt::Display for TrafficClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `class:count,...` (`OXCCL_RESERVE`); classes not named get 0.
pub fn parse_reserve(s: &str) -> std::result::Result<[usize; CLASSES], String> {
    let mut r = [0; CLASSES];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "none") {
        let (c, n) = part.split_once(':').ok_or_else(|| format!("'{part}' is not class:count"))?;
        let c = TrafficClass::parse(c).ok_or_else(|| format!("'{c}' is not a traffic class"))?;
        r[c.index()] = n.trim().parse().map_err(|_| format!("'{n}' is not a count of endpoints"))?;
    }
    Ok(r)
}

/// Parses a list of classes (`OXCCL_TCP_FALLBACK`); `all` and `none` are accepted.
pub fn parse_classes(s: &str) -> std::result::Result<[bool; CLASSES], String> {
    let mut r = [false; CLASSES];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "none" => {}
            "all" => r = [true; CLASSES],
            _ => r[TrafficClass::parse(part).ok_or_else(|| format!("'{part}' is not a traffic class"))?.index()] = true,
        }
    }
    Ok(r)
}

/// Parses `nic:count,...` (`OXCCL_NIC_ENDPOINTS`; `*` names every NIC).
pub fn parse_nic_limits(s: &str) -> std::result::Result<Vec<(String, usize)>, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (nic, n) = part.rsplit_once(':').ok_or_else(|| format!("'{part}' is not nic:count"))?;
        let n = n.trim().parse().map_err(|_| format!("'{n}' is not a count of endpoints"))?;
        v.push((nic.trim().to_string(), n));
    }
    Ok(v)
}

/// The budget settings of a communicator (from `OXCCL_RESERVE`, `OXCCL_NIC_ENDPOINTS`,
/// `OXCCL_TCP_FALLBACK`, `OXCCL_CLASS_SHARE`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Endpoints per NIC kept for each class.
    pub reserve: [usize; CLASSES],
    /// Operator limits per NIC name (`*`: any), before the transport's own.
    pub nic_endpoints: Vec<(String, usize)>,
    /// Classes allowed to fall back to net-tcp when their NIC has no endpoint for them.
    pub tcp_fallback: [bool; CLASSES],
    /// Share of the in-flight slots a class may hold while a higher class is busy on the
    /// same NIC.
    pub share: f64,
}

impl Policy {
    /// The endpoint limit of `nic`: the operator's, else what the transport reported.
    /// Returns the limit and where it came from.
    pub fn limit(&self, nic: &str, reported: usize) -> (usize, &'static str) {
        let exact = self.nic_endpoints.iter().find(|(n, _)| n == nic);
        match exact.or_else(|| self.nic_endpoints.iter().find(|(n, _)| n == "*")) {
            Some((_, n)) => (*n, "OXCCL_NIC_ENDPOINTS"),
            None if reported == 0 => (usize::MAX, "not reported by the provider: unlimited"),
            None => (reported, "reported by the provider"),
        }
    }
}

/// One lease in the host-wide ledger: endpoints of one NIC held by one communicator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Unique on the host (pid and a counter of the process).
    pub id: String,
    /// Holding process.
    pub pid: u32,
    /// Its start time (clock ticks after boot, /proc/PID/stat), so a reused pid is not
    /// mistaken for the holder.
    pub start: u64,
    /// NIC (the libfabric domain name).
    pub nic: String,
    /// Class of the communicator that took it.
    pub class: TrafficClass,
    /// Which communicator, in words (its store prefix and rank).
    pub comm: String,
    /// Endpoints held.
    pub endpoints: usize,
}

/// The NIC endpoint a communicator uses on one rank (what `explain` shows).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EndpointUse {
    /// NIC (libfabric domain, verbs device).
    pub nic: String,
    /// Provider (libfabric provider, verbs).
    pub provider: String,
    /// Number of the endpoint within the process.
    pub endpoint: u32,
    /// Whether the communicator leased it for itself (else it shares one of its process).
    pub dedicated: bool,
    /// Class of the communicator the endpoint was opened for.
    pub opened_for: TrafficClass,
    /// The lease, when dedicated.
    pub lease: Option<Lease>,
    /// The NIC's endpoint limit.
    pub limit: usize,
    /// Where the limit came from.
    pub limit_from: String,
    /// What the provider reports of the device: endpoints, registrations, inline size,
    /// largest message, registration mode.
    pub provider_limits: ProviderLimits,
}

/// A NIC's limits, as its provider reports them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProviderLimits {
    /// Endpoints (queue pairs) the device supports.
    pub ep_cnt: usize,
    /// Memory registrations the device supports (0: not reported).
    pub mr_cnt: usize,
    /// Largest message sent inline.
    pub inject_size: usize,
    /// Largest message.
    pub max_msg_size: usize,
    /// Memory-registration mode, by name.
    pub mr_mode: String,
}

/// What one NIC's budget looks like to one class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// NIC name.
    pub nic: String,
    /// Endpoint limit.
    pub limit: usize,
    /// Where the limit came from.
    pub limit_from: String,
    /// Endpoints leased on the host, all classes.
    pub leased: usize,
    /// Endpoints leased per class (highest first).
    pub leased_by_class: Vec<(TrafficClass, usize)>,
    /// Reservations per class (highest first).
    pub reserved: Vec<(TrafficClass, usize)>,
    /// Endpoints the asking class could still take.
    pub free_for_class: usize,
    /// Every lease on this NIC.
    pub holders: Vec<Lease>,
}

/// The budget of `nic` as `class` sees it, given every live lease on the host.
pub fn budget(nic: &str, limit: (usize, &str), policy: &Policy, class: TrafficClass, leases: &[Lease]) -> Budget {
    let mine: Vec<&Lease> = leases.iter().filter(|l| l.nic == nic).collect();
    let mut by = [0usize; CLASSES];
    for l in &mine {
        by[l.class.index()] += l.endpoints;
    }
    let leased: usize = by.iter().sum();
    // Reservations of higher classes not yet used are held back from this one.
    let held: usize = (0..class.index()).map(|h| policy.reserve[h].saturating_sub(by[h])).sum();
    Budget {
        nic: nic.to_string(),
        limit: limit.0,
        limit_from: limit.1.to_string(),
        leased,
        leased_by_class: TrafficClass::ALL.iter().map(|c| (*c, by[c.index()])).collect(),
        reserved: TrafficClass::ALL.iter().map(|c| (*c, policy.reserve[c.index()])).collect(),
        free_for_class: limit.0.saturating_sub(leased).saturating_sub(held),
        holders: mine.into_iter().cloned().collect(),
    }
}

impl Budget {
    /// Why `class` gets nothing here, in words: the limit, what holds it, what is reserved.
    pub fn refusal(&self, class: TrafficClass, comm: &str) -> String {
        let holders = if self.holders.is_empty() {
            "nothing".to_string()
        } else {
            self.holders
                .iter()
                .map(|l| format!("{} ({}, pid {}) {}", l.comm, l.class, l.pid, l.endpoints))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let held: Vec<String> = self
            .reserved
            .iter()
            .zip(&self.leased_by_class)
            .filter(|((c, r), (_, u))| *c < class && r > u)
            .map(|((c, r), (_, u))| format!("{} more for {c} (reserves {r}, holds {u})", r - u))
            .collect();
        format!(
            "NIC '{}' has no endpoint for {comm} (class {class}): limit {} ({}), {} leased — held by {holders}{}",
            self.nic,
            self.limit,
            self.limit_from,
            self.leased,
            if held.is_empty() { String::new() } else { format!("; kept for higher classes: {}", held.join(", ")) }
        )
    }
}

/// Decides a lease of `want` endpoints of `nic` for `class`: whether it fits (the caller
/// then records the lease), and the budget it was decided on.
pub fn decide(
    nic: &str,
    limit: (usize, &str),
    policy: &Policy,
    class: TrafficClass,
    want: usize,
    leases: &[Lease],
) -> (bool, Budget) {
    let b = budget(nic, limit, policy, class, leases);
    (b.free_for_class >= want, b)
}

/// Bandwidth priority on one NIC within a process: transports ask before they put another
/// piece on the wire. While a class is *active* (it has sends queued or in flight, and posted
/// or completed one within the last [`STALL`]), a lower class may send only out of a credit
/// that grows by `share` times the bytes the higher classes send (so it gets at most about
/// `share` of the wire next to them), and holds at most `share` of the in-flight slots (at
/// least one piece). With no higher class active, a class sends freely. `share = 1` turns
/// priority off; `0` is strict priority.
///
/// Credits, not slot counts alone, because separate connections share a link fairly however
/// deep each one's queue is: only how often the lower class sends decides its share. A higher
/// class that has made no progress for [`STALL`] (it waits on a peer, which may itself wait
/// for the lower class's data) holds nobody back: priority never turns into a deadlock.
#[derive(Debug)]
pub struct ClassGate {
    name: String,
    /// Bit `c` set: links of class `c` use this NIC in the process (counted under the lock).
    /// With one class alone transports skip the gate: one atomic load on the data path.
    present: std::sync::atomic::AtomicU8,
    /// Links of each class with sends queued or in flight, as the transports mark them
    /// (outside the lock: the latency path should not take one for it). They mark only while
    /// the gate is contended; a link already busy when a second class joins is marked at its
    /// next post or progress call.
    busy: [std::sync::atomic::AtomicUsize; CLASSES],
    inner: Mutex<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    share: f64,
    /// Links of each class on this NIC in the process.
    members: [usize; CLASSES],
    in_flight: [usize; CLASSES],
    /// Bytes each class may still send while a higher class is active (may go below zero:
    /// a piece larger than the cap is let through once the credit is at the cap).
    credit: [f64; CLASSES],
    /// When each class last posted or completed a piece.
    progress: [Option<std::time::Instant>; CLASSES],
}

/// Most credit a class can save up (a burst of this much may follow a quiet spell).
const CREDIT_CAP: f64 = 4.0 * 1024.0 * 1024.0;

/// A busy class that has neither posted nor completed a piece for this long is waiting on
/// its peer, not using the wire: it holds no lower class back.
pub const STALL: std::time::Duration = std::time::Duration::from_millis(100);

impl GateInner {
    /// The bit mask of classes with links.
    fn present(&self) -> u8 {
        (0..CLASSES).filter(|&c| self.members[c] > 0).fold(0, |m, c| m | 1 << c)
    }

    fn active(&self, busy: &[std::sync::atomic::AtomicUsize; CLASSES], h: usize, now: std::time::Instant) -> bool {
        busy[h].load(std::sync::atomic::Ordering::Acquire) > 0
            && self.progress[h].is_some_and(|t| now.duration_since(t) < STALL)
    }
}

impl ClassGate {
    /// The NIC this gate is for.
    pub fn nic(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A link of `class` starts using this NIC.
    pub fn join(&self, class: TrafficClass) {
        let mut g = self.lock();
        g.members[class.index()] += 1;
        self.present.store(g.present(), std::sync::atomic::Ordering::SeqCst);
        if self.contended() {
            // Classes marked busy before this join (a third class joining) count as
            // progressing from now.
            let now = std::time::Instant::now();
            for c in 0..CLASSES {
                if self.busy[c].load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    g.progress[c] = Some(now);
                }
            }
        }
    }

    /// A link of `class` stops using this NIC.
    pub fn leave(&self, class: TrafficClass) {
        let mut g = self.lock();
        let c = class.index();
        g.members[c] = g.members[c].saturating_sub(1);
        self.present.store(g.present(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether links of more than one class use this NIC (else the gate has nothing to do).
    pub fn contended(&self) -> bool {
        // SeqCst with join's store and set_busy's mark: a link turning busy and a class
        // joining cannot both miss each other (one of them stamps the busy class's progress).
        self.present.load(std::sync::atomic::Ordering::SeqCst).count_ones() > 1
    }

    /// Marks one more (`true`) or one fewer link of `class` busy (sends queued or in flight).
    pub fn set_busy(&self, class: TrafficClass, on: bool) {
        use std::sync::atomic::Ordering::AcqRel;
        let c = class.index();
        if on {
            // A class that turns busy counts as progressing from now (stamped only while
            // another class is here: alone, nobody looks).
            self.busy[c].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.contended() {
                self.lock().progress[c] = Some(std::time::Instant::now());
            }
        } else {
            let _ = self.busy[c].fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |b| b.checked_sub(1));
        }
    }

    /// Whether a piece of `bytes` of `class` may go out now, `slots` being the in-flight
    /// limit the transport would otherwise use. Takes the slot when it says yes;
    /// [`ClassGate::done`] gives it back once the piece completes, [`ClassGate::undo`] if it
    /// was not posted after all.
    pub fn try_take(&self, class: TrafficClass, slots: usize, bytes: usize) -> bool {
        let c = class.index();
        let mut g = self.lock();
        let share = g.share;
        let now = std::time::Instant::now();
        if share < 1.0 && (0..c).any(|h| g.active(&self.busy, h, now)) {
            let cap = ((slots as f64 * share).floor() as usize).clamp(1, slots.max(1));
            if g.in_flight[c] >= cap || g.credit[c] < (bytes as f64).min(CREDIT_CAP) {
                return false;
            }
            g.credit[c] -= bytes as f64;
        }
        g.in_flight[c] += 1;
        g.progress[c] = Some(now);
        // What this class sends earns every lower class its share.
        for l in c + 1..CLASSES {
            g.credit[l] = (g.credit[l] + share * bytes as f64).min(CREDIT_CAP);
        }
        true
    }

    /// Gives back a slot taken by [`ClassGate::try_take`] whose piece completed.
    pub fn done(&self, class: TrafficClass) {
        let mut g = self.lock();
        let c = class.index();
        g.in_flight[c] = g.in_flight[c].saturating_sub(1);
        g.progress[c] = Some(std::time::Instant::now());
    }

    /// Takes back a [`ClassGate::try_take`] whose piece was not posted: the slot, the credit
    /// it cost and what it earned the lower classes.
    pub fn undo(&self, class: TrafficClass, bytes: usize) {
        let mut g = self.lock();
        let c = class.index();
        let share = g.share;
        g.in_flight[c] = g.in_flight[c].saturating_sub(1);
        g.credit[c] = (g.credit[c] + bytes as f64).min(CREDIT_CAP);
        for l in c + 1..CLASSES {
            g.credit[l] = (g.credit[l] - share * bytes as f64).max(0.0);
        }
    }

    /// Whether a class above `class` posted or completed a piece within the last [`STALL`],
    /// with priority on: it is in the middle of its traffic, even between two messages.
    /// Transports whose pieces queue in the kernel (net-tcp) then keep little of the lower
    /// class queued there, so that the higher class's next message does not wait behind it.
    pub fn higher_recent(&self, class: TrafficClass) -> bool {
        let g = self.lock();
        if g.share >= 1.0 {
            return false;
        }
        let now = std::time::Instant::now();
        (0..class.index()).any(|h| g.progress[h].is_some_and(|t| now.duration_since(t) < STALL))
    }

    /// Pieces of `class` in flight now.
    pub fn in_flight(&self, class: TrafficClass) -> usize {
        self.lock().in_flight[class.index()]
    }
}

/// The process's gate for `nic` (one per NIC name, shared by every communicator and
/// transport of the process while any holds it). `share` is `OXCCL_CLASS_SHARE`; the last
/// caller's value wins.
pub fn gate(nic: &str, share: f64) -> Arc<ClassGate> {
    static GATES: Mutex<Option<HashMap<String, Weak<ClassGate>>>> = Mutex::new(None);
    let mut g = GATES.lock().unwrap_or_else(|e| e.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(gate) = map.get(nic).and_then(Weak::upgrade) {
        gate.lock().share = share;
        return gate;
    }
    let gate = Arc::new(ClassGate {
        name: nic.to_string(),
        present: Default::default(),
        busy: Default::default(),
        inner: Mutex::new(GateInner { share, ..Default::default() }),
    });
    map.insert(nic.to_string(), Arc::downgrade(&gate));
    gate
}

/// Checks that every rank of a communicator gave the same class.
pub fn check_same_class(classes: &[TrafficClass]) -> Result<TrafficClass> {
    let first = classes.first().copied().unwrap_or(TrafficClass::Bulk);
    match classes.iter().position(|c| *c != first) {
        None => Ok(first),
        Some(r) => Err(Error::invalid_usage(format!(
            "ranks disagree on the communicator's traffic class: rank 0 says {first}, rank {r} says {}",
            classes[r]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(reserve: &str) -> Policy {
        Policy {
            reserve: parse_reserve(reserve).unwrap(),
            nic_endpoints: vec![],
            tcp_fallback: parse_classes("all").unwrap(),
            share: 0.1,
        }
    }

    fn lease(nic: &str, class: TrafficClass, n: usize) -> Lease {
        Lease {
            id: format!("{class}-{n}"),
            pid: 1,
            start: 1,
            nic: nic.into(),
            class,
            comm: format!("c-{class}"),
            endpoints: n,
        }
    }

    #[test]
    fn classes_parse_and_order() {
        for c in TrafficClass::ALL {
            assert_eq!(TrafficClass::parse(c.name()), Some(c));
        }
        assert_eq!(TrafficClass::parse("Weight-Refit"), Some(TrafficClass::WeightRefit));
        assert_eq!(TrafficClass::parse("refit"), Some(TrafficClass::WeightRefit));
        assert_eq!(TrafficClass::parse("gradients!"), None);
        assert!(TrafficClass::Gradient < TrafficClass::Bulk);
        assert_eq!(parse_reserve("gradient:2, refit:1").unwrap(), [2, 0, 0, 1, 0]);
        assert!(parse_reserve("gradient").unwrap_err().contains("class:count"));
        assert!(parse_reserve("x:1").unwrap_err().contains("not a traffic class"));
        assert!(parse_reserve("gradient:-1").is_err());
        assert_eq!(parse_classes("refit,bulk").unwrap(), [false, false, false, true, true]);
        assert_eq!(parse_classes("none").unwrap(), [false; 5]);
        assert_eq!(parse_nic_limits("eth0:2,*:8").unwrap(), vec![("eth0".into(), 2), ("*".into(), 8)]);
        assert!(parse_nic_limits("eth0").is_err());
    }

    #[test]
    fn the_operator_limit_wins_over_the_provider() {
        let mut p = policy("");
        assert_eq!(p.limit("eth0", 32768), (32768, "reported by the provider"));
        p.nic_endpoints = parse_nic_limits("*:4,eth0:2").unwrap();
        assert_eq!(p.limit("eth0", 32768).0, 2);
        assert_eq!(p.limit("efa0", 32768).0, 4);
    }

    #[test]
    fn a_class_never_takes_what_a_higher_class_reserved() {
        use TrafficClass::*;
        let p = policy("gradient:2,pipeline_stage:1");
        let lim = (3, "test");
        // Refit first, empty NIC: gradient's 2 and pipeline's 1 are held back from it.
        let (ok, e) = decide("nic", lim, &p, WeightRefit, 1, &[]);
        assert!(!ok);
        assert_eq!(e.free_for_class, 0);
        let why = e.refusal(WeightRefit, "refit comm");
        assert!(
            why.contains("limit 3") && why.contains("2 more for gradient") && why.contains("1 more for pipeline_stage"),
            "{why}"
        );
        // Gradient takes from anyone's reservation but its own holds it.
        assert_eq!(decide("nic", lim, &p, Gradient, 1, &[]), (true, budget("nic", lim, &p, Gradient, &[])));
        assert_eq!(budget("nic", lim, &p, Gradient, &[]).free_for_class, 3);
        // Pipeline may take its own reservation, not gradient's.
        let (ok, b) = decide("nic", lim, &p, PipelineStage, 1, &[]);
        assert!(ok);
        assert_eq!(b.free_for_class, 1);
        let after = [lease("nic", PipelineStage, 1)];
        assert!(!decide("nic", lim, &p, PipelineStage, 1, &after).0);
        // Gradient still gets both of its endpoints, in any order of creation.
        let g1 = [lease("nic", PipelineStage, 1), lease("nic", Gradient, 1)];
        assert!(decide("nic", lim, &p, Gradient, 1, &g1).0);
        // Other NICs do not count.
        assert_eq!(decide("other", lim, &p, Gradient, 1, &g1).1.leased, 0);
        // With its reservation used, gradient's held-back count drops and bulk gets what is left.
        let lim5 = (5, "test");
        let used = [lease("nic", Gradient, 2)];
        assert_eq!(decide("nic", lim5, &p, Bulk, 1, &used).1.free_for_class, 2);
    }

    /// A gate on which links of Gradient and WeightRefit take part (so it is contended).
    fn two_classes(nic: &str, share: f64) -> Arc<ClassGate> {
        let g = gate(nic, share);
        g.join(TrafficClass::Gradient);
        g.join(TrafficClass::WeightRefit);
        g
    }

    /// What net-tcp asks before it lets a lower class queue more in the kernel: whether a
    /// higher class moved data lately (even idle between two messages now), priority on.
    #[test]
    fn a_higher_class_that_moved_data_lately_is_recent() {
        use TrafficClass::*;
        let g = two_classes("gate-recent-nic", 0.1);
        assert!(!g.higher_recent(Bulk), "nothing moved yet");
        assert!(g.try_take(Gradient, 8, 1 << 16));
        g.done(Gradient);
        // Gradient is not busy any more, but moved data a moment ago.
        assert!(g.higher_recent(Bulk));
        assert!(!g.higher_recent(Gradient), "no class above gradient");
        // A class moving data does not make itself or a higher one wait.
        assert!(g.try_take(Bulk, 8, 1));
        assert!(!g.higher_recent(Gradient));
        // With priority off, nothing is ever held for it.
        let off = two_classes("gate-recent-nic-off", 1.0);
        assert!(off.try_take(Gradient, 8, 1 << 16));
        assert!(!off.higher_recent(Bulk));
    }

    #[test]
    fn the_gate_gives_lower_classes_only_their_share_while_a_higher_one_is_busy() {
        use TrafficClass::*;
        const P: usize = 1 << 20;
        let g = two_classes("gate-test-nic", 0.25);
        // Alone: no limit.
        for _ in 0..10 {
            assert!(g.try_take(WeightRefit, 8, P));
        }
        for _ in 0..10 {
            g.done(WeightRefit);
        }
        g.set_busy(Gradient, true);
        // The busy class itself is not held back; what it sends earns refit a quarter.
        assert!(!g.try_take(WeightRefit, 8, P), "no credit yet");
        for _ in 0..8 {
            assert!(g.try_take(Gradient, 8, P));
        }
        // 8 MiB of gradient: 2 MiB of credit (after the 10 MiB it earned alone, capped at 4).
        assert!(g.try_take(WeightRefit, 8, P));
        assert!(g.try_take(WeightRefit, 8, P));
        assert!(!g.try_take(WeightRefit, 8, P), "slots: 2 of 8 at share 0.25");
        g.done(WeightRefit);
        g.done(WeightRefit);
        for _ in 0..8 {
            g.done(Gradient);
        }
        assert_eq!(g.in_flight(Gradient), 0);
        // Strict priority: nothing while gradient is busy, everything once it is not.
        let g2 = two_classes("gate-test-nic-2", 0.0);
        g2.set_busy(Gradient, true);
        assert!(g2.try_take(Gradient, 64, P));
        assert!(!g2.try_take(Bulk, 64, 1));
        g2.set_busy(Gradient, false);
        assert!(g2.try_take(Bulk, 64, P));
        // Share 1: no priority at all.
        let g3 = two_classes("gate-test-nic-3", 1.0);
        g3.set_busy(Gradient, true);
        for _ in 0..100 {
            assert!(g3.try_take(Bulk, 4, P));
        }
        // A piece larger than the credit cap goes once the credit is full.
        let g4 = two_classes("gate-test-nic-4", 0.5);
        g4.set_busy(Gradient, true);
        for _ in 0..4 {
            assert!(g4.try_take(Gradient, 64, 2 * P));
        }
        assert!(g4.try_take(Bulk, 64, 64 * P), "4 MiB of credit lets a 64 MiB piece through");
        assert!(!g4.try_take(Bulk, 64, P), "and then the class is in debt");
        // A piece taken but not posted gives its credit back.
        let g5 = two_classes("gate-test-nic-5", 0.5);
        g5.set_busy(Gradient, true);
        assert!(g5.try_take(Gradient, 64, 2 * P));
        assert!(g5.try_take(Bulk, 64, P));
        g5.undo(Bulk, P);
        assert!(g5.try_take(Bulk, 64, P));
        // A busy class that makes no progress (it waits on its peer) stops holding others back.
        let g6 = two_classes("gate-test-nic-6", 0.0);
        g6.set_busy(Gradient, true);
        assert!(!g6.try_take(Bulk, 64, P));
        std::thread::sleep(STALL + std::time::Duration::from_millis(20));
        assert!(g6.try_take(Bulk, 64, P), "a stalled higher class holds nobody back");
        // Whether the gate is needed at all: only with links of two classes.
        let g7 = gate("gate-test-nic-7", 0.1);
        assert!(!g7.contended());
        g7.join(Gradient);
        g7.join(Gradient);
        assert!(!g7.contended(), "one class alone");
        g7.join(Bulk);
        assert!(g7.contended());
        g7.leave(Bulk);
        assert!(!g7.contended());
        // One gate per NIC name in a process.
        assert!(Arc::ptr_eq(&g, &gate("gate-test-nic", 0.25)));
        assert_eq!(g.nic(), "gate-test-nic");
    }

    #[test]
    fn ranks_must_agree_on_the_class() {
        use TrafficClass::*;
        assert_eq!(check_same_class(&[Gradient, Gradient]).unwrap(), Gradient);
        let e = check_same_class(&[Gradient, Bulk]).unwrap_err().to_string();
        assert!(e.contains("rank 1 says bulk"), "{e}");
    }
}
