//! Setting up net-tcp links without blocking: the lower rank of a pair dials (non-blocking
//! connect, the job-secret handshake of `oxccl_core::auth`, then its hello, written as the
//! socket takes it); the higher rank accepts, answers the handshake and reads each hello as
//! its bytes arrive. Nothing from a connection is believed before it proved the job secret. A
//! stranger at the listener that says nothing, or too little, costs one idle socket for
//! [`HANDSHAKE`] at most, never a stalled collective; one that fails the handshake is logged
//! once per address.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use oxccl_core::auth::{self, Answer, Auth, Purpose};
use oxccl_core::{Error, Result};

use super::wire::Hello;
use super::T;
use crate::tls::{Sock, Tls};

/// How long a connection may take to be made and greeted.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(2);

/// Bytes of a hello before its nonce.
const FIXED: usize = 16;

/// One outgoing stream on its way up.
#[derive(Debug)]
enum Out {
    /// connect() in progress; the hello to write once connected.
    Connecting(Socket, Vec<u8>),
    /// Connected (TLS under way, when on): the challenge is being written (`out`), then the
    /// response read (`got`).
    Shaking { s: Sock, hello: Vec<u8>, client: auth::Client, out: Vec<u8>, got: Vec<u8> },
    /// The peer proved the secret; these proof and hello bytes are still to be written.
    Greeting(Sock, Vec<u8>),
    /// Connected and greeted.
    Ready(Sock),
}

/// The streams the lower rank of a pair is dialing.
#[derive(Debug)]
pub(crate) struct Dialing {
    peer: usize,
    addr: SocketAddr,
    since: Instant,
    out: Vec<Out>,
    auth: Auth,
    tls: Option<std::sync::Arc<Tls>>,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EINPROGRESS)
}

impl Dialing {
    /// Starts one non-blocking connection to `addr` per hello (one per stream), each to open
    /// with TLS (when `tls`) and the handshake of `auth`.
    pub(crate) fn start(
        peer: usize,
        addr: SocketAddr,
        hellos: Vec<Vec<u8>>,
        auth: &Auth,
        tls: Option<std::sync::Arc<Tls>>,
    ) -> Result<Dialing> {
        let mut out = Vec::with_capacity(hellos.len());
        for hello in hellos {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| Error::os(T, "socket", Some(peer), e))?;
            s.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", Some(peer), e))?;
            match s.connect(&addr.into()) {
                // Connected at once (rare): the handshake starts at the first advance, as ever.
                Ok(()) => out.push(Out::Connecting(s, hello)),
                Err(e) if would_block(&e) => out.push(Out::Connecting(s, hello)),
                Err(e) => return Err(Error::os(T, "connect", Some(peer), e)),
            }
        }
        Ok(Dialing { peer, addr, since: Instant::now(), out, auth: auth.clone(), tls })
    }

    /// Moves every stream as far as it goes without blocking; the streams once all are
    /// connected and greeted.
    pub(crate) fn advance(&mut self) -> Result<Option<Vec<Sock>>> {
        let peer = self.peer;
        let mut next = Vec::with_capacity(self.out.len());
        for o in std::mem::take(&mut self.out) {
            next.push(step(peer, self.addr, &self.auth, self.tls.as_deref(), o)?);
        }
        self.out = next;
        if self.out.iter().all(|o| matches!(o, Out::Ready(_))) {
            let ready = std::mem::take(&mut self.out)
                .into_iter()
                .filter_map(|o| match o {
                    Out::Ready(s) => Some(s),
                    _ => None,
                })
                .collect();
            return Ok(Some(ready));
        }
        // Connecting is bounded here; once connected, the answer to the handshake comes when
        // the peer next looks at its listener (when it next needs a link), so that wait is
        // bounded by the operation's deadline, like any wait for a peer.
        if self.since.elapsed() > HANDSHAKE && self.out.iter().any(|o| matches!(o, Out::Connecting(..))) {
            return Err(Error::os(
                T,
                "connect",
                Some(peer),
                std::io::Error::new(ErrorKind::TimedOut, format!("not connected after {HANDSHAKE:?}")),
            ));
        }
        Ok(None)
    }

    /// Descriptors to poll while waiting: writability of every stream not yet greeted.
    pub(crate) fn wait_fds(&self, out: &mut Vec<(RawFd, bool)>) {
        for o in &self.out {
            match o {
                Out::Connecting(s, _) => out.push((s.as_raw_fd(), true)),
                Out::Shaking { s, out: o, .. } => out.push((s.tcp().as_raw_fd(), s.poll_write(!o.is_empty()))),
                Out::Greeting(s, _) => out.push((s.tcp().as_raw_fd(), s.poll_write(true))),
                Out::Ready(_) => {}
            }
        }
    }
}

