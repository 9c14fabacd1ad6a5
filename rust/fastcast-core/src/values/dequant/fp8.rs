//! fp8 (DeepSeek/FineGrained blocks, compressed-tensors, FBGEMM, vLLM): e4m3
//! or e5m2 codes times one f32 scale per block of the 2-D weight.

use crate::cast::scalar;
use crate::dtype::DType;

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
    pub(super) fn new(
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
