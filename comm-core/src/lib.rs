//! # oxccl-core
//!
//! The part of OxCCL that does no I/O: data types and reduction operators, the error type,
//! configuration, the rendezvous [`Store`](store::Store) trait, the [`Link`](link::Link)
//! contract every transport implements, algorithms as [`Schedule`](schedule::Schedule)s, the
//! executor that runs a schedule over links, and the host reduction kernels.
//!
//! Everything here is a pure function or a state machine driven by its caller, so it is
//! tested exhaustively in memory (see [`sim`] with the `test-util` feature).

#![warn(missing_docs)]

pub mod algo;
#[cfg(test)]
mod algo_tests;
pub mod auth;
pub mod budget;
pub mod config;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod link;
pub mod mem;
pub mod p2p;
pub mod proto;
pub mod reduce;
pub mod schedule;
#[cfg(any(test, feature = "test-util"))]
pub mod sim;
pub mod staging;
pub mod store;
pub mod stream;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod topo;
pub mod transport;

pub use dtype::{DataType, Element, ReduceOp};
pub use error::{Error, Result};
pub use half;
