//! net-ibverbs as a [`Transport`]: InfiniBand and RoCE through libibverbs (feature
//! `ibverbs`). Registered with or without the feature; without it, never offered, and it
//! says why.
//!
//! The bindings and every `unsafe` are in `crate::ibverbs` (the probe: HCAs, their `max_qp`,
//! ports, link layers, GID tables; an RC queue pair as the protocol core's `RcQueue`); the
//! choice of ports (`OXCCL_IB_HCA`) and of a RoCE port's GID (`OXCCL_IB_GID_INDEX`) is in
//! [`select`]; the offer (queue pairs leased from the host's ledger, one per peer on another
//! host) and the links (the protocol core over one RC queue pair per peer, connected through
//! the store) are in `imp`. It has not run on hardware yet: it is offered only where
//! `OXCCL_NET` names it, and says so otherwise.

#[cfg(feature = "ibverbs")]
mod imp;
pub mod select;

use oxccl_core::config::{Config, Knob};
use oxccl_core::link::TransportKind;
use oxccl_core::transport::{Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Transport};
use oxccl_core::{Error, Result};

use select::HcaSpec;

const HCA: Knob = Knob {
    name: "OXCCL_IB_HCA",
    default: "",
    help: "net-ibverbs: which HCAs and ports, as NCCL_IB_HCA: name[:port],... (a name matches by prefix; \
           a leading = matches exactly; a leading ^ excludes); default: every HCA with an active port",
    agree: false,
};
const GID_INDEX: Knob = Knob {
    name: "OXCCL_IB_GID_INDEX",
    default: "auto",
    help: "net-ibverbs: the GID index of a RoCE port; auto: the first RoCE v2 entry with an IPv4 address, \
           then any routable RoCE v2 entry, then RoCE v1 (InfiniBand ports: 0)",
    agree: false,
};
static SETTINGS: [Knob; 2] = [HCA, GID_INDEX];

/// net-ibverbs' settings, as read from a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbSettings {
    /// `OXCCL_IB_HCA`.
    pub hca: HcaSpec,
    /// `OXCCL_IB_GID_INDEX`; `None`: auto.
    pub gid_index: Option<u32>,
}

impl IbSettings {
    /// The settings of `cfg`, checked.
    pub fn from_config(cfg: &Config) -> Result<IbSettings> {
        let hca = HcaSpec::parse(cfg.value(&HCA)).map_err(Error::invalid_arg)?;
        let gid_index = match cfg.value(&GID_INDEX).trim() {
            "" | "auto" | "-1" => None,
            v => Some(v.parse::<u32>().map_err(|_| {
                Error::invalid_arg(format!("OXCCL_IB_GID_INDEX={v:?}: expected auto or a GID table index"))
            })?),
        };
        Ok(IbSettings { hca, gid_index })
    }
}

/// The registered net-ibverbs transport.
#[derive(Debug)]
pub struct NetIbverbs;

/// The one value of it (registered by `oxccl`).
pub static NET_IBVERBS: NetIbverbs = NetIbverbs;

impl Transport for NetIbverbs {
    fn kind(&self) -> TransportKind {
        TransportKind::NetIbverbs
    }
    fn scope(&self) -> Scope {
        Scope::Network
    }
    fn net_name(&self) -> Option<&'static str> {
        Some("ibverbs")
    }
    fn settings(&self) -> &'static [Knob] {
        &SETTINGS
    }
    fn check_settings(&self, cfg: &Config) -> Result<()> {
        IbSettings::from_config(cfg).map(|_| ())
    }
    fn offer(&self, ctx: &OfferCtx<'_>) -> Offer {
        let s = match IbSettings::from_config(ctx.cfg) {
            Ok(s) => s,
            Err(e) => return Offer::No(e.to_string()),
        };
        #[cfg(feature = "ibverbs")]
        {
            imp::offer(&s, ctx)
        }
        #[cfg(not(feature = "ibverbs"))]
        {
            let _ = ctx;
            Offer::No(why_not_offered(&s))
        }
    }
    fn open(&self, plan: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        #[cfg(feature = "ibverbs")]
        {
            imp::open(plan, ctx)
        }
        #[cfg(not(feature = "ibverbs"))]
        {
            let _ = (plan, ctx);
            Err(Error::Unsupported("net-ibverbs: this build has no ibverbs feature".into()))
        }
    }
}

/// What stands between this machine and net-ibverbs, in words: the probe's finding (no
/// device, no usable port; or the port found), or that the build has no `ibverbs` feature.
pub fn why_not_offered(s: &IbSettings) -> String {
    #[cfg(feature = "ibverbs")]
    {
        match usable_port(s) {
            Ok(p) => format!("{p} found"),
            Err(why) => why,
        }
    }
    #[cfg(not(feature = "ibverbs"))]
    {
        let _ = s;
        "this build has no ibverbs feature (build with --features ibverbs; it needs libibverbs-dev)".into()
    }
}

