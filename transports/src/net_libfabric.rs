//! net-libfabric as a [`Transport`]: its settings, its offer (what the NIC's endpoint budget
//! grants), and the transport opened for a communicator. Compiled with or without the
//! `libfabric` feature: without it, net-libfabric is registered but never offered, and says
//! why.

use oxccl_core::config::{parse_size, Config, Knob};
use oxccl_core::link::TransportKind;
use oxccl_core::transport::{Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Transport};
use oxccl_core::{Error, Result};

const PROVIDER: Knob = Knob {
    name: "OXCCL_LIBFABRIC_PROVIDER",
    default: "",
    help: "net-libfabric: provider name or prefix (efa, verbs, tcp, shm); default: efa, then verbs, then tcp",
    agree: false,
};
const DOMAIN: Knob = Knob {
    name: "OXCCL_LIBFABRIC_DOMAIN",
    default: "",
    help: "net-libfabric: domain (NIC) name as fi_info lists it; default: the provider's first",
    agree: false,
};
const CHUNK_BYTES: Knob = Knob {
    name: "OXCCL_LIBFABRIC_CHUNK_BYTES",
    default: "1M",
    help: "net-libfabric: largest piece of a message this rank receives (each link uses the receiver's value); \
           bigger pieces cost fewer rendezvous handshakes",
    agree: false,
};
const REGISTER: Knob = Knob {
    name: "OXCCL_LIBFABRIC_REGISTER",
    default: "auto",
    help: "net-libfabric: auto registers buffers when the provider asks (FI_MR_LOCAL); always registers every buffer",
    agree: false,
};
const RMA_BYTES: Knob = Knob {
    name: "OXCCL_LIBFABRIC_RMA_BYTES",
    default: "1M",
    help: "net-libfabric: messages of at least this size are written into the receiver's buffer with RMA \
           (fi_writedata) after it says where, when the provider offers RMA; 0: never",
    agree: false,
};
const GPU_DIRECT: Knob = Knob {
    name: "OXCCL_GPU_DIRECT",
    default: "auto",
    help: "net-libfabric: auto moves GPU buffers straight from and to device memory where the provider registers \
           it (FI_HMEM with CUDA: EFA with GPUDirect RDMA) and the peer does too; off stages GPU data through host \
           memory",
    agree: false,
};
static SETTINGS: [Knob; 6] = [PROVIDER, DOMAIN, CHUNK_BYTES, REGISTER, RMA_BYTES, GPU_DIRECT];

/// net-libfabric's settings, as read from a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibfabricSettings {
    /// `OXCCL_LIBFABRIC_PROVIDER`; `None`: efa, verbs, tcp.
    pub provider: Option<String>,
    /// `OXCCL_LIBFABRIC_DOMAIN`; `None`: the provider's first.
    pub domain: Option<String>,
    /// `OXCCL_LIBFABRIC_CHUNK_BYTES`.
    pub chunk: usize,
    /// `OXCCL_LIBFABRIC_REGISTER=always`.
    pub register_always: bool,
    /// `OXCCL_LIBFABRIC_RMA_BYTES`.
    pub rma_min: usize,
    /// `OXCCL_GPU_DIRECT` is not `off`.
    pub gpu_direct: bool,
}

impl LibfabricSettings {
    /// The settings of `cfg`, checked.
    pub fn from_config(cfg: &Config) -> Result<LibfabricSettings> {
        let text = |k: &Knob| Some(cfg.value(k).trim().to_string()).filter(|s| !s.is_empty());
        let size = |k: &Knob| {
            let v = cfg.value(k);
            parse_size(v).ok_or_else(|| {
                Error::invalid_arg(format!("{}={v:?}: expected a size such as 4M, 256K or 1048576", k.name))
            })
        };
        let register_always = match cfg.value(&REGISTER).trim() {
            "auto" => false,
            "always" => true,
            v => return Err(Error::invalid_arg(format!("OXCCL_LIBFABRIC_REGISTER={v:?}: expected auto or always"))),
        };
        let gpu_direct = match cfg.value(&GPU_DIRECT).trim().to_ascii_lowercase().as_str() {
            "auto" | "on" => true,
            "off" => false,
            v => return Err(Error::invalid_arg(format!("OXCCL_GPU_DIRECT={v:?}: expected auto or off"))),
        };
        let chunk = size(&CHUNK_BYTES)?;
        if !(4096..=1 << 30).contains(&chunk) || chunk % 64 != 0 {
            return Err(Error::invalid_arg(format!(
                "OXCCL_LIBFABRIC_CHUNK_BYTES={chunk} must be a multiple of 64 from 4K to 1G"
            )));
        }
        Ok(LibfabricSettings {
            provider: text(&PROVIDER),
            domain: text(&DOMAIN),
            chunk,
            register_always,
            rma_min: size(&RMA_BYTES)?,
            gpu_direct,
        })
    }
}

/// The registered net-libfabric transport.
#[derive(Debug)]
pub struct NetLibfabric;

/// The one value of it (registered by `oxccl`).
pub static NET_LIBFABRIC: NetLibfabric = NetLibfabric;

