//! Calls on a GPU stream, on a simulated GPU (`OXCCL_GPU=simulated`): an operation starts
//! only after the work queued on the stream before the call, the stream is held until the
//! operation has ended, in call order, and released when it fails or times out too (a
//! stream never waits forever). Two ranks as threads of this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use oxccl::{Communicator, Config, DataType, Error, MemKind, MemStore, RawBuf, RawCall, ReduceOp, Store};
use oxccl_core::stream::StreamHandle;

const STREAM: StreamHandle = StreamHandle(7);

fn dev(v: &mut [f32]) -> RawBuf {
    RawBuf { addr: v.as_mut_ptr() as usize, count: v.len(), dtype: DataType::F32, kind: MemKind::Device(0) }
}

/// Runs `f` on two ranks (threads), each with a communicator on a simulated GPU.
fn two_ranks(timeout: &str, f: impl Fn(&Communicator) + Send + Sync + 'static) {
    ranks_on("simulated", timeout, f);
}

/// Runs `f` on two ranks (threads), each with a communicator at `OXCCL_GPU=gpu`.
fn ranks_on(gpu: &str, timeout: &str, f: impl Fn(&Communicator) + Send + Sync + 'static) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let f = Arc::new(f);
    let (gpu, timeout) = (gpu.to_string(), timeout.to_string());
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (s, f, gpu, timeout) = (store.clone(), f.clone(), gpu.clone(), timeout.clone());
            std::thread::spawn(move || {
                let mut cfg = Config::defaults();
                cfg.set("OXCCL_GPU", &gpu).unwrap();
                cfg.set("OXCCL_TIMEOUT", &timeout).unwrap();
                let c = Communicator::init(s, r, 2, cfg).unwrap();
                f(&c);
            })
        })
        .collect();
    for r in ranks {
        r.join().expect("a rank panicked");
    }
}

/// Whether this process has a GPU; otherwise the calling test says `skipped: no GPU (why)`.
fn gpu_here() -> bool {
    #[cfg(feature = "cuda")]
    let why = oxccl::gpu::probe().err();
    #[cfg(not(feature = "cuda"))]
    let why = Some("this build has no cuda feature".to_string());
    match why {
        None => true,
        Some(why) => {
            oxccl_core::testing::skip(oxccl_core::testing::Need::Gpu, format!("no GPU ({why})"));
            false
        }
    }
}

#[test]
fn an_operation_on_a_stream_waits_for_earlier_work_and_holds_later_work() {
    two_ranks("30s", |c| {
        let sum = RawCall::AllReduce { op: ReduceOp::Sum };
        // Earlier work on the stream: 50 "kernels", each ending at one poll of the fence.
        c.with_simulated_streams(|s| s.queue_kernels(STREAM.0, 50)).unwrap();
        let mut v = vec![c.rank() as f32 + 1.0; 1000];
        let t = Instant::now();
        // SAFETY: `v` outlives the work (waited below).
        let w = unsafe { c.submit_on_stream(&sum, dev(&mut v), dev(&mut v), STREAM) }.unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "the call returns once queued");
        // Held from the call on: work queued on the stream now waits for the operation.
        let held = c.with_simulated_streams(|s| s.holds.lock().unwrap().clone()).unwrap();
        assert_eq!(held, vec![(STREAM.0, 1)]);
        w.wait().unwrap();
        assert_eq!(v, vec![3.0; 1000], "the all_reduce ran, after the earlier work");
        c.with_simulated_streams(|s| {
            use oxccl_core::stream::StreamOrder;
            assert_eq!(s.released(STREAM), 1);
            assert!(!s.blocked(STREAM.0), "released once the operation ended");
            assert_eq!(*s.pending_at_release.lock().unwrap(), vec![0], "the earlier work was done before it ran");
        })
        .unwrap();
        // Several calls in a row: held and released in call order.
        let mut bufs: Vec<Vec<f32>> = (0..5).map(|k| vec![k as f32; 64]).collect();
        let works: Vec<_> = bufs
            .iter_mut()
            // SAFETY: the buffers outlive the works (waited below).
            .map(|b| unsafe { c.submit_on_stream(&sum, dev(b), dev(b), STREAM) }.unwrap())
            .collect();
        for w in works {
            w.wait().unwrap();
        }
        for (k, b) in bufs.iter().enumerate() {
            assert_eq!(b, &vec![2.0 * k as f32; 64]);
        }
        c.with_simulated_streams(|s| {
            use oxccl_core::stream::StreamOrder;
            let holds: Vec<u64> = s.holds.lock().unwrap().iter().map(|h| h.1).collect();
            assert_eq!(holds, vec![1, 2, 3, 4, 5, 6], "numbered per stream, in call order");
            assert_eq!(s.released(STREAM), 6);
            assert!(!s.out_of_order.load(std::sync::atomic::Ordering::SeqCst));
        })
        .unwrap();
        // Host buffers on a stream are refused before anything is held, on every call.
        let mut h = vec![1.0f32; 4];
        let hb = RawBuf { kind: MemKind::Host, ..dev(&mut h) };
        // SAFETY: refused before use.
        let e = unsafe { c.submit_on_stream(&sum, hb, hb, STREAM) }.unwrap_err();
        assert!(e.to_string().contains("takes GPU buffers"), "{e}");
        let holds = c.with_simulated_streams(|s| s.holds.lock().unwrap().len()).unwrap();
        assert_eq!(holds, 6, "nothing held for a refused call");
    });
}

