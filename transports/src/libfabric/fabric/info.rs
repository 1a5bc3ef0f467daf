//! What `fi_getinfo` offers: the providers and domains this machine has for tagged RDM
//! endpoints, with their limits.

use std::ptr::{self, NonNull};

use super::super::sys;
use super::{cstr, strerror, API_VERSION};

/// One provider/domain pair `fi_getinfo` offers for tagged RDM messaging, with the limits
/// the transport and the budget manager need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// Provider name as libfabric spells it (`efa`, `verbs;ofi_rxm`, `tcp;ofi_rxm`, `shm`).
    pub name: String,
    /// Domain (the NIC, for NIC providers).
    pub domain: String,
    /// Fabric name.
    pub fabric: String,
    /// Capability bits (FI_TAGGED, FI_RMA, ...).
    pub caps: u64,
    /// Memory-registration mode bits (FI_MR_LOCAL, FI_MR_VIRT_ADDR, ...).
    pub mr_mode: u32,
    /// Endpoints the domain supports.
    pub ep_cnt: usize,
    /// Memory registrations the domain supports.
    pub mr_cnt: usize,
    /// Largest message `fi_tinject` takes.
    pub inject_size: usize,
    /// Largest message.
    pub max_msg_size: usize,
    /// Transmit and receive queue depths.
    pub tx_size: usize,
    /// Receive queue depth.
    pub rx_size: usize,
    /// Bytes of immediate data a remote write can carry to the target's completion queue.
    pub cq_data_size: usize,
}

impl Provider {
    /// Whether the provider offers RMA writes that tell the target (remote completion data
    /// of at least 4 bytes): what net-libfabric's write rendezvous needs.
    pub fn has_rma(&self) -> bool {
        self.caps & u64::from(sys::FI_RMA) != 0
            && self.caps & u64::from(sys::FI_REMOTE_WRITE) != 0
            && self.cq_data_size >= 4
    }
    /// Whether the provider registers GPU memory (FI_HMEM: EFA with GPUDirect, shm).
    pub fn has_hmem(&self) -> bool {
        self.caps & sys::FI_HMEM != 0
    }
    /// Whether remote writes address the target by virtual address (FI_MR_VIRT_ADDR) rather
    /// than by offset into the registration.
    pub fn virt_addr(&self) -> bool {
        self.mr_mode & sys::FI_MR_VIRT_ADDR != 0
    }
    /// Largest message `fi_tinject` may send such that it is in the peer's command queue
    /// when the call returns (the peer matches it at its next progress call); 0: none. Only
    /// `shm` does that (its inject writes the message into the peer's shared queue, or says
    /// -FI_EAGAIN). Other providers (tcp;ofi_rxm,
    /// EFA) may hold injected data until a later progress call on the sending side, which
    /// nobody makes once an operation has ended: there, small sends wait for their
    /// completion like any other.
    pub fn inject_delivered(&self) -> usize {
        if self.name == "shm" {
            self.inject_size
        } else {
            0
        }
    }
    /// Whether buffers must be registered before use (FI_MR_LOCAL).
    pub fn needs_local_mr(&self) -> bool {
        self.mr_mode & sys::FI_MR_LOCAL != 0
    }
    /// The mr_mode bits by name.
    pub fn mr_mode_names(&self) -> String {
        let names = [
            (sys::FI_MR_LOCAL, "FI_MR_LOCAL"),
            (sys::FI_MR_RAW, "FI_MR_RAW"),
            (sys::FI_MR_VIRT_ADDR, "FI_MR_VIRT_ADDR"),
            (sys::FI_MR_ALLOCATED, "FI_MR_ALLOCATED"),
            (sys::FI_MR_PROV_KEY, "FI_MR_PROV_KEY"),
            (sys::FI_MR_MMU_NOTIFY, "FI_MR_MMU_NOTIFY"),
            (sys::FI_MR_ENDPOINT, "FI_MR_ENDPOINT"),
            (sys::FI_MR_HMEM, "FI_MR_HMEM"),
        ];
        let v: Vec<&str> = names.iter().filter(|(b, _)| self.mr_mode & b != 0).map(|(_, n)| *n).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join("|")
        }
    }
}

/// The mr_mode bits OxCCL can work with; a provider asking for others is not used
/// (FI_MR_ENDPOINT would need each registration bound to the endpoint: not done).
const MR_MODES: u32 =
    sys::FI_MR_LOCAL | sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY | sys::FI_MR_HMEM;

/// An owned `fi_info` list.
pub(super) struct InfoList(pub(super) NonNull<sys::fi_info>);

impl Drop for InfoList {
    fn drop(&mut self) {
        // SAFETY: the list came from fi_getinfo / fi_dupinfo and is freed once, here.
        unsafe { sys::fi_freeinfo(self.0.as_ptr()) }
    }
}

