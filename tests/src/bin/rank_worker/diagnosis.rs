//! Scenarios of diagnosis: every error names the real culprit (issue 17).

use std::time::{Duration, Instant};

use oxccl::{Communicator, Error, ReduceOp};
use oxccl_tests::report;

fn victim(w: usize) -> usize {
    std::env::var("OXCCL_TEST_VICTIM").ok().and_then(|v| v.parse().ok()).unwrap_or(w - 1)
}

/// A rank stopped (SIGSTOP) in the middle of a ring all_reduce for longer than the deadline
/// (`OXCCL_TIMEOUT`): every survivor's timeout must name it, by the evidence of the flight
/// records (it does not answer), not the survivor that gave up first; the timeouts say how
/// long each waited. The lowest survivor lets the victim go on (SIGCONT) after its own
/// error: the victim's error must name the rank that gave up waiting for it, and how long.
pub(crate) fn stopped(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let v = victim(w);
    let mut buf = vec![1.0f32; 1 << 16];
    for it in 0..1000u32 {
        if r == v && it == 20 {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(2));
                // SAFETY: kill on our own pid.
                unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
            });
        }
        let t0 = Instant::now();
        let Err(e) = c.all_reduce_in_place(&mut buf, ReduceOp::Sum) else { continue };
        let waited = t0.elapsed();
        println!("rank {r} after {waited:?}: {e}");
        report::emit(serde_json::json!({ "error": e.to_string(), "waited_ms": waited.as_millis() as u64 }));
        if r != v && r == (0..w).find(|&k| k != v).unwrap_or(0) {
            // Let the victim go on (and fail) a while after this rank gave up on it.
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: kill on the victim's pid, published at creation.
            unsafe { libc::kill(c.peers()[v].pid as libc::pid_t, libc::SIGCONT) };
        }
        if r == v {
            // It held the others up: the rank that gave up on it ended the operation.
            let Error::Remote { rank, what } = &e else { panic!("victim: expected Remote, got {e:?}") };
            assert_ne!(*rank, v);
            assert!(what.contains(&format!("waiting for this rank ({v}), which held up the operation")), "{what}");
            assert!(what.contains("timed out after 4.0s"), "the duration is the one who gave up: {what}");
        } else {
            let Error::Timeout { after, what } = &e else { panic!("rank {r}: expected a timeout, got {e:?}") };
            assert!(it >= 20, "failed before the victim stopped: {e}");
            assert!(what.contains(&format!("rank {v} holds it up")), "rank {r} must name rank {v}: {what}");
            assert!(what.contains("did not answer for its flight record"), "{what}");
            // The duration is this rank's own wait, a few seconds, never 0 ns.
            assert!(*after >= Duration::from_secs(2) && *after <= waited + Duration::from_millis(50), "{after:?}");
            assert!(!what.contains("after 0ns"), "{what}");
        }
        return 3;
    }
    panic!("rank {r}: the victim never stopped anything");
}

/// Ranks 1 and 2 close the communicator cleanly after a few operations (as after an error of
/// their own) and stay alive; the others go on to a grouped send/recv ring through them, then
/// a barrier. They used to wait for rank 2 until their deadline; now each fails within
/// moments, naming a rank that closed and after how many operations.
pub(crate) fn closed(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    assert!(w >= 4, "closed needs 4 ranks or more");
    let mut v = vec![1u32; 1000];
    for _ in 0..5 {
        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    }
    if r == 1 || r == 2 {
        c.close().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        return 1;
    }
    let t0 = Instant::now();
    let send = vec![r as u8; 1 << 16];
    let mut recv = vec![0u8; 1 << 16];
    let mut g = c.group();
    g.send(&send, (r + 1) % w).unwrap();
    g.recv(&mut recv, (r + w - 1) % w).unwrap();
    // A rank whose ring neighbours both still run may finish the ring (its send to a closed
    // rank is buffered, as an eager send is); the barrier after it waits on everybody.
    let e = g.run().err().or_else(|| c.barrier().err()).expect("an error naming a rank that closed");
    let took = t0.elapsed();
    println!("rank {r} after {took:?}: {e}");
    report::emit(serde_json::json!({ "error": e.to_string(), "ms": took.as_millis() as u64 }));
    let Error::Remote { rank, what } = &e else { panic!("rank {r}: expected Remote, got {e:?}") };
    assert!(*rank == 1 || *rank == 2, "rank {r} blames rank {rank}: {e}");
    assert!(what.contains("closed the communicator after 5 operations (its last collective: #5)"), "{what}");
    assert!(took < Duration::from_secs(10), "rank {r} took {took:?} to learn it (deadline 60 s)");
    // The first rank to fail logs every rank's flight record within a second, from a thread
    // of its own: stay for it (the closed ranks stay 3 s anyway).
    std::thread::sleep(Duration::from_millis(1500));
    2
}

