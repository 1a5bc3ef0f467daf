//! Optional TLS for the store and net-tcp (`OXCCL_TLS_CERT`, `OXCCL_TLS_KEY`, `OXCCL_TLS_CA`):
//! rustls with the ring provider, TLS 1.3 or 1.2, both sides presenting a certificate that
//! must chain to the job's certificate authority (mutual TLS). Names in the certificates are
//! not checked: ranks are reached by address, and the CA vouching for a peer is what makes it
//! one of the job's. The job-secret handshake (`oxccl_core::auth`) still runs, inside TLS.
//!
//! [`Sock`] is a TCP stream with or without TLS, blocking or not, behind `Read` and `Write`:
//! a TLS write or read also moves the TLS handshake along, and a non-blocking one says
//! `WouldBlock` where a plain socket would. Records the socket did not take yet stay in
//! rustls ([`Sock::wants_write`]); [`Sock::flush_tls`] pushes them on.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use oxccl_core::auth::TlsPaths;
use oxccl_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The name a client asks for; not checked (see the module's documentation).
const PEER_NAME: &str = "oxccl-peer";
/// Plaintext a TLS connection buffers before a write says `WouldBlock`.
const BUFFER_LIMIT: usize = 256 << 10;

/// A process's TLS configurations, built once per set of files.
#[derive(Debug)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// ring's suites, AES-128-GCM first (the cheapest on CPUs with AES instructions; a job's bulk
/// data pays it on every byte).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    });
    Arc::new(p)
}

fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| Error::invalid_arg(format!("{what}={path}: cannot read PEM certificates: {e}")))?;
    if v.is_empty() {
        return Err(Error::invalid_arg(format!("{what}={path}: no certificate in it")));
    }
    Ok(v)
}

/// Verifies a server's chain, expiry and signatures against the CA, not its name.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl Tls {
    /// The configurations for these files (read once per process and set of files).
    pub fn load(paths: &TlsPaths) -> Result<Arc<Tls>> {
        static CACHE: Mutex<Option<HashMap<TlsPaths, Arc<Tls>>>> = Mutex::new(None);
        let mut g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let cache = g.get_or_insert_with(HashMap::new);
        if let Some(t) = cache.get(paths) {
            return Ok(t.clone());
        }
        let t = Arc::new(Tls::build(paths)?);
        cache.insert(paths.clone(), t.clone());
        Ok(t)
    }

    fn build(paths: &TlsPaths) -> Result<Tls> {
        let chain = certs(&paths.cert, "OXCCL_TLS_CERT")?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| {
            Error::invalid_arg(format!("OXCCL_TLS_KEY={}: cannot read a PEM private key: {e}", paths.key))
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(&paths.ca, "OXCCL_TLS_CA")? {
            roots.add(c).map_err(|e| {
                Error::invalid_arg(format!("OXCCL_TLS_CA={}: not a usable CA certificate: {e}", paths.ca))
            })?;
        }
        let roots = Arc::new(roots);
        let bad = |what: &str, e: rustls::Error| Error::invalid_arg(format!("TLS {what}: {e}"));
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| Error::invalid_arg(format!("TLS: OXCCL_TLS_CA={}: {e}", paths.ca)))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("client", e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(server_verifier)))
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad("client certificate (OXCCL_TLS_CERT with OXCCL_TLS_KEY)", e))?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| Error::invalid_arg(format!("TLS: OXCCL_TLS_CA={}: {e}", paths.ca)))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("server", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad("server certificate (OXCCL_TLS_CERT with OXCCL_TLS_KEY)", e))?;
        // Nothing unasked from a server: a store watch reads any byte as the server's end.
        server.send_tls13_tickets = 0;
        Ok(Tls { client: Arc::new(client), server: Arc::new(server) })
    }

    /// The server configuration (for tokio-rustls).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// `tcp` as the connecting side of a TLS connection.
    pub fn client(&self, tcp: TcpStream) -> Result<Sock> {
        let name = ServerName::try_from(PEER_NAME).expect("a valid name");
        let mut c = rustls::ClientConnection::new(self.client.clone(), name)
            .map_err(|e| Error::Internal(format!("TLS client: {e}")))?;
        c.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Sock::Tls(Box::new(TlsSock { tcp, conn: c.into() })))
    }

    /// `tcp` as the accepting side of a TLS connection.
    pub fn server(&self, tcp: TcpStream) -> Result<Sock> {
        let mut c = rustls::ServerConnection::new(self.server.clone())
            .map_err(|e| Error::Internal(format!("TLS server: {e}")))?;
        c.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Sock::Tls(Box::new(TlsSock { tcp, conn: c.into() })))
    }
}

/// A TLS connection over a TCP stream.
#[derive(Debug)]
pub struct TlsSock {
    tcp: TcpStream,
    conn: rustls::Connection,
}

/// A TCP stream, plain or with TLS.
#[derive(Debug)]
pub enum Sock {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsSock>),
}

