//! `net-tcp`: plain TCP between hosts, the transport every machine has.
//!
//! Each rank that has peers on other hosts listens on one address (the interface named by
//! `OXCCL_SOCKET_IFNAME`, else the first non-loopback IPv4 interface that is up) and
//! publishes it through the store. For a pair, the lower rank connects `streams` TCP
//! connections to the higher one and says hello on each (communicator nonce, rank, stream
//! number); the higher rank accepts and checks them: a connection that says anything else, or
//! nothing within 2 s, is dropped. Connections are made on first use, without blocking
//! ([`setup`]); sockets are non-blocking with TCP_NODELAY.

pub mod link;
mod setup;
mod transport;
pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};

use oxccl_core::store::Store;
use oxccl_core::{Error, Result};

pub use link::TcpLink;
use setup::{Dialing, Greeting, Heard};
pub use transport::{NetTcp, NET_TCP};
use wire::Hello;

const T: oxccl_core::link::TransportKind = oxccl_core::link::TransportKind::NetTcp;

/// Settings of net-tcp (every rank of a communicator must agree on `streams`).
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Connections per link (`OXCCL_TCP_STREAMS`).
    pub streams: usize,
    /// Largest piece of a message (`OXCCL_TCP_CHUNK_BYTES`).
    pub chunk: usize,
    /// Interface to listen on (`OXCCL_SOCKET_IFNAME`).
    pub ifname: Option<String>,
    /// The communicator's traffic class and `OXCCL_CLASS_SHARE`: bandwidth priority among
    /// the process's net-tcp links on one interface (`None`: none, as in unit tests).
    pub priority: Option<(oxccl_core::budget::TrafficClass, f64)>,
    /// Most a lower class's link keeps unacknowledged while a higher class is busy
    /// (`OXCCL_TCP_LOWER_CLASS_QUEUE`).
    pub lower_queue: usize,
    /// The job secret every connection proves, and whether listening beyond loopback
    /// without one is allowed.
    pub auth: oxccl_core::auth::Auth,
    /// Every peer is on this host: without `ifname`, listen on loopback only.
    pub local_only: bool,
    /// TLS on every stream (`OXCCL_TLS_*`), or none.
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

/// The store key of `rank`'s listening address.
pub(crate) fn addr_key(rank: usize) -> String {
    format!("tcp/addr/{rank}")
}

/// The IPv4 address of interface `name`, or of the first non-loopback interface that is up
/// (loopback if there is none).
pub fn interface_addr(name: Option<&str>) -> Result<IpAddr> {
    let mut found: Option<(String, Ipv4Addr)> = None;
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(Error::os(T, "getifaddrs", None, std::io::Error::last_os_error()));
    }
    let mut names = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr non-null; sa_family is readable for every sockaddr.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: AF_INET means ifa_addr points to a sockaddr_in.
        let ip = Ipv4Addr::from(u32::from_be(unsafe { (*(ifa.ifa_addr as *const libc::sockaddr_in)).sin_addr.s_addr }));
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        names.push(n.clone());
        let pick = match name {
            Some(want) => n == want,
            None => up && !ip.is_loopback() && found.is_none(),
        };
        if pick && found.is_none() {
            found = Some((n, ip));
        }
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    match (found, name) {
        (Some((_, ip)), _) => Ok(IpAddr::V4(ip)),
        (None, Some(want)) => Err(Error::invalid_arg(format!(
            "OXCCL_SOCKET_IFNAME={want}: no IPv4 interface of that name (have: {})",
            names.join(", ")
        ))),
        (None, None) => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    }
}

