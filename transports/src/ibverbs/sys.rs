//! Raw libibverbs bindings, generated at build time from the system's rdma-core headers.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, missing_docs)]
#![allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    missing_debug_implementations,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms
)]
include!(concat!(env!("OUT_DIR"), "/verbs_sys.rs"));