/// Writes what it can of `rest` without blocking; `Ok(true)` once all is written.
fn push(s: &mut Sock, rest: &mut Vec<u8>, peer: Option<usize>, what: &'static str) -> Result<bool> {
    while !rest.is_empty() {
        match s.write(rest) {
            Ok(0) => return Err(Error::os(T, what, peer, ErrorKind::WriteZero.into())),
            Ok(n) => {
                rest.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) => return Err(Error::os(T, what, peer, e)),
        }
    }
    Ok(true)
}

/// Reads without blocking until `buf` holds `want` bytes (never more); `Ok(true)` then.
/// `Err` names why the stream ended.
fn pull(s: &mut Sock, buf: &mut Vec<u8>, want: usize) -> std::result::Result<bool, std::io::Error> {
    let mut chunk = [0u8; 128];
    while buf.len() < want {
        let need = (want - buf.len()).min(chunk.len());
        match s.read(&mut chunk[..need]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// One stream, as far as it goes now.
fn step(peer: usize, addr: SocketAddr, auth: &Auth, tls: Option<&Tls>, o: Out) -> Result<Out> {
    let o = match o {
        Out::Connecting(s, hello) => {
            if let Some(e) = s.take_error().map_err(|e| Error::os(T, "connect", Some(peer), e))? {
                return Err(Error::os(T, "connect", Some(peer), e));
            }
            match s.peer_addr() {
                Ok(_) => {
                    let tcp: TcpStream = s.into();
                    let s = match tls {
                        Some(t) => t.client(tcp)?,
                        None => Sock::Plain(tcp),
                    };
                    let (client, challenge) = auth::Client::start(auth, Purpose::NetTcp)?;
                    Out::Shaking { s, hello, client, out: challenge.to_vec(), got: Vec::new() }
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(Out::Connecting(s, hello)),
                Err(e) => return Err(Error::os(T, "connect", Some(peer), e)),
            }
        }
        o => o,
    };
    let o = match o {
        Out::Shaking { mut s, hello, client, mut out, mut got } => {
            if !push(&mut s, &mut out, Some(peer), "handshake")? {
                return Ok(Out::Shaking { s, hello, client, out, got });
            }
            match pull(&mut s, &mut got, auth::RESPONSE_BYTES) {
                Ok(false) => return Ok(Out::Shaking { s, hello, client, out, got }),
                Ok(true) => {}
                Err(e) if !s.is_tls() && auth::looks_like_tls(&got) => {
                    let why = format!("the listener at {addr} speaks TLS and this rank does not: OXCCL_TLS_* must be set on every rank, or on none ({e})");
                    return Err(Error::os(
                        T,
                        "handshake",
                        Some(peer),
                        std::io::Error::new(ErrorKind::PermissionDenied, why),
                    ));
                }
                Err(e) => return Err(Error::os(T, "handshake", Some(peer), e)),
            }
            let response: [u8; auth::RESPONSE_BYTES] = got[..].try_into().expect("a whole response");
            let proof = client.finish(&response).map_err(|m| {
                Error::os(
                    T,
                    "handshake",
                    Some(peer),
                    std::io::Error::new(ErrorKind::PermissionDenied, format!("the listener at {addr}: {m}")),
                )
            })?;
            let mut rest = proof.to_vec();
            rest.extend_from_slice(&hello);
            Out::Greeting(s, rest)
        }
        o => o,
    };
    let Out::Greeting(mut s, mut rest) = o else { return Ok(o) };
    if !push(&mut s, &mut rest, Some(peer), "hello")? {
        return Ok(Out::Greeting(s, rest));
    }
    Ok(Out::Ready(s))
}

/// Where an accepted connection is in its opening.
#[derive(Debug)]
enum Stage {
    /// Reading the challenge.
    Challenge,
    /// Answered; reading the proof.
    Proof(auth::Server),
    /// Proved; reading the hello (its fixed part, then its nonce's length once known).
    Hello(Option<(Hello, usize)>),
}

/// An accepted connection whose handshake or hello is still arriving.
#[derive(Debug)]
pub(crate) struct Greeting {
    sock: Sock,
    from: SocketAddr,
    since: Instant,
    buf: Vec<u8>,
    stage: Stage,
    /// Bytes of the response still to be written.
    out: Vec<u8>,
    auth: Auth,
}

/// What reading a greeting gave.
#[derive(Debug)]
pub(crate) enum Heard {
    /// Not all of it yet.
    More,
    /// The whole hello (to be checked by the caller).
    Hello(Hello, Sock),
    /// Dropped, and why (a stranger: a warning, not an error of the communicator).
    Dropped(String),
    /// It failed the handshake, and why (logged once per address).
    Refused(String),
}

impl Greeting {
    /// A connection just accepted, to be admitted by TLS (when `tls`) and the handshake of
    /// `auth`.
    pub(crate) fn new(sock: TcpStream, from: SocketAddr, auth: &Auth, tls: Option<&Tls>) -> Result<Greeting> {
        sock.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", None, e))?;
        let sock = match tls {
            Some(t) => t.server(sock)?,
            None => Sock::Plain(sock),
        };
        Ok(Greeting {
            sock,
            from,
            since: Instant::now(),
            buf: Vec::with_capacity(auth::CHALLENGE_BYTES),
            stage: Stage::Challenge,
            out: Vec::new(),
            auth: auth.clone(),
        })
    }

    /// Where it comes from.
    pub(crate) fn from(&self) -> SocketAddr {
        self.from
    }

    /// Reads what has arrived of the handshake and the hello, never past the hello's end (the
    /// bytes after it belong to the link), answering the challenge on the way.
    pub(crate) fn read(mut self) -> (Heard, Option<Greeting>) {
        loop {
            match push(&mut self.sock, &mut self.out, None, "handshake") {
                Ok(true) => {}
                Ok(false) => return self.later(),
                Err(e) => return self.failed(format!("answering its handshake: {e}")),
            }
            let want = match &self.stage {
                Stage::Challenge => auth::CHALLENGE_BYTES,
                Stage::Proof(_) => auth::PROOF_BYTES,
                Stage::Hello(None) => FIXED,
                Stage::Hello(Some((_, n))) => FIXED + n,
            };
            match pull(&mut self.sock, &mut self.buf, want) {
                Ok(true) => {}
                Ok(false) => return self.later(),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    return self.failed("closed before its hello was complete".into())
                }
                Err(e) => return self.failed(format!("reading its hello: {e}")),
            }
            let got = std::mem::take(&mut self.buf);
            // Each stage has its own time: a peer answered late because this rank looked at
            // its listener late is not dropped for it.
            self.since = Instant::now();
            match std::mem::replace(&mut self.stage, Stage::Challenge) {
                Stage::Challenge => match auth::Server::answer(&self.auth, Purpose::NetTcp, &got) {
                    Answer::Go(server, r) => {
                        self.out = r.to_vec();
                        self.stage = Stage::Proof(server);
                    }
                    Answer::Refuse(r, why) => {
                        if let Some(r) = r {
                            // Best effort: tell an honest peer with another secret why.
                            let _ = self.sock.write(&r);
                            let _ = self.sock.flush_tls();
                        }
                        return (Heard::Refused(why), None);
                    }
                },
                Stage::Proof(server) => match server.check(&got) {
                    Ok(()) => self.stage = Stage::Hello(None),
                    Err(why) => return (Heard::Refused(why), None),
                },
                Stage::Hello(None) => {
                    let fixed: [u8; FIXED] = got[..FIXED].try_into().expect("16 bytes");
                    match Hello::decode_fixed(&fixed) {
                        Ok(h) => self.stage = Stage::Hello(Some(h)),
                        Err(e) => return (Heard::Dropped(e.to_string()), None),
                    }
                    self.buf = got;
                }
                Stage::Hello(Some((mut h, _))) => {
                    h.nonce = String::from_utf8_lossy(&got[FIXED..]).into_owned();
                    return (Heard::Hello(h, self.sock), None);
                }
            }
        }
    }

    /// Nothing more now: wait, unless this stage has taken too long.
    fn later(self) -> (Heard, Option<Greeting>) {
        if self.since.elapsed() > HANDSHAKE {
            let stage = match self.stage {
                Stage::Challenge | Stage::Proof(_) => "handshake",
                Stage::Hello(_) => "hello",
            };
            let why = format!("no complete {stage} after {HANDSHAKE:?} ({} bytes)", self.buf.len());
            return self.failed(why);
        }
        (Heard::More, Some(self))
    }

    /// Gives up on it: before the proof (TLS, the challenge, the proof) a refusal, logged once
    /// per address; after it, a peer that proved the secret misbehaving, logged every time.
    fn failed(self, why: String) -> (Heard, Option<Greeting>) {
        match self.stage {
            Stage::Challenge | Stage::Proof(_) => (Heard::Refused(why), None),
            Stage::Hello(_) => (Heard::Dropped(why), None),
        }
    }

    /// What to poll while waiting: readability, and writability while TLS records or the
    /// response wait for the socket.
    pub(crate) fn wait_fds(&self, out: &mut Vec<(RawFd, bool)>) {
        let fd = self.sock.tcp().as_raw_fd();
        out.push((fd, false));
        if self.sock.poll_write(!self.out.is_empty()) {
            out.push((fd, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Writes `bytes` to `c` in pieces of 5, reading the greeting after each; the greeting
    /// once it wants no more of them.
    fn feed(c: &mut TcpStream, mut g: Greeting, bytes: &[u8]) -> Greeting {
        for piece in bytes.chunks(5) {
            c.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            match g.read() {
                (Heard::More, Some(next)) => g = next,
                (h, _) => panic!("wanted more, got {h:?}"),
            }
        }
        g
    }

    #[test]
    fn a_handshake_and_hello_are_read_in_pieces_and_never_past_the_end() {
        let job = Auth::with_secret(oxccl_core::auth::JobSecret::new(b"pieces-secret-0123", "test").unwrap());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // Each piece leaves at once (no Nagle waiting for an acknowledgement).
        c.set_nodelay(true).unwrap();
        let (s, from) = l.accept().unwrap();
        let (client, challenge) = auth::Client::start(&job, Purpose::NetTcp).unwrap();
        let g = feed(&mut c, Greeting::new(s, from, &job, None).unwrap(), &challenge);
        let mut response = [0u8; auth::RESPONSE_BYTES];
        c.read_exact(&mut response).unwrap();
        let proof = client.finish(&response).unwrap();
        let g = feed(&mut c, g, &proof[..proof.len() - 1]);
        c.write_all(&proof[proof.len() - 1..]).unwrap();
        let mut g = Some(g);
        let hello = Hello { rank: 3, stream: 1, streams: 2, nonce: "abc".into() }.encode();
        let mut sent = hello.clone();
        sent.extend_from_slice(b"LINK DATA");
        for (k, piece) in sent.chunks(5).enumerate() {
            c.write_all(piece).unwrap();
            c.flush().unwrap();
            std::thread::sleep(Duration::from_millis(2));
            let (heard, rest) = g.take().unwrap().read();
            match heard {
                Heard::More => g = rest,
                Heard::Hello(h, mut sock) => {
                    assert_eq!((h.rank, h.stream, h.streams, h.nonce.as_str()), (3, 1, 2, "abc"));
                    // What follows the hello is still in the socket, for the link.
                    c.write_all(&sent[(k + 1) * 5..]).unwrap();
                    sock.tcp().set_nonblocking(false).unwrap();
                    let mut rest = vec![0u8; sent.len() - hello.len()];
                    sock.read_exact(&mut rest).unwrap();
                    assert_eq!(rest, &sent[hello.len()..]);
                    return;
                }
                Heard::Dropped(why) | Heard::Refused(why) => panic!("dropped: {why}"),
            }
        }
        panic!("the hello never completed");
    }

    #[test]
    fn dialing_a_listener_connects_and_greets_every_stream() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hellos: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 20]).collect();
        let job = Auth::with_secret(oxccl_core::auth::JobSecret::new(b"dialing-secret-0123", "test").unwrap());
        let acceptor = {
            let job = job.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let (mut s, _) = l.accept().unwrap();
                    auth::server_blocking(&mut s, &job, Purpose::NetTcp).unwrap();
                    let mut b = [0u8; 20];
                    s.read_exact(&mut b).unwrap();
                    assert!(b.iter().all(|&x| x == b[0]));
                }
            })
        };
        let end = Instant::now() + Duration::from_secs(5);
        let mut d = Dialing::start(1, addr, hellos, &job, None).unwrap();
        let socks = loop {
            if let Some(s) = d.advance().unwrap() {
                break s;
            }
            assert!(Instant::now() < end);
        };
        assert_eq!(socks.len(), 3);
        acceptor.join().unwrap();
        // Nobody listening: an error naming the peer, not a hang.
        let gone = { TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap() };
        let r = Dialing::start(4, gone, vec![vec![0; 4]], &job, None).and_then(|mut d| loop {
            if let Some(s) = d.advance()? {
                break Ok(s);
            }
            assert!(Instant::now() < end + HANDSHAKE);
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("connect") && e.contains("peer rank 4"), "{e}");
    }
}