fn tls_err(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsSock {
    /// Writes pending records until none is left; `WouldBlock` when the socket is full.
    fn flush_all(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one batch of records and processes them; `Ok(false)` at end of stream.
    fn read_some(&mut self) -> std::io::Result<bool> {
        loop {
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    if let Err(e) = self.conn.process_new_packets() {
                        // Tell the peer why (an alert), best effort.
                        let _ = self.flush_all();
                        return Err(tls_err(e));
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Sock {
    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Sock::Plain(s) => s,
            Sock::Tls(t) => &t.tcp,
        }
    }

    /// True with TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// True when TLS records wait for the socket to take them (poll for writability).
    pub fn wants_write(&self) -> bool {
        match self {
            Sock::Plain(_) => false,
            Sock::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Whether a waiter should poll this socket for writability, given whether its own
    /// protocol has bytes to write: TLS records pending say yes; a TLS handshake waiting for
    /// the peer says no (it needs to read).
    pub fn poll_write(&self, own: bool) -> bool {
        match self {
            Sock::Plain(_) => own,
            Sock::Tls(t) if t.conn.wants_write() => true,
            Sock::Tls(t) if t.conn.is_handshaking() => false,
            Sock::Tls(_) => own,
        }
    }

    /// Pushes pending TLS records as far as the socket takes them (never `WouldBlock`).
    pub fn flush_tls(&mut self) -> std::io::Result<()> {
        match self {
            Sock::Plain(_) => Ok(()),
            Sock::Tls(t) => match t.flush_all() {
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
                r => r,
            },
        }
    }

    /// Shuts the writing side down (with TLS, after a close_notify).
    pub fn shutdown_write(&mut self) {
        if let Sock::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush_all();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Write);
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let t = match self {
            Sock::Plain(s) => return s.read(buf),
            Sock::Tls(t) => t,
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match t.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // Handshake messages and alerts owed to the peer go first (best effort).
            match t.flush_all() {
                Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
            // End of stream: a peer that closed without TLS's close_notify reads as a close
            // here too; the store's frames and the link's pieces tell a cut message anyway.
            if !t.read_some()? {
                return Ok(0);
            }
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let t = match self {
            Sock::Plain(s) => return s.write(buf),
            Sock::Tls(t) => t,
        };
        if buf.is_empty() {
            return Ok(0);
        }
        // No plaintext before the handshake is done: drive it (a non-blocking socket says
        // WouldBlock until the peer's part has come).
        while t.conn.is_handshaking() {
            t.flush_all()?;
            if !t.conn.is_handshaking() {
                break;
            }
            if !t.conn.wants_read() {
                // Nothing to send or read and not done: not reached with rustls; never spin.
                return Err(ErrorKind::WouldBlock.into());
            }
            if !t.read_some()? {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        // Records not taken yet go first: the socket's back-pressure is the caller's.
        t.flush_all()?;
        let n = t.conn.writer().write(buf)?;
        match t.flush_all() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        if n == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sock::Plain(s) => s.flush(),
            Sock::Tls(t) => t.flush_all(),
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    //! A CA and certificates made at test time (rcgen), written as PEM files (feature
    //! `test-util`).

    use super::*;

    /// A CA, and for it a certificate and key per name, in `dir`: the CA's path, and the
    /// files of each name.
    pub fn make(dir: &std::path::Path, names: &[&str]) -> (String, Vec<TlsPaths>) {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "oxccl test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        let mut out = Vec::new();
        for n in names {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec![n.to_string()]).unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            let (c, k) = (dir.join(format!("{n}.pem")), dir.join(format!("{n}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            out.push(TlsPaths {
                cert: c.to_str().unwrap().into(),
                key: k.to_str().unwrap().into(),
                ca: ca_path.to_str().unwrap().into(),
            });
        }
        (ca_path.to_str().unwrap().into(), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Blocking TLS both ways: data crosses; a peer whose certificate another CA signed is
    /// refused on both sides; a plain client gets nothing from a TLS server.
    #[test]
    fn mutual_tls_over_blocking_sockets() {
        let dir = std::env::temp_dir().join(format!("oxccl-tls-{}", std::process::id()));
        let (_, ours) = testing::make(&dir.join("a"), &["r0", "r1"]);
        let (_, theirs) = testing::make(&dir.join("b"), &["x"]);
        let (a, b) = (Tls::load(&ours[0]).unwrap(), Tls::load(&ours[1]).unwrap());
        let stranger = Tls::load(&theirs[0]).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..3 {
                let (s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
                let mut s = b.server(s).unwrap();
                let mut buf = [0u8; 5];
                results.push(s.read_exact(&mut buf).map(|_| buf).map_err(|e| e.to_string()));
                if results.last().unwrap().is_ok() {
                    s.write_all(b"world").unwrap();
                }
            }
            results
        });
        let talk = |tls: &Tls| -> std::result::Result<[u8; 5], String> {
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let mut s = tls.client(tcp).unwrap();
            s.write_all(b"hello").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            Ok(buf)
        };
        assert_eq!(talk(&a).unwrap(), *b"world");
        let e = talk(&stranger).unwrap_err();
        assert!(e.contains("TLS") || e.contains("reset") || e.contains("end of file"), "{e}");
        // Plain bytes at a TLS server: refused.
        let mut plain = TcpStream::connect(addr).unwrap();
        plain.write_all(b"hello").unwrap();
        let r = server.join().unwrap();
        assert_eq!(r[0].as_ref().unwrap(), b"hello");
        assert!(r[1].is_err(), "a certificate of another CA is refused: {r:?}");
        assert!(r[2].is_err(), "plain bytes are refused: {r:?}");
        // Half the files set is an error naming what is missing.
        let e = oxccl_core::auth::Auth::tls_from_values("a.pem", "", "").unwrap_err().to_string();
        assert!(e.contains("OXCCL_TLS_CERT") && e.contains("all of"), "{e}");
        let e = Tls::load(&TlsPaths { cert: "/nonexistent".into(), key: "/x".into(), ca: "/y".into() }).unwrap_err();
        assert!(e.to_string().contains("OXCCL_TLS_CERT=/nonexistent"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
