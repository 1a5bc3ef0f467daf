//! One GPU as OxCCL uses it: its primary context, the reduction kernels loaded into it, the
//! local memory work on its memory ([`LocalMem`]) and the copy engines that stage its data
//! through pinned host memory ([`CudaCopies`], a [`DeviceCopies`]).
//!
//! Every call goes through the driver API (cudarc's `sys`, loaded at run time), on streams
//! of OxCCL's own that are created non-blocking (they never wait for the legacy default
//! stream). Nothing here synchronises the whole device: local work waits for its own stream
//! only, staging copies are watched with events.
//!
//! Unified addressing is assumed (every 64-bit Linux CUDA platform has it): a pinned host
//! buffer's address is also its address on the device, so kernels read bounce buffers
//! directly.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;
use oxccl_core::mem::{LocalMem, MemKinds, Scratch};
use oxccl_core::staging::{DeviceCopies, Dir};
use oxccl_core::stream::{Fence, StreamHandle, StreamOrder};
use oxccl_core::{DataType, Error, ReduceOp, Result};

/// `Ok` for CUDA_SUCCESS, else the error naming the call.
fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda { call, what: format!("{r:?}") })
    }
}

/// The loaded kernels of one GPU.
struct Kernels {
    reduce: Vec<((DataType, ReduceOp), sys::CUfunction)>,
    scale: Vec<(DataType, sys::CUfunction)>,
    /// Blocks per launch: enough to fill the GPU, grid-stride loops do the rest.
    blocks: u32,
}

/// A GPU of this process.
pub struct Gpu {
    ordinal: u32,
    name: String,
    ctx: sys::CUcontext,
    kernels: OnceLock<std::result::Result<Kernels, String>>,
    /// The stream of local work (copies and reductions of the executor).
    local: Mutex<Option<usize>>,
}

// SAFETY: the driver's context, module, function and stream handles may be used from any
// thread (the driver API is thread-safe); the stream of local work is behind a mutex.
unsafe impl Send for Gpu {}
// SAFETY: as above.
unsafe impl Sync for Gpu {}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU {} ({})", self.ordinal, self.name)
    }
}

/// A GPU's context made current by [`Gpu::enter`]; dropping it puts back the one before.
#[derive(Debug)]
#[must_use = "the context is current only while the guard lives"]
pub struct Current(bool);

impl Drop for Current {
    fn drop(&mut self) {
        if self.0 {
            let mut was: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: pops the context `enter` pushed on this thread.
            unsafe { sys::cuCtxPopCurrent_v2(&mut was) };
        }
    }
}

/// GPU `ordinal` of this process, its primary context retained for the life of the process.
pub fn gpu(ordinal: u32) -> Result<&'static Gpu> {
    static GPUS: OnceLock<Vec<std::result::Result<&'static Gpu, String>>> = OnceLock::new();
    let all = GPUS.get_or_init(|| {
        let n = super::gpu_count();
        (0..n as u32)
            .map(|i| {
                let mut dev: sys::CUdevice = 0;
                // SAFETY: the driver is loaded and initialised (gpu_count > 0); out pointers
                // are valid.
                unsafe {
                    let r = sys::cuDeviceGet(&mut dev, i as i32);
                    check("cuDeviceGet", r).map_err(|e| e.to_string())?;
                    let mut ctx: sys::CUcontext = std::ptr::null_mut();
                    let r = sys::cuDevicePrimaryCtxRetain(&mut ctx, dev);
                    check("cuDevicePrimaryCtxRetain", r).map_err(|e| e.to_string())?;
                    let name = super::probe().map(|g| g.names[i as usize].clone()).unwrap_or_default();
                    let g = Gpu { ordinal: i, name, ctx, kernels: OnceLock::new(), local: Mutex::new(None) };
                    Ok(&*Box::leak(Box::new(g)))
                }
            })
            .collect()
    });
    match all.get(ordinal as usize) {
        Some(Ok(g)) => Ok(g),
        Some(Err(why)) => Err(Error::Cuda { call: "cuDevicePrimaryCtxRetain", what: why.clone() }),
        None => Err(Error::invalid_arg(format!(
            "GPU {ordinal} does not exist: this process sees {} GPU(s){}",
            super::gpu_count(),
            super::probe().err().map(|w| format!(" ({w})")).unwrap_or_default()
        ))),
    }
}

