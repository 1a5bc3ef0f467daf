//! Who may connect: the job secret, and the handshake every OxCCL TCP connection opens with.
//!
//! A job's ranks share a secret ([`JobSecret`]): `oxccl launch` makes one for its ranks;
//! otherwise it comes from `OXCCL_JOB_SECRET` or from the file `OXCCL_JOB_SECRET_FILE` names.
//! Every TCP connection OxCCL opens (store clients and watches, net-tcp links) starts with a
//! mutual challenge-response keyed by it, before the accepting side changes or reveals any
//! state. The secret itself never crosses the wire.
//!
//! # The handshake
//!
//! The side that connects is the client, the side that accepts the server.
//!
//! 1. client → server, *challenge* ([`CHALLENGE_BYTES`]): `OXAU`, version 1, mode (0: no
//!    secret, 1: HMAC-SHA256), purpose (1: store, 2: net-tcp), a zero byte, then a fresh
//!    32-byte nonce `nc` from the operating system's random source.
//! 2. server → client, *response* ([`RESPONSE_BYTES`]): `OXAU`, version, mode, purpose, a
//!    status (0: go on, else why not), a fresh nonce `ns`, and
//!    `HMAC-SHA256(secret, "oxccl-auth-v1 server" ‖ purpose ‖ nc ‖ ns)` (zeros in mode 0).
//! 3. client → server, *proof* ([`PROOF_BYTES`]): `OXAP`, then
//!    `HMAC-SHA256(secret, "oxccl-auth-v1 client" ‖ purpose ‖ nc ‖ ns)`, followed at once by the
//!    protocol's own first bytes.
//!
//! The client checks the server's MAC before it sends its proof or anything else; the server
//! checks the proof before it reads anything more. Both MACs cover both nonces, so a recorded
//! handshake replayed later fails (the other side's nonce is new), and the two directions use
//! different labels, so an answer cannot be reflected back. The purpose is covered too: a
//! proof made for the store opens no net-tcp link. An honest client whose server's MAC checks
//! out holds the same secret, so its proof will check out as well: the client waits for no
//! verdict, and the handshake costs one round trip. A server refuses by closing the
//! connection, logging the peer's address at warn level once per address ([`refused`]).
//!
//! Without a secret on either side (mode 0) the same messages go back and forth with zero
//! MACs: the framing and the errors for a secret on one side only stay the same. What runs
//! without a secret is decided by [`Auth::check_listen`]: loopback only, unless the user says
//! `OXCCL_ALLOW_UNAUTHENTICATED=1`.
//!
//! This authenticates who opens a connection; it does not hide or protect the bytes that
//! follow from someone who can read or alter traffic on the path (that is what TLS is for).

use std::collections::HashSet;
use std::fmt;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a MAC (HMAC-SHA256).
pub const MAC_BYTES: usize = 32;
/// Bytes of the client's challenge.
pub const CHALLENGE_BYTES: usize = 8 + NONCE_BYTES;
/// Bytes of the server's response.
pub const RESPONSE_BYTES: usize = 8 + NONCE_BYTES + MAC_BYTES;
/// Bytes of the client's proof.
pub const PROOF_BYTES: usize = 4 + MAC_BYTES;
/// The shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

const MAGIC: [u8; 4] = *b"OXAU";
const PROOF_MAGIC: [u8; 4] = *b"OXAP";
const VERSION: u8 = 1;
const MODE_NONE: u8 = 0;
const MODE_HMAC: u8 = 1;
const SERVER_LABEL: &[u8] = b"oxccl-auth-v1 server";
const CLIENT_LABEL: &[u8] = b"oxccl-auth-v1 client";

/// Response statuses.
mod status {
    pub const GO: u8 = 0;
    pub const SECRET_REQUIRED: u8 = 1;
    pub const NO_SECRET_HERE: u8 = 2;
    pub const WRONG_PURPOSE: u8 = 3;
    pub const VERSION: u8 = 4;
    /// The client opened with TLS and this side runs without it.
    pub const NO_TLS_HERE: u8 = 5;
}

/// What a connection is for; covered by the MACs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The rendezvous store (clients and watches).
    Store,
    /// A net-tcp link between two ranks.
    NetTcp,
}

impl Purpose {
    fn byte(self) -> u8 {
        match self {
            Purpose::Store => 1,
            Purpose::NetTcp => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Purpose> {
        match b {
            1 => Some(Purpose::Store),
            2 => Some(Purpose::NetTcp),
            _ => None,
        }
    }
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Store => "the rendezvous store",
            Purpose::NetTcp => "a net-tcp link",
        }
    }
}

/// A job's shared secret: at least [`MIN_SECRET_BYTES`] bytes, never printed, zeroed when
/// dropped.
pub struct JobSecret {
    key: Box<[u8]>,
    origin: String,
}

