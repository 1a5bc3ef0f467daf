//! The GPU data path on a simulated GPU (`OXCCL_GPU=simulated`: "device memory" is host
//! memory labelled GPU 0, and the GPU's copies complete late): every collective and
//! send/recv on device buffers gives, byte for byte, what the same call on host buffers
//! gives. A rank without a GPU (`OXCCL_GPU=off`) uses host buffers over the same links.

use oxccl::{Communicator, DataType, MemKind, RawBuf, RawCall, ReduceOp};

/// A buffer of the scenario: host memory (labelled GPU 0 on a simulated GPU), or, on a real
/// GPU (the `cuda` feature and `OXCCL_GPU` not simulated), device memory.
enum Mem {
    Host(Vec<u8>),
    #[cfg(feature = "cuda")]
    Gpu(oxccl_core::mem::Scratch, usize),
}

/// Whether the buffers are real GPU memory.
#[cfg(feature = "cuda")]
fn real_gpu() -> bool {
    cfg!(feature = "cuda") && std::env::var("OXCCL_GPU").is_ok_and(|v| v == "auto")
}

impl Mem {
    /// `bytes`, in the memory `kind` calls for.
    fn put(bytes: &[u8], kind: MemKind) -> Mem {
        #[cfg(feature = "cuda")]
        if real_gpu() && kind != MemKind::Host {
            use oxccl_core::mem::LocalMem;
            let g = oxccl::gpu::gpu::gpu(0).expect("GPU 0");
            let s = g.scratch(bytes.len()).expect("device memory");
            // SAFETY: `s` holds `bytes.len()` bytes of device memory; unified addressing lets
            // the copy read pageable host memory.
            unsafe { g.copy(s.ptr(), bytes.as_ptr(), bytes.len()) };
            return Mem::Gpu(s, bytes.len());
        }
        let _ = kind;
        Mem::Host(bytes.to_vec())
    }
    fn get(&self) -> Vec<u8> {
        match self {
            Mem::Host(v) => v.clone(),
            #[cfg(feature = "cuda")]
            Mem::Gpu(s, n) => {
                use oxccl_core::mem::LocalMem;
                let g = oxccl::gpu::gpu::gpu(0).expect("GPU 0");
                let mut v = vec![0u8; *n];
                // SAFETY: `s` holds `n` bytes of device memory.
                unsafe { g.copy(v.as_mut_ptr(), s.ptr(), *n) };
                v
            }
        }
    }
    fn raw(&mut self, dtype: DataType, kind: MemKind) -> RawBuf {
        match self {
            Mem::Host(v) => out(v, dtype, kind),
            #[cfg(feature = "cuda")]
            Mem::Gpu(s, n) => RawBuf { addr: s.ptr() as usize, count: *n / dtype.size(), dtype, kind },
        }
    }
    /// A part of it, in elements.
    fn part(&mut self, dtype: DataType, kind: MemKind, from: usize, count: usize) -> RawBuf {
        let b = self.raw(dtype, kind);
        RawBuf { addr: b.addr + from * dtype.size(), count, ..b }
    }
}

/// `count` elements of `dtype`, small integers exact in every type, different per rank and
/// per call.
fn values(dtype: DataType, count: usize, rank: usize, salt: usize) -> Vec<u8> {
    let es = dtype.size();
    let mut v = vec![0u8; count * es];
    for i in 0..count {
        let x = ((i * 7 + rank * 3 + salt) % 11) as i64 + 1;
        let b = &mut v[i * es..(i + 1) * es];
        match dtype {
            DataType::F32 => b.copy_from_slice(&(x as f32).to_ne_bytes()),
            DataType::Bf16 => b.copy_from_slice(&oxccl::half::bf16::from_f64(x as f64).to_ne_bytes()),
            DataType::I32 => b.copy_from_slice(&(x as i32).to_ne_bytes()),
            DataType::U8 => b.copy_from_slice(&(x as u8).to_ne_bytes()),
            _ => unreachable!("the scenario's types"),
        }
    }
    v
}

fn buf(v: &[u8], dtype: DataType, kind: MemKind) -> RawBuf {
    RawBuf { addr: v.as_ptr() as usize, count: v.len() / dtype.size(), dtype, kind }
}

/// A buffer the call writes.
fn out(v: &mut [u8], dtype: DataType, kind: MemKind) -> RawBuf {
    RawBuf { addr: v.as_mut_ptr() as usize, count: v.len() / dtype.size(), dtype, kind }
}

