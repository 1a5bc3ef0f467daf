//! # oxccl
//!
//! A collective communication runtime: a [`Communicator`] of ranks (processes) that run
//! `send`/`recv`, `broadcast`, `reduce`, `all_reduce`, `all_gather`, `reduce_scatter`,
//! `all_to_all(_v)` and `barrier` together, over the transport each pair of ranks can use:
//! `host-staging` (shared-memory rings between processes of one host), `net-libfabric` (EFA,
//! verbs, tcp; feature `libfabric`) and `net-tcp` between hosts.
//!
//! ```no_run
//! # fn main() -> oxccl::Result<()> {
//! // Under `oxccl launch -n 2`, torchrun, srun or mpirun:
//! let comm = oxccl::Communicator::from_env()?;
//! let mut grads = vec![1.0f32; 1 << 20];
//! comm.all_reduce_in_place(&mut grads, oxccl::ReduceOp::Avg)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bootstrap;
mod comm;
mod config;
#[cfg(feature = "cuda")]
mod cuda_api;
#[cfg(feature = "cuda")]
pub use cuda_api::CudaMemory;
mod deadline;
mod delta;
mod dispatch;
mod driver;
mod engine;
mod explain;
mod health;
mod init_env;
mod ops;
mod p2p;
mod progress;
pub mod raw;
mod registry;
mod shared;
pub mod trace;
mod work;

pub use comm::Communicator;
pub use config::Config;
/// cudarc, whose device slices and streams the typed GPU calls take (the `cuda` feature).
#[cfg(feature = "cuda")]
pub use cudarc;
pub use delta::{DeltaEncoding, DeltaStats};
pub use explain::{
    describe_striped, explain_process, EndpointUse, Explain, PeerLink, ProcessExplain, ProviderLimits, TransportUse,
};
pub use ops::Group;
pub use oxccl_core::algo::{Stripe, StripedPlan};
pub use oxccl_core::auth::{Auth, JobSecret};
pub use oxccl_core::budget::TrafficClass;
pub use oxccl_core::link::TransportKind;
pub use oxccl_core::mem::MemKind;
pub use oxccl_core::store::{MemStore, Store};
pub use oxccl_core::stream::StreamHandle;
pub use oxccl_core::{half, DataType, Element, Error, ReduceOp, Result};
/// GPUs found at run time, device memory, GPU reduction kernels (feature `cuda`):
/// `docs/gpu.md`.
#[cfg(feature = "cuda")]
pub use oxccl_transports::cuda as gpu;
/// The host-wide ledger of NIC endpoint leases.
pub use oxccl_transports::ledger;
pub use raw::{RawBuf, RawCall};
pub use registry::transports;
pub use work::{StreamBatch, Work};
