//! The one module that calls libfabric: every `unsafe` block of net-libfabric is here, each
//! with its reasoning. Above it the transport sees safe handles: [`Provider`] (what
//! `fi_getinfo` offers), [`Endpoint`] (fabric, domain, address vector, completion queue and
//! one RDM endpoint), [`Mr`] (a memory registration) and [`Completion`]s.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::ptr::{self, NonNull};

use oxccl_core::mem::MemKind;

use super::sys;

mod info;
use info::{describe, each, lists, want_hmem, InfoList};
pub use info::{providers, Provider};

/// libfabric API version this code is written against (`FI_VERSION(1, 17)`; bindgen does
/// not translate the macro).
const API_VERSION: u32 = (1 << 16) | 17;

/// `-FI_EAGAIN` as the data-path calls return it.
const EAGAIN: isize = -(sys::FI_EAGAIN as isize);

/// The text of a libfabric error number.
pub fn strerror(code: i64) -> String {
    let n = code.unsigned_abs().min(i32::MAX as u64) as i32;
    // SAFETY: fi_strerror accepts any number and returns a pointer to a static string (or
    // to a buffer of its own), never NULL.
    let p = unsafe { sys::fi_strerror(n) };
    if p.is_null() {
        return format!("libfabric error {code}");
    }
    // SAFETY: non-null, NUL-terminated string owned by libfabric.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libfabric's attribute strings are NUL-terminated and live as long as the
        // fi_info they belong to, which outlives this call.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// How a registration is made: the libfabric interface for a [`MemKind`] (plus FI_HMEM on
/// host memory, which tests use to run the path GPU memory takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemIface {
    /// Host memory: `fi_mr_reg`.
    Host,
    /// Host memory through FI_HMEM (`fi_mr_regattr`, FI_HMEM_SYSTEM): the path GPU memory
    /// takes, on memory any machine has (tests).
    HmemSystem,
    /// Memory of a CUDA device (`fi_mr_regattr`, FI_HMEM_CUDA and the device ordinal).
    Cuda(u32),
}

impl MemIface {
    /// How memory of `kind` is registered.
    pub fn of(kind: MemKind) -> MemIface {
        match kind {
            MemKind::Host | MemKind::PinnedHost => MemIface::Host,
            MemKind::Device(d) => MemIface::Cuda(d),
        }
    }
}

impl std::fmt::Display for MemIface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemIface::Host => write!(f, "host memory"),
            MemIface::HmemSystem => write!(f, "host memory registered through FI_HMEM"),
            MemIface::Cuda(d) => write!(f, "memory of GPU {d}"),
        }
    }
}

/// A memory registration; deregistered on drop.
#[derive(Debug)]
pub struct Mr {
    mr: NonNull<sys::fid_mr>,
}

// SAFETY: an fid_mr handle may be used and closed from any thread; the endpoint serialises
// data-path calls (FI_THREAD_DOMAIN) under its owner's lock.
unsafe impl Send for Mr {}
// SAFETY: a shared Mr only answers desc() and key(), which read the registration's fields;
// closing happens once, in drop, when no other reference is left.
unsafe impl Sync for Mr {}

impl Mr {
    /// The descriptor to pass with data-path calls.
    pub fn desc(&self) -> *mut c_void {
        // SAFETY: live registration.
        unsafe { sys::fi_mr_desc(self.mr.as_ptr()) }
    }
    /// The key a peer names this registration by in remote writes.
    pub fn key(&self) -> u64 {
        // SAFETY: live registration.
        unsafe { sys::fi_mr_key(self.mr.as_ptr()) }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: live registration, closed once; fid is its first member.
        unsafe { sys::fi_close(&mut (*self.mr.as_ptr()).fid) };
    }
}

/// Operation context handed to libfabric. With FI_CONTEXT / FI_CONTEXT2 the provider may use
/// the first 64 bytes until the completion; `id` says whose completion it is.
#[repr(C)]
pub struct OpCtx {
    fi: sys::fi_context2,
    /// Owner's identifier for the operation.
    pub id: u64,
}

