//! Configuration: every `OXCCL_*` knob declared once, with its default and what it does.
//!
//! The core's knobs are [`KNOBS`]; each transport declares its own beside its code
//! ([`crate::transport::Transport::settings`]) and the `oxccl` crate builds configurations
//! with all of them ([`Config::with_knobs`]). Values come from the defaults, then a TOML file
//! named by `OXCCL_CONFIG_FILE` (keys are the knob names without the prefix, lower case:
//! `timeout = "60s"`), then the environment; each later source wins. The core's values are
//! parsed into the fields below; a transport reads its own with [`Config::value`].
//! [`Config::describe`] lists every knob, its value and where it came from (that is what
//! `oxccl env` prints).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};

/// A declared knob.
#[derive(Debug, Clone, Copy)]
pub struct Knob {
    /// Environment variable name.
    pub name: &'static str,
    /// Default value, as text.
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
    /// Every rank of a communicator must use the same value (it chooses algorithms or a wire
    /// layout); compared when a communicator is created, a difference is an error naming it.
    pub agree: bool,
}

/// Every knob of the core. Launcher variables (OXCCL_RANK, ...) are listed for `oxccl env`
/// but read by the bootstrap code. Transports declare theirs beside their code.
pub const KNOBS: &[Knob] = &[
    Knob { name: "OXCCL_TIMEOUT", default: "300s", help: "deadline of every blocking call and of bootstrap (e.g. 60s, 500ms, 2m)", agree: false },
    Knob { name: "OXCCL_ALGO", default: "auto", help: "force algorithms: one name (ring, rd, chain, tree, hier, pairwise) or per collective, e.g. all_reduce=ring,broadcast=tree", agree: true },
    Knob { name: "OXCCL_RD_MAX_BYTES", default: "16K", help: "all_reduce messages up to this size use recursive doubling, larger ones the ring", agree: true },
    Knob { name: "OXCCL_TREE_MAX_BYTES", default: "32K", help: "broadcast messages up to this size use the binomial tree, larger ones the pipelined chain", agree: true },
    Knob { name: "OXCCL_SEGMENT_BYTES", default: "1M", help: "pipelining unit of ring and chain algorithms (per rank chunk)", agree: true },
    Knob { name: "OXCCL_GPU", default: "auto", help: "GPU buffers: auto (accepted when this build has the cuda feature and the driver shows a GPU) or off (host buffers only)", agree: false },
    Knob { name: "OXCCL_P2P", default: "auto", help: "GPU data between processes of one host: auto (GPU to GPU through CUDA IPC where both ranks have a GPU) or off (staged through host memory)", agree: false },
    Knob { name: "OXCCL_STAGING_PIECE", default: "1M", help: "GPU data staged through host memory moves in pieces of this size through pinned bounce buffers (4K to 64M, a multiple of 16)", agree: true },
    Knob { name: "OXCCL_STAGING_BUFFERS", default: "4", help: "pinned bounce buffers per direction of each link that stages GPU data through host memory (1 to 64; 2 or more overlap the GPU copies with the transfer)", agree: false },
    Knob { name: "OXCCL_SPIN_US", default: "30", help: "a waiting call spins this long before it starts yielding the core", agree: false },
    Knob { name: "OXCCL_YIELD_US", default: "2000", help: "then yields the core this long before it sleeps on a futex", agree: false },
    Knob { name: "OXCCL_TRACE_BUFFER", default: "1000", help: "flight recorder: operations each communicator keeps for a hang's diagnosis (0: off)", agree: false },
    Knob { name: "OXCCL_TRACE_SIGNAL", default: "off", help: "a signal (USR1, USR2) on which a process gathers every rank's flight record and prints it to stderr (off: none)", agree: false },
    Knob { name: "OXCCL_NET", default: "auto", help: "network transports to offer peers on other hosts, in order (libfabric, ibverbs, tcp); auto: every one built in, in priority order; none: refuse cross-host peers", agree: false },
    Knob { name: "OXCCL_CLASS", default: "bulk", help: "traffic class of communicators made without one: gradient, expert_all_to_all, pipeline_stage, weight_refit, bulk (highest priority first)", agree: false },
    Knob { name: "OXCCL_RESERVE", default: "gradient:2,expert_all_to_all:1,pipeline_stage:1", help: "NIC endpoints kept for each class (class:count,...); a class never takes what a higher class reserved", agree: false },
    Knob { name: "OXCCL_NIC_ENDPOINTS", default: "", help: "endpoint limit per NIC (nic:count,...; * for every NIC), instead of what the provider reports (ep_cnt)", agree: false },
    Knob { name: "OXCCL_TCP_FALLBACK", default: "expert_all_to_all,pipeline_stage,weight_refit,bulk", help: "classes that may fall back to net-tcp (with a warning) when their NIC has no endpoint for them; all, none or a list", agree: false },
    Knob { name: "OXCCL_CLASS_SHARE", default: "0.1", help: "share of the in-flight slots a class may hold on a NIC while a higher class is busy there (0 to 1; 1 turns priority off)", agree: false },
    Knob { name: "OXCCL_LEDGER_DIR", default: "/dev/shm", help: "directory of the host-wide endpoint ledger (one file per machine, shared by every process of it)", agree: false },
    Knob { name: "OXCCL_HOST_ID", default: "hostname+boot id", help: "host identity; ranks with equal ids are on one host (tests use it to make 'hosts')", agree: false },
    Knob { name: "OXCCL_JOB_SECRET", default: "", help: "the job's shared secret (16 bytes or more, the same on every rank): every TCP connection proves it (docs/security.md); oxccl launch sets it. Never shown", agree: false },
    Knob { name: "OXCCL_JOB_SECRET_FILE", default: "", help: "a file holding the job secret, readable by its owner only (instead of OXCCL_JOB_SECRET)", agree: false },
    Knob { name: "OXCCL_ALLOW_UNAUTHENTICATED", default: "0", help: "1: let the store and net-tcp listen beyond loopback without a job secret (anyone who reaches them can join the job)", agree: false },
    Knob { name: "OXCCL_TLS_CERT", default: "", help: "TLS for the store and net-tcp: this process's certificate chain (PEM); with OXCCL_TLS_KEY and OXCCL_TLS_CA, or none of them (off)", agree: false },
    Knob { name: "OXCCL_TLS_KEY", default: "", help: "TLS: this process's private key (PEM)", agree: false },
    Knob { name: "OXCCL_TLS_CA", default: "", help: "TLS: the certificate authority (PEM) every peer's certificate must chain to (both sides are verified)", agree: false },
    Knob { name: "OXCCL_CONFIG_FILE", default: "", help: "TOML file of knob values (keys without the OXCCL_ prefix, lower case)", agree: false },
    Knob { name: "OXCCL_LOG", default: "warn", help: "log filter (tracing env-filter syntax, e.g. info or oxccl=debug)", agree: false },
    Knob { name: "OXCCL_RANK", default: "", help: "bootstrap: this process's rank (set by oxccl launch; torchrun, Slurm and MPI variables are read too)", agree: false },
    Knob { name: "OXCCL_WORLD_SIZE", default: "", help: "bootstrap: number of ranks", agree: false },
    Knob { name: "OXCCL_LOCAL_RANK", default: "", help: "bootstrap: rank among the ranks of this host", agree: false },
    Knob { name: "OXCCL_LOCAL_WORLD_SIZE", default: "", help: "bootstrap: number of ranks on this host", agree: false },
    Knob { name: "OXCCL_STORE", default: "", help: "bootstrap: rendezvous store, tcp://host:port or file:///shared/dir (default: MASTER_ADDR:MASTER_PORT+1)", agree: false },
    Knob { name: "OXCCL_STORE_HOSTED", default: "0", help: "bootstrap: 1 when the launcher hosts the TCP store (rank 0 then does not)", agree: false },
    Knob { name: "OXCCL_LAUNCH_CPUS", default: "", help: "bootstrap: the CPUs oxccl launch bound this rank to (information only)", agree: false },
];

