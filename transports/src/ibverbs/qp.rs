//! An RC queue pair as the protocol core's [`RcQueue`]: the HCA port opened once per
//! communicator ([`Port`]: context, protection domain, the port's address), one queue pair
//! and completion queue per peer ([`IbQp`]), connected through the store with the two sides'
//! [`QpAddr`]es (INIT, then RTR with the peer's address, then RTS).
//!
//! Not run on hardware yet (no RDMA device on the machine it was written on): everything
//! above it runs over in-memory RC queue pairs (`oxccl_core::proto::mem_rc`).

use std::ffi::CStr;
use std::os::raw::c_void;
use std::sync::{Arc, Mutex};

use oxccl_core::link::{MemSlice, TransportKind};
use oxccl_core::proto::rc::{RcEvent, RcQueue};
use oxccl_core::{Error, Result};

use super::sys;
use crate::mrcache::{MrCache, Reg};
use crate::net_ibverbs::select::LinkLayer;

/// Receive work requests are numbered with this bit set (their slot below it); sends and
/// writes with their work request number.
const RECV: u64 = 1 << 63;

fn err(op: &'static str, peer: Option<usize>, what: impl Into<String>) -> Error {
    Error::Transport { transport: TransportKind::NetIbverbs, op, peer, source: what.into().into() }
}

fn os(rc: i32) -> String {
    // Verbs return an errno, its negative, or -1 with errno set.
    let code = match rc {
        -1 => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        rc => rc.abs(),
    };
    std::io::Error::from_raw_os_error(code).to_string()
}

/// What a peer needs to reach a queue pair: published through the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddr {
    /// The queue pair number.
    pub qpn: u32,
    /// The first packet sequence number.
    pub psn: u32,
    /// The port's LID (InfiniBand).
    pub lid: u16,
    /// The GID in use (RoCE; InfiniBand: zero unless routed).
    pub gid: [u8; 16],
    /// The port's active MTU (the verbs' enum value).
    pub mtu: u32,
}