impl JobSecret {
    /// A secret of these bytes; `origin` says where it came from (for messages, e.g.
    /// `OXCCL_JOB_SECRET`).
    pub fn new(bytes: &[u8], origin: &str) -> Result<JobSecret> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::invalid_arg(format!(
                "{origin}: the job secret is {} bytes; use at least {MIN_SECRET_BYTES} (e.g. the output of \
                 `openssl rand -hex 32`)",
                bytes.len()
            )));
        }
        Ok(JobSecret { key: bytes.into(), origin: origin.to_string() })
    }

    /// A fresh random secret (what `oxccl launch` and `ncclGetUniqueId` make): 32 random bytes
    /// written as 64 hexadecimal digits.
    pub fn generate(origin: &str) -> Result<JobSecret> {
        let mut raw = [0u8; 32];
        fill_random(&mut raw)?;
        let hex = hex(&raw);
        raw.fill(0);
        JobSecret::new(hex.as_bytes(), origin)
    }

    /// Where it came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Its bytes, to hand to the job's own ranks (a launcher's child environment, an NCCL
    /// unique id). Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.key
    }

    fn mac(&self, label: &[u8], purpose: u8, nc: &[u8], ns: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        m.update(label);
        m.update(&[purpose]);
        m.update(nc);
        m.update(ns);
        m
    }
}

impl Drop for JobSecret {
    fn drop(&mut self) {
        for b in self.key.iter_mut() {
            // SAFETY: a valid, aligned, exclusive pointer into our own buffer; volatile so the
            // zeroing is not optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobSecret({} bytes from {}, not shown)", self.key.len(), self.origin)
    }
}

/// Lowercase hexadecimal.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fills `out` from the operating system's random source.
pub fn fill_random(out: &mut [u8]) -> Result<()> {
    getrandom::getrandom(out).map_err(|e| Error::Internal(format!("the operating system's random source failed: {e}")))
}

/// Where TLS's certificate, key and certificate authority are (`OXCCL_TLS_CERT`,
/// `OXCCL_TLS_KEY`, `OXCCL_TLS_CA`: PEM files).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsPaths {
    /// This process's certificate chain.
    pub cert: String,
    /// Its private key.
    pub key: String,
    /// The certificate authority every peer's certificate must chain to.
    pub ca: String,
}

/// How a process authenticates its connections: its job secret, if any, whether the user
/// allowed listening beyond loopback without one, and TLS's files when TLS is on. Cheap to
/// clone.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    secret: Option<Arc<JobSecret>>,
    allow_unauthenticated: bool,
    tls: Option<Arc<TlsPaths>>,
}

impl Auth {
    /// No secret; listening beyond loopback refused.
    pub fn none() -> Auth {
        Auth::default()
    }

    /// With this secret.
    pub fn with_secret(secret: JobSecret) -> Auth {
        Auth { secret: Some(Arc::new(secret)), ..Auth::default() }
    }

    /// No secret, listening beyond loopback allowed (`OXCCL_ALLOW_UNAUTHENTICATED=1`).
    pub fn unauthenticated() -> Auth {
        Auth { allow_unauthenticated: true, ..Auth::default() }
    }

    /// The same, with `secret` instead of its own (TLS and the rest kept).
    pub fn and_secret(&self, secret: JobSecret) -> Auth {
        Auth { secret: Some(Arc::new(secret)), ..self.clone() }
    }

    /// The same, with TLS from these files (`None`: off).
    pub fn and_tls(&self, tls: Option<TlsPaths>) -> Auth {
        Auth { tls: tls.map(Arc::new), ..self.clone() }
    }

    /// TLS's files, when TLS is on.
    pub fn tls(&self) -> Option<&TlsPaths> {
        self.tls.as_deref()
    }