impl std::fmt::Debug for OpCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCtx").field("id", &self.id).finish()
    }
}

impl OpCtx {
    /// A context for operation `id`, on the heap (its address must not change while the
    /// operation is in flight).
    pub fn new(id: u64) -> Box<OpCtx> {
        Box::new(OpCtx { fi: sys::fi_context2::default(), id })
    }
}

/// One completion: the operation's id, and its byte count or its error.
#[derive(Debug)]
pub struct Completion {
    /// The id of the [`OpCtx`] the operation was posted with (0 for a peer's remote write).
    pub id: u64,
    /// A peer's remote write into our memory landed: the data it carried.
    pub remote: Option<u64>,
    /// Bytes received (for a send the provider may report 0); or the error in words.
    pub result: Result<usize, CqError>,
}

/// A completion-queue error entry, in words.
#[derive(Debug, Clone)]
pub struct CqError {
    /// libfabric error number (positive, FI_E*).
    pub err: i32,
    /// The provider's text for it (`fi_cq_strerror`).
    pub text: String,
    /// Whether the operation was cancelled (FI_ECANCELED).
    pub cancelled: bool,
}

/// An open RDM endpoint with its fabric, domain, address vector and completion queue.
pub struct Endpoint {
    info: InfoList,
    fabric: NonNull<sys::fid_fabric>,
    domain: NonNull<sys::fid_domain>,
    av: NonNull<sys::fid_av>,
    cq: NonNull<sys::fid_cq>,
    ep: NonNull<sys::fid_ep>,
    provider: Provider,
    name: Vec<u8>,
    /// Next key to request for a registration (providers without FI_MR_PROV_KEY need
    /// distinct keys from the caller).
    next_key: u64,
    /// Registrations made so far (what the registration cache saves is counted against it).
    pub registrations: u64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("provider", &self.provider).finish_non_exhaustive()
    }
}

// SAFETY: libfabric handles are plain pointers usable from any thread; with
// FI_THREAD_DOMAIN the caller serialises all calls on one domain, which the owner of the
// Endpoint does (it sits behind a Mutex).
unsafe impl Send for Endpoint {}

fn check(what: &str, rc: i32) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", strerror(rc.into())))
    }
}

impl Endpoint {
    /// Opens an endpoint on the first provider/domain `pick` accepts, with FI_HMEM where
    /// the provider offers it when this process can have GPU memory (the `cuda` feature
    /// and a GPU).
    pub fn open(pick: impl Fn(&Provider) -> bool, cq_size: usize) -> Result<Endpoint, String> {
        Endpoint::open_with(pick, cq_size, want_hmem())
    }

