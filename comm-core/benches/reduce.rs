//! Host reduction kernels, 64 MiB in place (`dst = dst op src`), one core, next to a plain
//! 64 MiB memcpy in the same group so their ratio can be read off one run:
//! `cargo bench -p oxccl-core --bench reduce`.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use oxccl_core::reduce::reduce_raw;
use oxccl_core::{DataType, ReduceOp};

const BYTES: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("host_reduce_64MiB");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(BYTES as u64));
    let src = vec![1u64; BYTES / 8];
    let mut dst = vec![1u64; BYTES / 8];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            // SAFETY: two distinct buffers of BYTES.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
            black_box(&dst);
        })
    });
    let mut cases: Vec<(DataType, ReduceOp)> = DataType::ALL.iter().map(|d| (*d, ReduceOp::Sum)).collect();
    cases.extend([ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max].map(|o| (DataType::F32, o)));
    for (d, op) in cases {
        g.bench_function(format!("{d}_{op}"), |b| {
            b.iter(|| {
                let p = dst.as_mut_ptr() as *mut u8;
                // SAFETY: dst and src hold BYTES each, 8-aligned; in place (a == dst).
                unsafe { reduce_raw(d, op, p, p, src.as_ptr() as *const u8, BYTES / d.size()) };
                black_box(&dst);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
