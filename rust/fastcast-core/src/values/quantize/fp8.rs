//! Quantization to fp8 e4m3: what `--quantize` writes for a float weight, its
//! e4m3 values and their F32 scales, one per block of the weight seen as 2-D
//! (`[rows, cols]`, the last dimension being `cols`).
//!
//! Per block (DeepSeek/FineGrained `fp8`: 128 × 128; compressed-tensors'
//! `FP8_DYNAMIC`: one whole row), in fp32:
//!
//! - `amax = max |W|`, W exact in f32 (from f32, bf16 or f16); a NaN anywhere
//!   in the block makes it NaN, as torch's `amax` does;
//! - `s = max(amax, 1e-12) / 448` (torch's `amax.clamp(min=1e-12) / 448`:
//!   the clamp keeps NaN), the multiplier stored as the scale;
//! - `q = e4m3(clamp(W / s, -448, 448))`: an f32 division (not a product by
//!   the reciprocal), then the cast kernels' round to nearest even.
//!
//! Blocks cut by the edge of the weight cover its valid part only. The weight
//! and its scale are two plan tensors that both read the weight: each chunk of
//! either covers whole block-rows (`block.0` rows), and computes the amax of
//! the blocks it covers from the source bytes, so neither needs the other and
//! memory stays one chunk per worker.

use crate::cast::{self, scalar, CastOptions};
use crate::dtype::DType;
use crate::rules::loss::{LossRule, LossStats};
use crate::rules::scheme::as_2d;

/// Largest finite e4m3fn value: quantized values are clamped to ±448.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest amax a scale is computed from (an all-zero block gets a
/// tiny, positive scale rather than 0).
pub const MIN_AMAX: f32 = 1e-12;

/// The scale of a block whose largest magnitude is `amax`: `max(amax, 1e-12)
/// / 448`, in f32, NaN kept.
///
/// ```
/// use fastcast_core::values::quantize::fp8::scale;
/// assert_eq!(scale(448.0), 1.0);
/// assert_eq!(scale(0.0), 1e-12f32 / 448.0);
/// assert!(scale(f32::NAN).is_nan());
/// ```
#[inline]
pub fn scale(amax: f32) -> f32 {
    // f32::max would drop the NaN; torch's clamp keeps it.
    let clamped = if amax.is_nan() {
        amax
    } else {
        amax.max(MIN_AMAX)
    };
    clamped / E4M3_MAX
}

/// A checked quantization of one weight into blocks, ready to run chunk by
/// chunk (whole block-rows each).
#[derive(Debug, Clone)]
pub struct Fp8Blocks {
    from: DType,
    rows: u64,
    cols: u64,
    block_rows: u64,
    block_cols: u64,
    grid_cols: u64,
    /// Counts NaN, inf and the largest |x| of the input, as any cast does.
    source_rule: LossRule,
    /// Counts what rounding `W / s` to e4m3 loses (underflow to 0).
    values_rule: LossRule,
}

impl Fp8Blocks {
    /// Check the geometry: `from` is F32, BF16 or F16, `shape` the weight's,
    /// `block` non-empty. Errors are messages for the plan.
    pub fn new(from: DType, shape: &[u64], block: (u64, u64)) -> Result<Fp8Blocks, String> {
        if !matches!(from, DType::F32 | DType::BF16 | DType::F16) {
            return Err(format!(
                "fp8 quantization of a {from} tensor (needs F32, BF16 or F16)"
            ));
        }
        if shape.is_empty() {
            return Err("fp8 quantization of a 0-dimensional tensor".into());
        }
        let (rows, cols) = as_2d(shape);
        if rows == 0 || cols == 0 {
            return Err(format!("fp8 quantization of an empty tensor {shape:?}"));
        }
        let (block_rows, block_cols) = block;
        if block_rows == 0 || block_cols == 0 {
            return Err(format!("an empty block {block:?}"));
        }
        Ok(Fp8Blocks {
            from,
            rows,
            cols,
            block_rows,
            block_cols,
            grid_cols: cols.div_ceil(block_cols),
            source_rule: LossRule::new(from, DType::F32),
            values_rule: LossRule::new(DType::F32, DType::F8E4M3),
        })
    }

