//! Scenarios of faults: a rank lost or stopped, abort, idle waits, held links, the store
//! outliving the rank that hosts it.

use std::time::Duration;

use oxccl::{Communicator, Error, ReduceOp};
use oxccl_tests::report;

pub(crate) fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A rank waiting for a late peer spins briefly, yields, then sleeps: over a 1.5 s wait it
/// uses a small fraction of a core (the bound leaves room for the spin and yield phases and
/// for a noisy machine: under a quarter of the wall time).
pub(crate) fn idle(c: &Communicator) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    assert!(w >= 2, "idle needs two ranks");
    c.barrier().unwrap();
    if r == 1 {
        std::thread::sleep(Duration::from_millis(1500));
        c.send(&[42u64], 0).unwrap();
    } else if r == 0 {
        let mut v = [0u64];
        let (t0, c0) = (std::time::Instant::now(), thread_cpu());
        c.recv(&mut v, 1).unwrap();
        let (wall, cpu) = (t0.elapsed(), thread_cpu() - c0);
        assert_eq!(v[0], 42);
        assert!(wall >= Duration::from_millis(1400), "the wait was only {wall:?}");
        assert!(cpu * 4 < wall, "waiting {wall:?} used {cpu:?} of CPU: an idle rank must sleep");
        println!("rank 0 waited {wall:?} using {cpu:?} of CPU");
    }
    c.barrier().unwrap();
    1
}

/// Connects every link an all_reduce, a barrier and an all_to_all need, says "ready", then
/// waits to be killed.
pub(crate) fn hold(c: &Communicator) -> usize {
    let w = c.world_size();
    let mut v = vec![1u32; 1 << 16];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    let mut a = vec![0u8; w * 100];
    c.all_to_all(&vec![1u8; w * 100], &mut a).unwrap();
    c.barrier().unwrap();
    report::emit(serde_json::json!({ "event": "ready" }));
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
    1
}

/// Rank 0 hosts the store, splits the world in two and closes everything at once; the other
/// half connects its child communicator only afterwards, through the store rank 0 hosts.
pub(crate) fn store_outlives(c: &Communicator) -> usize {
    let r = c.rank();
    let child = c.split(Some((r / 2) as u32), 0).unwrap().expect("member");
    // Everybody closes the parent at once (a common pattern): only the children remain.
    c.close().unwrap();
    if r < 2 {
        child.close().unwrap();
        return 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut v = [1u32];
    child.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[0], 2);
    child.close().unwrap();
    1
}

