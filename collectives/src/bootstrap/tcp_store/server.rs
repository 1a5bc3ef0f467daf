//! The server side: a tokio current-thread runtime on its own thread, one task per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use oxccl_core::auth::{self, Answer, Auth, Purpose};
use oxccl_core::store::{parse_counter, LossAction};
use oxccl_core::{Error, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, Notify};

use super::wire::{op, Fields, FrameBuf};
use super::{MAGIC, MAX_FRAME, MAX_SERVER_WAIT, PROTOCOL_VERSION};

#[derive(Default)]
struct ServerState {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Notify,
    auth: Auth,
    /// TLS, when `OXCCL_TLS_*` turn it on.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How long a new connection has to complete the handshake: a stranger that connects and says
/// nothing holds one idle socket this long at most.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

impl ServerState {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, key: &str, value: &[u8]) {
        self.lock().insert(key.to_string(), value.to_vec());
        self.changed.notify_waiters();
    }
    fn add(&self, key: &str, delta: i64) -> std::result::Result<i64, String> {
        let mut m = self.lock();
        let cur = match m.get(key) {
            Some(v) => parse_counter(key, v).map_err(|e| match e {
                Error::Store(s) => s,
                other => other.to_string(),
            })?,
            None => 0,
        };
        let new = cur.wrapping_add(delta);
        m.insert(key.to_string(), new.to_string().into_bytes());
        drop(m);
        self.changed.notify_waiters();
        Ok(new)
    }
}

impl ServerState {
    /// Carries out the loss actions of a client that went away without disarming them.
    fn lose(&self, actions: &[LossAction]) {
        let mut m = self.lock();
        for a in actions {
            match a {
                LossAction::SetIfAbsent { key, value } => {
                    m.entry(key.clone()).or_insert_with(|| value.clone());
                }
                LossAction::Add { key, delta } => {
                    let cur = m.get(key).and_then(|v| parse_counter(key, v).ok()).unwrap_or(0);
                    m.insert(key.clone(), cur.wrapping_add(*delta).to_string().into_bytes());
                }
                LossAction::Delete { key } => {
                    m.remove(key);
                }
            }
        }
        drop(m);
        self.changed.notify_waiters();
    }
}

/// Why the server stopped serving one connection.
enum ConnEnd {
    /// The client went away (EOF at a frame boundary, reset): logged at debug level.
    Gone(String),
    /// The client broke the protocol: logged as a warning.
    Bad(String),
    /// The client failed the handshake: logged once per address (docs/security.md).
    Refused(String),
}

impl From<String> for ConnEnd {
    /// Field errors are protocol errors.
    fn from(why: String) -> Self {
        ConnEnd::Bad(why)
    }
}

/// Most loss actions one connection may register.
const MAX_ARMED: usize = 4096;

/// The two halves of a connection, plain or TLS.
type Reader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

struct Conn {
    rd: Reader,
    wr: Writer,
    /// The TCP socket underneath (for keepalive).
    fd: std::os::fd::RawFd,
    /// What to do if this connection ends before a `DISARM` (its process was lost).
    armed: Vec<LossAction>,
}

impl Conn {
    /// The next frame (opcode first), or `None` at a clean end of stream.
    async fn read_frame(&mut self) -> std::result::Result<Option<Vec<u8>>, ConnEnd> {
        let io = |e: std::io::Error| ConnEnd::Gone(format!("read failed: {e}"));
        if self.rd.fill_buf().await.map_err(io)?.is_empty() {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.rd.read_exact(&mut len).await.map_err(|_| ConnEnd::Bad("truncated frame length".into()))?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(ConnEnd::Bad(format!("frame length {len} is outside 1..={MAX_FRAME}")));
        }
        // Grows with the bytes that actually arrive, so a lying length costs nothing.
        let mut buf = Vec::new();
        (&mut self.rd).take(len as u64).read_to_end(&mut buf).await.map_err(io)?;
        if buf.len() != len {
            return Err(ConnEnd::Bad(format!("truncated frame: {} of {len} bytes before end of stream", buf.len())));
        }
        Ok(Some(buf))
    }

    async fn send(&mut self, f: FrameBuf) -> std::result::Result<(), ConnEnd> {
        let frame = f.finish().map_err(|n| ConnEnd::Bad(format!("reply of {n} bytes is over the frame limit")))?;
        self.wr.write_all(&frame).await.map_err(|e| ConnEnd::Gone(format!("write failed: {e}")))
    }

