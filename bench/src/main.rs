//! `oxccl`: run, measure and inspect OxCCL.

mod bind;
mod ep;
mod launch;
mod nccl_api;
mod perf;
mod plot;
mod trace;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "oxccl", version, about = "OxCCL: collective communication for Rust, measured and explained")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Measure a collective, as nccl-tests does: time, algbw, busbw, correctness check.
    ///
    /// Started by a launcher (oxccl launch, torchrun, srun, mpirun) it runs as that one rank;
    /// otherwise it launches --ranks local ranks itself.
    Perf(Box<perf::PerfArgs>),
    /// Draw `oxccl perf --csv` output as an SVG chart, one line per file (bus bandwidth
    /// against size; for sendrecv, the latency percentiles).
    Plot {
        /// The SVG file to write.
        #[arg(short = 'o', long = "output", value_name = "FILE.svg")]
        output: std::path::PathBuf,
        /// The chart's title.
        #[arg(long, default_value = "oxccl perf")]
        title: String,
        /// CSV files of `oxccl perf --csv` (a launcher's [rank] prefixes are fine), each a run.
        #[arg(required = true)]
        runs: Vec<std::path::PathBuf>,
    },
    /// Start N local ranks of a command, each line of output prefixed with its rank.
    ///
    /// Sets OXCCL_RANK, OXCCL_WORLD_SIZE, OXCCL_LOCAL_RANK, OXCCL_LOCAL_WORLD_SIZE and
    /// OXCCL_STORE for each, and OXCCL_JOB_SECRET (a fresh random secret that every connection
    /// of the job proves, unless one is set here already). When one rank fails, the others are stopped and the exit status
    /// is non-zero. Each rank is bound to a core of its own (NUMA-aware; --bind none to leave
    /// placement to the scheduler).
    Launch {
        /// Number of ranks.
        #[arg(short = 'n', long = "nranks", value_parser = crate::perf::at_least::<1>)]
        n: usize,
        /// How ranks are bound to CPUs: core (one core or hardware thread each, spread over
        /// NUMA nodes in blocks) or none.
        #[arg(long, value_enum, default_value_t = bind::Bind::Core)]
        bind: bind::Bind,
        /// The command and its arguments (after --).
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<OsString>,
    },
    /// Host a TCP rendezvous store (for ranks started by hand or by a launcher without one).
    ///
    /// Admits only clients that prove the job secret of its environment (OXCCL_JOB_SECRET or
    /// OXCCL_JOB_SECRET_FILE); beyond loopback without a secret it refuses to start unless
    /// OXCCL_ALLOW_UNAUTHENTICATED=1 (docs/security.md).
    Store {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:29501")]
        listen: std::net::SocketAddr,
    },
    /// Print every rank's flight record (its last operations), side by side, from a running job.
    ///
    /// Asks every process that uses the job's store for its communicators' records, through the
    /// store, and prints them per communicator, a column per rank: the rank that is behind and
    /// the operation it is stuck in stand out; a rank that does not answer is stopped, hung or
    /// gone. The store is --store, else the one in the environment of process --pid (a rank,
    /// or a launcher whose ranks are its children), else OXCCL_STORE (or MASTER_ADDR and
    /// MASTER_PORT) here. Exit status 2: no rank answered.
    Trace {
        /// The job's store (tcp://host:port, host:port or file:///dir).
        #[arg(long)]
        store: Option<String>,
        /// A process of the job (a rank, or `oxccl launch`), whose environment names the store.
        #[arg(long)]
        pid: Option<u32>,
        /// How long to wait for the answers (each live rank answers within about 250 ms).
        #[arg(long, default_value = "2s", value_parser = wait_arg)]
        wait: std::time::Duration,
        /// Rows shown per communicator, the latest (0: every operation kept).
        #[arg(long, default_value_t = 20)]
        rows: usize,
        /// Print the records as JSON (a list, one object per rank and communicator, every
        /// operation kept).
        #[arg(long)]
        json: bool,
    },
    /// Print every OXCCL_* setting, its effective value and where it came from.
    Env,
    /// Under a launcher: print, for this rank, every peer link's transport and why.
    ///
    /// With --connect it first runs a barrier and an all_reduce so that links are made.
    Explain {
        /// Print JSON (one object per rank) instead of text.
        #[arg(long)]
        json: bool,
        /// Connect the links an all_reduce and a barrier use before explaining.
        #[arg(long)]
        connect: bool,
    },
}

/// `--wait`: a duration from 100ms to 60s.
fn wait_arg(s: &str) -> Result<std::time::Duration, String> {
    oxccl_core::config::parse_duration(s)
        .filter(|d| (std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(60)).contains(d))
        .ok_or_else(|| format!("{s:?}: expected a duration from 100ms to 60s, such as 2s"))
}

