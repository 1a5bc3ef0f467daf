//! The C functions called from Rust, ranks as threads of this process: what the C program
//! cannot see from outside (the traffic class a communicator got, a configuration from an
//! older nccl.h), and the calls a single thread makes for several ranks.

mod common;

use std::ffi::{c_int, c_void};

use common::*;
use oxccl_nccl::*;

/// A configuration from an older nccl.h (smaller `size`): the fields past it are not read.
/// A configuration not made by NCCL_CONFIG_INITIALIZER is refused.
#[test]
fn configurations_are_read_up_to_their_size() {
    let mut old = config(Some(c"never read"));
    old.size = std::mem::offset_of!(ncclConfig_t, commName);
    old.commName = std::ptr::dangling::<std::ffi::c_char>(); // past `size`: must not be read
    let got = ranks(2, Some(old), |_, c| sum_i32(c, 3));
    assert_eq!(got, [6, 6]);
    let mut bad = config(None);
    bad.magic = 0;
    let mut c: ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid pointers.
    let r = unsafe { ncclCommInitRankConfig(&mut c, 1, id(), 0, &mut bad) };
    assert_eq!(r, ncclInvalidArgument);
    assert!(last().contains("NCCL_CONFIG_INITIALIZER"), "{}", last());
    assert!(c.is_null());
}

/// Bad arguments at creation: each its result and words, nothing made.
#[test]
fn bad_creation_arguments() {
    let mut c: ncclComm_t = std::ptr::null_mut();
    let foreign = ncclUniqueId { internal: [7; NCCL_UNIQUE_ID_BYTES] };
    for (nranks, rank, id, want) in
        [(2, 5, id(), "rank 5 is out of range"), (0, 0, id(), "nranks 0"), (2, 0, foreign, "ncclGetUniqueId")]
    {
        // SAFETY: valid out pointer.
        let r = unsafe { ncclCommInitRank(&mut c, nranks, id, rank) };
        assert_eq!(r, ncclInvalidArgument, "{want}");
        assert!(last().contains(want), "{want}: {}", last());
        assert!(c.is_null());
    }
    // SAFETY: a null out pointer is refused, not written.
    assert_eq!(unsafe { ncclCommInitRank(std::ptr::null_mut(), 1, id(), 0) }, ncclInvalidArgument);
    // SAFETY: as above.
    assert_eq!(unsafe { ncclGetVersion(std::ptr::null_mut()) }, ncclInvalidArgument);
}

/// One thread makes two ranks of a communicator inside a group (as NCCL allows), drives both
/// through grouped collectives, then splits both in a group.
#[test]
fn one_thread_makes_and_drives_two_ranks_in_groups() {
    let id = id();
    let mut comms: [ncclComm_t; 2] = [std::ptr::null_mut(); 2];
    // SAFETY: valid out pointers, alive until ncclGroupEnd returns.
    unsafe {
        assert_eq!(ncclGroupStart(), ncclSuccess);
        for (r, c) in comms.iter_mut().enumerate() {
            assert_eq!(ncclCommInitRank(c, 2, id, r as c_int), ncclSuccess);
        }
        assert_eq!(ncclGroupEnd(), ncclSuccess, "{}", last());
    }
    assert!(comms.iter().all(|c| !c.is_null()));
    let mut v = [[1f32, 2.0], [10.0, 20.0]];
    // SAFETY: the buffers outlive the group.
    unsafe {
        assert_eq!(ncclGroupStart(), ncclSuccess);
        for (c, b) in comms.iter().zip(v.iter_mut()) {
            let p = b.as_mut_ptr() as *mut c_void;
            assert_eq!(ncclAllReduce(p, p, 2, 7, 0, *c, std::ptr::null_mut()), ncclSuccess);
        }
        assert_eq!(ncclGroupEnd(), ncclSuccess, "{}", last());
        // Both ranks' splits in one group: made together at its end.
        let mut subs: [ncclComm_t; 2] = [std::ptr::null_mut(); 2];
        assert_eq!(ncclGroupStart(), ncclSuccess);
        for (c, s) in comms.iter().zip(subs.iter_mut()) {
            assert_eq!(ncclCommSplit(*c, 0, 0, s, std::ptr::null_mut()), ncclSuccess, "{}", last());
        }
        // Destroying a communicator the open group still uses is refused.
        assert_eq!(ncclCommDestroy(comms[0]), ncclInvalidUsage);
        assert_eq!(ncclGroupEnd(), ncclSuccess, "{}", last());
        for s in subs {
            let mut n = 0;
            assert_eq!(ncclCommCount(s, &mut n), ncclSuccess);
            assert_eq!(n, 2);
            assert_eq!(ncclCommDestroy(s), ncclSuccess);
        }
        for c in comms {
            assert_eq!(ncclCommDestroy(c), ncclSuccess);
        }
    }
    assert_eq!(v, [[11.0, 22.0], [11.0, 22.0]]);
}

/// ncclCommShrink: the survivors make a communicator without the excluded rank.
#[test]
fn shrink_leaves_a_rank_out() {
    let got = ranks(3, None, |r, c| {
        if r == 2 {
            return None;
        }
        let mut small: ncclComm_t = std::ptr::null_mut();
        let mut excluded: [c_int; 1] = [2];
        // SAFETY: valid pointers.
        let res = unsafe { ncclCommShrink(c, excluded.as_mut_ptr(), 1, &mut small, std::ptr::null_mut(), 0) };
        assert_eq!(res, ncclSuccess, "{}", last());
        let mut n = 0;
        // SAFETY: valid pointers.
        assert_eq!(unsafe { ncclCommCount(small, &mut n) }, ncclSuccess);
        let s = sum_i32(small, r as i32 + 1);
        // SAFETY: made above.
        assert_eq!(unsafe { ncclCommDestroy(small) }, ncclSuccess);
        Some((n, s))
    });
    assert_eq!(got, [Some((2, 3)), Some((2, 3)), None]);
}
