//! Ranks as threads of one process, over host-staging (real shared-memory segments).

use std::sync::Arc;

use oxccl::{Communicator, Config, MemStore, ReduceOp, Store};

fn run_ranks<F>(n: usize, f: F)
where
    F: Fn(Communicator) + Send + Sync + 'static,
{
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (s, f) = (store.clone(), f.clone());
            std::thread::spawn(move || {
                let mut cfg = Config::defaults();
                cfg.set("OXCCL_TIMEOUT", "20s").unwrap();
                let c = Communicator::init(s, r, n, cfg).unwrap();
                f(c)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn all_reduce_small_and_large() {
    for n in [1, 2, 3, 4] {
        run_ranks(n, move |c| {
            for count in [0usize, 1, 5, 1000, 300_000] {
                let send: Vec<f32> = (0..count).map(|i| (c.rank() + i % 7) as f32).collect();
                let mut recv = vec![0f32; count];
                c.all_reduce(&send, &mut recv, ReduceOp::Sum).unwrap();
                for (i, v) in recv.iter().enumerate() {
                    let want: f32 = (0..n).map(|r| (r + i % 7) as f32).sum();
                    assert_eq!(*v, want, "n={n} count={count} i={i}");
                }
            }
        });
    }
}
