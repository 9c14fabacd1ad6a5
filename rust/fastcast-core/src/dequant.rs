//! Dequantization: a quantized weight's values, computed as its reference
//! implementations compute them, for the executor to round once to the target.
//!
//! Every format yields fp32 values in the order of the *output* tensor, each
//! the IEEE fp32 arithmetic of the library that reads the format (no fused
//! multiply-add, no intermediate rounding); the executor then rounds them once
//! to the target.
//!
//! - fp8 (DeepSeek/FineGrained block, compressed-tensors, FBGEMM, vLLM): the
//!   weight seen as 2-D `[rows, cols]` (the last dimension is `cols`) holds
//!   e4m3 values, and each `block.0` × `block.1` block has one scale, the
//!   multiplier (`weight_scale_inv` too, despite its name). A value is
//!   `f32(q) * f32(scale)`, as DeepSeek's `weight_dequant` and
//!   compressed-tensors compute it. The scale grid is `ceil(rows / block.0)` ×
//!   `ceil(cols / block.1)`, so partial edge blocks are indexed, never
//!   inferred from the grid. A per-tensor scale is one block of the whole
//!   weight; a per-row (per-channel) scale is a block of one row.
//! - bitsandbytes 4-bit (nf4, fp4): two codes per byte, high nibble first,
//!   whatever the container dtype; `code[nibble] * absmax[k / blocksize]`. With
//!   double quant the absmax is itself 8-bit:
//!   `nested_code[absmax_u8[b]] * nested_absmax[b / nested_blocksize] + offset`
//!   (a product, then a sum: bitsandbytes' `dequantize_blockwise`, then `+=`).
//! - bitsandbytes LLM.int8: `f32(CB) * SCB[row] * f32(1/127)`, in that order,
//!   as `int8_vectorwise_dequant` does (times the reciprocal, not `/ 127`).
//! - GPTQ (`qweight` `[in * bits / 32, out]`, consecutive inputs in a word,
//!   low bits first) and AutoAWQ GEMM (`qweight` `[in, out / 8]`, eight outputs
//!   in a word in the order `[0, 2, 4, 6, 1, 3, 5, 7]`):
//!   `W[o, i] = scale[g, o] * f32(q[i, o] - z[g, o])` with `g` the group of
//!   input `i` (GPTQ's `g_idx`, else `i / group_size`), and GPTQ v1's zeros
//!   stored minus one. The output is `[out, in]`, transposed from the packing.
//!
//! Small operands (code tables) are decoded once per tensor; the per-block and
//! per-group ones (absmax, scales, zeros) are read from the mapped inputs as
//! each chunk needs them, so memory stays that of a chunk however large the
//! shard.

use serde::Deserialize;

use crate::cast::scalar;
use crate::dtype::DType;

/// How a planned tensor's values are reconstructed from quantized storage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dequant {
    /// e4m3 (or e5m2) values times one scale per block of the 2-D weight.
    Fp8Scaled {
        /// The scale tensor.
        scale: Operand,
        /// Rows and columns of the weight each scale covers.
        block: (u64, u64),
    },
    /// bitsandbytes 4-bit: packed nibbles (any container dtype), a code
    /// table and one absmax per `blocksize` elements of the flat weight.
    Bnb4 {
        /// `x.weight.absmax`: F32, or U8 codes with `nested`.
        absmax: Operand,
        /// `x.weight.quant_map`: the 16 F32 code values.
        quant_map: Operand,
        blocksize: u64,
        /// Double quant: how the 8-bit absmax decodes.
        #[serde(default)]
        nested: Option<NestedAbsmax>,
    },
    /// bitsandbytes LLM.int8: I8 rows times their F32 `SCB` over 127.
    Int8Rows {
        /// `x.SCB`, one per row.
        scb: Operand,
    },
    /// GPTQ, v1 (`zero_plus_one`) or v2, 2, 4 or 8 bits.
    Gptq {
        qzeros: Operand,
        scales: Operand,
        /// The group of each input (`desc_act` permutes it); without it,
        /// input `i` is in group `i / group_size`.
        #[serde(default)]
        g_idx: Option<Operand>,
        group_size: u64,
        bits: u32,
        /// v1 (`checkpoint_format: gptq`) stores each zero minus one.
        zero_plus_one: bool,
    },
    /// AutoAWQ GEMM, 4 bits.
    Awq {
        qzeros: Operand,
        scales: Operand,
        group_size: u64,
        bits: u32,
    },
}

/// bitsandbytes double quant: the 8-bit absmax codes' own code table,
/// scales and offset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NestedAbsmax {
    /// `x.weight.nested_absmax`, F32, one per `blocksize` absmax codes.
    pub absmax: Operand,
    /// `x.weight.nested_quant_map`, the 256 F32 code values.
    pub quant_map: Operand,
    pub blocksize: u64,
    /// `nested_offset` of the quant state, added after the product (as an
    /// f32, the way bitsandbytes holds it).
    pub offset: f64,
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

