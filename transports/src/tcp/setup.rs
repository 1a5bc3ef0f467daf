//! Setting up net-tcp links without blocking: the lower rank of a pair dials (non-blocking
//! connect, then its hello, written as the socket takes it); the higher rank accepts and
//! reads each hello as its bytes arrive. A stranger at the listener that says nothing, or
//! too little, costs one idle socket for [`HANDSHAKE`] at most, never a stalled collective.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use oxccl_core::{Error, Result};

use super::wire::Hello;
use super::T;

/// How long a connection may take to be made and greeted.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(2);

/// Bytes of a hello before its nonce.
const FIXED: usize = 16;

/// One outgoing stream on its way up.
#[derive(Debug)]
enum Out {
    /// connect() in progress; the hello to write once connected.
    Connecting(Socket, Vec<u8>),
    /// Connected; these hello bytes are still to be written.
    Greeting(TcpStream, Vec<u8>),
    /// Connected and greeted.
    Ready(TcpStream),
}

/// The streams the lower rank of a pair is dialing.
#[derive(Debug)]
pub(crate) struct Dialing {
    peer: usize,
    since: Instant,
    out: Vec<Out>,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EINPROGRESS)
}

impl Dialing {
    /// Starts one non-blocking connection to `addr` per hello (one per stream).
    pub(crate) fn start(peer: usize, addr: SocketAddr, hellos: Vec<Vec<u8>>) -> Result<Dialing> {
        let mut out = Vec::with_capacity(hellos.len());
        for hello in hellos {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| Error::os(T, "socket", Some(peer), e))?;
            s.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", Some(peer), e))?;
            match s.connect(&addr.into()) {
                Ok(()) => out.push(Out::Greeting(s.into(), hello)),
                Err(e) if would_block(&e) => out.push(Out::Connecting(s, hello)),
                Err(e) => return Err(Error::os(T, "connect", Some(peer), e)),
            }
        }
        Ok(Dialing { peer, since: Instant::now(), out })
    }

    /// Moves every stream as far as it goes without blocking; the streams once all are
    /// connected and greeted.
    pub(crate) fn advance(&mut self) -> Result<Option<Vec<TcpStream>>> {
        let peer = self.peer;
        let mut next = Vec::with_capacity(self.out.len());
        for o in std::mem::take(&mut self.out) {
            next.push(step(peer, o)?);
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
        if self.since.elapsed() > HANDSHAKE {
            return Err(Error::os(
                T,
                "connect",
                Some(peer),
                std::io::Error::new(ErrorKind::TimedOut, format!("not connected and greeted after {HANDSHAKE:?}")),
            ));
        }
        Ok(None)
    }

    /// Descriptors to poll while waiting: writability of every stream not yet greeted.
    pub(crate) fn wait_fds(&self, out: &mut Vec<(RawFd, bool)>) {
        for o in &self.out {
            match o {
                Out::Connecting(s, _) => out.push((s.as_raw_fd(), true)),
                Out::Greeting(s, _) => out.push((s.as_raw_fd(), true)),
                Out::Ready(_) => {}
            }
        }
    }
}

