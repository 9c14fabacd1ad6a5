//! A float weight quantized to fp8 e4m3 in blocks (or rows), as `--quantize`
//! writes it: the weight's e4m3 values, or its F32 scales (computed from the
//! same source, right after the weight; [`fp8`] holds the math).

pub mod fp8;

use serde::Deserialize;

use super::cast::{rule_for, span, BUFFER};
use super::{holds, Invalid, Kind, Put, Source, Units, VALUES};
use crate::cast::CastOptions;
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};
use fp8::Fp8Blocks;

/// A planned tensor written by quantizing its source, a float weight.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Quantize {
    /// The weight's e4m3 values (the tensor has the weight's shape).
    Fp8Weight {
        /// Rows and columns of the weight each scale covers.
        block: (u64, u64),
    },
    /// The weight's F32 scales, `[ceil(rows / block.0), ceil(cols / block.1)]`
    /// (or `[rows, 1]` per channel: the same numbers).
    Fp8Scale {
        block: (u64, u64),
        /// The weight's output name: the executor runs this tensor right
        /// after it, while its pages are still in the page cache.
        weight: String,
        /// The weight's shape (the source holds it).
        weight_shape: Vec<u64>,
    },
}

/// A tensor written by quantizing its source, a float weight.
pub enum Quantizing<'a> {
    /// The weight's e4m3 values.
    Weight(Fp8Blocks),
    /// The weight's scales; `weight` is the weight's output name.
    Scale { blocks: Fp8Blocks, weight: &'a str },
}

impl<'a> Quantizing<'a> {
    /// Check how tensor (`shape`) is quantized from its source: a weight's
    /// values are F8_E4M3 of its shape, its scales F32 of the block grid, and
    /// the source holds the weight.
    pub fn check(
        how: &'a Quantize,
        s: &Source,
        shape: &[u64],
    ) -> std::result::Result<Quantizing<'a>, Invalid> {
        let (to, from) = (s.to, s.from);
        let (made, weight_shape) = match how {
            Quantize::Fp8Weight { block } => {
                if to != DType::F8E4M3 {
                    return Err(Invalid::Plan(format!(
                        "fp8 values written as {to} (they are F8_E4M3)"
                    )));
                }
                let blocks = Fp8Blocks::new(from, shape, *block).map_err(Invalid::Plan)?;
                (Quantizing::Weight(blocks), shape)
            }
            Quantize::Fp8Scale {
                block,
                weight,
                weight_shape,
            } => {
                if to != DType::F32 {
                    return Err(Invalid::Plan(format!(
                        "fp8 scales written as {to} (they are F32)"
                    )));
                }
                let blocks = Fp8Blocks::new(from, weight_shape, *block).map_err(Invalid::Plan)?;
                if shape != blocks.grid() {
                    return Err(Invalid::Plan(format!(
                        "scales of shape {shape:?} for {weight:?} {weight_shape:?} in {block:?} \
                         blocks (needs {:?})",
                        blocks.grid()
                    )));
                }
                (Quantizing::Scale { blocks, weight }, &weight_shape[..])
            }
        };
        holds(s, weight_shape)?;
        Ok(made)
    }
}

impl Kind for Quantizing<'_> {
    fn units(&self, s: &Source) -> Units {
        match self {
            // Each element's f32 value is held while its block is scaled.
            Quantizing::Weight(b) => Units {
                count: s.numel,
                align: b.block_row_elements(),
                held: 4,
            },
            // Each scale reads a block of the weight.
            Quantizing::Scale { blocks, .. } => Units {
                count: s.numel,
                align: blocks.grid()[1],
                held: 4 * blocks.block_elements(),
            },
        }
    }

    /// A weight's values read their elements; its scales, the block-rows of
    /// the weight they cover.
    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        match self {
            Quantizing::Weight(_) => {
                let at = s.offset();
                &s.file[at + span(s.from, begin) as usize..at + span(s.from, end) as usize]
            }
            Quantizing::Scale { blocks, .. } => {
                let per_block_row = blocks.grid()[1];
                let (at, len) = blocks.block_rows_bytes(begin / per_block_row, end / per_block_row);
                &s.src[at..at + len]
            }
        }
    }

    /// Scales re-read their weight's bytes, which the weight counted.
    fn counts_reads(&self) -> bool {
        matches!(self, Quantizing::Weight(_))
    }

    /// For the values: the loss of rounding each `W / s` to e4m3 (counted by
    /// the quantizer, with the input's NaN and inf); scales lose nothing.
    fn rule(&self, s: &Source) -> Option<LossRule> {
        matches!(self, Quantizing::Weight(_)).then(|| rule_for(DType::F32, s.to))
    }

    fn after(&self) -> Option<&str> {
        match self {
            Quantizing::Scale { weight, .. } => Some(weight),
            Quantizing::Weight(_) => None,
        }
    }

    fn produce(
        &self,
        s: &Source,
        begin: u64,
        end: u64,
        opts: &CastOptions,
        _rule: Option<&LossRule>,
        put: &mut Put,
    ) -> Result<u64> {
        let src = self.source(s, begin, end);
        let n = (end - begin) as usize;
        BUFFER.with_borrow_mut(|buf| match self {
            Quantizing::Weight(blocks) => VALUES.with_borrow_mut(|values| {
                buf.resize(n, 0);
                let loss = blocks.quantize(src, values, buf, opts);
                put(buf, Some(&loss))
            }),
            Quantizing::Scale { blocks, .. } => {
                let mut scales = vec![0f32; n];
                blocks.scales(src, &mut scales);
                buf.clear();
                buf.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
                put(buf, None)
            }
        })
    }

    fn scan(&self, s: &Source, begin: u64, end: u64, rule: Option<&LossRule>) -> Option<LossStats> {
        let mut found = None;
        self.produce(
            s,
            begin,
            end,
            &CastOptions::default(),
            rule,
            &mut |_, loss| {
                found = loss.copied();
                Ok(0)
            },
        )
        .ok()?;
        found
    }
}
