//! Launcher detection: which rank this process is, how many there are, and where the
//! rendezvous store is, from the variables `oxccl launch`, torchrun, Open MPI, MPICH (PMI) or
//! Slurm set.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use oxccl_core::{Error, Result};

/// Where the rendezvous store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddr {
    /// A TCP store: host name or IP address (IPv6 without brackets), and port.
    Tcp(String, u16),
    /// A file store: a directory on a file system every rank sees.
    File(PathBuf),
}

impl StoreAddr {
    /// Parses `tcp://host:port`, `host:port` (IPv6 as `[addr]:port`) or `file:///abs/path`.
    pub fn parse(s: &str) -> Result<StoreAddr> {
        parse_addr(s).map_err(|why| Error::invalid_arg(format!("store address {s:?}: {why}")))
    }

    /// The store named by environment `env` (`OXCCL_STORE`, else `MASTER_ADDR` with
    /// `MASTER_PORT + 1`, as [`LaunchEnv::detect`] reads them); `Ok(None)` when neither is set.
    pub fn from_vars(env: impl Fn(&str) -> Option<String>) -> Result<Option<StoreAddr>> {
        store_addr(&|k: &str| env(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
    }

    /// `host:port` to connect to (IPv6 addresses in brackets); `None` for a file store.
    pub fn connect_target(&self) -> Option<String> {
        match self {
            StoreAddr::Tcp(host, port) if host.contains(':') => Some(format!("[{host}]:{port}")),
            StoreAddr::Tcp(host, port) => Some(format!("{host}:{port}")),
            StoreAddr::File(_) => None,
        }
    }
}

fn parse_addr(s: &str) -> std::result::Result<StoreAddr, String> {
    let s = s.trim();
    if let Some(path) = s.strip_prefix("file://") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err("a file store needs an absolute path, as in file:///shared/dir".into());
        }
        return Ok(StoreAddr::File(path));
    }
    let rest = match s.split_once("://") {
        Some(("tcp", rest)) => rest,
        Some((scheme, _)) => return Err(format!("unknown scheme '{scheme}' (expected tcp:// or file://)")),
        None => s,
    };
    let (host, port) = rest.rsplit_once(':').ok_or("expected host:port, tcp://host:port or file:///path")?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or("unbalanced '[' around an IPv6 address")?,
        None if host.contains(':') => return Err("put an IPv6 address in brackets, as in [::1]:29500".into()),
        None => host,
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = port.parse::<u16>().map_err(|_| format!("port '{port}' is not a number from 0 to 65535"))?;
    Ok(StoreAddr::Tcp(host.to_string(), port))
}

impl FromStr for StoreAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<StoreAddr> {
        StoreAddr::parse(s)
    }
}

impl fmt::Display for StoreAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreAddr::Tcp(..) => write!(f, "tcp://{}", self.connect_target().unwrap_or_default()),
            StoreAddr::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// What the launcher told this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, below `world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// Rank among the ranks on this host, where the launcher says.
    pub local_rank: Option<usize>,
    /// Number of ranks on this host, where the launcher says.
    pub local_world_size: Option<usize>,
    /// The rendezvous store, if one is named.
    pub store: Option<StoreAddr>,
    /// True when the launcher hosts the TCP store, so rank 0 must not start one.
    pub store_hosted: bool,
    /// Which launcher: `oxccl`, `torchrun`, `openmpi`, `pmi` or `slurm`.
    pub launcher: &'static str,
}

/// The variables one launcher sets.
struct Launcher {
    name: &'static str,
    rank: &'static str,
    size: &'static str,
    local_rank: &'static str,
    local_size: &'static str,
}

/// In order of precedence. MPI comes before Slurm: under `mpirun` inside a Slurm allocation
/// the Slurm variables describe the job step of the MPI daemons, not the ranks.
const LAUNCHERS: &[Launcher] = &[
    Launcher {
        name: "oxccl",
        rank: "OXCCL_RANK",
        size: "OXCCL_WORLD_SIZE",
        local_rank: "OXCCL_LOCAL_RANK",
        local_size: "OXCCL_LOCAL_WORLD_SIZE",
    },
    Launcher {
        name: "torchrun",
        rank: "RANK",
        size: "WORLD_SIZE",
        local_rank: "LOCAL_RANK",
        local_size: "LOCAL_WORLD_SIZE",
    },
    Launcher {
        name: "openmpi",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
    },
    Launcher {
        name: "pmi",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local_rank: "MPI_LOCALRANKID",
        local_size: "MPI_LOCALNRANKS",
    },
    Launcher {
        name: "slurm",
        rank: "SLURM_PROCID",
        size: "SLURM_NTASKS",
        local_rank: "SLURM_LOCALID",
        local_size: "SLURM_NTASKS_PER_NODE",
    },
];

