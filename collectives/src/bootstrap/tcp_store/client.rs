//! The client side: a blocking connection over `std::net::TcpStream`, with TLS when
//! `OXCCL_TLS_*` say so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oxccl_core::auth::{self, Auth, Purpose};
use oxccl_core::store::{timeout_error, LossAction, Store, Watch};
use oxccl_core::{Error, Result};
use oxccl_transports::tls::{Sock, Tls};

use super::wire::{op, Fields, FrameBuf};
use super::{MAGIC, MAX_FRAME, MAX_WAIT_CHUNK, MIN_IO_TIMEOUT, PROTOCOL_VERSION};

fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// `now + d`, or about a year from now when that does not fit.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(365 * 86_400))).unwrap_or(now)
}

/// What went wrong talking to the server.
enum Io {
    Closed,
    TimedOut(Duration),
    Os(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for Io {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => Io::Closed,
            _ => Io::Os(e),
        }
    }
}

fn describe(addr: &str, what: &str, e: Io) -> String {
    match e {
        Io::Closed => format!("store at {addr} closed the connection ({what})"),
        Io::TimedOut(d) => format!("store at {addr} did not answer within {d:?} ({what})"),
        Io::Os(e) => format!("store at {addr}: {what} failed: {e}"),
        Io::Protocol(m) => format!("store at {addr}: {what}: {m}"),
    }
}

/// Sends one frame and reads the reply frame, waiting at most `limit` for it.
fn exchange(s: &mut Sock, frame: &[u8], limit: Duration) -> std::result::Result<(u8, Vec<u8>), Io> {
    s.tcp().set_write_timeout(Some(limit))?;
    s.write_all(frame)?;
    s.tcp().set_read_timeout(Some(limit))?;
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Io::TimedOut(limit),
        _ => Io::from(e),
    };
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(timed_out)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(Io::Protocol(format!("reply frame length {len} is outside 1..={MAX_FRAME}")));
    }
    let mut buf = Vec::new();
    (&mut *s).take(len as u64).read_to_end(&mut buf).map_err(timed_out)?;
    if buf.len() != len {
        return Err(Io::Closed);
    }
    let body = buf.split_off(1);
    Ok((buf[0], body))
}

enum Attempt {
    Retry(String),
    Fatal(Error),
}

