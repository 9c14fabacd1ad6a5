//! What a cast loses, counted from the source values: overflow to ±inf/NaN
//! (or, for fp8 e4m3fn, saturation to ±448), underflow of non-zero values to
//! zero, NaN and inf already in the input, and the largest finite magnitude.
//!
//! Casting is monotonic in magnitude, so "overflows" and "underflows" are
//! thresholds on a source value's absolute bit pattern. [`LossRule::new`]
//! finds them once per (source, target) pair by bisection over the scalar
//! reference kernels, and [`LossRule::scan`] is then a branch-free integer
//! pass over the source bytes that the compiler vectorises. It reads the same
//! chunk the kernel just cast, while it is still in cache.

use serde::{Deserialize, Serialize};

use crate::cast::scalar::{self, Fp8Overflow};
use crate::dtype::DType;

/// Per-tensor (or total) loss counts of a cast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    /// Elements looked at.
    pub elements: u64,
    /// Finite values that became ±inf or NaN, or were clamped to ±448 (e4m3fn).
    pub overflow: u64,
    /// Non-zero values that became ±0.
    pub underflow: u64,
    /// NaNs already in the input.
    pub nan_in: u64,
    /// Infinities already in the input.
    pub inf_in: u64,
    /// Largest finite |x| in the input (0 if none).
    pub max_abs: f64,
}

impl LossStats {
    /// Combine counts of two parts of the same tensor (or of two tensors).
    pub fn merge(&mut self, other: &LossStats) {
        self.elements += other.elements;
        self.overflow += other.overflow;
        self.underflow += other.underflow;
        self.nan_in += other.nan_in;
        self.inf_in += other.inf_in;
        self.max_abs = self.max_abs.max(other.max_abs);
    }

    /// True when the cast lost range (not just precision).
    pub fn is_lossy(&self) -> bool {
        self.overflow > 0 || self.underflow > 0
    }
}

/// The source-side thresholds of one cast, as absolute bit patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossRule {
    from: DType,
    /// Sign-clearing mask for the source width.
    abs_mask: u64,
    /// Bits of +inf (or of the NaN code for e4m3fn, which has no inf).
    inf_bits: u64,
    /// Whether `inf_bits` is an infinity (false: e4m3fn, where it is NaN).
    has_inf: bool,
    /// Smallest finite |x| bits that overflow, if any do.
    overflow_bits: Option<u64>,
    /// Largest non-zero |x| bits that become zero, if any do.
    underflow_bits: Option<u64>,
}

/// Where a finite positive source value (as abs bits) lands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Landing {
    Zero,
    Finite,
    Overflow,
}

fn decode_f32(from: DType, bits: u64) -> f32 {
    match from {
        DType::F64 => f64::from_bits(bits) as f32,
        DType::F32 => f32::from_bits(bits as u32),
        DType::BF16 => scalar::bf16_to_f32(bits as u16),
        DType::F16 => scalar::f16_to_f32(bits as u16),
        DType::F8E4M3 => scalar::e4m3_to_f32(bits as u8),
        DType::F8E5M2 => scalar::e5m2_to_f32(bits as u8),
        _ => unreachable!("decode_f32: {from} is not castable"),
    }
}

/// The value of |x| bits of `from`, exactly (f64 holds every castable value).
fn decode(from: DType, bits: u64) -> f64 {
    if from == DType::F64 {
        f64::from_bits(bits)
    } else {
        decode_f32(from, bits) as f64
    }
}

