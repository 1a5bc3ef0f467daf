//! Helpers of the Rust-side tests of the C functions: ranks as threads of this process.
#![allow(dead_code)]

use std::ffi::{c_int, c_void};
use std::thread;

use oxccl_nccl::*;

pub fn id() -> ncclUniqueId {
    let mut id = ncclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { ncclGetUniqueId(&mut id) }, ncclSuccess);
    id
}

pub fn config(name: Option<&'static std::ffi::CStr>) -> ncclConfig_t {
    ncclConfig_t { commName: name.map_or(std::ptr::null(), |n| n.as_ptr()), ..ncclConfig_t::initializer() }
}

/// A configuration handed to rank threads (its pointers are to static strings).
#[derive(Clone, Copy)]
pub struct Cfg(ncclConfig_t);
// SAFETY: the only pointers in it are to 'static C strings (or dangling, never read).
unsafe impl Send for Cfg {}

/// `n` ranks as threads, each making its communicator (with `cfg`) and running `f`.
pub fn ranks<R: Send>(n: usize, cfg: Option<ncclConfig_t>, f: impl Fn(usize, ncclComm_t) -> R + Sync) -> Vec<R> {
    let id = id();
    thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let f = &f;
                let cfg = cfg.map(Cfg);
                s.spawn(move || {
                    let mut c: ncclComm_t = std::ptr::null_mut();
                    let mut cfg = cfg;
                    let p = cfg.as_mut().map_or(std::ptr::null_mut(), |c| &mut c.0 as *mut ncclConfig_t);
                    // SAFETY: valid out pointer; the config outlives the call.
                    let res = unsafe { ncclCommInitRankConfig(&mut c, n as c_int, id, r as c_int, p) };
                    assert_eq!(res, ncclSuccess, "{}", last());
                    let out = f(r, c);
                    // SAFETY: made above, not used afterwards.
                    assert_eq!(unsafe { ncclCommDestroy(c) }, ncclSuccess);
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub fn last() -> String {
    // SAFETY: a NUL-terminated thread-local string.
    unsafe { std::ffi::CStr::from_ptr(ncclGetLastError(std::ptr::null_mut())) }.to_string_lossy().into_owned()
}

pub fn class_of(c: ncclComm_t) -> String {
    // SAFETY: c is live for the call.
    unsafe { communicator(c) }.unwrap().class().name().to_string()
}

pub fn sum_i32(c: ncclComm_t, v: i32) -> i32 {
    let mut x = v;
    let p = &mut x as *mut i32 as *mut c_void;
    // SAFETY: in place over one int.
    assert_eq!(unsafe { ncclAllReduce(p, p, 1, 2, 0, c, std::ptr::null_mut()) }, ncclSuccess, "{}", last());
    x
}
