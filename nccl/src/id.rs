//! The unique id: what `ncclGetUniqueId` hands the ranks, and how they meet through it.
//!
//! The process that calls `ncclGetUniqueId` hosts OxCCL's TCP rendezvous store (once per
//! process, for as long as it lives), as NCCL's root hosts its bootstrap. The id carries the
//! store's address and a random job id; every communicator made from the id keeps its keys
//! under that job id, so one store serves many ids.
//!
//! Layout of the 128 bytes: `OXCCLID1` (8), job id (16), address family 4 or 6 (1), port
//! (2, big-endian), address (16; IPv4 in the first 4), zeros.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxccl::bootstrap::{TcpStore, TcpStoreServer};
use oxccl::Store;
use oxccl_core::store::PrefixStore;

use crate::types::{ncclUniqueId, Fail, NCCL_UNIQUE_ID_BYTES};

const MAGIC: &[u8; 8] = b"OXCCLID1";

/// The store this process hosts, and the address it gives out.
static HOSTED: Mutex<Option<(TcpStoreServer, SocketAddr)>> = Mutex::new(None);

/// Where this process's store listens and what address the ids name: `OXCCL_NCCL_ADDR`
/// (`host` or `host:port`) when set, else the address of `OXCCL_SOCKET_IFNAME` (or of the
/// first non-loopback interface that is up, as net-tcp picks) on a port the system chooses.
fn advertised() -> Result<SocketAddr, Fail> {
    if let Ok(v) = std::env::var("OXCCL_NCCL_ADDR") {
        let v = v.trim();
        if let Ok(sa) = v.parse::<SocketAddr>() {
            return Ok(sa);
        }
        if let Ok(ip) = v.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, 0));
        }
        return Err(Fail::arg(format!("OXCCL_NCCL_ADDR={v:?}: expected an IP address, or address:port")));
    }
    let ifname = std::env::var("OXCCL_SOCKET_IFNAME").ok().filter(|s| !s.is_empty());
    let ip = oxccl_transports::tcp::interface_addr(ifname.as_deref())?;
    Ok(SocketAddr::new(ip, 0))
}

/// A new id: this process's store (started on first use) and a fresh job id.
pub fn new_id() -> Result<ncclUniqueId, Fail> {
    let mut hosted = HOSTED.lock().unwrap_or_else(|e| e.into_inner());
    let addr = match &*hosted {
        Some((_, a)) => *a,
        None => {
            let want = advertised()?;
            let any: IpAddr = if want.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
            let bind = if want.ip().is_loopback() { want.ip() } else { any };
            let server = TcpStoreServer::start(SocketAddr::new(bind, want.port()))?;
            let addr = SocketAddr::new(want.ip(), server.local_addr().port());
            tracing::info!(%addr, "ncclGetUniqueId: this process hosts the rendezvous store");
            *hosted = Some((server, addr));
            addr
        }
    };
    let mut job = [0u8; 16];
    random(&mut job)?;
    Ok(encode(addr, &job))
}

fn random(out: &mut [u8]) -> Result<(), Fail> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(out))
        .map_err(|e| Fail::new(crate::types::ncclSystemError, format!("reading /dev/urandom for a job id: {e}")))
}

/// The id of the store at `addr` and job `job`.
pub fn encode(addr: SocketAddr, job: &[u8; 16]) -> ncclUniqueId {
    let mut b = [0u8; NCCL_UNIQUE_ID_BYTES];
    b[..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(job);
    b[25..27].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            b[24] = 4;
            b[27..31].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            b[24] = 6;
            b[27..43].copy_from_slice(&ip.octets());
        }
    }
    ncclUniqueId { internal: b.map(|x| x as std::ffi::c_char) }
}

/// The store address and job id an id carries.
pub fn decode(id: &ncclUniqueId) -> Result<(SocketAddr, [u8; 16]), Fail> {
    let b = id.internal.map(|x| x as u8);
    if &b[..8] != MAGIC {
        return Err(Fail::arg(
            "the ncclUniqueId was not made by this library's ncclGetUniqueId (every rank must load OxCCL's \
             libnccl, and the id must reach them unchanged)",
        ));
    }
    let port = u16::from_be_bytes([b[25], b[26]]);
    let ip: IpAddr = match b[24] {
        4 => Ipv4Addr::new(b[27], b[28], b[29], b[30]).into(),
        6 => Ipv6Addr::from(<[u8; 16]>::try_from(&b[27..43]).expect("16 bytes")).into(),
        f => return Err(Fail::arg(format!("the ncclUniqueId is damaged (address family {f})"))),
    };
    let mut job = [0u8; 16];
    job.copy_from_slice(&b[8..24]);
    Ok((SocketAddr::new(ip, port), job))
}

/// The store of the job an id names, its keys under the job id.
pub fn store_of(id: &ncclUniqueId, timeout: Duration) -> Result<Arc<dyn Store>, Fail> {
    let (addr, job) = decode(id)?;
    let client: Arc<dyn Store> = Arc::new(TcpStore::connect(addr, timeout)?);
    let hex: String = job.iter().map(|x| format!("{x:02x}")).collect();
    Ok(Arc::new(PrefixStore::new(format!("nccl/{hex}/"), client)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_foreign_ones_are_refused() {
        for addr in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let a: SocketAddr = addr.parse().unwrap();
            let job = [7u8; 16];
            assert_eq!(decode(&encode(a, &job)).unwrap(), (a, job));
        }
        let zero = ncclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
        let e = decode(&zero).unwrap_err();
        assert_eq!(e.code, crate::types::ncclInvalidArgument);
        assert!(e.msg.contains("ncclGetUniqueId"), "{}", e.msg);
    }
}
