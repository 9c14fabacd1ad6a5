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
    /// The largest |W / s| bits that round to 0 in e4m3 (what its loss rule
    /// counts as underflow; nothing overflows, the values being clamped).
    underflow_bits: u32,
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
            underflow_bits: LossRule::new(DType::F32, DType::F8E4M3)
                .underflow_bits()
                .map_or(0, |b| b as u32),
        })
    }

    /// Whether `other` cuts the same weight into the same blocks (so finds
    /// the same scales from the same bytes).
    pub fn same_blocks(&self, other: &Fp8Blocks) -> bool {
        (
            self.from,
            self.rows,
            self.cols,
            self.block_rows,
            self.block_cols,
        ) == (
            other.from,
            other.rows,
            other.cols,
            other.block_rows,
            other.block_cols,
        )
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

    /// The scales of one block-row (`src`: its rows' bytes); returns the
    /// largest magnitude's bits among them (see [`abs_max_bits`]).
    fn block_row_scales(&self, src: &[u8], out: &mut [f32]) -> u32 {
        let size = self.from.size();
        let row_bytes = self.cols as usize * size;
        let block_bytes = self.block_cols as usize * size;
        let mut amax_bits = vec![0u32; out.len()];
        for row in src.chunks_exact(row_bytes) {
            for (m, segment) in amax_bits.iter_mut().zip(row.chunks(block_bytes)) {
                *m = (*m).max(abs_max_bits(self.from, segment));
            }
        }
        let mut top = 0;
        for (s, bits) in out.iter_mut().zip(amax_bits) {
            *s = scale(decode_abs(self.from, bits));
            top = top.max(bits);
        }
        top
    }

    /// Quantize block-rows: `src` holds the source bytes of output elements
    /// `first..` (a multiple of [`Self::block_row_elements`]), `out` their
    /// e4m3 bytes, `scales` their scales (`grid_cols` per block-row, the
    /// numbers [`Self::scales`] gives). `values` is the caller's scratch,
    /// resized to one f32 per element of a row. Returns the loss
    /// counts: NaN, inf and largest |x| of the input, and what rounding each
    /// `W / s` to e4m3 loses.
    ///
    /// One block-row at a time, every step of it before the next: its bytes
    /// come from memory once (for the amax) and stay in the CPU's caches for
    /// the widening, the division, the counts and the rounding, which go a
    /// row at a time. Done a chunk (several MB) at a time, each step had read
    /// the chunk from memory again.
    pub fn quantize(
        &self,
        src: &[u8],
        values: &mut Vec<u8>,
        out: &mut [u8],
        scales: &mut [f32],
        opts: &CastOptions,
    ) -> LossStats {
        let size = self.from.size();
        let per_block_row = self.block_row_elements() as usize;
        let block = 4 * self.block_cols as usize;
        let (mut before, mut underflow) = (LossStats::default(), 0);
        // Each block-row goes row by row: a row's f32 values (16 KiB for 4096
        // columns) stay in L1 from the widening through the division to the
        // rounding, where a block-row's (2 MiB) went out to L3 and back twice.
        let cols = self.cols as usize;
        values.resize(4 * cols, 0);
        let row_values = &mut values[..4 * cols];
        let block_rows = src
            .chunks(per_block_row * size)
            .zip(out.chunks_mut(per_block_row))
            .zip(scales.chunks_exact_mut(self.grid_cols as usize));
        for ((rows_src, rows_out), row_scales) in block_rows {
            let top = self.block_row_scales(rows_src, row_scales);
            if u64::from(top) < self.source_rule.finite_end() {
                // No NaN or inf here, and the largest |x| is known: the
                // source's count (a pass over it) would find just that.
                let largest = decode_abs(self.from, top) as f64;
                before.max_abs = before.max_abs.max(largest);
            } else {
                before.merge(&self.source_rule.scan(rows_src));
            }
            let rows = rows_src
                .chunks_exact(cols * size)
                .zip(rows_out.chunks_exact_mut(cols));
            for (row_src, row_out) in rows {
                let from = if self.from == DType::F32 {
                    // Already f32: divided straight from the source, not copied first.
                    Some(row_src)
                } else {
                    // The source as f32, exactly (the cast kernels' widening).
                    cast::cast(row_src, self.from, row_values, DType::F32, opts)
                        .expect("a float source widens to f32");
                    None
                };
                underflow += divide_rows(
                    from,
                    row_values,
                    4 * cols,
                    block,
                    row_scales,
                    self.underflow_bits,
                );
                cast::cast(row_values, DType::F32, row_out, DType::F8E4M3, opts)
                    .expect("f32 casts to e4m3");
            }
        }
        LossStats {
            elements: out.len() as u64,
            overflow: 0,
            underflow,
            nan_in: before.nan_in,
            inf_in: before.inf_in,
            max_abs: before.max_abs,
        }
    }
}