/// Runs the scenario on `c` (every rank calls it); returns the number of checks.
pub fn device(c: &Communicator, _seed: u64) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let gpu = c.peers()[r].gpus > 0;
    let kind = if gpu { MemKind::Device(0) } else { MemKind::Host };
    let mut checks = 0;
    let mut salt = 0;
    for dtype in [DataType::F32, DataType::Bf16, DataType::I32, DataType::U8] {
        for n in [0usize, 1, 1000, 20_001] {
            let ops: &[ReduceOp] = if dtype == DataType::F32 {
                &[ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg]
            } else {
                &[ReduceOp::Sum, ReduceOp::Min]
            };
            let mut calls: Vec<(RawCall, usize, usize)> = Vec::new(); // (call, send count, recv count)
            for &op in ops {
                calls.push((RawCall::AllReduce { op }, n, n));
                calls.push((RawCall::Reduce { op, root: (n + 1) % w }, n, if r == (n + 1) % w { n } else { 0 }));
                calls.push((RawCall::ReduceScatter { op }, n * w, n));
            }
            let root = n % w;
            calls.push((RawCall::Broadcast { root }, if r == root { n } else { 0 }, n));
            calls.push((RawCall::AllGather, n, n * w));
            calls.push((RawCall::AllToAll, n * w, n * w));
            let send_counts: Vec<usize> = (0..w).map(|k| (n + k * 3 + r) % (n + 1)).collect();
            let recv_counts: Vec<usize> = (0..w).map(|k| (n + r * 3 + k) % (n + 1)).collect();
            let (sv, rv) = (send_counts.iter().sum(), recv_counts.iter().sum());
            calls.push((RawCall::AllToAllV { send_counts, recv_counts }, sv, rv));
            for (call, sn, rn) in calls {
                salt += 1;
                let es = dtype.size();
                let send = values(dtype, sn, r, salt);
                // Host buffers: the oracle.
                let mut want = vec![0xAAu8; rn * es];
                // SAFETY: both buffers live, of the sizes the call takes, until it returns.
                unsafe { c.call_raw(&call, buf(&send, dtype, MemKind::Host), out(&mut want, dtype, MemKind::Host)) }
                    .unwrap_or_else(|e| panic!("{} on host buffers: {e}", call.name()));
                let mut got = Mem::put(&vec![0xAAu8; rn * es], kind);
                let mut dsend = Mem::put(&send, kind);
                // SAFETY: as above.
                unsafe { c.call_raw(&call, dsend.raw(dtype, kind), got.raw(dtype, kind)) }
                    .unwrap_or_else(|e| panic!("{} on {kind}: {e}", call.name()));
                assert!(got.get() == want, "{} of {n} x {dtype} on {kind}: differs from host buffers", call.name());
                // In place, where the call has a form for it.
                if matches!(call, RawCall::AllReduce { .. } | RawCall::Broadcast { .. }) {
                    let start = if r == root || !matches!(call, RawCall::Broadcast { .. }) {
                        send.clone()
                    } else {
                        vec![0xAA; n * es]
                    };
                    let mut inp = Mem::put(&start, kind);
                    let b = inp.part(dtype, kind, 0, n);
                    // SAFETY: one buffer, in place, alive until the call returns.
                    unsafe { c.call_raw(&call, b, b) }
                        .unwrap_or_else(|e| panic!("{} in place on {kind}: {e}", call.name()));
                    assert!(inp.get() == want, "{} in place of {n} x {dtype} on {kind}", call.name());
                }
                assert!(dsend.get() == send, "{}: the send buffer changed", call.name());
                assert!(send == values(dtype, sn, r, salt), "{}: the host send buffer changed", call.name());
                checks += 1;
            }
            if w > 1 {
                // Point to point around the ring.
                let to = (r + 1) % w;
                let from = (r + w - 1) % w;
                let send = values(dtype, n, r, 99);
                let mut dsend = Mem::put(&send, kind);
                let mut got = Mem::put(&vec![0u8; n * dtype.size()], kind);
                // SAFETY: the buffers live until the work and the receive complete.
                let work = unsafe { c.send_async_raw(dsend.raw(dtype, kind), to) }.unwrap();
                // SAFETY: `got` lives until the receive returns.
                unsafe { c.recv_raw(got.raw(dtype, kind), from) }.unwrap();
                work.wait().unwrap();
                assert!(got.get() == values(dtype, n, from, 99), "send/recv of {n} x {dtype} on {kind}");
                checks += 1;
            }
        }
    }
    c.barrier().unwrap();
    // Every link says how GPU data crosses it.
    let e = c.explain();
    for p in &e.peers {
        let g = p.gpu_data.as_deref().unwrap_or_else(|| panic!("peer {}: no GPU path said: {}", p.peer, e.to_text()));
        let t = p.transport.expect("every peer is reachable").name();
        assert!(g.contains("GPU data") && g.contains(t), "peer {}: {g}", p.peer);
        if !gpu {
            assert!(g.contains("this rank has no GPU"), "{g}");
        } else if c.peers()[p.peer].gpus == 0 {
            assert!(g.contains("the peer has no GPU"), "{g}");
        }
    }
    let text = e.to_text();
    assert!(text.contains("GPU data"), "{text}");
    assert!(!text.contains(" shm"), "the path is named, never a bare shm: {text}");
    println!("rank {r} ({kind}): {checks} checks\n{text}");
    checks
}

