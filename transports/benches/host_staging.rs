//! One host-staging link between two threads (the same shared-memory segment a pair of
//! processes uses): 8-byte ping-pong round trip, and 64 MiB streaming next to a plain 64 MiB
//! memcpy in the same group. `cargo bench -p oxccl-transports --bench host_staging`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use oxccl_core::link::{Link, MemSlice, RecvMode, Tag};
use oxccl_core::store::{MemStore, Store};
use oxccl_transports::host_staging::{HostStaging, HostStagingConfig, HostStagingLink};

const CFG: HostStagingConfig =
    HostStagingConfig { staging_bytes: 4 << 20, chunk_bytes: 256 << 10, single_copy_bytes: 0 };

fn pair() -> (HostStagingLink, HostStagingLink) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let nonce = format!("bench{}", std::process::id());
    let s2 = store.clone();
    let n2 = nonce.clone();
    let t = std::thread::spawn(move || {
        let staging = HostStaging::new(&*s2, 1, 2, &[0, 1], &n2, CFG, Duration::from_secs(10)).unwrap();
        loop {
            if let Some(l) = staging.connect(&*s2, 0).unwrap() {
                return l;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let staging = HostStaging::new(&*store, 0, 2, &[0, 1], &nonce, CFG, Duration::from_secs(10)).unwrap();
    let a = staging.connect(&*store, 1).unwrap().expect("creator connects at once");
    (a, t.join().unwrap())
}

fn wait_send(l: &mut HostStagingLink, seq: u64) {
    while l.sends_done() <= seq {
        l.progress().unwrap();
    }
}
fn wait_recv(l: &mut HostStagingLink, seq: u64) {
    while l.recvs_done() <= seq {
        l.progress().unwrap();
    }
}

fn slice(v: &mut [u64]) -> MemSlice {
    // SAFETY: the vectors outlive every operation posted with them in these loops.
    unsafe { MemSlice::new(v.as_mut_ptr() as *mut u8, v.len() * 8) }
}

fn bench(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let mut g = c.benchmark_group("host_staging_link");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));

    // Ping-pong: the partner echoes exactly as many 8-byte messages as it is told to.
    {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u64; 1];
            while let Ok(k) = rx.recv() {
                for _ in 0..k {
                    let r = b.post_recv(Tag(1), slice(&mut buf), RecvMode::Copy).unwrap();
                    wait_recv(&mut b, r);
                    let s = b.post_send(Tag(1), slice(&mut buf)).unwrap();
                    wait_send(&mut b, s);
                }
            }
            b
        });
        let mut buf = vec![7u64; 1];
        g.bench_function("pingpong_8B_roundtrip", |bn| {
            bn.iter_custom(|iters| {
                tx.send(iters).unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    let s = a.post_send(Tag(1), slice(&mut buf)).unwrap();
                    wait_send(&mut a, s);
                    let r = a.post_recv(Tag(1), slice(&mut buf), RecvMode::Copy).unwrap();
                    wait_recv(&mut a, r);
                }
                t.elapsed()
            })
        });
        drop(tx);
        b = echo.join().unwrap();
    }

    // Streaming: the partner receives 64 MiB messages as fast as they come.
    const BYTES: usize = 64 << 20;
    g.throughput(Throughput::Bytes(BYTES as u64));
    let mut src = vec![1u64; BYTES / 8];
    let mut dst = vec![0u64; BYTES / 8];
    g.bench_function("memcpy_64MiB", |bn| {
        bn.iter(|| {
            dst.copy_from_slice(&src);
            black_box(&dst);
        })
    });
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let (ack_tx, ack) = std::sync::mpsc::channel::<()>();
    let sink = std::thread::spawn(move || {
        let mut buf = vec![0u64; BYTES / 8];
        while let Ok(k) = rx.recv() {
            for _ in 0..k {
                let r = b.post_recv(Tag(2), slice(&mut buf), RecvMode::Copy).unwrap();
                wait_recv(&mut b, r);
            }
            ack_tx.send(()).unwrap();
        }
    });
    g.bench_function("stream_64MiB", |bn| {
        bn.iter_custom(|iters| {
            tx.send(iters).unwrap();
            let t = Instant::now();
            for _ in 0..iters {
                let s = a.post_send(Tag(2), slice(&mut src)).unwrap();
                wait_send(&mut a, s);
            }
            // Count the time until the receiver has the last byte.
            ack.recv().unwrap();
            t.elapsed()
        })
    });
    drop(tx);
    sink.join().unwrap();
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