impl Gpu {
    /// Its ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Makes its context current on this thread until the guard goes, then puts back the
    /// context that was current (a caller's thread keeps its own current device: torch's is
    /// not changed behind its back). Nothing is pushed when it is current already.
    pub fn enter(&self) -> Result<Current> {
        let mut cur: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: out pointer; the driver is initialised (this GPU exists).
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut cur) })?;
        if cur == self.ctx {
            return Ok(Current(false));
        }
        // SAFETY: a context retained for the life of the process.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(self.ctx) })?;
        Ok(Current(true))
    }

    fn kernels(&self) -> Result<&Kernels> {
        self.kernels
            .get_or_init(|| self.load().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|why| Error::Cuda { call: "cuModuleLoadData", what: why.clone() })
    }

    fn load(&self) -> Result<Kernels> {
        let _ctx = self.enter()?;
        let ptx = super::kernels::ptx().map_err(|why| Error::Cuda { call: "nvrtcCompileProgram", what: why })?;
        let image = std::ffi::CString::new(ptx).map_err(|_| Error::Internal("PTX with a NUL byte".into()))?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; the context is current.
        check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr() as *const c_void) })?;
        let get = |name: String| -> Result<sys::CUfunction> {
            let c = std::ffi::CString::new(name).expect("kernel names have no NUL");
            let mut f: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: a loaded module (kept for the life of the process) and a valid name.
            check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut f, module, c.as_ptr()) })?;
            Ok(f)
        };
        let mut reduce = Vec::new();
        for (d, op) in super::kernels::pairs() {
            reduce.push(((d, op), get(super::kernels::kernel_name(d, op))?));
        }
        let mut scale = Vec::new();
        for d in DataType::ALL {
            if let Some(name) = super::kernels::scale_name(d) {
                scale.push((d, get(name)?));
            }
        }
        let mut sms = 0;
        // SAFETY: an out pointer; the device exists.
        unsafe {
            let mut dev: sys::CUdevice = 0;
            sys::cuDeviceGet(&mut dev, self.ordinal as i32);
            sys::cuDeviceGetAttribute(&mut sms, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
        }
        Ok(Kernels { reduce, scale, blocks: (sms.max(1) as u32) * 4 })
    }

    /// Launches `dst[i] = a[i] op b[i]` over `count` elements on `stream`.
    ///
    /// # Safety
    /// The three ranges are memory the GPU can address (device memory, or pinned host memory
    /// under unified addressing), valid until the kernel has run.
    pub(crate) unsafe fn launch_reduce(
        &self,
        stream: sys::CUstream,
        (dtype, op): (DataType, ReduceOp),
        dst: *mut u8,
        a: *const u8,
        b: *const u8,
        count: usize,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let k = self.kernels()?;
        let op = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        let f = k.reduce.iter().find(|(p, _)| *p == (dtype, op)).map(|(_, f)| *f).expect("every pair has a kernel");
        let (mut d, mut x, mut y, mut n) = (dst as u64, a as u64, b as u64, count as u64);
        let mut args = [
            &mut d as *mut u64 as *mut c_void,
            &mut x as *mut u64 as *mut c_void,
            &mut y as *mut u64 as *mut c_void,
            &mut n as *mut u64 as *mut c_void,
        ];
        let blocks = (count.div_ceil(256) as u32).clamp(1, k.blocks);
        // SAFETY: a loaded kernel taking (T*, const T*, const T*, u64); the arguments live
        // until the launch returns (the driver copies them).
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(f, blocks, 1, 1, 256, 1, 1, 0, stream, args.as_mut_ptr(), std::ptr::null_mut())
        })
    }

    /// Runs `work` on the stream of local work and waits for that stream (not the device).
    fn on_local_stream(&self, work: impl FnOnce(sys::CUstream) -> Result<()>) -> Result<()> {
        let _ctx = self.enter()?;
        let mut s = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(new_stream()?);
        }
        let stream = s.expect("created above") as sys::CUstream;
        work(stream)?;
        // SAFETY: a stream of this context.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })
    }

    fn must(&self, r: Result<()>) {
        if let Err(e) = r {
            // LocalMem's calls cannot fail once the operation's checks passed; a GPU that
            // fails now (lost, out of memory for a launch) cannot leave the data right.
            panic!("GPU {}: {e}", self.ordinal);
        }
    }
}

/// Runs `free` on a thread of its own. `cuMemFree`, `cuMemFreeHost` and
/// `cuIpcCloseMemHandle` may wait for the whole device, including a caller's stream that is
/// held for the very operation that frees (a call on a stream): on the engine's thread that
/// would never end. On the reaper's thread the free waits until the operation released the
/// stream.
fn reap(free: impl FnOnce() + Send + 'static) {
    type Free = Box<dyn FnOnce() + Send>;
    static REAPER: OnceLock<Mutex<std::sync::mpsc::Sender<Free>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Free>();
        let started = std::thread::Builder::new().name("oxccl-gpu-free".into()).spawn(move || {
            for f in rx {
                f();
            }
        });
        if let Err(e) = started {
            tracing::warn!("no thread for freeing GPU memory ({e}): frees run where they are dropped");
        }
        Mutex::new(tx)
    });
    let free: Free = Box::new(free);
    if let Err(std::sync::mpsc::SendError(f)) = tx.lock().unwrap_or_else(|e| e.into_inner()).send(free) {
        f();
    }
}

/// Device memory allocated for scratch, freed with its owner (on the reaper's thread).
struct DeviceAlloc(&'static Gpu, u64);

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let (gpu, p) = (self.0, self.1);
        reap(move || {
            if let Ok(_ctx) = gpu.enter() {
                // SAFETY: an allocation of this context, no longer used (its owner is gone).
                unsafe { sys::cuMemFree_v2(p) };
            }
        });
    }
}

impl LocalMem for Gpu {
    fn kinds(&self) -> MemKinds {
        MemKinds::ALL
    }
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        self.must(self.on_local_stream(|s| {
            // SAFETY: the caller's contract: both ranges valid GPU-addressable memory.
            check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(dst as u64, src as u64, len, s) })
        }))
    }
    unsafe fn reduce(&self, dtype: DataType, op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize) {
        // SAFETY: the caller's contract.
        self.must(self.on_local_stream(|s| unsafe { self.launch_reduce(s, (dtype, op), dst, a, b, count) }))
    }
    unsafe fn scale(&self, dtype: DataType, dst: *mut u8, count: usize, n: usize) {
        if count == 0 {
            return;
        }
        self.must(self.on_local_stream(|s| {
            let k = self.kernels()?;
            let Some(f) = k.scale.iter().find(|(d, _)| *d == dtype).map(|(_, f)| *f) else {
                return Ok(()); // integers: avg is refused before this point
            };
            let (mut d, mut c, mut div) = (dst as u64, count as u64, n as f64);
            let mut args = [
                &mut d as *mut u64 as *mut c_void,
                &mut c as *mut u64 as *mut c_void,
                &mut div as *mut f64 as *mut c_void,
            ];
            let blocks = (count.div_ceil(256) as u32).clamp(1, k.blocks);
            // SAFETY: a loaded kernel taking (T*, u64, double); the caller's contract for dst.
            check("cuLaunchKernel", unsafe {
                sys::cuLaunchKernel(f, blocks, 1, 1, 256, 1, 1, 0, s, args.as_mut_ptr(), std::ptr::null_mut())
            })
        }))
    }
    fn scratch(&self, bytes: usize) -> Result<Scratch> {
        let _ctx = self.enter()?;
        let mut p: u64 = 0;
        // SAFETY: an out pointer; the context is current.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(8)) })?;
        let me = gpu(self.ordinal)?;
        // SAFETY: `bytes` of device memory, alive while the owner is.
        Ok(unsafe { Scratch::new(p as *mut u8, bytes.max(8), Box::new(DeviceAlloc(me, p))) })
    }
}