impl Transport for NetLibfabric {
    fn kind(&self) -> TransportKind {
        TransportKind::NetLibfabric
    }
    fn scope(&self) -> Scope {
        Scope::Network
    }
    fn net_name(&self) -> Option<&'static str> {
        Some("libfabric")
    }
    fn settings(&self) -> &'static [Knob] {
        &SETTINGS
    }
    fn check_settings(&self, cfg: &Config) -> Result<()> {
        LibfabricSettings::from_config(cfg).map(|_| ())
    }
    fn rank_keys(&self, rank: usize) -> Vec<String> {
        imp::rank_keys(rank)
    }
    fn offer(&self, ctx: &OfferCtx<'_>) -> Offer {
        match LibfabricSettings::from_config(ctx.cfg) {
            Ok(s) => imp::offer(&s, ctx),
            Err(e) => Offer::No(e.to_string()),
        }
    }
    fn open(&self, plan: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        imp::open(plan, ctx)
    }
    fn gpu_direct(&self, ctx: &OfferCtx<'_>, plan: &Plan) -> bool {
        LibfabricSettings::from_config(ctx.cfg).is_ok_and(|s| imp::gpu_direct(&s, ctx, plan))
    }
}

#[cfg(feature = "libfabric")]
mod imp {
    use std::sync::Arc;

    use oxccl_core::budget::{EndpointUse, Lease, ProviderLimits, TrafficClass};
    use oxccl_core::link::{Link, TransportKind};
    use oxccl_core::mem::MemKinds;
    use oxccl_core::proto::SMALL_HEAD;
    use oxccl_core::store::Store;
    use oxccl_core::transport::{Capabilities, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Wait};
    use oxccl_core::{Error, Result};

    use super::LibfabricSettings;
    use crate::ledger::{Ledger, Take};
    use crate::libfabric::{available, link, LibfabricConfig, LibfabricTransport, SharedEndpoint};

    /// Providers move data only when polled: a sleeping rank wakes this often.
    const NAP: std::time::Duration = std::time::Duration::from_micros(100);