/// Where `bits` lands under the non-saturating rule (saturation counts as
/// overflow: the value is no longer what it was).
fn landing(from: DType, to: DType, bits: u64) -> Landing {
    if from == DType::F64 && to == DType::F64 {
        return Landing::Finite;
    }
    let x = decode_f32(from, bits);
    if from == DType::F64 && !x.is_finite() {
        return Landing::Overflow; // f64 beyond f32's range
    }
    let out_bits: u64 = match to {
        DType::F64 | DType::F32 => x.to_bits() as u64 & 0x7FFF_FFFF,
        DType::BF16 => (scalar::f32_to_bf16(x) & 0x7FFF) as u64,
        DType::F16 => (scalar::f32_to_f16(x) & 0x7FFF) as u64,
        DType::F8E4M3 => (scalar::f32_to_e4m3(x, Fp8Overflow::Nan) & 0x7F) as u64,
        DType::F8E5M2 => (scalar::f32_to_e5m2(x) & 0x7F) as u64,
        _ => unreachable!("landing: {to} is not castable"),
    };
    let inf = match to {
        DType::F64 | DType::F32 => 0x7F80_0000,
        DType::BF16 => 0x7F80,
        DType::F16 => 0x7C00,
        DType::F8E4M3 => 0x7F, // the NaN code
        DType::F8E5M2 => 0x7C,
        _ => unreachable!(),
    };
    if out_bits >= inf {
        Landing::Overflow
    } else if out_bits == 0 {
        Landing::Zero
    } else {
        Landing::Finite
    }
}

/// Smallest `b` in `[lo, hi]` with `pred(b)`, for `pred` monotonic (false..true).
fn first_true(mut lo: u64, mut hi: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    if !pred(hi) {
        return None;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

impl LossRule {
    /// The thresholds of casting `from` to `to` (both castable).
    pub fn new(from: DType, to: DType) -> LossRule {
        let (abs_mask, inf_bits, has_inf) = match from {
            DType::F64 => (0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, true),
            DType::F32 => (0x7FFF_FFFF, 0x7F80_0000, true),
            DType::BF16 => (0x7FFF, 0x7F80, true),
            DType::F16 => (0x7FFF, 0x7C00, true),
            DType::F8E4M3 => (0x7F, 0x7F, false),
            DType::F8E5M2 => (0x7F, 0x7C, true),
            _ => unreachable!("LossRule: {from} is not castable"),
        };
        let max_finite = inf_bits - 1;
        let overflow_bits =
            first_true(1, max_finite, |b| landing(from, to, b) == Landing::Overflow);
        let underflow_bits = first_true(1, max_finite, |b| landing(from, to, b) != Landing::Zero)
            .and_then(|first_nonzero| first_nonzero.checked_sub(1))
            .filter(|&b| b >= 1);
        LossRule {
            from,
            abs_mask,
            inf_bits,
            has_inf,
            overflow_bits,
            underflow_bits,
        }
    }

    /// The smallest finite source magnitude that overflows (to ±inf, NaN, or
    /// saturated to ±448 for e4m3fn), or `None` when nothing can.
    ///
    /// ```
    /// use fastcast_core::rules::loss::LossRule;
    /// use fastcast_core::DType;
    /// assert_eq!(LossRule::new(DType::F32, DType::F16).overflow_from(), Some(65520.0));
    /// assert_eq!(LossRule::new(DType::F16, DType::F32).overflow_from(), None);
    /// ```
    pub fn overflow_from(&self) -> Option<f64> {
        self.overflow_bits.map(|b| decode(self.from, b))
    }

    /// The largest non-zero source magnitude that becomes zero, or `None`
    /// when no non-zero value can.
    ///
    /// ```
    /// use fastcast_core::rules::loss::LossRule;
    /// use fastcast_core::DType;
    /// assert_eq!(LossRule::new(DType::F32, DType::F16).underflow_to(), Some(2f64.powi(-25)));
    /// ```
    pub fn underflow_to(&self) -> Option<f64> {
        self.underflow_bits.map(|b| decode(self.from, b))
    }

    /// [`Self::underflow_to`] as the source's absolute bits: a non-zero
    /// magnitude becomes zero when its bits are at most these.
    pub fn underflow_bits(&self) -> Option<u64> {
        self.underflow_bits
    }

    /// The absolute bits from which a source magnitude is not finite (inf,
    /// or NaN, whose bits are larger): every finite |x| has fewer.
    ///
    /// ```
    /// use fastcast_core::rules::loss::LossRule;
    /// use fastcast_core::DType;
    /// assert_eq!(LossRule::new(DType::BF16, DType::F32).finite_end(), 0x7F80);
    /// assert_eq!(LossRule::new(DType::F8E4M3, DType::F32).finite_end(), 0x7F);
    /// ```
    pub fn finite_end(&self) -> u64 {
        self.inf_bits
    }

    /// Count what casting `src` (little-endian elements of the rule's source
    /// dtype) loses. Runs with AVX-512 or AVX2 where the CPU has them: on a
    /// cold 38 GB f32 -> bf16 run the AVX2 scan took more CPU than the cast.
    pub fn scan(&self, src: &[u8]) -> LossStats {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512F and BW, checked just above.
            return unsafe { self.scan_avx512(src) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.scan_avx2(src) };
        }
        self.scan_portable(src)
    }

    /// [`LossRule::scan`] compiled for AVX2 (the same code, wider registers).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn scan_avx2(&self, src: &[u8]) -> LossStats {
        self.scan_portable(src)
    }

    /// [`LossRule::scan`] compiled for AVX-512 (BW for the 8- and 16-bit lanes).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scan_avx512(&self, src: &[u8]) -> LossStats {
        self.scan_portable(src)
    }

    #[inline(always)]
    fn scan_portable(&self, src: &[u8]) -> LossStats {
        // Branch-free classes of a = |x| bits: NaN is a > nan_floor, inf is
        // a == inf_code, finite is a < finite_end. e4m3fn has no inf: its
        // all-ones code is the only NaN, and no value equals inf_code.
        let (nan_floor, inf_code, finite_end) = if self.has_inf {
            (self.inf_bits, self.inf_bits, self.inf_bits)
        } else {
            (self.inf_bits - 1, u64::MAX, self.inf_bits)
        };
        let limits = Limits {
            mask: self.abs_mask,
            nan_floor,
            inf_code,
            finite_end,
            // Thresholds that never trigger when the cast cannot overflow/underflow.
            overflow_from: self.overflow_bits.unwrap_or(finite_end),
            underflow_to: self.underflow_bits.unwrap_or(0),
        };
        let counts = match self.from.size() {
            8 => count_u64(src, &limits),
            4 => count_u32(src, &limits),
            2 => count_u16(src, &limits),
            _ => count_u8(src, &limits),
        };
        let max = counts.max;
        LossStats {
            elements: (src.len() / self.from.size()) as u64,
            overflow: counts.overflow,
            underflow: counts.underflow,
            nan_in: counts.nan,
            inf_in: counts.inf,
            max_abs: decode(self.from, max),
        }
    }
}

