//! Only the job's own processes get in (docs/security.md). While a job of two "hosts" runs
//! checked all_reduces over net-tcp, a stranger without the job secret, one with a wrong
//! secret, and one replaying a recorded handshake try to read and write the store, register
//! loss actions, join as a rank and open net-tcp links: they learn nothing, change nothing,
//! and every result of the job is right. Then: a secret file others may read is refused, and
//! a store beyond loopback runs without a secret only when the user says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use oxccl::bootstrap::tcp_store::TcpStore;
use oxccl::bootstrap::{LaunchEnv, StoreAddr};
use oxccl::{Auth, Communicator, Config, JobSecret};
use oxccl_core::auth::{self, Purpose};
use oxccl_core::store::Store;
use oxccl_tests::{assert_all_ok, report};

fn worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rank_worker"))
}

/// A store frame: length, opcode, body.
fn frame(op: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (1 + body.len() as u32).to_le_bytes().to_vec();
    f.push(op);
    f.extend_from_slice(body);
    f
}

/// A length-prefixed byte string.
fn bytes(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// What a stranger sends once in: the store's hello, the set of `key`, a get of rank 0's
/// net-tcp address, and loss actions that would set `lost` when it goes.
fn requests(key: &str, lost: &str) -> Vec<u8> {
    let mut v = frame(0x01, &[b"OXST".as_slice(), &2u16.to_le_bytes()].concat());
    v.extend(frame(0x10, &[bytes(key.as_bytes()), bytes(b"stranger")].concat()));
    v.extend(frame(0x11, &[bytes(b"oxccl/c1/tcp/addr/0"), 0u64.to_le_bytes().to_vec()].concat()));
    let action = [vec![1u8], bytes(lost.as_bytes()), bytes(b"stranger")].concat();
    v.extend(frame(0x15, &[1u32.to_le_bytes().to_vec(), action].concat()));
    v
}

/// Sends `out` on a fresh connection to `addr`, then reads all it gets until the other side
/// closes: what the stranger learned. The store must close within 15 s; with `patience`, a
/// listener that does not answer at all (a net-tcp listener whose links are all up accepts
/// nothing more) is given up on after that long.
fn knock(addr: SocketAddr, out: &[u8], patience: Option<Duration>) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("the listener is there");
    s.set_read_timeout(Some(patience.unwrap_or(Duration::from_secs(15)))).unwrap();
    let _ = s.write_all(out);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(_) if patience.is_some() => return got,
            Err(e) => panic!("{addr} kept a stranger's connection open: {e} (got {} bytes)", got.len()),
        }
    }
}

/// A refusal is at most the handshake's response, which holds no MAC unless it is a
/// response to a well-formed challenge (status 0, a fresh nonce); never a store reply.
fn learned_nothing(what: &str, got: &[u8]) {
    assert!(got.len() <= auth::RESPONSE_BYTES, "{what}: got {} bytes back: {got:02x?}", got.len());
    let text = String::from_utf8_lossy(got);
    assert!(!text.contains("127.0.0.1") && !text.contains("stranger"), "{what}: learned {text:?}");
}

/// A whole honest handshake of `auth` with `addr` for `purpose`, then `then`: every byte the
/// client sent (the recording a stranger on the path could make) and the reply to `then`.
fn record(addr: SocketAddr, auth: &Auth, purpose: Purpose, then: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (client, challenge) = auth::Client::start(auth, purpose).unwrap();
    s.write_all(&challenge).unwrap();
    let mut response = [0u8; auth::RESPONSE_BYTES];
    s.read_exact(&mut response).unwrap();
    let proof = client.finish(&response).unwrap();
    s.write_all(&proof).unwrap();
    s.write_all(then).unwrap();
    let mut reply = vec![0u8; 5];
    let _ = s.read_exact(&mut reply);
    ([&challenge[..], &proof[..], then].concat(), reply)
}