/// net-tcp of one communicator on one rank.
#[derive(Debug)]
pub struct TcpTransport {
    me: usize,
    world: usize,
    nonce: String,
    cfg: TcpConfig,
    listener: TcpListener,
    addr: SocketAddr,
    /// Accepted, checked streams of peers whose link is not complete yet.
    pending: HashMap<usize, Vec<Option<crate::tls::Sock>>>,
    /// Links this rank is dialing (to higher ranks).
    dialing: HashMap<usize, Dialing>,
    /// Accepted connections whose hello is still arriving.
    greeting: Vec<Greeting>,
    /// Lower ranks whose link this rank waits for (they dial): while there are some, the
    /// listener and the greetings are worth waking for.
    awaited: std::collections::HashSet<usize>,
    /// The process's class gate for this interface, and this communicator's class.
    gate: Option<(std::sync::Arc<oxccl_core::budget::ClassGate>, oxccl_core::budget::TrafficClass)>,
}

impl TcpTransport {
    /// Listens and publishes the address (`tcp/addr/<rank>` in the communicator's store).
    pub fn new(store: &dyn Store, me: usize, world: usize, nonce: &str, cfg: TcpConfig) -> Result<TcpTransport> {
        if cfg.streams == 0 || cfg.streams > 64 {
            return Err(Error::invalid_arg(format!("OXCCL_TCP_STREAMS={} must be 1 to 64", cfg.streams)));
        }
        let ip = match cfg.ifname.as_deref() {
            None if cfg.local_only => IpAddr::V4(Ipv4Addr::LOCALHOST),
            name => interface_addr(name)?,
        };
        cfg.auth.check_listen("net-tcp", ip)?;
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| Error::os(T, "bind", None, e))?;
        listener.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", None, e))?;
        let addr = listener.local_addr().map_err(|e| Error::os(T, "local_addr", None, e))?;
        store.set(&addr_key(me), addr.to_string().as_bytes())?;
        tracing::info!(rank = me, %addr, "net-tcp: listening");
        let gate = cfg.priority.map(|(class, share)| (oxccl_core::budget::gate(&format!("tcp:{ip}"), share), class));
        Ok(TcpTransport {
            me,
            world,
            nonce: nonce.chars().take(wire::MAX_NONCE).collect(),
            cfg,
            listener,
            addr,
            pending: HashMap::new(),
            dialing: HashMap::new(),
            greeting: Vec::new(),
            awaited: Default::default(),
            gate,
        })
    }

    /// The listening socket (a driver waiting for a connection polls it).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// The address this rank listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Descriptors a sleeping rank polls for links on their way up: while it waits for a
    /// lower rank to dial, the listener and accepted connections still greeting (readable);
    /// streams being dialed (writable). None once every link it waits for is up: a stranger
    /// knocking then wakes nobody (it is dealt with at the next connection).
    pub fn setup_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        if !self.awaited.is_empty() {
            out.push((self.listener_fd(), false));
            for g in &self.greeting {
                g.wait_fds(out);
            }
        }
        for d in self.dialing.values() {
            d.wait_fds(out);
        }
    }

    /// Starts or finishes the link to `peer`; `Ok(None)` while the peer is not there yet.
    /// Never blocks.
    pub fn connect(&mut self, store: &dyn Store, peer: usize) -> Result<Option<TcpLink>> {
        if self.me < peer {
            // A lower rank dialing this one waits for the answer to its handshake: every
            // connect call looks at the listener.
            self.accept_all()?;
            if !self.dialing.contains_key(&peer) {
                let Some(a) = store.try_get(&addr_key(peer))? else { return Ok(None) };
                let a = String::from_utf8_lossy(&a).into_owned();
                let addr: SocketAddr =
                    a.parse().map_err(|_| Error::Store(format!("{} holds {a:?}, not an address", addr_key(peer))))?;
                let hellos = (0..self.cfg.streams)
                    .map(|s| {
                        Hello {
                            rank: self.me as u32,
                            stream: s as u16,
                            streams: self.cfg.streams as u16,
                            nonce: self.nonce.clone(),
                        }
                        .encode()
                    })
                    .collect();
                self.dialing.insert(peer, Dialing::start(peer, addr, hellos, &self.cfg.auth, self.cfg.tls.clone())?);
            }
            let done = self.dialing.get_mut(&peer).map(|d| d.advance()).transpose();
            return match done {
                Ok(Some(Some(socks))) => {
                    self.dialing.remove(&peer);
                    Ok(Some(self.finish(peer, socks)?))
                }
                Ok(_) => Ok(None),
                Err(e) => {
                    self.dialing.remove(&peer);
                    Err(e)
                }
            };
        }
        self.accept_all()?;
        let complete = self.pending.get(&peer).is_some_and(|v| v.iter().all(|s| s.is_some()));
        if !complete {
            self.awaited.insert(peer);
            return Ok(None);
        }
        self.awaited.remove(&peer);
        let socks = self.pending.remove(&peer).unwrap_or_default().into_iter().flatten().collect();
        Ok(Some(self.finish(peer, socks)?))
    }

    fn finish(&self, peer: usize, socks: Vec<crate::tls::Sock>) -> Result<TcpLink> {
        for s in &socks {
            let s = s.tcp();
            s.set_nodelay(true).map_err(|e| Error::os(T, "TCP_NODELAY", Some(peer), e))?;
            s.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", Some(peer), e))?;
        }
        tracing::debug!(rank = self.me, peer, streams = socks.len(), "net-tcp: link up");
        let mut link = TcpLink::new(self.me, peer, self.cfg.chunk, socks);
        if let Some((gate, class)) = &self.gate {
            link.set_priority(gate.clone(), *class, self.cfg.lower_queue);
        }
        Ok(link)
    }

    /// Accepts every waiting connection, reads what has arrived of every hello, and files
    /// each greeted stream under its peer, dropping (with a warning) any that does not greet
    /// correctly or in time.
    fn accept_all(&mut self) -> Result<()> {
        loop {
            match self.listener.accept() {
                Ok((sock, from)) => {
                    self.greeting.push(Greeting::new(sock, from, &self.cfg.auth, self.cfg.tls.as_deref())?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::os(T, "accept", None, e)),
            }
        }
        for g in std::mem::take(&mut self.greeting) {
            let from = g.from();
            match g.read() {
                (Heard::More, Some(g)) => self.greeting.push(g),
                (Heard::More, None) => {}
                (Heard::Hello(h, sock), _) => match self.check(&h) {
                    Ok(()) => {
                        let slots = self
                            .pending
                            .entry(h.rank as usize)
                            .or_insert_with(|| (0..self.cfg.streams).map(|_| None).collect());
                        slots[h.stream as usize] = Some(sock);
                    }
                    Err(e) => tracing::warn!(rank = self.me, %from, "net-tcp: dropped a connection: {e}"),
                },
                (Heard::Dropped(why), _) => {
                    tracing::warn!(rank = self.me, %from, "net-tcp: dropped a connection: {why}")
                }
                (Heard::Refused(why), _) => oxccl_core::auth::refused(from.ip(), "net-tcp", &why),
            }
        }
        Ok(())
    }

    /// Whether a hello is one this rank expects: its communicator, a lower rank, a stream of
    /// the agreed count.
    fn check(&self, h: &Hello) -> Result<()> {
        let ok = h.nonce == self.nonce
            && h.streams as usize == self.cfg.streams
            && (h.stream as usize) < self.cfg.streams
            && (h.rank as usize) < self.me
            && (h.rank as usize) < self.world;
        if !ok {
            return Err(Error::Remote {
                rank: h.rank as usize,
                what: format!(
                    "net-tcp: unexpected hello (rank {}, stream {}/{}, nonce {:?}; this rank {} expects streams {}, nonce {:?})",
                    h.rank, h.stream, h.streams, h.nonce, self.me, self.cfg.streams, self.nonce
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use oxccl_core::auth::{self, Auth, JobSecret};
    use oxccl_core::link::{Link, MemSlice, RecvMode, Tag};
    use oxccl_core::store::{MemStore, Store};

    use super::*;

    fn cfg(streams: usize) -> TcpConfig {
        TcpConfig {
            streams,
            chunk: 4096,
            ifname: Some("lo".into()),
            priority: None,
            lower_queue: 32 << 10,
            auth: Auth::none(),
            local_only: false,
            tls: None,
        }
    }

    /// TLS configurations of two ranks under one test CA (made once per test process).
    fn test_tls() -> [std::sync::Arc<crate::tls::Tls>; 2] {
        static FILES: std::sync::OnceLock<Vec<oxccl_core::auth::TlsPaths>> = std::sync::OnceLock::new();
        let files = FILES.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("oxccl-tcp-tls-{}", std::process::id()));
            crate::tls::testing::make(&dir, &["r0", "r1"]).1
        });
        [crate::tls::Tls::load(&files[0]).unwrap(), crate::tls::Tls::load(&files[1]).unwrap()]
    }

    /// A raw connection to `b` past the handshake of `auth` (`b` polled meanwhile), ready for
    /// a hand-made hello; or the handshake's error.
    fn shaken(b: &mut TcpTransport, auth: &Auth) -> std::result::Result<TcpStream, String> {
        let (addr, a) = (b.addr(), auth.clone());
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // The proof and the test's hello go out at once (no Nagle wait for an ACK).
            s.set_nodelay(true).unwrap();
            auth::client_blocking(&mut s, &a, auth::Purpose::NetTcp).map(|()| s).map_err(|e| e.to_string())
        });
        while !t.is_finished() {
            b.accept_all().unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
        t.join().unwrap()
    }

    /// Connects rank 0's `a` and rank 1's `b`, polling both (the dialer waits for the
    /// acceptor's answer to its handshake).
    fn connect_both(a: &mut TcpTransport, b: &mut TcpTransport, store: &dyn Store) -> (TcpLink, TcpLink) {
        let (mut la, mut lb) = (None, None);
        let end = Instant::now() + Duration::from_secs(10);
        while la.is_none() || lb.is_none() {
            if la.is_none() {
                la = a.connect(store, 1).unwrap();
            }
            if lb.is_none() {
                lb = b.connect(store, 0).unwrap();
            }
            assert!(Instant::now() < end, "the link never came up");
        }
        (la.unwrap(), lb.unwrap())
    }

    fn connect_until(t: &mut TcpTransport, store: &dyn Store, peer: usize) -> TcpLink {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = t.connect(store, peer).unwrap() {
                return l;
            }
            assert!(Instant::now() < end, "link to {peer} never came up");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn slice(v: &mut [u8]) -> MemSlice {
        // SAFETY: the test keeps the vectors alive until the operations complete.
        unsafe { MemSlice::new(v.as_mut_ptr(), v.len()) }
    }

    /// Drives `l` until `f` says done or an error comes; bounded.
    fn drive(l: &mut TcpLink, f: impl Fn(&TcpLink) -> bool) -> oxccl_core::Result<()> {
        let end = Instant::now() + Duration::from_secs(10);
        while !f(l) {
            l.progress()?;
            assert!(Instant::now() < end, "no progress");
        }
        Ok(())
    }

    /// Strangers at the listener (garbage, a 4 GiB "nonce", a wrong version, a wrong
    /// communicator) are dropped; the real peer still connects afterwards.
    #[test]
    fn hostile_connections_are_dropped() {
        let store = MemStore::new();
        let mut b = TcpTransport::new(&store, 1, 2, "nonce-1", cfg(2)).unwrap();
        let addr = b.addr();
        // Not even the handshake.
        for j in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), vec![0u8; 100]] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&j).unwrap();
        }
        // Past the handshake (no secret here), then a bad hello.
        let mut junk = vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()];
        let mut long = Hello { rank: 0, stream: 0, streams: 2, nonce: "nonce-1".into() }.encode();
        long[10] = 0xff;
        long[11] = 0xff;
        junk.push(long);
        let mut ver = Hello { rank: 0, stream: 0, streams: 2, nonce: "nonce-1".into() }.encode();
        ver[4] = 99;
        junk.push(ver);
        junk.push(Hello { rank: 0, stream: 0, streams: 2, nonce: "other".into() }.encode());
        junk.push(Hello { rank: 0, stream: 7, streams: 2, nonce: "nonce-1".into() }.encode());
        junk.push(vec![1, 2, 3]); // truncated, then closed
        for j in &junk {
            let mut s = shaken(&mut b, &Auth::none()).unwrap();
            s.write_all(j).unwrap();
        }
        // The higher rank polls: every stranger is dropped, nothing is filed.
        for _ in 0..50 {
            assert!(b.connect(&store, 0).unwrap().is_none());
        }
        let mut a = TcpTransport::new(&store, 0, 2, "nonce-1", cfg(2)).unwrap();
        let (mut la, mut lb) = connect_both(&mut a, &mut b, &store);
        let mut x = vec![7u8; 10_000];
        let mut y = vec![0u8; 10_000];
        let s = la.post_send(Tag(5), slice(&mut x)).unwrap();
        let r = lb.post_recv(Tag(5), slice(&mut y), RecvMode::Copy).unwrap();
        for _ in 0..1000 {
            la.progress().unwrap();
            lb.progress().unwrap();
            if la.sends_done() > s && lb.recvs_done() > r {
                break;
            }
        }
        assert_eq!(x, y);
    }

    /// With a job secret, a stranger without it, with another, or replaying a recorded
    /// handshake opens no link (nothing is filed under any rank); the real peer connects, and
    /// a listener beyond loopback without a secret is refused unless allowed.
    #[test]
    fn only_a_peer_with_the_job_secret_opens_a_link() {
        let secret = |s: &str| Auth::with_secret(JobSecret::new(s.as_bytes(), "test").unwrap());
        let job = secret("net-tcp-test-secret-1");
        let store = MemStore::new();
        let mut c = cfg(1);
        c.auth = job.clone();
        let mut b = TcpTransport::new(&store, 1, 2, "n", c.clone()).unwrap();
        let e = shaken(&mut b, &Auth::none()).unwrap_err();
        assert!(e.contains("requires the job secret"), "{e}");
        let e = shaken(&mut b, &secret("net-tcp-test-secret-2")).unwrap_err();
        assert!(e.contains("did not prove"), "{e}");
        // A recorded handshake of the real peer, replayed byte for byte.
        let (client, challenge) = auth::Client::start(&job, auth::Purpose::NetTcp).unwrap();
        let mut rec = TcpStream::connect(b.addr()).unwrap();
        rec.write_all(&challenge).unwrap();
        rec.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut response = [0u8; auth::RESPONSE_BYTES];
        let mut got = 0;
        while got < response.len() {
            b.accept_all().unwrap();
            if let Ok(n) = std::io::Read::read(&mut rec, &mut response[got..]) {
                got += n;
            }
        }
        let proof = client.finish(&response).unwrap();
        let hello = Hello { rank: 0, stream: 0, streams: 1, nonce: "n".into() }.encode();
        let mut replay = TcpStream::connect(b.addr()).unwrap();
        replay.write_all(&[&challenge[..], &proof[..], &hello[..]].concat()).unwrap();
        for _ in 0..50 {
            assert!(b.connect(&store, 0).unwrap().is_none());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(b.pending.is_empty(), "nothing filed for a stranger");
        drop(rec);
        let mut a = TcpTransport::new(&store, 0, 2, "n", c).unwrap();
        let _links = connect_both(&mut a, &mut b, &store);
        // Beyond loopback: a secret, or permission.
        let mut wide = cfg(1);
        wide.ifname = None;
        wide.local_only = false;
        if let Ok(ip) = interface_addr(None).map(|ip| !ip.is_loopback()) {
            if ip {
                let e = TcpTransport::new(&store, 0, 2, "w", wide.clone()).unwrap_err().to_string();
                assert!(e.contains("OXCCL_JOB_SECRET"), "{e}");
                wide.auth = Auth::unauthenticated();
                TcpTransport::new(&store, 0, 2, "w", wide.clone()).unwrap();
            }
        }
        wide.auth = Auth::none();
        wide.local_only = true;
        let t = TcpTransport::new(&store, 0, 2, "w", wide).unwrap();
        assert!(t.addr().ip().is_loopback(), "a one-host job listens on loopback");
    }

    /// With TLS, a peer whose certificate another CA signed, or one without TLS, opens no
    /// link: the dialer's error says TLS, the listener files nothing.
    #[test]
    fn tls_refuses_a_peer_of_another_ca_or_without_tls() {
        let [ours, _] = test_tls();
        let dir = std::env::temp_dir().join(format!("oxccl-tcp-tls-other-{}", std::process::id()));
        let theirs = crate::tls::Tls::load(&crate::tls::testing::make(&dir, &["x"]).1[0]).unwrap();
        for (name, dialer) in [("another CA", Some(theirs)), ("no TLS", None)] {
            let store = MemStore::new();
            let mut b = TcpTransport::new(&store, 1, 2, "t", TcpConfig { tls: Some(ours.clone()), ..cfg(1) }).unwrap();
            let mut a = TcpTransport::new(&store, 0, 2, "t", TcpConfig { tls: dialer, ..cfg(1) }).unwrap();
            let end = Instant::now() + Duration::from_secs(5);
            let e = loop {
                match a.connect(&store, 1) {
                    Err(e) => break e.to_string(),
                    Ok(Some(_)) => panic!("{name}: a link came up"),
                    Ok(None) => {}
                }
                assert!(b.connect(&store, 0).unwrap().is_none(), "{name}: the listener filed a link");
                assert!(Instant::now() < end, "{name}: no error");
                std::thread::sleep(Duration::from_millis(1));
            };
            assert!(e.contains("handshake"), "{name}: {e}");
            assert!(b.pending.is_empty());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A stranger that connects and says nothing costs nothing: the real link comes up at
    /// once, and no connect call waits for the stranger (they used to block up to 2 s).
    #[test]
    fn a_silent_stranger_does_not_stall_connecting() {
        let store = MemStore::new();
        let mut b = TcpTransport::new(&store, 1, 2, "quiet", cfg(2)).unwrap();
        let _silent = TcpStream::connect(b.addr()).unwrap();
        let mut half = TcpStream::connect(b.addr()).unwrap();
        half.write_all(&Hello { rank: 0, stream: 0, streams: 2, nonce: "quiet".into() }.encode()[..9]).unwrap();
        let mut a = TcpTransport::new(&store, 0, 2, "quiet", cfg(2)).unwrap();
        let start = Instant::now();
        let (mut la, mut lb) = (None, None);
        while la.is_none() || lb.is_none() {
            let call = Instant::now();
            if la.is_none() {
                la = a.connect(&store, 1).unwrap();
            }
            if lb.is_none() {
                lb = b.connect(&store, 0).unwrap();
            }
            assert!(call.elapsed() < Duration::from_millis(200), "a connect call blocked {:?}", call.elapsed());
            assert!(start.elapsed() < Duration::from_secs(1), "the link waited for the strangers");
        }
        assert_eq!(b.greeting.len(), 2, "both strangers still waited on, not blocking anyone");
        // Past the handshake time they are dropped.
        std::thread::sleep(setup::HANDSHAKE + Duration::from_millis(50));
        assert!(b.connect(&store, 0).unwrap().is_none());
        assert!(b.greeting.is_empty());
    }

    /// After a valid hello, garbage, an absurd length or a truncated piece fail the receive
    /// with an error naming the peer; nothing is allocated from the wire.
    #[test]
    fn hostile_pieces_fail_the_link() {
        use super::wire::PieceHeader;
        let cases: Vec<Vec<u8>> = vec![
            vec![0xAB; 64],
            PieceHeader { len: u32::MAX, tag: 5, msg_len: 100, offset: 0 }.encode().to_vec(),
            PieceHeader { len: 100, tag: 5, msg_len: 100, offset: 0 }.encode()[..20].to_vec(),
        ];
        for (i, bytes) in cases.into_iter().enumerate() {
            let store = MemStore::new();
            let nonce = format!("n{i}");
            let mut b = TcpTransport::new(&store, 1, 2, &nonce, cfg(1)).unwrap();
            let mut raw = shaken(&mut b, &Auth::none()).unwrap();
            raw.write_all(&Hello { rank: 0, stream: 0, streams: 1, nonce }.encode()).unwrap();
            let mut lb = connect_until(&mut b, &store, 0);
            raw.write_all(&bytes).unwrap();
            drop(raw);
            let mut y = vec![0u8; 100];
            lb.post_recv(Tag(5), slice(&mut y), RecvMode::Copy).unwrap();
            let e = drive(&mut lb, |l| l.recvs_done() > 0).unwrap_err();
            assert!(matches!(e, Error::Remote { rank: 0, .. }), "case {i}: {e}");
        }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::wire::{Hello, PieceHeader, HEADER};
        use super::*;

        fn fuzz_config() -> proptest::test_runner::Config {
            let cases = std::env::var("OXCCL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
            proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() }
        }

        /// Bytes a hostile peer might send after its hello: garbage, or piece headers whose
        /// fields lie (lengths, offsets, tags), possibly cut short.
        fn stream() -> impl Strategy<Value = Vec<u8>> {
            let header = (any::<u32>(), 0u64..8, any::<u64>(), any::<u64>(), 0usize..=HEADER).prop_map(
                |(len, tag, msg_len, offset, cut)| {
                    let h = PieceHeader { len: len % 256, tag, msg_len: msg_len % 300, offset: offset % 300 };
                    h.encode()[..cut].to_vec()
                },
            );
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..128),
                (header, proptest::collection::vec(any::<u8>(), 0..128)).prop_map(|(mut h, p)| {
                    h.extend_from_slice(&p);
                    h
                }),
            ]
        }

        proptest! {
            #![proptest_config(fuzz_config())]

            /// The decoders on any bytes: a value or an error, never a panic.
            #[test]
            fn fuzz_wire_decoders(hello in any::<[u8; 16]>(), piece in any::<[u8; HEADER]>()) {
                if let Ok((h, n)) = Hello::decode_fixed(&hello) {
                    prop_assert!(n <= super::super::wire::MAX_NONCE);
                    prop_assert_eq!(h.nonce.len(), 0);
                }
                if let Ok(p) = PieceHeader::decode(&piece) {
                    prop_assert_eq!(PieceHeader::decode(&p.encode()).unwrap(), p);
                }
            }

            /// After a valid hello, whatever the peer sends then closes: the posted receive
            /// completes with exactly the bytes a well-formed piece carried, or fails with an
            /// error naming the peer. Never a panic, never a hang, nothing written past the
            /// receive's buffer.
            #[test]
            fn fuzz_link_input_after_hello(bytes in stream()) {
                let store = MemStore::new();
                let nonce = "fz".to_string();
                let mut b = TcpTransport::new(&store, 1, 2, &nonce, cfg(1)).unwrap();
                let mut raw = shaken(&mut b, &Auth::none()).unwrap();
                raw.write_all(&Hello { rank: 0, stream: 0, streams: 1, nonce }.encode()).unwrap();
                let mut lb = connect_until(&mut b, &store, 0);
                let _ = raw.write_all(&bytes);
                drop(raw);
                // A guard zone after the 100 bytes the receive may fill.
                let mut y = [0x5au8; 164];
                lb.post_recv(Tag(5), slice(&mut y[..100]), RecvMode::Copy).unwrap();
                match drive(&mut lb, |l| l.recvs_done() > 0) {
                    Ok(()) => {}
                    Err(Error::Remote { rank: 0, .. }) | Err(Error::InvalidUsage(_)) => {}
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
                prop_assert!(y[100..].iter().all(|&x| x == 0x5a), "written past the buffer");
            }
        }
    }

    /// Pairs of net-tcp links over loopback.
    struct Pairs {
        streams: usize,
        chunk: usize,
        n: usize,
    }

    impl oxccl_core::conformance::LinkPair for Pairs {
        fn name(&self) -> String {
            format!("net-tcp ({} streams, {} B pieces)", self.streams, self.chunk)
        }
        fn piece(&self) -> usize {
            self.chunk
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            self.n += 1;
            let store = MemStore::new();
            let nonce = format!("c{}", self.n);
            let c = TcpConfig {
                streams: self.streams,
                chunk: self.chunk,
                ifname: Some("lo".into()),
                priority: None,
                lower_queue: 32 << 10,
                // The second run's links prove a job secret, over TLS.
                auth: if self.n > 100 {
                    Auth::with_secret(JobSecret::new(b"conformance-secret-01", "test").unwrap())
                } else {
                    Auth::none()
                },
                local_only: false,
                tls: None,
            };
            let [t0, t1] = test_tls();
            let tls = self.n > 100;
            let mut a =
                TcpTransport::new(&store, 0, 2, &nonce, TcpConfig { tls: tls.then_some(t0), ..c.clone() }).unwrap();
            let mut b = TcpTransport::new(&store, 1, 2, &nonce, TcpConfig { tls: tls.then_some(t1), ..c }).unwrap();
            let (mut la, mut lb) = (None, None);
            let end = Instant::now() + Duration::from_secs(10);
            while la.is_none() || lb.is_none() {
                if la.is_none() {
                    la = a.connect(&store, 1).unwrap();
                }
                if lb.is_none() {
                    lb = b.connect(&store, 0).unwrap();
                }
                assert!(Instant::now() < end, "no link");
            }
            (Box::new(la.unwrap()), Box::new(lb.unwrap()))
        }
    }

    #[test]
    fn net_tcp_keeps_the_link_contract() {
        oxccl_core::conformance::run(&mut Pairs { streams: 1, chunk: 256 << 10, n: 0 });
        oxccl_core::conformance::run(&mut Pairs { streams: 4, chunk: 4 << 10, n: 100 });
    }

    /// Striping over several streams keeps order and content for mixed sizes.
    #[test]
    fn striped_messages_arrive_in_order() {
        let store = MemStore::new();
        let mut b = TcpTransport::new(&store, 1, 2, "s", cfg(3)).unwrap();
        let mut a = TcpTransport::new(&store, 0, 2, "s", cfg(3)).unwrap();
        let (mut la, mut lb) = connect_both(&mut a, &mut b, &store);
        let sizes = [0usize, 1, 4095, 4096, 4097, 50_000, 3, 200_000, 0, 10];
        let mut src: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(k, &n)| (0..n).map(|i| (i * 7 + k) as u8).collect()).collect();
        let mut dst: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        for (k, s) in src.iter_mut().enumerate() {
            la.post_send(Tag(k as u64), slice(s)).unwrap();
        }
        for (k, d) in dst.iter_mut().enumerate() {
            lb.post_recv(Tag(k as u64), slice(d), RecvMode::Copy).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(10);
        while lb.recvs_done() < sizes.len() as u64 || la.sends_done() < sizes.len() as u64 {
            la.progress().unwrap();
            lb.progress().unwrap();
            assert!(Instant::now() < end);
        }
        assert_eq!(src, dst);
    }
}
