//! Tests of the TCP store: a server on 127.0.0.1 with port 0, clients on threads, and raw
//! sockets sending hostile input.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl_core::auth::{self, Auth, Purpose};
use oxccl_core::store::Store;
use oxccl_core::Error;

use super::wire::{op, FrameBuf};
use super::{TcpStore, TcpStoreServer, MAGIC, PROTOCOL_VERSION};

const T: Duration = Duration::from_secs(5);

fn server() -> TcpStoreServer {
    TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), &Auth::none()).unwrap()
}

fn client(s: &TcpStoreServer) -> TcpStore {
    TcpStore::connect(s.local_addr(), T, &Auth::none()).unwrap()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A raw connection past the handshake (no secret), ready for hand-made frames.
fn raw(s: &TcpStoreServer) -> TcpStream {
    let mut c = raw_unshaken(s);
    auth::client_blocking(&mut c, &Auth::none(), Purpose::Store).unwrap();
    c
}

/// A raw connection before the handshake.
fn raw_unshaken(s: &TcpStoreServer) -> TcpStream {
    let c = TcpStream::connect(s.local_addr()).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c
}

fn hello(version: u16) -> Vec<u8> {
    FrameBuf::new(op::HELLO).u32(MAGIC).u16(version).finish().unwrap()
}

/// Reads until the server closes the connection; panics if it stays open for `T`.
fn assert_closed(mut c: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("server did not close the connection: {e}"),
        }
    }
}

/// A well-behaved client still gets served.
fn assert_serves(s: &TcpStoreServer, key: &str) {
    let c = client(s);
    c.set(key, b"ok").unwrap();
    assert_eq!(c.get(key, T).unwrap(), b"ok");
}

#[test]
fn basics() {
    let s = server();
    let c = client(&s);
    c.set("a", b"x").unwrap();
    assert_eq!(c.get("a", T).unwrap(), b"x");
    assert_eq!(c.try_get("a").unwrap().unwrap(), b"x");
    assert_eq!(c.try_get("b").unwrap(), None);
    c.set("a", b"").unwrap();
    assert_eq!(c.try_get("a").unwrap().unwrap(), b"");
    assert_eq!(c.add("n", 2).unwrap(), 2);
    assert_eq!(c.add("n", -5).unwrap(), -3);
    assert_eq!(c.try_get("n").unwrap().unwrap(), b"-3", "counters are decimal text");
    c.set("s", b"not a number").unwrap();
    let e = c.add("s", 1).unwrap_err();
    assert!(matches!(e, Error::Store(_)) && e.to_string().contains("does not hold a counter"), "{e}");
    // The connection is still usable after an error reply.
    assert!(c.delete("a").unwrap());
    assert!(!c.delete("a").unwrap());
    assert_eq!(c.try_get("a").unwrap(), None);
    let big = vec![7u8; 1 << 20];
    c.set("big", &big).unwrap();
    assert_eq!(c.get("big", T).unwrap(), big);
    let e = c.set("huge", &vec![0u8; super::MAX_FRAME]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn get_waits_for_later_set() {
    let s = server();
    let waiter = client(&s);
    let setter = client(&s);
    let t = std::thread::spawn(move || waiter.get("late", T));
    std::thread::sleep(Duration::from_millis(50));
    setter.set("late", b"v").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"v");
}

#[test]
fn shared_client_waiter_does_not_block_setter() {
    // One client, two threads: the waiting `get` must not hold up the `set` it waits for.
    let s = server();
    let c = Arc::new(client(&s));
    let c2 = c.clone();
    let start = Instant::now();
    let t = std::thread::spawn(move || c2.get("mine", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(50));
    c.set("mine", b"v").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"v");
    assert!(start.elapsed() < T, "took {:?}", start.elapsed());
}

#[test]
fn get_times_out() {
    let s = server();
    let c = client(&s);
    let start = Instant::now();
    let e = c.get("never", Duration::from_millis(100)).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("never"), "{e}");
    assert!(took >= Duration::from_millis(100) && took < T, "{took:?}");
    // The same connection serves the next request.
    c.set("never", b"now").unwrap();
    assert_eq!(c.get("never", Duration::ZERO).unwrap(), b"now");
}

