//! Diagnosis, with ranks as threads of one process: bad settings and arguments are clear
//! errors that change nothing.

mod common;
use common::run_ranks;

use std::time::Duration;

use oxccl::{Config, Error, ReduceOp};

/// A zero timeout would fail every call at once: refused where it is set, and the
/// communicator keeps its deadline and stays usable.
#[test]
fn a_zero_timeout_is_refused() {
    let mut cfg = Config::defaults();
    let e = cfg.set("OXCCL_TIMEOUT", "0").unwrap_err().to_string();
    assert!(e.contains("OXCCL_TIMEOUT") && e.contains("above zero"), "{e}");
    run_ranks(2, |c| {
        let e = c.set_timeout(Duration::ZERO).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_eq!(c.timeout(), Duration::from_secs(20), "a refused timeout changes nothing");
        let mut v = vec![1.0f32; 4];
        let e = c.with_timeout(Duration::ZERO, |c| c.all_reduce_in_place(&mut v, ReduceOp::Sum)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("timeout is zero"), "{e:?}");
        let e = c.with_timeout(Duration::ZERO, |c| c.all_reduce_async(vec![1.0f32; 4], ReduceOp::Sum)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        c.all_reduce_in_place(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, vec![2.0f32; 4], "still usable");
        c.set_timeout(Duration::MAX).unwrap();
        c.barrier().unwrap();
    });
}

/// A send/recv that times out says what it moves ("recv of 16 bytes from rank 1"), where
/// it used to print "(pairwise, 0 x uint32)"; blocking and non-blocking alike.
#[test]
fn a_send_recv_timeout_says_what_it_moves() {
    for non_blocking in [false, true] {
        run_ranks(2, move |c| {
            if c.rank() == 1 {
                // Never sends; stays until rank 0 has given up.
                std::thread::sleep(Duration::from_millis(1500));
                return;
            }
            let e = c
                .with_timeout(Duration::from_millis(300), |c| {
                    if non_blocking {
                        c.recv_async(vec![0u32; 4], 1).and_then(|w| w.wait()).map(|_| ())
                    } else {
                        c.recv(&mut [0u32; 4], 1)
                    }
                })
                .unwrap_err();
            let Error::Timeout { what, .. } = &e else { panic!("{e:?}") };
            assert!(what.contains("recv of 16 bytes from rank 1") && what.contains("on rank 0"), "{what}");
            assert!(!what.contains("0 x"), "{what}");
        });
    }
}
