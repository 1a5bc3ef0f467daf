//! Raw libfabric against an OxCCL net-libfabric link, same provider, same two processes, same
//! run: 64 MiB one-way bandwidth and 8-byte round trips.
//!
//! ```sh
//! cargo bench -p oxccl-transports --features libfabric --bench libfabric
//! OXCCL_LIBFABRIC_PROVIDER=shm cargo bench -p oxccl-transports --features libfabric --bench libfabric
//! ```
//!
//! The raw loop calls `fi_tsend` / `fi_trecv` / `fi_cq_read` directly (through the bindings'
//! thin wrapper, no OxCCL code between): one 64 MiB tagged message per iteration, then an
//! 8-byte acknowledgement; 8-byte ping-pong for latency. The OxCCL side does the same through
//! `Link::post_send` / `post_recv` / `progress`. Each figure is the median of `ROUNDS` rounds,
//! raw and OxCCL alternating; the ratios are given both as the ratio of the medians and as
//! the median of each round's ratio to the raw round just before it (robust to the seconds-long
//! slow phases of a shared machine).
//!
//! `-- --one-thread` instead runs both ends in this process, one thread driving them in turn:
//! an 8-byte round trip then costs only the CPU work on its path (no second core, no
//! scheduling), which shows what the link adds per message with little noise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxccl_core::link::{Link, MemSlice, RecvMode, Tag};
use oxccl_core::store::Store;
use oxccl_core::{Error, Result};
use oxccl_transports::libfabric::fabric::{Completion, Endpoint, OpCtx};
use oxccl_transports::libfabric::{probe, LibfabricConfig, LibfabricLink, LibfabricTransport, SharedEndpoint};

const BIG: usize = 64 << 20;
const BW_ITERS: usize = 10;
const LAT_ITERS: usize = 2000;
const ROUNDS: usize = 15;
/// Round trips per round of the one-thread comparison.
const ONE_THREAD_ITERS: usize = 50_000;

/// A store in a directory both processes see (one file per key).
#[derive(Debug)]
struct DirStore(PathBuf);