    /// From the values of `OXCCL_JOB_SECRET`, `OXCCL_JOB_SECRET_FILE` and
    /// `OXCCL_ALLOW_UNAUTHENTICATED` (empty: unset). Leading and trailing white space of the
    /// secret is dropped (a file written by `echo` ends in a newline). A file that users other
    /// than its owner may read or write is refused.
    pub fn from_values(secret: &str, file: &str, allow: &str) -> Result<Auth> {
        let allow_unauthenticated = match allow.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" | "off" => false,
            "1" | "true" | "yes" | "on" => true,
            v => return Err(Error::invalid_arg(format!("OXCCL_ALLOW_UNAUTHENTICATED={v:?}: expected 1 or 0"))),
        };
        let (secret, file) = (secret.trim(), file.trim());
        let secret = match (secret.is_empty(), file.is_empty()) {
            (true, true) => None,
            (false, false) => {
                return Err(Error::invalid_arg(
                    "both OXCCL_JOB_SECRET and OXCCL_JOB_SECRET_FILE are set: set one of them".to_string(),
                ))
            }
            (false, true) => Some(JobSecret::new(secret.as_bytes(), "OXCCL_JOB_SECRET")?),
            (true, false) => Some(read_secret_file(file)?),
        };
        Ok(Auth { secret: secret.map(Arc::new), allow_unauthenticated, tls: None })
    }

    /// From the variables `OXCCL_JOB_SECRET`, `OXCCL_JOB_SECRET_FILE`,
    /// `OXCCL_ALLOW_UNAUTHENTICATED` and `OXCCL_TLS_*` as `get` reads them (a process's
    /// environment, or another process's).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Auth> {
        let v = |k: &str| get(k).unwrap_or_default();
        let a =
            Auth::from_values(&v("OXCCL_JOB_SECRET"), &v("OXCCL_JOB_SECRET_FILE"), &v("OXCCL_ALLOW_UNAUTHENTICATED"))?;
        Ok(a.and_tls(Auth::tls_from_values(&v("OXCCL_TLS_CERT"), &v("OXCCL_TLS_KEY"), &v("OXCCL_TLS_CA"))?))
    }

    /// TLS from the values of `OXCCL_TLS_CERT`, `OXCCL_TLS_KEY` and `OXCCL_TLS_CA` (empty:
    /// unset): all three, or none (TLS off).
    pub fn tls_from_values(cert: &str, key: &str, ca: &str) -> Result<Option<TlsPaths>> {
        let (cert, key, ca) = (cert.trim(), key.trim(), ca.trim());
        match (cert.is_empty(), key.is_empty(), ca.is_empty()) {
            (true, true, true) => Ok(None),
            (false, false, false) => {
                Ok(Some(TlsPaths { cert: cert.to_string(), key: key.to_string(), ca: ca.to_string() }))
            }
            _ => Err(Error::invalid_arg(format!(
                "TLS needs all of OXCCL_TLS_CERT, OXCCL_TLS_KEY and OXCCL_TLS_CA (set: {})",
                [("OXCCL_TLS_CERT", cert), ("OXCCL_TLS_KEY", key), ("OXCCL_TLS_CA", ca)]
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// True when it has a secret.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// The secret, if any.
    pub fn secret(&self) -> Option<&JobSecret> {
        self.secret.as_deref()
    }

    /// True when the user allowed listening beyond loopback without a secret.
    pub fn allows_unauthenticated(&self) -> bool {
        self.allow_unauthenticated
    }

    /// May `what` (e.g. "the store", "net-tcp") listen on `ip`? Yes with a secret, or on a
    /// loopback address; beyond loopback without a secret only when the user allowed it (then a
    /// warning, once per process).
    pub fn check_listen(&self, what: &str, ip: IpAddr) -> Result<()> {
        if self.secret.is_some() || ip.is_loopback() {
            return Ok(());
        }
        if self.allow_unauthenticated {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "OXCCL_ALLOW_UNAUTHENTICATED=1: {what} listens on {ip} without a job secret; anyone who can reach \
                     it can join the job, read and change its store (docs/security.md)"
                )
            });
            return Ok(());
        }
        Err(Error::invalid_arg(format!(
            "{what} would listen on {ip}, beyond loopback, without a job secret: anyone who can reach it could join \
             the job. Give every rank the same secret (OXCCL_JOB_SECRET, or OXCCL_JOB_SECRET_FILE naming a file only \
             its owner can read; `oxccl launch` makes one), or set OXCCL_ALLOW_UNAUTHENTICATED=1 to run without \
             (docs/security.md)"
        )))
    }

    /// One line for `explain` and `oxccl env`.
    pub fn describe(&self) -> String {
        let tls = match &self.tls {
            Some(t) => format!("; TLS on the store and net-tcp, peers verified against {}", t.ca),
            None => String::new(),
        };
        let what = match (&self.secret, self.allow_unauthenticated) {
            (Some(s), _) => format!(
                "every TCP connection proves the job secret (HMAC-SHA256 challenge-response; secret from {})",
                s.origin()
            ),
            (None, false) => {
                "no job secret: TCP listeners stay on loopback (a job across hosts needs OXCCL_JOB_SECRET)".to_string()
            }
            (None, true) => "UNAUTHENTICATED: OXCCL_ALLOW_UNAUTHENTICATED=1 and no job secret; anyone who reaches a \
                             listener can join the job"
                .to_string(),
        };
        what + &tls
    }
}

fn read_secret_file(path: &str) -> Result<JobSecret> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let what = format!("OXCCL_JOB_SECRET_FILE={path}");
    // Non-blocking: a FIFO named by mistake is refused below, not waited on.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::invalid_arg(format!("{what}: cannot open: {e}")))?;
    let meta = f.metadata().map_err(|e| Error::invalid_arg(format!("{what}: cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(Error::invalid_arg(format!("{what}: not a regular file")));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::invalid_arg(format!(
            "{what}: it belongs to user {} and this process runs as user {me}: the owner of a job secret's file \
             could read or change it; use a file of your own (chmod 600)",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o066 != 0 {
        return Err(Error::invalid_arg(format!(
            "{what}: other users can read or write it (mode {mode:03o}); a job secret must be private to its owner: \
             chmod 600 {path}"
        )));
    }
    let mut text = Vec::new();
    Read::by_ref(&mut f)
        .take(1 << 16)
        .read_to_end(&mut text)
        .map_err(|e| Error::invalid_arg(format!("{what}: cannot read: {e}")))?;
    let trimmed = text.trim_ascii();
    let secret = JobSecret::new(trimmed, &what);
    text.fill(0);
    secret
}

/// A refused connection: logged at warn level the first time for each peer address (a
/// stranger knocking again and again fills no log), at debug level after that.
pub fn refused(peer: IpAddr, what: &str, why: &str) {
    static SEEN: Mutex<Option<HashSet<IpAddr>>> = Mutex::new(None);
    /// Addresses remembered at most; past that, every refusal logs at debug level only.
    const MAX_SEEN: usize = 4096;
    let first = {
        let mut g = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let set = g.get_or_insert_with(HashSet::new);
        set.len() < MAX_SEEN && set.insert(peer)
    };
    if first {
        tracing::warn!(%peer, "{what}: refused a connection from {peer}: {why} (further refusals of this address are logged at debug level)");
    } else {
        tracing::debug!(%peer, "{what}: refused a connection from {peer}: {why}");
    }
}

/// The client's side of a handshake under way: it sent its challenge.
#[derive(Debug)]
pub struct Client {
    secret: Option<Arc<JobSecret>>,
    purpose: Purpose,
    nonce: [u8; NONCE_BYTES],
}

impl Client {
    /// Starts a handshake: the state, and the challenge to send.
    pub fn start(auth: &Auth, purpose: Purpose) -> Result<(Client, [u8; CHALLENGE_BYTES])> {
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce)?;
        let mut c = [0u8; CHALLENGE_BYTES];
        c[..4].copy_from_slice(&MAGIC);
        c[4] = VERSION;
        c[5] = if auth.secret.is_some() { MODE_HMAC } else { MODE_NONE };
        c[6] = purpose.byte();
        c[8..].copy_from_slice(&nonce);
        Ok((Client { secret: auth.secret.clone(), purpose, nonce }, c))
    }

    /// Checks the server's response; the proof to send (then the protocol's bytes), or why
    /// the server is not to be trusted.
    pub fn finish(self, response: &[u8; RESPONSE_BYTES]) -> std::result::Result<[u8; PROOF_BYTES], String> {
        let r = Response::decode(response)?;
        let ours = if self.secret.is_some() { MODE_HMAC } else { MODE_NONE };
        match r.status {
            status::GO => {}
            status::SECRET_REQUIRED => {
                return Err("it requires the job secret and this process has none: give every rank the same \
                            OXCCL_JOB_SECRET (or OXCCL_JOB_SECRET_FILE)"
                    .into())
            }
            status::NO_SECRET_HERE => {
                return Err("it runs without a job secret while this process has one: give every rank the same \
                            secret, or none"
                    .into())
            }
            status::WRONG_PURPOSE => return Err(format!("it does not serve {}", self.purpose.name())),
            status::VERSION => return Err("it speaks another version of the handshake".into()),
            status::NO_TLS_HERE => return Err(TLS_ONE_SIDE.into()),
            s => return Err(format!("it answered with unknown status {s}")),
        }
        if r.mode != ours || r.purpose != self.purpose.byte() {
            return Err(format!(
                "its answer does not match the challenge (mode {} purpose {}; sent mode {ours} purpose {})",
                r.mode,
                r.purpose,
                self.purpose.byte()
            ));
        }
        let mut proof = [0u8; PROOF_BYTES];
        proof[..4].copy_from_slice(&PROOF_MAGIC);
        if let Some(s) = &self.secret {
            s.mac(SERVER_LABEL, r.purpose, &self.nonce, &r.nonce).verify_slice(&r.mac).map_err(|_| {
                "it did not prove it knows the job secret (a wrong secret on one side, or not one of this job's \
                 processes)"
                    .to_string()
            })?;
            let m = s.mac(CLIENT_LABEL, r.purpose, &self.nonce, &r.nonce).finalize().into_bytes();
            proof[4..].copy_from_slice(&m);
        }
        Ok(proof)
    }
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    mode: u8,
    purpose: u8,
    status: u8,
    nonce: [u8; NONCE_BYTES],
    mac: [u8; MAC_BYTES],
}

impl Response {
    /// Decodes a response; an error names what is wrong with it.
    pub fn decode(b: &[u8]) -> std::result::Result<Response, String> {
        if b.len() != RESPONSE_BYTES {
            return Err(format!("a handshake response is {RESPONSE_BYTES} bytes, not {}", b.len()));
        }
        if b[..4] != MAGIC {
            return Err("it did not answer with an OxCCL handshake (is it an OxCCL process of this version?)".into());
        }
        if b[4] != VERSION {
            return Err(format!("handshake version {} (this build speaks {VERSION})", b[4]));
        }
        Ok(Response {
            mode: b[5],
            purpose: b[6],
            status: b[7],
            nonce: b[8..8 + NONCE_BYTES].try_into().expect("32 bytes"),
            mac: b[8 + NONCE_BYTES..].try_into().expect("32 bytes"),
        })
    }
}

/// A decoded challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    version: u8,
    mode: u8,
    purpose: u8,
    nonce: [u8; NONCE_BYTES],
}

impl Challenge {
    /// Decodes a challenge; an error names what is wrong with it (garbage, not a version
    /// mismatch: a challenge of another version decodes, to be refused with a reason).
    pub fn decode(b: &[u8]) -> std::result::Result<Challenge, String> {
        if b.len() != CHALLENGE_BYTES {
            return Err(format!("a handshake challenge is {CHALLENGE_BYTES} bytes, not {}", b.len()));
        }
        if b[..4] != MAGIC {
            return Err(format!(
                "it did not open with the OxCCL handshake (first bytes {:02x?}; an OxCCL process of an older version, \
                 or not OxCCL)",
                &b[..4]
            ));
        }
        Ok(Challenge { version: b[4], mode: b[5], purpose: b[6], nonce: b[8..].try_into().expect("32 bytes") })
    }
}

/// Decodes a proof: its MAC.
pub fn decode_proof(b: &[u8]) -> std::result::Result<[u8; MAC_BYTES], String> {
    if b.len() != PROOF_BYTES {
        return Err(format!("a handshake proof is {PROOF_BYTES} bytes, not {}", b.len()));
    }
    if b[..4] != PROOF_MAGIC {
        return Err("no handshake proof where one was due".into());
    }
    Ok(b[4..].try_into().expect("32 bytes"))
}

/// The server's side of a handshake under way: it answered a challenge and waits for the proof.
#[derive(Debug)]
pub struct Server {
    secret: Option<Arc<JobSecret>>,
    purpose: u8,
    nc: [u8; NONCE_BYTES],
    ns: [u8; NONCE_BYTES],
}

/// What a server makes of a challenge.
#[derive(Debug)]
pub enum Answer {
    /// Send the response, then wait for the proof.
    Go(Server, [u8; RESPONSE_BYTES]),
    /// Refuse: send the response (it says why, and holds no MAC) when there is one, then close.
    Refuse(Option<[u8; RESPONSE_BYTES]>, String),
}

impl Server {
    /// Answers `challenge` for a server of `purpose`.
    pub fn answer(auth: &Auth, purpose: Purpose, challenge: &[u8]) -> Answer {
        if challenge.starts_with(&[0x16, 0x03]) {
            // A TLS ClientHello: answered in plain bytes, which its TLS fails on at once
            // (rather than retrying a silent close).
            let mut r = [0u8; RESPONSE_BYTES];
            r[..4].copy_from_slice(&MAGIC);
            r[4] = VERSION;
            r[7] = status::NO_TLS_HERE;
            return Answer::Refuse(Some(r), "it opened with TLS and this process runs without TLS".into());
        }
        let c = match Challenge::decode(challenge) {
            Ok(c) => c,
            Err(why) => return Answer::Refuse(None, why),
        };
        let ours = if auth.secret.is_some() { MODE_HMAC } else { MODE_NONE };
        let mut r = [0u8; RESPONSE_BYTES];
        r[..4].copy_from_slice(&MAGIC);
        r[4] = VERSION;
        r[5] = ours;
        r[6] = purpose.byte();
        let refuse = |mut r: [u8; RESPONSE_BYTES], st: u8, why: String| {
            r[7] = st;
            Answer::Refuse(Some(r), why)
        };
        if c.version != VERSION {
            return refuse(
                r,
                status::VERSION,
                format!("handshake version {} (this build speaks {VERSION})", c.version),
            );
        }
        if c.purpose != purpose.byte() {
            let theirs = Purpose::from_byte(c.purpose).map(Purpose::name).unwrap_or("something unknown");
            return refuse(r, status::WRONG_PURPOSE, format!("it came for {theirs}, this is {}", purpose.name()));
        }
        match (c.mode, ours) {
            (m, o) if m == o => {}
            (MODE_NONE, MODE_HMAC) => {
                return refuse(r, status::SECRET_REQUIRED, "it has no job secret (this process requires one)".into())
            }
            (MODE_HMAC, MODE_NONE) => {
                return refuse(r, status::NO_SECRET_HERE, "it has a job secret and this process has none".into())
            }
            (m, _) => return Answer::Refuse(None, format!("unknown handshake mode {m}")),
        }
        let mut ns = [0u8; NONCE_BYTES];
        if let Err(e) = fill_random(&mut ns) {
            return Answer::Refuse(None, e.to_string());
        }
        r[8..8 + NONCE_BYTES].copy_from_slice(&ns);
        if let Some(s) = &auth.secret {
            let m = s.mac(SERVER_LABEL, c.purpose, &c.nonce, &ns).finalize().into_bytes();
            r[8 + NONCE_BYTES..].copy_from_slice(&m);
        }
        Answer::Go(Server { secret: auth.secret.clone(), purpose: c.purpose, nc: c.nonce, ns }, r)
    }

    /// Checks the client's proof: `Ok` lets the connection on to its protocol.
    pub fn check(self, proof: &[u8]) -> std::result::Result<(), String> {
        let mac = decode_proof(proof)?;
        match &self.secret {
            None => Ok(()),
            Some(s) => s
                .mac(CLIENT_LABEL, self.purpose, &self.nc, &self.ns)
                .verify_slice(&mac)
                .map_err(|_| "its proof of the job secret is wrong (a wrong secret, or a replayed handshake)".into()),
        }
    }
}

/// Why a blocking handshake failed.
#[derive(Debug)]
pub enum Failed {
    /// The connection failed (closed, reset, timed out): the caller may retry.
    Io(std::io::Error),
    /// The other side is not to be trusted, or refused us: retrying will not help.
    Refused(String),
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::Io(e) => write!(f, "{e}"),
            Failed::Refused(m) => f.write_str(m),
        }
    }
}