#[test]
fn concurrent_add() {
    let s = server();
    let shared = Arc::new(client(&s));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            // Half the threads have their own connection, half share one.
            let c: Arc<TcpStore> = if i % 2 == 0 { Arc::new(client(&s)) } else { shared.clone() };
            std::thread::spawn(move || (0..50).map(|_| c.add("count", 1).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let mut seen: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=400).collect::<Vec<i64>>(), "every add saw a distinct value");
    assert_eq!(shared.add("count", 0).unwrap(), 400);
}

#[test]
fn connect_retries_until_server_starts() {
    let port = free_port();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], port)), &Auth::none()).unwrap()
    });
    let c = TcpStore::connect(format!("127.0.0.1:{port}"), T, &Auth::none()).unwrap();
    let s = t.join().unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(client(&s).get("k", T).unwrap(), b"v");
}

#[test]
fn connect_times_out() {
    let port = free_port();
    let start = Instant::now();
    let e = TcpStore::connect(format!("127.0.0.1:{port}"), Duration::from_millis(150), &Auth::none()).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(start.elapsed() < T);
}

#[test]
fn drop_closes_connections() {
    let s = server();
    let addr = s.local_addr();
    let c = Arc::new(client(&s));
    let c2 = c.clone();
    let waiting = std::thread::spawn(move || c2.get("never", Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    drop(s);
    let e = waiting.join().unwrap().unwrap_err();
    assert!(start.elapsed() < T, "a waiting client was released when the server stopped");
    assert!(matches!(e, Error::Store(_)), "{e}");
    assert!(e.to_string().contains(&format!("store at {addr} closed the connection")), "{e}");
    // The port is free again.
    let again = TcpStoreServer::start(addr, &Auth::none()).unwrap();
    assert_eq!(again.local_addr(), addr);
}

#[test]
fn hostile_garbage() {
    let s = server();
    let good = client(&s);
    // Plain text: its first four bytes read as a length of about 540 MB.
    let mut c = raw(&s);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(c);
    // A small frame with an opcode that is not hello.
    let mut c = raw(&s);
    c.write_all(&[5, 0, 0, 0, 0x42, 1, 2, 3, 4]).unwrap();
    assert_closed(c);
    // A zero-length frame.
    let mut c = raw(&s);
    c.write_all(&[0, 0, 0, 0]).unwrap();
    assert_closed(c);
    good.set("g", b"1").unwrap();
    assert_serves(&s, "after-garbage");
}

#[test]
fn hostile_huge_frame() {
    let s = server();
    let mut c = raw(&s);
    c.write_all(&[0xff, 0xff, 0xff, 0xff, op::HELLO, 1, 2, 3]).unwrap();
    assert_closed(c);
    // Just over the limit, after a good hello.
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    let over = (super::MAX_FRAME as u32 + 1).to_le_bytes();
    c.write_all(&over).unwrap();
    c.write_all(&[op::SET]).unwrap();
    let got = assert_closed(c);
    assert_eq!(got.get(4), Some(&op::HELLO), "the hello was answered first");
    assert_serves(&s, "after-huge");
}

#[test]
fn hostile_truncated_frames() {
    let s = server();
    // A frame claiming 100 bytes, then end of stream after 10.
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    c.write_all(&100u32.to_le_bytes()).unwrap();
    c.write_all(&[op::SET; 10]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_closed(c);
    // Half a length field.
    let mut c = raw(&s);
    c.write_all(&[9, 0]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_closed(c);
    // A whole frame whose key field claims more bytes than the frame holds.
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    let mut f = vec![9, 0, 0, 0, op::TRY_GET];
    f.extend_from_slice(&1000u32.to_le_bytes());
    f.extend_from_slice(b"abcd");
    c.write_all(&f).unwrap();
    assert_closed(c);
    // Trailing bytes after the fields, and an unknown opcode after a good hello.
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    c.write_all(&FrameBuf::new(op::DELETE).bytes(b"k").put(b"junk").finish().unwrap()).unwrap();
    assert_closed(c);
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    c.write_all(&FrameBuf::new(0x77).bytes(b"k").finish().unwrap()).unwrap();
    assert_closed(c);
    assert_serves(&s, "after-truncated");
}

#[test]
fn hostile_bad_hello() {
    let s = server();
    // A wrong version gets an error frame naming both versions, then the close.
    let mut c = raw(&s);
    c.write_all(&hello(PROTOCOL_VERSION + 98)).unwrap();
    let got = assert_closed(c);
    assert_eq!(got.get(4), Some(&op::ERROR), "{got:?}");
    let text = String::from_utf8_lossy(&got[9..]);
    assert!(text.contains(&format!("version {}", PROTOCOL_VERSION + 98)), "{text}");
    // A wrong magic is closed without an answer.
    let mut c = raw(&s);
    c.write_all(&FrameBuf::new(op::HELLO).u32(0xdead_beef).u16(PROTOCOL_VERSION).finish().unwrap()).unwrap();
    assert!(assert_closed(c).is_empty());
    // A hello too short for its fields.
    let mut c = raw(&s);
    c.write_all(&[3, 0, 0, 0, op::HELLO, 1, 2]).unwrap();
    assert_closed(c);
    assert_serves(&s, "after-bad-hello");
}

#[test]
fn client_rejects_non_store_server() {
    // Something that answers the handshake with nonsense: the client fails fast with a store
    // error.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; auth::CHALLENGE_BYTES];
        c.read_exact(&mut b).unwrap();
        c.write_all(&[b"HTTP/1.1 400 Bad Request\r\n".as_slice(); 4].concat()).unwrap();
    });
    let start = Instant::now();
    let e = TcpStore::connect(addr, Duration::from_secs(30), &Auth::none()).unwrap_err();
    assert!(matches!(e, Error::Store(_)), "{e}");
    assert!(e.to_string().contains("did not answer with an OxCCL handshake"), "{e}");
    assert!(start.elapsed() < T);
    t.join().unwrap();
    // An OxCCL store that answers hello with nonsense is refused as well.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        auth::server_blocking(&mut c, &Auth::none(), Purpose::Store).unwrap();
        let mut b = [0u8; 11];
        c.read_exact(&mut b).unwrap();
        c.write_all(&FrameBuf::new(op::OK).finish().unwrap()).unwrap();
    });
    let e = TcpStore::connect(addr, Duration::from_secs(30), &Auth::none()).unwrap_err();
    assert!(e.to_string().contains("OxCCL store"), "{e}");
    t.join().unwrap();
}