pub(crate) fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A rank is lost mid-collective: `OXCCL_TEST_VICTIM` (default the last rank) stops or kills
/// itself (`OXCCL_TEST_SIGNAL=KILL` or `STOP`) from a second thread a few milliseconds into
/// its 20th all_reduce, and prints when. The survivors must fail with an error naming it
/// (`Remote`) for KILL, a `Timeout` for STOP; later calls return `Aborted`. They print when
/// they noticed. With `OXCCL_TEST_SHRINK=1` they then shrink the communicator without it and
/// pass the conformance suite on the new one.
pub(crate) fn loss(c: &Communicator, seed: u64) -> usize {
    let (r, w) = (c.rank(), c.world_size());
    let victim: usize = std::env::var("OXCCL_TEST_VICTIM").ok().and_then(|v| v.parse().ok()).unwrap_or(w - 1);
    let signal = std::env::var("OXCCL_TEST_SIGNAL").unwrap_or_else(|_| "KILL".into());
    let count = 1 << 16;
    let mut v = vec![0f32; count];
    let mut checks = 0;
    for it in 0..1000u32 {
        if r == victim && it == 20 {
            let sig = if signal == "STOP" { libc::SIGSTOP } else { libc::SIGKILL };
            let delay = Duration::from_micros(200 + seed % 3000);
            let signal = signal.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                use std::io::Write;
                report::emit(serde_json::json!({ "signal": signal, "at_ns": unix_ns() as u64 }));
                std::io::stdout().flush().unwrap();
                // SAFETY: kill on our own pid.
                unsafe { libc::kill(libc::getpid(), sig) };
            });
        }
        v.iter_mut().enumerate().for_each(|(i, x)| *x = (r + i % 7) as f32);
        let t0 = std::time::Instant::now();
        // With STOP, a per-call deadline (3 s) below the communicator's (OXCCL_TIMEOUT).
        let res = if signal == "STOP" {
            c.with_timeout(Duration::from_secs(3), |c| c.all_reduce_in_place(&mut v, ReduceOp::Sum))
        } else {
            c.all_reduce_in_place(&mut v, ReduceOp::Sum)
        };
        match res {
            Ok(()) => {
                let want = |i: usize| (0..w).map(|k| (k + i % 7) as f32).sum::<f32>();
                assert!(v.iter().enumerate().all(|(i, x)| *x == want(i)), "iteration {it}: wrong sum");
                checks += 1;
            }
            Err(e) => {
                let at = unix_ns();
                assert_ne!(r, victim, "the victim itself failed: {e}");
                let after = t0.elapsed();
                report::emit(
                    serde_json::json!({ "noticed_ns": at as u64, "after_us": after.as_micros() as u64, "error": e.to_string() }),
                );
                match (&*signal, &e) {
                    ("KILL", Error::Remote { rank, .. }) => assert_eq!(*rank, victim, "{e}"),
                    // The timeout names the operation, its sequence number, the step and
                    // the ranks waited on (here, or on the rank that timed out first).
                    ("STOP", Error::Timeout { what, .. }) => assert!(
                        what.contains("all_reduce #") && what.contains("step") && what.contains("waiting on ranks"),
                        "{what}"
                    ),
                    _ => panic!("rank {r}: unexpected error for {signal} of rank {victim}: {e:?}"),
                }
                assert!(it >= 20, "failed before the victim did anything: {e}");
                // Sticky: the communicator is unusable now.
                assert!(matches!(c.all_reduce_in_place(&mut v, ReduceOp::Sum), Err(Error::Aborted(_))));
                checks += 2;
                break;
            }
        }
    }
    assert!(checks > 20, "the victim was never lost");
    // Stay while the flight records are logged (a thread does it within about a second).
    if let Some(ms) = std::env::var("OXCCL_TEST_STAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if signal == "STOP" {
        // A stopped rank never ends by itself: the lowest survivor ends it.
        if r == (0..w).find(|&k| k != victim).unwrap_or(0) {
            // SAFETY: kill on the victim's pid, published at creation.
            unsafe { libc::kill(c.peers()[victim].pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    if std::env::var("OXCCL_TEST_SHRINK").as_deref() == Ok("1") {
        let c2 = c.shrink(&[victim]).expect("shrink");
        assert_eq!(c2.world_size(), w - 1);
        assert_eq!(c2.rank(), if r > victim { r - 1 } else { r });
        checks += crate::collectives::conformance(&c2, seed);
        c2.close().unwrap();
    }
    checks
}

/// `abort()` from another thread ends an operation in flight with `Aborted` (rank 0 aborts
/// a receive from rank 1, which never sends), and every later call returns it too; rank 1,
/// waiting for rank 0 in the same way, learns of the abort and fails naming rank 0.
pub(crate) fn abort(c: &Communicator) -> usize {
    assert_eq!(c.world_size(), 2);
    let mut v = vec![1u32; 1 << 10];
    c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
    c.set_timeout(Duration::from_secs(60)).expect("a positive timeout");
    let t0 = std::time::Instant::now();
    if c.rank() == 1 {
        let e = c.recv(&mut v, 0).unwrap_err();
        assert!(matches!(&e, Error::Remote { rank: 0, what } if what.contains("aborted")), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(30), "noticed only after {:?}", t0.elapsed());
        return 2;
    }
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            c.abort();
        });
        c.recv(&mut v, 1).unwrap_err()
    });
    assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(30), "abort took {:?}", t0.elapsed());
    assert!(matches!(c.barrier(), Err(Error::Aborted(_))));
    3
}
