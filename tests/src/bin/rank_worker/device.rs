//! The GPU data path on a simulated GPU (`OXCCL_GPU=simulated`: "device memory" is host
//! memory labelled GPU 0, and the GPU's copies complete late): every collective and
//! send/recv on device buffers gives, byte for byte, what the same call on host buffers
//! gives. A rank without a GPU (`OXCCL_GPU=off`) uses host buffers over the same links.

use oxccl::{Communicator, DataType, MemKind, RawBuf, RawCall, ReduceOp};

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

pub(crate) fn device(c: &Communicator, _seed: u64) -> usize {
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
                let mut got = vec![0xAAu8; rn * es];
                // SAFETY: as above.
                unsafe { c.call_raw(&call, buf(&send, dtype, kind), out(&mut got, dtype, kind)) }
                    .unwrap_or_else(|e| panic!("{} on {kind}: {e}", call.name()));
                assert!(got == want, "{} of {n} x {dtype} on {kind}: differs from host buffers", call.name());
                // In place, where the call has a form for it.
                let in_place = match call {
                    RawCall::AllReduce { .. } => Some((0, n)),
                    RawCall::Broadcast { .. } => Some((0, n)),
                    _ => None,
                };
                if let Some((off, len)) = in_place {
                    got = if r == root || !matches!(call, RawCall::Broadcast { .. }) {
                        send.clone()
                    } else {
                        vec![0xAA; n * es]
                    };
                    let b = out(&mut got[off * es..(off + len) * es], dtype, kind);
                    // SAFETY: one buffer, in place, alive until the call returns.
                    unsafe { c.call_raw(&call, b, b) }
                        .unwrap_or_else(|e| panic!("{} in place on {kind}: {e}", call.name()));
                    assert!(got == want, "{} in place of {n} x {dtype} on {kind}", call.name());
                }
                // The scratch of the host call was not touched by the device call, nor the input.
                assert!(send == values(dtype, sn, r, salt), "{}: the send buffer changed", call.name());
                checks += 1;
            }
            if w > 1 {
                // Point to point around the ring.
                let to = (r + 1) % w;
                let from = (r + w - 1) % w;
                let send = values(dtype, n, r, 99);
                let mut got = vec![0u8; n * dtype.size()];
                // SAFETY: the buffers live until the work and the receive complete.
                let work = unsafe { c.send_async_raw(buf(&send, dtype, kind), to) }.unwrap();
                // SAFETY: `got` lives until the receive returns.
                unsafe { c.recv_raw(out(&mut got, dtype, kind), from) }.unwrap();
                work.wait().unwrap();
                assert!(got == values(dtype, n, from, 99), "send/recv of {n} x {dtype} on {kind}");
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
        assert!(g.contains("GPU data staged through host memory") && g.contains(t), "peer {}: {g}", p.peer);
        if !gpu {
            assert!(g.contains("this rank has no GPU"), "{g}");
        } else if c.peers()[p.peer].gpus == 0 {
            assert!(g.contains("the peer has no GPU"), "{g}");
        }
    }
    let text = e.to_text();
    assert!(text.contains("GPU data staged through host memory"), "{text}");
    assert!(!text.contains(" shm"), "the path is named, never a bare shm: {text}");
    println!("rank {r} ({kind}): {checks} checks\n{text}");
    checks
}
