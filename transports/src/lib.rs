//! # oxccl-transports
//!
//! One module per transport, each implementing [`oxccl_core::transport::Transport`] (what the
//! `oxccl` crate registers) and [`oxccl_core::link::Link`]:
//!
//! * [`p2p`] — GPU to GPU between processes of one host through CUDA IPC (`p2p`).
//! * [`host_staging`] — processes of one host through shared-memory rings (`host-staging`).
//! * [`tcp`] — ranks on different hosts through TCP streams (`net-tcp`).
//! * `libfabric` (feature `libfabric`) — `net-libfabric`: EFA, `tcp;ofi_rxm`, `shm`; its
//!   registered transport and settings are [`net_libfabric`], built with or without it.
//! * `ibverbs` (feature `ibverbs`) — `net-ibverbs`: InfiniBand and RoCE; its registered
//!   transport, settings and port choice are [`net_ibverbs`], built with or without it.
//! * `cuda` (feature `cuda`) — GPUs found at run time, device memory, GPU reduction kernels.
//!
//! Beside them: [`host`] (which ranks share a machine) and [`ledger`] (the host-wide
//! ledger of NIC endpoint leases, which the budget manager keeps).
//!
//! The network transports (`net-tcp`, `net-libfabric`, `net-ibverbs`) and CUDA `p2p` follow
//! the same shape; hardware ones sit behind Cargo features and are probed at run time.

#![warn(missing_docs)]

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod host_staging;
#[cfg(feature = "ibverbs")]
pub mod ibverbs;
pub mod ledger;
#[cfg(feature = "libfabric")]
pub mod libfabric;
#[cfg(any(feature = "libfabric", feature = "ibverbs"))]
mod mrcache;
pub mod net_ibverbs;
pub mod net_libfabric;
pub mod p2p;
pub mod tcp;
pub mod tls;
