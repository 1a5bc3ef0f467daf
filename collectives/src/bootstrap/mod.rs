//! Bootstrap: how ranks find each other.
//!
//! [`LaunchEnv::detect`] reads what the launcher (`oxccl launch`, torchrun, MPI, Slurm) says
//! about this process; [`connect_store`] then opens the rendezvous store it names: a
//! [`TcpStore`] (rank 0, or the launcher, hosting a [`TcpStoreServer`]) or a [`FileStore`] on a
//! shared directory.

pub mod env;
pub mod file_store;
pub mod tcp_store;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use oxccl_core::auth::Auth;
use oxccl_core::store::Store;
use oxccl_core::{Error, Result};

pub use env::{LaunchEnv, StoreAddr};
pub use file_store::FileStore;
pub use tcp_store::{TcpStore, TcpStoreServer};

/// True when `host` names only this machine (so the server need not listen beyond loopback).
fn is_loopback(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            host.eq_ignore_ascii_case("localhost")
                && (host, 0).to_socket_addrs().map(|mut a| a.all(|sa| sa.ip().is_loopback())).unwrap_or(false)
        }
    }
}

/// Opens the rendezvous store named by `env`.
///
/// - `File(dir)`: a [`FileStore`] in `dir`.
/// - `Tcp(host, port)`: unless `env.store_hosted` (the launcher hosts it), rank 0 starts a
///   [`TcpStoreServer`] on `port`, listening only on loopback when `host` is a loopback
///   address, else on the interface `ifname` names (`OXCCL_SOCKET_IFNAME`) or on every
///   interface, and connects to it over loopback; every other rank connects to `host:port`,
///   retrying until `timeout` so it may start before rank 0. The server is returned and must
///   be kept alive as long as any rank uses the store. Every connection proves `auth`'s job
///   secret; a server beyond loopback without one needs `OXCCL_ALLOW_UNAUTHENTICATED=1`.
///
/// [`Error::InvalidArgument`] when `env` names no store.
pub fn connect_store(
    env: &LaunchEnv,
    timeout: Duration,
    auth: &Auth,
    ifname: Option<&str>,
) -> Result<(Arc<dyn Store>, Option<TcpStoreServer>)> {
    let Some(addr) = &env.store else {
        return Err(Error::invalid_arg(format!(
            "rank {} of {} (launched by {}) has no rendezvous store address: set OXCCL_STORE=tcp://host:port \
             or file:///shared/dir, or MASTER_ADDR and MASTER_PORT (the store then listens on MASTER_PORT+1)",
            env.rank, env.world_size, env.launcher
        )));
    };
    match addr {
        StoreAddr::File(dir) => Ok((Arc::new(FileStore::new(dir.clone())?), None)),
        StoreAddr::Tcp(host, port) if env.rank == 0 && !env.store_hosted => {
            if *port == 0 && env.world_size > 1 {
                return Err(Error::invalid_arg(format!(
                    "store address {addr}: port 0 cannot be found by the other ranks; name a port"
                )));
            }
            let v6 = host.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6());
            let (any, lo): (IpAddr, IpAddr) = if v6 {
                (Ipv6Addr::UNSPECIFIED.into(), Ipv6Addr::LOCALHOST.into())
            } else {
                (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into())
            };
            let bind = match ifname {
                _ if is_loopback(host) => lo,
                Some(name) if !v6 => oxccl_transports::tcp::interface_addr(Some(name))?,
                _ => any,
            };
            if !bind.is_unspecified() && !bind.is_loopback() {
                // The other ranks dial `host`: say so now if it is not where the store listens.
                let named: Vec<IpAddr> =
                    (host.as_str(), *port).to_socket_addrs().map(|a| a.map(|sa| sa.ip()).collect()).unwrap_or_default();
                if !named.contains(&bind) {
                    tracing::warn!(
                        "the store listens on {bind} (OXCCL_SOCKET_IFNAME={}) but the other ranks are told to find it at \
                         {host} ({named:?}): they will not reach it unless {host} leads there; set OXCCL_SOCKET_IFNAME to \
                         {host}'s interface, or the store's address to {bind}",
                        ifname.unwrap_or_default()
                    );
                }
            }
            let server = TcpStoreServer::start(SocketAddr::new(bind, *port), auth)?;
            let near = if bind.is_unspecified() { lo } else { bind };
            let client = TcpStore::connect(SocketAddr::new(near, server.local_addr().port()), timeout, auth)?;
            tracing::info!(addr = %server.local_addr(), world_size = env.world_size, "rank 0 hosts the store");
            Ok((Arc::new(client), Some(server)))
        }
        StoreAddr::Tcp(..) => {
            let target = addr.connect_target().unwrap_or_default();
            Ok((Arc::new(TcpStore::connect(target, timeout, auth)?), None))
        }
    }
}

