//! 4-bit floats (E2M1): MXFP4 (gpt-oss, compressed-tensors) and NVFP4
//! (compressed-tensors, ModelOpt). Two codes per byte along the packed axis,
//! element `2k` in the low nibble of byte `k`; code bit 3 is the sign, bits
//! 0–2 index `[0, 0.5, 1, 1.5, 2, 3, 4, 6]`.
//!
//! - MXFP4: one E8M0 exponent byte `e` per group of 32, the scale `2^(e-127)`
//!   as PyTorch's `float8_e8m0fnu` defines it: `e = 0` is `2^-127` (an f32
//!   subnormal), `e = 255` NaN. A value is `f32(code) * scale`, exact (the
//!   references' only rounding is to the target) unless it overflows f32.
//! - NVFP4: one F8_E4M3 scale `s` per group of 16 and one F32 second-level
//!   scale `g`, in the producer's order of operations, in f32:
//!   compressed-tensors `f32(code) * (f32(s) / g)` (`weight_global_scale` is a
//!   divisor), ModelOpt `f32(code) * (f32(s) * g)` (`weight_scale_2` is a
//!   multiplier), and ModelOpt's table has +0 for code 8.
//!
//! The packing is `[matrices, rows, cols / 2]` bytes with scales `[matrices,
//! rows, cols / group]`. The output is that `[.., rows, cols]`, or with
//! `transpose` each matrix's rows and columns swapped (`[.., cols, rows]`), as
//! transformers' dequantized gpt-oss experts hold them. With `down` the pairs
//! and groups run down the columns instead: bytes `[matrices, rows / 2, cols]`
//! (row `2k` in the low nibble of byte row `k`), scales `[matrices, rows /
//! group, cols]`, the output `[.., rows, cols]`, as ModelOpt exports fused
//! expert tensors (`[experts, in / 2, out]`, transformers' `x @ W` layout).

use crate::cast::scalar;
use crate::dtype::DType;

/// E2M1 magnitudes by the low three bits of a code.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// How each group's scale is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fp4Scale {
    /// MXFP4: E8M0 exponents (U8 or F8_E8M0 bytes), groups of 32.
    E8m0,
    /// NVFP4, compressed-tensors: E4M3 scales divided by the global scale.
    E4m3Divided(f32),
    /// NVFP4, ModelOpt: E4M3 scales times the second-level scale.
    E4m3Times(f32),
}

/// A checked FP4 dequantization, its small tables decoded once.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp4Groups<'a> {
    /// Every value a code can take under each scale byte: `codes[c] * scale(s)`
    /// at `16 * s + c`, each the f32 product the references compute (16 KiB).
    values: Vec<f32>,
    scale_bytes: &'a [u8],
    rows: u64,
    cols: u64,
    group: u64,
    transpose: bool,
    down: bool,
}

/// `2^(e - 127)` as `float8_e8m0fnu` defines it (255 is NaN).
pub fn e8m0(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        // 2^-127 is the f32 subnormal 0x0040_0000; the rest are normal.
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits(u32::from(e) << 23),
    }
}