fn init_logging() {
    let filter = std::env::var("OXCCL_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Perf(a) => run_perf(*a),
        Cmd::Plot { output, title, runs } => run_plot(&output, &title, &runs),
        Cmd::Launch { n, bind, cmd } => {
            if n == 0 {
                eprintln!("oxccl launch: -n must be at least 1");
                return ExitCode::from(2);
            }
            let opts =
                launch::LaunchOpts { n, program: cmd[0].clone(), args: cmd[1..].to_vec(), extra_env: vec![], bind };
            exit(launch::run(&opts))
        }
        Cmd::Store { listen } => match oxccl::Config::from_env()
            .and_then(|c| oxccl::bootstrap::tcp_store::TcpStoreServer::start(listen, &c.auth))
        {
            Ok(s) => {
                eprintln!("oxccl store: listening on {}", s.local_addr());
                match s.serve_forever() {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("oxccl store: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("oxccl store: cannot listen on {listen}: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Explain { json, connect } => {
            let comm = match oxccl::Communicator::from_env() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("oxccl explain: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if connect {
                let mut v = vec![0f32; 1 << 16];
                if let Err(e) = comm.barrier().and_then(|_| comm.all_reduce_in_place(&mut v, oxccl::ReduceOp::Sum)) {
                    eprintln!("oxccl explain: {e}");
                    return ExitCode::FAILURE;
                }
            }
            let x = comm.explain();
            if json {
                match serde_json::to_string(&x) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("oxccl explain: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", x.to_text());
            }
            ExitCode::SUCCESS
        }
        Cmd::Trace { store, pid, wait, rows, json } => trace::run(store.as_deref(), pid, wait, rows, json),
        Cmd::Env => match oxccl::Config::from_env() {
            Ok(c) => {
                println!("{:<24} {:<20} {:<8} what it does", "setting", "value", "from");
                for (k, v, s) in c.describe() {
                    println!("{:<24} {:<20} {:<8} {}", k.name, if v.is_empty() { "-" } else { &v }, s.name(), k.help);
                }
                println!("\nauthentication: {}", c.auth.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("oxccl env: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn exit(r: Result<i32, String>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("oxccl launch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_plot(output: &std::path::Path, title: &str, runs: &[std::path::PathBuf]) -> ExitCode {
    let mut data = Vec::new();
    for f in runs {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("oxccl plot: {}: {e}", f.display());
                return ExitCode::from(2);
            }
        };
        let rows = plot::parse_csv(&text);
        if rows.is_empty() {
            eprintln!("oxccl plot: {}: no rows of oxccl perf --csv output", f.display());
            return ExitCode::from(2);
        }
        let name = f.file_stem().map_or_else(|| f.display().to_string(), |s| s.to_string_lossy().into_owned());
        data.push((name, rows));
    }
    let (lines, latency) = plot::series_of(&data);
    match plot::draw(output, title, &lines, latency) {
        Ok(()) => {
            println!("oxccl plot: {} ({} lines)", output.display(), lines.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oxccl plot: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_perf(a: perf::PerfArgs) -> ExitCode {
    if let Err(e) = a.check() {
        eprintln!("oxccl perf: {e}");
        return ExitCode::from(2);
    }
    let under_launcher = match oxccl::bootstrap::env::LaunchEnv::from_env() {
        Ok(e) => e.is_some(),
        Err(e) => {
            eprintln!("oxccl perf: {e}");
            return ExitCode::from(2);
        }
    };
    if !under_launcher && a.ranks > 1 {
        // Re-run this very command as N ranks.
        let me = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("oxccl perf: cannot find my own executable: {e}");
                return ExitCode::FAILURE;
            }
        };
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let opts =
            launch::LaunchOpts { n: a.ranks, program: me.into_os_string(), args, extra_env: vec![], bind: a.bind };
        return exit(launch::run(&opts));
    }
    let comm = if under_launcher {
        oxccl::Communicator::from_env()
    } else {
        oxccl::Config::from_env()
            .and_then(|cfg| oxccl::Communicator::init(std::sync::Arc::new(oxccl::MemStore::new()), 0, 1, cfg))
    };
    let comm = match comm {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxccl perf: cannot create the communicator: {e}");
            return ExitCode::FAILURE;
        }
    };
    match perf::run(&comm, &a) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(w) => {
            if comm.rank() == 0 {
                eprintln!("oxccl perf: {w} wrong elements");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("oxccl perf: rank {}: {e}", comm.rank());
            ExitCode::FAILURE
        }
    }
}
