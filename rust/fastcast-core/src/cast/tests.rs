//! Every SIMD path against the scalar reference, on every 16- and 8-bit
//! input, on f32/f64 edge classes and on random bits, at awkward lengths and
//! unaligned addresses.

use proptest::prelude::*;

use super::*;
use crate::dtype::CASTABLE;

fn bytes_of<const N: usize>(items: impl IntoIterator<Item = [u8; N]>) -> Vec<u8> {
    items.into_iter().flatten().collect()
}

/// f32 values on every edge a cast cares about, for every target.
fn f32_edges() -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0x0000_0000,
        0x0000_0001,
        0x007F_FFFF,
        0x0080_0000,
        0x0080_0001, // zero, subnormals, min normal
        0x7F7F_FFFF,
        0x7F80_0000,
        0x7F80_0001,
        0x7FBF_FFFF,
        0x7FC0_0000,
        0x7FFF_FFFF, // max, inf, NaNs
        0x3F80_0000,
        0x3F80_8000,
        0x3F81_8000,
        0x3F80_7FFF,
        0x3F80_8001, // bf16 ties around 1.0
        0x477F_EFFF,
        0x477F_F000,
        0x477F_E000, // f16 overflow threshold (65520)
        0x33000000,
        0x33000001,
        0x33400000,
        0x387FC000,
        0x38800000, // f16 subnormal ties
        0x43E0_0000,
        0x43E8_0000,
        0x43EF_FFFF,
        0x43F0_0000,
        0x43F0_0001, // e4m3 448..480
        0x3B00_0000,
        0x3A80_0000,
        0x3AC0_0000,
        0x3C80_0000, // e4m3 subnormals
        0x476F_FFFF,
        0x4770_0000,
        0x4780_0000,
        0x3780_0000,
        0x3700_0000,
        0x3740_0000, // e5m2
    ];
    let base = bits.clone();
    for b in base {
        for delta in [1u32, 2, 0x1000, 0x8000] {
            bits.push(b.wrapping_add(delta));
            bits.push(b.wrapping_sub(delta));
        }
    }
    let with_sign: Vec<u32> = bits.iter().map(|b| b | 0x8000_0000).collect();
    bits.extend(with_sign);
    bits.into_iter().map(f32::from_bits).collect()
}

fn inputs_for(from: DType) -> Vec<u8> {
    match from {
        DType::F16 | DType::BF16 => bytes_of((0..=u16::MAX).map(u16::to_le_bytes)),
        DType::F8E4M3 | DType::F8E5M2 => (0..=u8::MAX).collect(),
        DType::F32 => {
            let mut v: Vec<f32> = f32_edges();
            // A coarse sweep of the whole bit space, offset so it hits
            // mantissa patterns that are not round.
            v.extend(
                (0..=u32::MAX)
                    .step_by(65_521)
                    .map(|b| f32::from_bits(b ^ 0x5A5A)),
            );
            bytes_of(v.into_iter().map(f32::to_le_bytes))
        }
        DType::F64 => {
            let mut v: Vec<f64> = f32_edges().into_iter().map(f64::from).collect();
            v.extend([
                1.0 + 2f64.powi(-8) + 2f64.powi(-40),
                f64::MAX,
                f64::MIN_POSITIVE,
                1e-320,
            ]);
            v.extend(
                (0..=u64::MAX)
                    .step_by(1 << 44)
                    .map(|b| f64::from_bits(b ^ 0x5A5A_5A5A)),
            );
            bytes_of(v.into_iter().map(f64::to_le_bytes))
        }
        _ => unreachable!(),
    }
}

fn cast_with(kernel: Kernel, overflow: Fp8Overflow, from: DType, to: DType, src: &[u8]) -> Vec<u8> {
    let mut dst = vec![0u8; src.len() / from.size() * to.size()];
    let opts = CastOptions {
        fp8_overflow: overflow,
        kernel,
    };
    cast(src, from, &mut dst, to, &opts).unwrap();
    dst
}

#[test]
fn simd_paths_match_scalar_on_every_pair() {
    for kernel in Kernel::available() {
        for from in CASTABLE {
            let src = inputs_for(from);
            for to in CASTABLE {
                for overflow in [Fp8Overflow::Saturate, Fp8Overflow::Nan] {
                    let want = cast_with(Kernel::Scalar, overflow, from, to, &src);
                    let got = cast_with(kernel, overflow, from, to, &src);
                    if let Some(i) = (0..want.len() / to.size()).find(|&i| {
                        let r = i * to.size()..(i + 1) * to.size();
                        want[r.clone()] != got[r]
                    }) {
                        let s = i * from.size();
                        panic!(
                            "{} {from}->{to}: element {i} (input {:02x?}) gave {:02x?}, scalar {:02x?}",
                            kernel.name(),
                            &src[s..s + from.size()],
                            &got[i * to.size()..(i + 1) * to.size()],
                            &want[i * to.size()..(i + 1) * to.size()],
                        );
                    }
                }
            }
        }
    }
}

