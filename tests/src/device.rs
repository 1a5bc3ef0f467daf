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
