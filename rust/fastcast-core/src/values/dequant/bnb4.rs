//! bitsandbytes 4-bit (nf4, fp4): two codes a byte, high nibble first, times
//! each block's absmax (itself 8-bit with double quant).

use super::{f32_at, Bytes, NestedAbsmax};
use crate::dtype::DType;

/// bitsandbytes 4-bit: the code table, and where each block's absmax comes from.
#[derive(Debug, Clone)]
pub struct Bnb4Blocks<'a> {
    code: [f32; 16],
    blocksize: u64,
    absmax: Absmax<'a>,
}

/// A 4-bit block's scale: F32 as stored, or (double quant) an 8-bit code.
#[derive(Debug, Clone)]
enum Absmax<'a> {
    Plain(&'a [u8]),
    Nested {
        codes: &'a [u8],
        code: Box<[f32; 256]>,
        outer: &'a [u8],
        blocksize: u64,
        offset: f32,
    },
}

impl<'a> Bnb4Blocks<'a> {
    pub(super) fn new(
        numel: u64,
        src_len: usize,
        blocksize: u64,
        absmax: Bytes<'a>,
        quant_map: Bytes<'a>,
        nested: Option<(Bytes<'a>, Bytes<'a>, &NestedAbsmax)>,
    ) -> Result<Bnb4Blocks<'a>, String> {
        if src_len as u64 != numel.div_ceil(2) {
            return Err(format!(
                "{src_len} packed bytes for {numel} 4-bit values (needs {})",
                numel.div_ceil(2)
            ));
        }
        if blocksize == 0 {
            return Err("a 4-bit blocksize of 0".into());
        }
        quant_map.expect("the quant map", &[DType::F32], &[16])?;
        let blocks = numel.div_ceil(blocksize);
        let absmax = match nested {
            None => {
                absmax.expect("the absmax", &[DType::F32], &[blocks])?;
                Absmax::Plain(absmax.data)
            }
            Some((outer, code, how)) => {
                absmax.expect("the absmax (double quant)", &[DType::U8], &[blocks])?;
                code.expect("the nested quant map", &[DType::F32], &[256])?;
                if how.blocksize == 0 {
                    return Err("a nested blocksize of 0".into());
                }
                let groups = blocks.div_ceil(how.blocksize);
                outer.expect("the nested absmax", &[DType::F32], &[groups])?;
                Absmax::Nested {
                    codes: absmax.data,
                    code: Box::new(std::array::from_fn(|i| f32_at(code.data, i))),
                    outer: outer.data,
                    blocksize: how.blocksize,
                    // As bitsandbytes holds it: torch.tensor(float(offset)), an f32.
                    offset: how.offset as f32,
                }
            }
        };
        Ok(Bnb4Blocks {
            code: std::array::from_fn(|i| f32_at(quant_map.data, i)),
            blocksize,
            absmax,
        })
    }

    /// The absmax of block `b`.
    #[inline(always)]
    fn absmax(&self, b: u64) -> f32 {
        match &self.absmax {
            Absmax::Plain(bytes) => f32_at(bytes, b as usize),
            Absmax::Nested {
                codes,
                code,
                outer,
                blocksize,
                offset,
            } => {
                // Two IEEE operations, never fused: bitsandbytes' product, then its `+=`.
                let scaled =
                    code[codes[b as usize] as usize] * f32_at(outer, (b / blocksize) as usize);
                scaled + offset
            }
        }
    }

    /// `src` holds the bytes of elements `first..`, from byte `first / 2` (an
    /// odd `first` starts at the low nibble).
    pub(super) fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let n = out.len() / 4;
        let base = first / 2;
        let put = |out: &mut [u8], j: usize, v: f32| {
            out[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
        };
        let mut k = 0usize;
        while k < n {
            let index = first + k as u64;
            let block = index / self.blocksize;
            let a = self.absmax(block);
            let end = (((block + 1) * self.blocksize - first) as usize).min(n);
            // The block's sixteen values, each `code * absmax` as before: a
            // byte's two values are then two lookups.
            let scaled: [f32; 16] = std::array::from_fn(|i| self.code[i] * a);
            let byte_of = |j: usize| src[((first + j as u64) / 2 - base) as usize];
            let mut j = k;
            if !(first + j as u64).is_multiple_of(2) {
                put(out, j, scaled[(byte_of(j) & 0xF) as usize]); // a low nibble first
                j += 1;
            }
            let pairs = end.saturating_sub(j) / 2;
            if pairs > 0 {
                let b0 = ((first + j as u64) / 2 - base) as usize;
                let bytes = &src[b0..b0 + pairs];
                for (&byte, o) in bytes.iter().zip(out[4 * j..].chunks_exact_mut(8)) {
                    o[..4].copy_from_slice(&scaled[(byte >> 4) as usize].to_le_bytes());
                    o[4..].copy_from_slice(&scaled[(byte & 0xF) as usize].to_le_bytes());
                }
                j += 2 * pairs;
            }
            if j < end {
                put(out, j, scaled[(byte_of(j) >> 4) as usize]); // a last high nibble
            }
            k = end;
        }
    }
}
