//! GPU support behind the `cuda` feature: the driver found at run time, device memory told
//! apart from host memory, and the reduction kernels ([`kernels`]).
//!
//! cudarc loads `libcuda.so.1` and `libnvrtc.so.12` when first needed (dynamic loading), so
//! the build needs no CUDA. A machine without the driver has **0 GPUs**: [`probe`] says why,
//! [`gpu_count`] is 0, and GPU tests print `skipped: no GPU`.
//!
//! What is here is the ground the GPU data path stands on (issue 6): FI_HMEM registration in
//! net-libfabric uses [`mem_kind`]; device buffers in collectives, the `p2p` transport
//! through CUDA IPC and host staging of GPU data are still to come, and need a GPU to verify.

pub mod gpu;
pub mod kernels;

use std::sync::OnceLock;

use cudarc::driver::{result, sys};

/// The GPUs the driver shows this process.
#[derive(Debug, Clone)]
pub struct Gpus {
    /// Device names, by ordinal.
    pub names: Vec<String>,
    /// The driver's CUDA version (e.g. 12080 for 12.8).
    pub driver_version: i32,
}

/// The GPUs of this process, or why there are none (no driver, `cuInit` failed). Probed
/// once; a missing driver is an answer, not a panic.
pub fn probe() -> Result<&'static Gpus, String> {
    static GPUS: OnceLock<Result<Gpus, String>> = OnceLock::new();
    GPUS.get_or_init(|| {
        // SAFETY: only tries to open the library by its names; touches nothing else.
        if !unsafe { sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda.so.1 is not on the loader path)".into());
        }
        result::init().map_err(|e| format!("cuInit: {e:?}"))?;
        let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        let mut names = Vec::new();
        for i in 0..n {
            let d = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e:?}"))?;
            names.push(result::device::get_name(d).unwrap_or_else(|_| format!("GPU {i}")));
        }
        let mut v = 0;
        // SAFETY: the driver is loaded and initialised above; v is a valid out pointer.
        unsafe { sys::cuDriverGetVersion(&mut v) };
        Ok(Gpus { names, driver_version: v })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The device of the context current on this thread (what `cudaSetDevice` / torch's
/// `set_device` made current), if any.
pub fn current_device() -> Option<u32> {
    if gpu_count() == 0 {
        return None;
    }
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the driver is loaded and initialised (gpu_count > 0); out pointer.
    let r = unsafe { sys::cuCtxGetCurrent(&mut ctx) };
    if r != sys::CUresult::CUDA_SUCCESS || ctx.is_null() {
        return None;
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: a context is current; out pointer.
    let r = unsafe { sys::cuCtxGetDevice(&mut dev) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(dev.max(0) as u32)
}

/// The PCI bus id of GPU `ordinal` (`0000:17:00.0`, lower case), if there is one.
pub fn bus_id(ordinal: u32) -> Option<String> {
    if ordinal as usize >= gpu_count() {
        return None;
    }
    let mut dev: sys::CUdevice = 0;
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the driver is loaded and initialised (the GPU exists); out pointers of their
    // sizes (the id is at most 13 characters and a NUL).
    unsafe {
        if sys::cuDeviceGet(&mut dev, ordinal as i32) != sys::CUresult::CUDA_SUCCESS
            || sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) != sys::CUresult::CUDA_SUCCESS
        {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().to_ascii_lowercase())
    }
}

/// The PCI bus ids of the GPUs GPU `ordinal` can reach through CUDA IPC: itself, and every
/// GPU this process sees that it can access as a peer (`cuDeviceCanAccessPeer`).
pub fn reach(ordinal: u32) -> Vec<String> {
    let mut out: Vec<String> = bus_id(ordinal).into_iter().collect();
    let mut me: sys::CUdevice = 0;
    // SAFETY: the driver is loaded (bus_id found the GPU); out pointer.
    if out.is_empty() || unsafe { sys::cuDeviceGet(&mut me, ordinal as i32) } != sys::CUresult::CUDA_SUCCESS {
        return out;
    }
    for other in 0..gpu_count() as u32 {
        if other == ordinal {
            continue;
        }
        let (mut dev, mut can) = (0, 0);
        // SAFETY: as above; out pointers.
        let ok = unsafe {
            sys::cuDeviceGet(&mut dev, other as i32) == sys::CUresult::CUDA_SUCCESS
                && sys::cuDeviceCanAccessPeer(&mut can, me, dev) == sys::CUresult::CUDA_SUCCESS
        };
        if ok && can != 0 {
            out.extend(bus_id(other));
        }
    }
    out
}

/// Number of GPUs: 0 without a driver.
pub fn gpu_count() -> usize {
    probe().map_or(0, |g| g.names.len())
}

pub use oxccl_core::mem::MemKind;

/// Whether `ptr` is GPU memory (unified addressing: the driver knows every device
/// allocation's address). Host memory — and everything, on a machine without GPUs — is
/// [`MemKind::Host`].
pub fn mem_kind(ptr: *const u8) -> MemKind {
    if gpu_count() == 0 || ptr.is_null() {
        return MemKind::Host;
    }
    let mut kind: u32 = 0;
    // SAFETY: the driver is loaded (gpu_count > 0); the call only reads the driver's tables
    // for the address and writes 4 bytes to `kind`. Memory the driver does not know (plain
    // host memory) is an error return, not a fault.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut kind as *mut u32 as *mut std::ffi::c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr as sys::CUdeviceptr,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return MemKind::Host;
    }
    let mut ordinal: i32 = 0;
    // SAFETY: as above; 4 bytes written to `ordinal`.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut ordinal as *mut i32 as *mut std::ffi::c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr as sys::CUdeviceptr,
        )
    };
    MemKind::Device(if r == sys::CUresult::CUDA_SUCCESS { ordinal.max(0) as u32 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_there_are_zero_gpus_and_host_memory_is_host() {
        let x = [1u8; 64];
        match probe() {
            Err(why) => {
                oxccl_core::testing::skip(oxccl_core::testing::Need::Gpu, format!("no GPU ({why})"));
                assert_eq!(gpu_count(), 0);
                assert!(!why.is_empty());
            }
            Ok(g) => {
                println!("{} GPU(s): {:?}, driver {}", g.names.len(), g.names, g.driver_version);
                use cudarc::driver::{CudaContext, DevicePtr};
                let ctx = CudaContext::new(0).expect("a context on GPU 0");
                let stream = ctx.default_stream();
                let buf = stream.alloc_zeros::<u8>(4096).expect("4 KiB of device memory");
                let (p, _sync) = buf.device_ptr(&stream);
                assert_eq!(mem_kind(p as usize as *const u8), MemKind::Device(0));
            }
        }
        // Host memory is host memory with or without a driver.
        assert_eq!(mem_kind(x.as_ptr()), MemKind::Host);
    }
}