#[test]
fn a_failed_or_timed_out_operation_still_releases_the_stream() {
    two_ranks("500ms", |c| {
        let sum = RawCall::AllReduce { op: ReduceOp::Sum };
        // Rank 1's earlier work never ends: it times out waiting for it, and rank 0 waits
        // for rank 1 in the all_reduce: both fail, both streams are released.
        if c.rank() == 1 {
            c.with_simulated_streams(|s| s.queue_kernels(STREAM.0, u64::MAX / 2)).unwrap();
        }
        let mut v = vec![1.0f32; 16];
        let t = Instant::now();
        // SAFETY: `v` outlives the work.
        let w = unsafe { c.submit_on_stream(&sum, dev(&mut v), dev(&mut v), STREAM) }.unwrap();
        let e = w.wait().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(20), "bounded: {:?}", t.elapsed());
        if c.rank() == 1 {
            assert!(matches!(e, Error::Timeout { .. }), "{e}");
            assert!(e.to_string().contains("GPU stream"), "{e}");
        }
        c.with_simulated_streams(|s| {
            use oxccl_core::stream::StreamOrder;
            assert_eq!(s.released(STREAM), 1, "released after the failure");
            assert!(!s.blocked(STREAM.0));
        })
        .unwrap();
    });
}

#[test]
fn a_call_on_a_stream_takes_gpu_buffers() {
    two_ranks("30s", |c| {
        let mut h = vec![1.0f32; 4];
        let hb = RawBuf { kind: MemKind::Host, ..dev(&mut h) };
        // SAFETY: refused before use.
        let e = unsafe { c.submit_on_stream(&RawCall::AllReduce { op: ReduceOp::Sum }, hb, hb, STREAM) }.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("takes GPU buffers"), "{e}");
        // Nothing was held: a normal call still runs.
        c.all_reduce_in_place(&mut h, ReduceOp::Sum).unwrap();
        assert_eq!(h, vec![2.0; 4]);
    });
}

/// A receive and a send between two ranks on one stream go in one batch (as NCCL's group):
/// they progress together, may end out of call order, and the stream is held until both
/// have ended and released forward only. Called one by one instead, the receive holds the
/// stream and the send waits behind it (as in NCCL outside a group): both ranks fail with a
/// timeout that says what the stream waited for, and the streams are released.
#[test]
fn sends_and_receives_on_a_stream_go_in_one_batch() {
    two_ranks("30s", |c| {
        let peer = 1 - c.rank();
        let mut incoming = vec![0f32; 4096];
        let mut outgoing = vec![c.rank() as f32 + 10.0; 4096];
        let mut b = c.stream_batch(0, STREAM).unwrap();
        // SAFETY: the buffers outlive the works (waited below).
        let r = unsafe { b.recv(dev(&mut incoming), peer) }.unwrap();
        // SAFETY: as above.
        let s = unsafe { b.send(dev(&mut outgoing), peer) }.unwrap();
        b.finish().unwrap();
        c.with_simulated_streams(|st| {
            assert_eq!(*st.holds.lock().unwrap(), vec![(STREAM.0, 2)], "one hold, for the whole batch");
        })
        .unwrap();
        s.wait().unwrap();
        r.wait().unwrap();
        assert_eq!(incoming, vec![peer as f32 + 10.0; 4096]);
        c.with_simulated_streams(|st| {
            use oxccl_core::stream::StreamOrder;
            assert_eq!(st.released(STREAM), 2);
            assert!(!st.out_of_order.load(std::sync::atomic::Ordering::SeqCst), "released forward only");
        })
        .unwrap();
        // A host buffer is refused.
        let mut h = vec![0f32; 4];
        let hb = RawBuf { kind: MemKind::Host, ..dev(&mut h) };
        // SAFETY: refused before use.
        let e = unsafe { c.send_on_stream(hb, peer, STREAM) }.unwrap_err();
        assert!(e.to_string().contains("takes a GPU buffer"), "{e}");
    });
    two_ranks("1s", |c| {
        let peer = 1 - c.rank();
        let mut incoming = vec![0f32; 64];
        let mut outgoing = vec![1f32; 64];
        // SAFETY: the buffers outlive the works (waited below).
        let r = unsafe { c.recv_on_stream(dev(&mut incoming), peer, STREAM) }.unwrap();
        // SAFETY: as above.
        let s = unsafe { c.send_on_stream(dev(&mut outgoing), peer, STREAM) }.unwrap();
        let (es, er) = (s.wait().unwrap_err(), r.wait().unwrap_err());
        assert!(es.to_string().contains("GPU stream") || er.to_string().contains("GPU stream"), "{es} / {er}");
        c.with_simulated_streams(|st| {
            use oxccl_core::stream::StreamOrder;
            assert_eq!(st.released(STREAM), 2, "both released after the failure");
        })
        .unwrap();
    });
}

