//! The typed GPU calls: cudarc's device memory — `CudaSlice`, views of part of one
//! (`CudaView`, `CudaViewMut`: `slice.slice(a..b)`) — queued on a cudarc stream (the `cuda`
//! feature). Only cudarc's own device memory is taken ([`CudaMemory`], sealed): its pointer
//! and length are cudarc's, so these calls are safe. Each returns once queued, ordered on the stream as NCCL's calls are
//! ([`Communicator::submit_on_stream`]): the operation starts after the work queued on the
//! stream before the call, and the stream's later work (the slice's next use, its free)
//! waits until the operation has ended. A failure is returned by the communicator's next
//! call (and the stream is released all the same).
//!
//! Why the borrows may end at return: cudarc records the slice's use on `stream` when the
//! guard of its device pointer goes, after the stream was held for the operation, so other
//! streams that use the slice, and its stream-ordered free, wait for the operation too.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use oxccl_core::mem::MemKind;
use oxccl_core::stream::StreamHandle;
use oxccl_core::{Element, ReduceOp, Result};

use crate::comm::Communicator;
use crate::raw::{RawBuf, RawCall};

mod sealed {
    pub trait Sealed {}
}

/// cudarc's device memory: `CudaSlice`, `CudaView`, `CudaViewMut` (sealed: a pointer and a
/// length of any other source would make the safe calls below unsound; managed memory,
/// which CUDA IPC cannot share, is not taken either).
pub trait CudaMemory: sealed::Sealed {}
impl<T> sealed::Sealed for cudarc::driver::CudaSlice<T> {}
impl<T> CudaMemory for cudarc::driver::CudaSlice<T> {}
impl<T> sealed::Sealed for cudarc::driver::CudaView<'_, T> {}
impl<T> CudaMemory for cudarc::driver::CudaView<'_, T> {}
impl<T> sealed::Sealed for cudarc::driver::CudaViewMut<'_, T> {}
impl<T> CudaMemory for cudarc::driver::CudaViewMut<'_, T> {}

fn raw<T: Element>(ptr: u64, count: usize, stream: &CudaStream) -> RawBuf {
    let gpu = stream.context().ordinal() as u32;
    RawBuf { addr: ptr as usize, count, dtype: T::DTYPE, kind: MemKind::Device(gpu) }
}

fn handle(stream: &CudaStream) -> StreamHandle {
    StreamHandle(stream.cu_stream() as usize)
}

impl Communicator {
    /// [`Communicator::all_reduce_in_place`] on `buf`, queued on `stream`.
    pub fn all_reduce_cuda<T: Element + DeviceRepr>(
        &self,
        buf: &mut (impl DevicePtrMut<T> + CudaMemory),
        op: ReduceOp,
        stream: &CudaStream,
    ) -> Result<()> {
        let n = buf.len();
        let (p, _recorded) = buf.device_ptr_mut(stream);
        let b = raw::<T>(p, n, stream);
        // SAFETY: the slice stays valid until the operation ended (module documentation);
        // `stream` is the stream its use is recorded on.
        unsafe { self.submit_on_stream(&RawCall::AllReduce { op }, b, b, handle(stream)) }.map(drop)
    }

    /// [`Communicator::broadcast_in_place`] of `buf` from `root`, queued on `stream`.
    pub fn broadcast_cuda<T: Element + DeviceRepr>(
        &self,
        buf: &mut (impl DevicePtrMut<T> + CudaMemory),
        root: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let n = buf.len();
        let (p, _recorded) = buf.device_ptr_mut(stream);
        let b = raw::<T>(p, n, stream);
        // SAFETY: as in `all_reduce_cuda`.
        unsafe { self.submit_on_stream(&RawCall::Broadcast { root }, b, b, handle(stream)) }.map(drop)
    }

    /// A collective from `send` into `recv` (their lengths follow the typed call of the same
    /// name: [`RawCall`]), queued on `stream`.
    pub fn collective_cuda<T: Element + DeviceRepr>(
        &self,
        call: &RawCall,
        send: &(impl DevicePtr<T> + CudaMemory),
        recv: &mut (impl DevicePtrMut<T> + CudaMemory),
        stream: &CudaStream,
    ) -> Result<()> {
        let (sn, rn) = (send.len(), recv.len());
        let (sp, _read) = send.device_ptr(stream);
        let (rp, _written) = recv.device_ptr_mut(stream);
        let (s, r) = (raw::<T>(sp, sn, stream), raw::<T>(rp, rn, stream));
        // SAFETY: as in `all_reduce_cuda`, for both slices.
        unsafe { self.submit_on_stream(call, s, r, handle(stream)) }.map(drop)
    }

    /// A send of `buf` to `peer`, queued on `stream` (in order per peer; a receive and a send
    /// between two ranks on one stream wait for each other: use [`Communicator::stream_batch`]
    /// for those, as NCCL's groups).
    pub fn send_cuda<T: Element + DeviceRepr>(
        &self,
        buf: &(impl DevicePtr<T> + CudaMemory),
        peer: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let n = buf.len();
        let (p, _read) = buf.device_ptr(stream);
        // SAFETY: as in `all_reduce_cuda`.
        unsafe { self.send_on_stream(raw::<T>(p, n, stream), peer, handle(stream)) }.map(drop)
    }

    /// A receive into `buf` from `peer`, queued on `stream`.
    pub fn recv_cuda<T: Element + DeviceRepr>(
        &self,
        buf: &mut (impl DevicePtrMut<T> + CudaMemory),
        peer: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let n = buf.len();
        let (p, _written) = buf.device_ptr_mut(stream);
        // SAFETY: as in `all_reduce_cuda`.
        unsafe { self.recv_on_stream(raw::<T>(p, n, stream), peer, handle(stream)) }.map(drop)
    }
}