/// An operand with its bytes, its dtype parsed and its size checked.
#[derive(Debug, Clone, Copy)]
struct Bytes<'a> {
    name: &'a str,
    dtype: DType,
    shape: &'a [u64],
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn new(op: &'a Operand, data: &'a [u8]) -> Result<Bytes<'a>, String> {
        let dtype: DType = op
            .dtype
            .parse()
            .map_err(|_| format!("{:?} has an unknown dtype {:?}", op.name, op.dtype))?;
        let numel = op.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| n.checked_mul(dtype.bits())) != Some(data.len() as u64 * 8) {
            return Err(format!(
                "{:?}: {} bytes do not hold {dtype} {:?}",
                op.name,
                data.len(),
                op.shape
            ));
        }
        Ok(Bytes {
            name: &op.name,
            dtype,
            shape: &op.shape,
            data,
        })
    }

    /// Refuse another dtype or shape than the format's, saying what it needs.
    fn expect(&self, what: &str, dtypes: &[DType], shape: &[u64]) -> Result<(), String> {
        if dtypes.contains(&self.dtype) && self.shape == shape {
            return Ok(());
        }
        let names: Vec<&str> = dtypes.iter().map(|d| d.safetensors_name()).collect();
        Err(format!(
            "{what} {:?} is {} {:?} (needs {} {shape:?})",
            self.name,
            self.dtype,
            self.shape,
            names.join(" or ")
        ))
    }
}

