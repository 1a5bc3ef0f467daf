//! `oxccl perf --api nccl`: the same operations through the NCCL C ABI of liboxccl_nccl
//! (its exported functions, called as a C program calls them), to measure what the ABI adds.

use std::ffi::{c_int, c_void, CStr};

use oxccl::{Communicator, DataType, Element, Error, ReduceOp, Result};
use oxccl_nccl as nccl;

use crate::perf::PerfOp;

/// A communicator of the C library, destroyed on drop.
#[derive(Debug)]
pub struct NcclComm {
    comm: nccl::ncclComm_t,
    rank: usize,
    world: usize,
}

#[inline(always)]
fn check(what: &str, r: nccl::ncclResult_t) -> Result<()> {
    if r == nccl::ncclSuccess {
        return Ok(());
    }
    failed(what, r)
}

#[cold]
#[inline(never)]
fn failed(what: &str, r: nccl::ncclResult_t) -> Result<()> {
    // SAFETY: both return static or thread-local NUL-terminated strings.
    let (s, last) = unsafe {
        (CStr::from_ptr(nccl::ncclGetErrorString(r)), CStr::from_ptr(nccl::ncclGetLastError(std::ptr::null_mut())))
    };
    Err(Error::Internal(format!("{what}: {r} ({}): {}", s.to_string_lossy(), last.to_string_lossy())))
}

fn dtype(d: DataType) -> c_int {
    match d {
        DataType::I8 => 0,
        DataType::U8 => 1,
        DataType::I32 => 2,
        DataType::U32 => 3,
        DataType::I64 => 4,
        DataType::U64 => 5,
        DataType::F16 => 6,
        DataType::F32 => 7,
        DataType::F64 => 8,
        DataType::Bf16 => 9,
        #[allow(unreachable_patterns)]
        _ => -1,
    }
}

fn redop(o: ReduceOp) -> c_int {
    match o {
        ReduceOp::Sum => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Avg => 4,
        #[allow(unreachable_patterns)]
        _ => -1,
    }
}

impl NcclComm {
    /// Every rank of `comm` makes the C library's communicator: rank 0's id goes out over
    /// `comm`.
    pub fn new(comm: &Communicator) -> Result<NcclComm> {
        let mut id = nccl::ncclUniqueId { internal: [0; nccl::NCCL_UNIQUE_ID_BYTES] };
        if comm.rank() == 0 {
            // SAFETY: id is a valid out pointer.
            check("ncclGetUniqueId", unsafe { nccl::ncclGetUniqueId(&mut id) })?;
        }
        let mut bytes: Vec<u8> = id.internal.iter().map(|&x| x as u8).collect();
        comm.broadcast_in_place(&mut bytes, 0)?;
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        let mut c: nccl::ncclComm_t = std::ptr::null_mut();
        let (rank, world) = (comm.rank(), comm.world_size());
        // SAFETY: c is a valid out pointer; the id is passed by value.
        check("ncclCommInitRank", unsafe { nccl::ncclCommInitRank(&mut c, world as c_int, id, rank as c_int) })?;
        Ok(NcclComm { comm: c, rank, world })
    }

    /// The OxCCL communicator behind it (for Rust rows on the same communicator).
    pub fn communicator(&self) -> &Communicator {
        // SAFETY: the handle lives as long as self.
        unsafe { nccl::communicator(self.comm) }.expect("a live handle")
    }

    /// One operation of `oxccl perf`, through the C ABI.
    #[inline(always)]
    pub fn call<T: Element>(
        &self,
        op: PerfOp,
        in_place: bool,
        send: &[T],
        recv: &mut [T],
        o: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let (d, o, c, st) = (dtype(T::DTYPE), redop(o), self.comm, std::ptr::null_mut());
        let s = send.as_ptr() as *const c_void;
        let rv = recv.as_mut_ptr() as *mut c_void;
        let (rank, n, root) = (self.rank, self.world, root as c_int);
        // SAFETY: the buffers are borrowed for the whole call, which completes before it
        // returns (host memory); counts are the slices' lengths.
        let r = unsafe {
            match (op, in_place) {
                (PerfOp::AllReduce, false) => nccl::ncclAllReduce(s, rv, recv.len(), d, o, c, st),
                (PerfOp::AllReduce, true) => nccl::ncclAllReduce(rv, rv, recv.len(), d, o, c, st),
                (PerfOp::Broadcast, false) => nccl::ncclBroadcast(s, rv, recv.len(), d, root, c, st),
                (PerfOp::Broadcast, true) => nccl::ncclBroadcast(rv, rv, recv.len(), d, root, c, st),
                (PerfOp::Reduce, false) => nccl::ncclReduce(s, rv, send.len(), d, o, root, c, st),
                (PerfOp::Reduce, true) => nccl::ncclReduce(rv, rv, recv.len(), d, o, root, c, st),
                (PerfOp::AllGather, _) => nccl::ncclAllGather(s, rv, send.len(), d, c, st),
                (PerfOp::ReduceScatter, _) => nccl::ncclReduceScatter(s, rv, recv.len(), d, o, c, st),
                (PerfOp::AllToAll, _) => nccl::ncclAlltoAll(s, rv, send.len() / n, d, c, st),
                (PerfOp::Sendrecv, _) => {
                    check("ncclGroupStart", nccl::ncclGroupStart())?;
                    // The group is always ended (a failed call in it makes the end fail too).
                    let _ = nccl::ncclSend(s, send.len(), d, ((rank + 1) % n) as c_int, c, st);
                    let _ = nccl::ncclRecv(rv, recv.len(), d, ((rank + n - 1) % n) as c_int, c, st);
                    nccl::ncclGroupEnd()
                }
                (PerfOp::Ep, _) => return Err(Error::invalid_arg("ep runs through the Rust API only")),
            }
        };
        check(op.name(), r)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: made by ncclCommInitRank and not used afterwards.
        unsafe { nccl::ncclCommDestroy(self.comm) };
    }
}
