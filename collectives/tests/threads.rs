//! Ranks as threads of one process, over host-staging (real shared-memory segments).

mod common;
use common::run_ranks;

use oxccl::ReduceOp;

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