    /// As [`Endpoint::open`], asking for FI_HMEM first when `hmem` (tests use it to run
    /// the FI_HMEM path on host memory where no GPU is).
    pub fn open_with(pick: impl Fn(&Provider) -> bool, cq_size: usize, hmem: bool) -> Result<Endpoint, String> {
        let lists = lists(hmem)?;
        let p = lists.iter().flat_map(each).find(|&p| pick(&describe(p))).ok_or("no provider matched")?;
        // Keep only the chosen element (fi_dupinfo copies one, without its successors).
        // SAFETY: p is a live element; the copy is owned by InfoList.
        let info = InfoList(NonNull::new(unsafe { sys::fi_dupinfo(p) }).ok_or("fi_dupinfo failed")?);
        drop(lists);
        let provider = describe(info.0.as_ptr());
        let mut fabric = ptr::null_mut();
        // SAFETY: fabric_attr of a live fi_info; the out pointer receives an owned fabric.
        check("fi_fabric", unsafe { sys::fi_fabric((*info.0.as_ptr()).fabric_attr, &mut fabric, ptr::null_mut()) })?;
        let fabric = NonNull::new(fabric).ok_or("fi_fabric returned NULL")?;
        // From here on a failure closes what was opened (`Partial`'s drop).
        let mut part = Partial { fabric: Some(fabric), domain: None, av: None, cq: None, ep: None };
        let mut domain = ptr::null_mut();
        // SAFETY: live fabric and fi_info.
        check("fi_domain", unsafe { sys::fi_domain(fabric.as_ptr(), info.0.as_ptr(), &mut domain, ptr::null_mut()) })?;
        let domain = NonNull::new(domain).ok_or("fi_domain returned NULL")?;
        part.domain = Some(domain);
        let mut av_attr = sys::fi_av_attr { type_: sys::fi_av_type_FI_AV_TABLE, ..Default::default() };
        let mut av = ptr::null_mut();
        // SAFETY: live domain, valid attribute struct.
        check("fi_av_open", unsafe { sys::fi_av_open(domain.as_ptr(), &mut av_attr, &mut av, ptr::null_mut()) })?;
        let av = NonNull::new(av).ok_or("fi_av_open returned NULL")?;
        part.av = Some(av);
        let mut cq_attr = sys::fi_cq_attr {
            size: cq_size,
            format: sys::fi_cq_format_FI_CQ_FORMAT_TAGGED,
            wait_obj: sys::fi_wait_obj_FI_WAIT_NONE,
            ..Default::default()
        };
        let mut cq = ptr::null_mut();
        // SAFETY: live domain, valid attribute struct.
        check("fi_cq_open", unsafe { sys::fi_cq_open(domain.as_ptr(), &mut cq_attr, &mut cq, ptr::null_mut()) })?;
        let cq = NonNull::new(cq).ok_or("fi_cq_open returned NULL")?;
        part.cq = Some(cq);
        let mut ep = ptr::null_mut();
        // SAFETY: live domain and fi_info.
        check("fi_endpoint", unsafe { sys::fi_endpoint(domain.as_ptr(), info.0.as_ptr(), &mut ep, ptr::null_mut()) })?;
        let ep = NonNull::new(ep).ok_or("fi_endpoint returned NULL")?;
        part.ep = Some(ep);
        // SAFETY: live endpoint, address vector and completion queue of one domain; fid is
        // the first member of each.
        unsafe {
            check("fi_ep_bind(av)", sys::fi_ep_bind(ep.as_ptr(), &mut (*av.as_ptr()).fid, 0))?;
            check(
                "fi_ep_bind(cq)",
                sys::fi_ep_bind(ep.as_ptr(), &mut (*cq.as_ptr()).fid, u64::from(sys::FI_TRANSMIT | sys::FI_RECV)),
            )?;
            check("fi_enable", sys::fi_enable(ep.as_ptr()))?;
        }
        let mut name = vec![0u8; 256];
        let mut len = name.len();
        // SAFETY: live endpoint; name holds len bytes; libfabric writes at most len and
        // reports the real length.
        let rc = unsafe { sys::fi_getname(&mut (*ep.as_ptr()).fid, name.as_mut_ptr() as *mut c_void, &mut len) };
        check("fi_getname", rc)?;
        name.truncate(len);
        std::mem::forget(part);
        Ok(Endpoint { info, fabric, domain, av, cq, ep, provider, name, next_key: 1, registrations: 0 })
    }

    /// The provider and its limits.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// This endpoint's address, for peers to insert.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Adds a peer's address; returns its handle for data-path calls.
    pub fn insert(&mut self, addr: &[u8]) -> Result<u64, String> {
        let mut out: sys::fi_addr_t = 0;
        // SAFETY: live AV; addr is a byte string the peer's fi_getname produced (libfabric
        // reads the provider's address length from it; a short one was refused by the caller
        // comparing its length with ours).
        let n = unsafe {
            sys::fi_av_insert(self.av.as_ptr(), addr.as_ptr() as *const c_void, 1, &mut out, 0, ptr::null_mut())
        };
        if n != 1 {
            return Err(format!("fi_av_insert: {}", if n < 0 { strerror(n.into()) } else { "address refused".into() }));
        }
        Ok(out)
    }

    /// Registers `len` bytes at `ptr` for local send/receive (and remote write when
    /// `remote_write`).
    ///
    /// # Safety
    /// `ptr..ptr+len` is memory of this process that stays mapped while the registration
    /// lives.
    pub unsafe fn register(&mut self, ptr: *const u8, len: usize, remote_write: bool) -> Result<Mr, String> {
        // SAFETY: the caller's contract, passed on; host memory.
        unsafe { self.register_on(ptr, len, remote_write, MemIface::Host) }
    }