impl<'a> Fp4Groups<'a> {
    /// Check the geometry: `shape` is the output's, the source `src_len`
    /// packed bytes, the scales `scale_dtype` bytes, one per group.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        from: DType,
        shape: &[u64],
        src_len: usize,
        scale: Fp4Scale,
        scale_dtype: DType,
        scale_bytes: &'a [u8],
        group: u64,
        transpose: bool,
        down: bool,
        positive_zero: bool,
    ) -> Result<Fp4Groups<'a>, String> {
        if !matches!(from, DType::U8 | DType::I8) {
            return Err(format!("fp4 codes in a {from} tensor (expected U8 or I8)"));
        }
        let dims = shape.len();
        if dims < 2 || (transpose && dims < 3) {
            return Err(format!("fp4 output of shape {shape:?}"));
        }
        let (rows, cols) = if transpose {
            (shape[dims - 1], shape[dims - 2])
        } else {
            (shape[dims - 2], shape[dims - 1])
        };
        let matrices: u64 = shape[..dims - 2].iter().product();
        if transpose && down {
            return Err("fp4 codes packed down the columns and transposed".into());
        }
        let along = if down { rows } else { cols };
        if group == 0 || !along.is_multiple_of(group) || !group.is_multiple_of(2) {
            let what = if down { "rows" } else { "columns" };
            return Err(format!("{along} {what} in groups of {group}"));
        }
        let numel = matrices * rows * cols;
        if numel != 2 * src_len as u64 {
            return Err(format!("{src_len} bytes do not hold {numel} fp4 codes"));
        }
        let want = match scale {
            Fp4Scale::E8m0 => [DType::U8, DType::F8E8M0],
            _ => [DType::F8E4M3, DType::F8E4M3],
        };
        if !want.contains(&scale_dtype) {
            return Err(format!(
                "a {scale_dtype} group scale (expected {})",
                want[0]
            ));
        }
        if scale_bytes.len() as u64 != numel / group {
            return Err(format!(
                "{} group scales for {numel} values in groups of {group}",
                scale_bytes.len()
            ));
        }
        let mut codes: [f32; 16] = std::array::from_fn(|c| {
            let v = E2M1[c & 7];
            if c & 8 != 0 {
                -v
            } else {
                v
            }
        });
        if positive_zero {
            codes[8] = 0.0;
        }
        let values = (0..=255u8)
            .flat_map(|b| {
                let multiplier = match scale {
                    Fp4Scale::E8m0 => e8m0(b),
                    Fp4Scale::E4m3Divided(g) => scalar::e4m3_to_f32(b) / g,
                    Fp4Scale::E4m3Times(g) => scalar::e4m3_to_f32(b) * g,
                };
                codes.map(|c| c * multiplier)
            })
            .collect();
        Ok(Fp4Groups {
            values,
            scale_bytes,
            rows,
            cols,
            group,
            transpose,
            down,
        })
    }

    /// Whether the output swaps each matrix's rows and columns.
    pub fn transposed(&self) -> bool {
        self.transpose
    }

    /// Chunks are whole bytes of codes (pairs; packed down the columns, pairs
    /// of rows); transposed, any element.
    pub fn align(&self) -> u64 {
        if self.transpose {
            1
        } else if self.down {
            2 * self.cols
        } else {
            2
        }
    }

    /// The source bytes output elements `[begin, end)` read: their bytes, or
    /// with `transpose` the whole matrices they fall in.
    pub fn source_range(&self, begin: u64, end: u64) -> (usize, usize) {
        if self.down {
            // rows of every matrix in a row, each pair of them one byte row
            let (r0, r1) = (begin / self.cols, end.div_ceil(self.cols));
            return (
                (r0 / 2 * self.cols) as usize,
                (r1.div_ceil(2) * self.cols) as usize,
            );
        }
        if !self.transpose {
            return ((begin / 2) as usize, end.div_ceil(2) as usize);
        }
        let per = self.rows * self.cols;
        let (first, last) = (begin / per, end.div_ceil(per));
        ((first * per / 2) as usize, (last * per / 2) as usize)
    }

    /// Values of output elements `first..first + out.len() / 4` as
    /// little-endian f32, from `src`, the bytes [`source_range`] gives.
    ///
    /// [`source_range`]: Self::source_range
    pub fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let n = (out.len() / 4) as u64;
        let gpr = self.cols / self.group;
        let row_of = |s: u8| &self.values[16 * s as usize..16 * s as usize + 16];
        let put = |o: &mut [u8], v: f32| o.copy_from_slice(&v.to_le_bytes());
        if self.down {
            // Output row r (of all matrices in a row; `rows` is a multiple of the
            // group, so of 2) reads byte row r / 2, nibble r % 2, scale row r / group.
            let cols = self.cols as usize;
            let (r0, base) = (first / self.cols, first / self.cols / 2);
            for (t, row) in out.chunks_exact_mut(4 * cols).enumerate() {
                let r = r0 + t as u64;
                let shift = 4 * (r % 2) as u32;
                let bytes = &src[(r / 2 - base) as usize * cols..][..cols];
                let scales = &self.scale_bytes[(r / self.group) as usize * cols..][..cols];
                for ((o, &b), &s) in row.chunks_exact_mut(4).zip(bytes).zip(scales) {
                    put(o, row_of(s)[((b >> shift) & 0xF) as usize]);
                }
            }
            return;
        }
        if !self.transpose {
            // Group by group (one scale each); within one, a byte is two values.
            let base = first / 2;
            let (mut i, mut k) = (first, 0usize);
            while i < first + n {
                let (row, col) = (i / self.cols, i % self.cols);
                let stop = (first + n).min(row * self.cols + (col / self.group + 1) * self.group);
                let lut = row_of(self.scale_bytes[(row * gpr + col / self.group) as usize]);
                if i % 2 == 1 {
                    put(
                        &mut out[4 * k..4 * k + 4],
                        lut[(src[(i / 2 - base) as usize] >> 4) as usize],
                    );
                    i += 1;
                    k += 1;
                }
                let pairs = ((stop - i) / 2) as usize;
                let bytes = &src[(i / 2 - base) as usize..][..pairs];
                for (o, &b) in out[4 * k..4 * (k + 2 * pairs)]
                    .chunks_exact_mut(8)
                    .zip(bytes)
                {
                    put(&mut o[..4], lut[(b & 0xF) as usize]);
                    put(&mut o[4..], lut[(b >> 4) as usize]);
                }
                i += 2 * pairs as u64;
                k += 2 * pairs;
                if i < stop {
                    put(
                        &mut out[4 * k..4 * k + 4],
                        lut[(src[(i / 2 - base) as usize] & 0xF) as usize],
                    );
                    i += 1;
                    k += 1;
                }
            }
            return;
        }
        // Transposed: output row (m, c) is packed column c of matrix m, its
        // elements a byte stride apart; each run of one output row strides
        // through the source rows with no division.
        let per = self.rows * self.cols;
        let base = (first / per) * per / 2;
        let (mut i, mut k) = (first, 0usize);
        while i < first + n {
            let (m, within) = (i / per, i % per);
            let (c, r0) = (within / self.rows, within % self.rows);
            let run = (self.rows - r0).min(first + n - i) as usize;
            let shift = if c.is_multiple_of(2) { 0 } else { 4 };
            let mut byte = ((m * per + r0 * self.cols + c) / 2 - base) as usize;
            let mut scale = ((m * self.rows + r0) * gpr + c / self.group) as usize;
            let (byte_step, scale_step) = ((self.cols / 2) as usize, gpr as usize);
            for o in out[4 * k..4 * (k + run)].chunks_exact_mut(4) {
                put(
                    o,
                    row_of(self.scale_bytes[scale])[((src[byte] >> shift) & 0xF) as usize],
                );
                byte += byte_step;
                scale += scale_step;
            }
            i += run as u64;
            k += run;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_is_pytorchs() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(0), 2f32.powi(-127));
        assert_eq!(e8m0(254), 2f32.powi(127));
        assert!(e8m0(255).is_nan());
        assert_eq!(e8m0(1), f32::MIN_POSITIVE);
    }

    /// An MXFP4 dequantization (groups of 32) of `len` packed bytes into `shape`.
    fn mx<'a>(shape: &[u64], len: usize, scales: &'a [u8], transpose: bool) -> Fp4Groups<'a> {
        let (e8m0, u8) = (Fp4Scale::E8m0, DType::U8);
        Fp4Groups::new(
            u8, shape, len, e8m0, u8, scales, 32, transpose, false, false,
        )
        .unwrap()
    }

    fn values(g: &Fp4Groups, src: &[u8], first: u64, n: usize) -> Vec<f32> {
        let (b, e) = g.source_range(first, first + n as u64);
        let mut out = vec![0u8; 4 * n];
        g.dequantize(&src[b..e], first, &mut out);
        out.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn low_nibble_first_and_signs() {
        // one row of 32: codes 0..16 then 16..32 mod 16; scale 2^1
        let src: Vec<u8> = (0..16u8)
            .map(|k| (2 * k % 16) | (((2 * k + 1) % 16) << 4))
            .collect();
        let scales = [128u8];
        let g = mx(&[1, 32], 16, &scales, false);
        let v = values(&g, &src, 0, 32);
        assert_eq!(&v[..8], &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]);
        assert_eq!(v[8].to_bits(), (-0.0f32).to_bits());
        assert_eq!(v[15], -12.0);
        // a chunk starting mid-row
        assert_eq!(values(&g, &src, 6, 4), &v[6..10]);
    }

    /// Any chunk gives the values of the whole tensor's run: across group and row
    /// boundaries, plain and transposed.
    #[test]
    fn chunks_agree_with_the_whole() {
        let src: Vec<u8> = (0..96u32).map(|k| (k * 37 % 251) as u8).collect();
        let scales: Vec<u8> = (0..6u8).map(|k| 120 + k).collect();
        for (shape, transpose) in [(&[3u64, 64][..], false), (&[1, 64, 3][..], true)] {
            let g = mx(shape, 96, &scales, transpose);
            let whole = values(&g, &src, 0, 192);
            // chunks start and end on multiples of align (or at the end)
            let a = g.align();
            for (first, last) in [(30, 70), (62, 66), (64, 192), (2, 192), (190, 192)] {
                let (first, last) = (first / a * a, (last as u64).div_ceil(a) * a);
                let (f, l) = (first as usize, (last as usize).min(192));
                assert_eq!(values(&g, &src, first, l - f), &whole[f..l], "{first}..{l}");
            }
        }
    }

    #[test]
    fn modelopt_zero_is_positive_and_nvfp4_orders_differ() {
        let src = [0x88u8; 8];
        let scales = [0x38u8]; // e4m3 1.0
        let g = Fp4Groups::new(
            DType::U8,
            &[1, 16],
            8,
            Fp4Scale::E4m3Times(0.5),
            DType::F8E4M3,
            &scales,
            16,
            false,
            false,
            true,
        )
        .unwrap();
        assert!(values(&g, &src, 0, 16).iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn transposed_matrices() {
        // 2 matrices of 2 rows x 32 cols; output [2, 32, 2]
        let src: Vec<u8> = (0..64u8).map(|k| (k % 8) | (((k + 3) % 8) << 4)).collect();
        let scales = [127u8, 128, 129, 130];
        let plain = mx(&[2, 2, 32], 64, &scales, false);
        let t = mx(&[2, 32, 2], 64, &scales, true);
        let p = values(&plain, &src, 0, 128);
        let tv = values(&t, &src, 0, 128);
        for m in 0..2 {
            for r in 0..2 {
                for c in 0..32 {
                    assert_eq!(tv[m * 64 + c * 2 + r], p[m * 64 + r * 32 + c]);
                }
            }
        }
        // a chunk in the second matrix reads only its bytes
        assert_eq!(t.source_range(70, 80), (32, 64));
        assert_eq!(values(&t, &src, 70, 10), &tv[70..80]);
    }

    #[test]
    fn geometry_is_checked() {
        let s = [0u8; 2];
        let bad = |shape: &[u64], len: usize, group: u64| {
            Fp4Groups::new(
                DType::U8,
                shape,
                len,
                Fp4Scale::E8m0,
                DType::U8,
                &s,
                group,
                false,
                false,
                false,
            )
            .is_err()
        };
        assert!(bad(&[2, 32], 31, 32));
        assert!(bad(&[2, 30], 30, 32));
        assert!(bad(&[64], 32, 32));
        assert!(!bad(&[2, 32], 32, 32));
        assert!(Fp4Groups::new(
            DType::BF16,
            &[2, 32],
            32,
            Fp4Scale::E8m0,
            DType::U8,
            &s,
            32,
            false,
            false,
            false
        )
        .is_err());
    }

    /// ModelOpt's fused experts: `[matrices, rows / 2, cols]` bytes, row `2k` in
    /// the low nibble, scales per 16 rows of a column; element by element, and
    /// in chunks of row pairs.
    #[test]
    fn packed_down_the_columns() {
        let (m, rows, cols) = (2usize, 32usize, 3usize);
        let src: Vec<u8> = (0..m * rows / 2 * cols)
            .map(|k| (k * 37 % 251) as u8)
            .collect();
        let scales: Vec<u8> = (0..m * rows / 16 * cols).map(|k| 0x30 + k as u8).collect();
        let how = Fp4Scale::E4m3Times(0.25);
        let (u8, e4m3) = (DType::U8, DType::F8E4M3);
        let shape = [m as u64, rows as u64, cols as u64];
        let len = src.len();
        let g = Fp4Groups::new(u8, &shape, len, how, e4m3, &scales, 16, false, true, true);
        let g = g.unwrap();
        let n = m * rows * cols;
        let whole = values(&g, &src, 0, n);
        let table = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for e in 0..m {
            for r in 0..rows {
                for c in 0..cols {
                    let byte = src[(e * rows / 2 + r / 2) * cols + c];
                    let code = (byte >> (4 * (r % 2))) & 0xF;
                    let v = if code == 8 {
                        0.0
                    } else {
                        table[(code & 7) as usize]
                    };
                    let v = if code & 8 != 0 && code != 8 { -v } else { v };
                    let s = scalar::e4m3_to_f32(scales[(e * rows / 16 + r / 16) * cols + c]);
                    let want = v * (s * 0.25);
                    let got = whole[(e * rows + r) * cols + c];
                    assert_eq!(got.to_bits(), want.to_bits(), "[{e}, {r}, {c}]");
                }
            }
        }
        assert_eq!(g.align(), 2 * cols as u64);
        for (first, last) in [(0, 6), (6, 60), (90, 192), (186, 192)] {
            assert_eq!(
                values(&g, &src, first, last - first as usize),
                &whole[first as usize..last]
            );
        }
        assert!(Fp4Groups::new(
            u8,
            &[2, 24, 3],
            72,
            how,
            e4m3,
            &scales,
            16,
            false,
            true,
            true
        )
        .is_err());
    }
}
