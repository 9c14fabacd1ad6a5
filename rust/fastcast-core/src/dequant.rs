//! Dequantization: a quantized weight's values, computed as its reference
//! implementations compute them, for the executor to round once to the target.
//!
//! fp8 (DeepSeek/FineGrained block, compressed-tensors, FBGEMM, vLLM): the
//! weight seen as 2-D `[rows, cols]` (the last dimension is `cols`) holds
//! e4m3 values, and each `block.0` × `block.1` block has one scale, the
//! multiplier (`weight_scale_inv` too, despite its name). A value is
//! `f32(q) * f32(scale)`, an IEEE fp32 product, as DeepSeek's
//! `weight_dequant` and compressed-tensors compute it; the executor then
//! rounds it once to the target. The scale grid is `ceil(rows / block.0)` ×
//! `ceil(cols / block.1)`, so partial edge blocks are indexed, never
//! inferred from the grid. A per-tensor scale is one block of the whole
//! weight; a per-row (per-channel) scale is a block of one row.

use serde::Deserialize;

use crate::cast::scalar;
use crate::dtype::DType;

/// How a planned tensor's values are reconstructed from quantized storage.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dequant {
    /// e4m3 (or e5m2) values times one scale per block of the 2-D weight.
    Fp8Scaled {
        /// The scale tensor.
        scale: Operand,
        /// Rows and columns of the weight each scale covers.
        block: (u64, u64),
    },
}

/// Another tensor a dequantization reads (a scale...), anywhere in the inputs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Operand {
    /// Its name, for messages.
    pub name: String,
    /// Index into the plan's sources.
    pub source: usize,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// `[begin, end)` in the source file, header included.
    pub offsets: (u64, u64),
}

/// A checked fp8 dequantization, its scales decoded to f32 once (a grid of
/// blocks, or one per row: small next to the weight).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Scales {
    /// Every fp8 code's value.
    values: [f32; 256],
    cols: u64,
    block_rows: u64,
    block_cols: u64,
    grid_cols: u64,
    scales: Vec<f32>,
}

