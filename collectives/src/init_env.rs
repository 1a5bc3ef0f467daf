//! Creating the world communicator from a launcher's environment.

use crate::config::Config;
use oxccl_core::{Error, Result};

use crate::bootstrap::{self, env::LaunchEnv};
use crate::comm::Communicator;

impl Communicator {
    /// Creates the communicator of all ranks from the environment a launcher set:
    /// `oxccl launch`, torchrun, Slurm's srun, Open MPI's or MPICH's mpirun (see
    /// [`LaunchEnv::detect`]). Rank 0 hosts the TCP rendezvous store unless the launcher does;
    /// the store lives until every rank has closed its communicator.
    pub fn from_env() -> Result<Communicator> {
        let cfg = Config::from_env()?;
        let env = LaunchEnv::from_env()?.ok_or_else(|| {
            Error::invalid_arg(
                "no launcher environment found: start the ranks with `oxccl launch -n N`, torchrun, srun or mpirun, \
                 or set OXCCL_RANK, OXCCL_WORLD_SIZE and OXCCL_STORE",
            )
        })?;
        Self::from_launch_env(&env, cfg)
    }

    /// [`Communicator::from_env`] with an explicit launch description and configuration.
    pub fn from_launch_env(env: &LaunchEnv, cfg: Config) -> Result<Communicator> {
        tracing::info!(rank = env.rank, world = env.world_size, launcher = env.launcher, "bootstrap");
        let ifname = oxccl_transports::tcp::TcpConfig::from_config(&cfg)?.ifname;
        let (store, server) = bootstrap::connect_store(env, cfg.timeout, &cfg.auth, ifname.as_deref())?;
        let rank0_hosts = matches!(env.store, Some(bootstrap::StoreAddr::Tcp(..))) && !env.store_hosted;
        let comm = Communicator::init(store, env.rank, env.world_size, cfg)?;
        if rank0_hosts {
            let p = &comm.peers()[0];
            comm.set_store_host(Some((p.host_id.clone(), p.pid)));
        }
        Ok(match server {
            Some(s) => comm.hold_server(std::sync::Arc::new(s)),
            None => comm,
        })
    }
}