/// Every f32 bit pattern, cast to e4m3 by each kernel in both overflow
/// modes, equals the scalar reference's code: the hand-written AVX2 kernel's
/// blends cover all 2^32 inputs, not a sweep.
#[test]
fn f32_to_e4m3_matches_scalar_on_every_bit_pattern() {
    use rayon::prelude::*;
    const CHUNK: u64 = 1 << 22;
    for kernel in Kernel::available() {
        for overflow in [Fp8Overflow::Saturate, Fp8Overflow::Nan] {
            (0..(1u64 << 32) / CHUNK).into_par_iter().for_each(|c| {
                let bits = (c * CHUNK..(c + 1) * CHUNK).map(|b| b as u32);
                let src = bytes_of(bits.map(u32::to_le_bytes));
                let got = cast_with(kernel, overflow, DType::F32, DType::F8E4M3, &src);
                for (i, code) in got.into_iter().enumerate() {
                    let x = f32::from_bits((c * CHUNK) as u32 + i as u32);
                    let want = scalar::f32_to_e4m3(x, overflow);
                    assert_eq!(
                        code,
                        want,
                        "{} {overflow:?}: {:08x}",
                        kernel.name(),
                        x.to_bits()
                    );
                }
            });
        }
    }
}

#[test]
fn awkward_lengths_and_unaligned_buffers() {
    let values: Vec<u8> = bytes_of((0..200).map(|i| (i as f32 * 1.37 - 50.0).to_le_bytes()));
    for kernel in Kernel::available() {
        for to in [DType::BF16, DType::F16, DType::F8E4M3] {
            for n in 0..70 {
                // Offset by one byte so neither buffer is element-aligned.
                let mut src_store = vec![0u8; n * 4 + 1];
                src_store[1..].copy_from_slice(&values[..n * 4]);
                let mut dst_store = vec![0u8; n * to.size() + 1];
                let opts = CastOptions {
                    kernel,
                    ..CastOptions::default()
                };
                cast(&src_store[1..], DType::F32, &mut dst_store[1..], to, &opts).unwrap();
                let want = cast_with(
                    Kernel::Scalar,
                    Fp8Overflow::Saturate,
                    DType::F32,
                    to,
                    &values[..n * 4],
                );
                assert_eq!(
                    &dst_store[1..],
                    &want[..],
                    "{} n={n} to={to}",
                    kernel.name()
                );
            }
        }
    }
}

#[test]
fn parallel_matches_sequential() {
    let n = PARALLEL_CHUNK_ELEMS * 3 + 17;
    let src: Vec<u8> = bytes_of((0..n).map(|i| ((i as f32).sin() * 1e5).to_le_bytes()));
    for to in [DType::BF16, DType::F16, DType::F64] {
        let mut a = vec![0u8; n * to.size()];
        let mut b = vec![0u8; n * to.size()];
        cast(&src, DType::F32, &mut a, to, &CastOptions::default()).unwrap();
        cast_parallel(&src, DType::F32, &mut b, to, &CastOptions::default()).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn rejects_mismatched_buffers_and_uncastable_dtypes() {
    let opts = CastOptions::default();
    let err = cast(&[0; 6], DType::F32, &mut [0; 2], DType::BF16, &opts).unwrap_err();
    assert!(
        err.to_string().contains("not a whole number of F32"),
        "{err}"
    );
    let err = cast(&[0; 8], DType::F32, &mut [0; 2], DType::BF16, &opts).unwrap_err();
    assert!(err.to_string().contains("2 BF16 elements need 4"), "{err}");
    let err = cast(&[0; 8], DType::I32, &mut [0; 4], DType::BF16, &opts).unwrap_err();
    assert!(err.to_string().contains("cannot cast I32 to BF16"), "{err}");
    // Same dtype is a copy, castable or not.
    let mut out = [0u8; 3];
    cast(&[1, 2, 3], DType::U8, &mut out, DType::U8, &opts).unwrap();
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn kernel_names() {
    assert_eq!(Kernel::from_name("auto").unwrap(), Kernel::detect());
    for k in Kernel::available() {
        assert_eq!(Kernel::from_name(k.name()).unwrap(), k);
    }
    let err = Kernel::from_name("neon").unwrap_err().to_string();
    assert!(err.contains("neon") && err.contains("scalar"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_f32_bits_agree_on_every_path(bits in prop::collection::vec(any::<u32>(), 0..300)) {
        let src = bytes_of(bits.iter().map(|b| b.to_le_bytes()));
        for to in CASTABLE {
            let want = cast_with(Kernel::Scalar, Fp8Overflow::Saturate, DType::F32, to, &src);
            for kernel in Kernel::available() {
                let got = cast_with(kernel, Fp8Overflow::Saturate, DType::F32, to, &src);
                prop_assert_eq!(&got, &want, "{} F32->{}", kernel.name(), to);
            }
        }
    }
}