    /// The scale grid: `[ceil(rows / block.0), ceil(cols / block.1)]`.
    pub fn grid(&self) -> [u64; 2] {
        [self.rows.div_ceil(self.block_rows), self.grid_cols]
    }

    /// Elements of one block (whole: edge blocks may be cut).
    pub fn block_elements(&self) -> u64 {
        self.block_rows * self.block_cols
    }

    /// Elements of one whole block-row of the weight (chunks of the weight
    /// start on multiples of it).
    pub fn block_row_elements(&self) -> u64 {
        self.block_rows * self.cols
    }

    /// Source bytes of block-rows `[first, end)` (the last one may be cut by
    /// the weight's edge): where they start, and how many.
    pub fn block_rows_bytes(&self, first: u64, end: u64) -> (usize, usize) {
        let row_bytes = self.cols * self.from.size() as u64;
        let begin = (first * self.block_rows).min(self.rows);
        let stop = (end * self.block_rows).min(self.rows);
        (
            (begin * row_bytes) as usize,
            ((stop - begin) * row_bytes) as usize,
        )
    }

    /// The scales of the block-rows whose source bytes are `src` (whole
    /// rows, from the first row of a block-row), `grid_cols` per block-row,
    /// into `out`.
    pub fn scales(&self, src: &[u8], out: &mut [f32]) {
        let per_block_row = (self.block_row_elements() * self.from.size() as u64) as usize;
        for (rows, out) in src
            .chunks(per_block_row)
            .zip(out.chunks_exact_mut(self.grid_cols as usize))
        {
            self.block_row_scales(rows, out);
        }
    }

    /// The scales of one block-row (`src`: its rows' bytes).
    fn block_row_scales(&self, src: &[u8], out: &mut [f32]) {
        let size = self.from.size();
        let row_bytes = self.cols as usize * size;
        let block_bytes = self.block_cols as usize * size;
        let mut amax_bits = vec![0u32; out.len()];
        for row in src.chunks_exact(row_bytes) {
            for (m, segment) in amax_bits.iter_mut().zip(row.chunks(block_bytes)) {
                *m = (*m).max(abs_max_bits(self.from, segment));
            }
        }
        for (s, bits) in out.iter_mut().zip(amax_bits) {
            *s = scale(decode_abs(self.from, bits));
        }
    }

    /// Quantize block-rows: `src` holds the source bytes of output elements
    /// `first..` (a multiple of [`Self::block_row_elements`]), `out` their
    /// e4m3 bytes. `values` is the caller's scratch, resized to one f32 per
    /// element. Returns the loss counts: NaN, inf and largest |x| of the input,
    /// and what rounding each `W / s` to e4m3 loses.
    pub fn quantize(
        &self,
        src: &[u8],
        values: &mut Vec<u8>,
        out: &mut [u8],
        opts: &CastOptions,
    ) -> LossStats {
        let n = out.len();
        values.resize(4 * n, 0);
        // The source as f32, exactly (the cast kernels' widening).
        cast::cast(src, self.from, values, DType::F32, opts).expect("a float source widens to f32");
        let mut scales = vec![0f32; self.grid_cols as usize];
        let per_block_row = self.block_row_elements() as usize;
        let size = self.from.size();
        for (k, row_values) in values.chunks_mut(4 * per_block_row).enumerate() {
            let rows_src = &src[k * per_block_row * size..][..row_values.len() / 4 * size];
            self.block_row_scales(rows_src, &mut scales);
            for row in row_values.chunks_exact_mut(4 * self.cols as usize) {
                for (segment, &s) in row.chunks_mut(4 * self.block_cols as usize).zip(&scales) {
                    divide(segment, s);
                }
            }
        }
        let before = self.source_rule.scan(src);
        let after = self.values_rule.scan(values);
        cast::cast(values, DType::F32, out, DType::F8E4M3, opts).expect("f32 casts to e4m3");
        LossStats {
            elements: n as u64,
            overflow: after.overflow,
            underflow: after.underflow,
            nan_in: before.nan_in,
            inf_in: before.inf_in,
            max_abs: before.max_abs,
        }
    }
}

