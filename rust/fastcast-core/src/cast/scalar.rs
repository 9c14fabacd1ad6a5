//! Scalar reference conversions, one element at a time.
//!
//! These are ports of PyTorch's c10/util headers (BFloat16.h, Half.h,
//! Float8_e4m3fn.h, Float8_e5m2.h) and are the definition of "correct" for
//! every SIMD kernel: the SIMD paths are tested against these on every input
//! (exhaustively where the input type has at most 2^16 values).
//!
//! Every narrowing goes through `f32` exactly as torch does: a 16-bit or
//! 8-bit source widens to `f32` exactly, and an `f64` source is first rounded
//! to `f32` (torch rounds twice there, and so must we to match it).
//!
//! NaN outputs (torch is not consistent across its own code paths here; these
//! are what fastcast emits, documented in README):
//! - to bf16: sign and top payload bits kept, quiet bit set (`bits >> 16 | 0x40`);
//! - to f16: sign and top payload bits kept, quiet bit set (x86 F16C's rule);
//! - to fp8: `0x7F | sign` (torch's rule; fp8 has no room for a payload);
//! - widening (f16/fp8 to f32, f32 to f64): payload kept, quiet bit set;
//!   bf16 to f32 is a plain shift and keeps the bits as they are.

/// What an fp8 e4m3fn cast does with a finite value too large for the format
/// (and with ±inf, which e4m3fn cannot represent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Fp8Overflow {
    /// Clamp to ±448 (`0x7E | sign`), as torch >= 2.14 does.
    #[default]
    Saturate,
    /// Produce NaN (`0x7F | sign`), as torch < 2.14 and ml_dtypes do.
    Nan,
}

/// f32 → bf16, round to nearest even on the 16 dropped bits.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    let bias = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(bias) >> 16) as u16
}

/// bf16 → f32, exact.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 → f16, round to nearest even, gradual underflow, ±inf past 65504.
///
/// c10's `fp16_ieee_from_fp32_value`: the scaling by 2^112 then 2^-110
/// lets the FPU do the rounding on the 13 (or more, for subnormals) dropped
/// bits. NaN keeps its payload as x86's F16C does.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    const SCALE_TO_INF: f32 = f32::from_bits(0x7780_0000); // 2^112
    const SCALE_TO_ZERO: f32 = f32::from_bits(0x0880_0000); // 2^-110
    let w = x.to_bits();
    let sign = (w >> 16) & 0x8000;
    let shl1_w = w.wrapping_add(w);
    if shl1_w > 0xFF00_0000 {
        return (sign | 0x7E00 | ((w >> 13) & 0x03FF)) as u16;
    }
    let mut base = (x.abs() * SCALE_TO_INF) * SCALE_TO_ZERO;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x7C00;
    let mantissa_bits = bits & 0x0FFF;
    (sign | (exp_bits + mantissa_bits)) as u16
}

/// f16 → f32, exact; NaN keeps its payload and becomes quiet.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x03FF) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, exact in f32.
            let v = m as f32 * f32::from_bits(0x3380_0000); // 2^-24
            sign | v.to_bits()
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        (0x1F, m) => sign | 0x7FC0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 → fp8 e4m3fn (torch.float8_e4m3fn), round to nearest even.
///
/// c10's `fp8e4m3fn_from_fp32_value`, with the overflow rule chosen by
/// `overflow`: torch >= 2.14 saturates finite overflow and ±inf to ±448.
#[inline(always)]
pub fn f32_to_e4m3(x: f32, overflow: Fp8Overflow) -> u8 {
    const FP8_MAX: u32 = 1087 << 20; // 480.0: where rounding would reach the NaN code
    const DENORM_MASK: u32 = 141 << 23;
    let mut f_bits = x.to_bits();
    let sign = ((f_bits >> 24) & 0x80) as u8;
    f_bits &= 0x7FFF_FFFF;
    let result = if f_bits > 0x7F80_0000 {
        0x7F
    } else if f_bits >= FP8_MAX {
        match overflow {
            Fp8Overflow::Saturate => 0x7E,
            Fp8Overflow::Nan => 0x7F,
        }
    } else if f_bits < (121 << 23) {
        // Below 2^-6, the smallest normal: let the FPU round to 2^-9 steps.
        let sum = f32::from_bits(f_bits) + f32::from_bits(DENORM_MASK);
        (sum.to_bits().wrapping_sub(DENORM_MASK)) as u8
    } else {
        let mant_odd = (f_bits >> 20) & 1;
        let r = f_bits
            .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7FFFF))
            .wrapping_add(mant_odd);
        let r = (r >> 20) as u8;
        // Values in (464, 480) round up onto the NaN code.
        if r == 0x7F && overflow == Fp8Overflow::Saturate {
            0x7E
        } else {
            r
        }
    };
    result | sign
}

/// f32 → fp8 e5m2 (torch.float8_e5m2), round to nearest even; overflow
/// (>= 61440 after rounding) gives ±inf, as torch does.
#[inline(always)]
pub fn f32_to_e5m2(x: f32) -> u8 {
    const FP8_MAX: u32 = 143 << 23; // 65536.0
    const DENORM_MASK: u32 = 134 << 23;
    let mut f_bits = x.to_bits();
    let sign = ((f_bits >> 24) & 0x80) as u8;
    f_bits &= 0x7FFF_FFFF;
    let result = if f_bits >= FP8_MAX {
        if f_bits > 0x7F80_0000 {
            0x7F
        } else {
            0x7C
        }
    } else if f_bits < (113 << 23) {
        // Below 2^-14, the smallest normal: let the FPU round to 2^-16 steps.
        let sum = f32::from_bits(f_bits) + f32::from_bits(DENORM_MASK);
        (sum.to_bits().wrapping_sub(DENORM_MASK)) as u8
    } else {
        let mant_odd = (f_bits >> 21) & 1;
        let r = f_bits
            .wrapping_add(((15u32).wrapping_sub(127) << 23).wrapping_add(0xFFFFF))
            .wrapping_add(mant_odd);
        (r >> 21) as u8
    };
    result | sign
}

