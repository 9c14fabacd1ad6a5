//! bitsandbytes LLM.int8: I8 rows times their F32 `SCB` over 127.

use super::{f32_at, Bytes};
use crate::dtype::DType;

/// bitsandbytes' multiplier for LLM.int8 (`int8_vectorwise_dequant`): the
/// reciprocal of 127 as the Python float it writes, an f32 in torch's product.
pub(super) const RECIPROCAL_127: f32 = 7.874015718698502e-3_f64 as f32;

/// bitsandbytes LLM.int8: one F32 `SCB` per row.
#[derive(Debug, Clone)]
pub struct Int8Rows<'a> {
    scb: &'a [u8],
    cols: u64,
}

impl<'a> Int8Rows<'a> {
    pub(super) fn new(
        from: DType,
        shape: &[u64],
        src_len: usize,
        scb: Bytes<'a>,
    ) -> Result<Int8Rows<'a>, String> {
        if from != DType::I8 {
            return Err(format!(
                "LLM.int8 dequantization of a {from} tensor (needs I8)"
            ));
        }
        let Some((&rows, rest)) = shape.split_first() else {
            return Err("a 0-dimensional LLM.int8 weight".into());
        };
        let cols: u64 = rest.iter().product();
        if src_len as u64 != rows * cols {
            return Err(format!("{src_len} bytes do not hold I8 {shape:?}"));
        }
        scb.expect("SCB", &[DType::F32], &[rows])?;
        Ok(Int8Rows {
            scb: scb.data,
            cols,
        })
    }

    pub(super) fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let n = out.len() / 4;
        let mut k = 0usize;
        while k < n {
            let index = first + k as u64;
            let (row, col) = (index / self.cols, index % self.cols);
            let s = f32_at(self.scb, row as usize);
            let end = k + ((self.cols - col) as usize).min(n - k);
            for j in k..end {
                // (CB * SCB) * (1/127): two IEEE products, in bitsandbytes' order.
                let value = (src[j] as i8 as f32 * s) * RECIPROCAL_127;
                out[4 * j..4 * j + 4].copy_from_slice(&value.to_le_bytes());
            }
            k = end;
        }
    }
}