/// What a process is told when TLS is on at one end only.
const TLS_ONE_SIDE: &str = "TLS is on at one end only: OXCCL_TLS_CERT, OXCCL_TLS_KEY and OXCCL_TLS_CA must be \
                            set on every rank and where the store runs, or nowhere";

/// True when `b` opens like a TLS record (a handshake or an alert).
pub fn looks_like_tls(b: &[u8]) -> bool {
    matches!(b, [0x15 | 0x16, 0x03, ..])
}

/// The client's handshake on a blocking stream (its timeouts set by the caller): `Ok` once the
/// server proved itself and the proof is sent.
pub fn client_blocking(s: &mut (impl Read + Write), auth: &Auth, purpose: Purpose) -> std::result::Result<(), Failed> {
    let (client, challenge) = Client::start(auth, purpose).map_err(|e| Failed::Refused(e.to_string()))?;
    s.write_all(&challenge).map_err(Failed::Io)?;
    let mut r = [0u8; RESPONSE_BYTES];
    let mut got = 0;
    while got < r.len() {
        match s.read(&mut r[got..]) {
            // A TLS server's alert, then its close: it expected TLS.
            Ok(0) if looks_like_tls(&r[..got]) => return Err(Failed::Refused(TLS_ONE_SIDE.into())),
            Ok(0) => return Err(Failed::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if looks_like_tls(&r[..got]) => return Err(Failed::Refused(format!("{TLS_ONE_SIDE} ({e})"))),
            Err(e) => return Err(Failed::Io(e)),
        }
    }
    let proof = client.finish(&r).map_err(Failed::Refused)?;
    s.write_all(&proof).map_err(Failed::Io)
}

/// The server's handshake on a blocking stream (its timeouts set by the caller): `Ok` once the
/// client proved itself. On a refusal the caller closes the connection and calls [`refused`].
pub fn server_blocking(s: &mut (impl Read + Write), auth: &Auth, purpose: Purpose) -> std::result::Result<(), Failed> {
    let mut c = [0u8; CHALLENGE_BYTES];
    s.read_exact(&mut c).map_err(Failed::Io)?;
    match Server::answer(auth, purpose, &c) {
        Answer::Refuse(r, why) => {
            if let Some(r) = r {
                let _ = s.write_all(&r);
            }
            Err(Failed::Refused(why))
        }
        Answer::Go(server, r) => {
            s.write_all(&r).map_err(Failed::Io)?;
            let mut p = [0u8; PROOF_BYTES];
            s.read_exact(&mut p).map_err(Failed::Io)?;
            server.check(&p).map_err(Failed::Refused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Auth {
        Auth::with_secret(JobSecret::new(s.as_bytes(), "test").unwrap())
    }

    /// One whole handshake in memory: the client's verdict, and the server's.
    fn shake(
        client: &Auth,
        server: &Auth,
        cp: Purpose,
        sp: Purpose,
    ) -> (std::result::Result<(), String>, Option<String>) {
        let (c, challenge) = Client::start(client, cp).unwrap();
        match Server::answer(server, sp, &challenge) {
            Answer::Refuse(r, why) => {
                let client_sees = match r {
                    Some(r) => c.finish(&r).map(|_| ()),
                    None => Err("closed".into()),
                };
                assert!(client_sees.is_err(), "a refused client must not go on");
                (client_sees, Some(why))
            }
            Answer::Go(s, r) => match c.finish(&r) {
                Ok(proof) => (Ok(()), s.check(&proof).err()),
                Err(e) => (Err(e), None),
            },
        }
    }

    #[test]
    fn the_same_secret_or_none_on_both_sides_gets_in() {
        let a = secret("0123456789abcdef-job");
        assert_eq!(shake(&a, &a.clone(), Purpose::Store, Purpose::Store), (Ok(()), None));
        assert_eq!(shake(&a, &a, Purpose::NetTcp, Purpose::NetTcp), (Ok(()), None));
        let none = Auth::none();
        assert_eq!(shake(&none, &none, Purpose::Store, Purpose::Store), (Ok(()), None));
    }

    #[test]
    fn a_wrong_missing_or_extra_secret_is_refused_with_its_reason() {
        let a = secret("0123456789abcdef-job");
        let b = secret("0123456789abcdef-other");
        let (client, server) = shake(&a, &b, Purpose::Store, Purpose::Store);
        assert!(client.unwrap_err().contains("did not prove it knows the job secret"));
        assert_eq!(server, None, "the client stops before it sends a proof");
        let (client, server) = shake(&Auth::none(), &a, Purpose::Store, Purpose::Store);
        assert!(client.unwrap_err().contains("requires the job secret"));
        assert!(server.unwrap().contains("no job secret"));
        let (client, server) = shake(&a, &Auth::none(), Purpose::NetTcp, Purpose::NetTcp);
        assert!(client.unwrap_err().contains("runs without a job secret"));
        assert!(server.unwrap().contains("has a job secret"));
        let (client, server) = shake(&a, &a, Purpose::Store, Purpose::NetTcp);
        assert!(client.clone().unwrap_err().contains("does not serve the rendezvous store"), "{client:?}");
        assert!(server.unwrap().contains("came for the rendezvous store"));
    }

    #[test]
    fn a_client_without_the_secret_cannot_forge_a_proof() {
        let a = secret("0123456789abcdef-job");
        let (_, challenge) = Client::start(&a, Purpose::Store).unwrap();
        let Answer::Go(s, _) = Server::answer(&a, Purpose::Store, &challenge) else { panic!("answered") };
        let mut forged = [0u8; PROOF_BYTES];
        forged[..4].copy_from_slice(&PROOF_MAGIC);
        assert!(s.check(&forged).unwrap_err().contains("proof of the job secret is wrong"));
    }

    #[test]
    fn a_recorded_handshake_replayed_is_refused_both_ways() {
        let a = secret("0123456789abcdef-job");
        // Recorded: a whole honest handshake.
        let (c, challenge) = Client::start(&a, Purpose::Store).unwrap();
        let Answer::Go(s, response) = Server::answer(&a, Purpose::Store, &challenge) else { panic!() };
        let proof = c.finish(&response).unwrap();
        s.check(&proof).unwrap();
        // Replayed to a server: the same challenge gets a fresh nonce, so the old proof fails.
        let Answer::Go(s2, response2) = Server::answer(&a, Purpose::Store, &challenge) else { panic!() };
        assert_ne!(response2, response);
        assert!(s2.check(&proof).is_err());
        // Replayed to a client: its fresh nonce makes the recorded response fail.
        let (c2, _) = Client::start(&a, Purpose::Store).unwrap();
        assert!(c2.finish(&response).unwrap_err().contains("did not prove"));
        // Reflected: the server's MAC presented as a client's proof.
        let (c3, challenge3) = Client::start(&a, Purpose::Store).unwrap();
        let Answer::Go(s3, response3) = Server::answer(&a, Purpose::Store, &challenge3) else { panic!() };
        let mut reflected = [0u8; PROOF_BYTES];
        reflected[..4].copy_from_slice(&PROOF_MAGIC);
        reflected[4..].copy_from_slice(&response3[8 + NONCE_BYTES..]);
        assert!(s3.check(&reflected).is_err());
        drop(c3);
    }

    #[test]
    fn garbage_and_other_versions_are_refused() {
        let a = secret("0123456789abcdef-job");
        assert!(matches!(Server::answer(&a, Purpose::Store, b"GET / HTTP/1.1\r\n"), Answer::Refuse(None, _)));
        let (_, mut challenge) = Client::start(&a, Purpose::Store).unwrap();
        challenge[4] = 9;
        let Answer::Refuse(Some(r), why) = Server::answer(&a, Purpose::Store, &challenge) else { panic!() };
        assert!(why.contains("version 9"));
        assert_eq!(Response::decode(&r).unwrap().status, status::VERSION);
        assert!(decode_proof(b"nope").is_err());
    }

    #[test]
    fn blocking_handshake_over_a_socket_pair() {
        let a = secret("0123456789abcdef-job");
        let (mut x, mut y) = std::os::unix::net::UnixStream::pair().unwrap();
        let b = a.clone();
        let t = std::thread::spawn(move || server_blocking(&mut y, &b, Purpose::NetTcp).map_err(|e| e.to_string()));
        client_blocking(&mut x, &a, Purpose::NetTcp).unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn secrets_from_values_and_files() {
        assert!(!Auth::from_values("", "", "").unwrap().has_secret());
        assert!(Auth::from_values("", "", "1").unwrap().allows_unauthenticated());
        assert!(Auth::from_values("", "", "maybe").is_err());
        let e = Auth::from_values("short", "", "").unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let a = Auth::from_values("  0123456789abcdef\n", "", "").unwrap();
        assert_eq!(a.secret().unwrap().expose(), b"0123456789abcdef");
        assert!(!format!("{a:?}").contains("0123456789abcdef"), "Debug must not show the secret");
        let dir = std::env::temp_dir().join(format!("oxccl-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "fedcba9876543210fedcba\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = path.to_str().unwrap();
        let e = Auth::from_values("", p, "").unwrap_err().to_string();
        assert!(e.contains("other users can read or write it (mode 644)") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = Auth::from_values("", p, "").unwrap();
        assert_eq!(a.secret().unwrap().expose(), b"fedcba9876543210fedcba");
        assert!(a.describe().contains("OXCCL_JOB_SECRET_FILE"));
        assert!(Auth::from_values("0123456789abcdef", p, "").unwrap_err().to_string().contains("set one of them"));
        assert!(Auth::from_values("", dir.to_str().unwrap(), "").is_err());
        // A FIFO is refused at once (not waited on).
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Auth::from_values("", fifo.to_str().unwrap(), "").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // A private file of another user: its owner could read or change the secret.
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            let e = Auth::from_values("", p, "").unwrap_err().to_string();
            assert!(e.contains("belongs to user 65534"), "{e}");
        } else {
            println!("skipped: the part about another user's file (chown needs root)");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listening_beyond_loopback_needs_a_secret_or_permission() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let out: IpAddr = "198.18.0.1".parse().unwrap();
        assert!(Auth::none().check_listen("the store", lo).is_ok());
        let e = Auth::none().check_listen("the store", out).unwrap_err().to_string();
        assert!(
            e.contains("198.18.0.1") && e.contains("OXCCL_JOB_SECRET") && e.contains("OXCCL_ALLOW_UNAUTHENTICATED")
        );
        assert!(Auth::unauthenticated().check_listen("the store", out).is_ok());
        assert!(secret("0123456789abcdef-job").check_listen("the store", out).is_ok());
        assert!(Auth::unauthenticated().describe().starts_with("UNAUTHENTICATED"));
        let tls = TlsPaths { cert: "c.pem".into(), key: "k.pem".into(), ca: "ca.pem".into() };
        assert!(Auth::none()
            .and_tls(Some(tls))
            .describe()
            .contains("TLS on the store and net-tcp, peers verified against ca.pem"));
    }

    #[test]
    fn generated_secrets_differ() {
        let a = JobSecret::generate("test").unwrap();
        let b = JobSecret::generate("test").unwrap();
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a.expose(), b.expose());
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn cases() -> proptest::test_runner::Config {
            let cases = std::env::var("OXCCL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
            proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() }
        }

        proptest! {
            #![proptest_config(cases())]
            /// No input makes a decoder panic, and no random proof gets in.
            #[test]
            fn fuzz_handshake_decoders(
                challenge in proptest::collection::vec(any::<u8>(), 0..64),
                response in any::<[u8; RESPONSE_BYTES]>(),
                proof in proptest::collection::vec(any::<u8>(), 0..64),
                keep_magic in any::<bool>(),
            ) {
                let a = Auth::with_secret(JobSecret::new(b"0123456789abcdef-job", "test").unwrap());
                let _ = Challenge::decode(&challenge);
                let _ = Response::decode(&response);
                let _ = decode_proof(&proof);
                let mut response = response;
                if keep_magic {
                    response[..4].copy_from_slice(&MAGIC);
                    response[4] = VERSION;
                }
                let (c, ch) = Client::start(&a, Purpose::Store).unwrap();
                prop_assert!(c.finish(&response).is_err());
                let mut ch = ch.to_vec();
                if !keep_magic {
                    ch = challenge.clone();
                }
                if let Answer::Go(s, _) = Server::answer(&a, Purpose::Store, &ch) {
                    let mut p = proof.clone();
                    if keep_magic && p.len() >= PROOF_BYTES {
                        p.truncate(PROOF_BYTES);
                        p[..4].copy_from_slice(&PROOF_MAGIC);
                    }
                    prop_assert!(s.check(&p).is_err());
                }
            }
        }
    }
}