/// Sends, receives and collectives on the caller's stream of a real GPU (`OXCCL_GPU=auto`,
/// every rank on GPU 0), as NCCL's users queue them: the caller fills its buffers on its
/// stream, queues a batch (NCCL's group: a receive from the rank before, a send to the rank
/// after, an all_reduce) and the copy of the results to the host on the same stream, and
/// waits for the stream only: the results are right, so the batch ran after the fills and
/// before the copies. Then a send and a receive outside a batch, one after the other on the
/// stream (even ranks send first, odd ranks receive first, as NCCL needs outside a group).
/// Returns the number of checks.
#[cfg(feature = "cuda")]
pub fn device_streams(c: &Communicator, _seed: u64) -> usize {
    use oxccl::gpu::gpu::{caller, gpu};
    use oxccl_core::mem::LocalMem;
    use oxccl_core::stream::StreamHandle;
    let (r, w) = (c.rank(), c.world_size());
    let g = gpu(0).expect("GPU 0");
    let stream = caller::stream(g).expect("a stream");
    let n = 1 << 18;
    let [out_buf, in_buf, sum] = [0; 3].map(|_| g.scratch(4 * n).expect("device memory"));
    let dev = |p: *mut u8| RawBuf { addr: p as usize, count: n, dtype: DataType::F32, kind: MemKind::Device(0) };
    let (to, from) = ((r + 1) % w, (r + w - 1) % w);
    let value = |rank: usize, round: u32| (rank * 10) as f32 + round as f32;
    let mut host = vec![0f32; n];
    let mut checks = 0;
    for round in 1..=3u32 {
        // SAFETY: the buffers outlive the stream's work, synchronised before they are read.
        let works = unsafe {
            caller::fill32(g, stream, out_buf.ptr(), value(r, round).to_bits(), n).unwrap();
            caller::fill32(g, stream, sum.ptr(), (round as f32).to_bits(), n).unwrap();
            let mut b = c.stream_batch(0, StreamHandle(stream)).unwrap();
            let rw = b.recv(dev(in_buf.ptr()), from).unwrap();
            let sw = b.send(dev(out_buf.ptr()), to).unwrap();
            let aw = b.submit(&RawCall::AllReduce { op: ReduceOp::Sum }, dev(sum.ptr()), dev(sum.ptr())).unwrap();
            b.finish().unwrap();
            caller::to_host(g, stream, host.as_mut_ptr() as *mut u8, in_buf.ptr(), 4 * n).unwrap();
            caller::sync(g, stream).unwrap();
            [rw, sw, aw]
        };
        for wk in works {
            wk.wait().unwrap();
        }
        assert!(host.iter().all(|&x| x == value(from, round)), "round {round}: received {}", host[0]);
        // SAFETY: as above.
        unsafe {
            caller::to_host(g, stream, host.as_mut_ptr() as *mut u8, sum.ptr(), 4 * n).unwrap();
            caller::sync(g, stream).unwrap();
        }
        assert!(host.iter().all(|&x| x == (w as u32 * round) as f32), "round {round}: all_reduce {}", host[0]);
        checks += 2;
    }
    if w == 2 {
        let peer = 1 - r;
        // SAFETY: as above.
        unsafe {
            caller::fill32(g, stream, out_buf.ptr(), value(r, 9).to_bits(), n).unwrap();
            let a = if r == 0 {
                [
                    c.send_on_stream(dev(out_buf.ptr()), peer, StreamHandle(stream)).unwrap(),
                    c.recv_on_stream(dev(in_buf.ptr()), peer, StreamHandle(stream)).unwrap(),
                ]
            } else {
                [
                    c.recv_on_stream(dev(in_buf.ptr()), peer, StreamHandle(stream)).unwrap(),
                    c.send_on_stream(dev(out_buf.ptr()), peer, StreamHandle(stream)).unwrap(),
                ]
            };
            caller::to_host(g, stream, host.as_mut_ptr() as *mut u8, in_buf.ptr(), 4 * n).unwrap();
            caller::sync(g, stream).unwrap();
            for wk in a {
                wk.wait().unwrap();
            }
        }
        assert!(host.iter().all(|&x| x == value(peer, 9)), "send/recv on the stream: {}", host[0]);
        checks += 1;
    }
    c.barrier().unwrap();
    caller::destroy(g, stream);
    println!("rank {r}: {checks} checks on the caller's stream\n{}", c.explain().to_text());
    checks
}
