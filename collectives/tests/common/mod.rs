//! What the in-process test files share: ranks as threads over one `MemStore`.

use std::sync::Arc;

use oxccl::{Communicator, Config, MemStore, Store};

/// Runs `f` on `n` ranks, each a thread with its own communicator (deadline 20 s); panics
/// when any rank's `f` panics.
pub fn run_ranks<F>(n: usize, f: F)
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
                f(Communicator::init(s, r, n, cfg).unwrap())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