impl LaunchEnv {
    /// Reads the launcher variables through `env` (a variable that is empty counts as unset).
    ///
    /// The first launcher whose rank variable is set wins, in this order:
    /// - `oxccl launch`: `OXCCL_RANK`, `OXCCL_WORLD_SIZE`, `OXCCL_LOCAL_RANK`,
    ///   `OXCCL_LOCAL_WORLD_SIZE`;
    /// - torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`;
    /// - Open MPI: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK`,
    ///   `OMPI_COMM_WORLD_LOCAL_SIZE`;
    /// - MPICH and other PMI launchers: `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`,
    ///   `MPI_LOCALNRANKS`;
    /// - Slurm: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` (often
    ///   absent; the local world size is then unknown).
    ///
    /// MPI is checked before Slurm because under `mpirun` inside a Slurm allocation the Slurm
    /// variables describe the MPI daemons, not the ranks. A size variable without its rank
    /// variable is ignored (Slurm sets `SLURM_NTASKS` in batch scripts, for instance).
    ///
    /// The store is `OXCCL_STORE` when set; otherwise `MASTER_ADDR` with port
    /// `MASTER_PORT + 1`, because torchrun's own agent store already listens on `MASTER_PORT`.
    /// `OXCCL_STORE_HOSTED=1` says the launcher hosts the TCP store.
    ///
    /// `Ok(None)` when no launcher variables are set. [`Error::InvalidArgument`], naming the
    /// variable, for a value that is not a number, a world size of 0, a rank not below the
    /// world size, or a rank variable without its size variable.
    pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let get = |k: &str| env(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let Some(l) = LAUNCHERS.iter().find(|l| get(l.rank).is_some()) else {
            return Ok(None);
        };
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => v
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| Error::invalid_arg(format!("{var}={v:?} is not a non-negative integer"))),
            }
        };
        let rank = num(l.rank)?.unwrap_or_default();
        let Some(world_size) = num(l.size)? else {
            return Err(Error::invalid_arg(format!(
                "{}={rank} is set but {} is not; the {} launcher sets both",
                l.rank, l.size, l.name
            )));
        };
        if world_size == 0 {
            return Err(Error::invalid_arg(format!("{}=0: the world size must be at least 1", l.size)));
        }
        if rank >= world_size {
            return Err(Error::invalid_arg(format!("{}={rank} is not below {}={world_size}", l.rank, l.size)));
        }
        let local_rank = num(l.local_rank)?;
        let local_world_size = num(l.local_size)?;
        if let Some(n) = local_world_size {
            if n == 0 || n > world_size {
                return Err(Error::invalid_arg(format!(
                    "{}={n} must be from 1 to {}={world_size}",
                    l.local_size, l.size
                )));
            }
            if let Some(r) = local_rank.filter(|&r| r >= n) {
                return Err(Error::invalid_arg(format!("{}={r} is not below {}={n}", l.local_rank, l.local_size)));
            }
        }
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            store: store_addr(&get)?,
            store_hosted: hosted(&get)?,
            launcher: l.name,
        }))
    }

    /// [`LaunchEnv::detect`] over the process environment.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        LaunchEnv::detect(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }
}

fn store_addr(get: &impl Fn(&str) -> Option<String>) -> Result<Option<StoreAddr>> {
    if let Some(v) = get("OXCCL_STORE") {
        return parse_addr(&v).map(Some).map_err(|why| Error::invalid_arg(format!("OXCCL_STORE={v:?}: {why}")));
    }
    match (get("MASTER_ADDR"), get("MASTER_PORT")) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::invalid_arg("MASTER_ADDR is set but MASTER_PORT is not")),
        (None, Some(_)) => Err(Error::invalid_arg("MASTER_PORT is set but MASTER_ADDR is not")),
        (Some(addr), Some(port)) => {
            let p = port.parse::<u16>().ok().and_then(|p| p.checked_add(1)).ok_or_else(|| {
                Error::invalid_arg(format!(
                    "MASTER_PORT={port:?}: expected a port below 65535 (the store uses MASTER_PORT+1)"
                ))
            })?;
            let host = addr.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&addr);
            Ok(Some(StoreAddr::Tcp(host.to_string(), p)))
        }
    }
}