/// `OXCCL_GPU`: whether a communicator takes GPU buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuUse {
    /// When this build has the `cuda` feature and the driver shows a GPU.
    Auto,
    /// Host buffers only.
    Off,
    /// OxCCL's own tests: a simulated GPU whose "device memory" is host memory labelled so
    /// (builds with the `simulated-gpu` feature of `oxccl` only; others refuse it).
    Simulated,
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Built-in default.
    Default,
    /// The `OXCCL_CONFIG_FILE` file.
    File,
    /// The environment.
    Env,
    /// Set from code.
    Code,
}

impl Source {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Code => "code",
        }
    }
}

/// The effective configuration of a communicator.
#[derive(Clone)]
pub struct Config {
    /// Every knob this configuration knows: the core's, then those it was built with.
    knobs: Vec<&'static Knob>,
    values: BTreeMap<&'static str, (String, Source)>,
    /// Deadline of blocking calls.
    pub timeout: Duration,
    /// Forced algorithms, per collective name ("*" for all).
    pub algo: BTreeMap<String, String>,
    /// Recursive-doubling / ring crossover for all_reduce, bytes.
    pub rd_max_bytes: usize,
    /// Tree / chain crossover for broadcast, bytes.
    pub tree_max_bytes: usize,
    /// Algorithm pipelining segment, bytes.
    pub segment_bytes: usize,
    /// Whether GPU buffers may be used, and how (`OXCCL_GPU`).
    pub gpu: GpuUse,
    /// GPU data between processes of one host through CUDA IPC (`OXCCL_P2P`; false: `off`).
    pub p2p: bool,
    /// Pieces and bounce buffers of GPU data staged through host memory
    /// (`OXCCL_STAGING_PIECE`, `OXCCL_STAGING_BUFFERS`).
    pub staging: crate::staging::Staging,
    /// Spin phase of waits.
    pub spin: Duration,
    /// Yield phase of waits.
    pub yield_for: Duration,
    /// Operations the flight recorder keeps per communicator (0: off).
    pub trace_buffer: usize,
    /// The signal (`USR1` or `USR2`) on which a process prints every rank's flight record
    /// (`OXCCL_TRACE_SIGNAL`; `None`: off).
    pub trace_signal: Option<&'static str>,
    /// True when `OXCCL_SPIN_US` was set (otherwise a host with more ranks than cores does
    /// not spin at all, as Open MPI yields when oversubscribed).
    pub spin_explicit: bool,
    /// Host identity override.
    pub host_id: Option<String>,
    /// Network transports allowed for cross-host peers, in order of preference, by the names
    /// their transports give (`OXCCL_NET`; checked against what is built in by `oxccl`);
    /// `None` (`auto`): every one built in, in priority order.
    pub net: Option<Vec<String>>,
    /// Traffic class of communicators made without one (`OXCCL_CLASS`).
    pub class: crate::budget::TrafficClass,
    /// Endpoint budget settings.
    pub budget: crate::budget::Policy,
    /// Directory of the host-wide ledger (`OXCCL_LEDGER_DIR`).
    pub ledger_dir: String,
    /// The job secret and what may run without one (`OXCCL_JOB_SECRET`,
    /// `OXCCL_JOB_SECRET_FILE`, `OXCCL_ALLOW_UNAUTHENTICATED`).
    pub auth: crate::auth::Auth,
}