/// The little-endian f32 at element `i` of `bytes`.
#[inline(always)]
fn f32_at(bytes: &[u8], i: usize) -> f32 {
    let b = &bytes[4 * i..4 * i + 4];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The little-endian u32 at element `i` of `bytes`.
#[inline(always)]
fn u32_at(bytes: &[u8], i: usize) -> u32 {
    let b = &bytes[4 * i..4 * i + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Element `i` of an F32, BF16 or F16 tensor, exactly as f32.
#[inline(always)]
fn float_at(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32_at(bytes, i),
        DType::BF16 => scalar::bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        _ => scalar::f16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
    }
}

/// A checked dequantization, ready to run chunk by chunk.
#[derive(Debug, Clone)]
pub enum Dequantizer<'a> {
    Fp8(Box<Fp8Scales>),
    Bnb4(Bnb4Blocks<'a>),
    Int8(Int8Rows<'a>),
    Packed(PackedInts<'a>),
}

impl<'a> Dequantizer<'a> {
    /// Check `plan` against the tensor it makes (`shape`, the output's) and
    /// its source (`from`, `src_len` bytes), resolving each operand to its
    /// bytes with `operand`. Errors are messages for the plan.
    pub fn new(
        plan: &'a Dequant,
        from: DType,
        shape: &[u64],
        src_len: usize,
        operand: &dyn Fn(&'a Operand) -> Result<&'a [u8], String>,
    ) -> Result<Dequantizer<'a>, String> {
        let bytes = |op: &'a Operand| Bytes::new(op, operand(op)?);
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or("its shape overflows")?;
        Ok(match plan {
            Dequant::Fp8Scaled { scale, block } => {
                if numel.checked_mul(from.bits()) != Some(src_len as u64 * 8) {
                    return Err(format!("{src_len} bytes do not hold {from} {shape:?}"));
                }
                let s = bytes(scale)?;
                Dequantizer::Fp8(Box::new(Fp8Scales::new(
                    from, shape, *block, s.dtype, s.shape, s.data,
                )?))
            }
            Dequant::Bnb4 {
                absmax,
                quant_map,
                blocksize,
                nested,
            } => {
                let nested = match nested {
                    None => None,
                    Some(n) => Some((bytes(&n.absmax)?, bytes(&n.quant_map)?, n)),
                };
                Dequantizer::Bnb4(Bnb4Blocks::new(
                    numel,
                    src_len,
                    *blocksize,
                    bytes(absmax)?,
                    bytes(quant_map)?,
                    nested,
                )?)
            }
            Dequant::Int8Rows { scb } => {
                Dequantizer::Int8(Int8Rows::new(from, shape, src_len, bytes(scb)?)?)
            }
            Dequant::Gptq {
                qzeros,
                scales,
                g_idx,
                group_size,
                bits,
                zero_plus_one,
            } => {
                let g_idx = match g_idx {
                    None => None,
                    Some(g) => Some(bytes(g)?),
                };
                Dequantizer::Packed(PackedInts::new(
                    Packing::Gptq {
                        bits: *bits,
                        zero_plus_one: *zero_plus_one,
                    },
                    from,
                    shape,
                    src_len,
                    bytes(qzeros)?,
                    bytes(scales)?,
                    g_idx,
                    *group_size,
                )?)
            }
            Dequant::Awq {
                qzeros,
                scales,
                group_size,
                bits,
            } => {
                if *bits != 4 {
                    return Err(format!(
                        "{bits}-bit AWQ (AutoAWQ GEMM packs 4-bit values; its order is defined for them)"
                    ));
                }
                Dequantizer::Packed(PackedInts::new(
                    Packing::Awq,
                    from,
                    shape,
                    src_len,
                    bytes(qzeros)?,
                    bytes(scales)?,
                    None,
                    *group_size,
                )?)
            }
        })
    }

    /// Chunks of the output start and end on multiples of this many elements:
    /// a byte of two 4-bit codes, or a whole output row of GPTQ/AWQ (whose
    /// packed words hold several inputs of one row, or rows of one input).
    pub fn align(&self) -> u64 {
        match self {
            Dequantizer::Bnb4(_) => 2,
            Dequantizer::Packed(p) => p.cols.max(1),
            Dequantizer::Fp8(_) | Dequantizer::Int8(_) => 1,
        }
    }

    /// The bytes of the source that output elements `[begin, end)` read.
    pub fn source_range(&self, begin: u64, end: u64) -> (usize, usize) {
        match self {
            Dequantizer::Fp8(_) | Dequantizer::Int8(_) => (begin as usize, end as usize),
            Dequantizer::Bnb4(_) => ((begin / 2) as usize, end.div_ceil(2) as usize),
            Dequantizer::Packed(p) => (0, p.src_len),
        }
    }

    /// Whether every chunk reads across the whole source (GPTQ/AWQ: a row of
    /// the output is a column of the packing), so that its pages are to be
    /// released after the last chunk, not after each.
    pub fn reads_whole_source(&self) -> bool {
        matches!(self, Dequantizer::Packed(_))
    }

    /// Values of output elements `first..first + out.len() / 4` (row-major),
    /// as little-endian f32, from `src`, the source bytes
    /// [`source_range`](Self::source_range) gives for them.
    pub fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        match self {
            Dequantizer::Fp8(d) => d.dequantize(src, first, out),
            Dequantizer::Bnb4(d) => d.dequantize(src, first, out),
            Dequantizer::Int8(d) => d.dequantize(src, first, out),
            Dequantizer::Packed(d) => d.dequantize(src, first, out),
        }
    }
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
    fn new(
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
    fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let n = out.len() / 4;
        let base = first / 2;
        let mut k = 0usize;
        while k < n {
            let index = first + k as u64;
            let block = index / self.blocksize;
            let a = self.absmax(block);
            let end = (((block + 1) * self.blocksize - first) as usize).min(n);
            for j in k..end {
                let e = first + j as u64;
                let byte = src[(e / 2 - base) as usize];
                let nibble = if e.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xF
                };
                let value = self.code[nibble as usize] * a;
                out[4 * j..4 * j + 4].copy_from_slice(&value.to_le_bytes());
            }
            k = end;
        }
    }
}

/// bitsandbytes' multiplier for LLM.int8 (`int8_vectorwise_dequant`): the
/// reciprocal of 127 as the Python float it writes, an f32 in torch's product.
const RECIPROCAL_127: f32 = 7.874015718698502e-3_f64 as f32;

/// bitsandbytes LLM.int8: one F32 `SCB` per row.
#[derive(Debug, Clone)]
pub struct Int8Rows<'a> {
    scb: &'a [u8],
    cols: u64,
}

impl<'a> Int8Rows<'a> {
    fn new(
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

    fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
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

/// How a GPTQ or AWQ `qweight` and `qzeros` hold their integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// `qweight[i * bits / 32, o]` holds inputs `i..i + 32 / bits` of output
    /// `o`, low bits first; `qzeros[g, o * bits / 32]` outputs likewise.
    Gptq { bits: u32, zero_plus_one: bool },
    /// `qweight[i, o / 8]` and `qzeros[g, o / 8]` hold eight outputs, output
    /// `8c + j` at nibble `AWQ_NIBBLE[j]`.
    Awq,
}

/// AutoAWQ packs outputs `[0, 2, 4, 6, 1, 3, 5, 7]` into nibbles 0..8; output
/// `j` of a word is at nibble `AWQ_NIBBLE[j]` (the inverse order).
const AWQ_NIBBLE: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Output rows dequantized together: their words of one packed row are
/// adjacent (GPTQ) or shared (AWQ), their scales and zeros of one group too.
const TILE: usize = 16;

/// GPTQ or AWQ: integer codes in int32 words, a scale and a zero per (group,
/// output), the output `[rows = out, cols = in]`.
#[derive(Debug, Clone)]
pub struct PackedInts<'a> {
    packing: Packing,
    rows: u64,
    cols: u64,
    src_len: usize,
    qzeros: &'a [u8],
    scales: &'a [u8],
    scale_dtype: DType,
    groups: u64,
    /// The group of each input: `g_idx` (I32, checked in range), or by size.
    g_idx: Option<&'a [u8]>,
    group_size: u64,
}

impl<'a> PackedInts<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        packing: Packing,
        from: DType,
        shape: &[u64],
        src_len: usize,
        qzeros: Bytes<'a>,
        scales: Bytes<'a>,
        g_idx: Option<Bytes<'a>>,
        group_size: u64,
    ) -> Result<PackedInts<'a>, String> {
        let what = match packing {
            Packing::Gptq { .. } => "GPTQ",
            Packing::Awq => "AWQ",
        };
        if from != DType::I32 {
            return Err(format!(
                "{what} dequantization of a {from} qweight (needs I32)"
            ));
        }
        let &[rows, cols] = shape else {
            return Err(format!(
                "a {what} weight of shape {shape:?} (needs [out, in])"
            ));
        };
        // The qweight's shape, and the zeros' columns.
        let (qweight, zeros_cols) = match packing {
            Packing::Gptq { bits, .. } => {
                if !matches!(bits, 2 | 4 | 8) {
                    return Err(format!(
                        "{bits}-bit GPTQ (fastcast unpacks 2, 4 and 8 bits, which fill int32 \
                         words evenly; 3-bit values straddle words)"
                    ));
                }
                let per = 32 / bits as u64;
                if cols % per != 0 || rows % per != 0 {
                    return Err(format!(
                        "a {rows}x{cols} weight in {bits}-bit GPTQ words (both sides must be \
                         multiples of {per})"
                    ));
                }
                ([cols / per, rows], rows / per)
            }
            Packing::Awq => {
                if rows % 8 != 0 {
                    return Err(format!("{rows} AWQ outputs (needs a multiple of 8)"));
                }
                ([cols, rows / 8], rows / 8)
            }
        };
        if src_len as u64 != qweight[0] * qweight[1] * 4 {
            return Err(format!(
                "{src_len} qweight bytes for a {rows}x{cols} weight (needs I32 {qweight:?})"
            ));
        }
        // As AutoGPTQ and AutoAWQ size their buffers, with or without g_idx.
        if group_size == 0 {
            return Err(format!("a {what} group size of 0"));
        }
        let groups = cols.div_ceil(group_size);
        scales.expect(
            "the scales",
            &[DType::F16, DType::BF16, DType::F32],
            &[groups, rows],
        )?;
        qzeros.expect("the zeros", &[DType::I32], &[groups, zeros_cols])?;
        if let Some(g) = &g_idx {
            g.expect("g_idx", &[DType::I32], &[cols])?;
            if let Some(i) = (0..cols as usize).find(|&i| u32_at(g.data, i) as u64 >= groups) {
                return Err(format!(
                    "g_idx {:?} puts input {i} in group {} (there are {groups})",
                    g.name,
                    u32_at(g.data, i) as i32
                ));
            }
        }
        Ok(PackedInts {
            packing,
            rows,
            cols,
            src_len,
            qzeros: qzeros.data,
            scales: scales.data,
            scale_dtype: scales.dtype,
            groups,
            g_idx: g_idx.map(|g| g.data),
            group_size,
        })
    }

    /// The zero point of group `g`, output `o` (GPTQ v1's stored value plus one).
    #[inline(always)]
    fn zero(&self, g: u64, o: u64) -> i32 {
        match self.packing {
            Packing::Gptq {
                bits,
                zero_plus_one,
            } => {
                let per = 32 / bits as u64;
                let word = u32_at(self.qzeros, (g * (self.rows / per) + o / per) as usize);
                let z = ((word >> ((o % per) as u32 * bits)) & ((1 << bits) - 1)) as i32;
                z + i32::from(zero_plus_one)
            }
            Packing::Awq => {
                let word = u32_at(self.qzeros, (g * (self.rows / 8) + o / 8) as usize);
                ((word >> (4 * AWQ_NIBBLE[(o % 8) as usize])) & 0xF) as i32
            }
        }
    }

    /// Output rows `first / cols ..` (whole rows: see [`Dequantizer::align`]),
    /// `src` being the whole `qweight`.
    fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let cols = self.cols as usize;
        if cols == 0 {
            return;
        }
        debug_assert!(first.is_multiple_of(self.cols) && (out.len() / 4).is_multiple_of(cols));
        let first_row = first / self.cols;
        let n_rows = (out.len() / 4 / cols) as u64;
        let group: Vec<u32> = (0..self.cols)
            .map(|i| match self.g_idx {
                Some(g_idx) => u32_at(g_idx, i as usize),
                None => (i / self.group_size) as u32,
            })
            .collect();
        let groups = self.groups as usize;
        let mut scales = vec![0f32; groups * TILE];
        let mut zeros = vec![0i32; groups * TILE];
        let mut tile = 0;
        while tile < n_rows {
            let height = (n_rows - tile).min(TILE as u64) as usize;
            let o0 = first_row + tile;
            // This tile's scales and zeros, [group][row].
            for g in 0..groups {
                for t in 0..height {
                    let o = o0 + t as u64;
                    let at = g as u64 * self.rows + o;
                    scales[g * TILE + t] = float_at(self.scale_dtype, self.scales, at as usize);
                    zeros[g * TILE + t] = self.zero(g as u64, o);
                }
            }
            // scale * f32(q - z): the references' one product.
            let value = |g: u32, t: usize, q: u32| -> [u8; 4] {
                let at = g as usize * TILE + t;
                (scales[at] * (q as i32 - zeros[at]) as f32).to_le_bytes()
            };
            let (rows, o0, t0) = (self.rows as usize, o0 as usize, tile as usize);
            match self.packing {
                Packing::Gptq { bits, .. } => {
                    // Packed row r holds inputs r * per.. of every output: one
                    // word per row of the tile, each giving `per` adjacent values.
                    let per = (32 / bits) as usize;
                    let mask = (1u32 << bits) - 1;
                    for r in 0..cols / per {
                        let words = &src[4 * (r * rows + o0)..4 * (r * rows + o0 + height)];
                        for (t, w) in words.chunks_exact(4).enumerate() {
                            let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                            let at = 4 * ((t0 + t) * cols + r * per);
                            let row = &mut out[at..at + 4 * per];
                            for (k, o) in row.chunks_exact_mut(4).enumerate() {
                                let q = (word >> (k as u32 * bits)) & mask;
                                o.copy_from_slice(&value(group[r * per + k], t, q));
                            }
                        }
                    }
                }
                Packing::Awq => {
                    // Input i's words hold eight outputs each; where each row of
                    // the tile sits in them.
                    let slots: [(usize, u32); TILE] = std::array::from_fn(|t| {
                        let o = o0 + t;
                        (o / 8, 4 * AWQ_NIBBLE[o % 8])
                    });
                    // Eight inputs at a time, so each row of the tile is written
                    // 32 bytes at a time.
                    let per_input = rows / 8;
                    for i0 in (0..cols).step_by(8) {
                        let inputs = i0..(i0 + 8).min(cols);
                        for (t, &(c, shift)) in slots[..height].iter().enumerate() {
                            let at = 4 * ((t0 + t) * cols + i0);
                            let row = &mut out[at..at + 4 * inputs.len()];
                            for (i, o) in inputs.clone().zip(row.chunks_exact_mut(4)) {
                                let q = (u32_at(src, i * per_input + c) >> shift) & 0xF;
                                o.copy_from_slice(&value(group[i], t, q));
                            }
                        }
                    }
                }
            }
            tile += height as u64;
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

    // --- bitsandbytes, GPTQ, AWQ ---------------------------------------------

    use std::collections::HashMap;

    /// Deterministic pseudo-random numbers (an LCG), for codes and scales.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn below(&mut self, n: u32) -> u32 {
            self.next() % n
        }
        fn float(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 - 0.5
        }
    }

    fn op(name: &str, dtype: DType, shape: &[u64]) -> Operand {
        Operand {
            name: name.into(),
            source: 0,
            dtype: dtype.safetensors_name().into(),
            shape: shape.to_vec(),
            offsets: (0, 0),
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn i32_bytes(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| scalar::f32_to_f16(x).to_le_bytes())
            .collect()
    }

    /// Build the dequantizer of `plan` with operands from `data` (by name).
    fn build<'a>(
        plan: &'a Dequant,
        from: DType,
        shape: &[u64],
        src_len: usize,
        data: &'a HashMap<String, Vec<u8>>,
    ) -> Result<Dequantizer<'a>, String> {
        let find = |o: &'a Operand| -> Result<&'a [u8], String> {
            data.get(&o.name)
                .map(|v| v.as_slice())
                .ok_or_else(|| format!("no {}", o.name))
        };
        Dequantizer::new(plan, from, shape, src_len, &find)
    }

    /// Dequantize `src` in chunks of `chunk` elements, each given only its
    /// source range; `aligned` rounds `chunk` up to the dequantizer's
    /// alignment, as the executor does (else chunks start anywhere: bnb's
    /// odd starts read a low nibble first).
    fn chunked(d: &Dequantizer, src: &[u8], numel: u64, chunk: u64, aligned: bool) -> Vec<u32> {
        let chunk = if aligned {
            chunk.div_ceil(d.align()) * d.align()
        } else {
            chunk
        };
        let mut out = vec![0u8; 4 * numel as usize];
        let mut begin = 0;
        while begin < numel {
            let end = (begin + chunk).min(numel);
            let (b, e) = d.source_range(begin, end);
            d.dequantize(
                &src[b..e],
                begin,
                &mut out[4 * begin as usize..4 * end as usize],
            );
            begin = end;
        }
        floats(&out).iter().map(|x| x.to_bits()).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A bnb 4-bit weight of `n` codes (odd, partial last block and group).
    struct Bnb {
        packed: Vec<u8>,
        codes: Vec<u8>,
        code: Vec<f32>,
        absmax: Vec<f32>,
        absmax_u8: Vec<u8>,
        nested_code: Vec<f32>,
        nested_absmax: Vec<f32>,
    }

    fn bnb(n: u64, blocksize: u64, nested_blocksize: u64) -> Bnb {
        let mut r = Lcg(4);
        let codes: Vec<u8> = (0..n).map(|_| r.below(16) as u8).collect();
        let mut packed: Vec<u8> = codes
            .chunks(2)
            .map(|p| p[0] << 4 | p.get(1).unwrap_or(&0))
            .collect();
        if n % 2 == 1 {
            *packed.last_mut().unwrap() |= 0x9; // garbage in the unused low nibble
        }
        let blocks = n.div_ceil(blocksize);
        Bnb {
            packed,
            codes,
            code: (0..16).map(|_| r.float() * 2.0).collect(),
            absmax: (0..blocks).map(|_| r.float() + 0.75).collect(),
            absmax_u8: (0..blocks).map(|_| r.below(256) as u8).collect(),
            nested_code: (0..256).map(|_| r.float() * 2.0).collect(),
            nested_absmax: (0..blocks.div_ceil(nested_blocksize))
                .map(|_| r.float() + 0.6)
                .collect(),
        }
    }

    #[test]
    fn bnb4_matches_the_reference_at_any_chunk_and_odd_starts() {
        let (n, bs, nbs, offset) = (203u64, 8u64, 4u64, 0.0306_f64);
        let w = bnb(n, bs, nbs);
        let blocks = n.div_ceil(bs);
        let mut data = HashMap::new();
        data.insert("absmax".to_string(), f32_bytes(&w.absmax));
        data.insert("map".to_string(), f32_bytes(&w.code));
        data.insert("absmax8".to_string(), w.absmax_u8.clone());
        data.insert("nabs".to_string(), f32_bytes(&w.nested_absmax));
        data.insert("nmap".to_string(), f32_bytes(&w.nested_code));
        let plain = Dequant::Bnb4 {
            absmax: op("absmax", DType::F32, &[blocks]),
            quant_map: op("map", DType::F32, &[16]),
            blocksize: bs,
            nested: None,
        };
        let nested = Dequant::Bnb4 {
            absmax: op("absmax8", DType::U8, &[blocks]),
            quant_map: op("map", DType::F32, &[16]),
            blocksize: bs,
            nested: Some(NestedAbsmax {
                absmax: op("nabs", DType::F32, &[blocks.div_ceil(nbs)]),
                quant_map: op("nmap", DType::F32, &[256]),
                blocksize: nbs,
                offset,
            }),
        };
        // The reference: code[nibble] * absmax[k / bs]; nested absmax first a
        // product, then plus the offset as an f32.
        let nested_absmax: Vec<f32> = (0..blocks as usize)
            .map(|b| {
                let scaled =
                    w.nested_code[w.absmax_u8[b] as usize] * w.nested_absmax[b / nbs as usize];
                scaled + offset as f32
            })
            .collect();
        for (plan, absmax) in [(&plain, &w.absmax), (&nested, &nested_absmax)] {
            let want: Vec<f32> = (0..n as usize)
                .map(|k| w.code[w.codes[k] as usize] * absmax[k / bs as usize])
                .collect();
            // Any container dtype: the source is bytes.
            for from in [DType::U8, DType::BF16, DType::F32] {
                let d = build(plan, from, &[7, 29], w.packed.len(), &data).unwrap();
                assert_eq!(d.align(), 2);
                for chunk in [1u64, 2, 3, 5, 8, 9, 64, 203] {
                    for aligned in [true, false] {
                        let got = chunked(&d, &w.packed, n, chunk, aligned);
                        assert_eq!(got, bits(&want), "{chunk} {aligned}");
                    }
                }
            }
        }
        // Geometry: the packed bytes, the absmax count, the nested group count.
        let d = build(&plain, DType::U8, &[7, 30], w.packed.len(), &data);
        assert!(d.unwrap_err().contains("needs 105"));
        let d = build(&plain, DType::U8, &[7, 29], w.packed.len(), &data);
        assert!(d.is_ok());
        let mut bad = plain.clone();
        if let Dequant::Bnb4 { blocksize, .. } = &mut bad {
            *blocksize = 16;
        }
        let err = build(&bad, DType::U8, &[7, 29], w.packed.len(), &data).unwrap_err();
        assert!(
            err.contains("\"absmax\"") && err.contains("needs F32 [13]"),
            "{err}"
        );
        let mut bad = nested.clone();
        if let Dequant::Bnb4 {
            nested: Some(n), ..
        } = &mut bad
        {
            n.blocksize = 2;
        }
        let err = build(&bad, DType::U8, &[7, 29], w.packed.len(), &data).unwrap_err();
        assert!(
            err.contains("nested absmax") && err.contains("[13]"),
            "{err}"
        );
    }

    #[test]
    fn int8_rows_are_cb_times_scb_times_the_f32_reciprocal() {
        // bitsandbytes' literal is the f32 nearest 1/127, written as a double.
        assert_eq!(RECIPROCAL_127 as f64, 7.874015718698502e-3);
        assert_eq!(RECIPROCAL_127, (1.0f64 / 127.0) as f32);
        let (rows, cols) = (5u64, 7u64);
        let mut r = Lcg(127);
        let cb: Vec<u8> = (0..rows * cols).map(|_| r.next() as u8).collect();
        let scb: Vec<f32> = (0..rows).map(|_| r.float() + 1.0).collect();
        let mut data = HashMap::new();
        data.insert("scb".to_string(), f32_bytes(&scb));
        let plan = Dequant::Int8Rows {
            scb: op("scb", DType::F32, &[rows]),
        };
        let d = build(&plan, DType::I8, &[rows, cols], cb.len(), &data).unwrap();
        let want: Vec<f32> = (0..(rows * cols) as usize)
            .map(|k| cb[k] as i8 as f32 * scb[k / cols as usize] * RECIPROCAL_127)
            .collect();
        for chunk in [1u64, 3, 7, 8, 35] {
            assert_eq!(
                chunked(&d, &cb, rows * cols, chunk, true),
                bits(&want),
                "{chunk}"
            );
        }
        // ... which is not always (CB * SCB) / 127.
        let divided = (0..(rows * cols) as usize)
            .filter(|&k| want[k] != cb[k] as i8 as f32 * scb[k / cols as usize] / 127.0)
            .count();
        assert!(divided > 0);
        let err = build(&plan, DType::U8, &[rows, cols], cb.len(), &data).unwrap_err();
        assert!(err.contains("needs I8"), "{err}");
        let err = build(&plan, DType::I8, &[cols, rows], cb.len(), &data).unwrap_err();
        assert!(
            err.contains("SCB") && err.contains("needs F32 [7]"),
            "{err}"
        );
    }

    /// A GPTQ or AWQ weight: its integers, zeros, scales and groups, packed.
    struct Packed {
        rows: u64,
        cols: u64,
        q: Vec<u32>,      // [in, out]
        zeros: Vec<u32>,  // [groups, out], as stored
        scales: Vec<f32>, // [groups, out], f16 values
        group: Vec<u32>,  // [in]
        qweight: Vec<u8>,
        qzeros: Vec<u8>,
    }

    /// Pack `values` ([n, m]) `32 / bits` at a time along the rows (GPTQ qweight).
    fn pack_rows(values: &[u32], n: usize, m: usize, bits: u32) -> Vec<u32> {
        let per = (32 / bits) as usize;
        (0..n / per)
            .flat_map(|r| {
                (0..m).map(move |c| {
                    (0..per).fold(0u32, |w, k| {
                        w | values[(r * per + k) * m + c] << (k as u32 * bits)
                    })
                })
            })
            .collect()
    }

    /// Pack along the columns, column `order[k]` of each group of them in
    /// slot `k` (GPTQ qzeros in order; AWQ in its order).
    fn pack_cols(values: &[u32], n: usize, m: usize, bits: u32, order: &[usize]) -> Vec<u32> {
        let per = (32 / bits) as usize;
        (0..n)
            .flat_map(|r| {
                (0..m / per).map(move |c| {
                    (0..per).fold(0u32, |w, k| {
                        w | values[r * m + c * per + order[k]] << (k as u32 * bits)
                    })
                })
            })
            .collect()
    }

    fn packed(awq: bool, bits: u32, rows: u64, cols: u64, group: u64, permute: bool) -> Packed {
        let mut r = Lcg(u64::from(bits) + 10 * u64::from(awq) + 100 * u64::from(permute));
        let (n, m) = (cols as usize, rows as usize);
        let groups = cols.div_ceil(group) as usize;
        let q: Vec<u32> = (0..n * m).map(|_| r.below(1 << bits)).collect();
        let zeros: Vec<u32> = (0..groups * m).map(|_| r.below(1 << bits)).collect();
        let scales: Vec<f32> = (0..groups * m)
            .map(|_| scalar::f16_to_f32(scalar::f32_to_f16(r.float() * 0.01)))
            .collect();
        let mut group: Vec<u32> = (0..cols).map(|i| (i / group) as u32).collect();
        if permute {
            for i in (1..n).rev() {
                group.swap(i, r.below(i as u32 + 1) as usize);
            }
        }
        let (qweight, qzeros) = if awq {
            let order = [0, 2, 4, 6, 1, 3, 5, 7];
            (
                pack_cols(&q, n, m, 4, &order),
                pack_cols(&zeros, groups, m, 4, &order),
            )
        } else {
            let order: Vec<usize> = (0..(32 / bits) as usize).collect();
            (
                pack_rows(&q, n, m, bits),
                pack_cols(&zeros, groups, m, bits, &order),
            )
        };
        Packed {
            rows,
            cols,
            q,
            zeros,
            scales,
            group,
            qweight: i32_bytes(&qweight),
            qzeros: i32_bytes(&qzeros),
        }
    }

    impl Packed {
        /// The reference: W[o, i] = scale[g, o] * f32(q[i, o] - (z[g, o] + plus)).
        fn reference(&self, plus: u32) -> Vec<f32> {
            let m = self.rows as usize;
            (0..(self.rows * self.cols) as usize)
                .map(|k| {
                    let (o, i) = (k / self.cols as usize, k % self.cols as usize);
                    let g = self.group[i] as usize;
                    let z = (self.zeros[g * m + o] + plus) as i32;
                    self.scales[g * m + o] * (self.q[i * m + o] as i32 - z) as f32
                })
                .collect()
        }

        fn data(&self) -> HashMap<String, Vec<u8>> {
            let mut data = HashMap::new();
            data.insert("qzeros".to_string(), self.qzeros.clone());
            data.insert("scales".to_string(), f16_bytes(&self.scales));
            data.insert("g_idx".to_string(), i32_bytes(&self.group));
            data
        }
    }

    fn gptq_plan(p: &Packed, bits: u32, group: u64, g_idx: bool, v1: bool) -> Dequant {
        let groups = p.cols.div_ceil(group);
        Dequant::Gptq {
            qzeros: op(
                "qzeros",
                DType::I32,
                &[groups, p.rows * u64::from(bits) / 32],
            ),
            scales: op("scales", DType::F16, &[groups, p.rows]),
            g_idx: g_idx.then(|| op("g_idx", DType::I32, &[p.cols])),
            group_size: group,
            bits,
            zero_plus_one: v1,
        }
    }

    #[test]
    fn gptq_matches_the_reference_at_row_splits_in_2_4_and_8_bits() {
        // 40 outputs: tiles of 16, 16 and 8; 80 inputs in groups of 32 (the
        // last cut short), permuted as desc_act does.
        for bits in [2u32, 4, 8] {
            for (permute, v1) in [(false, true), (true, true), (false, false)] {
                let (rows, cols, group) = (48u64, 80u64, 32u64);
                let p = packed(false, bits, rows, cols, group, permute);
                let data = p.data();
                let plan = gptq_plan(&p, bits, group, true, v1);
                let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
                assert_eq!(d.align(), cols);
                let want = bits_of(&p.reference(u32::from(v1)));
                for chunk in [1u64, 80, 160, 17 * 80, 48 * 80] {
                    assert_eq!(
                        chunked(&d, &p.qweight, rows * cols, chunk, true),
                        want,
                        "{bits} bits, permuted {permute}, v1 {v1}, chunk {chunk}"
                    );
                }
                if !permute {
                    // Without g_idx: groups by size.
                    let plan = gptq_plan(&p, bits, group, false, v1);
                    let d =
                        build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
                    assert_eq!(chunked(&d, &p.qweight, rows * cols, 7 * 80, true), want);
                }
            }
        }
    }

    fn bits_of(v: &[f32]) -> Vec<u32> {
        bits(v)
    }

    #[test]
    fn gptq_v1_zero_15_stored_wraps_to_16_as_autogptq_reads_it() {
        // v1 stores zero - 1; a stored 15 reads back as 16 (AutoGPTQ adds one
        // after unpacking, without wrapping), so q = 0 gives -16 * scale.
        let mut p = packed(false, 4, 8, 8, 8, false);
        p.zeros = vec![15; 8];
        p.q = vec![0; 64];
        p.qzeros = i32_bytes(&pack_cols(&p.zeros, 1, 8, 4, &[0, 1, 2, 3, 4, 5, 6, 7]));
        p.qweight = i32_bytes(&pack_rows(&p.q, 8, 8, 4));
        let data = p.data();
        let plan = gptq_plan(&p, 4, 8, true, true);
        let d = build(&plan, DType::I32, &[8, 8], p.qweight.len(), &data).unwrap();
        let got = chunked(&d, &p.qweight, 64, 64, true);
        assert_eq!(f32::from_bits(got[0]), -16.0 * p.scales[0]);
    }

    #[test]
    fn awq_matches_the_reference_at_row_splits() {
        // 60 inputs: a last group of 28, and a last run of 4 inputs.
        let (rows, cols, group) = (40u64, 60u64, 32u64);
        let p = packed(true, 4, rows, cols, group, false);
        let data = p.data();
        let plan = Dequant::Awq {
            qzeros: op("qzeros", DType::I32, &[2, rows / 8]),
            scales: op("scales", DType::F16, &[2, rows]),
            group_size: group,
            bits: 4,
        };
        let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
        let want = bits(&p.reference(0));
        for chunk in [1u64, 60, 3 * 60, 17 * 60, 40 * 60] {
            assert_eq!(
                chunked(&d, &p.qweight, rows * cols, chunk, true),
                want,
                "{chunk}"
            );
        }
        // The order matters: reading nibbles in order gives something else.
        let mut wrong = data.clone();
        let z: Vec<u32> = pack_cols(&p.zeros, 2, rows as usize, 4, &[0, 1, 2, 3, 4, 5, 6, 7]);
        wrong.insert("qzeros".into(), i32_bytes(&z));
        let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &wrong).unwrap();
        assert_ne!(chunked(&d, &p.qweight, rows * cols, 60, true), want);
    }

    #[test]
    fn packed_geometry_is_checked_with_messages_naming_the_operand() {
        let (rows, cols, group) = (16u64, 64u64, 32u64);
        let p = packed(false, 4, rows, cols, group, true);
        let data = p.data();
        let plan = gptq_plan(&p, 4, group, true, true);
        let len = p.qweight.len();
        let shape = [rows, cols];
        // 3-bit values straddle words: refused, saying so.
        let mut three = plan.clone();
        if let Dequant::Gptq { bits, .. } = &mut three {
            *bits = 3;
        }
        let err = build(&three, DType::I32, &shape, len, &data).unwrap_err();
        assert!(
            err.contains("3-bit GPTQ") && err.contains("straddle"),
            "{err}"
        );
        // A qweight of another size, another dtype.
        let err = build(&plan, DType::I32, &[rows, cols + 8], len, &data).unwrap_err();
        assert!(err.contains("qweight bytes"), "{err}");
        let err = build(&plan, DType::F16, &shape, len, &data).unwrap_err();
        assert!(err.contains("needs I32"), "{err}");
        // Scales for another number of groups.
        let mut bad = plan.clone();
        if let Dequant::Gptq { g_idx, .. } = &mut bad {
            *g_idx = None;
        }
        if let Dequant::Gptq { group_size, .. } = &mut bad {
            *group_size = 16;
        }
        let err = build(&bad, DType::I32, &shape, len, &data).unwrap_err();
        assert!(
            err.contains("\"scales\"") && err.contains("needs F16 or BF16 or F32 [4, 16]"),
            "{err}"
        );
        // A group index out of range.
        let mut data2 = data.clone();
        let mut g = p.group.clone();
        g[5] = 2;
        data2.insert("g_idx".into(), i32_bytes(&g));
        let err = build(&plan, DType::I32, &shape, len, &data2).unwrap_err();
        assert!(err.contains("input 5 in group 2"), "{err}");
        g[5] = u32::MAX; // -1
        data2.insert("g_idx".into(), i32_bytes(&g));
        let err = build(&plan, DType::I32, &shape, len, &data2).unwrap_err();
        assert!(err.contains("group -1"), "{err}");
        // AWQ in another width.
        let awq = Dequant::Awq {
            qzeros: op("qzeros", DType::I32, &[2, 2]),
            scales: op("scales", DType::F16, &[2, 16]),
            group_size: 32,
            bits: 8,
        };
        let err = build(&awq, DType::I32, &shape, len, &data).unwrap_err();
        assert!(err.contains("8-bit AWQ"), "{err}");
        // An operand whose bytes do not hold its declared shape.
        let mut short = data.clone();
        short.get_mut("scales").unwrap().pop();
        let err = build(&plan, DType::I32, &shape, len, &short).unwrap_err();
        assert!(
            err.contains("\"scales\"") && err.contains("do not hold"),
            "{err}"
        );
    }
}