fn hosted(get: &impl Fn(&str) -> Option<String>) -> Result<bool> {
    match get("OXCCL_STORE_HOSTED").as_deref() {
        None | Some("0") | Some("false") | Some("no") => Ok(false),
        Some("1") | Some("true") | Some("yes") => Ok(true),
        Some(v) => Err(Error::invalid_arg(format!("OXCCL_STORE_HOSTED={v:?}: expected 1 or 0"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn detect(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::detect(|k| m.get(k).cloned())
    }

    fn ok(vars: &[(&str, &str)]) -> LaunchEnv {
        detect(vars).unwrap().unwrap()
    }

    /// The error text, which must name `var`.
    fn err(vars: &[(&str, &str)], var: &str) -> String {
        let e = detect(vars).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let s = e.to_string();
        assert!(s.contains(var), "error does not name {var}: {s}");
        s
    }

    fn tcp(host: &str, port: u16) -> Option<StoreAddr> {
        Some(StoreAddr::Tcp(host.into(), port))
    }

    #[test]
    fn nothing_set() {
        assert_eq!(detect(&[]).unwrap(), None);
        assert_eq!(detect(&[("HOME", "/root"), ("MASTER_ADDR", "x")]).unwrap(), None);
        // A size without a rank is not a launch.
        assert_eq!(detect(&[("SLURM_NTASKS", "4"), ("WORLD_SIZE", "2")]).unwrap(), None);
        assert_eq!(detect(&[("OXCCL_RANK", " ")]).unwrap(), None, "empty counts as unset");
    }

    #[test]
    fn oxccl_launch() {
        let e = ok(&[
            ("OXCCL_RANK", "2"),
            ("OXCCL_WORLD_SIZE", "4"),
            ("OXCCL_LOCAL_RANK", "2"),
            ("OXCCL_LOCAL_WORLD_SIZE", "4"),
            ("OXCCL_STORE", "tcp://127.0.0.1:41000"),
            ("OXCCL_STORE_HOSTED", "1"),
        ]);
        let want = LaunchEnv {
            rank: 2,
            world_size: 4,
            local_rank: Some(2),
            local_world_size: Some(4),
            store: tcp("127.0.0.1", 41000),
            store_hosted: true,
            launcher: "oxccl",
        };
        assert_eq!(e, want);
        let e = ok(&[("OXCCL_RANK", "0"), ("OXCCL_WORLD_SIZE", "1")]);
        assert_eq!((e.rank, e.world_size, e.local_rank, e.store, e.store_hosted), (0, 1, None, None, false));
    }

    #[test]
    fn torchrun() {
        let e = ok(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!((e.launcher, e.rank, e.world_size), ("torchrun", 3, 8));
        assert_eq!((e.local_rank, e.local_world_size), (Some(1), Some(2)));
        assert_eq!(e.store, tcp("node0", 29501), "torchrun's own store has MASTER_PORT");
        // OXCCL_STORE wins over MASTER_ADDR.
        let e = ok(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("OXCCL_STORE", "file:///shared/rdv"),
        ]);
        assert_eq!(e.store, Some(StoreAddr::File("/shared/rdv".into())));
        let e = ok(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "[::1]"), ("MASTER_PORT", "29500")]);
        assert_eq!(e.store, tcp("::1", 29501));
    }

    #[test]
    fn slurm() {
        let e = ok(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6"), ("SLURM_LOCALID", "1")]);
        assert_eq!((e.launcher, e.rank, e.world_size), ("slurm", 5, 6));
        assert_eq!((e.local_rank, e.local_world_size), (Some(1), None), "SLURM_NTASKS_PER_NODE absent");
        let e =
            ok(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS_PER_NODE", "3")]);
        assert_eq!(e.local_world_size, Some(3));
    }

    #[test]
    fn openmpi_and_pmi() {
        let e = ok(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
        ]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size),
            ("openmpi", 1, 2, Some(0), Some(1))
        );
        let e = ok(&[("PMI_RANK", "3"), ("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "1"), ("MPI_LOCALNRANKS", "2")]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size, e.local_rank, e.local_world_size),
            ("pmi", 3, 4, Some(1), Some(2))
        );
    }

    #[test]
    fn precedence() {
        let all = [
            ("OXCCL_RANK", "1"),
            ("OXCCL_WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("PMI_RANK", "4"),
            ("PMI_SIZE", "5"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ];
        for (skip, launcher, rank) in
            [(0, "oxccl", 1), (2, "torchrun", 2), (4, "openmpi", 3), (6, "pmi", 4), (8, "slurm", 0)]
        {
            let e = ok(&all[skip..]);
            assert_eq!((e.launcher, e.rank), (launcher, rank));
        }
    }

    #[test]
    fn bad_numbers() {
        err(&[("OXCCL_RANK", "one"), ("OXCCL_WORLD_SIZE", "2")], "OXCCL_RANK");
        err(&[("RANK", "0"), ("WORLD_SIZE", "-2")], "WORLD_SIZE");
        err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "x")], "SLURM_LOCALID");
        err(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("MPI_LOCALNRANKS", "2.5")], "MPI_LOCALNRANKS");
    }

    #[test]
    fn bad_ranks_and_sizes() {
        let s = err(&[("OXCCL_RANK", "2"), ("OXCCL_WORLD_SIZE", "2")], "OXCCL_WORLD_SIZE");
        assert!(s.contains("OXCCL_RANK=2"), "{s}");
        err(&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE");
        err(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")], "OMPI_COMM_WORLD_RANK");
        err(
            &[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "2")],
            "MPI_LOCALRANKID",
        );
        err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "3")], "LOCAL_WORLD_SIZE");
        err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "0")], "LOCAL_WORLD_SIZE");
    }

    #[test]
    fn rank_without_size() {
        let s = err(&[("OXCCL_RANK", "0")], "OXCCL_WORLD_SIZE");
        assert!(s.contains("OXCCL_RANK"), "{s}");
        err(&[("RANK", "1")], "WORLD_SIZE");
        err(&[("SLURM_PROCID", "1")], "SLURM_NTASKS");
        err(&[("OMPI_COMM_WORLD_RANK", "1")], "OMPI_COMM_WORLD_SIZE");
        err(&[("PMI_RANK", "1")], "PMI_SIZE");
    }

    #[test]
    fn bad_store_variables() {
        let base = [("OXCCL_RANK", "0"), ("OXCCL_WORLD_SIZE", "2")];
        let with = |extra: &[(&'static str, &'static str)]| [&base[..], extra].concat();
        err(&with(&[("OXCCL_STORE", "udp://h:1")]), "OXCCL_STORE");
        err(&with(&[("OXCCL_STORE", "h:port")]), "OXCCL_STORE");
        err(&with(&[("OXCCL_STORE", "file://relative")]), "OXCCL_STORE");
        err(&with(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "65535")]), "MASTER_PORT");
        err(&with(&[("MASTER_ADDR", "h")]), "MASTER_PORT");
        err(&with(&[("MASTER_PORT", "1")]), "MASTER_ADDR");
        err(&with(&[("OXCCL_STORE_HOSTED", "maybe")]), "OXCCL_STORE_HOSTED");
    }

    #[test]
    fn store_addr_forms() {
        assert_eq!(StoreAddr::parse("tcp://h:1").unwrap(), StoreAddr::Tcp("h".into(), 1));
        assert_eq!("10.0.0.1:29501".parse::<StoreAddr>().unwrap(), StoreAddr::Tcp("10.0.0.1".into(), 29501));
        assert_eq!(StoreAddr::parse("tcp://[::1]:7").unwrap(), StoreAddr::Tcp("::1".into(), 7));
        assert_eq!(StoreAddr::parse("file:///a/b").unwrap(), StoreAddr::File("/a/b".into()));
        for bad in ["", "h", ":1", "h:99999", "::1:7", "[::1:7", "http://h:1", "file://"] {
            let e = StoreAddr::parse(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
        }
        for s in ["tcp://h:1", "tcp://[::1]:7", "file:///a/b"] {
            assert_eq!(StoreAddr::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(StoreAddr::Tcp("::1".into(), 7).connect_target().as_deref(), Some("[::1]:7"));
        assert_eq!(StoreAddr::File("/x".into()).connect_target(), None);
    }
}