    /// As [`Endpoint::register`], for memory of the kind `mem` says: host memory with
    /// `fi_mr_reg`; through FI_HMEM (`fi_mr_regattr` with the interface and device: EFA with
    /// GPUDirect RDMA, the shm provider) otherwise, which needs an endpoint opened with
    /// FI_HMEM.
    ///
    /// # Safety
    /// As [`Endpoint::register`]; for a GPU, the range is a live device allocation of it.
    pub unsafe fn register_on(
        &mut self,
        ptr: *const u8,
        len: usize,
        remote_write: bool,
        mem: MemIface,
    ) -> Result<Mr, String> {
        let mut access = u64::from(sys::FI_SEND | sys::FI_RECV);
        if self.provider.has_rma() {
            // Any cached registration may be the source of a write.
            access |= u64::from(sys::FI_READ | sys::FI_WRITE);
        }
        if remote_write {
            access |= u64::from(sys::FI_WRITE | sys::FI_REMOTE_WRITE);
        }
        let mut mr = ptr::null_mut();
        let key = self.next_key;
        self.next_key += 1;
        let rc = match mem {
            MemIface::Host => {
                // SAFETY: live domain; the range is valid per the caller's contract.
                unsafe {
                    sys::fi_mr_reg(
                        self.domain.as_ptr(),
                        ptr as *const c_void,
                        len,
                        access,
                        0,
                        key,
                        0,
                        &mut mr,
                        ptr::null_mut(),
                    )
                }
            }
            MemIface::HmemSystem | MemIface::Cuda(_) => {
                if !self.provider.has_hmem() {
                    return Err(format!(
                        "the buffer is {mem}, and provider {} was opened without FI_HMEM",
                        self.provider.name
                    ));
                }
                let iov = libc::iovec { iov_base: ptr as *mut c_void, iov_len: len };
                let (iface, device) = match mem {
                    MemIface::Cuda(dev) => {
                        (sys::fi_hmem_iface_FI_HMEM_CUDA, sys::fi_mr_attr__bindgen_ty_1 { cuda: dev as i32 })
                    }
                    _ => (sys::fi_hmem_iface_FI_HMEM_SYSTEM, sys::fi_mr_attr__bindgen_ty_1 { reserved: 0 }),
                };
                let attr = sys::fi_mr_attr {
                    mr_iov: &iov as *const libc::iovec as *const sys::iovec,
                    iov_count: 1,
                    access,
                    requested_key: key,
                    iface,
                    device,
                    ..Default::default()
                };
                // SAFETY: live domain; attr and the iovec it points to live through the call;
                // the range is a device allocation per the caller's contract.
                unsafe { sys::fi_mr_regattr(self.domain.as_ptr(), &attr, 0, &mut mr) }
            }
        };
        check("fi_mr_reg", rc)?;
        self.registrations += 1;
        Ok(Mr { mr: NonNull::new(mr).ok_or("fi_mr_reg returned NULL")? })
    }

    /// Posts a tagged send. `Ok(false)`: the provider is busy (-FI_EAGAIN): progress, then
    /// post again.
    ///
    /// # Safety
    /// `buf..buf+len` stays valid and unmodified, and `ctx` stays at its address, until the
    /// operation's completion has been read.
    pub unsafe fn tsend(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: u64,
        tag: u64,
        ctx: *mut OpCtx,
    ) -> Result<bool, String> {
        // SAFETY: live endpoint; buffer and context per the caller's contract.
        let rc =
            unsafe { sys::fi_tsend(self.ep.as_ptr(), buf as *const c_void, len, desc, dest, tag, ctx as *mut c_void) };
        Self::posted("fi_tsend", rc)
    }

