//! A device buffer handed to this build (host memory only) is a clear ncclInvalidUsage,
//! never a fault. Needs a GPU; without one it says `skipped: no GPU`.
#![cfg(feature = "cuda")]

use std::ffi::{c_void, CStr};

use oxccl_core::testing::{skip, Need};
use oxccl_nccl::*;

#[test]
fn a_device_buffer_is_invalid_usage_not_a_fault() {
    if let Err(why) = oxccl::gpu::probe() {
        skip(Need::Gpu, format!("no GPU ({why})"));
        return;
    }
    use cudarc::driver::{CudaContext, DevicePtr};
    let ctx = CudaContext::new(0).expect("a context on GPU 0");
    let stream = ctx.default_stream();
    let buf = stream.alloc_zeros::<f32>(16).expect("device memory");
    let (p, _sync) = buf.device_ptr(&stream);
    let dev = p as usize as *mut c_void;
    let mut id = ncclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
    let mut c: ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out pointers; the device pointer is never dereferenced by the host (that
    // is what is tested).
    unsafe {
        assert_eq!(ncclGetUniqueId(&mut id), ncclSuccess);
        assert_eq!(ncclCommInitRank(&mut c, 1, id, 0), ncclSuccess);
        assert_eq!(ncclAllReduce(dev, dev, 16, 7, 0, c, std::ptr::null_mut()), ncclInvalidUsage);
        let last = CStr::from_ptr(ncclGetLastError(c)).to_string_lossy().into_owned();
        assert!(last.contains("GPU 0") && last.contains("host memory"), "{last}");
        // Every call that takes a buffer checks it first.
        assert_eq!(ncclBroadcast(dev, dev, 16, 7, 0, c, std::ptr::null_mut()), ncclInvalidUsage);
        assert_eq!(ncclCommDestroy(c), ncclSuccess);
    }
}