fn connect_once(
    addr: &str,
    per_try: Duration,
    io_timeout: Duration,
    auth: &Auth,
) -> std::result::Result<Sock, Attempt> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| Attempt::Retry(format!("cannot resolve {addr}: {e}")))?.collect();
    let mut last = format!("{addr} resolves to no address");
    for sa in addrs {
        let tcp = match TcpStream::connect_timeout(&sa, per_try.max(Duration::from_millis(10))) {
            Ok(s) => s,
            Err(e) => {
                last = format!("connect to {sa}: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // Who we are, and who it is, before anything else (docs/security.md).
        let timeouts = tcp.set_read_timeout(Some(io_timeout)).and_then(|_| tcp.set_write_timeout(Some(io_timeout)));
        if let Err(e) = timeouts {
            last = describe(addr, "handshake", Io::from(e));
            continue;
        }
        let mut s = match auth.tls() {
            Some(p) => Tls::load(p).and_then(|t| t.client(tcp)).map_err(Attempt::Fatal)?,
            None => Sock::Plain(tcp),
        };
        match auth::client_blocking(&mut s, auth, Purpose::Store) {
            Ok(()) => {}
            Err(auth::Failed::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                let hint = if auth.tls().is_some() {
                    " (does the store run TLS too? OXCCL_TLS_* must be set on every rank and where the store runs)"
                } else {
                    ""
                };
                return Err(Attempt::Fatal(Error::Store(format!("store at {addr}: {e}{hint}"))));
            }
            Err(auth::Failed::Io(e)) => {
                last = describe(addr, "handshake", Io::from(e));
                continue;
            }
            Err(auth::Failed::Refused(m)) => {
                return Err(Attempt::Fatal(Error::Store(format!("store at {addr}: refused to trust it: {m}"))))
            }
        }
        let hello = FrameBuf::new(op::HELLO)
            .u32(MAGIC)
            .u16(PROTOCOL_VERSION)
            .finish()
            .map_err(|_| Attempt::Fatal(Error::Internal("hello frame over the frame limit".into())))?;
        let (opcode, body) = match exchange(&mut s, &hello, io_timeout) {
            Ok(r) => r,
            Err(Io::Protocol(m)) => return Err(Attempt::Fatal(Error::Store(describe(addr, "hello", Io::Protocol(m))))),
            Err(e) => {
                last = describe(addr, "hello", e);
                continue;
            }
        };
        let mut f = Fields(&body);
        let fatal = |m: String| Attempt::Fatal(Error::Store(format!("store at {addr}: {m}")));
        match opcode {
            op::HELLO => {
                let magic = f.u32("magic").map_err(fatal)?;
                let version = f.u16("version").map_err(fatal)?;
                if magic != MAGIC || version != PROTOCOL_VERSION {
                    return Err(fatal(format!(
                        "answered hello with magic 0x{magic:08x} version {version}; expected an OxCCL store speaking version {PROTOCOL_VERSION}"
                    )));
                }
                return Ok(s);
            }
            op::ERROR => {
                let msg = f.bytes("message").map(String::from_utf8_lossy).map_err(fatal)?;
                return Err(fatal(format!("refused the connection: {msg}")));
            }
            other => return Err(fatal(format!("answered hello with opcode 0x{other:02x}; is it an OxCCL store?"))),
        }
    }
    Err(Attempt::Retry(last))
}

fn connect_with_retry(addr: &str, timeout: Duration, io_timeout: Duration, auth: &Auth) -> Result<Sock> {
    let deadline = deadline_after(timeout);
    let mut backoff = Duration::from_millis(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match connect_once(addr, left.min(Duration::from_secs(5)), io_timeout, auth) {
            Ok(s) => return Ok(s),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(m)) => m,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                after: timeout,
                what: format!("connecting to the store at {addr} ({last}); is rank 0 or the launcher hosting it?"),
            });
        }
        tracing::debug!(%addr, "store not reachable yet: {last}");
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Idle connections a client keeps for later calls.
const MAX_IDLE: usize = 4;

/// A blocking client of a [`TcpStoreServer`](super::TcpStoreServer).
///
/// Each call takes an idle connection, or opens another when all are busy (a thread waiting in
/// `get` never blocks another thread's `set`), and puts it back when the reply is in. A
/// connection that failed is dropped; the next call connects again.
#[derive(Debug)]
pub struct TcpStore {
    addr: String,
    io_timeout: Duration,
    idle: Mutex<Vec<Sock>>,
    auth: Auth,
}

impl TcpStore {
    /// Connects to the store at `addr` (`host:port` or a `SocketAddr`), retrying with backoff
    /// until `timeout` passes, so ranks may start before the server. Every connection opens
    /// with the handshake of `auth` (the job secret, or none): a server that cannot prove the
    /// same secret is an error at once, not retried.
    pub fn connect(addr: impl std::fmt::Display, timeout: Duration, auth: &Auth) -> Result<TcpStore> {
        let addr = addr.to_string();
        let io_timeout = timeout.max(MIN_IO_TIMEOUT);
        let stream = connect_with_retry(&addr, timeout, io_timeout, auth)?;
        Ok(TcpStore { addr, io_timeout, idle: Mutex::new(vec![stream]), auth: auth.clone() })
    }

    /// The address it was connected with.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn frame(&self, f: FrameBuf, key: &str) -> Result<Vec<u8>> {
        f.finish().map_err(|n| {
            Error::invalid_arg(format!(
                "store key '{key}': request of {n} bytes is over the {MAX_FRAME}-byte frame limit"
            ))
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Sock>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request and its reply, whose opcode is one of `expect` (or an error). `wait` is how
    /// long the server may legitimately take.
    fn call(&self, frame: &[u8], wait: Duration, what: &str, expect: &[u8]) -> Result<(u8, Vec<u8>)> {
        self.call_limited(frame, wait, what, expect, None)
    }

    /// [`TcpStore::call`]; with `limit`, one connection attempt and every wait bounded by it.
    fn call_limited(
        &self,
        frame: &[u8],
        wait: Duration,
        what: &str,
        expect: &[u8],
        limit: Option<Duration>,
    ) -> Result<(u8, Vec<u8>)> {
        let pooled = self.idle().pop();
        let mut stream = match (pooled, limit) {
            (Some(s), _) => s,
            (None, None) => connect_with_retry(
                &self.addr,
                self.io_timeout.min(Duration::from_secs(10)),
                self.io_timeout,
                &self.auth,
            )?,
            (None, Some(l)) => connect_once(&self.addr, l, l, &self.auth).map_err(|e| match e {
                Attempt::Fatal(e) => e,
                Attempt::Retry(m) => Error::Store(m),
            })?,
        };
        let io = limit.unwrap_or_else(|| self.io_timeout.saturating_add(wait));
        // On any failure below the stream is dropped: it may be out of step with the server.
        let (opcode, body) =
            exchange(&mut stream, frame, io).map_err(|e| Error::Store(describe(&self.addr, what, e)))?;
        if opcode != op::ERROR && !expect.contains(&opcode) {
            return Err(self.unexpected(what, opcode));
        }
        {
            let mut idle = self.idle();
            if idle.len() < MAX_IDLE {
                idle.push(stream);
            }
        }
        if opcode == op::ERROR {
            let msg = Fields(&body).bytes("message").map(|m| String::from_utf8_lossy(m).into_owned());
            return Err(Error::Store(format!("store at {}: {what}: {}", self.addr, msg.unwrap_or_else(|e| e))));
        }
        Ok((opcode, body))
    }

    fn unexpected(&self, what: &str, opcode: u8) -> Error {
        Error::Store(format!("store at {}: {what}: unexpected reply opcode 0x{opcode:02x}", self.addr))
    }

    fn body_err(&self, what: &str, m: String) -> Error {
        Error::Store(format!("store at {}: {what}: bad reply: {m}", self.addr))
    }
}

/// A [`Watch`] on its own connection: the server carries out the loss actions if that
/// connection ends without a `DISARM` (this process was killed, or its host vanished).
#[derive(Debug)]
struct TcpWatch {
    stream: Mutex<Sock>,
    addr: String,
}

impl Watch for TcpWatch {
    fn store_gone(&self) -> bool {
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let s = s.tcp();
        let mut b = [0u8; 1];
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        // The server never sends on this connection unasked: readable means end of stream
        // (or a reset), i.e. the server is gone.
        let gone = match s.peek(&mut b) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        let _ = s.set_nonblocking(false);
        gone
    }
}

impl Drop for TcpWatch {
    fn drop(&mut self) {
        let s = self.stream.get_mut().unwrap_or_else(|e| e.into_inner());
        let Ok(frame) = FrameBuf::new(op::DISARM).finish() else { return };
        match exchange(s, &frame, Duration::from_secs(5)) {
            Ok((op::OK, _)) => {}
            Ok((other, _)) => tracing::warn!(addr = %self.addr, "store answered disarm with opcode 0x{other:02x}"),
            Err(e) => tracing::debug!("{}", describe(&self.addr, "disarm", e)),
        }
    }
}

impl Store for TcpStore {
    fn try_get_within(&self, key: &str, limit: Duration) -> Result<Option<Vec<u8>>> {
        let frame = self.frame(FrameBuf::new(op::TRY_GET).bytes(key.as_bytes()), key)?;
        let what = format!("try_get '{key}'");
        match self.call_limited(&frame, Duration::ZERO, &what, &[op::VALUE, op::NOT_FOUND], Some(limit))? {
            (op::VALUE, body) => Ok(Some(Fields(&body).bytes("value").map_err(|m| self.body_err(&what, m))?.to_vec())),
            (op::NOT_FOUND, _) => Ok(None),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn add_within(&self, key: &str, delta: i64, limit: Duration) -> Result<i64> {
        let frame = self.frame(FrameBuf::new(op::ADD).bytes(key.as_bytes()).i64(delta), key)?;
        let what = format!("add to '{key}'");
        match self.call_limited(&frame, Duration::ZERO, &what, &[op::COUNTER], Some(limit))? {
            (op::COUNTER, body) => Fields(&body).i64("counter").map_err(|m| self.body_err(&what, m)),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn set_within(&self, key: &str, value: &[u8], limit: Duration) -> Result<()> {
        let frame = self.frame(FrameBuf::new(op::SET).bytes(key.as_bytes()).bytes(value), key)?;
        let what = format!("set '{key}'");
        match self.call_limited(&frame, Duration::ZERO, &what, &[op::OK], Some(limit))? {
            (op::OK, _) => Ok(()),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn watch(&self, actions: &[LossAction]) -> Result<Option<Box<dyn Watch>>> {
        let mut stream =
            connect_with_retry(&self.addr, self.io_timeout.min(Duration::from_secs(10)), self.io_timeout, &self.auth)?;
        // A store host that vanishes without closing (power, partition) is found by keepalive.
        super::keepalive(stream.tcp());
        let frame = super::wire::put_actions(FrameBuf::new(op::WATCH), actions)
            .finish()
            .map_err(|n| Error::invalid_arg(format!("store watch of {n} bytes is over the frame limit")))?;
        let what = "watch";
        match exchange(&mut stream, &frame, self.io_timeout).map_err(|e| Error::Store(describe(&self.addr, what, e)))? {
            (op::OK, _) => Ok(Some(Box::new(TcpWatch { stream: Mutex::new(stream), addr: self.addr.clone() }))),
            (op::ERROR, body) => {
                let msg = Fields(&body).bytes("message").map(|m| String::from_utf8_lossy(m).into_owned());
                Err(Error::Store(format!("store at {}: {what}: {}", self.addr, msg.unwrap_or_else(|e| e))))
            }
            (other, _) => Err(self.unexpected(what, other)),
        }
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let frame = self.frame(FrameBuf::new(op::SET).bytes(key.as_bytes()).bytes(value), key)?;
        let what = format!("set '{key}'");
        match self.call(&frame, Duration::ZERO, &what, &[op::OK])? {
            (op::OK, _) => Ok(()),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let frame = self.frame(FrameBuf::new(op::TRY_GET).bytes(key.as_bytes()), key)?;
        let what = format!("try_get '{key}'");
        match self.call(&frame, Duration::ZERO, &what, &[op::VALUE, op::NOT_FOUND])? {
            (op::VALUE, body) => Ok(Some(Fields(&body).bytes("value").map_err(|m| self.body_err(&what, m))?.to_vec())),
            (op::NOT_FOUND, _) => Ok(None),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = deadline_after(timeout);
        let what = format!("get '{key}'");
        loop {
            let chunk = deadline.saturating_duration_since(Instant::now()).min(MAX_WAIT_CHUNK);
            let frame = self.frame(FrameBuf::new(op::GET).bytes(key.as_bytes()).u64(ceil_ms(chunk)), key)?;
            match self.call(&frame, chunk, &what, &[op::VALUE, op::TIMEOUT])? {
                (op::VALUE, body) => {
                    return Ok(Fields(&body).bytes("value").map_err(|m| self.body_err(&what, m))?.to_vec())
                }
                (op::TIMEOUT, _) if Instant::now() >= deadline => return Err(timeout_error(key, timeout)),
                (op::TIMEOUT, _) => {}
                (other, _) => return Err(self.unexpected(&what, other)),
            }
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let frame = self.frame(FrameBuf::new(op::ADD).bytes(key.as_bytes()).i64(delta), key)?;
        let what = format!("add to '{key}'");
        match self.call(&frame, Duration::ZERO, &what, &[op::COUNTER])? {
            (op::COUNTER, body) => Fields(&body).i64("counter").map_err(|m| self.body_err(&what, m)),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let frame = self.frame(FrameBuf::new(op::DELETE).bytes(key.as_bytes()), key)?;
        let what = format!("delete '{key}'");
        match self.call(&frame, Duration::ZERO, &what, &[op::DELETED])? {
            (op::DELETED, body) => Ok(Fields(&body).u8("flag").map_err(|m| self.body_err(&what, m))? != 0),
            (other, _) => Err(self.unexpected(&what, other)),
        }
    }
}