    /// Sends `buf` tagged, copied by the provider before it returns: no completion follows
    /// and the buffer is free at once. `buf.len()` must be at most the provider's
    /// `inject_size`. `Ok(false)`: -FI_EAGAIN.
    pub fn tinject(&mut self, buf: &[u8], dest: u64, tag: u64) -> Result<bool, String> {
        debug_assert!(buf.len() <= self.provider.inject_size);
        // SAFETY: live endpoint; the provider reads buf (valid for its length) during the
        // call only.
        let rc = unsafe { sys::fi_tinject(self.ep.as_ptr(), buf.as_ptr() as *const c_void, buf.len(), dest, tag) };
        Self::posted("fi_tinject", rc)
    }

    /// Posts a tagged receive of exactly `tag` from any source.
    ///
    /// # Safety
    /// `buf..buf+len` stays valid and untouched by anyone else, and `ctx` stays at its
    /// address, until the operation's completion has been read.
    pub unsafe fn trecv(
        &mut self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        tag: u64,
        ctx: *mut OpCtx,
    ) -> Result<bool, String> {
        // SAFETY: live endpoint; buffer and context per the caller's contract.
        let rc = unsafe {
            sys::fi_trecv(
                self.ep.as_ptr(),
                buf as *mut c_void,
                len,
                desc,
                u64::MAX, // FI_ADDR_UNSPEC: the tag says who sent it
                tag,
                0,
                ctx as *mut c_void,
            )
        };
        Self::posted("fi_trecv", rc)
    }