/// Parses `60s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mul_ms): (&str, f64) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else if let Some(v) = s.strip_suffix('h') {
        (v, 3_600_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    if !(v.is_finite() && v >= 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(v * mul_ms / 1000.0).ok()
}

/// A size in the form `parse_size` reads: `1M`, `256K`, `4097` (whole units only).
pub fn format_size(n: usize) -> String {
    for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses `4M`, `256K`, `1G`, `4MiB`, `123` (bytes).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let t = s.trim_end_matches("iB").trim_end_matches('B');
    let (num, mul) = match t.chars().last()? {
        'K' | 'k' => (&t[..t.len() - 1], 1usize << 10),
        'M' | 'm' => (&t[..t.len() - 1], 1 << 20),
        'G' | 'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mul)
}

/// The smallest pipelining segment: smaller ones cost a message per few elements.
pub const MIN_SEGMENT: usize = 1024;

fn bad(name: &str, v: &str, what: &str) -> Error {
    Error::invalid_arg(format!("{name}={v:?}: expected {what}"))
}

impl Config {
    /// The core's knobs only, at their defaults (what the core's own tests start from; the
    /// `oxccl` crate's `Config` knows every transport's knobs too).
    pub fn defaults() -> Config {
        Config::from_sources(|_| None).expect("defaults parse")
    }

    /// The core's knobs only, reading variables through `env`.
    pub fn from_sources(env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        Config::with_knobs(&[], env)
    }

    /// The core's knobs and `extra` ones (each transport's), reading variables through `env`:
    /// defaults < `OXCCL_CONFIG_FILE` < `env`.
    pub fn with_knobs(extra: &[&'static [Knob]], env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut knobs: Vec<&'static Knob> = KNOBS.iter().collect();
        for k in extra.iter().flat_map(|t| t.iter()) {
            if knobs.iter().any(|x| x.name == k.name) {
                return Err(Error::Internal(format!("setting {} is declared twice", k.name)));
            }
            knobs.push(k);
        }
        let mut values: BTreeMap<&'static str, (String, Source)> =
            knobs.iter().map(|k| (k.name, (k.default.to_string(), Source::Default))).collect();
        if let Some(path) = env("OXCCL_CONFIG_FILE").filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::invalid_arg(format!("OXCCL_CONFIG_FILE={path}: cannot read: {e}")))?;
            let table: toml::Table =
                text.parse().map_err(|e| Error::invalid_arg(format!("OXCCL_CONFIG_FILE={path}: not TOML: {e}")))?;
            for (k, v) in table {
                let name = format!("OXCCL_{}", k.to_ascii_uppercase());
                let knob = knobs
                    .iter()
                    .find(|kn| kn.name == name)
                    .ok_or_else(|| Error::invalid_arg(format!("OXCCL_CONFIG_FILE={path}: unknown key '{k}'")))?;
                if knob.name == "OXCCL_JOB_SECRET" {
                    return Err(Error::invalid_arg(format!(
                        "OXCCL_CONFIG_FILE={path}: a job secret does not belong in a settings file (often readable \
                         by others); name a private file with job_secret_file instead"
                    )));
                }
                let text = match v {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                values.insert(knob.name, (text, Source::File));
            }
        }
        for k in &knobs {
            if let Some(v) = env(k.name) {
                values.insert(k.name, (v, Source::Env));
            }
        }
        Config::from_values(knobs, values, None)
    }

    /// `keep_auth`: the authentication to keep (a setting other than the job secret's and
    /// TLS's changed: the secret file is not read again); `None`: from the values.
    fn from_values(
        knobs: Vec<&'static Knob>,
        values: BTreeMap<&'static str, (String, Source)>,
        keep_auth: Option<crate::auth::Auth>,
    ) -> Result<Config> {
        let get = |k: &str| values.get(k).map(|(v, _)| v.as_str()).unwrap_or("");
        let dur = |k: &str| parse_duration(get(k)).ok_or_else(|| bad(k, get(k), "a duration such as 60s or 500ms"));
        // A bare number is microseconds here (the knob's name says so); units are accepted too.
        let micros = |k: &str| {
            let v = get(k).trim();
            v.parse::<u64>()
                .ok()
                .map(Duration::from_micros)
                .or_else(|| parse_duration(v).filter(|_| v.ends_with(|c: char| c.is_ascii_alphabetic())))
                .ok_or_else(|| bad(k, v, "microseconds (e.g. 30) or a duration (e.g. 2ms)"))
        };
        let size = |k: &str| parse_size(get(k)).ok_or_else(|| bad(k, get(k), "a size such as 4M, 256K or 1048576"));
        let mut algo = BTreeMap::new();
        let a = get("OXCCL_ALGO").trim();
        if !a.is_empty() && a != "auto" {
            for part in a.split(',') {
                match part.split_once('=') {
                    Some((coll, name)) => algo.insert(coll.trim().to_string(), name.trim().to_string()),
                    None => algo.insert("*".to_string(), part.trim().to_string()),
                };
            }
            for (coll, name) in &algo {
                let Some(alg) = crate::algo::Algo::parse(name) else {
                    return Err(bad(
                        "OXCCL_ALGO",
                        a,
                        "ring, rd, chain, tree, hier or pairwise (optionally collective=name,...)",
                    ));
                };
                if coll != "*" {
                    let allowed = crate::algo::allowed(coll).ok_or_else(|| {
                        bad(
                            "OXCCL_ALGO",
                            a,
                            "collective names all_reduce, broadcast, reduce, all_gather, reduce_scatter, all_to_all, all_to_all_v, barrier",
                        )
                    })?;
                    if !allowed.contains(&alg) {
                        return Err(Error::invalid_arg(format!(
                            "OXCCL_ALGO={a}: {coll} has no algorithm '{name}' (it has: {})",
                            allowed.iter().map(|x| x.name()).collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
        }
        let net = match get("OXCCL_NET").trim().to_ascii_lowercase().as_str() {
            "auto" | "" => None,
            v => Some(v.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty() && x != "none").collect()),
        };
        let class = crate::budget::TrafficClass::parse(get("OXCCL_CLASS")).ok_or_else(|| {
            bad("OXCCL_CLASS", get("OXCCL_CLASS"), "gradient, expert_all_to_all, pipeline_stage, weight_refit or bulk")
        })?;
        let reserve = crate::budget::parse_reserve(get("OXCCL_RESERVE"))
            .map_err(|e| Error::invalid_arg(format!("OXCCL_RESERVE={:?}: {e}", get("OXCCL_RESERVE"))))?;
        let nic_endpoints = crate::budget::parse_nic_limits(get("OXCCL_NIC_ENDPOINTS"))
            .map_err(|e| Error::invalid_arg(format!("OXCCL_NIC_ENDPOINTS={:?}: {e}", get("OXCCL_NIC_ENDPOINTS"))))?;
        let tcp_fallback = crate::budget::parse_classes(get("OXCCL_TCP_FALLBACK"))
            .map_err(|e| Error::invalid_arg(format!("OXCCL_TCP_FALLBACK={:?}: {e}", get("OXCCL_TCP_FALLBACK"))))?;
        let share = get("OXCCL_CLASS_SHARE")
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|x| (0.0..=1.0).contains(x))
            .ok_or_else(|| bad("OXCCL_CLASS_SHARE", get("OXCCL_CLASS_SHARE"), "a fraction from 0 to 1"))?;
        let budget = crate::budget::Policy { reserve, nic_endpoints, tcp_fallback, share };
        let ledger_dir = get("OXCCL_LEDGER_DIR").trim().to_string();
        let auth = match keep_auth {
            Some(a) => a,
            None => crate::auth::Auth::from_vars(|k| Some(get(k).to_string()))?,
        };
        let host_id = values.get("OXCCL_HOST_ID").filter(|(_, s)| *s != Source::Default).map(|(v, _)| v.clone());
        let cfg = Config {
            timeout: dur("OXCCL_TIMEOUT").ok().filter(|t| !t.is_zero()).ok_or_else(|| {
                bad("OXCCL_TIMEOUT", get("OXCCL_TIMEOUT"), "a duration above zero such as 60s or 500ms")
            })?,
            algo,
            rd_max_bytes: size("OXCCL_RD_MAX_BYTES")?,
            tree_max_bytes: size("OXCCL_TREE_MAX_BYTES")?,
            segment_bytes: size("OXCCL_SEGMENT_BYTES")
                .ok()
                .filter(|b| (MIN_SEGMENT..=1 << 30).contains(b))
                .ok_or_else(|| bad("OXCCL_SEGMENT_BYTES", get("OXCCL_SEGMENT_BYTES"), "a size from 1K to 1G"))?,
            gpu: match get("OXCCL_GPU").trim().to_ascii_lowercase().as_str() {
                "auto" | "on" | "1" => GpuUse::Auto,
                "off" | "0" | "none" => GpuUse::Off,
                "simulated" => GpuUse::Simulated,
                _ => return Err(bad("OXCCL_GPU", get("OXCCL_GPU"), "auto or off")),
            },
            p2p: match get("OXCCL_P2P").trim().to_ascii_lowercase().as_str() {
                "auto" | "on" | "1" => true,
                "off" | "0" | "none" => false,
                _ => return Err(bad("OXCCL_P2P", get("OXCCL_P2P"), "auto or off")),
            },
            staging: {
                let st = crate::staging::Staging {
                    piece: size("OXCCL_STAGING_PIECE")
                        .ok()
                        .filter(|b| (4096..=64 << 20).contains(b) && b % 16 == 0)
                        .ok_or_else(|| {
                            bad(
                                "OXCCL_STAGING_PIECE",
                                get("OXCCL_STAGING_PIECE"),
                                "a size from 4K to 64M, a multiple of 16 bytes",
                            )
                        })?,
                    slots: get("OXCCL_STAGING_BUFFERS")
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| {
                        bad("OXCCL_STAGING_BUFFERS", get("OXCCL_STAGING_BUFFERS"), "a count from 1 to 64")
                    })?,
                };
                st
            },
            spin: micros("OXCCL_SPIN_US")?,
            yield_for: micros("OXCCL_YIELD_US")?,
            trace_buffer: get("OXCCL_TRACE_BUFFER").trim().parse::<usize>().ok().filter(|n| *n <= 1 << 20).ok_or_else(
                || {
                    bad(
                        "OXCCL_TRACE_BUFFER",
                        get("OXCCL_TRACE_BUFFER"),
                        "a count of operations from 0 (off) to 1048576",
                    )
                },
            )?,
            trace_signal: match get("OXCCL_TRACE_SIGNAL").trim().to_ascii_uppercase().trim_start_matches("SIG") {
                "" | "OFF" | "0" => None,
                "USR1" => Some("USR1"),
                "USR2" => Some("USR2"),
                _ => return Err(bad("OXCCL_TRACE_SIGNAL", get("OXCCL_TRACE_SIGNAL"), "USR1, USR2 or off")),
            },
            spin_explicit: values.get("OXCCL_SPIN_US").is_some_and(|(_, s)| *s != Source::Default),
            host_id,
            net,
            class,
            budget,
            ledger_dir,
            auth,
            knobs,
            values,
        };
        Ok(cfg)
    }

    /// The value of `knob` (declared by a transport): as set, or its default. A configuration
    /// built without that knob gives the default.
    pub fn value(&self, knob: &Knob) -> &str {
        self.values.get(knob.name).map(|(v, _)| v.as_str()).unwrap_or(knob.default)
    }

    /// Sets a knob from code (highest precedence), re-validating everything.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let knob = self
            .knobs
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| Error::invalid_arg(format!("unknown setting {name}")))?;
        let mut values = self.values.clone();
        values.insert(knob.name, (value.to_string(), Source::Code));
        // The authentication (perhaps a secret given in code, an NCCL unique id's) stays as it
        // is unless one of its settings changed; a TLS setting changes only TLS.
        let old = self.auth.clone();
        let keep = match knob.name {
            "OXCCL_JOB_SECRET" | "OXCCL_JOB_SECRET_FILE" | "OXCCL_ALLOW_UNAUTHENTICATED" => None,
            "OXCCL_TLS_CERT" | "OXCCL_TLS_KEY" | "OXCCL_TLS_CA" => {
                let v = |k: &str| values.get(k).map(|(v, _)| v.clone()).unwrap_or_default();
                Some(old.and_tls(crate::auth::Auth::tls_from_values(
                    &v("OXCCL_TLS_CERT"),
                    &v("OXCCL_TLS_KEY"),
                    &v("OXCCL_TLS_CA"),
                )?))
            }
            _ => Some(old),
        };
        *self = Config::from_values(self.knobs.clone(), values, keep)?;
        Ok(())
    }

    /// True when `name` was set (file, environment or code) rather than left at its default.
    pub fn is_set(&self, name: &str) -> bool {
        self.values.get(name).is_some_and(|(_, s)| *s != Source::Default)
    }

    /// The forced algorithm for collective `coll`, if any.
    pub fn forced_algo(&self, coll: &str) -> Option<crate::algo::Algo> {
        self.algo.get(coll).or_else(|| self.algo.get("*")).and_then(|n| crate::algo::Algo::parse(n))
    }

    /// The settings every rank must share ([`Knob::agree`]), each with its value in a form
    /// where equal meanings compare equal (sizes as bytes: `1M` and `1048576` agree).
    pub fn agreed(&self) -> Vec<(String, String)> {
        self.knobs
            .iter()
            .filter(|k| k.agree)
            .map(|k| {
                let v = self.value(k).trim();
                let v = match parse_size(v) {
                    // Per-collective choices in name order: the same choices written in
                    // another order agree.
                    _ if k.name == "OXCCL_ALGO" && v.contains('=') => {
                        let mut parts: Vec<String> =
                            v.split(',').map(|p| p.trim().replace(' ', "").to_ascii_lowercase()).collect();
                        parts.sort();
                        parts.join(",")
                    }
                    Some(n) => n.to_string(),
                    None => v.to_ascii_lowercase(),
                };
                (k.name.to_string(), v)
            })
            .collect()
    }

    /// Every knob with its effective value and its source, in declaration order.
    pub fn describe(&self) -> Vec<(Knob, String, Source)> {
        self.knobs
            .iter()
            .map(|k| {
                let (v, s) = self.values.get(k.name).cloned().unwrap_or_default_pair();
                // The secret is never shown: only that it is set, and its length.
                let v = if k.name == "OXCCL_JOB_SECRET" && !v.trim().is_empty() {
                    format!("(set, {} bytes)", v.trim().len())
                } else {
                    v
                };
                (**k, v, s)
            })
            .collect()
    }
}

impl std::fmt::Debug for Config {
    /// Every setting as `oxccl env` shows it (the job secret hidden).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (k, v, s) in self.describe() {
            if s != Source::Default {
                m.entry(&k.name, &format_args!("{v} ({})", s.name()));
            }
        }
        m.finish()
    }
}

trait PairDefault {
    fn unwrap_or_default_pair(self) -> (String, Source);
}
impl PairDefault for Option<(String, Source)> {
    fn unwrap_or_default_pair(self) -> (String, Source) {
        self.unwrap_or((String::new(), Source::Default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_units() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("256KiB"), Some(256 << 10));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("x"), None);
        let c = Config::from_sources(|k| match k {
            "OXCCL_SPIN_US" => Some("30".into()),
            "OXCCL_YIELD_US" => Some("2ms".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((c.spin, c.yield_for, c.spin_explicit), (Duration::from_micros(30), Duration::from_millis(2), true));
        assert!(!Config::defaults().spin_explicit);
        assert!(Config::from_sources(|k| (k == "OXCCL_SPIN_US").then(|| "fast".into())).is_err());
    }

    #[test]
    fn env_wins_and_is_reported() {
        let c = Config::from_sources(|k| match k {
            "OXCCL_TIMEOUT" => Some("5s".into()),
            "OXCCL_ALGO" => Some("all_reduce=ring,broadcast=tree".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.forced_algo("all_reduce"), Some(crate::algo::Algo::Ring));
        assert_eq!(c.forced_algo("broadcast"), Some(crate::algo::Algo::Tree));
        assert_eq!(c.forced_algo("reduce"), None);
        let d = c.describe();
        let t = d.iter().find(|(k, _, _)| k.name == "OXCCL_TIMEOUT").unwrap();
        assert_eq!((t.1.as_str(), t.2), ("5s", Source::Env));
        let s = d.iter().find(|(k, _, _)| k.name == "OXCCL_SEGMENT_BYTES").unwrap();
        assert_eq!(s.2, Source::Default);
    }

    #[test]
    fn knobs_declared_elsewhere_are_read_set_and_listed() {
        static MINE: [Knob; 1] =
            [Knob { name: "OXCCL_TEST_PIECES", default: "7", help: "a test's knob", agree: false }];
        let c = Config::with_knobs(&[&MINE], |k| (k == "OXCCL_TEST_PIECES").then(|| "9".into())).unwrap();
        assert_eq!(c.value(&MINE[0]), "9");
        assert!(c.is_set("OXCCL_TEST_PIECES"));
        let mut d = c.clone();
        d.set("OXCCL_TEST_PIECES", "11").unwrap();
        assert_eq!(d.value(&MINE[0]), "11");
        let listed = d.describe().into_iter().find(|(k, _, _)| k.name == "OXCCL_TEST_PIECES").unwrap();
        assert_eq!((listed.1.as_str(), listed.2), ("11", Source::Code));
        // Without the knob: its default, and setting it is an error.
        let mut core = Config::defaults();
        assert_eq!(core.value(&MINE[0]), "7");
        assert!(core.set("OXCCL_TEST_PIECES", "1").is_err());
        // A knob declared twice is a bug, said so.
        static TWICE: [Knob; 1] = [Knob { name: "OXCCL_TIMEOUT", default: "1s", help: "again", agree: false }];
        assert!(matches!(Config::with_knobs(&[&TWICE], |_| None), Err(Error::Internal(_))));
    }

    /// What ranks compare at creation: sizes by value, per-collective choices in any order.
    #[test]
    fn agreed_values_compare_meanings_not_spellings() {
        let of = |k: &'static str, v: &'static str| {
            let c = Config::from_sources(|x| (x == k).then(|| v.into())).unwrap();
            c.agreed().into_iter().find(|(n, _)| n == k).map(|(_, v)| v).unwrap()
        };
        assert_eq!(of("OXCCL_SEGMENT_BYTES", "1M"), of("OXCCL_SEGMENT_BYTES", "1048576"));
        assert_eq!(
            of("OXCCL_ALGO", "all_reduce=ring, broadcast=tree"),
            of("OXCCL_ALGO", "broadcast=tree,all_reduce=ring")
        );
        assert_ne!(of("OXCCL_ALGO", "all_reduce=ring"), of("OXCCL_ALGO", "all_reduce=rd"));
    }

    /// Changing another setting keeps the authentication as it was (the secret file is not
    /// read again; a secret given in code stays); a TLS setting changes TLS only.
    #[test]
    fn other_settings_keep_the_authentication() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("oxccl-config-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "0123456789abcdef-config").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = path.to_str().unwrap().to_string();
        let mut c = Config::from_sources(|k| (k == "OXCCL_JOB_SECRET_FILE").then(|| p.clone())).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        c.set("OXCCL_CLASS", "gradient").unwrap();
        assert_eq!(c.auth.secret().unwrap().expose(), b"0123456789abcdef-config");
        c.auth = crate::auth::Auth::with_secret(crate::auth::JobSecret::new(b"given-in-code-0123", "code").unwrap());
        c.set("OXCCL_TLS_CERT", "c.pem").unwrap_err();
        c.set("OXCCL_TIMEOUT", "5s").unwrap();
        assert_eq!(c.auth.secret().unwrap().expose(), b"given-in-code-0123");
        let e = c.set("OXCCL_JOB_SECRET_FILE", "/nonexistent/secret").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/secret"), "{e}");
    }

    #[test]
    fn every_knob_is_documented() {
        let doc = include_str!("../../docs/settings.md");
        for k in KNOBS {
            assert!(doc.contains(&format!("`{}`", k.name)), "{} is missing from docs/settings.md", k.name);
        }
    }

    #[test]
    fn the_trace_signal_is_usr1_usr2_or_off() {
        let sig = |v: &'static str| Config::from_sources(|k| (k == "OXCCL_TRACE_SIGNAL").then(|| v.into()));
        assert_eq!(sig("off").unwrap().trace_signal, None);
        assert_eq!(Config::defaults().trace_signal, None, "off unless asked");
        assert_eq!(sig("usr1").unwrap().trace_signal, Some("USR1"));
        assert_eq!(sig("SIGUSR2").unwrap().trace_signal, Some("USR2"));
        for bad in ["TERM", "SIGKILL", "1"] {
            let e = sig(bad).unwrap_err().to_string();
            assert!(e.contains("OXCCL_TRACE_SIGNAL") && e.contains("USR1, USR2 or off"), "{bad}: {e}");
        }
        let e = Config::from_sources(|k| (k == "OXCCL_TRACE_BUFFER").then(|| "2000000".into())).unwrap_err();
        assert!(e.to_string().contains("from 0 (off) to 1048576"), "{e}");
    }

    #[test]
    fn sizes_print_as_they_parse() {
        for n in [0, 1, 4097, 4096, 1 << 20, 3 << 30, (1 << 20) + 1024] {
            assert_eq!(parse_size(&format_size(n)), Some(n), "{n}");
        }
        assert_eq!(format_size(1 << 20), "1M");
        assert_eq!(format_size(1536 << 10), "1536K");
    }

    #[test]
    fn gpu_and_staging_settings() {
        let one = |k0: &'static str, v: &'static str| Config::from_sources(move |k| (k == k0).then(|| v.into()));
        let d = Config::defaults();
        assert_eq!(d.gpu, GpuUse::Auto);
        assert_eq!(d.staging, crate::staging::Staging { piece: 1 << 20, slots: 4 });
        assert_eq!(one("OXCCL_GPU", "off").unwrap().gpu, GpuUse::Off);
        assert_eq!(one("OXCCL_GPU", "simulated").unwrap().gpu, GpuUse::Simulated);
        assert!(d.p2p && !one("OXCCL_P2P", "off").unwrap().p2p);
        assert_eq!(one("OXCCL_STAGING_PIECE", "256K").unwrap().staging.piece, 256 << 10);
        assert_eq!(one("OXCCL_STAGING_BUFFERS", "2").unwrap().staging.slots, 2);
        for (k, v, says) in [
            ("OXCCL_GPU", "maybe", "auto or off"),
            ("OXCCL_P2P", "sometimes", "auto or off"),
            ("OXCCL_STAGING_PIECE", "1K", "from 4K to 64M"),
            ("OXCCL_STAGING_PIECE", "4097", "multiple of 16"),
            ("OXCCL_STAGING_PIECE", "1G", "from 4K to 64M"),
            ("OXCCL_STAGING_BUFFERS", "0", "from 1 to 64"),
            ("OXCCL_STAGING_BUFFERS", "many", "from 1 to 64"),
        ] {
            let e = one(k, v).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(says), "{k}={v}: {e}");
        }
        // The piece decides how messages are cut: every rank must use the same one.
        assert!(KNOBS.iter().any(|k| k.name == "OXCCL_STAGING_PIECE" && k.agree));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = Config::from_sources(|k| (k == "OXCCL_TIMEOUT").then(|| "soon".into())).unwrap_err().to_string();
        assert!(e.contains("OXCCL_TIMEOUT") && e.contains("soon"), "{e}");
        let e = Config::from_sources(|k| (k == "OXCCL_ALGO").then(|| "magic".into())).unwrap_err().to_string();
        assert!(e.contains("OXCCL_ALGO"), "{e}");
        let e = Config::from_sources(|k| (k == "OXCCL_ALGO").then(|| "allreduce=ring".into())).unwrap_err().to_string();
        assert!(e.contains("collective names"), "{e}");
        let e = Config::from_sources(|k| (k == "OXCCL_ALGO").then(|| "broadcast=ring".into())).unwrap_err().to_string();
        assert!(e.contains("chain, tree"), "{e}");
        assert!(Config::from_sources(|k| (k == "OXCCL_TIMEOUT").then(|| "1e30".into())).is_err());
        assert!(Config::from_sources(|k| (k == "OXCCL_SEGMENT_BYTES").then(|| "lots".into())).is_err());
        // Out of range is an error, never quietly changed.
        for (k, v) in [
            ("OXCCL_TIMEOUT", "0"),
            ("OXCCL_TIMEOUT", "0s"),
            ("OXCCL_SEGMENT_BYTES", "0"),
            ("OXCCL_SEGMENT_BYTES", "1"),
            ("OXCCL_SEGMENT_BYTES", "1023"),
            ("OXCCL_SEGMENT_BYTES", "2G"),
        ] {
            let e = Config::from_sources(|x| (x == k).then(|| v.into())).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(&format!("{v:?}")), "{k}={v}: {e}");
        }
        let c = Config::from_sources(|k| (k == "OXCCL_SEGMENT_BYTES").then(|| "1K".into())).unwrap();
        assert_eq!(c.segment_bytes, 1024);
        for (k, v) in [
            ("OXCCL_CLASS", "urgent"),
            ("OXCCL_RESERVE", "gradient=2"),
            ("OXCCL_NIC_ENDPOINTS", "eth0:many"),
            ("OXCCL_TCP_FALLBACK", "gradients"),
            ("OXCCL_CLASS_SHARE", "2"),
        ] {
            let e = Config::from_sources(|x| (x == k).then(|| v.into())).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(v), "{e}");
        }
        let c = Config::from_sources(|k| match k {
            "OXCCL_CLASS" => Some("refit".into()),
            "OXCCL_RESERVE" => Some("gradient:3".into()),
            "OXCCL_NIC_ENDPOINTS" => Some("eth0:2".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.class, crate::budget::TrafficClass::WeightRefit);
        assert_eq!(c.budget.reserve, [3, 0, 0, 0, 0]);
        assert_eq!(c.budget.limit("eth0", 100).0, 2);
        let d = Config::defaults();
        assert_eq!(d.class, crate::budget::TrafficClass::Bulk);
        assert!(!d.budget.tcp_fallback[0] && d.budget.tcp_fallback[4], "gradient never falls back by default");
        let mut c = Config::defaults();
        assert!(c.set("OXCCL_NOPE", "1").is_err());
        c.set("OXCCL_SEGMENT_BYTES", "64K").unwrap();
        assert_eq!(c.segment_bytes, 64 << 10);
    }
}
