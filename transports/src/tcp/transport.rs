//! net-tcp as a [`Transport`]: sockets between hosts, the fallback every machine has.

use std::time::Duration;

use oxccl_core::config::{parse_size, Config, Knob};
use oxccl_core::link::{Link, TransportKind};
use oxccl_core::mem::MemKinds;
use oxccl_core::store::Store;
use oxccl_core::transport::{Capabilities, Offer, OfferCtx, OpenCtx, OpenTransport, Plan, Scope, Transport, Wait};
use oxccl_core::{Error, Result};

use super::{addr_key, interface_addr, TcpConfig, TcpTransport};

const STREAMS: Knob = Knob {
    name: "OXCCL_TCP_STREAMS",
    default: "4",
    help: "net-tcp: TCP connections per link; large messages are striped across them",
    agree: true,
};
const IFNAME: Knob = Knob {
    name: "OXCCL_SOCKET_IFNAME",
    default: "",
    help: "net-tcp: interface to listen on (default: the first non-loopback IPv4 interface that is up)",
    agree: false,
};
const CHUNK_BYTES: Knob = Knob {
    name: "OXCCL_TCP_CHUNK_BYTES",
    default: "256K",
    help: "net-tcp: largest piece a message is cut into on a socket (striped pieces go to the streams in turn)",
    agree: true,
};
const LOWER_CLASS_QUEUE: Knob = Knob {
    name: "OXCCL_TCP_LOWER_CLASS_QUEUE",
    default: "16K",
    help: "net-tcp: while a higher traffic class is busy on the interface, a lower class's link keeps at most this many bytes unacknowledged in its sockets (what a higher-class message may wait behind: 16 KiB is 0.13 ms at 1 Gbit/s; raise it on fast links)",
    agree: false,
};
static SETTINGS: [Knob; 4] = [STREAMS, IFNAME, CHUNK_BYTES, LOWER_CLASS_QUEUE];

/// Longest nap in `poll()`: socket data wakes a sleeper; the nap only bounds how late a
/// deadline or an abort is seen.
const NAP: Duration = Duration::from_millis(20);

impl TcpConfig {
    /// The settings of `cfg` (`OXCCL_TCP_STREAMS`, `OXCCL_SOCKET_IFNAME`,
    /// `OXCCL_TCP_CHUNK_BYTES`, `OXCCL_TCP_LOWER_CLASS_QUEUE`), checked.
    pub fn from_config(cfg: &Config) -> Result<TcpConfig> {
        let v = cfg.value(&STREAMS);
        let streams = v.trim().parse::<usize>().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| {
            Error::invalid_arg(format!("OXCCL_TCP_STREAMS={v:?}: expected a number of connections from 1 to 64"))
        })?;
        let ifname = Some(cfg.value(&IFNAME).trim().to_string()).filter(|s| !s.is_empty());
        let v = cfg.value(&CHUNK_BYTES);
        let chunk = parse_size(v).filter(|c| (4096..=1 << 30).contains(c) && c % 64 == 0).ok_or_else(|| {
            Error::invalid_arg(format!("OXCCL_TCP_CHUNK_BYTES={v:?}: expected a multiple of 64 from 4K to 1G"))
        })?;
        let v = cfg.value(&LOWER_CLASS_QUEUE);
        let lower_queue = parse_size(v).filter(|c| (4096..=1 << 30).contains(c)).ok_or_else(|| {
            Error::invalid_arg(format!("OXCCL_TCP_LOWER_CLASS_QUEUE={v:?}: expected a size from 4K to 1G"))
        })?;
        let tls = cfg.auth.tls().map(crate::tls::Tls::load).transpose()?;
        Ok(TcpConfig {
            streams,
            chunk,
            ifname,
            priority: None,
            lower_queue,
            auth: cfg.auth.clone(),
            local_only: false,
            tls,
        })
    }
}

/// The registered net-tcp transport.
#[derive(Debug)]
pub struct NetTcp;

/// The one value of it (registered by `oxccl`).
pub static NET_TCP: NetTcp = NetTcp;

impl Transport for NetTcp {
    fn kind(&self) -> TransportKind {
        TransportKind::NetTcp
    }
    fn scope(&self) -> Scope {
        Scope::Network
    }
    fn net_name(&self) -> Option<&'static str> {
        Some("tcp")
    }
    fn fallback(&self) -> bool {
        true
    }
    fn settings(&self) -> &'static [Knob] {
        &SETTINGS
    }
    fn check_settings(&self, cfg: &Config) -> Result<()> {
        // An interface named but not there is an error at once, not a peer left unreachable.
        let c = TcpConfig::from_config(cfg)?;
        if c.ifname.is_some() {
            interface_addr(c.ifname.as_deref())?;
        }
        Ok(())
    }
    fn rank_keys(&self, rank: usize) -> Vec<String> {
        vec![addr_key(rank)]
    }
    fn offer(&self, ctx: &OfferCtx<'_>) -> Offer {
        match TcpConfig::from_config(ctx.cfg).and_then(|c| interface_addr(c.ifname.as_deref())) {
            Ok(_) => Offer::Yes(Box::new(())),
            Err(e) => Offer::No(e.to_string()),
        }
    }
    fn open(&self, _: Plan, ctx: &OpenCtx<'_>) -> Result<Box<dyn OpenTransport>> {
        let mut cfg = TcpConfig::from_config(ctx.cfg)?;
        cfg.priority = Some((ctx.class, ctx.cfg.budget.share));
        // A job on one host needs nothing beyond loopback (and no secret to be safe there).
        let here = &ctx.peers[ctx.rank].host_id;
        cfg.local_only = ctx.peers.iter().all(|p| &p.host_id == here);
        Ok(Box::new(TcpTransport::new(ctx.store, ctx.rank, ctx.peers.len(), ctx.nonce, cfg)?))
    }
}

impl OpenTransport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::NetTcp
    }
    fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<Box<dyn Link>>> {
        Ok(TcpTransport::connect(self, store, peer)?.map(|l| Box::new(l) as Box<dyn Link>))
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { memory: MemKinds::HOST, rma: false, endpoint_limit: None, inline_bytes: 0, ordered: true }
    }
    fn wait(&self) -> Wait {
        Wait::Poll { nap: NAP }
    }
    fn wait_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        // Peers still connecting knock on the listener; links on their way up.
        self.setup_fds(out);
    }
}
