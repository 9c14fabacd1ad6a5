//! x86-64 SIMD kernels, chosen at run time when the CPU has the features.
//!
//! Two tiers: AVX2 (+F16C, FMA) and AVX-512 (F, BW, VL). In each tier the
//! hot pairs have hand-written kernels (the f16 ones need F16C/AVX-512's
//! conversion instructions, which no compiler derives from the scalar
//! code; AVX2's f32 → e4m3, `--quantize`'s last step, because the compiler
//! vectorised the reference's branches at half this speed); every other
//! pair runs the generic loops compiled again for that tier's registers. AVX512_BF16's `vcvtneps2bf16` is deliberately not used:
//! it flushes subnormal inputs to zero, which torch does not do, so it would
//! not be bit-exact; the integer rounding below is as fast in practice.
//!
//! Every kernel handles whole vectors and leaves the tail to the scalar
//! reference, so lengths that are not a multiple of the width are fine.

use std::arch::x86_64::*;

use super::generic;
use super::scalar::Fp8Overflow;
use crate::dtype::DType;

/// AVX2 tier: 8 f32 lanes, F16C for the f16 conversions.
pub mod avx2 {
    use super::*;

    /// True when this CPU can run [`run`].
    pub fn is_available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    /// Cast with AVX2 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX2, F16C and FMA ([`is_available`]).
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn run(from: DType, to: DType, overflow: Fp8Overflow, src: &[u8], dst: &mut [u8]) {
        // SAFETY: the kernels need no more CPU features than this function,
        // whose caller guarantees them.
        unsafe {
            match (from, to) {
                (DType::F32, DType::F16) => f32_to_f16(src, dst),
                (DType::F16, DType::F32) => f16_to_f32(src, dst),
                (DType::F32, DType::BF16) => f32_to_bf16(src, dst),
                (DType::BF16, DType::F16) => bf16_to_f16(src, dst),
                (DType::F16, DType::BF16) => f16_to_bf16(src, dst),
                (DType::F32, DType::F8E4M3) => f32_to_e4m3(src, dst, overflow),
                _ => generic::run(from, to, overflow, src, dst),
            }
        }
    }

    /// f32 bits → e4m3fn code in the low byte of each lane: the scalar
    /// reference's four cases (`scalar::f32_to_e4m3`) computed in every lane
    /// and blended, lowest precedence first.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn round_e4m3(b: __m256i, overflow: Fp8Overflow) -> __m256i {
        const DENORM: i32 = 141 << 23;
        let set = _mm256_set1_epi32;
        let abs = _mm256_and_si256(b, set(0x7FFF_FFFF));
        let sign = _mm256_and_si256(_mm256_srli_epi32::<24>(b), set(0x80));
        // Normal: round to 3 mantissa bits at bit 20, nearest even, rebiased.
        let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(abs), set(1));
        let bias = (7u32.wrapping_sub(127) << 23).wrapping_add(0x7FFFF) as i32;
        let normal =
            _mm256_srli_epi32::<20>(_mm256_add_epi32(_mm256_add_epi32(abs, set(bias)), odd));
        let saturated = match overflow {
            Fp8Overflow::Saturate => 0x7E,
            Fp8Overflow::Nan => 0x7F,
        };
        let normal = match overflow {
            // (464, 480) rounds onto the NaN code: saturated instead.
            Fp8Overflow::Saturate => {
                let onto_nan = _mm256_cmpeq_epi32(normal, set(0x7F));
                _mm256_blendv_epi8(normal, set(0x7E), onto_nan)
            }
            Fp8Overflow::Nan => normal,
        };
        // Below 2^-6: the FPU rounds to 2^-9 steps (the same RNE add).
        let sum = _mm256_add_ps(_mm256_castsi256_ps(abs), _mm256_castsi256_ps(set(DENORM)));
        let small = _mm256_sub_epi32(_mm256_castps_si256(sum), set(DENORM));
        let is_small = _mm256_cmpgt_epi32(set(121 << 23), abs);
        let is_big = _mm256_cmpgt_epi32(abs, set((1087 << 20) - 1));
        let is_nan = _mm256_cmpgt_epi32(abs, set(0x7F80_0000));
        let r = _mm256_blendv_epi8(normal, small, is_small);
        let r = _mm256_blendv_epi8(r, set(saturated), is_big);
        let r = _mm256_blendv_epi8(r, set(0x7F), is_nan);
        _mm256_or_si256(r, sign)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn f32_to_e4m3(src: &[u8], dst: &mut [u8], overflow: Fp8Overflow) {
        let n = src.len() / 4;
        let whole = n / 32 * 32;
        // packus works per 128-bit lane: bytes come out as 4-byte groups
        // [v0 v1 v2 v3 | v0 v1 v2 v3] (low, then high halves); this restores order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in (0..whole).step_by(32) {
            // SAFETY: i + 32 <= n: 128 bytes at 4i of src, 32 at i of dst.
            unsafe {
                let p = src.as_ptr().add(4 * i);
                let v = |k: usize| round_e4m3(_mm256_loadu_si256(p.add(32 * k).cast()), overflow);
                let (a, b) = (
                    _mm256_packus_epi32(v(0), v(1)),
                    _mm256_packus_epi32(v(2), v(3)),
                );
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), order);
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), bytes);
            }
        }
        generic::run(
            DType::F32,
            DType::F8E4M3,
            overflow,
            &src[4 * whole..],
            &mut dst[whole..],
        );
    }

    /// f32 bits → bf16 in the low half of each lane (RNE, NaN quieted).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn round_bf16(b: __m256i) -> __m256i {
        let abs = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFF_FFFF));
        let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
        _mm256_blendv_epi8(rounded, nan, is_nan)
    }

    /// Two vectors of bf16-in-u32 lanes → 16 packed u16 in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn pack_u16(lo: __m256i, hi: __m256i) -> __m256i {
        // packus works per 128-bit lane; the permute restores element order.
        _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(lo, hi))
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f32_to_f16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 4;
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= n, so 32 bytes at 4i of src and 16 bytes at
            // 2i of dst are in bounds; loadu/storeu take any alignment.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(4 * i).cast());
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        tail(DType::F32, DType::F16, whole, src, dst);
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_to_f32(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= n: 16 bytes at 2i of src, 32 at 4i of dst.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(4 * i).cast(), _mm256_cvtph_ps(h));
            }
        }
        tail(DType::F16, DType::F32, whole, src, dst);
    }

    #[target_feature(enable = "avx2")]
    unsafe fn f32_to_bf16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 4;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 64 bytes at 4i of src, 32 at 2i of dst.
            unsafe {
                let p = src.as_ptr().add(4 * i);
                let lo = round_bf16(_mm256_loadu_si256(p.cast()));
                let hi = round_bf16(_mm256_loadu_si256(p.add(32).cast()));
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), pack_u16(lo, hi));
            }
        }
        tail(DType::F32, DType::BF16, whole, src, dst);
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn bf16_to_f16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= n: 16 bytes at 2i of src and of dst.
            unsafe {
                let b = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
                let f = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_castsi256_ps(f));
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        tail(DType::BF16, DType::F16, whole, src, dst);
    }

    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_to_bf16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 32 bytes at 2i of src and of dst.
            unsafe {
                let p = src.as_ptr().add(2 * i);
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                let lo = round_bf16(_mm256_castps_si256(lo));
                let hi = round_bf16(_mm256_castps_si256(hi));
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), pack_u16(lo, hi));
            }
        }
        tail(DType::F16, DType::BF16, whole, src, dst);
    }
}

