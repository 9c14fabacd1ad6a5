//! Cast-kernel throughput, single thread, in GB/s of *input*.
//!
//! Run with `cargo bench -p fastcast-core --bench kernels` (or `make bench`).
//! The buffer (8 MiB of input) fits in L3, so this measures the kernels,
//! not DRAM; the end-to-end benchmarks in benches/ measure the disk path.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastcast_core::cast::{cast, CastOptions, Fp8Overflow, Kernel};
use fastcast_core::rules::loss::LossRule;
use fastcast_core::values::dequant::{Dequant, Dequantizer, NestedAbsmax, Operand};
use fastcast_core::DType;

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
        let rule = LossRule::new(from, to);
        group.throughput(Throughput::BytesDecimal(src.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("{from}->{to}")), |b| {
            b.iter(|| rule.scan(&src))
        });
    }
    group.finish();
}

/// A dequantization to bench: name, plan, source dtype, source, operands by name.
type Case = (
    &'static str,
    Dequant,
    DType,
    Vec<u8>,
    Vec<(&'static str, Vec<u8>)>,
);

/// Dequantization into f32 values (before the cast), single thread, in
/// output elements per second: a 4096 x 1024 weight in each format.
fn dequantizers(c: &mut Criterion) {
    let (rows, cols) = (4096u64, 1024u64);
    let n = rows * cols;
    let word = |k: u64| (k as u32).wrapping_mul(0x9E37_79B9);
    let words =
        |count: u64| -> Vec<u8> { (0..count).flat_map(|k| word(k).to_le_bytes()).collect() };
    let floats = |count: u64| -> Vec<u8> {
        (0..count)
            .flat_map(|k| (0.5 + (k % 97) as f32 / 97.0).to_le_bytes())
            .collect()
    };
    let halves = |count: u64| -> Vec<u8> {
        (0..count)
            .flat_map(|k| (0x2000u16 + (k % 1000) as u16).to_le_bytes())
            .collect()
    };
    let op = |name: &str, dtype: DType, shape: &[u64]| Operand {
        name: name.into(),
        source: 0,
        dtype: dtype.safetensors_name().into(),
        shape: shape.to_vec(),
        offsets: (0, 0),
    };
    let g_idx: Vec<u8> = (0..cols)
        .flat_map(|i| (((i * 389) % cols) / 128).to_le_bytes()[..4].to_vec())
        .collect();
    let cases: Vec<Case> = vec![
        (
            "gptq-4bit-g128-desc_act",
            Dequant::Gptq {
                qzeros: op("z", DType::I32, &[8, rows / 8]),
                scales: op("s", DType::F16, &[8, rows]),
                g_idx: Some(op("g", DType::I32, &[cols])),
                group_size: 128,
                bits: 4,
                zero_plus_one: true,
            },
            DType::I32,
            words(n / 8),
            vec![("z", words(rows)), ("s", halves(8 * rows)), ("g", g_idx)],
        ),
        (
            "awq-4bit-g128",
            Dequant::Awq {
                qzeros: op("z", DType::I32, &[8, rows / 8]),
                scales: op("s", DType::F16, &[8, rows]),
                group_size: 128,
                bits: 4,
            },
            DType::I32,
            words(n / 8),
            vec![("z", words(rows)), ("s", halves(8 * rows))],
        ),
        (
            "bnb-nf4-double-quant",
            Dequant::Bnb4 {
                absmax: op("a", DType::U8, &[n / 64]),
                quant_map: op("m", DType::F32, &[16]),
                blocksize: 64,
                nested: Some(NestedAbsmax {
                    absmax: op("na", DType::F32, &[n / 64 / 256]),
                    quant_map: op("nm", DType::F32, &[256]),
                    blocksize: 256,
                    offset: 0.03,
                }),
            },
            DType::U8,
            words(n / 8),
            vec![
                ("a", words(n / 256)),
                ("m", floats(16)),
                ("na", floats(n / 64 / 256)),
                ("nm", floats(256)),
            ],
        ),
        (
            "bnb-int8",
            Dequant::Int8Rows {
                scb: op("scb", DType::F32, &[rows]),
            },
            DType::I8,
            words(n / 4),
            vec![("scb", floats(rows))],
        ),
    ];
    let mut group = c.benchmark_group("dequantize");
    group.throughput(Throughput::Elements(n));
    for (name, plan, from, src, operands) in &cases {
        let find = |o: &Operand| -> Result<&[u8], String> {
            Ok(operands
                .iter()
                .find(|(k, _)| *k == o.name)
                .map(|(_, v)| v.as_slice())
                .unwrap())
        };
        let d = Dequantizer::new(plan, *from, &[rows, cols], src.len(), &find).unwrap();
        let mut out = vec![0u8; 4 * n as usize];
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| d.dequantize(src, 0, &mut out))
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
    targets = kernels, loss_scan, dequantizers
}
criterion_main!(benches);