/// The first port `s` allows that is active and has a GID to use, in words (`mlx5_0:1
/// (InfiniBand, LID 7, max_qp 262144)`); else why there is none.
#[cfg(feature = "ibverbs")]
pub fn usable_port(s: &IbSettings) -> std::result::Result<String, String> {
    use select::{choose_gid, LinkLayer};
    let (hcas, errors) = crate::ibverbs::probe().map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for h in &hcas {
        for p in &h.ports {
            if !s.hca.allows(&h.name, p.num) {
                seen.push(format!("{}:{} (not in OXCCL_IB_HCA)", h.name, p.num));
                continue;
            }
            if !p.active {
                seen.push(format!("{}:{} ({})", h.name, p.num, p.state));
                continue;
            }
            match choose_gid(p.link, &p.gids, s.gid_index) {
                Ok(g) => {
                    let addr = match p.link {
                        LinkLayer::InfiniBand => format!("InfiniBand, LID {}", p.lid),
                        LinkLayer::Ethernet => match p.gids.iter().find(|e| e.index == g) {
                            Some(e) => format!("RoCE, {e}"),
                            None => format!("RoCE, GID {g}"),
                        },
                    };
                    return Ok(format!("{}:{} ({addr}, max_qp {})", h.name, p.num, h.max_qp));
                }
                Err(why) => seen.push(format!("{}:{} ({why})", h.name, p.num)),
            }
        }
    }
    seen.extend(errors);
    Err(format!("no usable RDMA port: {}", seen.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let tables: [&[Knob]; 1] = [&SETTINGS];
        Config::with_knobs(&tables, |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap()
    }

    #[test]
    fn settings_are_checked_with_the_setting_named() {
        let s = IbSettings::from_config(&cfg(&[])).unwrap();
        assert_eq!((s.hca, s.gid_index), (HcaSpec::default(), None));
        let s = IbSettings::from_config(&cfg(&[("OXCCL_IB_HCA", "^=mlx5_2"), ("OXCCL_IB_GID_INDEX", "3")])).unwrap();
        assert!(s.hca.exclude && s.gid_index == Some(3));
        let e = IbSettings::from_config(&cfg(&[("OXCCL_IB_GID_INDEX", "x")])).unwrap_err().to_string();
        assert!(e.contains("OXCCL_IB_GID_INDEX=\"x\""), "{e}");
        let e = IbSettings::from_config(&cfg(&[("OXCCL_IB_HCA", "mlx5:0")])).unwrap_err().to_string();
        assert!(e.contains("OXCCL_IB_HCA"), "{e}");
    }

    /// The probe agrees with the kernel's list of RDMA devices (/sys/class/infiniband): on a
    /// machine without one (this build machine: its kernel has no RDMA at all) it says "no
    /// RDMA device" and net-ibverbs is not offered, saying so; on one with devices it lists
    /// them. Without the `ibverbs` feature it says the build lacks it.
    #[test]
    fn the_probe_says_what_rdma_devices_this_machine_has() {
        let s = IbSettings::from_config(&cfg(&[])).unwrap();
        let why = why_not_offered(&s);
        #[cfg(not(feature = "ibverbs"))]
        assert!(why.contains("no ibverbs feature"), "{why}");
        #[cfg(feature = "ibverbs")]
        {
            let mut sysfs: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            sysfs.sort();
            match crate::ibverbs::probe() {
                Err(no) => {
                    assert!(
                        sysfs.is_empty() || no.to_string().contains("no provider"),
                        "the kernel lists {sysfs:?} but the probe says: {no}"
                    );
                    assert!(no.to_string().starts_with("no RDMA device"), "{no}");
                    assert!(why.starts_with("no RDMA device"), "{why}");
                    println!("net-ibverbs here: {why}");
                }
                Ok((hcas, errors)) => {
                    let mut names: Vec<String> = hcas.iter().map(|h| h.name.clone()).collect();
                    names.sort();
                    assert!(names.iter().all(|n| sysfs.contains(n)), "probe {names:?}, kernel {sysfs:?}");
                    for h in &hcas {
                        println!("{}: max_qp {}, ports {:?}", h.name, h.max_qp, h.ports);
                    }
                    println!("errors: {errors:?}; net-ibverbs here: {why}");
                }
            }
        }
    }

    /// Where the probe finds no device, the offer says so, named in OXCCL_NET or not; where
    /// it is not named, the transport is not offered even with a device (it has not run on
    /// hardware yet), and says why.
    #[test]
    fn the_offer_says_why_it_is_not_made() {
        use oxccl_core::budget::TrafficClass;
        use oxccl_core::topo::PeerInfo;
        let peers = vec![PeerInfo::new(0, "a", 1), PeerInfo::new(1, "b", 2)];
        for net in [None, Some("ibverbs,tcp")] {
            let tables: [&[Knob]; 1] = [&SETTINGS];
            let c =
                Config::with_knobs(&tables, |k| (k == "OXCCL_NET").then(|| net.map(String::from)).flatten()).unwrap();
            let ctx = OfferCtx { cfg: &c, class: TrafficClass::Bulk, comm: "test", rank: 0, peers: &peers };
            let Offer::No(why) = NET_IBVERBS.offer(&ctx) else {
                // A machine with an RDMA device and the feature: offered where named.
                assert!(cfg!(feature = "ibverbs") && net.is_some(), "offered unnamed ({net:?})");
                continue;
            };
            let usable = cfg!(feature = "ibverbs") && why.contains(" found");
            assert!(
                why.starts_with("no RDMA device")
                    || why.starts_with("no usable RDMA port")
                    || why.contains("no ibverbs feature")
                    || (usable && net.is_none() && why.contains("only where OXCCL_NET names it")),
                "{net:?}: {why}"
            );
            println!("OXCCL_NET={net:?}: net-ibverbs not offered: {why}");
        }
    }
}