/// Divide each row (`row_bytes` of f32) of a block-row's values, a block
/// (`block` bytes) at a time, by its block's scale in `scales`: the values
/// read from `from` (an f32 source) when given, else divided in place.
/// Returns how many of them round to 0 in e4m3 though not 0 (|v| bits from 1
/// to `under`): counted on the way, not by a pass of their own.
///
/// Compiled again for the widest vectors the CPU has: an IEEE division is
/// correctly rounded at any width, so every tier gives the same bits. With
/// SSE only it was a sixth of a quantization's CPU.
fn divide_rows(
    from: Option<&[u8]>,
    values: &mut [u8],
    row_bytes: usize,
    block: usize,
    scales: &[f32],
    under: u32,
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { divide_rows_avx512(from, values, row_bytes, block, scales, under) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { divide_rows_avx2(from, values, row_bytes, block, scales, under) };
    }
    divide_rows_portable(from, values, row_bytes, block, scales, under)
}

/// [`divide_rows`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn divide_rows_avx512(
    from: Option<&[u8]>,
    values: &mut [u8],
    row_bytes: usize,
    block: usize,
    scales: &[f32],
    under: u32,
) -> u64 {
    divide_rows_portable(from, values, row_bytes, block, scales, under)
}

/// [`divide_rows`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn divide_rows_avx2(
    from: Option<&[u8]>,
    values: &mut [u8],
    row_bytes: usize,
    block: usize,
    scales: &[f32],
    under: u32,
) -> u64 {
    divide_rows_portable(from, values, row_bytes, block, scales, under)
}

#[inline(always)]
fn divide_rows_portable(
    from: Option<&[u8]>,
    values: &mut [u8],
    row_bytes: usize,
    block: usize,
    scales: &[f32],
    under: u32,
) -> u64 {
    let rows = values.chunks_exact_mut(row_bytes);
    let mut underflow = 0;
    match from {
        Some(src) => {
            for (row_src, row) in src.chunks_exact(row_bytes).zip(rows) {
                let segments = row_src.chunks(block).zip(row.chunks_mut(block));
                for ((from, to), &s) in segments.zip(scales) {
                    underflow += u64::from(divide_into(from, to, s, under));
                }
            }
        }
        None => {
            for row in rows {
                for (segment, &s) in row.chunks_mut(block).zip(scales) {
                    underflow += u64::from(divide(segment, s, under));
                }
            }
        }
    }
    underflow
}

/// `clamp(x / s, -448, 448)` (NaN stays NaN, as torch's clamp keeps it), and
/// 1 when its |bits| are from 1 to `under` (it rounds to 0), as one unsigned
/// comparison, the loss rule's.
#[inline(always)]
fn quotient(x: f32, s: f32, under: u32) -> (f32, u32) {
    let q = (x / s).clamp(-E4M3_MAX, E4M3_MAX);
    let lost = ((q.to_bits() & 0x7FFF_FFFF).wrapping_sub(1) < under) as u32;
    (q, lost)
}

/// `to = quotient(from, s)` for each little-endian f32 of `from`: [`divide`],
/// out of place.
#[inline(always)]
fn divide_into(from: &[u8], to: &mut [u8], s: f32, under: u32) -> u32 {
    let mut lost = 0;
    for (x, v) in from.chunks_exact(4).zip(to.chunks_exact_mut(4)) {
        let (q, l) = quotient(f32::from_le_bytes([x[0], x[1], x[2], x[3]]), s, under);
        v.copy_from_slice(&q.to_le_bytes());
        lost += l;
    }
    lost
}

