//! `p2p` as a [`Transport`]: GPU to GPU between ranks of one host whose GPUs reach each other
//! (the same GPU, or GPUs that `cuDeviceCanAccessPeer` says are peers), through CUDA IPC.
//!
//! Its links are [`P2pLink`]s: the receiver hands the sender its buffer's CUDA IPC handle,
//! the sender's copy engine writes the buffer, and says done ([`oxccl_core::p2p`] has the
//! protocol). Those small control messages, and messages between host buffers, travel over
//! shared-memory rings of its own (host-staging's ring, with its own store keys, files and
//! doorbells), so a communicator in which every pair is p2p opens no host-staging transport.
//!
//! Offered where this rank has a GPU, the build has CUDA and `OXCCL_P2P` is not `off`
//! ([`PeerInfo::p2p`]); it connects two ranks of one host in different processes (CUDA IPC
//! opens another process's memory only) whose GPUs reach each other both ways, as their
//! published PCI bus ids say. OxCCL's own tests run it on the simulated GPU
//! (`OXCCL_GPU=simulated`, the `simulated-gpu` feature), whose "IPC" is a pointer: there it
//! connects ranks of one process only.

use std::time::Instant;

use oxccl_core::config::{Config, GpuUse};
use oxccl_core::link::{Link, TransportKind};
use oxccl_core::mem::{MemKind, MemKinds};
use oxccl_core::p2p::{DeviceIpc, P2pLink};
use oxccl_core::store::Store;
use oxccl_core::topo::PeerInfo;
use oxccl_core::transport::{Capabilities, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Transport, Wait};
use oxccl_core::{Error, Result};

use crate::host_staging::{HostStaging, HostStagingConfig, Names};

/// The PCI bus id a rank on the simulated GPU publishes: the GPU "of process `pid`" (its
/// memory is the process's own).
pub fn simulated_bus(pid: u32) -> String {
    format!("simulated:{pid}")
}

/// The registered p2p transport.
#[derive(Debug)]
pub struct P2pTransport;

/// The one value of it (registered by `oxccl`, first: it is preferred where it connects).
pub static P2P: P2pTransport = P2pTransport;

/// Whether `a`'s GPU reaches `b`'s memory: `b`'s GPU is among those `a` can open.
fn reaches(a: &PeerInfo, b: &PeerInfo) -> bool {
    !b.gpu_bus.is_empty() && a.gpu_reach.contains(&b.gpu_bus)
}

impl Transport for P2pTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::P2p
    }
    fn scope(&self) -> Scope {
        Scope::Host
    }
    fn can_connect(&self, me: &PeerInfo, peer: &PeerInfo) -> bool {
        let same_process = me.pid == peer.pid && me.pid_space == peer.pid_space;
        // CUDA IPC opens memory of other processes only; the simulated GPU's handles are
        // pointers, good in their own process only.
        let ipc_works = if me.gpu_bus.starts_with("simulated:") { same_process } else { !same_process };
        me.host_id == peer.host_id && me.p2p && peer.p2p && ipc_works && reaches(me, peer) && reaches(peer, me)
    }
    fn offer(&self, ctx: &OfferCtx<'_>) -> Offer {
        let me = &ctx.peers[ctx.rank];
        if me.p2p {
            Offer::Yes(Box::new(()))
        } else if !ctx.cfg.p2p {
            Offer::No("OXCCL_P2P=off".into())
        } else {
            Offer::No("no GPU here for p2p".into())
        }
    }
    fn open(&self, _: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        let cfg = HostStagingConfig::from_config(ctx.cfg)?;
        // The control rings carry 96-byte messages and host buffers' messages: host-staging's
        // settings for the latter.
        let local = crate::host_staging::transport::opening(ctx)?;
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        let nonce = format!("{}-p2p", ctx.nonce);
        let names = Names { keys: "p2p", nonce: &nonce };
        let ctl = HostStaging::named(names, ctx.store, (ctx.rank, ctx.peers.len()), &local, cfg, left)?;
        let gpu = ctx.peers[ctx.rank].gpu;
        Ok(Box::new(P2pOpen { ctl, gpu, sim: ctx.cfg.gpu == GpuUse::Simulated, rank: ctx.rank }))
    }
}

/// p2p opened for one communicator on one rank.
#[derive(Debug)]
struct P2pOpen {
    /// The control rings.
    ctl: HostStaging,
    /// This rank's GPU.
    gpu: u32,
    /// On the simulated GPU.
    sim: bool,
    rank: usize,
}

impl P2pOpen {
    /// This rank's GPU, as a link reaches it.
    fn device(&self) -> Result<Box<dyn DeviceIpc>> {
        #[cfg(feature = "simulated-gpu")]
        if self.sim {
            return Ok(Box::new(oxccl_core::p2p::fake::FakeIpc::new(self.rank as u64 + 1, 2)));
        }
        #[cfg(feature = "cuda")]
        if !self.sim {
            let g = crate::cuda::gpu::gpu(self.gpu)?;
            return Ok(Box::new(crate::cuda::gpu::CudaIpc::new(g)?));
        }
        Err(Error::Internal(format!(
            "rank {} opened p2p for GPU {} without {} GPU support in this build",
            self.rank,
            self.gpu,
            if self.sim { "simulated" } else { "CUDA" }
        )))
    }
}

impl OpenTransport for P2pOpen {
    fn kind(&self) -> TransportKind {
        TransportKind::P2p
    }
    fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
        let Some(ctl) = self.ctl.connect(store, peer)? else { return Ok(None) };
        Ok(Some(Box::new(P2pLink::new(Box::new(ctl), self.device()?, self.rank))))
    }
    fn capabilities(&self) -> Capabilities {
        let ctl = OpenTransport::capabilities(&self.ctl);
        Capabilities { memory: MemKinds::HOST.with(MemKind::Device(self.gpu)), ..ctl }
    }
    fn wait(&self) -> Wait {
        OpenTransport::wait(&self.ctl)
    }
    fn close(self: Box<Self>, store: &dyn Store, deadline: Instant) {
        self.ctl.close(store, deadline);
    }
    fn abort(self: Box<Self>) -> Option<Box<dyn OpenTransport>> {
        // As host-staging: the doorbells' name may still be needed by a slower rank.
        Some(self)
    }
}

/// Whether `cfg` lets this rank offer p2p with `gpus` GPUs: `OXCCL_P2P` on, and a real GPU
/// (`OXCCL_GPU=auto`) or the simulated one.
pub fn offered_here(cfg: &Config, gpus: u32) -> bool {
    cfg.p2p && gpus > 0 && matches!(cfg.gpu, GpuUse::Auto | GpuUse::Simulated)
}