/// Capabilities asked for: tagged messages, and RMA writes with remote completion data when
/// the provider has them (asked first; then without).
const CAPS_RMA: u64 = (sys::FI_TAGGED | sys::FI_MSG | sys::FI_RMA | sys::FI_WRITE | sys::FI_REMOTE_WRITE) as u64;
const CAPS_MSG: u64 = (sys::FI_TAGGED | sys::FI_MSG) as u64;

/// Asks libfabric for every provider offering reliable datagram endpoints with `caps`. `Err`
/// says why there is none (libfabric's own words).
pub(super) fn getinfo(caps: u64) -> Result<InfoList, String> {
    // SAFETY: fi_allocinfo returns a zeroed fi_info with all attribute structs allocated, or
    // NULL; it is freed by fi_freeinfo (InfoList) below.
    let hints = NonNull::new(unsafe { sys::fi_allocinfo() }).ok_or("fi_allocinfo failed (out of memory)")?;
    let hints = InfoList(hints);
    // SAFETY: hints points to a valid fi_info whose attribute pointers fi_allocinfo set.
    unsafe {
        let h = hints.0.as_ptr();
        (*h).caps = caps;
        (*h).mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
        (*(*h).ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
        (*(*h).domain_attr).mr_mode = MR_MODES as i32;
        (*(*h).domain_attr).threading = sys::fi_threading_FI_THREAD_DOMAIN;
        (*(*h).domain_attr).data_progress = sys::fi_progress_FI_PROGRESS_MANUAL;
        (*(*h).domain_attr).resource_mgmt = sys::fi_resource_mgmt_FI_RM_ENABLED;
    }
    let mut out: *mut sys::fi_info = ptr::null_mut();
    // SAFETY: valid hints; out receives a list we own (freed by InfoList).
    let rc = unsafe { sys::fi_getinfo(API_VERSION, ptr::null(), ptr::null(), 0, hints.0.as_ptr(), &mut out) };
    if rc != 0 {
        return Err(format!("fi_getinfo: {}", strerror(rc.into())));
    }
    NonNull::new(out).map(InfoList).ok_or_else(|| "fi_getinfo returned no provider".into())
}

pub(super) fn describe(i: *const sys::fi_info) -> Provider {
    // SAFETY: i is an element of a live fi_getinfo list; its attribute pointers are valid
    // (libfabric always fills them in answers).
    unsafe {
        let d = &*(*i).domain_attr;
        let f = &*(*i).fabric_attr;
        let e = &*(*i).ep_attr;
        let t = &*(*i).tx_attr;
        let r = &*(*i).rx_attr;
        Provider {
            name: cstr(f.prov_name),
            domain: cstr(d.name),
            fabric: cstr(f.name),
            caps: (*i).caps,
            mr_mode: d.mr_mode as u32,
            ep_cnt: d.ep_cnt,
            mr_cnt: d.mr_cnt,
            inject_size: t.inject_size,
            max_msg_size: e.max_msg_size,
            tx_size: t.size,
            rx_size: r.size,
            cq_data_size: d.cq_data_size,
        }
    }
}

/// The elements of a list.
pub(super) fn each(list: &InfoList) -> impl Iterator<Item = *mut sys::fi_info> + '_ {
    std::iter::successors(Some(list.0.as_ptr()), |&p| {
        // SAFETY: p is an element of the live list; next is NULL or the next element.
        let n = unsafe { (*p).next };
        (!n.is_null()).then_some(n)
    })
}

/// Whether to ask for FI_HMEM: with the `cuda` feature, on a machine with a GPU.
pub(super) fn want_hmem() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::gpu_count() > 0
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The answers with RMA (and FI_HMEM, when `hmem` and offered), then the provider/domain
/// pairs that answer only without them.
pub(super) fn lists(hmem: bool) -> Result<Vec<InfoList>, String> {
    let hmem = hmem.then(|| getinfo(CAPS_RMA | sys::FI_HMEM).ok()).flatten();
    let mut v: Vec<InfoList> = hmem.into_iter().chain(getinfo(CAPS_RMA).ok()).collect();
    match getinfo(CAPS_MSG) {
        Ok(l) => v.push(l),
        Err(e) if v.is_empty() => return Err(e),
        Err(_) => {}
    }
    Ok(v)
}

/// Every provider/domain libfabric offers for tagged RDM messaging, in its order (each pair
/// once, with RMA when it has it).
pub fn providers() -> Result<Vec<Provider>, String> {
    let mut v: Vec<Provider> = Vec::new();
    for list in lists(want_hmem())? {
        for p in each(&list) {
            let d = describe(p);
            if !v.iter().any(|o| o.name == d.name && o.domain == d.domain) {
                v.push(d);
            }
        }
    }
    Ok(v)
}