impl QpAddr {
    /// 30 bytes: qpn, psn, lid, gid, mtu (little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(30);
        v.extend_from_slice(&self.qpn.to_le_bytes());
        v.extend_from_slice(&self.psn.to_le_bytes());
        v.extend_from_slice(&self.lid.to_le_bytes());
        v.extend_from_slice(&self.gid);
        v.extend_from_slice(&self.mtu.to_le_bytes());
        v
    }
    /// The address `encode` wrote, or what is wrong with the bytes.
    pub fn decode(b: &[u8]) -> std::result::Result<QpAddr, String> {
        if b.len() != 30 {
            return Err(format!("a queue pair address of {} bytes (30 expected)", b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[10..26]);
        Ok(QpAddr { qpn: u32_at(0), psn: u32_at(4), lid: u16::from_le_bytes([b[8], b[9]]), gid, mtu: u32_at(26) })
    }
}

/// An HCA port opened for a communicator: its context, protection domain and address.
#[derive(Debug)]
pub struct Port {
    ctx: *mut sys::ibv_context,
    pd: *mut sys::ibv_pd,
    /// Its number.
    pub num: u8,
    /// Its link layer.
    pub link: LinkLayer,
    /// The GID index its queue pairs use.
    pub gid_index: u32,
    lid: u16,
    gid: [u8; 16],
    mtu: u32,
    /// The HCA's name.
    pub name: String,
    /// Registrations of callers' buffers, shared by the port's queue pairs.
    cache: Mutex<MrCache<IbMr>>,
}

// SAFETY: libibverbs objects may be used from any thread; OxCCL uses each from one at a time
// (a communicator's engine).
unsafe impl Send for Port {}
// SAFETY: shared references only read the fields above; the verbs calls made through them
// (registrations, queue pair creation) are thread-safe in libibverbs.
unsafe impl Sync for Port {}

impl Port {
    /// Opens port `num` of HCA `name`, using GID `gid_index`.
    pub fn open(name: &str, num: u8, gid_index: u32) -> Result<Arc<Port>> {
        let mut n = 0;
        // SAFETY: an out pointer; the list is freed below.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(err("ibv_get_device_list", None, os(-1)));
        }
        let mut ctx = std::ptr::null_mut();
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` devices; names are NUL-terminated strings.
            let (dev, dname) = unsafe {
                let dev = *list.add(i);
                (dev, CStr::from_ptr(sys::ibv_get_device_name(dev)).to_string_lossy().into_owned())
            };
            if dname == name {
                // SAFETY: a device of the live list.
                ctx = unsafe { sys::ibv_open_device(dev) };
                if ctx.is_null() {
                    let e = os(-1);
                    // SAFETY: the list, freed once.
                    unsafe { sys::ibv_free_device_list(list) };
                    return Err(err("ibv_open_device", None, format!("{name}: {e}")));
                }
                break;
            }
        }
        // SAFETY: the list, freed once (an opened context stays valid).
        unsafe { sys::ibv_free_device_list(list) };
        if ctx.is_null() {
            return Err(err("ibv_open_device", None, format!("no RDMA device named {name}")));
        }
        let mut pa = sys::ibv_port_attr::default();
        // SAFETY: a live context; `pa` is the headers' structure.
        let rc = unsafe { sys::ibv_query_port(ctx, num, &mut pa as *mut sys::ibv_port_attr as *mut _) };
        let mut e = sys::ibv_gid_entry::default();
        let rc2 = if rc == 0 {
            // SAFETY: a live context; `e` is the headers' structure.
            unsafe { sys::ibv_query_gid_ex(ctx, u32::from(num), gid_index, &mut e, 0) }
        } else {
            rc
        };
        // SAFETY: the union's byte view is always valid.
        let gid = unsafe { e.gid.raw };
        let roce = u32::from(pa.link_layer) == sys::IBV_LINK_LAYER_ETHERNET;
        let problem = if rc != 0 {
            Some(("ibv_query_port", os(rc)))
        } else if rc2 != 0 {
            Some(("ibv_query_gid_ex", format!("GID index {gid_index}: {}", os(rc2))))
        } else if roce && gid.iter().all(|&b| b == 0) {
            Some(("ibv_query_gid_ex", format!("GID index {gid_index} is empty (the port's addresses changed?)")))
        } else {
            None
        };
        if let Some((op, what)) = problem {
            // SAFETY: opened above, closed once.
            unsafe { sys::ibv_close_device(ctx) };
            return Err(err(op, None, format!("{name}:{num}: {what}")));
        }
        // SAFETY: a live context.
        let pd = unsafe { sys::ibv_alloc_pd(ctx) };
        if pd.is_null() {
            let e = os(-1);
            // SAFETY: opened above, closed once.
            unsafe { sys::ibv_close_device(ctx) };
            return Err(err("ibv_alloc_pd", None, format!("{name}: {e}")));
        }
        let link = if u32::from(pa.link_layer) == sys::IBV_LINK_LAYER_ETHERNET {
            LinkLayer::Ethernet
        } else {
            LinkLayer::InfiniBand
        };
        Ok(Arc::new(Port {
            ctx,
            pd,
            num,
            link,
            gid_index,
            lid: pa.lid,
            gid,
            mtu: pa.active_mtu,
            name: name.to_string(),
            cache: Mutex::new(MrCache::new(256)),
        }))
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: made in `open`, released once, after every queue pair and registration
        // (they hold an Arc of the port).
        unsafe {
            sys::ibv_dealloc_pd(self.pd);
            sys::ibv_close_device(self.ctx);
        }
    }
}

/// A memory registration; deregistered on drop. It holds no reference to its port: those in
/// the port's cache go with the port (before its protection domain), and the others are
/// held by queue pairs' users, which the port outlives (each queue pair holds it).
#[derive(Debug)]
pub struct IbMr {
    mr: *mut sys::ibv_mr,
}

// SAFETY: a registration handle may be used and released from any thread.
unsafe impl Send for IbMr {}
// SAFETY: shared references only read its keys.
unsafe impl Sync for IbMr {}

impl Drop for IbMr {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, released once.
        unsafe { sys::ibv_dereg_mr(self.mr) };
    }
}

/// One RC queue pair to one peer, with its completion queue.
pub struct IbQp {
    port: Arc<Port>,
    cq: *mut sys::ibv_cq,
    qp: *mut sys::ibv_qp,
    peer: usize,
    psn: u32,
    wc: Vec<sys::ibv_wc>,
}

// SAFETY: as for `Port`: used by one thread at a time.
unsafe impl Send for IbQp {}

impl std::fmt::Debug for IbQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IbQp").field("port", &self.port.name).field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl IbQp {
    /// A queue pair to `peer` on `port` with `send_depth` send and `slots` receive work
    /// requests, in INIT.
    pub fn create(port: &Arc<Port>, peer: usize, send_depth: u32, slots: u32) -> Result<IbQp> {
        // Room for every completion that can be outstanding: sends (providers may round the
        // send queue up), receives, and a margin.
        let cqe = (2 * send_depth + slots + 16) as i32;
        // SAFETY: a live context; no channel, no context pointer.
        let cq = unsafe { sys::ibv_create_cq(port.ctx, cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(err("ibv_create_cq", Some(peer), os(-1)));
        }
        let mut init = sys::ibv_qp_init_attr {
            send_cq: cq,
            recv_cq: cq,
            qp_type: sys::IBV_QPT_RC,
            cap: sys::ibv_qp_cap {
                max_send_wr: send_depth,
                max_recv_wr: slots,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            ..Default::default()
        };
        // SAFETY: a live protection domain; `init` is the headers' structure.
        let qp = unsafe { sys::ibv_create_qp(port.pd, &mut init) };
        if qp.is_null() {
            let e = os(-1);
            // SAFETY: made above, destroyed once.
            unsafe { sys::ibv_destroy_cq(cq) };
            return Err(err("ibv_create_qp", Some(peer), e));
        }
        // A random first sequence number (no two incarnations of a pair start alike).
        let psn = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
            ^ std::process::id())
            & 0xFF_FFFF;
        let q = IbQp { port: port.clone(), cq, qp, peer, psn, wc: vec![sys::ibv_wc::default(); 32] };
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: port.num,
            qp_access_flags: sys::IBV_ACCESS_REMOTE_WRITE | sys::IBV_ACCESS_LOCAL_WRITE,
            ..Default::default()
        };
        let mask = sys::IBV_QP_STATE | sys::IBV_QP_PKEY_INDEX | sys::IBV_QP_PORT | sys::IBV_QP_ACCESS_FLAGS;
        q.modify(&mut a, mask, "INIT")?;
        Ok(q)
    }

    fn modify(&self, a: &mut sys::ibv_qp_attr, mask: u32, to: &str) -> Result<()> {
        // SAFETY: a live queue pair; `a` is the headers' structure.
        let rc = unsafe { sys::ibv_modify_qp(self.qp, a, mask as i32) };
        if rc != 0 {
            return Err(err("ibv_modify_qp", Some(self.peer), format!("to {to}: {}", os(rc))));
        }
        Ok(())
    }

    /// What the peer needs to connect to this queue pair.
    pub fn addr(&self) -> QpAddr {
        // SAFETY: a live queue pair; its number never changes.
        let qpn = unsafe { (*self.qp).qp_num };
        QpAddr { qpn, psn: self.psn, lid: self.port.lid, gid: self.port.gid, mtu: self.port.mtu }
    }

    /// Connects to the peer's queue pair: RTR, then RTS.
    pub fn connect(&mut self, remote: &QpAddr) -> Result<()> {
        let mut ah = sys::ibv_ah_attr { dlid: remote.lid, sl: 0, port_num: self.port.num, ..Default::default() };
        if self.port.link == LinkLayer::Ethernet || remote.gid.iter().any(|&b| b != 0) && remote.lid == 0 {
            ah.is_global = 1;
            ah.grh.dgid = sys::ibv_gid { raw: remote.gid };
            ah.grh.sgid_index = self.port.gid_index as u8;
            ah.grh.hop_limit = 255;
        }
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_RTR,
            path_mtu: self.port.mtu.min(remote.mtu),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ah,
            ..Default::default()
        };
        let mask = sys::IBV_QP_STATE
            | sys::IBV_QP_AV
            | sys::IBV_QP_PATH_MTU
            | sys::IBV_QP_DEST_QPN
            | sys::IBV_QP_RQ_PSN
            | sys::IBV_QP_MAX_DEST_RD_ATOMIC
            | sys::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask, "RTR")?;
        let mut a = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_RTS,
            // 4.096 us * 2^18 (about 1 s) per try, as NCCL's default.
            timeout: 18,
            retry_cnt: 7,
            // 7: retry forever while the receiver has no receive posted (it posts again as it
            // empties its slots).
            rnr_retry: 7,
            sq_psn: self.psn,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = sys::IBV_QP_STATE
            | sys::IBV_QP_TIMEOUT
            | sys::IBV_QP_RETRY_CNT
            | sys::IBV_QP_RNR_RETRY
            | sys::IBV_QP_SQ_PSN
            | sys::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask, "RTS")
    }

    /// Posts one signalled work request with immediate `imm` of `len` bytes at `buf`
    /// (`opcode`: a send, or an RDMA write to `target`).
    fn post_imm(
        &mut self,
        (buf, len, desc): (*const u8, usize, *mut c_void),
        opcode: sys::ibv_wr_opcode,
        imm: u32,
        wr: u64,
        target: Option<(u64, u32)>,
    ) -> Result<bool> {
        let mut sge = sys::ibv_sge { addr: buf as u64, length: len as u32, lkey: desc as usize as u32 };
        let mut w = sys::ibv_send_wr {
            wr_id: wr,
            sg_list: &mut sge,
            num_sge: i32::from(len > 0),
            opcode,
            send_flags: sys::IBV_SEND_SIGNALED,
            __bindgen_anon_1: sys::ibv_send_wr__bindgen_ty_1 { imm_data: imm.to_be() },
            ..Default::default()
        };
        if let Some((remote_addr, rkey)) = target {
            w.wr = sys::ibv_send_wr__bindgen_ty_2 {
                rdma: sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey },
            };
        }
        self.post(&mut w)
    }

    fn post(&mut self, wr: &mut sys::ibv_send_wr) -> Result<bool> {
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live queue pair; `wr` and its one scatter entry are valid for the call
        // (the verbs copy them); the memory they name is the caller's (RcQueue contract).
        let rc = unsafe { sys::ibv_post_send(self.qp, wr, &mut bad) };
        match rc {
            0 => Ok(true),
            // The send queue is full (mlx5 returns ENOMEM, some providers -ENOMEM).
            libc::ENOMEM | -12 => Ok(false),
            rc => Err(err("ibv_post_send", Some(self.peer), os(rc))),
        }
    }
}

impl Drop for IbQp {
    fn drop(&mut self) {
        // SAFETY: made in `create`, destroyed once, the queue pair before its completion
        // queue (outstanding work requests are flushed).
        unsafe {
            sys::ibv_destroy_qp(self.qp);
            sys::ibv_destroy_cq(self.cq);
        }
    }
}

impl IbQp {
    /// A new registration of `len` bytes at `ptr` (remote writes too, when `remote`).
    fn reg_mr(port: &Port, peer: usize, ptr: *const u8, len: usize, remote: bool) -> std::result::Result<IbMr, String> {
        let mut access = sys::IBV_ACCESS_LOCAL_WRITE;
        if remote {
            access |= sys::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: a live protection domain; the caller keeps the range mapped while the
        // registration lives.
        let mr = unsafe { sys::ibv_reg_mr(port.pd, ptr as *mut c_void, len.max(1), access as i32) };
        if mr.is_null() {
            return Err(format!("ibv_reg_mr of {len} bytes for rank {peer}: {}", os(-1)));
        }
        Ok(IbMr { mr })
    }
}

impl RcQueue for IbQp {
    type Mr = Reg<IbMr>;
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<Reg<IbMr>> {
        let (port, peer) = (&self.port, self.peer);
        let mut cache = port.cache.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the slice stays valid until its operation ends (MemSlice contract), and
        // `op_end` lets the cache's idle registrations of it go then; whole pages of it are
        // mapped while it is.
        unsafe { cache.get(s.ptr(), s.len(), s.kind(), remote, |p, l, r, _| Self::reg_mr(port, peer, p, l, r)) }
            .map_err(|e| err("ibv_reg_mr", Some(peer), e))
    }
    fn desc(mr: &Reg<IbMr>) -> *mut c_void {
        // SAFETY: a live registration; its key never changes.
        unsafe { (*mr.mr.mr).lkey as usize as *mut c_void }
    }
    fn rma_target(&self, mr: &Reg<IbMr>, s: MemSlice) -> (u64, u64) {
        // SAFETY: as above. RC writes name virtual addresses.
        (s.ptr() as u64, u64::from(unsafe { (*mr.mr.mr).rkey }))
    }
    fn op_end(&mut self) {
        self.port.cache.lock().unwrap_or_else(|e| e.into_inner()).release_idle();
    }
    unsafe fn post_slot(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, slot: u32) -> Result<()> {
        let mut sge = sys::ibv_sge { addr: buf as u64, length: len as u32, lkey: desc as usize as u32 };
        let mut wr =
            sys::ibv_recv_wr { wr_id: RECV | u64::from(slot), sg_list: &mut sge, num_sge: 1, ..Default::default() };
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live queue pair; the slot is registered memory the caller keeps.
        let rc = unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(err("ibv_post_recv", Some(self.peer), os(rc)));
        }
        Ok(())
    }
    unsafe fn send_imm(&mut self, buf: *const u8, len: usize, desc: *mut c_void, imm: u32, wr: u64) -> Result<bool> {
        self.post_imm((buf, len, desc), sys::IBV_WR_SEND_WITH_IMM, imm, wr, None)
    }
    unsafe fn write_imm(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        addr: u64,
        key: u64,
        imm: u32,
        wr: u64,
    ) -> Result<bool> {
        self.post_imm((buf, len, desc), sys::IBV_WR_RDMA_WRITE_WITH_IMM, imm, wr, Some((addr, key as u32)))
    }
    fn poll(&mut self, out: &mut Vec<RcEvent>) {
        loop {
            // SAFETY: a live completion queue; `wc` holds as many entries as asked for.
            let n = unsafe { sys::ibv_poll_cq(self.cq, self.wc.len() as i32, self.wc.as_mut_ptr()) };
            if n < 0 {
                // The completion queue failed: the queue pair receives nothing more.
                let result = Err(format!("ibv_poll_cq failed ({n})"));
                out.push(RcEvent::Received { slot: u32::MAX, imm: 0, result });
                return;
            }
            if n == 0 {
                return;
            }
            for w in &self.wc[..n as usize] {
                let result = if w.status == sys::IBV_WC_SUCCESS {
                    Ok(w.byte_len as usize)
                } else {
                    // SAFETY: the verbs' static, NUL-terminated status string.
                    let s = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(w.status)) };
                    Err(format!("{} (status {}, vendor error {:#x})", s.to_string_lossy(), w.status, w.vendor_err))
                };
                // The immediate only where the completion carries one (an error completion's
                // opcode, length and immediate are undefined).
                let imm = if w.status == sys::IBV_WC_SUCCESS && w.wc_flags & sys::IBV_WC_WITH_IMM != 0 {
                    // SAFETY: the union's immediate view, valid with IBV_WC_WITH_IMM.
                    u32::from_be(unsafe { w.__bindgen_anon_1.imm_data })
                } else {
                    0
                };
                if w.wr_id & RECV != 0 {
                    let slot = (w.wr_id & !RECV) as u32;
                    if w.status == sys::IBV_WC_SUCCESS && w.opcode == sys::IBV_WC_RECV_RDMA_WITH_IMM {
                        out.push(RcEvent::Written { slot, imm, result });
                    } else {
                        out.push(RcEvent::Received { slot, imm, result });
                    }
                } else {
                    out.push(RcEvent::Sent { wr: w.wr_id, result });
                }
            }
            if (n as usize) < self.wc.len() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pair_addresses_go_through_the_store_whole() {
        let a = QpAddr { qpn: 0x12_3456, psn: 0xab_cdef, lid: 7, gid: [9; 16], mtu: 3 };
        assert_eq!(QpAddr::decode(&a.encode()), Ok(a));
        assert!(QpAddr::decode(&[0; 29]).unwrap_err().contains("29 bytes"));
    }
}