/// One stream, as far as it goes now.
fn step(peer: usize, o: Out) -> Result<Out> {
    let o = match o {
        Out::Connecting(s, hello) => {
            if let Some(e) = s.take_error().map_err(|e| Error::os(T, "connect", Some(peer), e))? {
                return Err(Error::os(T, "connect", Some(peer), e));
            }
            match s.peer_addr() {
                Ok(_) => Out::Greeting(s.into(), hello),
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(Out::Connecting(s, hello)),
                Err(e) => return Err(Error::os(T, "connect", Some(peer), e)),
            }
        }
        o => o,
    };
    let Out::Greeting(mut s, mut rest) = o else { return Ok(o) };
    while !rest.is_empty() {
        match s.write(&rest) {
            Ok(0) => return Err(Error::os(T, "hello", Some(peer), ErrorKind::WriteZero.into())),
            Ok(n) => {
                rest.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if would_block(&e) => return Ok(Out::Greeting(s, rest)),
            Err(e) => return Err(Error::os(T, "hello", Some(peer), e)),
        }
    }
    Ok(Out::Ready(s))
}

/// An accepted connection whose hello is still arriving.
#[derive(Debug)]
pub(crate) struct Greeting {
    sock: TcpStream,
    from: SocketAddr,
    since: Instant,
    buf: Vec<u8>,
    /// The fixed part, once read: the hello and its nonce's length.
    head: Option<(Hello, usize)>,
}

/// What reading a greeting gave.
#[derive(Debug)]
pub(crate) enum Heard {
    /// Not all of it yet.
    More,
    /// The whole hello (to be checked by the caller).
    Hello(Hello, TcpStream),
    /// Dropped, and why (a stranger: a warning, not an error of the communicator).
    Dropped(String),
}

impl Greeting {
    pub(crate) fn new(sock: TcpStream, from: SocketAddr) -> Result<Greeting> {
        sock.set_nonblocking(true).map_err(|e| Error::os(T, "set_nonblocking", None, e))?;
        Ok(Greeting { sock, from, since: Instant::now(), buf: Vec::with_capacity(FIXED), head: None })
    }

    /// Where it comes from.
    pub(crate) fn from(&self) -> SocketAddr {
        self.from
    }

    /// Reads what has arrived of the hello, never past its end (the bytes after it belong to
    /// the link).
    pub(crate) fn read(mut self) -> (Heard, Option<Greeting>) {
        loop {
            let want = match &self.head {
                None => FIXED,
                Some((_, n)) => FIXED + n,
            };
            if self.buf.len() == want {
                match self.head.take() {
                    None => {
                        let fixed: [u8; FIXED] = self.buf[..FIXED].try_into().expect("16 bytes");
                        match Hello::decode_fixed(&fixed) {
                            Ok(h) => self.head = Some(h),
                            Err(e) => return (Heard::Dropped(e.to_string()), None),
                        }
                        continue;
                    }
                    Some((mut h, _)) => {
                        h.nonce = String::from_utf8_lossy(&self.buf[FIXED..]).into_owned();
                        return (Heard::Hello(h, self.sock), None);
                    }
                }
            }
            let mut chunk = [0u8; FIXED + super::wire::MAX_NONCE];
            let need = want - self.buf.len();
            match self.sock.read(&mut chunk[..need]) {
                Ok(0) => return (Heard::Dropped("closed before its hello was complete".into()), None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.since.elapsed() > HANDSHAKE {
                        let why = format!("no complete hello after {HANDSHAKE:?} ({} bytes)", self.buf.len());
                        return (Heard::Dropped(why), None);
                    }
                    return (Heard::More, Some(self));
                }
                Err(e) => return (Heard::Dropped(format!("reading its hello: {e}")), None),
            }
        }
    }

    /// Its descriptor, polled for readability while waiting.
    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_hello_is_read_in_pieces_and_never_past_its_end() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, from) = l.accept().unwrap();
        let mut g = Some(Greeting::new(s, from).unwrap());
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
                    sock.set_nonblocking(false).unwrap();
                    let mut rest = vec![0u8; sent.len() - hello.len()];
                    sock.read_exact(&mut rest).unwrap();
                    assert_eq!(rest, &sent[hello.len()..]);
                    return;
                }
                Heard::Dropped(why) => panic!("dropped: {why}"),
            }
        }
        panic!("the hello never completed");
    }

    #[test]
    fn dialing_a_listener_connects_and_greets_every_stream() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let hellos: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 20]).collect();
        let mut d = Dialing::start(1, l.local_addr().unwrap(), hellos).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        let socks = loop {
            if let Some(s) = d.advance().unwrap() {
                break s;
            }
            assert!(Instant::now() < end);
        };
        assert_eq!(socks.len(), 3);
        for _ in 0..3 {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 20];
            s.read_exact(&mut b).unwrap();
            assert!(b.iter().all(|&x| x == b[0]));
        }
        // Nobody listening: an error naming the peer, not a hang.
        let gone = { TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap() };
        let r = Dialing::start(4, gone, vec![vec![0; 4]]).and_then(|mut d| loop {
            if let Some(s) = d.advance()? {
                break Ok(s);
            }
            assert!(Instant::now() < end + HANDSHAKE);
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("connect") && e.contains("peer rank 4"), "{e}");
    }
}