/// A call on a stream after a send on it: the call waits for the send to end, and the send
/// must still move while the call waits (the progress thread that waits is also what moves
/// sends and receives along).
#[test]
fn a_call_behind_a_send_on_the_same_stream_does_not_stall_it() {
    two_ranks("20s", |c| {
        let peer = 1 - c.rank();
        let mut buf = vec![c.rank() as f32; 1 << 16];
        let mut sum = vec![1f32; 1000];
        // SAFETY: the buffers outlive the works (waited below).
        let p = unsafe {
            if c.rank() == 0 {
                c.send_on_stream(dev(&mut buf), peer, STREAM)
            } else {
                c.recv_on_stream(dev(&mut buf), peer, STREAM)
            }
        }
        .unwrap();
        let all = RawCall::AllReduce { op: ReduceOp::Sum };
        // SAFETY: as above.
        let w = unsafe { c.submit_on_stream(&all, dev(&mut sum), dev(&mut sum), STREAM) }.unwrap();
        w.wait().unwrap();
        p.wait().unwrap();
        assert_eq!(sum, vec![2f32; 1000]);
        assert_eq!(buf, vec![0f32; 1 << 16]);
    });
}

/// Each stream is released in the order of its own operations, not of every stream's: rank 0
/// receives on one stream and sends twice on another while rank 1 receives twice then sends
/// on a third. With one counter for all streams, rank 0's second send would wait for its
/// receive, which waits for rank 1's send, which waits for that second send.
#[test]
fn streams_do_not_wait_for_each_other() {
    let (s1, s2, s3) = (StreamHandle(1), StreamHandle(2), StreamHandle(3));
    two_ranks("20s", move |c| {
        let peer = 1 - c.rank();
        let mut a = vec![c.rank() as f32 + 1.0; 1024];
        let mut b = vec![c.rank() as f32 + 2.0; 1024];
        let mut x = vec![if c.rank() == 1 { 7.0 } else { 0.0 }; 1024];
        // SAFETY: the buffers outlive the works (waited below).
        let works = unsafe {
            if c.rank() == 0 {
                vec![
                    c.recv_on_stream(dev(&mut x), peer, s1).unwrap(),
                    c.send_on_stream(dev(&mut a), peer, s2).unwrap(),
                    c.send_on_stream(dev(&mut b), peer, s2).unwrap(),
                ]
            } else {
                vec![
                    c.recv_on_stream(dev(&mut a), peer, s3).unwrap(),
                    c.recv_on_stream(dev(&mut b), peer, s3).unwrap(),
                    c.send_on_stream(dev(&mut x), peer, s3).unwrap(),
                ]
            }
        };
        for w in works {
            w.wait().unwrap();
        }
        if c.rank() == 1 {
            assert_eq!((a[0], b[0]), (1.0, 2.0), "rank 0's two sends, in order");
        } else {
            assert_eq!(x, vec![7.0; 1024], "rank 1's send");
        }
    });
}