impl Fp8Scales {
    /// Check the geometry and decode the scales. `shape` is the weight's,
    /// `scale` the scale tensor's bytes. Errors are messages for the plan.
    pub fn new(
        from: DType,
        shape: &[u64],
        block: (u64, u64),
        scale_dtype: DType,
        scale_shape: &[u64],
        scale: &[u8],
    ) -> Result<Fp8Scales, String> {
        if !matches!(from, DType::F8E4M3 | DType::F8E5M2) {
            return Err(format!("fp8 dequantization of a {from} tensor"));
        }
        if !matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(format!("a {scale_dtype} scale (expected F32, BF16 or F16)"));
        }
        let (Some(&cols), rows) = (shape.last(), shape.iter().rev().skip(1).product::<u64>())
        else {
            return Err("a 0-dimensional weight".into());
        };
        let (block_rows, block_cols) = block;
        if block_rows == 0 || block_cols == 0 {
            return Err(format!("an empty block {block:?}"));
        }
        let grid_rows = rows.div_ceil(block_rows);
        let grid_cols = cols.div_ceil(block_cols);
        let numel: u64 = scale_shape.iter().product();
        if numel != grid_rows * grid_cols || (rows * cols == 0 && numel > 1) {
            return Err(format!(
                "a scale of shape {scale_shape:?} for a {rows}x{cols} weight in \
                 {block_rows}x{block_cols} blocks (needs {grid_rows}x{grid_cols})"
            ));
        }
        if scale.len() as u64 != numel * scale_dtype.size() as u64 {
            return Err(format!(
                "{} scale bytes for {numel} {scale_dtype}",
                scale.len()
            ));
        }
        let scales = match scale_dtype {
            DType::F32 => scale
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => scale
                .chunks_exact(2)
                .map(|b| scalar::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            _ => scale
                .chunks_exact(2)
                .map(|b| scalar::f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        };
        let decode: fn(u8) -> f32 = match from {
            DType::F8E4M3 => scalar::e4m3_to_f32,
            _ => scalar::e5m2_to_f32,
        };
        Ok(Fp8Scales {
            values: std::array::from_fn(|code| decode(code as u8)),
            cols,
            block_rows,
            block_cols,
            grid_cols,
            scales,
        })
    }

    /// Values of elements `first..first + q.len()` (row-major) into `out`,
    /// as little-endian f32 (4 bytes each), ready for the cast kernels.
    pub fn dequantize(&self, q: &[u8], first: u64, out: &mut [u8]) {
        debug_assert_eq!(4 * q.len(), out.len());
        // Walk row segments: within one, the scale changes every block_cols.
        let mut k = 0usize;
        while k < q.len() {
            let index = first + k as u64;
            let (row, col) = (index / self.cols, index % self.cols);
            let scale_row = (row / self.block_rows) * self.grid_cols;
            let in_row = ((self.cols - col) as usize).min(q.len() - k);
            let mut c = col;
            let end = k + in_row;
            while k < end {
                let run_end = ((c / self.block_cols + 1) * self.block_cols).min(self.cols);
                let n = ((run_end - c) as usize).min(end - k);
                let s = self.scales[(scale_row + c / self.block_cols) as usize];
                for (o, &b) in out[4 * k..4 * (k + n)]
                    .chunks_exact_mut(4)
                    .zip(&q[k..k + n])
                {
                    o.copy_from_slice(&(self.values[b as usize] * s).to_le_bytes());
                }
                k += n;
                c += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e4m3(x: f32) -> u8 {
        scalar::f32_to_e4m3(x, scalar::Fp8Overflow::Saturate)
    }

    /// The reference, element by element: fp32(q[i, j]) * s[i / br, j / bc].
    fn reference(q: &[u8], rows: u64, cols: u64, block: (u64, u64), s: &[f32]) -> Vec<f32> {
        let grid_cols = cols.div_ceil(block.1);
        (0..rows * cols)
            .map(|k| {
                let (i, j) = (k / cols, k % cols);
                scalar::e4m3_to_f32(q[k as usize])
                    * s[((i / block.0) * grid_cols + j / block.1) as usize]
            })
            .collect()
    }

    fn scales_bytes(s: &[f32]) -> Vec<u8> {
        s.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Dequantize all of `q` at once, back as f32 values.
    fn all(d: &Fp8Scales, q: &[u8]) -> Vec<f32> {
        let mut out = vec![0u8; 4 * q.len()];
        d.dequantize(q, 0, &mut out);
        floats(&out)
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn partial_edge_blocks_and_any_chunking_match_the_reference() {
        let (rows, cols, block) = (5u64, 7u64, (2u64, 3u64)); // grid 3 x 3, edges partial
        let q: Vec<u8> = (0..rows * cols)
            .map(|k| e4m3((k as f32 - 17.0) / 3.0))
            .collect();
        let s: Vec<f32> = (0..9).map(|i| 0.5 + i as f32 * 0.125).collect();
        let d = Fp8Scales::new(
            DType::F8E4M3,
            &[rows, cols],
            block,
            DType::F32,
            &[3, 3],
            &scales_bytes(&s),
        )
        .unwrap();
        let want = reference(&q, rows, cols, block, &s);
        for chunk in [1usize, 2, 3, 6, 7, 11, 35] {
            let mut bytes = vec![0u8; 4 * q.len()];
            for start in (0..q.len()).step_by(chunk) {
                let end = (start + chunk).min(q.len());
                d.dequantize(&q[start..end], start as u64, &mut bytes[4 * start..4 * end]);
            }
            let got = floats(&bytes);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn per_tensor_and_per_row_scales_are_blocks_too() {
        let q: Vec<u8> = (0..12).map(|k| e4m3(k as f32)).collect();
        let one = Fp8Scales::new(
            DType::F8E4M3,
            &[3, 4],
            (3, 4),
            DType::F32,
            &[],
            &2f32.to_le_bytes(),
        )
        .unwrap();
        assert_eq!(
            all(&one, &q),
            (0..12).map(|k| k as f32 * 2.0).collect::<Vec<_>>()
        );
        let rows = [1f32, 10.0, 100.0];
        let per_row = Fp8Scales::new(
            DType::F8E4M3,
            &[3, 4],
            (1, 4),
            DType::F32,
            &[3, 1],
            &scales_bytes(&rows),
        )
        .unwrap();
        let out = all(&per_row, &q);
        assert_eq!(out[5], 5.0 * 10.0);
        assert_eq!(out[11], 11.0 * 100.0);
    }

    #[test]
    fn bf16_scales_decode_exactly() {
        let s = scalar::f32_to_bf16(0.0078125); // 2^-7, exact in bf16
        let d = Fp8Scales::new(
            DType::F8E4M3,
            &[1, 2],
            (1, 2),
            DType::BF16,
            &[1],
            &s.to_le_bytes(),
        )
        .unwrap();
        assert_eq!(
            all(&d, &[e4m3(448.0), e4m3(-3.0)]),
            [448.0 * 0.0078125, -3.0 * 0.0078125]
        );
    }

    #[test]
    fn wrong_geometry_is_refused_with_the_shapes() {
        let err = Fp8Scales::new(
            DType::F8E4M3,
            &[576, 320],
            (128, 128),
            DType::F32,
            &[4, 3],
            &[0; 48],
        )
        .unwrap_err();
        assert!(err.contains("[4, 3]") && err.contains("needs 5x3"), "{err}");
        assert!(
            Fp8Scales::new(DType::BF16, &[2, 2], (1, 1), DType::F32, &[2, 2], &[0; 16]).is_err()
        );
        assert!(Fp8Scales::new(
            DType::F8E4M3,
            &[2, 2],
            (0, 1),
            DType::F32,
            &[2, 2],
            &[0; 16]
        )
        .is_err());
    }
}