/// Pinned host memory, freed with its owner (on the reaper's thread).
struct Pinned(&'static Gpu, usize);

impl Drop for Pinned {
    fn drop(&mut self) {
        let (gpu, p) = (self.0, self.1);
        reap(move || {
            if let Ok(_ctx) = gpu.enter() {
                // SAFETY: allocated by cuMemHostAlloc; no copy uses it any more (the copier
                // that used it synchronised its streams when dropped, before this).
                unsafe { sys::cuMemFreeHost(p as *mut c_void) };
            }
        });
    }
}

/// Events of one direction's stream.
#[derive(Default)]
struct Events {
    started: u64,
    done: u64,
    flight: VecDeque<usize>,
    spare: Vec<usize>,
}

impl Events {
    /// Records an event after the work just queued on `stream` (of the current context);
    /// returns its number.
    fn record(&mut self, stream: sys::CUstream) -> Result<u64> {
        let ev = match self.spare.pop() {
            Some(e) => e as sys::CUevent,
            None => {
                let mut e: sys::CUevent = std::ptr::null_mut();
                // SAFETY: an out pointer; the context is current (the caller bound it).
                check("cuEventCreate", unsafe {
                    sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                })?;
                e
            }
        };
        // SAFETY: an event and a stream of this context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(ev, stream) })?;
        self.flight.push_back(ev as usize);
        self.started += 1;
        Ok(self.started - 1)
    }

    /// How many recorded events have completed (in order).
    fn completed(&mut self) -> Result<u64> {
        while let Some(&ev) = self.flight.front() {
            // SAFETY: an event of this context, recorded.
            let r = unsafe { sys::cuEventQuery(ev as sys::CUevent) };
            if r == sys::CUresult::CUDA_ERROR_NOT_READY {
                break;
            }
            check("cuEventQuery", r)?;
            self.flight.pop_front();
            self.spare.push(ev);
            self.done += 1;
        }
        Ok(self.done)
    }

    /// Waits for `stream`, then destroys the events and the stream (the context is current).
    fn end(&mut self, stream: sys::CUstream) {
        // SAFETY: a stream and events of this context; after the synchronisation nothing
        // queued on the stream runs, so the memory it touched may go.
        unsafe {
            sys::cuStreamSynchronize(stream);
            for &e in self.flight.iter().chain(&self.spare) {
                sys::cuEventDestroy_v2(e as sys::CUevent);
            }
            sys::cuStreamDestroy_v2(stream);
        }
        self.flight.clear();
        self.spare.clear();
    }
}

/// A non-blocking stream of the current context.
fn new_stream() -> Result<usize> {
    let mut st: sys::CUstream = std::ptr::null_mut();
    // SAFETY: an out pointer; the caller made the context current.
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut st, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
    })?;
    Ok(st as usize)
}

/// The copy engines of one GPU for one staged link: a stream per direction, events to tell
/// when each copy is done.
pub struct CudaCopies {
    gpu: &'static Gpu,
    streams: [usize; 2],
    events: Mutex<[Events; 2]>,
}

impl std::fmt::Debug for CudaCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaCopies({:?})", self.gpu)
    }
}

impl CudaCopies {
    /// Two non-blocking streams on `gpu`.
    pub fn new(gpu: &'static Gpu) -> Result<CudaCopies> {
        let _ctx = gpu.enter()?;
        let streams = [new_stream()?, new_stream()?];
        Ok(CudaCopies { gpu, streams, events: Mutex::new(Default::default()) })
    }

    fn stream(&self, dir: Dir) -> sys::CUstream {
        self.streams[dir as usize] as sys::CUstream
    }

    /// Records an event after the work just queued on `dir`'s stream; returns its number.
    fn record(&self, dir: Dir) -> Result<u64> {
        let mut all = self.events.lock().unwrap_or_else(|e| e.into_inner());
        all[dir as usize].record(self.stream(dir))
    }
}

impl DeviceCopies for CudaCopies {
    fn describe(&self) -> String {
        format!("{:?}", self.gpu)
    }
    fn pinned(&self, bytes: usize) -> Result<Scratch> {
        let _ctx = self.gpu.enter()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: an out pointer; the context is current.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, bytes.max(8), flags) })?;
        // SAFETY: `bytes` of pinned memory, alive while the owner is.
        Ok(unsafe { Scratch::new(p as *mut u8, bytes.max(8), Box::new(Pinned(self.gpu, p as usize))) })
    }
    unsafe fn to_host(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: the caller's contract (device source, pinned destination, both valid until
        // the copy is counted complete).
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src as u64, len, self.stream(Dir::ToHost))
        })?;
        self.record(Dir::ToHost)
    }
    unsafe fn to_device(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: the caller's contract.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst as u64, src as *const c_void, len, self.stream(Dir::ToDevice))
        })?;
        self.record(Dir::ToDevice)
    }
    unsafe fn reduce_to_device(
        &self,
        dtype: DataType,
        op: ReduceOp,
        dst: *mut u8,
        local: *const u8,
        src: *const u8,
        count: usize,
    ) -> Result<u64> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: the caller's contract; the pinned source is mapped at the same address on
        // the device (unified addressing).
        unsafe { self.gpu.launch_reduce(self.stream(Dir::ToDevice), (dtype, op), dst, local, src, count)? };
        self.record(Dir::ToDevice)
    }
    fn completed(&self, dir: Dir) -> Result<u64> {
        let mut all = self.events.lock().unwrap_or_else(|e| e.into_inner());
        all[dir as usize].completed()
    }
}