/// fp8 e4m3fn → f32, exact (c10's `fp8e4m3fn_to_fp32_value`; NaN → 0x7FF00000 | sign).
pub const fn e4m3_to_f32_bits(input: u8) -> u32 {
    let w = (input as u32) << 24;
    let sign = w & 0x8000_0000;
    let nonsign = w & 0x7FFF_FFFF;
    let clz = nonsign.leading_zeros();
    let renorm_shift = clz.saturating_sub(4);
    let inf_nan_mask = ((nonsign.wrapping_add(0x0100_0000) as i32) >> 8) as u32 & 0x7F80_0000;
    let zero_mask = ((nonsign.wrapping_sub(1) as i32) >> 31) as u32;
    let body =
        ((nonsign << renorm_shift) >> 4).wrapping_add((0x78u32.wrapping_sub(renorm_shift)) << 23);
    sign | ((body | inf_nan_mask) & !zero_mask)
}

/// fp8 e5m2 → f32, exact: e5m2 is the top byte of an f16.
#[inline(always)]
pub fn e5m2_to_f32(input: u8) -> f32 {
    f16_to_f32((input as u16) << 8)
}

/// Every fp8 e4m3fn value as f32 bits, built at compile time.
pub static E4M3_TO_F32: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = e4m3_to_f32_bits(i as u8);
        i += 1;
    }
    table
};

#[inline(always)]
pub fn e4m3_to_f32(input: u8) -> f32 {
    f32::from_bits(E4M3_TO_F32[input as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_ties_to_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0x0000);
        assert_eq!(f32_to_bf16(f32::from_bits(0x8000)), 0x0000);
        assert_eq!(f32_to_bf16(f32::from_bits(0x8001)), 0x0001);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xFFA1_0000)), 0xFFE1);
    }

    #[test]
    fn f16_boundaries() {
        assert_eq!(f32_to_f16(65504.0), 0x7BFF);
        assert_eq!(f32_to_f16(65519.99), 0x7BFF);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(-65520.0), 0xFC00);
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000); // tie to even zero
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002); // tie to even 2
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xFC00);
        assert_eq!(f32_to_f16(f32::from_bits(0x7F80_2000)), 0x7E01);
    }

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert_eq!(f32_to_f16(f), h | 0x0200, "{h:#06x}");
            } else {
                assert_eq!(f32_to_f16(f), h, "{h:#06x}");
            }
        }
    }

    #[test]
    fn bf16_widening_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let f = bf16_to_f32(h);
            if f.is_nan() {
                assert_eq!(f32_to_bf16(f), h | 0x0040);
            } else {
                assert_eq!(f32_to_bf16(f), h);
            }
        }
    }

    #[test]
    fn fp8_widening_is_exact_for_every_value() {
        for b in 0..=u8::MAX {
            let f = e4m3_to_f32(b);
            if b & 0x7F == 0x7F {
                assert!(f.is_nan());
                assert_eq!(f32_to_e4m3(f, Fp8Overflow::Saturate), b);
            } else {
                assert_eq!(f32_to_e4m3(f, Fp8Overflow::Saturate), b, "{b:#04x}");
                assert_eq!(f32_to_e4m3(f, Fp8Overflow::Nan), b, "{b:#04x}");
            }
            let g = e5m2_to_f32(b);
            if g.is_nan() {
                assert_eq!(f32_to_e5m2(g), 0x7F | (b & 0x80));
            } else {
                assert_eq!(f32_to_e5m2(g), b, "{b:#04x}");
            }
        }
    }

    #[test]
    fn e4m3_overflow_policies() {
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f32_to_e4m3(464.0, Fp8Overflow::Nan), 0x7E);
        assert_eq!(f32_to_e4m3(470.0, Fp8Overflow::Nan), 0x7F);
        assert_eq!(f32_to_e4m3(470.0, Fp8Overflow::Saturate), 0x7E);
        assert_eq!(f32_to_e4m3(1e6, Fp8Overflow::Saturate), 0x7E);
        assert_eq!(f32_to_e4m3(-1e6, Fp8Overflow::Saturate), 0xFE);
        assert_eq!(f32_to_e4m3(f32::INFINITY, Fp8Overflow::Saturate), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY, Fp8Overflow::Nan), 0xFF);
        assert_eq!(f32_to_e4m3(-f32::NAN, Fp8Overflow::Saturate), 0xFF);
        assert_eq!(f32_to_e4m3(2f32.powi(-9), Fp8Overflow::Nan), 0x01);
        assert_eq!(f32_to_e4m3(2f32.powi(-10), Fp8Overflow::Nan), 0x00);
    }

    #[test]
    fn e5m2_overflow_goes_to_inf() {
        assert_eq!(e5m2_to_f32(0x7B), 57344.0);
        assert_eq!(f32_to_e5m2(61439.0), 0x7B);
        assert_eq!(f32_to_e5m2(61440.0), 0x7C);
        assert_eq!(f32_to_e5m2(-1e9), 0xFC);
        assert_eq!(f32_to_e5m2(f32::NAN), 0x7F);
    }
}
