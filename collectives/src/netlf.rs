//! net-libfabric as the engine sees it: the only file that knows whether the `libfabric`
//! feature is built.

use oxccl_core::budget::TrafficClass;
use oxccl_core::config::Config;
use oxccl_core::link::Link;
use oxccl_core::store::Store;
use oxccl_core::Result;

use crate::explain::EndpointUse;
#[cfg(feature = "libfabric")]
use crate::explain::ProviderLimits;
use crate::ledger::Ledger;

#[cfg(feature = "libfabric")]
mod imp {
    use super::*;
    pub(crate) use oxccl_transports::libfabric::LibfabricTransport as Lf;
    use oxccl_transports::libfabric::{available, LibfabricConfig};

    use crate::ledger::Take;
    use oxccl_core::budget::Lease;
    use oxccl_transports::libfabric::Nic;
    use std::sync::Arc;

    fn lf_cfg(cfg: &Config, class: TrafficClass) -> LibfabricConfig {
        LibfabricConfig {
            provider: cfg.libfabric_provider.clone(),
            domain: cfg.libfabric_domain.clone(),
            chunk: cfg.libfabric_chunk_bytes,
            register_always: cfg.libfabric_register_always,
            rma_min: cfg.libfabric_rma_bytes,
            class,
            share: cfg.budget.share,
        }
    }

    /// Whether net-libfabric can be offered, with the provider (`Ok`) or why not (`Err`).
    pub(crate) fn offer(cfg: &Config) -> std::result::Result<String, String> {
        available(&lf_cfg(cfg, cfg.class))
            .map(|p| format!("{} on {} (mr_mode {})", p.name, p.domain, p.mr_mode_names()))
    }

    /// An endpoint for a communicator: what the budget allows.
    pub(crate) struct Plan {
        nic: Arc<Nic>,
        pub(crate) info: EndpointUse,
    }

    /// Finds the communicator an endpoint: a dedicated one if the NIC's budget has one for
    /// `class` (the lease is recorded in the host's ledger), else one this process already
    /// has; else the refusal in words.
    pub(crate) fn plan(
        cfg: &Config,
        class: TrafficClass,
        comm: &str,
        ledger: &Ledger,
    ) -> std::result::Result<Plan, String> {
        let lcfg = lf_cfg(cfg, class);
        let p = available(&lcfg)?;
        let limit = cfg.budget.limit(&p.domain, p.ep_cnt);
        let info = |nic: &Nic, lease: Option<Lease>| EndpointUse {
            nic: p.domain.clone(),
            provider: p.name.clone(),
            endpoint: nic.serial(),
            dedicated: lease.is_some(),
            opened_for: nic.owner(),
            lease,
            limit: limit.0,
            limit_from: limit.1.to_string(),
            provider_limits: ProviderLimits {
                ep_cnt: p.ep_cnt,
                mr_cnt: p.mr_cnt,
                inject_size: p.inject_size,
                max_msg_size: p.max_msg_size,
                mr_mode: p.mr_mode_names(),
            },
        };
        match ledger.take(&p.domain, p.ep_cnt, &cfg.budget, class, comm, 1) {
            Ok(Take::Granted(guard, _)) => {
                let lease = guard.lease.clone();
                let nic = Nic::open(&lcfg, Some(Box::new(guard))).map_err(|e| e.to_string())?;
                tracing::info!(comm, %class, nic = %p.domain, "net-libfabric: dedicated endpoint leased");
                Ok(Plan { info: info(&nic, Some(lease)), nic })
            }
            Ok(Take::Refused(budget)) => match Nic::find(&lcfg) {
                Some(nic) => {
                    tracing::info!(
                        comm,
                        %class,
                        nic = %p.domain,
                        "net-libfabric: no endpoint left for this class; sharing endpoint {} of this process \
                         (opened for {})",
                        nic.serial(),
                        nic.owner()
                    );
                    Ok(Plan { info: info(&nic, None), nic })
                }
                None => Err(budget.refusal(class, comm)),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    pub(crate) fn open(
        plan: Plan,
        cfg: &Config,
        class: TrafficClass,
        store: &dyn Store,
        rank: usize,
        world: usize,
    ) -> Result<Lf> {
        Lf::on(plan.nic, store, rank, world, lf_cfg(cfg, class))
    }

    pub(crate) fn connect(lf: &mut Lf, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
        Ok(lf.connect(store, peer)?.map(|l| Box::new(l) as Box<dyn Link>))
    }
}

#[cfg(not(feature = "libfabric"))]
mod imp {
    use super::*;

    /// Never made in a build without the `libfabric` feature.
    #[derive(Debug)]
    pub(crate) struct Lf(std::convert::Infallible);

    pub(crate) fn offer(_: &Config) -> std::result::Result<String, String> {
        Err("this build has no libfabric support (cargo feature `libfabric`)".into())
    }

    /// Never made in a build without the `libfabric` feature.
    pub(crate) struct Plan {
        pub(crate) info: EndpointUse,
        never: std::convert::Infallible,
    }

    pub(crate) fn plan(_: &Config, _: TrafficClass, _: &str, _: &Ledger) -> std::result::Result<Plan, String> {
        Err(offer(&Config::defaults()).unwrap_err())
    }

    pub(crate) fn open(plan: Plan, _: &Config, _: TrafficClass, _: &dyn Store, _: usize, _: usize) -> Result<Lf> {
        match plan.never {}
    }

    pub(crate) fn connect(lf: &mut Lf, _: &dyn Store, _: usize) -> Result<Option<Box<dyn Link>>> {
        match lf.0 {}
    }
}

pub(crate) use imp::*;