/// AVX-512 tier: 16 f32 lanes, mask registers, down-converting stores.
pub mod avx512 {
    use super::*;

    /// True when this CPU can run [`run`].
    pub fn is_available() -> bool {
        super::avx2::is_available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    /// Cast with AVX-512 kernels.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL plus the AVX2 tier ([`is_available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub unsafe fn run(from: DType, to: DType, overflow: Fp8Overflow, src: &[u8], dst: &mut [u8]) {
        // SAFETY: the kernels need no more CPU features than this function,
        // whose caller guarantees them.
        unsafe {
            match (from, to) {
                (DType::F32, DType::F16) => f32_to_f16(src, dst),
                (DType::F16, DType::F32) => f16_to_f32(src, dst),
                (DType::F32, DType::BF16) => f32_to_bf16(src, dst),
                (DType::BF16, DType::F16) => bf16_to_f16(src, dst),
                (DType::F16, DType::BF16) => f16_to_bf16(src, dst),
                _ => generic::run(from, to, overflow, src, dst),
            }
        }
    }

    /// f32 bits → bf16 in 16 u16 lanes (RNE, NaN quieted).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn round_bf16(b: __m512i) -> __m256i {
        let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
        let is_nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let nan = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, nan))
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_to_f16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 4;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 64 bytes at 4i of src, 32 at 2i of dst.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(4 * i).cast());
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        tail(DType::F32, DType::F16, whole, src, dst);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f16_to_f32(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 32 bytes at 2i of src, 64 at 4i of dst.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(2 * i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(4 * i).cast(), _mm512_cvtph_ps(h));
            }
        }
        tail(DType::F16, DType::F32, whole, src, dst);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn f32_to_bf16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 4;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 64 bytes at 4i of src, 32 at 2i of dst.
            unsafe {
                let b = _mm512_loadu_si512(src.as_ptr().add(4 * i).cast());
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), round_bf16(b));
            }
        }
        tail(DType::F32, DType::BF16, whole, src, dst);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn bf16_to_f16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 32 bytes at 2i of src and of dst.
            unsafe {
                let b = _mm256_loadu_si256(src.as_ptr().add(2 * i).cast());
                let f = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b));
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_castsi512_ps(f),
                );
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        tail(DType::BF16, DType::F16, whole, src, dst);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn f16_to_bf16(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n: 32 bytes at 2i of src and of dst.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(2 * i).cast());
                let f = _mm512_castps_si512(_mm512_cvtph_ps(h));
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), round_bf16(f));
            }
        }
        tail(DType::F16, DType::BF16, whole, src, dst);
    }
}

/// Convert the elements from index `done` on with the scalar reference.
#[inline]
fn tail(from: DType, to: DType, done: usize, src: &[u8], dst: &mut [u8]) {
    let (s, d) = (from.size(), to.size());
    generic::run(
        from,
        to,
        Fp8Overflow::Saturate,
        &src[done * s..],
        &mut dst[done * d..],
    );
}