    /// The handshake: nothing else is read, and nothing revealed, until the client proved the
    /// job secret.
    async fn handshake(&mut self, auth: &Auth) -> std::result::Result<(), ConnEnd> {
        let mut c = [0u8; auth::CHALLENGE_BYTES];
        self.rd.read_exact(&mut c).await.map_err(|e| ConnEnd::Gone(format!("no handshake: {e}")))?;
        match auth::Server::answer(auth, Purpose::Store, &c) {
            Answer::Refuse(r, why) => {
                if let Some(r) = r {
                    let _ = self.wr.write_all(&r).await;
                }
                Err(ConnEnd::Refused(why))
            }
            Answer::Go(server, r) => {
                self.wr.write_all(&r).await.map_err(|e| ConnEnd::Gone(format!("write failed: {e}")))?;
                let mut p = [0u8; auth::PROOF_BYTES];
                self.rd.read_exact(&mut p).await.map_err(|e| ConnEnd::Gone(format!("no handshake proof: {e}")))?;
                server.check(&p).map_err(ConnEnd::Refused)
            }
        }
    }

    async fn run(&mut self, state: &ServerState) -> std::result::Result<(), ConnEnd> {
        match tokio::time::timeout(HANDSHAKE_LIMIT, self.handshake(&state.auth)).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnEnd::Refused(format!("no complete handshake within {HANDSHAKE_LIMIT:?}"))),
        }
        let Some(hello) = self.read_frame().await? else {
            return Err(ConnEnd::Gone("closed before hello".into()));
        };
        let mut f = Fields(&hello[1..]);
        if hello[0] != op::HELLO {
            return Err(ConnEnd::Bad(format!("first frame has opcode 0x{:02x}, not hello", hello[0])));
        }
        let (magic, version) = (f.u32("magic")?, f.u16("version")?);
        if magic != MAGIC {
            return Err(ConnEnd::Bad(format!("bad magic 0x{magic:08x} (not an OxCCL store client)")));
        }
        if version != PROTOCOL_VERSION {
            let msg = format!("protocol version {version} is not supported (the store speaks {PROTOCOL_VERSION})");
            // Best effort: tell the client why before closing.
            let _ = self.send(FrameBuf::new(op::ERROR).bytes(msg.as_bytes())).await;
            return Err(ConnEnd::Bad(msg));
        }
        self.send(FrameBuf::new(op::HELLO).u32(MAGIC).u16(PROTOCOL_VERSION)).await?;
        while let Some(frame) = self.read_frame().await? {
            let reply = self.request(state, frame[0], Fields(&frame[1..])).await?;
            self.send(reply).await?;
        }
        Err(ConnEnd::Gone("client disconnected".into()))
    }

    async fn request(
        &mut self,
        state: &ServerState,
        opcode: u8,
        mut f: Fields<'_>,
    ) -> std::result::Result<FrameBuf, ConnEnd> {
        let reply = match opcode {
            op::SET => {
                let (key, value) = (f.str("key")?, f.bytes("value")?);
                f.end()?;
                state.set(key, value);
                FrameBuf::new(op::OK)
            }
            op::GET => {
                let (key, ms) = (f.str("key")?, f.u64("wait")?);
                f.end()?;
                self.get_wait(state, key, Duration::from_millis(ms).min(MAX_SERVER_WAIT)).await?
            }
            op::TRY_GET => {
                let key = f.str("key")?;
                f.end()?;
                match state.lock().get(key) {
                    Some(v) => FrameBuf::new(op::VALUE).bytes(v),
                    None => FrameBuf::new(op::NOT_FOUND),
                }
            }
            op::ADD => {
                let (key, delta) = (f.str("key")?, f.i64("delta")?);
                f.end()?;
                match state.add(key, delta) {
                    Ok(n) => FrameBuf::new(op::COUNTER).i64(n),
                    Err(msg) => FrameBuf::new(op::ERROR).bytes(msg.as_bytes()),
                }
            }
            op::DELETE => {
                let key = f.str("key")?;
                f.end()?;
                let was = state.lock().remove(key).is_some();
                FrameBuf::new(op::DELETED).put(&[u8::from(was)])
            }
            op::WATCH => {
                let actions = super::wire::take_actions(&mut f)?;
                if self.armed.len() + actions.len() > MAX_ARMED {
                    return Err(ConnEnd::Bad(format!("more than {MAX_ARMED} loss actions on one connection")));
                }
                // The watching process may vanish without closing: keepalive finds it.
                super::keepalive(&self.fd);
                self.armed.extend(actions);
                FrameBuf::new(op::OK)
            }
            op::DISARM => {
                f.end()?;
                self.armed.clear();
                FrameBuf::new(op::OK)
            }
            other => return Err(ConnEnd::Bad(format!("unknown opcode 0x{other:02x}"))),
        };
        Ok(reply)
    }

    /// Waits up to `wait` for `key`; gives up early when the client goes away.
    async fn get_wait(
        &mut self,
        state: &ServerState,
        key: &str,
        wait: Duration,
    ) -> std::result::Result<FrameBuf, ConnEnd> {
        let deadline = tokio::time::Instant::now() + wait;
        // A well-behaved client sends nothing while it waits, so readable data here can only be
        // end of stream; once real data is buffered, stop watching (it would be ready forever).
        let mut watch_eof = self.rd.buffer().is_empty();
        loop {
            let notified = state.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a set between the check and the await is seen.
            notified.as_mut().enable();
            if let Some(v) = state.lock().get(key) {
                return Ok(FrameBuf::new(op::VALUE).bytes(v));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(FrameBuf::new(op::TIMEOUT)),
                r = self.rd.fill_buf(), if watch_eof => match r {
                    Ok([]) => return Err(ConnEnd::Gone(format!("client left while waiting for key '{key}'"))),
                    Ok(_) => watch_eof = false,
                    Err(e) => return Err(ConnEnd::Gone(format!("read failed: {e}"))),
                },
            }
        }
    }
}

