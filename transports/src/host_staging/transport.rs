//! host-staging as a [`Transport`]: offered by every rank, it connects the ranks of one host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::config::{parse_size, Config, Knob};
use oxccl_core::link::{Link, TransportKind};
use oxccl_core::mem::MemKinds;
use oxccl_core::store::Store;
use oxccl_core::transport::{
    Capabilities, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Sleeper, Transport, Wait,
};
use oxccl_core::{Error, Result};

use super::{ring, Doorbells, HostStaging, HostStagingConfig};

/// `OXCCL_STAGING_BYTES`.
const STAGING_BYTES: Knob = Knob {
    name: "OXCCL_STAGING_BYTES",
    default: "4M",
    help: "host-staging: bytes of staging memory per direction per connected peer",
    agree: true,
};
/// `OXCCL_CHUNK_BYTES`.
const CHUNK_BYTES: Knob = Knob {
    name: "OXCCL_CHUNK_BYTES",
    default: "256K",
    help: "host-staging: largest piece a message is cut into inside the staging ring",
    agree: true,
};
/// `OXCCL_SINGLE_COPY_BYTES`.
const SINGLE_COPY_BYTES: Knob = Knob {
    name: "OXCCL_SINGLE_COPY_BYTES",
    default: "0",
    help: "host-staging: messages of at least this size go by one copy between the two processes' memories (the receiver reads, process_vm_readv; from 512 KiB the sender writes three quarters, process_vm_writev) instead of through the staging ring; 0: never (the default: see docs/host-staging.md for when it pays)",
    agree: false,
};
static SETTINGS: [Knob; 3] = [STAGING_BYTES, CHUNK_BYTES, SINGLE_COPY_BYTES];

/// Longest nap in `poll()` when other transports are open too (nobody rings the doorbell
/// then).
const NAP_BESIDE_OTHERS: Duration = Duration::from_millis(1);

impl HostStagingConfig {
    /// The settings of `cfg` (`OXCCL_STAGING_BYTES`, `OXCCL_CHUNK_BYTES`), checked.
    pub fn from_config(cfg: &Config) -> Result<HostStagingConfig> {
        let size = |k: &Knob| {
            let v = cfg.value(k);
            parse_size(v).ok_or_else(|| {
                Error::invalid_arg(format!("{}={v:?}: expected a size such as 4M, 256K or 1048576", k.name))
            })
        };
        let staging = size(&STAGING_BYTES)?;
        let chunk = size(&CHUNK_BYTES)?;
        if !(4096..=1 << 30).contains(&chunk) || chunk % 64 != 0 {
            return Err(Error::invalid_arg(format!(
                "OXCCL_CHUNK_BYTES={chunk} must be a multiple of 64 from 4K to 1G"
            )));
        }
        if staging % 4096 != 0 || staging > 1 << 34 || staging < 2 * chunk {
            return Err(Error::invalid_arg(format!(
                "OXCCL_STAGING_BYTES={staging} must be a multiple of 4K, at least twice OXCCL_CHUNK_BYTES={chunk} \
                 and at most 16G"
            )));
        }
        let single_copy_bytes = size(&SINGLE_COPY_BYTES)?;
        Ok(HostStagingConfig { staging_bytes: staging, chunk_bytes: chunk, single_copy_bytes })
    }
}

/// The registered host-staging transport.
#[derive(Debug)]
pub struct HostStagingTransport;

/// The one value of it (registered by `oxccl`).
pub static HOST_STAGING: HostStagingTransport = HostStagingTransport;

impl Transport for HostStagingTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::HostStaging
    }
    fn scope(&self) -> Scope {
        Scope::Host
    }
    fn settings(&self) -> &'static [Knob] {
        &SETTINGS
    }
    fn check_settings(&self, cfg: &Config) -> Result<()> {
        HostStagingConfig::from_config(cfg).map(|_| ())
    }
    fn offer(&self, _: &OfferCtx<'_>) -> Offer {
        // Shared memory between processes of one host is always there; nothing is made yet.
        Offer::Yes(Box::new(()))
    }
    fn open(&self, _: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        let cfg = HostStagingConfig::from_config(ctx.cfg)?;
        // The doorbells are shared by the ranks of this host that open host-staging (those
        // that reach each other over p2p only do not).
        let local = opening(ctx)?;
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        Ok(Box::new(HostStaging::new(ctx.store, ctx.rank, ctx.peers.len(), &local, ctx.nonce, cfg, left)?))
    }
}

/// The ranks of this host that open a transport of the host with this rank (`ctx.opening`,
/// which the registry fills in): shared set-up waits for exactly these.
pub(crate) fn opening(ctx: &OpenCtx<'_>) -> Result<Vec<usize>> {
    if ctx.opening.contains(&ctx.rank) {
        Ok(ctx.opening.to_vec())
    } else {
        Err(Error::Internal(format!(
            "rank {}: a transport of the host opened without the ranks that open it with this one ({:?})",
            ctx.rank, ctx.opening
        )))
    }
}

/// A rank asleep on its doorbell.
struct Bell {
    bells: Arc<Doorbells>,
    me: usize,
}

impl Sleeper for Bell {
    fn sleep(&self, timeout: Duration, ready: &mut dyn FnMut() -> bool) {
        self.bells.sleep(self.me, timeout, ready);
    }
}

impl OpenTransport for HostStaging {
    fn kind(&self) -> TransportKind {
        TransportKind::HostStaging
    }
    fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
        Ok(HostStaging::connect(self, store, peer)?.map(|l| Box::new(l) as Box<dyn Link>))
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            memory: MemKinds::HOST,
            rma: false,
            endpoint_limit: None,
            inline_bytes: ring::INLINE,
            ordered: true,
        }
    }
    fn wait(&self) -> Wait {
        match self.local_index[self.me] {
            Some(me) => {
                Wait::Doorbell { sleeper: Arc::new(Bell { bells: self.bells.clone(), me }), nap: NAP_BESIDE_OTHERS }
            }
            None => Wait::Poll { nap: NAP_BESIDE_OTHERS },
        }
    }
    fn close(self: Box<Self>, store: &dyn Store, deadline: Instant) {
        HostStaging::close(*self, store, deadline);
    }
    fn abort(self: Box<Self>) -> Option<Box<dyn OpenTransport>> {
        // Holds nothing others need, but the doorbells' name, which a slower rank may not
        // have mapped yet: closed with the communicator.
        Some(self)
    }
}