/// Fuzzing (proptest): cases per target from `OXCCL_FUZZ_CASES` (default 64; `.ci/run` runs
/// many more). No failure files are written.
fn fuzz_config() -> proptest::test_runner::Config {
    let cases = std::env::var("OXCCL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() }
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// A frame: a length field that may lie, an opcode (valid ones often), a random body.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let opcode = prop_oneof![
            Just(op::SET),
            Just(op::GET),
            Just(op::TRY_GET),
            Just(op::ADD),
            Just(op::DELETE),
            Just(op::WATCH),
            Just(op::DISARM),
            Just(op::HELLO),
            any::<u8>(),
        ];
        (opcode, proptest::collection::vec(any::<u8>(), 0..48), prop_oneof![Just(None), any::<u32>().prop_map(Some)])
            .prop_map(|(opcode, body, lie)| {
                let len = lie.unwrap_or(body.len() as u32 + 1);
                let mut v = len.to_le_bytes().to_vec();
                v.push(opcode);
                v.extend_from_slice(&body);
                v
            })
    }

    proptest! {
        #![proptest_config(super::fuzz_config())]

        /// Any sequence of frames after a good hello (or instead of one): the server answers
        /// or closes that connection, never crashes or stalls, and still serves a good client.
        #[test]
        fn fuzz_store_server_survives_random_frames(
            with_hello in any::<bool>(),
            frames in proptest::collection::vec(frame(), 1..4),
        ) {
            use std::sync::OnceLock;
            static SERVER: OnceLock<TcpStoreServer> = OnceLock::new();
            let s = SERVER.get_or_init(server);
            let mut c = raw(s);
            if with_hello {
                c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
            }
            for f in &frames {
                // The server may already have closed: later writes may fail.
                if c.write_all(f).is_err() {
                    break;
                }
            }
            let _ = c.shutdown(Shutdown::Write);
            assert_closed(c);
            assert_serves(s, "fuzz-ok");
        }

        /// Random bytes where the handshake belongs (often with the right magic, and the set
        /// of a key after them): against a store with a job secret, nothing gets through, the
        /// key stays unset, and the store still serves a client with the secret.
        #[test]
        fn fuzz_store_handshake_refuses_random_bytes(
            magic in any::<bool>(),
            challenge in proptest::collection::vec(any::<u8>(), 0..48),
            proof in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            use std::sync::OnceLock;
            static SERVER: OnceLock<(TcpStoreServer, Auth)> = OnceLock::new();
            let (s, a) = SERVER.get_or_init(|| {
                let a = Auth::with_secret(oxccl_core::auth::JobSecret::new(b"fuzz-secret-0123456789", "test").unwrap());
                (TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), &a).unwrap(), a)
            });
            let mut c = raw_unshaken(s);
            let mut ch = challenge.clone();
            if magic && ch.len() >= 8 {
                ch[..4].copy_from_slice(b"OXAU");
                ch[4] = 1;
                ch[5] = 1;
                ch[6] = 1;
            }
            let _ = c.write_all(&ch);
            let _ = c.write_all(&proof);
            let _ = c.write_all(&hello(PROTOCOL_VERSION));
            let _ = c.write_all(&FrameBuf::new(op::SET).bytes(b"fuzz-stranger").bytes(b"x").finish().unwrap());
            let _ = c.shutdown(Shutdown::Write);
            assert_closed(c);
            let good = TcpStore::connect(s.local_addr(), T, a).unwrap();
            prop_assert_eq!(good.try_get("fuzz-stranger").unwrap(), None);
        }

        /// The loss-action decoder on any bytes: a list or an error, never a panic, never
        /// more actions than the bytes can hold.
        #[test]
        fn fuzz_loss_action_decoder(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut f = super::super::wire::Fields(&body);
            if let Ok(v) = super::super::wire::take_actions(&mut f) {
                prop_assert!(v.len() * 5 <= body.len());
            }
        }

        /// Encoding then decoding loss actions gives them back.
        #[test]
        fn fuzz_loss_actions_round_trip(
            keys in proptest::collection::vec(("[a-z/]{0,12}", any::<i64>(), proptest::collection::vec(any::<u8>(), 0..16), 0u8..3), 0..6),
        ) {
            use oxccl_core::store::LossAction;
            let actions: Vec<LossAction> = keys
                .into_iter()
                .map(|(key, delta, value, k)| match k {
                    0 => LossAction::SetIfAbsent { key, value },
                    1 => LossAction::Add { key, delta },
                    _ => LossAction::Delete { key },
                })
                .collect();
            let frame = super::super::wire::put_actions(FrameBuf::new(op::WATCH), &actions).finish().unwrap();
            let mut f = super::super::wire::Fields(&frame[5..]);
            prop_assert_eq!(super::super::wire::take_actions(&mut f).unwrap(), actions);
        }
    }
}