async fn serve_conn(stream: tokio::net::TcpStream, peer: SocketAddr, state: Arc<ServerState>) {
    use std::os::fd::AsRawFd;
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let (rd, wr): (Box<dyn AsyncRead + Unpin + Send>, Writer) = match &state.tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let (rd, wr) = tokio::io::split(tls);
                (Box::new(rd), Box::new(wr))
            }
            Ok(Err(e)) => return auth::refused(peer.ip(), "store", &format!("TLS: {e}")),
            Err(_) => {
                return auth::refused(peer.ip(), "store", &format!("no TLS handshake within {HANDSHAKE_LIMIT:?}"))
            }
        },
    };
    let mut conn = Conn { rd: BufReader::new(rd), wr, fd, armed: Vec::new() };
    match conn.run(&state).await {
        Ok(()) => {}
        Err(ConnEnd::Gone(why)) => tracing::debug!(%peer, "store connection closed: {why}"),
        Err(ConnEnd::Bad(why)) => tracing::warn!(%peer, "store: closing connection: {why}"),
        Err(ConnEnd::Refused(why)) => auth::refused(peer.ip(), "store", &why),
    }
    if !conn.armed.is_empty() {
        tracing::info!(%peer, actions = conn.armed.len(), "store: a watching client was lost; carrying out its loss actions");
        state.lose(&conn.armed);
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    mut shutdown: oneshot::Receiver<()>,
    auth: Auth,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let state = Arc::new(ServerState { auth, tls, ..Default::default() });
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_conn(stream, peer, state.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("store: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// A TCP store server: a tokio current-thread runtime serving on its own thread.
///
/// Dropping it stops the server, closes every connection and joins the thread.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port) and starts serving clients that pass the
    /// handshake of `auth`. Beyond loopback, `auth` must hold a job secret or allow running
    /// without one ([`Auth::check_listen`]).
    pub fn start(addr: SocketAddr, auth: &Auth) -> Result<TcpStoreServer> {
        auth.check_listen("the rendezvous store", addr.ip())?;
        let tls = match auth.tls() {
            Some(p) => Some(tokio_rustls::TlsAcceptor::from(oxccl_transports::tls::Tls::load(p)?.server_config())),
            None => None,
        };
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| Error::Store(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| Error::Store(format!("listener on {addr}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Store(format!("listener on {local}: cannot make it non-blocking: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::Store(format!("store server on {local}: cannot start a tokio runtime: {e}")))?;
        let listener = {
            let _ctx = rt.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::Store(format!("store server on {local}: cannot register the listener: {e}")))?
        };
        let (tx, rx) = oneshot::channel();
        let auth = auth.clone();
        let thread = std::thread::Builder::new()
            .name(format!("oxccl-store-{}", local.port()))
            .spawn(move || {
                rt.block_on(serve(listener, rx, auth, tls));
                // Dropping `rt` here cancels the connection tasks, which closes their sockets.
            })
            .map_err(|e| Error::Store(format!("store server on {local}: cannot start its thread: {e}")))?;
        tracing::info!(addr = %local, "store server listening");
        Ok(TcpStoreServer { addr: local, shutdown: Some(tx), thread: Some(thread) })
    }

    /// The address it listens on (with the real port when started with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the process ends (what `oxccl store` runs).
    pub fn serve_forever(mut self) -> Result<()> {
        // Keep the shutdown sender alive: dropping it would stop the server.
        let _keep = self.shutdown.take();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Internal(format!("store server thread on {} panicked", self.addr))),
            None => Ok(()),
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(addr = %self.addr, "store server thread panicked");
            }
        }
    }
}