/// True when casting `from` to `to` shrinks the exponent range: the
/// target's largest finite value is less than half the source's, so whole
/// binades of source values overflow (f32 -> f16, bf16 -> f16, f64 -> f32,
/// f32 -> fp8). False when at most rounding at the very top can overflow
/// (f32 -> bf16, f16 -> e5m2) or nothing can, and for non-castable dtypes.
///
/// ```
/// use fastcast_core::rules::loss::narrows_range;
/// use fastcast_core::DType;
/// assert!(narrows_range(DType::BF16, DType::F16));
/// assert!(!narrows_range(DType::F32, DType::BF16));
/// ```
pub fn narrows_range(from: DType, to: DType) -> bool {
    match (from.max_finite(), to.max_finite()) {
        (Some(src), Some(dst)) => dst < src / 2.0,
        _ => false,
    }
}

/// True when values overflowing into `to` saturate to its largest finite
/// value under `policy` instead of becoming ±inf/NaN: e4m3fn, which has no
/// infinity, when saturating.
pub fn saturates(to: DType, policy: Fp8Overflow) -> bool {
    to == DType::F8E4M3 && policy == Fp8Overflow::Saturate
}

/// A rule's thresholds, widened to u64 (narrowed again per element width).
struct Limits {
    mask: u64,
    nan_floor: u64,
    inf_code: u64,
    finite_end: u64,
    overflow_from: u64,
    underflow_to: u64,
}