/// Non-blocking sends and receives progress independently, as MPI's Irecv/Isend and torch's
/// irecv/isend do: each rank posts its receive first, then its send (they used to wait on
/// each other until the deadline), at sizes from empty to rendezvous-sized; then a receive
/// posted before a blocking send; then several in each direction keep their order; then a
/// collective posted behind flights still in progress.
pub(crate) fn p2p(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
    let fill =
        |from: usize, n: usize, k: usize| (0..n).map(|i| (from * 1_000_003 + i * 7 + k) as u32).collect::<Vec<_>>();
    let mut checks = 0;
    for n in [0usize, 1, 1000, 1 << 16, 3 << 20] {
        let rx = c.recv_async(vec![0u32; n], prev).unwrap();
        let tx = c.send_async(fill(r, n, 0), next).unwrap();
        assert_eq!(rx.wait().unwrap(), fill(prev, n, 0), "{n} elements from rank {prev}");
        tx.wait().unwrap();
        checks += 1;
    }
    // A receive posted, then a blocking send: the send must not wait for the receive.
    let rx = c.recv_async(vec![0u32; 5000], prev).unwrap();
    c.send(&fill(r, 5000, 1), next).unwrap();
    assert_eq!(rx.wait().unwrap(), fill(prev, 5000, 1));
    checks += 1;
    // Several each way, waited for in reverse: per peer and direction they match in order.
    let rxs: Vec<_> = (0..4).map(|k| c.recv_async(vec![0u32; 100 + k * 50_000], prev).unwrap()).collect();
    let txs: Vec<_> = (0..4).map(|k| c.send_async(fill(r, 100 + k * 50_000, k), next).unwrap()).collect();
    for (k, rx) in rxs.into_iter().enumerate().rev() {
        assert_eq!(rx.wait().unwrap(), fill(prev, 100 + k * 50_000, k), "message {k}");
    }
    txs.into_iter().for_each(|t| drop(t.wait().unwrap()));
    checks += 1;
    // A collective behind a flight in progress: it goes on the wire after the flight.
    let rx = c.recv_async(vec![0u32; 1 << 18], prev).unwrap();
    let mut v = vec![1u32; 1000];
    let tx = c.send_async(fill(r, 1 << 18, 2), next).unwrap();
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert!(v.iter().all(|&x| x as usize == w));
    assert_eq!(rx.wait().unwrap(), fill(prev, 1 << 18, 2));
    tx.wait().unwrap();
    checks += 1;
    checks
}