/// Opens the store at `addr` as a client only (never hosting it): what tools that inspect a
/// running job (`oxccl trace`) use, proving `auth`'s job secret. A TCP store is retried until
/// `timeout`.
pub fn connect_client(addr: &StoreAddr, timeout: Duration, auth: &Auth) -> Result<Arc<dyn Store>> {
    match addr {
        StoreAddr::File(dir) => Ok(Arc::new(FileStore::new(dir.clone())?)),
        StoreAddr::Tcp(..) => {
            Ok(Arc::new(TcpStore::connect(addr.connect_target().unwrap_or_default(), timeout, auth)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world_size: usize, store: Option<StoreAddr>, store_hosted: bool) -> LaunchEnv {
        LaunchEnv { rank, world_size, local_rank: None, local_world_size: None, store, store_hosted, launcher: "oxccl" }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn connect_store_rank0_hosts() {
        let port = free_port();
        let addr = Some(StoreAddr::Tcp("127.0.0.1".into(), port));
        // Rank 1 starts first and waits for rank 0's server.
        let e1 = env(1, 2, addr.clone(), false);
        let r1 = std::thread::spawn(move || {
            let (s, server) = connect_store(&e1, T, &Auth::none(), None).unwrap();
            assert!(server.is_none());
            s.set("from1", b"b").unwrap();
            s.get("from0", T).unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        let (s0, server) = connect_store(&env(0, 2, addr, false), T, &Auth::none(), None).unwrap();
        let server = server.expect("rank 0 hosts the store");
        assert_eq!(server.local_addr(), SocketAddr::from(([127, 0, 0, 1], port)), "loopback host, loopback bind");
        s0.set("from0", b"a").unwrap();
        assert_eq!(s0.get("from1", T).unwrap(), b"b");
        assert_eq!(r1.join().unwrap(), b"a");
    }

    #[test]
    fn connect_store_hosted_by_launcher() {
        let server = TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), &Auth::none()).unwrap();
        let addr = Some(StoreAddr::Tcp("127.0.0.1".into(), server.local_addr().port()));
        let (s0, none0) = connect_store(&env(0, 2, addr.clone(), true), T, &Auth::none(), None).unwrap();
        let (s1, none1) = connect_store(&env(1, 2, addr, true), T, &Auth::none(), None).unwrap();
        assert!(none0.is_none() && none1.is_none(), "rank 0 does not host when the launcher does");
        assert_eq!(s0.add("n", 1).unwrap() + s1.add("n", 1).unwrap(), 3);
    }

    /// Beyond loopback, rank 0's store needs a secret (or consent), and listens on the
    /// interface OXCCL_SOCKET_IFNAME names rather than on every one.
    #[test]
    fn a_store_beyond_loopback_needs_a_secret_and_binds_the_named_interface() {
        // A name that is not loopback; rank 0 never connects to it (it uses its own bind).
        let addr = Some(StoreAddr::Tcp("198.18.0.1".into(), free_port()));
        // Every interface (no OXCCL_SOCKET_IFNAME) without a secret: refused.
        let e = connect_store(&env(0, 2, addr.clone(), false), T, &Auth::none(), None).unwrap_err();
        assert!(e.to_string().contains("0.0.0.0") && e.to_string().contains("OXCCL_JOB_SECRET"), "{e}");
        let secret = Auth::with_secret(oxccl_core::auth::JobSecret::new(b"bind-test-secret-0123", "test").unwrap());
        let (s, server) = connect_store(&env(0, 2, addr, false), T, &secret, Some("lo")).unwrap();
        let server = server.expect("rank 0 hosts");
        assert_eq!(server.local_addr().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST), "bound to lo's address only");
        s.set("k", b"v").unwrap();
    }

    #[test]
    fn connect_store_file() {
        let dir = std::env::temp_dir().join(format!("oxccl-connect-store-{}", std::process::id()));
        let addr = Some(StoreAddr::File(dir.clone()));
        let (s0, server) = connect_store(&env(0, 2, addr.clone(), false), T, &Auth::none(), None).unwrap();
        let (s1, _) = connect_store(&env(1, 2, addr, false), T, &Auth::none(), None).unwrap();
        assert!(server.is_none());
        s0.set("k", b"v").unwrap();
        assert_eq!(s1.get("k", T).unwrap(), b"v");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connect_store_errors() {
        let e = connect_store(&env(0, 2, None, false), T, &Auth::none(), None).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)), "{s}");
        assert!(s.contains("OXCCL_STORE") && s.contains("MASTER_ADDR") && s.contains("MASTER_PORT"), "{s}");
        let e = connect_store(&env(0, 2, Some(StoreAddr::Tcp("127.0.0.1".into(), 0)), false), T, &Auth::none(), None)
            .unwrap_err();
        assert!(e.to_string().contains("port 0"), "{e}");
        // One rank may let the system pick the port.
        let (s, server) =
            connect_store(&env(0, 1, Some(StoreAddr::Tcp("127.0.0.1".into(), 0)), false), T, &Auth::none(), None)
                .unwrap();
        let server = server.expect("rank 0 of 1 hosts the store");
        assert_ne!(server.local_addr().port(), 0);
        s.set("k", b"v").unwrap();
        assert_eq!(s.try_get("k").unwrap().unwrap(), b"v");
    }
}
