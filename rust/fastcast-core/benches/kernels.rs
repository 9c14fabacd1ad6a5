//! Cast-kernel throughput, single thread, in GB/s of *input*.
//!
//! Run with `cargo bench -p fastcast-core --bench kernels` (or `make bench`).
//! The buffer (8 MiB of input) fits in L3, so this measures the kernels,
//! not DRAM; the end-to-end benchmarks in benches/ measure the disk path.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastcast_core::{cast, CastOptions, DType, Fp8Overflow, Kernel};

const INPUT_BYTES: usize = 8 << 20;

fn input(dtype: DType) -> Vec<u8> {
    let n = INPUT_BYTES / dtype.size();
    let values: Vec<u8> = (0..n)
        .map(|i| ((i as f32) * 0.618).sin() * 3.0)
        .flat_map(|x| x.to_le_bytes())
        .collect();
    if dtype == DType::F32 {
        return values;
    }
    let mut out = vec![0u8; n * dtype.size()];
    cast(
        &values,
        DType::F32,
        &mut out,
        dtype,
        &CastOptions::default(),
    )
    .unwrap();
    out
}

fn kernels(c: &mut Criterion) {
    let pairs = [
        (DType::F32, DType::BF16),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F32),
        (DType::F32, DType::F8E4M3),
        (DType::BF16, DType::F8E4M3),
        (DType::F64, DType::BF16),
    ];
    for (from, to) in pairs {
        let src = input(from);
        let mut dst = vec![0u8; src.len() / from.size() * to.size()];
        let mut group = c.benchmark_group(format!("{from}->{to}"));
        group.throughput(Throughput::BytesDecimal(src.len() as u64));
        for kernel in Kernel::available() {
            let opts = CastOptions {
                fp8_overflow: Fp8Overflow::Saturate,
                kernel,
            };
            group.bench_function(BenchmarkId::from_parameter(kernel.name()), |b| {
                b.iter(|| cast(&src, from, &mut dst, to, &opts).unwrap())
            });
        }
        group.finish();
    }
}

/// The loss-count pass that follows each cast: it must stay far cheaper than the cast.
fn loss_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("loss-scan");
    for (from, to) in [
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F16),
        (DType::F32, DType::F8E4M3),
    ] {
        let src = input(from);
        let rule = fastcast_core::LossRule::new(from, to);
        group.throughput(Throughput::BytesDecimal(src.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("{from}->{to}")), |b| {
            b.iter(|| rule.scan(&src))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = kernels, loss_scan
}
criterion_main!(benches);