/// One branch-free pass per element width. Counts are kept in that width
/// within blocks of [`BLOCK`] elements (so even u8 counters cannot wrap) and
/// widened per block, so the compiler vectorises the loop with as many lanes
/// as the cast kernel has. Written out per width (a macro, not a generic):
/// that is the shape the vectoriser reliably handles.
macro_rules! count_width {
    ($name:ident, $t:ty) => {
        #[inline(always)]
        fn $name(src: &[u8], l: &Limits) -> Counts {
            const BYTES: usize = std::mem::size_of::<$t>();
            let narrow = |v: u64| v.min(<$t>::MAX as u64) as $t;
            let (mask, nan_floor, finite_end) =
                (l.mask as $t, narrow(l.nan_floor), narrow(l.finite_end));
            let (inf_possible, inf_code) = (l.inf_code <= <$t>::MAX as u64, narrow(l.inf_code));
            let (overflow_from, underflow_to) = (narrow(l.overflow_from), narrow(l.underflow_to));
            let mut totals = Counts::default();
            let mut max: $t = 0;
            for block in src.chunks(BLOCK * BYTES) {
                let (mut overflow, mut underflow, mut nan, mut inf): ($t, $t, $t, $t) =
                    (0, 0, 0, 0);
                for c in block.chunks_exact(BYTES) {
                    let a = <$t>::from_le_bytes(c.try_into().unwrap()) & mask;
                    nan = nan.wrapping_add((a > nan_floor) as $t);
                    inf = inf.wrapping_add((inf_possible & (a == inf_code)) as $t);
                    let finite = a < finite_end;
                    overflow = overflow.wrapping_add((finite & (a >= overflow_from)) as $t);
                    // 1 <= a <= underflow_to, as one unsigned comparison.
                    underflow = underflow.wrapping_add((a.wrapping_sub(1) < underflow_to) as $t);
                    max = max.max(if finite { a } else { 0 });
                }
                totals.overflow += overflow as u64;
                totals.underflow += underflow as u64;
                totals.nan += nan as u64;
                totals.inf += inf as u64;
            }
            totals.max = max as u64;
            totals
        }
    };
}
count_width!(count_u8, u8);
count_width!(count_u16, u16);
count_width!(count_u32, u32);
count_width!(count_u64, u64);

/// Elements per counting block: u8 counters hold up to 255.
const BLOCK: usize = 255;

/// Raw counts of one pass, before `max` is decoded to a number.
#[derive(Default)]
struct Counts {
    overflow: u64,
    underflow: u64,
    nan: u64,
    inf: u64,
    max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::{cast, CastOptions, Kernel};
    use crate::dtype::CASTABLE;

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn thresholds_are_the_documented_ones() {
        let f16 = LossRule::new(DType::F32, DType::F16);
        assert_eq!(f16.overflow_bits, Some(65520f32.to_bits() as u64));
        assert_eq!(f16.underflow_bits, Some(2f32.powi(-25).to_bits() as u64));
        let e5m2 = LossRule::new(DType::F32, DType::F8E5M2);
        assert_eq!(e5m2.overflow_bits, Some(61440f32.to_bits() as u64));
        let e4m3 = LossRule::new(DType::F32, DType::F8E4M3);
        assert_eq!(e4m3.overflow_bits, Some(464f32.to_bits() as u64 + 1));
        let widen = LossRule::new(DType::BF16, DType::F32);
        assert_eq!((widen.overflow_bits, widen.underflow_bits), (None, None));
    }