    /// Posts an RMA write of `len` bytes to the peer's registration `key` at `addr` (its
    /// virtual address, or the offset into the registration without FI_MR_VIRT_ADDR),
    /// carrying `data` to the peer's completion queue. `Ok(false)`: -FI_EAGAIN.
    ///
    /// # Safety
    /// As [`Endpoint::tsend`]: the source stays valid and unmodified and `ctx` in place until
    /// the completion has been read.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        data: u64,
        dest: u64,
        addr: u64,
        key: u64,
        ctx: *mut OpCtx,
    ) -> Result<bool, String> {
        // SAFETY: live endpoint; buffer and context per the caller's contract; a wrong
        // address or key is refused by the peer's provider (a completion error), not written.
        let rc = unsafe {
            sys::fi_writedata(
                self.ep.as_ptr(),
                buf as *const c_void,
                len,
                desc,
                data,
                dest,
                addr,
                key,
                ctx as *mut c_void,
            )
        };
        Self::posted("fi_writedata", rc)
    }

    fn posted(what: &str, rc: isize) -> Result<bool, String> {
        match rc {
            0 => Ok(true),
            EAGAIN => Ok(false),
            e => Err(format!("{what}: {}", strerror(e as i64))),
        }
    }

    /// Asks the provider to cancel a posted operation; its completion (an FI_ECANCELED error,
    /// or a normal one if it finished first) still has to be read.
    ///
    /// # Safety
    /// `ctx` is the context of an operation posted on this endpoint and not yet completed.
    pub unsafe fn cancel(&mut self, ctx: *mut OpCtx) {
        // SAFETY: live endpoint; ctx per the caller's contract.
        unsafe { sys::fi_cancel(&mut (*self.ep.as_ptr()).fid, ctx as *mut c_void) };
    }

    /// Drives the provider and reads up to `max` completions into `out`. Returns how many.
    pub fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, String> {
        self.poll_with(max, |c| out.push(c))
    }

    /// As [`Endpoint::poll`], handing each completion to `f` as it is read.
    pub fn poll_with(&mut self, max: usize, mut f: impl FnMut(Completion)) -> Result<usize, String> {
        // Not zeroed: the provider writes the first n, and only those are read (this runs on
        // every progress call; zeroing 768 bytes was a tenth of an idle poll).
        let mut entries = [const { std::mem::MaybeUninit::<sys::fi_cq_tagged_entry>::uninit() }; 16];
        let mut got = 0;
        while got < max {
            // SAFETY: live CQ; entries holds 16 tagged entries (the CQ's format).
            let n = unsafe { sys::fi_cq_read(self.cq.as_ptr(), entries.as_mut_ptr() as *mut c_void, entries.len()) };
            if n == EAGAIN {
                break;
            }
            if n == -(sys::FI_EAVAIL as isize) {
                let mut e = sys::fi_cq_err_entry::default();
                // SAFETY: live CQ; e is a valid error entry (err_data left NULL: the
                // provider points it at its own buffer).
                let r = unsafe { sys::fi_cq_readerr(self.cq.as_ptr(), &mut e, 0) };
                if r < 0 {
                    if r == EAGAIN {
                        continue;
                    }
                    return Err(format!("fi_cq_readerr: {}", strerror(r as i64)));
                }
                let mut buf = [0 as c_char; 256];
                // SAFETY: live CQ; buf holds 256 bytes; err_data as the provider gave it.
                let text = unsafe {
                    cstr(sys::fi_cq_strerror(self.cq.as_ptr(), e.prov_errno, e.err_data, buf.as_mut_ptr(), buf.len()))
                };
                let id = if e.op_context.is_null() {
                    u64::MAX
                } else {
                    // SAFETY: every operation is posted with an OpCtx as its context.
                    unsafe { (*(e.op_context as *const OpCtx)).id }
                };
                let err = CqError {
                    err: e.err,
                    text: format!("{} ({text})", strerror(e.err.into())),
                    cancelled: e.err == sys::FI_ECANCELED as i32,
                };
                f(Completion { id, remote: None, result: Err(err) });
                got += 1;
                continue;
            }
            if n < 0 {
                return Err(format!("fi_cq_read: {}", strerror(n as i64)));
            }
            for e in &entries[..n as usize] {
                // SAFETY: fi_cq_read wrote its first n entries.
                let e = unsafe { e.assume_init_ref() };
                if e.flags & u64::from(sys::FI_REMOTE_WRITE | sys::FI_REMOTE_CQ_DATA) != 0 || e.op_context.is_null() {
                    // A peer's write into our memory: no context of ours; the data says whose.
                    let remote = (e.flags & u64::from(sys::FI_REMOTE_CQ_DATA) != 0).then_some(e.data);
                    f(Completion { id: 0, remote: remote.or(Some(u64::MAX)), result: Ok(e.len) });
                    continue;
                }
                // SAFETY: every operation is posted with an OpCtx as its context.
                let id = unsafe { (*(e.op_context as *const OpCtx)).id };
                f(Completion { id, remote: None, result: Ok(e.len) });
            }
            got += n as usize;
            if (n as usize) < entries.len() {
                // The queue is drained: another read would only cost a provider progress
                // pass on the latency path.
                break;
            }
        }
        Ok(got)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: every handle is live and closed once, endpoint first (it holds references
        // to the AV and CQ), then the AV, the CQ, the domain and the fabric.
        unsafe {
            sys::fi_close(&mut (*self.ep.as_ptr()).fid);
            sys::fi_close(&mut (*self.av.as_ptr()).fid);
            sys::fi_close(&mut (*self.cq.as_ptr()).fid);
            sys::fi_close(&mut (*self.domain.as_ptr()).fid);
            sys::fi_close(&mut (*self.fabric.as_ptr()).fid);
        }
        let _ = &self.info;
    }
}

/// What `Endpoint::open` had opened when it failed: closed in reverse order.
struct Partial {
    fabric: Option<NonNull<sys::fid_fabric>>,
    domain: Option<NonNull<sys::fid_domain>>,
    av: Option<NonNull<sys::fid_av>>,
    cq: Option<NonNull<sys::fid_cq>>,
    ep: Option<NonNull<sys::fid_ep>>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        // SAFETY: each handle present is live and closed once, dependents first.
        unsafe {
            if let Some(p) = self.ep {
                sys::fi_close(&mut (*p.as_ptr()).fid);
            }
            if let Some(p) = self.av {
                sys::fi_close(&mut (*p.as_ptr()).fid);
            }
            if let Some(p) = self.cq {
                sys::fi_close(&mut (*p.as_ptr()).fid);
            }
            if let Some(p) = self.domain {
                sys::fi_close(&mut (*p.as_ptr()).fid);
            }
            if let Some(p) = self.fabric {
                sys::fi_close(&mut (*p.as_ptr()).fid);
            }
        }
    }
}
