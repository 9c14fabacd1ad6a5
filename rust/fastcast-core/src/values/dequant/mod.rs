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
//! - compressed-tensors integers (`pack-quantized` I32 words along each
//!   row, `int-quantized` I8): `W[o, i] = s[o, g] * f32(q[o, i] - z[o, g])`,
//!   see [`ct_int`].
//! - FP4 (MXFP4 with E8M0 scales, NVFP4 with E4M3 scales and a second-level
//!   scale, in the producer's order): see [`fp4`].
//!
//! Small operands (code tables) are decoded once per tensor; the per-block and
//! per-group ones (absmax, scales, zeros) are read from the mapped inputs as
//! each chunk needs them, so memory stays that of a chunk however large the
//! shard.

use serde::Deserialize;

use super::cast::rule_for;
use super::{put_f32, scan_f32, Invalid, Kind, Put, Source, Units};
use crate::cast::{self, scalar, CastOptions};
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};

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
    /// 4-bit floats (E2M1), two per byte, low nibble first, one scale per
    /// `group` values along the packed axis: MXFP4 (E8M0 scales, no
    /// `global_scale`) or NVFP4 (E4M3 scales and a one-value F32 `global_scale`).
    Fp4 {
        scale: Operand,
        group: u64,
        #[serde(default)]
        global_scale: Option<Operand>,
        /// The global scale divides (compressed-tensors' `weight_global_scale`)
        /// rather than multiplies (ModelOpt's `weight_scale_2`).
        #[serde(default)]
        divide: bool,
        /// The output swaps each matrix's rows and columns (gpt-oss experts).
        #[serde(default)]
        transpose: bool,
        /// Pairs and groups run down each matrix's columns (ModelOpt's fused
        /// experts, `[experts, in / 2, out]`), not along its rows.
        #[serde(default)]
        down: bool,
        /// Code 8 is +0, as in ModelOpt's table (elsewhere −0).
        #[serde(default)]
        positive_zero: bool,
    },
    /// compressed-tensors integers: `pack-quantized` (I32 words, codes of 1,
    /// 2, 4 or 8 bits along each row, stored plus `2^(bits - 1)`) or
    /// `int-quantized` / `naive-quantized` (I8 codes); a scale per row and
    /// group (or one per tensor), zero points when asymmetric.
    CtInt {
        /// `x.weight_scale`, `[out, groups]` or one value.
        scale: Operand,
        /// `x.weight_zero_point`: I32 packed along the outputs, or I8 as the scale.
        #[serde(default)]
        zero_point: Option<Operand>,
        /// `x.weight_g_idx`, the group of each input (older activation ordering).
        #[serde(default)]
        g_idx: Option<Operand>,
        bits: u32,
        /// Inputs per group (the row's width per channel or per tensor).
        group_size: u64,
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
pub(in crate::values) struct Bytes<'a> {
    pub(in crate::values) name: &'a str,
    pub(in crate::values) dtype: DType,
    pub(in crate::values) shape: &'a [u64],
    pub(in crate::values) data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub(in crate::values) fn new(op: &'a Operand, data: &'a [u8]) -> Result<Bytes<'a>, String> {
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
    pub(in crate::values) fn expect(
        &self,
        what: &str,
        dtypes: &[DType],
        shape: &[u64],
    ) -> Result<(), String> {
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

/// Check a group index (`g_idx`: I32, one per input) against `cols` inputs
/// in `groups` groups, naming the first input it puts past the last group.
fn check_group_index(g: &Bytes, cols: u64, groups: u64) -> Result<(), String> {
    g.expect("the group index", &[DType::I32], &[cols])?;
    match (0..cols as usize).find(|&i| u32_at(g.data, i) as u64 >= groups) {
        None => Ok(()),
        Some(i) => Err(format!(
            "group index {:?} puts input {i} in group {} (there are {groups})",
            g.name,
            u32_at(g.data, i) as i32
        )),
    }
}

/// A checked dequantization, ready to run chunk by chunk.
#[derive(Debug, Clone)]
pub enum Dequantizer<'a> {
    Fp8(Box<Fp8Scales>),
    Bnb4(Bnb4Blocks<'a>),
    Int8(Int8Rows<'a>),
    Packed(PackedInts<'a>),
    Fp4(Box<Fp4Groups<'a>>),
    CtInt(Box<IntGroups<'a>>),
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
            Dequant::Fp4 {
                scale,
                group,
                global_scale,
                divide,
                transpose,
                down,
                positive_zero,
            } => {
                let s = bytes(scale)?;
                let how = match global_scale {
                    None => Fp4Scale::E8m0,
                    Some(g) => {
                        let g = bytes(g)?;
                        if g.dtype != DType::F32 || g.data.len() != 4 {
                            return Err(format!(
                                "global scale {:?} is {} {:?} (needs one F32)",
                                g.name, g.dtype, g.shape
                            ));
                        }
                        let g = f32_at(g.data, 0);
                        if *divide {
                            Fp4Scale::E4m3Divided(g)
                        } else {
                            Fp4Scale::E4m3Times(g)
                        }
                    }
                };
                Dequantizer::Fp4(Box::new(Fp4Groups::new(
                    from,
                    shape,
                    src_len,
                    how,
                    s.dtype,
                    s.data,
                    *group,
                    *transpose,
                    *down,
                    *positive_zero,
                )?))
            }
            Dequant::CtInt {
                scale,
                zero_point,
                g_idx,
                bits,
                group_size,
            } => {
                let zeros = zero_point.as_ref().map(bytes).transpose()?;
                let g_idx = g_idx.as_ref().map(bytes).transpose()?;
                Dequantizer::CtInt(Box::new(IntGroups::new(
                    from,
                    shape,
                    src_len,
                    *bits,
                    *group_size,
                    bytes(scale)?,
                    zeros,
                    g_idx,
                )?))
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
    /// packed words hold several inputs of one row, or rows of one input) and
    /// of compressed-tensors integers (whose rows start new words).
    pub fn align(&self) -> u64 {
        match self {
            Dequantizer::Bnb4(_) => 2,
            Dequantizer::Packed(p) => p.cols.max(1),
            Dequantizer::CtInt(c) => c.cols.max(1),
            Dequantizer::Fp4(f) => f.align(),
            Dequantizer::Fp8(_) | Dequantizer::Int8(_) => 1,
        }
    }

    /// The bytes of the source that output elements `[begin, end)` read.
    pub fn source_range(&self, begin: u64, end: u64) -> (usize, usize) {
        match self {
            Dequantizer::Fp8(_) | Dequantizer::Int8(_) => (begin as usize, end as usize),
            Dequantizer::Bnb4(_) => ((begin / 2) as usize, end.div_ceil(2) as usize),
            Dequantizer::Packed(p) => (0, p.src_len),
            Dequantizer::CtInt(c) => c.source_range(begin, end),
            Dequantizer::Fp4(f) => f.source_range(begin, end),
        }
    }

    /// Whether every chunk reads across the whole source (GPTQ/AWQ: a row of
    /// the output is a column of the packing), so that its pages are to be
    /// released after the last chunk, not after each.
    pub fn reads_whole_source(&self) -> bool {
        match self {
            Dequantizer::Packed(_) => true,
            // transposed, chunks of one matrix read all of it
            Dequantizer::Fp4(f) => f.transposed(),
            _ => false,
        }
    }

    /// The f32 values of output elements `[begin, end)` of `s`, into `out`.
    fn values(&self, s: &Source, begin: u64, end: u64, out: &mut Vec<u8>) {
        out.resize(4 * (end - begin) as usize, 0);
        self.dequantize(Kind::source(self, s, begin, end), begin, out);
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
            Dequantizer::Fp4(d) => d.dequantize(src, first, out),
            Dequantizer::CtInt(d) => d.dequantize(src, first, out),
        }
    }
}

mod bnb4;
mod ct_int;
mod fp4;
mod fp8;
mod int8;
mod packed;
#[cfg(test)]
mod tests;

pub use bnb4::Bnb4Blocks;
pub use ct_int::IntGroups;
pub use fp4::{Fp4Groups, Fp4Scale};
pub use fp8::Fp8Scales;
pub use int8::Int8Rows;
pub use packed::{PackedInts, Packing};

/// Check a dequantization's plan against its tensor (`shape`, the output's)
/// and source, resolving its operands with `operand`.
pub fn check<'a>(
    how: &'a Dequant,
    s: &Source<'a>,
    shape: &[u64],
    operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
) -> std::result::Result<Dequantizer<'a>, Invalid> {
    cast::check_buffers(DType::F32, s.to, 0, 0).map_err(Invalid::Core)?;
    Dequantizer::new(how, s.from, shape, s.src.len(), operand).map_err(Invalid::Plan)
}

impl Kind for Dequantizer<'_> {
    fn units(&self, s: &Source) -> Units {
        Units {
            count: s.numel,
            align: self.align(),
            held: s.to.size().max(4) as u64,
        }
    }

    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        let (begin, end) = self.source_range(begin, end);
        &s.src[begin..end]
    }

    fn reads_whole_source(&self) -> bool {
        Dequantizer::reads_whole_source(self)
    }

    /// The rounding of the f32 values to the output dtype.
    fn rule(&self, s: &Source) -> Option<LossRule> {
        Some(rule_for(DType::F32, s.to))
    }

    fn produce(
        &self,
        s: &Source,
        begin: u64,
        end: u64,
        opts: &CastOptions,
        rule: Option<&LossRule>,
        put: &mut Put,
    ) -> Result<u64> {
        put_f32(|v| self.values(s, begin, end, v), s.to, opts, rule, put)
    }

    fn scan(&self, s: &Source, begin: u64, end: u64, rule: Option<&LossRule>) -> Option<LossStats> {
        scan_f32(|v| self.values(s, begin, end, v), rule)
    }
}