/// Every rank runs three all_reduces and writes `ready.<rank>` (its pid) into
/// `OXCCL_TEST_DIR`; the last rank then waits for the file `go` there (at most 60 s) before
/// the fourth, which the others are already in: a hang to be read with the flight records
/// (`oxccl trace`, the trace signal). Then every rank checks the fourth's result.
pub(crate) fn behind(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let dir = std::path::PathBuf::from(std::env::var("OXCCL_TEST_DIR").expect("OXCCL_TEST_DIR"));
    let mut v = vec![1.0f32; 1024];
    for _ in 0..3 {
        v.fill(1.0);
        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    }
    std::fs::write(dir.join(format!("ready.{r}")), std::process::id().to_string()).unwrap();
    if r == w - 1 {
        let t0 = Instant::now();
        while !dir.join("go").exists() {
            assert!(t0.elapsed() < Duration::from_secs(60), "never told to go on");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    v.fill(r as f32);
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    let want = (0..w).sum::<usize>() as f32;
    assert!(v.iter().all(|x| *x == want), "rank {r}: {} != {want}", v[0]);
    4
}

/// The last rank, alive, computes (sleeps) past the others' deadline before all_reduce #4,
/// which they are in: their timeouts must blame it by its sequence number ("has not reached
/// all_reduce #4 ... its last collective is #3") and say it is outside OxCCL; when it comes
/// it learns the others gave up on it. With `OXCCL_TRACE_BUFFER=0` the blame still holds
/// (sequence numbers are kept when recording is off).
pub(crate) fn late(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let v = w - 1;
    let mut buf = vec![1.0f32; 256];
    for _ in 0..3 {
        c.all_reduce_in_place(&mut buf, ReduceOp::Sum).unwrap();
    }
    if r == v {
        std::thread::sleep(c.timeout() + Duration::from_secs(2));
    }
    buf.fill(1.0);
    let e = match c.all_reduce_in_place(&mut buf, ReduceOp::Sum) {
        // The late rank may still finish #4 when everything it needed was sent to it before
        // the others gave up (then with the right sum); its next call learns of the failure.
        Ok(()) if r == v => {
            assert!(buf.iter().all(|x| *x == w as f32), "{:?}", &buf[..4]);
            c.all_reduce_in_place(&mut buf, ReduceOp::Sum).expect_err("the others gave up on #4")
        }
        Ok(()) => panic!("rank {r}: all_reduce #4 succeeded while rank {v} was late"),
        Err(e) => e,
    };
    println!("rank {r}: {e}");
    report::emit(serde_json::json!({ "error": e.to_string() }));
    if r == v {
        let Error::Remote { rank, what } = &e else { panic!("late rank: expected Remote, got {e:?}") };
        assert_ne!(*rank, v);
        assert!(what.contains(&format!("waiting for this rank ({v}), which held up the operation")), "{what}");
    } else {
        let Error::Timeout { what, .. } = &e else { panic!("rank {r}: expected a timeout, got {e:?}") };
        assert!(what.contains(&format!("rank {v} holds it up: it has not reached all_reduce #4")), "{what}");
        assert!(what.contains("its last collective is #3"), "{what}");
        // With records it is seen outside OxCCL; without, that much is not known.
        let off = std::env::var("OXCCL_TRACE_BUFFER").as_deref() == Ok("0");
        assert_eq!(what.contains("outside OxCCL"), !off, "{what}");
        assert_eq!(what.contains("flight recorder off (OXCCL_TRACE_BUFFER=0)"), off, "{what}");
    }
    2
}

/// A `split` whose part fails on one member fails on every member (creation succeeds on all
/// or none): rank 2's NIC has no endpoint left for a gradient communicator (set up by the
/// test: limit 1, held by the parent; no fallback), so its part fails; every other member
/// names it. The parent stays usable.
pub(crate) fn split_fails(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let e = c
        .split_with_class(Some(0), r as i64, oxccl::TrafficClass::Gradient)
        .expect_err("rank 2 has no endpoint left for the split");
    println!("rank {r}: {e}");
    report::emit(serde_json::json!({ "error": e.to_string() }));
    // Every member fails, naming rank 2 and why (found where routes are chosen, or by the
    // last "ready" round).
    let s = e.to_string();
    assert!(s.contains("rank 2") && s.contains("limit 0 (OXCCL_NIC_ENDPOINTS)"), "rank {r}: {s}");
    assert!(s.contains("gradient may not fall back to net-tcp"), "rank {r}: {s}");
    let mut v = vec![1u32; 64];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap_or_else(|e| panic!("rank {r}: the parent: {e}"));
    assert!(v.iter().all(|x| *x == w as u32));
    2
}

/// A receive posted with `recv_async` from a rank that is then killed: the wait ends with
/// the loss, named, long before the deadline (the flights' health checks come due while
/// the progress thread drives them).
pub(crate) fn p2p_lost(c: &Communicator) -> usize {
    let r = c.rank();
    c.barrier().unwrap();
    if r == 0 {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("killed");
    }
    let t0 = Instant::now();
    let e = c.recv_async(vec![0u8; 1 << 10], 0).unwrap().wait().expect_err("rank 0 was killed");
    let took = t0.elapsed();
    println!("rank {r} after {took:?}: {e}");
    report::emit(serde_json::json!({ "error": e.to_string(), "ms": took.as_millis() as u64 }));
    let Error::Remote { rank: 0, .. } = &e else { panic!("expected Remote naming rank 0, got {e:?}") };
    assert!(took < Duration::from_secs(10), "learnt it after {took:?} (deadline 60 s)");
    1
}