impl Drop for CudaCopies {
    fn drop(&mut self) {
        let Ok(_ctx) = self.gpu.enter() else { return };
        let all = self.events.get_mut().unwrap_or_else(|e| e.into_inner());
        for (i, &s) in self.streams.iter().enumerate() {
            all[i].end(s as sys::CUstream);
        }
    }
}

/// The GPU side of a p2p link (`oxccl_core::p2p`): CUDA IPC handles of this process's device
/// memory for the peer, the peer's memory opened here (once per allocation), and one stream
/// for the copies into it and the reductions from scratch.
///
/// CUDA IPC covers memory from `cuMemAlloc`/`cudaMalloc` (torch's caching allocator uses it);
/// memory from stream-ordered pools (`cudaMallocAsync`) is refused by `cuIpcGetMemHandle`, and
/// the error says so.
pub struct CudaIpc {
    gpu: &'static Gpu,
    stream: usize,
    events: Mutex<Events>,
    /// The peer's allocations opened here: handle, and their base address here.
    opened: std::collections::HashMap<[u8; 64], u64>,
}

impl std::fmt::Debug for CudaIpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaIpc({:?}, {} allocations opened)", self.gpu, self.opened.len())
    }
}

/// Allocations a link keeps open before it closes them all (and opens again what it needs).
const MOST_OPENED: usize = 1024;

impl CudaIpc {
    /// A stream of its own on `gpu`.
    pub fn new(gpu: &'static Gpu) -> Result<CudaIpc> {
        let _ctx = gpu.enter()?;
        Ok(CudaIpc { gpu, stream: new_stream()?, events: Mutex::new(Events::default()), opened: Default::default() })
    }

    fn record(&self) -> Result<u64> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).record(self.stream as sys::CUstream)
    }

    /// Closes every opened allocation (after the copies into them; the closes on the
    /// reaper's thread).
    fn close_all(&mut self) {
        // SAFETY: this link's own stream: waits for its copies only.
        unsafe { sys::cuStreamSynchronize(self.stream as sys::CUstream) };
        let (gpu, bases): (&'static Gpu, Vec<u64>) = (self.gpu, self.opened.drain().map(|(_, b)| b).collect());
        reap(move || {
            if let Ok(_ctx) = gpu.enter() {
                for base in bases {
                    // SAFETY: handles this process opened; nothing uses them any more.
                    unsafe { sys::cuIpcCloseMemHandle(base) };
                }
            }
        });
    }
}

impl oxccl_core::p2p::DeviceIpc for CudaIpc {
    fn describe(&self) -> String {
        format!("{:?}", self.gpu)
    }
    fn ordinal(&self) -> u32 {
        self.gpu.ordinal()
    }
    fn export(&mut self, ptr: *const u8, len: usize) -> Result<oxccl_core::p2p::IpcRef> {
        let _ctx = self.gpu.enter()?;
        let mut base: u64 = 0;
        // SAFETY: out pointer of the attribute's size (a device pointer).
        check("cuPointerGetAttribute(RANGE_START_ADDR)", unsafe {
            sys::cuPointerGetAttribute(
                &mut base as *mut u64 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                ptr as u64,
            )
        })?;
        let mut h: sys::CUipcMemHandle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: an out pointer; `base` starts an allocation of this context.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut h, base) }).map_err(|e| Error::Cuda {
            call: "cuIpcGetMemHandle",
            what: format!(
                "{e}: the buffer ({len} bytes at {ptr:p}) is in memory CUDA IPC cannot share (from a stream-ordered \
                 pool?); set OXCCL_P2P=off to stage GPU data through host memory"
            ),
        })?;
        let mut handle = [0u8; 64];
        for (d, s) in handle.iter_mut().zip(h.reserved.iter()) {
            *d = *s as u8;
        }
        Ok(oxccl_core::p2p::IpcRef { handle, offset: ptr as u64 - base })
    }
    fn import(&mut self, r: &oxccl_core::p2p::IpcRef) -> Result<*mut u8> {
        if let Some(&base) = self.opened.get(&r.handle) {
            return Ok((base + r.offset) as *mut u8);
        }
        let _ctx = self.gpu.enter()?;
        if self.opened.len() >= MOST_OPENED {
            self.close_all();
        }
        let mut h: sys::CUipcMemHandle = sys::CUipcMemHandle { reserved: [0; 64] };
        for (d, s) in h.reserved.iter_mut().zip(r.handle.iter()) {
            *d = *s as _;
        }
        let mut base: u64 = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: an out pointer; a handle another process made of its allocation.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, h, flags) })?;
        self.opened.insert(r.handle, base);
        Ok((base + r.offset) as *mut u8)
    }
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) -> Result<u64> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: the caller's contract; unified addressing tells the kinds of memory apart.
        check("cuMemcpyAsync", unsafe {
            sys::cuMemcpyAsync(dst as u64, src as u64, len, self.stream as sys::CUstream)
        })?;
        self.record()
    }
    unsafe fn reduce(
        &self,
        dtype: DataType,
        op: ReduceOp,
        dst: *mut u8,
        local: *const u8,
        src: *const u8,
        count: usize,
    ) -> Result<u64> {
        let _ctx = self.gpu.enter()?;
        // SAFETY: the caller's contract.
        unsafe { self.gpu.launch_reduce(self.stream as sys::CUstream, (dtype, op), dst, local, src, count)? };
        self.record()
    }
    fn completed(&self) -> Result<u64> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).completed()
    }
    fn scratch(&mut self, bytes: usize) -> Result<Scratch> {
        self.gpu.scratch(bytes)
    }
}