    #[test]
    fn thresholds_decode_to_values() {
        let rule = |from, to| LossRule::new(from, to);
        let f16 = rule(DType::F32, DType::F16);
        assert_eq!(f16.overflow_from(), Some(65520.0));
        assert_eq!(f16.underflow_to(), Some(2f64.powi(-25)));
        let just_above_464 = f32::from_bits(464f32.to_bits() + 1) as f64;
        assert_eq!(
            rule(DType::F32, DType::F8E4M3).overflow_from(),
            Some(just_above_464)
        );
        assert!(just_above_464 > 464.0 && just_above_464 < 464.0001);
        // f32 -> bf16 overflows only by rounding up from the midpoint between
        // bf16's largest finite value (0x7F7F) and inf: 0x7F7F8000, 3.3961775e38.
        let bf16 = rule(DType::F32, DType::BF16);
        assert_eq!(
            bf16.overflow_from(),
            Some(f32::from_bits(0x7F7F_8000) as f64)
        );
        assert_eq!(bf16.overflow_from(), Some(3.39617752923046e38));
        // Only f32 subnormals up to half bf16's smallest subnormal (2^-133) vanish.
        assert_eq!(bf16.underflow_to(), Some(2f64.powi(-134)));
        assert_eq!(rule(DType::BF16, DType::F16).overflow_from(), Some(65536.0));
        let f64_to_f32 = rule(DType::F64, DType::F32);
        assert!(f64_to_f32.overflow_from().unwrap() > f32::MAX as f64);
        assert!(f64_to_f32.underflow_to().unwrap() < f32::from_bits(1) as f64);
        for d in CASTABLE {
            let same = rule(d, d);
            assert_eq!(
                (same.overflow_from(), same.underflow_to()),
                (None, None),
                "{d}"
            );
        }
    }

    #[test]
    fn narrows_range_on_every_pair() {
        use DType::*;
        // Written out from the maxima: F64 1.8e308, F32 3.4e38, BF16 3.39e38,
        // F16 65504, E5M2 57344, E4M3 448. Narrowing: below half the source's.
        let narrowing = [
            (F64, F32),
            (F64, F16),
            (F64, BF16),
            (F64, F8E4M3),
            (F64, F8E5M2),
            (F32, F16),
            (F32, F8E4M3),
            (F32, F8E5M2),
            (BF16, F16),
            (BF16, F8E4M3),
            (BF16, F8E5M2),
            (F16, F8E4M3),
            (F8E5M2, F8E4M3),
        ];
        for from in CASTABLE {
            for to in CASTABLE {
                let expected = narrowing.contains(&(from, to));
                assert_eq!(narrows_range(from, to), expected, "{from} -> {to}");
                // The same fact from the other rule: narrowing is exactly when
                // values at most half the source's maximum overflow.
                let half = from.max_finite().unwrap() / 2.0;
                let rule = LossRule::new(from, to);
                assert_eq!(
                    rule.overflow_from().is_some_and(|x| x <= half),
                    expected,
                    "{from} -> {to}"
                );
            }
        }
        // Only rounding at the very top: these can overflow, but do not narrow.
        assert!(LossRule::new(F32, BF16).overflow_from().is_some());
        assert!(LossRule::new(F16, F8E5M2).overflow_from() == Some(61440.0));
        assert!(!narrows_range(I64, F16) && !narrows_range(F32, U8));
    }

    #[test]
    fn only_e4m3_saturates_and_only_when_asked() {
        for to in CASTABLE {
            assert_eq!(saturates(to, Fp8Overflow::Saturate), to == DType::F8E4M3);
            assert!(!saturates(to, Fp8Overflow::Nan));
        }
    }

    #[test]
    fn counts_match_what_the_kernel_produces() {
        let values = [
            1.0,
            65504.0,
            65519.0,
            65520.0,
            -1e6,
            1e-8,
            -3e-8,
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2.5e-8,
            3e-8,
            f32::MAX,
        ];
        let stats = LossRule::new(DType::F32, DType::F16).scan(&bytes(&values));
        assert_eq!(stats.elements, 15);
        // Overflow: 65520, -1e6 and f32::MAX. Underflow: 1e-8 and 2.5e-8 are
        // below 2^-25 and round to 0, while ±3e-8 round up to 2^-24.
        assert_eq!(stats.overflow, 3);
        assert_eq!(stats.underflow, 2);
        assert_eq!((stats.nan_in, stats.inf_in), (1, 2));
        assert_eq!(stats.max_abs, f32::MAX as f64);
    }