    /// Whether this rank's links move its GPU's memory themselves: asked for
    /// (`OXCCL_GPU_DIRECT`), a real GPU (`OXCCL_GPU=auto`, the `cuda` feature), and an endpoint
    /// that registers memory of that GPU (FI_HMEM, tried on a small allocation).
    pub(super) fn gpu_direct(s: &LibfabricSettings, ctx: &OfferCtx<'_>, plan: &Plan) -> bool {
        let me = &ctx.peers[ctx.rank];
        let Some(plan) = plan.downcast_ref::<LfPlan>() else { return false };
        if !(s.gpu_direct && ctx.cfg.gpu == oxccl_core::config::GpuUse::Auto && me.gpus > 0) {
            return false;
        }
        match plan.endpoint.registers_gpu(me.gpu) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!(rank = ctx.rank, "net-libfabric stages GPU data through host memory: {why}");
                false
            }
        }
    }

    fn libfabric_config(s: &LibfabricSettings, class: TrafficClass, share: f64) -> LibfabricConfig {
        LibfabricConfig {
            provider: s.provider.clone(),
            domain: s.domain.clone(),
            chunk: s.chunk,
            register_always: s.register_always,
            rma_min: s.rma_min,
            class,
            share,
            nonce: 0,
            gpu: None,
        }
    }

    pub(super) fn rank_keys(rank: usize) -> Vec<String> {
        vec![crate::libfabric::addr_key(rank)]
    }

    /// The endpoint the budget gave a communicator.
    struct LfPlan {
        endpoint: Arc<SharedEndpoint>,
        info: EndpointUse,
    }

    /// A dedicated endpoint if the NIC's budget has one for the class (the lease is written
    /// to the host's ledger), else one this process already has; else the refusal in words.
    pub(super) fn offer(s: &LibfabricSettings, ctx: &OfferCtx<'_>) -> Offer {
        let config = libfabric_config(s, ctx.class, ctx.cfg.budget.share);
        let p = match available(&config) {
            Ok(p) => p,
            Err(why) => return Offer::No(why),
        };
        let limit = ctx.cfg.budget.limit(&p.domain, p.ep_cnt);
        let info = |endpoint: &SharedEndpoint, lease: Option<Lease>| EndpointUse {
            nic: p.domain.clone(),
            provider: p.name.clone(),
            endpoint: endpoint.serial(),
            dedicated: lease.is_some(),
            opened_for: endpoint.owner(),
            lease,
            limit: limit.0,
            limit_from: limit.1.to_string(),
            provider_limits: ProviderLimits {
                ep_cnt: p.ep_cnt,
                mr_cnt: p.mr_cnt,
                inject_size: p.inject_size,
                max_msg_size: p.max_msg_size,
                mr_mode: p.mr_mode_names(),
            },
        };
        let (class, comm) = (ctx.class, ctx.comm);
        let ledger = Ledger::for_config(ctx.cfg);
        match ledger.take(&p.domain, p.ep_cnt, &ctx.cfg.budget, class, comm, 1) {
            Ok(Take::Granted(guard, _)) => {
                let lease = guard.lease.clone();
                match SharedEndpoint::open(&config, Some(Box::new(guard))) {
                    Ok(endpoint) => {
                        tracing::info!(comm, %class, endpoint = %p.domain, "net-libfabric: dedicated endpoint leased");
                        Offer::Yes(Box::new(LfPlan { info: info(&endpoint, Some(lease)), endpoint }))
                    }
                    Err(e) => Offer::Refused(e.to_string()),
                }
            }
            Ok(Take::Refused(budget)) => match SharedEndpoint::find(&config) {
                Some(endpoint) => {
                    tracing::info!(
                        comm,
                        %class,
                        endpoint = %p.domain,
                        "net-libfabric: no endpoint left for this class; sharing endpoint {} of this process \
                         (opened for {})",
                        endpoint.serial(),
                        endpoint.owner()
                    );
                    Offer::Yes(Box::new(LfPlan { info: info(&endpoint, None), endpoint }))
                }
                None => Offer::Refused(budget.refusal(class, comm)),
            },
            Err(e) => Offer::Refused(e.to_string()),
        }
    }

    pub(super) fn open(plan: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        let plan = plan
            .downcast::<LfPlan>()
            .map_err(|_| Error::Internal("net-libfabric opened with another transport's plan".into()))?;
        let s = LibfabricSettings::from_config(ctx.cfg)?;
        let nonce =
            ctx.nonce.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        // GPU buffers straight from and to device memory where both ends of a pair can
        // (the registry wraps the other pairs' links in staging: their links see host memory).
        let me = &ctx.peers[ctx.rank];
        let gpu = me.gpu_direct.contains(&TransportKind::NetLibfabric).then_some(me.gpu);
        let config = LibfabricConfig { nonce, gpu, ..libfabric_config(&s, ctx.class, ctx.cfg.budget.share) };
        let transport = LibfabricTransport::on(plan.endpoint, ctx.store, ctx.rank, ctx.peers.len(), config)?;
        Ok(Box::new(Opened { transport, info: plan.info }))
    }

    /// net-libfabric opened for a communicator, with the endpoint it uses.
    struct Opened {
        transport: LibfabricTransport,
        info: EndpointUse,
    }

    impl OpenTransport for Opened {
        fn kind(&self) -> TransportKind {
            TransportKind::NetLibfabric
        }
        fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
            Ok(self.transport.connect(store, peer)?.map(|l| Box::new(l) as Box<dyn Link>))
        }
        fn capabilities(&self) -> Capabilities {
            let p = self.transport.provider();
            Capabilities {
                memory: match self.transport.gpu() {
                    Some(n) => MemKinds::HOST.with(oxccl_core::mem::MemKind::Device(n)),
                    None => MemKinds::HOST,
                },
                rma: p.has_rma() && self.transport.rma_min() > 0,
                endpoint_limit: Some(self.info.limit),
                // What a message sent whole by inject may carry after its head.
                inline_bytes: p.inject_delivered().min(SMALL_HEAD + link::INLINE).saturating_sub(SMALL_HEAD),
                ordered: true,
            }
        }
        fn wait(&self) -> Wait {
            Wait::Poll { nap: NAP }
        }
        fn endpoint(&self) -> Option<EndpointUse> {
            Some(self.info.clone())
        }
    }
}

#[cfg(not(feature = "libfabric"))]
mod imp {
    use super::*;

    const NOT_BUILT: &str = "this build has no libfabric support (cargo feature `libfabric`)";

    pub(super) fn offer(_: &LibfabricSettings, _: &OfferCtx<'_>) -> Offer {
        Offer::No(NOT_BUILT.into())
    }

    pub(super) fn gpu_direct(_: &LibfabricSettings, _: &OfferCtx<'_>, _: &Plan) -> bool {
        false
    }

    pub(super) fn rank_keys(_: usize) -> Vec<String> {
        Vec::new()
    }

    pub(super) fn open(_: Plan, _: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        Err(Error::Unsupported(NOT_BUILT.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_values_say_what_they_expect() {
        let d = LibfabricSettings::from_config(&Config::defaults()).unwrap();
        assert_eq!((d.provider, d.chunk, d.register_always, d.rma_min), (None, 1 << 20, false, 1 << 20));
        let cfg = |k: &'static str, v: &str| {
            let mut c = Config::with_knobs(&[&SETTINGS], |_| None).unwrap();
            c.set(k, v).map(|_| c)
        };
        let c = cfg("OXCCL_LIBFABRIC_REGISTER", "always").unwrap();
        assert!(LibfabricSettings::from_config(&c).unwrap().register_always);
        for (k, v, words) in [
            ("OXCCL_LIBFABRIC_REGISTER", "sometimes", "auto or always"),
            ("OXCCL_LIBFABRIC_CHUNK_BYTES", "100", "multiple of 64 from 4K"),
            ("OXCCL_LIBFABRIC_RMA_BYTES", "lots", "a size"),
        ] {
            let e = LibfabricSettings::from_config(&cfg(k, v).unwrap()).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(words), "{e}");
        }
    }
}