/// `x = clamp(x / s, -448, 448)` for each little-endian f32 of `values`
/// (NaN stays NaN, as torch's clamp keeps it).
#[inline]
fn divide(values: &mut [u8], s: f32) {
    for v in values.chunks_exact_mut(4) {
        let x = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        v.copy_from_slice(&(x / s).clamp(-E4M3_MAX, E4M3_MAX).to_le_bytes());
    }
}

/// The largest magnitude of `src` (elements of `from`) as its absolute bit
/// pattern, widened to u32: magnitudes order as their bits do, and a NaN's
/// bits exceed every other value's, so a NaN wins as torch's amax lets it.
#[inline]
fn abs_max_bits(from: DType, src: &[u8]) -> u32 {
    match from {
        DType::F32 => src
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF)
            .fold(0, u32::max),
        _ => u32::from(
            src.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7FFF)
                .fold(0, u16::max),
        ),
    }
}

/// The f32 value of absolute bits of `from` (NaN bits give NaN).
#[inline]
fn decode_abs(from: DType, bits: u32) -> f32 {
    match from {
        DType::F32 => f32::from_bits(bits),
        DType::BF16 => scalar::bf16_to_f32(bits as u16),
        _ => scalar::f16_to_f32(bits as u16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::Kernel;

    fn exact() -> CastOptions {
        CastOptions {
            kernel: Kernel::Scalar,
            ..CastOptions::default()
        }
    }

    /// The reference, element by element, as the spec's torch formula reads.
    fn reference(
        w: &[f32],
        rows: usize,
        cols: usize,
        block: (usize, usize),
    ) -> (Vec<u8>, Vec<f32>) {
        let (br, bc) = block;
        let (gr, gc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut s = vec![0f32; gr * gc];
        for (b, s) in s.iter_mut().enumerate() {
            let (bi, bj) = (b / gc, b % gc);
            let mut amax = 0f32;
            for i in bi * br..((bi + 1) * br).min(rows) {
                for j in bj * bc..((bj + 1) * bc).min(cols) {
                    let a = w[i * cols + j].abs();
                    amax = if a.is_nan() || amax.is_nan() {
                        f32::NAN
                    } else {
                        amax.max(a)
                    };
                }
            }
            let clamped = if amax.is_nan() { amax } else { amax.max(1e-12) };
            *s = clamped / 448.0;
        }
        let q = (0..rows * cols)
            .map(|k| {
                let (i, j) = (k / cols, k % cols);
                let x = (w[k] / s[(i / br) * gc + j / bc]).clamp(-448.0, 448.0);
                scalar::f32_to_e4m3(x, scalar::Fp8Overflow::Saturate)
            })
            .collect();
        (q, s)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| scalar::f32_to_bf16(x).to_le_bytes())
            .collect()
    }

    /// Quantize all of `src` in chunks of `per_chunk` block-rows, as the
    /// executor does; the q bytes and the scales (computed apart).
    fn chunked(q: &Fp8Blocks, src: &[u8], per_chunk: u64) -> (Vec<u8>, Vec<f32>, LossStats) {
        let [gr, gc] = q.grid();
        let mut out = vec![0u8; (q.rows * q.cols) as usize];
        let mut scales = vec![0f32; (gr * gc) as usize];
        let mut values = Vec::new();
        let mut loss = LossStats::default();
        let mut first = 0;
        while first < gr {
            let end = (first + per_chunk).min(gr);
            let (at, len) = q.block_rows_bytes(first, end);
            let size = q.from.size();
            let part = &src[at..at + len];
            let o = &mut out[at / size..(at + len) / size];
            loss.merge(&q.quantize(part, &mut values, o, &exact()));
            q.scales(
                part,
                &mut scales[(first * gc) as usize..(end * gc) as usize],
            );
            first = end;
        }
        (out, scales, loss)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn weight(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|k| {
                let x = ((k as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32;
                (x - 0.5) * if k % 37 == 0 { 3.0 } else { 0.04 }
            })
            .collect()
    }

    #[test]
    fn amax_scale_and_q_match_the_reference_in_any_block_row_chunking() {
        // 5 x 7 in 2 x 3 blocks: a 3 x 3 grid whose last row and column of
        // blocks are cut by the edge.
        for (rows, cols, block) in [(5, 7, (2, 3)), (6, 4, (1, 4)), (256, 384, (128, 128))] {
            let w = weight(rows, cols, 7);
            let (want_q, want_s) = reference(&w, rows, cols, block);
            let q = Fp8Blocks::new(
                DType::F32,
                &[rows as u64, cols as u64],
                (block.0 as u64, block.1 as u64),
            )
            .unwrap();
            let [gr, _] = q.grid();
            for per_chunk in 1..=gr {
                let (got_q, got_s, loss) = chunked(&q, &f32_bytes(&w), per_chunk);
                assert_eq!(
                    got_q, want_q,
                    "{rows}x{cols} {block:?}, {per_chunk} block-rows"
                );
                assert_eq!(bits(&got_s), bits(&want_s), "{rows}x{cols} {block:?}");
                assert_eq!(loss.elements, (rows * cols) as u64);
                assert_eq!(loss.overflow, 0, "nothing overflows after the clamp");
            }
        }
    }

    #[test]
    fn every_block_holds_448_at_its_largest_magnitude() {
        let w = weight(8, 12, 3);
        let q = Fp8Blocks::new(DType::F32, &[8, 12], (4, 6)).unwrap();
        let (got, _, _) = chunked(&q, &f32_bytes(&w), 1);
        for bi in 0..2 {
            for bj in 0..2 {
                let block: Vec<u8> = (bi * 4..bi * 4 + 4)
                    .flat_map(|i| (bj * 6..bj * 6 + 6).map(move |j| i * 12 + j))
                    .map(|k| got[k] & 0x7F)
                    .collect();
                assert_eq!(block.iter().max(), Some(&0x7E), "block {bi} {bj}");
            }
        }
    }

    #[test]
    fn bf16_and_f16_sources_are_read_exactly() {
        let w: Vec<f32> = weight(4, 16, 9)
            .iter()
            .map(|&x| scalar::bf16_to_f32(scalar::f32_to_bf16(x)))
            .collect();
        let (want_q, want_s) = reference(&w, 4, 16, (1, 16));
        let q = Fp8Blocks::new(DType::BF16, &[4, 16], (1, 16)).unwrap();
        let (got_q, got_s, _) = chunked(&q, &bf16_bytes(&w), 3);
        assert_eq!((got_q, bits(&got_s)), (want_q, bits(&want_s)));
        let w: Vec<f32> = weight(4, 16, 2)
            .iter()
            .map(|&x| scalar::f16_to_f32(scalar::f32_to_f16(x)))
            .collect();
        let f16: Vec<u8> = w
            .iter()
            .flat_map(|&x| scalar::f32_to_f16(x).to_le_bytes())
            .collect();
        let (want_q, want_s) = reference(&w, 4, 16, (2, 8));
        let q = Fp8Blocks::new(DType::F16, &[4, 16], (2, 8)).unwrap();
        let (got_q, got_s, _) = chunked(&q, &f16, 1);
        assert_eq!((got_q, bits(&got_s)), (want_q, bits(&want_s)));
    }

    #[test]
    fn a_zero_block_gets_the_clamped_scale_and_zeros() {
        let mut w = weight(4, 4, 1);
        w[..8].fill(0.0); // the first block-row of (2, 4) blocks
        w[1] = -0.0;
        let q = Fp8Blocks::new(DType::F32, &[4, 4], (2, 4)).unwrap();
        let (got_q, got_s, loss) = chunked(&q, &f32_bytes(&w), 2);
        assert_eq!(got_s[0], 1e-12f32 / 448.0);
        assert_eq!(&got_q[..8], &[0, 0x80, 0, 0, 0, 0, 0, 0]);
        assert_eq!(loss.underflow, 0, "zeros are not lost");
    }

    #[test]
    fn nan_makes_its_block_nan_and_inf_its_block_zero() {
        let mut w = weight(4, 6, 5);
        w[1] = f32::NAN; // block (0, 0) of (2, 3) blocks
        w[3 * 6 + 4] = f32::INFINITY; // block (1, 1)
        let q = Fp8Blocks::new(DType::F32, &[4, 6], (2, 3)).unwrap();
        let (got_q, got_s, loss) = chunked(&q, &f32_bytes(&w), 1);
        let (want_q, want_s) = reference(&w, 4, 6, (2, 3));
        assert!(got_s[0].is_nan() && want_s[0].is_nan());
        assert_eq!(got_s[3], f32::INFINITY);
        let nan = |b: u8| b & 0x7F == 0x7F;
        for k in 0..24 {
            let (i, j) = (k / 6, k % 6);
            match (i / 2, j / 3) {
                (0, 0) => assert!(nan(got_q[k]) && nan(want_q[k]), "{k}"),
                (1, 1) if k == 3 * 6 + 4 => assert!(nan(got_q[k]), "inf / inf"),
                (1, 1) => assert_eq!(got_q[k] & 0x7F, 0, "x / inf is 0"),
                _ => assert_eq!(got_q[k], want_q[k], "{k}"),
            }
        }
        assert_eq!(bits(&got_s[1..3]), bits(&want_s[1..3]));
        // The input's NaN and inf are counted once each. Loss is counted on
        // W / s: the inf block's values are 0 before rounding, not lost by it.
        assert_eq!((loss.nan_in, loss.inf_in), (1, 1));
        assert_eq!(loss.underflow, 0);
        assert_eq!(
            loss.max_abs,
            w.iter()
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs())) as f64
        );
    }

    #[test]
    fn tiny_values_beside_a_large_one_underflow_and_are_counted() {
        let mut w = vec![1e-6f32; 8];
        w[0] = 100.0; // s = 100 / 448: 1e-6 / s is far below e4m3's 2^-9
        let q = Fp8Blocks::new(DType::F32, &[1, 8], (1, 8)).unwrap();
        let (got, _, loss) = chunked(&q, &f32_bytes(&w), 1);
        assert_eq!(got[0], 0x7E);
        assert!(got[1..].iter().all(|&b| b == 0));
        assert_eq!(loss.underflow, 7);
    }

    #[test]
    fn the_geometry_is_checked() {
        assert!(Fp8Blocks::new(DType::F8E4M3, &[4, 4], (2, 2))
            .unwrap_err()
            .contains("needs F32, BF16 or F16"));
        assert!(Fp8Blocks::new(DType::F32, &[4, 4], (0, 2)).is_err());
        assert!(Fp8Blocks::new(DType::F32, &[], (1, 1)).is_err());
        let q = Fp8Blocks::new(DType::BF16, &[2, 3, 5], (4, 2)).unwrap();
        assert_eq!(q.grid(), [2, 3], "seen as 6 x 5");
        assert_eq!(
            q.block_rows_bytes(1, 2),
            (40, 20),
            "the last block-row is cut"
        );
    }
}