    /// The vector builds of the scan (AVX2, AVX-512, where this CPU has them)
    /// count exactly what the portable one and element-by-element scans do,
    /// on long buffers of random bit patterns with every special value mixed in.
    #[test]
    fn every_scan_build_counts_the_same() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for from in CASTABLE {
            let size = from.size();
            let n = 70_001; // not a multiple of any lane count or BLOCK
            let mut src = Vec::with_capacity(n * size);
            for i in 0..n {
                let bits = match i % 7 {
                    0 => 0,
                    1 => u64::MAX,                // NaN (all ones)
                    2 => 1,                       // the smallest subnormal
                    _ => next() >> (next() % 64), // every magnitude
                };
                src.extend_from_slice(&bits.to_le_bytes()[..size]);
            }
            for to in CASTABLE {
                let rule = LossRule::new(from, to);
                let portable = rule.scan_portable(&src);
                let mut each = LossStats::default();
                for e in src.chunks_exact(size) {
                    each.merge(&rule.scan_portable(e));
                }
                assert_eq!(portable, each, "{from}->{to} portable vs per element");
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx2") {
                        // SAFETY: checked just above.
                        let v = unsafe { rule.scan_avx2(&src) };
                        assert_eq!(v, portable, "{from}->{to} avx2");
                    }
                    if std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw")
                    {
                        // SAFETY: checked just above.
                        let v = unsafe { rule.scan_avx512(&src) };
                        assert_eq!(v, portable, "{from}->{to} avx512");
                    }
                }
                assert_eq!(rule.scan(&src), portable);
            }
        }
    }

    /// The rule must agree with the kernels element by element, for every
    /// pair, on every 16-bit input and on a sweep of f32 inputs.
    #[test]
    fn rule_agrees_with_the_kernels_everywhere() {
        let opts = CastOptions {
            fp8_overflow: Fp8Overflow::Nan,
            kernel: Kernel::Scalar,
        };
        for from in CASTABLE {
            let inputs: Vec<u64> = match from.size() {
                1 => (0..=0xFF).collect(),
                2 => (0..=0xFFFF).collect(),
                4 => (0..=u32::MAX as u64).step_by(9973).collect(),
                _ => (0..=u64::MAX)
                    .step_by(1 << 44)
                    .chain([0x3FF0_0000_0000_0001])
                    .collect(),
            };
            for to in CASTABLE {
                let rule = LossRule::new(from, to);
                for &b in &inputs {
                    let src = &b.to_le_bytes()[..from.size()];
                    let mut out = vec![0u8; to.size()];
                    cast(src, from, &mut out, to, &opts).unwrap();
                    let mut wide = [0u8; 8];
                    wide[..to.size()].copy_from_slice(&out);
                    let o = u64::from_le_bytes(wide);
                    let s = rule.scan(src);
                    let (out_nonfinite, out_zero) = match to {
                        DType::F64 => (
                            o & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000,
                            o << 1 == 0,
                        ),
                        DType::F32 => (o & 0x7F80_0000 == 0x7F80_0000, o & 0x7FFF_FFFF == 0),
                        DType::BF16 => (o & 0x7F80 == 0x7F80, o & 0x7FFF == 0),
                        DType::F16 => (o & 0x7C00 == 0x7C00, o & 0x7FFF == 0),
                        DType::F8E4M3 => (o & 0x7F == 0x7F, o & 0x7F == 0),
                        DType::F8E5M2 => (o & 0x7C == 0x7C, o & 0x7F == 0),
                        _ => unreachable!(),
                    };
                    let input_special = s.nan_in + s.inf_in > 0;
                    assert_eq!(
                        s.overflow == 1,
                        out_nonfinite && !input_special,
                        "{from}->{to} overflow at {b:#x}"
                    );
                    let input_zero = b & rule.abs_mask == 0;
                    assert_eq!(
                        s.underflow == 1,
                        out_zero && !input_zero && !input_special,
                        "{from}->{to} underflow at {b:#x}"
                    );
                }
            }
        }
    }
}
