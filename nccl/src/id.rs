//! The unique id: what `ncclGetUniqueId` hands the ranks, and how they meet through it.
//!
//! The process that calls `ncclGetUniqueId` hosts OxCCL's TCP rendezvous store (once per
//! process, for as long as it lives), as NCCL's root hosts its bootstrap. The id carries the
//! store's address and a random job id; every communicator made from the id keeps its keys
//! under that job id, so one store serves many ids.
//!
//! Layout of the 128 bytes: `OXCCLID1` (8), job id (16), address family 4 or 6 (1), port
//! (2, big-endian), address (16; IPv4 in the first 4), where the job secret comes from (1:
//! 1 = every rank's `OXCCL_JOB_SECRET`, 2 = the 64 bytes that follow), the secret (64), zeros.
//!
//! The id carries the job secret (docs/security.md): without `OXCCL_JOB_SECRET`, the hosting
//! process makes a random one, and every communicator made from the id proves it on each TCP
//! connection (the store's, net-tcp's). Whoever holds the id can join the job, as with NCCL:
//! hand it to the ranks over a channel strangers cannot read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxccl::bootstrap::{TcpStore, TcpStoreServer};
use oxccl::{Auth, JobSecret, Store};
use oxccl_core::store::PrefixStore;

use crate::types::{ncclUniqueId, Fail, NCCL_UNIQUE_ID_BYTES};

const MAGIC: &[u8; 8] = b"OXCCLID1";

/// The store this process hosts, the address it gives out, and the secret its ids carry
/// (`None`: every rank's `OXCCL_JOB_SECRET`).
type Hosted = (TcpStoreServer, SocketAddr, Option<Vec<u8>>);
static HOSTED: Mutex<Option<Hosted>> = Mutex::new(None);

/// Where the secret of a job comes from, as an id says.
const SECRET_FROM_ENV: u8 = 1;
const SECRET_IN_ID: u8 = 2;
const SECRET_AT: usize = 44;
const SECRET_BYTES: usize = 64;

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

/// A new id: this process's store (started on first use), a fresh job id, and the job secret
/// (`OXCCL_JOB_SECRET` when set, else one this process made).
pub fn new_id() -> Result<ncclUniqueId, Fail> {
    let mut hosted = HOSTED.lock().unwrap_or_else(|e| e.into_inner());
    let (addr, secret) = match &*hosted {
        Some((_, a, s)) => (*a, s.clone()),
        None => {
            let want = advertised()?;
            let env = oxccl::Config::from_env()?.auth.clone();
            let (auth, secret) = if env.has_secret() {
                (env, None)
            } else {
                let s = JobSecret::generate("the ncclUniqueId").map_err(Fail::from)?;
                let bytes = s.expose().to_vec();
                (env.and_secret(s), Some(bytes))
            };
            // The store listens where the id says, never on every interface.
            let server = TcpStoreServer::start(want, &auth)?;
            let addr = SocketAddr::new(want.ip(), server.local_addr().port());
            tracing::info!(%addr, "ncclGetUniqueId: this process hosts the rendezvous store");
            *hosted = Some((server, addr, secret.clone()));
            (addr, secret)
        }
    };
    let mut job = [0u8; 16];
    random(&mut job)?;
    Ok(encode(addr, &job, secret.as_deref()))
}

fn random(out: &mut [u8]) -> Result<(), Fail> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(out))
        .map_err(|e| Fail::new(crate::types::ncclSystemError, format!("reading /dev/urandom for a job id: {e}")))
}

/// The id of the store at `addr`, job `job`, with the job secret `secret` (`None`: every
/// rank's `OXCCL_JOB_SECRET`; a secret in an id is [`SECRET_BYTES`] long).
pub fn encode(addr: SocketAddr, job: &[u8; 16], secret: Option<&[u8]>) -> ncclUniqueId {
    let mut b = [0u8; NCCL_UNIQUE_ID_BYTES];
    match secret {
        Some(s) => {
            assert_eq!(s.len(), SECRET_BYTES, "a generated secret is 64 hexadecimal digits");
            b[SECRET_AT - 1] = SECRET_IN_ID;
            b[SECRET_AT..SECRET_AT + SECRET_BYTES].copy_from_slice(s);
        }
        None => b[SECRET_AT - 1] = SECRET_FROM_ENV,
    }
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

/// What an id carries.
#[derive(PartialEq, Eq)]
pub struct Decoded {
    /// The store's address.
    pub addr: SocketAddr,
    /// The job id.
    pub job: [u8; 16],
    /// The job secret (`None`: every rank's `OXCCL_JOB_SECRET`).
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("addr", &self.addr)
            .field("job", &self.job)
            .field("secret", &self.secret.as_ref().map(|s| format!("{} bytes, not shown", s.len())))
            .finish()
    }
}

/// The store address, job id and secret an id carries.
pub fn decode(id: &ncclUniqueId) -> Result<Decoded, Fail> {
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
    let secret = match b[SECRET_AT - 1] {
        SECRET_FROM_ENV => None,
        SECRET_IN_ID => Some(b[SECRET_AT..SECRET_AT + SECRET_BYTES].to_vec()),
        f => return Err(Fail::arg(format!("the ncclUniqueId is damaged (secret kind {f})"))),
    };
    Ok(Decoded { addr: SocketAddr::new(ip, port), job, secret })
}

/// The store of the job an id names (its keys under the job id), and the authentication its
/// connections use: the secret in the id, else `env`'s (`OXCCL_JOB_SECRET`), which must hold
/// one.
pub fn store_of(id: &ncclUniqueId, timeout: Duration, env: &Auth) -> Result<(Arc<dyn Store>, Auth), Fail> {
    let d = decode(id)?;
    let auth =
        match &d.secret {
            Some(s) => env.and_secret(JobSecret::new(s, "the ncclUniqueId").map_err(Fail::from)?),
            None if env.has_secret() => env.clone(),
            None => return Err(Fail::arg(
                "the ncclUniqueId says every rank has the job secret in OXCCL_JOB_SECRET (or OXCCL_JOB_SECRET_FILE), \
                 and this process has none: give every rank the same secret",
            )),
        };
    let client: Arc<dyn Store> = Arc::new(TcpStore::connect(d.addr, timeout, &auth)?);
    let hex: String = d.job.iter().map(|x| format!("{x:02x}")).collect();
    Ok((Arc::new(PrefixStore::new(format!("nccl/{hex}/"), client)), auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_foreign_ones_are_refused() {
        for addr in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let a: SocketAddr = addr.parse().unwrap();
            let job = [7u8; 16];
            let secret = [b'c'; SECRET_BYTES];
            let d = decode(&encode(a, &job, Some(&secret))).unwrap();
            assert_eq!(d, Decoded { addr: a, job, secret: Some(secret.to_vec()) });
            assert_eq!(decode(&encode(a, &job, None)).unwrap().secret, None);
        }
        let zero = ncclUniqueId { internal: [0; NCCL_UNIQUE_ID_BYTES] };
        let e = decode(&zero).unwrap_err();
        assert_eq!(e.code, crate::types::ncclInvalidArgument);
        assert!(e.msg.contains("ncclGetUniqueId"), "{}", e.msg);
    }
}
