//! # oxccl
//!
//! The public crate of OxCCL.

pub mod bootstrap;
