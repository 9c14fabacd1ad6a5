//! Whole-buffer loops built from the scalar reference conversions.
//!
//! Every function here is `#[inline(always)]` on purpose: the x86 module
//! calls [`run`] from inside `#[target_feature]` functions, so the same
//! loops are compiled again for AVX2 and AVX-512 and the compiler vectorises
//! them for the wider registers (function multiversioning by inlining).

use super::scalar::{self, Fp8Overflow};
use crate::dtype::DType;

/// Apply `f` to each `S`-byte element of `src`, writing `D`-byte elements to
/// `dst`. The callers guarantee both hold the same number of elements.
#[inline(always)]
fn map<const S: usize, const D: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; S]) -> [u8; D]) {
    debug_assert_eq!(src.len() / S, dst.len() / D);
    for (s, d) in src.chunks_exact(S).zip(dst.chunks_exact_mut(D)) {
        // The unwrap cannot fail: chunks_exact yields exactly S bytes, and
        // the compiler removes the check.
        d.copy_from_slice(&f(s.try_into().unwrap()));
    }
}

/// Encode f32 values (produced by `decode` from `S`-byte source elements)
/// into the target dtype `to`.
#[inline(always)]
fn encode<const S: usize>(
    src: &[u8],
    dst: &mut [u8],
    to: DType,
    overflow: Fp8Overflow,
    decode: impl Fn([u8; S]) -> f32,
) {
    match to {
        DType::F32 => map::<S, 4>(src, dst, |b| decode(b).to_le_bytes()),
        DType::F64 => map::<S, 8>(src, dst, |b| (decode(b) as f64).to_le_bytes()),
        DType::BF16 => map::<S, 2>(src, dst, |b| scalar::f32_to_bf16(decode(b)).to_le_bytes()),
        DType::F16 => map::<S, 2>(src, dst, |b| scalar::f32_to_f16(decode(b)).to_le_bytes()),
        DType::F8E4M3 => match overflow {
            Fp8Overflow::Saturate => map::<S, 1>(src, dst, |b| {
                [scalar::f32_to_e4m3(decode(b), Fp8Overflow::Saturate)]
            }),
            Fp8Overflow::Nan => map::<S, 1>(src, dst, |b| {
                [scalar::f32_to_e4m3(decode(b), Fp8Overflow::Nan)]
            }),
        },
        DType::F8E5M2 => map::<S, 1>(src, dst, |b| [scalar::f32_to_e5m2(decode(b))]),
        _ => unreachable!("encode: {to} is not castable; checked by the caller"),
    }
}

/// Cast `src` (elements of `from`) into `dst` (elements of `to`).
///
/// `from != to`, both castable, and the lengths agree: the caller checks.
/// Every narrowing goes through f32, as torch's does (so f64 → bf16 rounds
/// twice, exactly like `torch.Tensor.to`).
#[inline(always)]
pub fn run(from: DType, to: DType, overflow: Fp8Overflow, src: &[u8], dst: &mut [u8]) {
    match from {
        DType::F32 => encode::<4>(src, dst, to, overflow, f32::from_le_bytes),
        DType::F64 => encode::<8>(src, dst, to, overflow, |b| f64::from_le_bytes(b) as f32),
        DType::BF16 => encode::<2>(src, dst, to, overflow, |b| {
            scalar::bf16_to_f32(u16::from_le_bytes(b))
        }),
        DType::F16 => encode::<2>(src, dst, to, overflow, |b| {
            scalar::f16_to_f32(u16::from_le_bytes(b))
        }),
        DType::F8E4M3 => encode::<1>(src, dst, to, overflow, |b| scalar::e4m3_to_f32(b[0])),
        DType::F8E5M2 => encode::<1>(src, dst, to, overflow, |b| scalar::e5m2_to_f32(b[0])),
        _ => unreachable!("run: {from} is not castable; checked by the caller"),
    }
}