/// `x = quotient(x, s)` for each little-endian f32 of `values`; how many round
/// to 0.
#[inline(always)]
fn divide(values: &mut [u8], s: f32, under: u32) -> u32 {
    let mut lost = 0;
    for v in values.chunks_exact_mut(4) {
        let (q, l) = quotient(f32::from_le_bytes([v[0], v[1], v[2], v[3]]), s, under);
        v.copy_from_slice(&q.to_le_bytes());
        lost += l;
    }
    lost
}

/// The largest magnitude of `src` (elements of `from`) as its absolute bit
/// pattern, widened to u32: magnitudes order as their bits do, and a NaN's
/// bits exceed every other value's, so a NaN wins as torch's amax lets it.
///
/// Lanes of a fixed-size accumulator, so that the compiler keeps the loop in
/// vector registers: written as a fold over the elements, it compiled to a
/// byte-by-byte scalar loop that was half of a quantization's CPU. Sign-cleared
/// bits are non-negative as signed integers, whose max SSE2 has.
#[inline]
fn abs_max_bits(from: DType, src: &[u8]) -> u32 {
    match from {
        DType::F32 => {
            let mut lanes = [0i32; 16];
            let mut blocks = src.chunks_exact(64);
            for block in &mut blocks {
                // SAFETY: `block` is 64 bytes; an unaligned read of 16 i32.
                let words: [i32; 16] = unsafe { std::ptr::read_unaligned(block.as_ptr().cast()) };
                for (lane, w) in lanes.iter_mut().zip(words) {
                    *lane = (*lane).max(i32::from_le(w) & 0x7FFF_FFFF);
                }
            }
            let rest = blocks.remainder().chunks_exact(4);
            let rest = rest.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF);
            lanes.into_iter().chain(rest).fold(0, i32::max) as u32
        }
        _ => {
            let mut lanes = [0i16; 32];
            let mut blocks = src.chunks_exact(64);
            for block in &mut blocks {
                // SAFETY: `block` is 64 bytes; an unaligned read of 32 i16.
                let halves: [i16; 32] = unsafe { std::ptr::read_unaligned(block.as_ptr().cast()) };
                for (lane, h) in lanes.iter_mut().zip(halves) {
                    *lane = (*lane).max(i16::from_le(h) & 0x7FFF);
                }
            }
            let rest = blocks.remainder().chunks_exact(2);
            let rest = rest.map(|b| i16::from_le_bytes([b[0], b[1]]) & 0x7FFF);
            lanes.into_iter().chain(rest).fold(0, i16::max) as u32
        }
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
            let found = &mut scales[(first * gc) as usize..(end * gc) as usize];
            loss.merge(&q.quantize(part, &mut values, o, found, &exact()));
            // The scales alone, from the same bytes: the same numbers.
            let mut apart = vec![0f32; found.len()];
            q.scales(part, &mut apart);
            assert_eq!(bits(&apart), bits(found), "block-rows {first}..{end}");
            first = end;
        }
        // The input's NaN, inf and largest |x|: what a count over all of it finds.
        let whole = LossRule::new(q.from, DType::F32).scan(src);
        assert_eq!(
            (loss.nan_in, loss.inf_in, loss.max_abs.to_bits()),
            (whole.nan_in, whole.inf_in, whole.max_abs.to_bits()),
            "the source's counts"
        );
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

    /// Half-width sources with NaN and inf in some block-rows and not others:
    /// each counted once, the largest finite |x| found wherever it is.
    #[test]
    fn half_width_nan_and_inf_are_counted_in_any_block_row() {
        let w = weight(6, 8, 4);
        for (from, inf) in [(DType::BF16, 0x7F80u16), (DType::F16, 0x7C00)] {
            let narrow = |x: f32| match from {
                DType::BF16 => scalar::f32_to_bf16(x),
                _ => scalar::f32_to_f16(x),
            };
            let mut h: Vec<u16> = w.iter().map(|&x| narrow(x)).collect();
            h[9] = inf | 0x8000; // -inf in block-row 0 of (2, 4) blocks
            h[20] = inf | 1; // a NaN in block-row 1; block-row 2 is finite
            h[41] = narrow(-7.5); // the largest finite |x|, in block-row 2
            let bytes: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
            let q = Fp8Blocks::new(from, &[6, 8], (2, 4)).unwrap();
            for per_chunk in 1..=3 {
                let (_, _, loss) = chunked(&q, &bytes, per_chunk);
                assert_eq!((loss.nan_in, loss.inf_in, loss.max_abs), (1, 1, 7.5));
            }
        }
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

    /// The lane-wise amax against the plain fold, on every length around
    /// the lanes' width and on bits of every class (negative, NaN, inf, -0).
    #[test]
    fn abs_max_bits_is_the_plain_fold_at_any_length() {
        let mut x = 0x9E37_79B9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let specials = [0x7FC0_0000u32, 0xFF80_0000, 0x8000_0000, 0x7F80_0000];
        for len in (0..70).chain([127, 128, 129, 500]) {
            for round in 0..4 {
                let mut words: Vec<u32> = (0..len).map(|_| next()).collect();
                if round > 0 && len > 0 {
                    let at = next() as usize % len;
                    words[at] = specials[round - 1];
                }
                let f32s: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let want = words.iter().map(|w| w & 0x7FFF_FFFF).fold(0, u32::max);
                assert_eq!(abs_max_bits(DType::F32, &f32s), want, "f32 x{len}");
                let halves: Vec<u16> = words.iter().map(|&w| (w >> 16) as u16).collect();
                let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
                let want = halves.iter().map(|h| h & 0x7FFF).fold(0, u16::max);
                for from in [DType::BF16, DType::F16] {
                    assert_eq!(abs_max_bits(from, &bytes), u32::from(want), "{from} x{len}");
                }
            }
        }
    }

    /// Every tier of the division gives the scalar reference's bits, in place
    /// and from a source, with NaN, inf, zero and tiny scales among them, and
    /// counts what rounds to 0 as the loss rule's pass over the values does.
    #[test]
    fn every_division_tier_gives_the_same_bits_and_counts() {
        let (rows, cols, block) = (3, 37, 4 * 8);
        let mut w = weight(rows, cols, 11);
        w[5] = f32::NAN;
        w[40] = f32::NEG_INFINITY;
        w[41] = -0.0;
        for k in (60..100).step_by(3) {
            w[k] = (k as f32 - 80.0) * 1e-5; // some round to 0 once divided
        }
        let src = f32_bytes(&w);
        let scales = [0.5f32, f32::NAN, 1e-14, f32::INFINITY, 3.0];
        let quotients: Vec<f32> = w
            .chunks(cols)
            .flat_map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(j, &x)| (x / scales[j / 8]).clamp(-E4M3_MAX, E4M3_MAX))
                    .collect::<Vec<_>>()
            })
            .collect();
        let want = f32_bytes(&quotients);
        let lost = LossRule::new(DType::F32, DType::F8E4M3)
            .scan(&want)
            .underflow;
        assert!(lost > 0, "the case has values that round to 0");
        let under = Fp8Blocks::new(DType::F32, &[1, 1], (1, 1))
            .unwrap()
            .underflow_bits;
        type Tier = fn(Option<&[u8]>, &mut [u8], usize, usize, &[f32], u32) -> u64;
        let mut tiers: Vec<(&str, Tier)> = vec![("portable", divide_rows_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                tiers.push(("avx2", |f, v, r, b, s, u| unsafe {
                    divide_rows_avx2(f, v, r, b, s, u)
                }));
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                tiers.push(("avx512", |f, v, r, b, s, u| unsafe {
                    divide_rows_avx512(f, v, r, b, s, u)
                }));
            }
        }
        for (name, tier) in tiers {
            let mut values = vec![0u8; src.len()];
            let counted = tier(Some(&src), &mut values, 4 * cols, block, &scales, under);
            assert_eq!((&values, counted), (&want, lost), "{name}, from the source");
            let mut values = src.clone();
            let counted = tier(None, &mut values, 4 * cols, block, &scales, under);
            assert_eq!((&values, counted), (&want, lost), "{name}, in place");
        }
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