impl Drop for CudaIpc {
    fn drop(&mut self) {
        let Ok(_ctx) = self.gpu.enter() else { return };
        self.close_all();
        let ev = self.events.get_mut().unwrap_or_else(|e| e.into_inner());
        ev.end(self.stream as sys::CUstream);
    }
}

/// What a caller does on a stream of its own (OxCCL's tests of stream ordering use these on a
/// GPU host, standing in for a framework's kernels).
pub mod caller {
    use super::*;

    /// A new non-blocking stream on `gpu` (destroy it with [`destroy`]).
    pub fn stream(gpu: &'static Gpu) -> Result<usize> {
        let _ctx = gpu.enter()?;
        new_stream()
    }

    /// Queues, on `stream`, filling `count` 32-bit words at `dst` with `bits`.
    ///
    /// # Safety
    /// `dst` is device memory of `gpu` holding `count` words, alive until the stream ran it.
    pub unsafe fn fill32(gpu: &'static Gpu, stream: usize, dst: *mut u8, bits: u32, count: usize) -> Result<()> {
        let _ctx = gpu.enter()?;
        // SAFETY: the caller's contract.
        check("cuMemsetD32Async", unsafe { sys::cuMemsetD32Async(dst as u64, bits, count, stream as sys::CUstream) })
    }

    /// Queues, on `stream`, a copy of `len` bytes from device memory at `src` to host memory
    /// at `dst`.
    ///
    /// # Safety
    /// Both ranges valid until the stream ran it.
    pub unsafe fn to_host(gpu: &'static Gpu, stream: usize, dst: *mut u8, src: *const u8, len: usize) -> Result<()> {
        let _ctx = gpu.enter()?;
        // SAFETY: the caller's contract.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src as u64, len, stream as sys::CUstream)
        })
    }

    /// Waits, on the host, for everything queued on `stream`.
    pub fn sync(gpu: &'static Gpu, stream: usize) -> Result<()> {
        let _ctx = gpu.enter()?;
        // SAFETY: a stream of this context.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream as sys::CUstream) })
    }

    /// Destroys a stream made by [`stream`].
    pub fn destroy(gpu: &'static Gpu, stream: usize) {
        if let Ok(_ctx) = gpu.enter() {
            // SAFETY: a stream of this context the caller no longer uses.
            unsafe { sys::cuStreamDestroy_v2(stream as sys::CUstream) };
        }
    }
}

/// An event recorded on a caller's stream: done when the work queued before it is.
struct CudaFence(&'static Gpu, usize);

// SAFETY: an event handle, usable from any thread of the process.
unsafe impl Send for CudaFence {}

impl Fence for CudaFence {
    fn done(&mut self) -> Result<bool> {
        let _ctx = self.0.enter()?;
        // SAFETY: an event of this context, recorded when made.
        let r = unsafe { sys::cuEventQuery(self.1 as sys::CUevent) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuEventQuery", r)?;
        Ok(true)
    }
}

impl Drop for CudaFence {
    fn drop(&mut self) {
        if let Ok(_ctx) = self.0.enter() {
            // SAFETY: an event of this context; the driver destroys it once it completes.
            unsafe { sys::cuEventDestroy_v2(self.1 as sys::CUevent) };
        }
    }
}

/// One communicator's ordering on its callers' streams of one GPU: a 64-bit counter in pinned
/// host memory, mapped into the GPU. A stream is held with `cuStreamWaitValue64` (the GPU's
/// front end waits, no kernel, no host thread); where the driver does not offer stream memory
/// operations, with a host function on the stream that waits for the counter.
pub struct CudaStreamOrder {
    gpu: &'static Gpu,
    /// The counters' page (host address) and its device address: one 8-byte counter per
    /// stream the communicator was called on.
    counters: usize,
    device: u64,
    /// Which counter each stream has.
    slots: Mutex<std::collections::HashMap<StreamHandle, usize>>,
    /// The GPU takes stream waits on memory (else host functions wait).
    wait_values: std::sync::atomic::AtomicBool,
}

/// Streams one communicator can be called on (counters in its pinned page).
const STREAMS: usize = 4096;

impl std::fmt::Debug for CudaStreamOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map_or(0, |s| s.len());
        write!(f, "CudaStreamOrder({:?}, {n} streams)", self.gpu)
    }
}

impl CudaStreamOrder {
    /// A counter at 0 on `gpu`. The reduction kernels are loaded now, before any stream is
    /// held (loading a module may wait for the device).
    pub fn new(gpu: &'static Gpu) -> Result<CudaStreamOrder> {
        let _ctx = gpu.enter()?;
        if let Err(e) = gpu.kernels() {
            tracing::warn!("{gpu:?}: {e}: reductions of GPU buffers will fail");
        }
        let mut p: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: an out pointer; the context is current.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, STREAMS * 8, flags) })?;
        // SAFETY: fresh pinned memory of that size, page-aligned.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, STREAMS * 8) };
        let mut d: u64 = 0;
        // SAFETY: out pointer; `p` was allocated with DEVICEMAP.
        check("cuMemHostGetDevicePointer", unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, p, 0) })?;
        Ok(CudaStreamOrder {
            gpu,
            counters: p as usize,
            device: d,
            slots: Mutex::new(Default::default()),
            wait_values: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// `stream`'s counter (given one at first use).
    fn slot(&self, stream: StreamHandle) -> Result<usize> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let n = slots.len();
        match slots.get(&stream) {
            Some(&k) => Ok(k),
            None if n < STREAMS => {
                slots.insert(stream, n);
                Ok(n)
            }
            None => {
                Err(Error::Unsupported(format!("a communicator called on more than {STREAMS} different GPU streams")))
            }
        }
    }

    fn atomic(&self, slot: usize) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: 8-byte aligned pinned memory that lives for the process (never freed: a
        // stream may still hold on it after the communicator is gone); slot < STREAMS.
        unsafe { std::sync::atomic::AtomicU64::from_ptr((self.counters + 8 * slot) as *mut u64) }
    }
}