/// A client that is lost (its watch connection ends without a disarm) gets its loss actions
/// carried out; one that drops its watch (the goodbye) does not.
#[test]
fn loss_actions_run_only_for_a_lost_client() {
    use oxccl_core::store::LossAction;
    let s = server();
    let c = client(&s);
    c.set("live", b"2").unwrap();
    let actions = vec![
        LossAction::SetIfAbsent { key: "fail".into(), value: b"rank 1 lost".to_vec() },
        LossAction::Add { key: "live".into(), delta: -1 },
        LossAction::Delete { key: "mine".into() },
    ];
    c.set("mine", b"x").unwrap();
    // A goodbye: nothing happens.
    let w = c.watch(&actions).unwrap().expect("the TCP store watches");
    assert!(!w.store_gone());
    drop(w);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.try_get("fail").unwrap(), None);
    assert_eq!(c.try_get("live").unwrap().unwrap(), b"2");
    // A lost client: its connection ends without the disarm (as when the process is killed).
    let mut raw_c = raw(&s);
    raw_c.write_all(&hello(PROTOCOL_VERSION)).unwrap();
    let f = super::wire::put_actions(FrameBuf::new(op::WATCH), &actions).finish().unwrap();
    raw_c.write_all(&f).unwrap();
    // The hello reply (11 bytes) and the watch's OK (5): the server holds the actions.
    let mut reply = [0u8; 16];
    raw_c.read_exact(&mut reply).unwrap();
    assert_eq!(reply[15], op::OK);
    drop(raw_c);
    assert_eq!(c.get("fail", T).unwrap(), b"rank 1 lost");
    let end = Instant::now() + T;
    while c.try_get("live").unwrap().unwrap() != b"1" {
        assert!(Instant::now() < end, "live count not decremented");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(c.try_get("mine").unwrap(), None);
    // The first report wins.
    c.set("fail", b"first").unwrap();
    let w = c.watch(&actions).unwrap().unwrap();
    // A watcher sees the store vanish.
    drop(s);
    let end = Instant::now() + T;
    while !w.store_gone() {
        assert!(Instant::now() < end, "the store's end was not seen");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TLS on the store (`OXCCL_TLS_*`): a client of the same CA sets, gets and watches, inside
/// TLS and with the job secret; a client without TLS, or with a certificate of another CA, is
/// refused with an error, and sets nothing.
#[test]
fn tls_store_serves_its_ca_and_refuses_others() {
    use oxccl_transports::tls::testing::make;
    let dir = std::env::temp_dir().join(format!("oxccl-store-tls-{}", std::process::id()));
    let (_, files) = make(&dir.join("job"), &["server", "client"]);
    let (_, other) = make(&dir.join("other"), &["x"]);
    let secret = || Auth::with_secret(oxccl_core::auth::JobSecret::new(b"tls-store-secret-0123", "test").unwrap());
    let server_auth = secret().and_tls(Some(files[0].clone()));
    let s = TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), &server_auth).unwrap();
    let c = TcpStore::connect(s.local_addr(), T, &secret().and_tls(Some(files[1].clone()))).unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k", T).unwrap(), b"v");
    let w = c.watch(&[oxccl_core::store::LossAction::Delete { key: "k".into() }]).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!w.store_gone(), "a TLS watch is quiet while the store lives");
    drop(w);
    // TLS at one end only, either way round, and a certificate of another CA: errors at once
    // that say so (not retries until the timeout).
    let t0 = Instant::now();
    let e = TcpStore::connect(s.local_addr(), T, &secret()).unwrap_err().to_string();
    assert!(e.contains("TLS is on at one end only"), "{e}");
    let e = TcpStore::connect(s.local_addr(), T, &secret().and_tls(Some(other[0].clone()))).unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    let plain = TcpStoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), &secret()).unwrap();
    let e = TcpStore::connect(plain.local_addr(), T, &secret().and_tls(Some(files[1].clone()))).unwrap_err();
    assert!(e.to_string().contains("does the store run TLS too"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "refusals are quick: {:?}", t0.elapsed());
    assert_eq!(c.try_get("k").unwrap().unwrap(), b"v", "nothing changed");
    std::fs::remove_dir_all(&dir).unwrap();
}
