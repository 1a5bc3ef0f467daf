//! net-libfabric as the engine sees it: the only file that knows whether the `libfabric`
//! feature is built.

use oxccl_core::config::Config;
use oxccl_core::link::Link;
use oxccl_core::store::Store;
use oxccl_core::Result;

#[cfg(feature = "libfabric")]
mod imp {
    use super::*;
    pub(crate) use oxccl_transports::libfabric::LibfabricTransport as Lf;
    use oxccl_transports::libfabric::{available, LibfabricConfig};

    fn lf_cfg(cfg: &Config) -> LibfabricConfig {
        LibfabricConfig {
            provider: cfg.libfabric_provider.clone(),
            domain: cfg.libfabric_domain.clone(),
            chunk: cfg.libfabric_chunk_bytes,
            register_always: cfg.libfabric_register_always,
        }
    }

    /// Whether net-libfabric can be offered, with the provider (`Ok`) or why not (`Err`).
    pub(crate) fn offer(cfg: &Config) -> std::result::Result<String, String> {
        available(&lf_cfg(cfg)).map(|p| format!("{} on {} (mr_mode {})", p.name, p.domain, p.mr_mode_names()))
    }

    pub(crate) fn open(cfg: &Config, store: &dyn Store, rank: usize, world: usize) -> Result<Lf> {
        Lf::new(store, rank, world, lf_cfg(cfg))
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

    pub(crate) fn open(_: &Config, _: &dyn Store, _: usize, _: usize) -> Result<Lf> {
        Err(oxccl_core::Error::Unsupported(offer(&Config::defaults()).unwrap_err()))
    }

    pub(crate) fn connect(lf: &mut Lf, _: &dyn Store, _: usize) -> Result<Option<Box<dyn Link>>> {
        match lf.0 {}
    }
}

pub(crate) use imp::*;