/// What a host function waiting on a stream needs: the counter and the value.
struct HostWait {
    counter: usize,
    seq: u64,
}

/// Runs on the driver's thread in stream order: returns once the counter reaches the value.
unsafe extern "C" fn host_wait(data: *mut c_void) {
    // SAFETY: a `HostWait` boxed by `hold`, handed over to this function, run once.
    let w = unsafe { Box::from_raw(data as *mut HostWait) };
    // SAFETY: the counter lives for the process.
    let c = unsafe { std::sync::atomic::AtomicU64::from_ptr(w.counter as *mut u64) };
    let mut nap = std::time::Duration::from_micros(2);
    // The engine releases every operation it was given, failed or not (and the communicator's
    // end releases everything), so this ends.
    while c.load(std::sync::atomic::Ordering::Acquire) < w.seq {
        std::thread::sleep(nap);
        nap = (nap * 2).min(std::time::Duration::from_micros(200));
    }
}

impl StreamOrder for CudaStreamOrder {
    fn mark(&self, stream: StreamHandle) -> Result<Box<dyn Fence>> {
        let _ctx = self.gpu.enter()?;
        let mut e: sys::CUevent = std::ptr::null_mut();
        // SAFETY: an out pointer; the context is current.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        let fence = CudaFence(self.gpu, e as usize);
        // SAFETY: the caller's stream (its contract) and an event of this context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(e, stream.0 as sys::CUstream) })?;
        Ok(Box::new(fence))
    }
    fn hold(&self, stream: StreamHandle, seq: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        let _ctx = self.gpu.enter()?;
        let s = stream.0 as sys::CUstream;
        let slot = self.slot(stream)?;
        if self.wait_values.load(Ordering::Relaxed) {
            let flags = sys::CUstreamWaitValue_flags_enum::CU_STREAM_WAIT_VALUE_GEQ as u32;
            // SAFETY: the caller's stream; the counter's device address lives for the process.
            let r = unsafe { sys::cuStreamWaitValue64_v2(s, self.device + 8 * slot as u64, seq, flags) };
            if r == sys::CUresult::CUDA_SUCCESS {
                return Ok(());
            }
            if r != sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
                return check("cuStreamWaitValue64", r);
            }
            tracing::info!("{:?}: no stream memory operations: a host function holds streams instead", self.gpu);
            self.wait_values.store(false, Ordering::Relaxed);
        }
        let data = Box::into_raw(Box::new(HostWait { counter: self.counters + 8 * slot, seq })) as *mut c_void;
        // SAFETY: the caller's stream; `host_wait` takes the box.
        let r = unsafe { sys::cuLaunchHostFunc(s, Some(host_wait), data) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: not handed over: the launch failed.
            drop(unsafe { Box::from_raw(data as *mut HostWait) });
        }
        check("cuLaunchHostFunc", r)
    }
    fn release(&self, stream: StreamHandle, seq: u64) {
        // A stream is held only after its counter has a slot (hold gave it one).
        if let Ok(slot) = self.slot(stream) {
            self.atomic(slot).fetch_max(seq, std::sync::atomic::Ordering::Release);
        }
    }
    fn released(&self, stream: StreamHandle) -> u64 {
        self.slot(stream).map_or(0, |k| self.atomic(k).load(std::sync::atomic::Ordering::Acquire))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// No Drop: every operation releases its number in order before the last reference to the
// order goes (a `Release` holds one), and the counter's page is kept for the life of the
// process (a stream may reach its wait later). Writing anything larger would be wrong:
// CU_STREAM_WAIT_VALUE_GEQ compares cyclically, so a value "behind" by more than 2^63 reads
// as not reached.

#[cfg(test)]
mod tests {
    //! These need a GPU: without one each prints `skipped: no GPU (...)` and checks only that
    //! there is none. `bench/gpu/verify.sh` runs them on a GPU host.

    use super::*;
    use oxccl_core::link::{Link, MemSlice, RecvMode, Tag};
    use oxccl_core::mem::MemKind;
    use oxccl_core::staging::{StagedLink, Staging};

    /// GPU 0, or `None` after saying why the test is skipped.
    fn gpu0() -> Option<&'static Gpu> {
        match super::super::probe() {
            Err(why) => {
                oxccl_core::testing::skip(oxccl_core::testing::Need::Gpu, format!("no GPU ({why})"));
                assert_eq!(super::super::gpu_count(), 0);
                None
            }
            Ok(_) => Some(gpu(0).expect("GPU 0")),
        }
    }

    /// Device memory holding `bytes`.
    fn upload(g: &'static Gpu, bytes: &[u8]) -> Scratch {
        let s = g.scratch(bytes.len()).unwrap();
        let _ctx = g.enter().unwrap();
        // SAFETY: `s` holds at least `bytes.len()` bytes of device memory.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(s.ptr() as u64, bytes.as_ptr() as *const c_void, bytes.len())
        })
        .unwrap();
        s
    }

    fn download(g: &'static Gpu, p: *const u8, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let _ctx = g.enter().unwrap();
        // SAFETY: `p` is device memory of at least `len` bytes.
        check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(v.as_mut_ptr() as *mut c_void, p as u64, len) }).unwrap();
        v
    }

    /// Values of every kind a type has: small, large, negative, and for floats NaN, ±inf, ±0
    /// and values that round.
    fn operands(dtype: DataType, count: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(count * dtype.size());
        for i in 0..count {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = match i % 16 {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => -0.0,
                4 => 0.0,
                _ => ((x % 20001) as f64 - 10000.0) / 7.0,
            };
            let int = x as i64;
            match dtype {
                DataType::F32 => v.extend_from_slice(&(f as f32).to_ne_bytes()),
                DataType::F64 => v.extend_from_slice(&f.to_ne_bytes()),
                DataType::F16 => v.extend_from_slice(&oxccl_core::half::f16::from_f64(f / 16.0).to_ne_bytes()),
                DataType::Bf16 => v.extend_from_slice(&oxccl_core::half::bf16::from_f64(f).to_ne_bytes()),
                DataType::I8 | DataType::U8 => v.push(int as u8),
                DataType::I32 | DataType::U32 => v.extend_from_slice(&(int as u32).to_ne_bytes()),
                DataType::I64 | DataType::U64 => v.extend_from_slice(&int.to_ne_bytes()),
            }
        }
        v
    }

    /// Every GPU reduction kernel gives, bit for bit, what the host kernel gives (NaN, infinity,
    /// signed zero, wrap-around, 16-bit rounding), and the avg scaling too.
    #[test]
    fn gpu_kernels_match_the_host_kernels_bit_for_bit() {
        let Some(g) = gpu0() else { return };
        let count = 100_003;
        let mut checked = 0;
        for dtype in DataType::ALL {
            for op in ReduceOp::ALL {
                if op.check(dtype).is_err() {
                    continue;
                }
                let a = operands(dtype, count, 1 + dtype as u64);
                let b = operands(dtype, count, 99 + op as u64);
                let mut want = vec![0u8; a.len()];
                // SAFETY: three buffers of `count` elements.
                unsafe { oxccl_core::reduce::reduce_raw(dtype, op, want.as_mut_ptr(), a.as_ptr(), b.as_ptr(), count) };
                let (da, db) = (upload(g, &a), upload(g, &b));
                let dst = g.scratch(a.len()).unwrap();
                // SAFETY: device buffers of `count` elements.
                unsafe { g.reduce(dtype, op, dst.ptr(), da.ptr(), db.ptr(), count) };
                let got = download(g, dst.ptr(), a.len());
                assert!(got == want, "{dtype} {op:?}: the GPU's result differs from the host's");
                // In place (dst = a), as reducing receives do.
                // SAFETY: as above; `a` is `dst`.
                unsafe { g.reduce(dtype, op, da.ptr(), da.ptr(), db.ptr(), count) };
                assert!(download(g, da.ptr(), a.len()) == want, "{dtype} {op:?} in place");
                if op == ReduceOp::Avg {
                    // SAFETY: `want` holds `count` elements.
                    unsafe { oxccl_core::reduce::scale_avg(dtype, want.as_mut_ptr(), count, 3) };
                    // SAFETY: device buffer of `count` elements.
                    unsafe { g.scale(dtype, dst.ptr(), count, 3) };
                    assert!(download(g, dst.ptr(), a.len()) == want, "{dtype} avg scaling");
                }
                checked += 1;
            }
        }
        println!("{checked} kernels checked against the host's on {g:?}");
        assert!(checked >= 40);
    }

    /// GPU data staged through host memory with the GPU's copy engines: a staged link pair over
    /// the simulator, device buffers on both sides, copies and reducing receives across many
    /// pieces.
    #[test]
    fn staged_links_move_device_memory_with_the_copy_engines() {
        let Some(g) = gpu0() else { return };
        let st = Staging { piece: 256 << 10, slots: 3 };
        let source = || -> Option<oxccl_core::staging::DeviceSource> {
            Some(Box::new(|n| Ok(Box::new(CudaCopies::new(gpu(n)?)?) as Box<dyn DeviceCopies>)))
        };
        let (a, b) = oxccl_core::sim::SimWorld::new(2, 4).pair(0, 1);
        let mut a = StagedLink::new(Box::new(a), source(), st).unwrap();
        let mut b = StagedLink::new(Box::new(b), source(), st).unwrap();
        let sizes = [0usize, 1, 4095, 256 << 10, (256 << 10) + 3, 10 << 20];
        let srcs: Vec<Vec<u8>> = sizes.iter().map(|&n| (0..n).map(|i| (i * 7 % 251) as u8).collect()).collect();
        let dsrc: Vec<Scratch> = srcs.iter().map(|s| upload(g, s)).collect();
        let ddst: Vec<Scratch> = sizes.iter().map(|&n| upload(g, &vec![0u8; n])).collect();
        let dev = |s: &Scratch, n: usize| {
            // SAFETY: device memory of at least `n` bytes, alive until the links are dropped.
            unsafe { MemSlice::new_in(s.ptr(), n, MemKind::Device(0)) }
        };
        for (k, &n) in sizes.iter().enumerate() {
            a.post_send(Tag(k as u64), dev(&dsrc[k], n)).unwrap();
            b.post_recv(Tag(k as u64), dev(&ddst[k], n), RecvMode::Copy).unwrap();
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while b.recvs_done() < sizes.len() as u64 || a.sends_done() < sizes.len() as u64 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end, "stuck");
        }
        for (k, &n) in sizes.iter().enumerate() {
            assert!(download(g, ddst[k].ptr(), n) == srcs[k], "message {k} ({n} bytes)");
        }
        // A reducing receive into device memory (sum of f32), in place.
        let count = 1 << 20;
        let x: Vec<u8> = (0..count).flat_map(|i| (i as f32).to_ne_bytes()).collect();
        let y: Vec<u8> = (0..count).flat_map(|i| (2.0 * i as f32).to_ne_bytes()).collect();
        let (dx, dy) = (upload(g, &x), upload(g, &y));
        a.post_send(Tag(50), dev(&dx, x.len())).unwrap();
        let local = dev(&dy, y.len());
        let mode = RecvMode::Reduce { dtype: DataType::F32, op: ReduceOp::Sum, local, mem: g };
        b.post_recv(Tag(50), local, mode).unwrap();
        while b.recvs_done() < sizes.len() as u64 + 1 {
            a.progress().unwrap();
            b.progress().unwrap();
            assert!(std::time::Instant::now() < end, "stuck");
        }
        let got = download(g, dy.ptr(), y.len());
        let want: Vec<u8> = (0..count).flat_map(|i| (3.0 * i as f32).to_ne_bytes()).collect();
        assert!(got == want, "reducing receive");
        drop((a, b));
    }

    /// A stream held for an operation does not run the work queued after the hold until the
    /// counter reaches the operation's number; a fence says when earlier work is done.
    #[test]
    fn a_held_stream_waits_for_the_release() {
        let Some(g) = gpu0() else { return };
        let order = CudaStreamOrder::new(g).unwrap();
        let _ctx = g.enter().unwrap();
        let mut s: sys::CUstream = std::ptr::null_mut();
        // SAFETY: out pointer; context current.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, 1) }).unwrap();
        let stream = StreamHandle(s as usize);
        let buf = g.scratch(1 << 20).unwrap();
        let mut fence = order.mark(stream).unwrap();
        let t = std::time::Instant::now();
        while !fence.done().unwrap() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "an empty stream's fence never completed");
        }
        order.hold(stream, 1).unwrap();
        assert_eq!(order.released(stream), 0);
        // SAFETY: device memory of 1 MiB; the caller's stream.
        check("cuMemsetD8Async", unsafe { sys::cuMemsetD8Async(buf.ptr() as u64, 7, 1 << 20, s) }).unwrap();
        let mut after = order.mark(stream).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!after.done().unwrap(), "work queued after the hold ran before the release");
        order.release(stream, 1);
        let t = std::time::Instant::now();
        while !after.done().unwrap() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "the release did not let the stream go on");
        }
        assert_eq!(download(g, buf.ptr(), 16), vec![7u8; 16]);
        drop(after);
        // SAFETY: a stream of this context, idle now.
        unsafe { sys::cuStreamDestroy_v2(s) };
    }

    /// The limits the GPU data path is measured against (bench/gpu/verify.sh): a device to
    /// device copy of 256 MiB, and pinned device-to-host then host-to-device (what staging
    /// through host memory does to every byte), each alone and both at once.
    #[test]
    #[ignore = "a benchmark: bench/gpu/verify.sh runs it on a GPU host"]
    fn gpu_copy_limits() {
        let Some(g) = gpu0() else { return };
        let n = 256usize << 20;
        let (a, b) = (g.scratch(n).unwrap(), g.scratch(n).unwrap());
        let copies = CudaCopies::new(g).unwrap();
        let h = copies.pinned(n).unwrap();
        let h2 = copies.pinned(n).unwrap();
        let time = |f: &dyn Fn()| -> f64 {
            f(); // warm-up
            let mut t: Vec<f64> = (0..5)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[2]
        };
        let sync = |s: sys::CUstream| {
            // SAFETY: a stream of this context.
            check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) }).unwrap()
        };
        let (s0, s1) = (copies.stream(Dir::ToHost), copies.stream(Dir::ToDevice));
        let dtod = time(&|| {
            // SAFETY: device and pinned buffers of n bytes, streams of this context.
            check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(b.ptr() as u64, a.ptr() as u64, n, s0) })
                .unwrap();
            sync(s0);
        });
        let d2h = time(&|| {
            // SAFETY: device and pinned buffers of n bytes, streams of this context.
            check("cuMemcpyDtoHAsync", unsafe {
                sys::cuMemcpyDtoHAsync_v2(h.ptr() as *mut c_void, a.ptr() as u64, n, s0)
            })
            .unwrap();
            sync(s0);
        });
        let h2d = time(&|| {
            // SAFETY: device and pinned buffers of n bytes, streams of this context.
            check("cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(b.ptr() as u64, h.ptr() as *const c_void, n, s1)
            })
            .unwrap();
            sync(s1);
        });
        let both = time(&|| {
            // SAFETY: device and pinned buffers of n bytes, streams of this context.
            unsafe {
                check("cuMemcpyDtoHAsync", sys::cuMemcpyDtoHAsync_v2(h.ptr() as *mut c_void, a.ptr() as u64, n, s0))
                    .unwrap();
                check("cuMemcpyHtoDAsync", sys::cuMemcpyHtoDAsync_v2(b.ptr() as u64, h2.ptr() as *const c_void, n, s1))
                    .unwrap();
            }
            sync(s0);
            sync(s1);
        });
        let gbs = |t: f64| n as f64 / t / 1e9;
        println!("gpu_copy_limits: {g:?}, 256 MiB, median of 5");
        println!("gpu_copy_limits: cuMemcpyDtoD            {:8.1} GB/s", gbs(dtod));
        println!("gpu_copy_limits: pinned device-to-host   {:8.1} GB/s", gbs(d2h));
        println!("gpu_copy_limits: pinned host-to-device   {:8.1} GB/s", gbs(h2d));
        println!("gpu_copy_limits: both directions at once {:8.1} GB/s each", gbs(both));
        println!("gpu_copy_limits: staging limit (one after the other) {:8.1} GB/s", n as f64 / (d2h + h2d) / 1e9);
        println!("gpu_copy_limits: staging limit (overlapped)          {:8.1} GB/s", gbs(both));
    }
}