impl Store for DirStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let f = self.0.join(key.replace('/', "_"));
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, value).and_then(|_| std::fs::rename(&tmp, &f)).map_err(|e| Error::Store(e.to_string()))
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(std::fs::read(self.0.join(key.replace('/', "_"))).ok())
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let t = Instant::now();
        loop {
            if let Some(v) = self.try_get(key)? {
                return Ok(v);
            }
            if t.elapsed() > timeout {
                return Err(oxccl_core::store::timeout_error(key, timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    fn add(&self, _: &str, _: i64) -> Result<i64> {
        Err(Error::Unsupported("DirStore::add".into()))
    }
    fn delete(&self, key: &str) -> Result<bool> {
        Ok(std::fs::remove_file(self.0.join(key.replace('/', "_"))).is_ok())
    }
}

fn cfg() -> LibfabricConfig {
    LibfabricConfig {
        provider: Some(std::env::var("OXCCL_LIBFABRIC_PROVIDER").unwrap_or_else(|_| "tcp".into())),
        chunk: std::env::var("OXCCL_LIBFABRIC_CHUNK_BYTES")
            .ok()
            .and_then(|v| oxccl_core::config::parse_size(&v))
            .unwrap_or(LibfabricConfig::default().chunk),
        rma_min: std::env::var("OXCCL_LIBFABRIC_RMA_BYTES")
            .ok()
            .and_then(|v| oxccl_core::config::parse_size(&v))
            .unwrap_or(LibfabricConfig::default().rma_min),
        ..Default::default()
    }
}

/// Raw: waits for the completion of context id `id`.
fn wait(ep: &mut Endpoint, id: u64, seen: &mut Vec<Completion>) {
    let t = Instant::now();
    loop {
        if let Some(i) = seen.iter().position(|c| c.id == id) {
            let c = seen.swap_remove(i);
            c.result.expect("raw completion");
            return;
        }
        ep.poll(seen, 16).expect("fi_cq_read");
        assert!(t.elapsed() < Duration::from_secs(60), "raw loop stalled");
    }
}

fn send(ep: &mut Endpoint, buf: &[u8], to: u64, tag: u64, ctx: &mut OpCtx, seen: &mut Vec<Completion>) {
    // SAFETY: buf and ctx outlive the operation (waited for below).
    while !unsafe { ep.tsend(buf.as_ptr(), buf.len(), std::ptr::null_mut(), to, tag, ctx) }.expect("fi_tsend") {
        ep.poll(seen, 16).expect("fi_cq_read");
    }
    wait(ep, ctx.id, seen);
}

fn recv(ep: &mut Endpoint, buf: &mut [u8], tag: u64, ctx: &mut OpCtx, seen: &mut Vec<Completion>) {
    // SAFETY: buf and ctx outlive the operation (waited for below).
    while !unsafe { ep.trecv(buf.as_mut_ptr(), buf.len(), std::ptr::null_mut(), tag, ctx) }.expect("fi_trecv") {
        ep.poll(seen, 16).expect("fi_cq_read");
    }
    wait(ep, ctx.id, seen);
}

/// One round of the raw loop; returns (GB/s, round trip in us) on rank 0.
fn raw_round(rank: usize, dir: &Path, round: usize, big: &mut [u8]) -> (f64, f64) {
    let want = probe(&cfg()).expect("provider");
    let mut ep = Endpoint::open(|p| p.name == want.name && p.domain == want.domain, 1024).expect("open");
    let store = DirStore(dir.to_path_buf());
    store.set(&format!("raw{round}/{rank}"), ep.name()).unwrap();
    let other = store.get(&format!("raw{round}/{}", 1 - rank), Duration::from_secs(30)).unwrap();
    let to = ep.insert(&other).unwrap();
    let mut seen = Vec::new();
    let (mut c1, mut c2) = (OpCtx::new(1), OpCtx::new(2));
    let mut small = [0u8; 8];
    // Warm-up (connection) and latency.
    let mut lat = 0.0;
    for i in 0..LAT_ITERS + 100 {
        if i == 100 {
            lat = 0.0;
        }
        let t = Instant::now();
        if rank == 0 {
            send(&mut ep, &small.clone(), to, 7, &mut c1, &mut seen);
            recv(&mut ep, &mut small, 8, &mut c2, &mut seen);
        } else {
            recv(&mut ep, &mut small, 7, &mut c2, &mut seen);
            send(&mut ep, &small.clone(), to, 8, &mut c1, &mut seen);
        }
        lat += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    for _ in 0..BW_ITERS {
        if rank == 0 {
            send(&mut ep, big, to, 9, &mut c1, &mut seen);
            recv(&mut ep, &mut small, 10, &mut c2, &mut seen);
        } else {
            recv(&mut ep, big, 9, &mut c2, &mut seen);
            send(&mut ep, &small.clone(), to, 10, &mut c1, &mut seen);
        }
    }
    let bw = (BIG * BW_ITERS) as f64 / t.elapsed().as_secs_f64() / 1e9;
    (bw, lat / LAT_ITERS as f64 * 1e6)
}

fn link_wait(l: &mut LibfabricLink, sends: u64, recvs: u64) {
    let t = Instant::now();
    while l.sends_done() < sends || l.recvs_done() < recvs {
        l.progress().expect("link progress");
        assert!(t.elapsed() < Duration::from_secs(60), "link stalled");
    }
}

/// One round over an OxCCL link; returns (GB/s, round trip in us) on rank 0.
fn oxccl_round(rank: usize, dir: &Path, round: usize, big: &mut [u8]) -> (f64, f64) {
    let store = DirStore(dir.join(format!("ox{round}")));
    std::fs::create_dir_all(&store.0).unwrap();
    let mut t = LibfabricTransport::new(&store, rank, 2, cfg()).unwrap();
    let mut l = loop {
        if let Some(l) = t.connect(&store, 1 - rank).unwrap() {
            break l;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (mut small, mut small_in) = ([0u8; 8], [0u8; 8]);
    // SAFETY: `small`, `small_in` and `big` outlive every operation (each is waited for).
    let (s8, r8) = unsafe { (MemSlice::new(small.as_mut_ptr(), 8), MemSlice::new(small_in.as_mut_ptr(), 8)) };
    // SAFETY: as above.
    let sb = unsafe { MemSlice::new(big.as_mut_ptr(), big.len()) };
    // Counts of sends and receives posted so far (the link completes them in order).
    let (mut ns, mut nr) = (0u64, 0u64);
    // One exchange: rank 0 sends `a` and receives `b`; rank 1 receives `a`, then sends `b`.
    let mut exchange = |l: &mut LibfabricLink, a: (Tag, MemSlice), b: (Tag, MemSlice)| {
        if rank == 0 {
            l.post_send(a.0, a.1).unwrap();
            l.post_recv(b.0, b.1, RecvMode::Copy).unwrap();
            ns += 1;
            nr += 1;
            link_wait(l, ns, nr);
        } else {
            l.post_recv(a.0, a.1, RecvMode::Copy).unwrap();
            nr += 1;
            link_wait(l, ns, nr);
            l.post_send(b.0, b.1).unwrap();
            ns += 1;
            link_wait(l, ns, nr);
        }
    };
    let mut lat = 0.0;
    for i in 0..LAT_ITERS + 100 {
        if i == 100 {
            lat = 0.0;
        }
        let t = Instant::now();
        exchange(&mut l, (Tag(1), s8), (Tag(1), r8));
        lat += t.elapsed().as_secs_f64();
    }
    let t0 = Instant::now();
    for _ in 0..BW_ITERS {
        exchange(&mut l, (Tag(2), sb), (Tag(3), s8));
    }
    let bw = (BIG * BW_ITERS) as f64 / t0.elapsed().as_secs_f64() / 1e9;
    l.close(Instant::now() + Duration::from_secs(5));
    (bw, lat / LAT_ITERS as f64 * 1e6)
}

/// Both ends in this process, driven by one thread in turn: the round trip is the CPU work on
/// the critical path alone (no scheduling, no waiting for the other core), so raw and link
/// compare with little noise. Every wait polls both ends, in both loops. Returns (raw, link)
/// round trips in microseconds.
fn one_thread_round() -> (f64, f64) {
    let want = probe(&cfg()).expect("provider");
    let pick = |p: &oxccl_transports::libfabric::fabric::Provider| p.name == want.name && p.domain == want.domain;
    // Raw: two endpoints.
    let mut e = [Endpoint::open(pick, 1024).expect("open"), Endpoint::open(pick, 1024).expect("open")];
    let names = [e[0].name().to_vec(), e[1].name().to_vec()];
    let to = [e[0].insert(&names[1]).unwrap(), e[1].insert(&names[0]).unwrap()];
    let mut seen = [Vec::new(), Vec::new()];
    let mut ctx = [OpCtx::new(1), OpCtx::new(2), OpCtx::new(3), OpCtx::new(4)];
    let mut buf = [[0u8; 8]; 2];
    // Polls both ends until `id`'s completion shows at end `at`.
    let wait2 = |e: &mut [Endpoint; 2], seen: &mut [Vec<Completion>; 2], at: usize, id: u64| {
        let t = Instant::now();
        while !seen[at].iter().any(|c| c.id == id) {
            e[0].poll(&mut seen[0], 16).unwrap();
            e[1].poll(&mut seen[1], 16).unwrap();
            assert!(t.elapsed() < Duration::from_secs(60), "raw loop stalled");
        }
        seen[at].retain(|c| c.id != id);
    };
    let mut raw_iter = |e: &mut [Endpoint; 2], seen: &mut [Vec<Completion>; 2]| {
        // One way, then back: `from` sends tag 7 + from to the other end.
        for from in 0..2 {
            let to_end = 1 - from;
            let (rc, sc) = (&mut *ctx[2 + to_end] as *mut OpCtx, &mut *ctx[from] as *mut OpCtx);
            let (rp, sp) = (buf[to_end].as_mut_ptr(), buf[from].as_ptr());
            // SAFETY: buffers and contexts outlive their operations (each is waited for).
            while !unsafe { e[to_end].trecv(rp, 8, std::ptr::null_mut(), 7 + from as u64, rc) }.unwrap() {
                e[to_end].poll(&mut seen[to_end], 16).unwrap();
            }
            // SAFETY: as above.
            while !unsafe { e[from].tsend(sp, 8, std::ptr::null_mut(), to[from], 7 + from as u64, sc) }.unwrap() {
                e[0].poll(&mut seen[0], 16).unwrap();
                e[1].poll(&mut seen[1], 16).unwrap();
            }
            wait2(e, seen, from, 1 + from as u64);
            wait2(e, seen, to_end, 3 + to_end as u64);
        }
    };
    for _ in 0..100 {
        raw_iter(&mut e, &mut seen);
    }
    let t = Instant::now();
    for _ in 0..ONE_THREAD_ITERS {
        raw_iter(&mut e, &mut seen);
    }
    let raw = t.elapsed().as_secs_f64() / ONE_THREAD_ITERS as f64 * 1e6;
    drop(e);
    // Link: two endpoints, one per rank.
    let store = oxccl_core::store::MemStore::new();
    let c = cfg();
    let mut ta = LibfabricTransport::on(SharedEndpoint::open(&c, None).unwrap(), &store, 0, 2, c.clone()).unwrap();
    let mut tb = LibfabricTransport::on(SharedEndpoint::open(&c, None).unwrap(), &store, 1, 2, c.clone()).unwrap();
    let mut l = [ta.connect(&store, 1).unwrap().unwrap(), tb.connect(&store, 0).unwrap().unwrap()];
    let (mut out, mut inb) = ([[0u8; 8]; 2], [[0u8; 8]; 2]);
    // SAFETY: the buffers outlive every operation (each is waited for).
    let s = unsafe { [MemSlice::new(out[0].as_mut_ptr(), 8), MemSlice::new(out[1].as_mut_ptr(), 8)] };
    // SAFETY: as above.
    let r = unsafe { [MemSlice::new(inb[0].as_mut_ptr(), 8), MemSlice::new(inb[1].as_mut_ptr(), 8)] };
    // Polls both links until link `at` has completed `n` sends and receives.
    let wait2 = |l: &mut [LibfabricLink; 2], at: usize, n: u64| {
        let t = Instant::now();
        while l[at].sends_done() < n || l[at].recvs_done() < n {
            l[0].progress().unwrap();
            l[1].progress().unwrap();
            assert!(t.elapsed() < Duration::from_secs(60), "link stalled");
        }
    };
    let mut n = 0u64;
    let mut link_iter = |l: &mut [LibfabricLink; 2]| {
        n += 1;
        l[1].post_recv(Tag(1), r[1], RecvMode::Copy).unwrap();
        l[0].post_send(Tag(1), s[0]).unwrap();
        l[0].post_recv(Tag(1), r[0], RecvMode::Copy).unwrap();
        // End 1 answers once its receive is in.
        let t = Instant::now();
        while l[1].recvs_done() < n {
            l[0].progress().unwrap();
            l[1].progress().unwrap();
            assert!(t.elapsed() < Duration::from_secs(60), "link stalled");
        }
        l[1].post_send(Tag(1), s[1]).unwrap();
        wait2(l, 1, n);
        wait2(l, 0, n);
    };
    for _ in 0..100 {
        link_iter(&mut l);
    }
    let t = Instant::now();
    for _ in 0..ONE_THREAD_ITERS {
        link_iter(&mut l);
    }
    let link = t.elapsed().as_secs_f64() / ONE_THREAD_ITERS as f64 * 1e6;
    for x in &mut l {
        x.close(Instant::now() + Duration::from_secs(5));
    }
    (raw, link)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--one-thread") {
        if let Err(e) = probe(&cfg()) {
            println!("skipped: {e}");
            return;
        }
        let (mut r, mut l) = (vec![], vec![]);
        for i in 0..ROUNDS {
            let (a, b) = one_thread_round();
            println!("round {}: raw {a:.2} us, oxccl link {b:.2} us", i + 1);
            r.push(a);
            l.push(b);
        }
        let (r, l) = (median(r), median(l));
        println!("\n# one thread, both ends in this process, 8-byte round trip, median of {ROUNDS}:");
        println!(
            "# raw {r:.2} us, oxccl link {l:.2} us, ratio {:.2}, link's own work {:.0} ns per message",
            l / r,
            (l - r) * 500.0
        );
        return;
    }
    let (rank, dir) = match args.iter().position(|a| a == "--child") {
        Some(i) => (1, PathBuf::from(&args[i + 1])),
        None => {
            if let Err(e) = probe(&cfg()) {
                println!("skipped: {e}");
                return;
            }
            let d = std::env::temp_dir().join(format!("oxccl-lfbench-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            (0, d)
        }
    };
    let child = (rank == 0).then(|| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--child", dir.to_str().unwrap()])
            .spawn()
            .expect("spawn the peer process")
    });
    let mut big = vec![1u8; BIG];
    let (mut rb, mut rl, mut ob, mut ol) = (vec![], vec![], vec![], vec![]);
    for r in 0..ROUNDS {
        let (b, l) = raw_round(rank, &dir, r, &mut big);
        rb.push(b);
        rl.push(l);
        let (b, l) = oxccl_round(rank, &dir, r, &mut big);
        ob.push(b);
        ol.push(l);
        if rank == 0 {
            println!(
                "round {}: raw {:.3} GB/s {:.2} us rtt   oxccl link {:.3} GB/s {:.2} us rtt",
                r + 1,
                rb[r],
                rl[r],
                ob[r],
                ol[r]
            );
        }
    }
    if let Some(mut c) = child {
        let st = c.wait().unwrap();
        assert!(st.success(), "peer process failed: {st}");
        let _ = std::fs::remove_dir_all(&dir);
        let p = probe(&cfg()).unwrap();
        // Each round's link figure against the raw one just before it: phases of a noisy
        // machine (seconds long) touch both alike.
        let bw_ratio = median(ob.iter().zip(&rb).map(|(o, r)| o / r).collect());
        let lat_ratio = median(ol.iter().zip(&rl).map(|(o, r)| o / r).collect());
        let (rb, rl, ob, ol) = (median(rb), median(rl), median(ob), median(ol));
        println!("\n# {} ({}), 2 processes, median of {ROUNDS} alternating rounds", p.name, p.domain);
        println!(
            "# 64 MiB one-way: raw {rb:.3} GB/s, oxccl link {ob:.3} GB/s; ratio {:.2} of medians, {bw_ratio:.2} median \
             of rounds (target >= 0.90)",
            ob / rb
        );
        println!(
            "# 8-byte round trip: raw {rl:.2} us, oxccl link {ol:.2} us; ratio {:.2} of medians, {lat_ratio:.2} median \
             of rounds (target <= 1.20)",
            ol / rl
        );
    }
}