#[test]
fn strangers_learn_nothing_and_change_nothing_while_a_job_runs() {
    // Rank 0 hosts the store (its log shows the store's refusals).
    let made = JobSecret::generate("the test's secret").unwrap();
    let secret = String::from_utf8_lossy(made.expose()).into_owned();
    let job = Auth::with_secret(made);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = std::env::temp_dir().join(format!("oxccl-security-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = format!("tcp://{store_addr}");
    let env: Vec<(String, String)> = [
        ("OXCCL_JOB_SECRET", secret.as_str()),
        ("OXCCL_STORE", store.as_str()),
        ("OXCCL_HOST_ID", "host{rank}"),
        ("OXCCL_SOCKET_IFNAME", "lo"),
        ("OXCCL_NET", "tcp"),
        ("OXCCL_TIMEOUT", "60s"),
        ("OXCCL_TEST_DIR", dir.to_str().unwrap()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let ranks = std::thread::spawn(move || {
        let cmds = (0..2).map(|_| std::process::Command::new(worker())).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        oxccl_tests::run_commands(cmds, &["until_stopped"], &env, Duration::from_secs(150))
    });
    let us = TcpStore::connect(store_addr, Duration::from_secs(10), &job).unwrap();
    let listeners: Vec<SocketAddr> = (0..2)
        .map(|r| {
            let a = us.get(&format!("oxccl/c1/tcp/addr/{r}"), Duration::from_secs(60)).unwrap();
            String::from_utf8(a).unwrap().parse().unwrap()
        })
        .collect();
    let other = Auth::with_secret(JobSecret::new(b"not-the-job-secret-at-all", "the stranger").unwrap());

    // The store. Without a secret: refused at the handshake, told only that.
    let (_, challenge) = auth::Client::start(&Auth::none(), Purpose::Store).unwrap();
    let got =
        knock(store_addr, &[&challenge[..], &[0u8; auth::PROOF_BYTES], &requests("s/none", "s/lost")].concat(), None);
    learned_nothing("store, no secret", &got);
    // No handshake at all: the store's own protocol straight away.
    learned_nothing("store, no handshake", &knock(store_addr, &requests("s/raw", "s/lost"), None));
    // A wrong secret: its proof cannot be right (the stranger cannot check the server's MAC
    // either, so it sends a guess).
    let (_, challenge) = auth::Client::start(&other, Purpose::Store).unwrap();
    let mut guess = [0u8; auth::PROOF_BYTES];
    guess[..4].copy_from_slice(b"OXAP");
    let got = knock(store_addr, &[&challenge[..], &guess, &requests("s/wrong", "s/lost")].concat(), None);
    learned_nothing("store, wrong secret", &got);
    // The client side says why, at once, for both.
    let e = TcpStore::connect(store_addr, Duration::from_secs(30), &Auth::none()).unwrap_err().to_string();
    assert!(e.contains("requires the job secret"), "{e}");
    let e = TcpStore::connect(store_addr, Duration::from_secs(30), &other).unwrap_err().to_string();
    assert!(e.contains("did not prove it knows the job secret"), "{e}");
    // A recorded session of a real client, replayed byte for byte.
    let set = frame(0x10, &[bytes(b"s/recorded"), bytes(b"once")].concat());
    let hello = frame(0x01, &[b"OXST".as_slice(), &2u16.to_le_bytes()].concat());
    let (recording, reply) = record(store_addr, &job, Purpose::Store, &[hello.clone(), set].concat());
    assert_eq!(reply[4], 0x01, "the recorded session was served (hello answered)");
    assert_eq!(us.get("s/recorded", Duration::from_secs(5)).unwrap(), b"once");
    assert!(us.delete("s/recorded").unwrap());
    let got = knock(store_addr, &[recording, requests("s/replayed", "s/lost")].concat(), None);
    assert!(got.len() == auth::RESPONSE_BYTES, "a replay gets a fresh challenge answer, then the close");
    learned_nothing("store, replay", &got);
    // Joining as a rank: refused before anything is read or written.
    let env = LaunchEnv {
        rank: 1,
        world_size: 2,
        local_rank: None,
        local_world_size: None,
        store: Some(StoreAddr::Tcp("127.0.0.1".into(), store_addr.port())),
        store_hosted: true,
        launcher: "a stranger",
    };
    for (who, secret) in [("no secret", None), ("wrong secret", Some("not-the-job-secret-at-all"))] {
        let cfg = Config::from_sources(|k| match k {
            "OXCCL_JOB_SECRET" => secret.map(String::from),
            "OXCCL_TIMEOUT" => Some("5s".into()),
            _ => None,
        })
        .unwrap();
        let e = Communicator::from_launch_env(&env, cfg).expect_err(who).to_string();
        assert!(e.contains("job secret"), "{who}: {e}");
    }

    // The ranks' net-tcp listeners: no secret, a wrong one, no handshake at all. (A replayed
    // net-tcp opening is refused in the transport's own tests: once its links are up, a
    // listener accepts nothing more, so a stranger's knock waits unanswered until the
    // communicator closes.)
    let patience = Some(Duration::from_millis(500));
    for (r, l) in listeners.iter().enumerate() {
        let (_, challenge) = auth::Client::start(&Auth::none(), Purpose::NetTcp).unwrap();
        learned_nothing(&format!("rank {r}'s net-tcp, no secret"), &knock(*l, &challenge, patience));
        let (_, challenge) = auth::Client::start(&other, Purpose::NetTcp).unwrap();
        let got = knock(*l, &[&challenge[..], &guess].concat(), patience);
        learned_nothing(&format!("rank {r}'s net-tcp, wrong secret"), &got);
        learned_nothing(&format!("rank {r}'s net-tcp, no handshake"), &knock(*l, b"OXTC\x01\x00hello", patience));
    }
    // The store still serves the job, and none of the strangers' keys exist (their
    // connections are closed, so loss actions they registered would have run by now).
    std::thread::sleep(Duration::from_millis(200));
    for k in ["s/none", "s/raw", "s/wrong", "s/replayed", "s/recorded", "s/lost"] {
        assert_eq!(us.try_get(k).unwrap(), None, "{k} was set by a stranger");
    }
    std::fs::write(dir.join("stop"), b"").unwrap();
    let res = ranks.join().unwrap();
    assert_all_ok("all_reduces beside strangers", &res);
    for (i, (_, out, _)) in res.iter().enumerate() {
        let o = report::passed(i, out);
        assert!(o.checks >= 1, "rank {i}");
    }
    // Every stranger came from 127.0.0.1: the store (in rank 0) warned once for that
    // address, then logged the rest quietly.
    let err = &res[0].2;
    let warned = err.lines().filter(|l| l.contains("store: refused a connection from 127.0.0.1")).count();
    assert_eq!(warned, 1, "rank 0 warns once per address:\n{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A secret file others may read is refused, naming the file, its mode and the fix.
#[test]
fn a_secret_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("oxccl-secret-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("job.secret");
    std::fs::write(&path, "a-secret-of-thirty-two-characters\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let p = path.to_str().unwrap();
    let env = [("OXCCL_JOB_SECRET_FILE", p), ("OXCCL_STORE", "tcp://127.0.0.1:1"), ("OXCCL_TIMEOUT", "5s")];
    let cmds = (0..1).map(|_| std::process::Command::new(worker())).collect();
    let res = oxccl_tests::run_commands(cmds, &["create_fails"], &env, Duration::from_secs(60));
    let e = report::get(&res[0].1, "error").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    assert!(e.contains(p) && e.contains("mode 640") && e.contains("chmod 600"), "{e}\n{res:?}");
    // Made private, the same file is the job's secret.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = Config::from_sources(|k| (k == "OXCCL_JOB_SECRET_FILE").then(|| p.to_string())).unwrap();
    assert_eq!(a.auth.secret().unwrap().expose(), b"a-secret-of-thirty-two-characters");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A job on one host with nothing set (no secret, no consent) runs: every listener stays on
/// loopback, and explain says so.
#[test]
fn a_loopback_job_needs_nothing_set() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("tcp://127.0.0.1:{port}");
    // OXCCL_ALLOW_UNAUTHENTICATED=0 stops the harness from giving the ranks a secret.
    let env = [("OXCCL_STORE", store.as_str()), ("OXCCL_ALLOW_UNAUTHENTICATED", "0"), ("OXCCL_NET", "tcp")];
    let cmds = (0..2).map(|_| std::process::Command::new(worker())).collect();
    let res = oxccl_tests::run_commands(cmds, &["explained"], &env, Duration::from_secs(60));
    assert_all_ok("a loopback job with nothing set", &res);
    let explain = report::get(&res[0].1, "explain").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    assert!(explain.contains("authentication: no job secret: TCP listeners stay on loopback"), "{explain}");
}

/// Rank 0 hosting the store on every interface: refused without a secret, with a message
/// that says what to set; with `OXCCL_ALLOW_UNAUTHENTICATED=1` it runs, warns, and explain
/// says so.
#[test]
fn a_store_beyond_loopback_needs_a_secret_or_consent() {
    let ip = match oxccl_transports::tcp::interface_addr(None) {
        Ok(ip) if !ip.is_loopback() => ip,
        _ => {
            println!("skipped: this machine has no interface beyond loopback");
            return;
        }
    };
    let ip = ip.to_string();
    // Each run on a port of its own, picked just before; a port some other socket of the
    // machine took meanwhile (an outgoing connection's ephemeral port) is picked again.
    let run = |n: usize, scenario: &str, extra: &[(&str, &str)]| {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port().to_string();
            let base = [("MASTER_ADDR", ip.as_str()), ("MASTER_PORT", port.as_str()), ("OXCCL_TIMEOUT", "20s")];
            let env: Vec<(&str, &str)> = base.iter().copied().chain(extra.iter().copied()).collect();
            let cmds = (0..n).map(|_| std::process::Command::new(worker())).collect();
            let res = oxccl_tests::run_commands(cmds, &[scenario], &env, Duration::from_secs(60));
            if !res.iter().any(|r| r.2.contains("Address already in use")) {
                return res;
            }
            println!("port {port} was taken meanwhile: again on another");
        }
        panic!("no free port in five tries");
    };
    // No secret, no consent.
    let res = run(1, "create_fails", &[("OXCCL_ALLOW_UNAUTHENTICATED", "0")]);
    let e = report::get(&res[0].1, "error").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    assert!(
        e.contains("beyond loopback") && e.contains("OXCCL_JOB_SECRET") && e.contains("OXCCL_ALLOW_UNAUTHENTICATED=1"),
        "{e}\n{res:?}"
    );
    // Consent: it runs, says so once in the log, and explain says so.
    let res = run(2, "explained", &[("OXCCL_ALLOW_UNAUTHENTICATED", "1")]);
    assert_all_ok("unauthenticated by consent", &res);
    let (_, out, err) = &res[0];
    let explain = report::get(out, "explain").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    assert!(explain.contains("authentication: UNAUTHENTICATED"), "{explain}");
    assert_eq!(err.matches("OXCCL_ALLOW_UNAUTHENTICATED=1:").count(), 1, "one warning:\n{err}");
    // With a secret (as run_commands gives by default), explain says how connections prove it.
    let res = run(2, "explained", &[]);
    assert_all_ok("with a secret", &res);
    let explain = report::get(&res[1].1, "explain").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    assert!(explain.contains("every TCP connection proves the job secret"), "{explain}");
}