/// On a real GPU (2 ranks as threads, OXCCL_GPU=auto, GPU data staged between them): the
/// caller fills its buffer on its stream, calls all_reduce on that stream and queues the copy
/// of the result to the host on it, then waits for the stream only: the result is the sum,
/// so the all_reduce ran after the fill and before the copy. Without a GPU: `skipped: no GPU`.
#[test]
fn on_a_real_gpu_a_call_is_ordered_with_the_callers_stream() {
    #[cfg(not(feature = "cuda"))]
    assert!(!gpu_here(), "a build without cuda has no GPU");
    #[cfg(feature = "cuda")]
    if gpu_here() {
        ranks_on("auto", "60s", |c| {
            use oxccl::gpu::gpu::{caller, gpu};
            use oxccl_core::mem::LocalMem;
            let r = c.rank();
            let g = gpu(0).unwrap();
            let n = 1 << 20;
            let buf = g.scratch(4 * n).unwrap();
            let stream = caller::stream(g).unwrap();
            let mut host = vec![0f32; n];
            let all = RawCall::AllReduce { op: ReduceOp::Sum };
            for round in 1..=3u32 {
                let v = (r as f32 + 1.0) * round as f32;
                let d = RawBuf { addr: buf.ptr() as usize, count: n, dtype: DataType::F32, kind: MemKind::Device(0) };
                // SAFETY: `buf` and `host` outlive the stream's work (synchronised below).
                unsafe {
                    caller::fill32(g, stream, buf.ptr(), v.to_bits(), n).unwrap();
                    let w = c.submit_on_stream(&all, d, d, StreamHandle(stream)).unwrap();
                    caller::to_host(g, stream, host.as_mut_ptr() as *mut u8, buf.ptr(), 4 * n).unwrap();
                    caller::sync(g, stream).unwrap();
                    w.wait().unwrap();
                }
                assert!(host.iter().all(|&x| x == 3.0 * round as f32), "round {round}: {}", host[0]);
            }
            caller::destroy(g, stream);
        })
    }
}

/// The typed calls on cudarc slices, on a real GPU (2 ranks as threads): all_reduce,
/// broadcast and all_gather queued on a cudarc stream, the results read back on that stream;
/// all_reduce, send and receive on views of part of a slice (the rest untouched).
/// Without a GPU: `skipped: no GPU`.
#[test]
fn on_a_real_gpu_the_typed_calls_take_cudarc_slices() {
    #[cfg(not(feature = "cuda"))]
    assert!(!gpu_here(), "a build without cuda has no GPU");
    #[cfg(feature = "cuda")]
    if gpu_here() {
        ranks_on("auto", "60s", |c| {
            let r = c.rank();
            let ctx = oxccl::cudarc::driver::CudaContext::new(0).unwrap();
            let stream = ctx.new_stream().unwrap();
            let mut x = stream.clone_htod(&vec![r as f32 + 1.0; 4096]).unwrap();
            c.all_reduce_cuda(&mut x, ReduceOp::Sum, &stream).unwrap();
            assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![3.0f32; 4096]);
            let mut y = stream.clone_htod(&vec![r as i32; 100]).unwrap();
            c.broadcast_cuda(&mut y, 1, &stream).unwrap();
            assert_eq!(stream.clone_dtoh(&y).unwrap(), vec![1i32; 100]);
            let part = stream.clone_htod(&vec![r as u8 + 7; 10]).unwrap();
            let mut all = stream.alloc_zeros::<u8>(20).unwrap();
            c.collective_cuda(&RawCall::AllGather, &part, &mut all, &stream).unwrap();
            let got = stream.clone_dtoh(&all).unwrap();
            assert_eq!(got, [vec![7u8; 10], vec![8u8; 10]].concat());
            // Views of part of a slice: the rest is untouched.
            let mut z = stream.clone_htod(&vec![r as f32 + 1.0; 300]).unwrap();
            c.all_reduce_cuda(&mut z.slice_mut(100..200), ReduceOp::Sum, &stream).unwrap();
            let peer = 1 - r;
            if r == 0 {
                c.send_cuda(&z.slice(0..100), peer, &stream).unwrap();
            } else {
                c.recv_cuda(&mut z.slice_mut(200..300), peer, &stream).unwrap();
            }
            let got = stream.clone_dtoh(&z).unwrap();
            let mine = r as f32 + 1.0;
            let tail = if r == 0 { mine } else { 1.0 };
            let want = [vec![mine; 100], vec![3.0; 100], vec![tail; 100]].concat();
            assert_eq!(got, want, "rank {r}");
        })
    }
}
