//! A float weight quantized to fp8 e4m3 in blocks (or rows), as `--quantize`
//! writes it: the weight's e4m3 values, or its F32 scales (computed from the
//! same source, right after the weight; [`fp8`] holds the math).
//!
//! The weight's chunks find its scales as they go and leave them in a
//! [`Stash`] its scale tensor shares (when both are in one shard), which
//! takes them from there instead of reading the weight again.

pub mod fp8;
mod stash;

pub use stash::Stash;

use std::sync::{Arc, OnceLock};

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
    Weight {
        blocks: Fp8Blocks,
        /// Where its chunks leave the scales they find, once linked.
        stash: OnceLock<Arc<Stash>>,
    },
    /// The weight's scales; `weight` is the weight's output name.
    Scale {
        blocks: Fp8Blocks,
        weight: &'a str,
        /// Where the weight's chunks left them, once linked.
        stash: OnceLock<Arc<Stash>>,
    },
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
                let stash = OnceLock::new();
                (Quantizing::Weight { blocks, stash }, shape)
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
                let stash = OnceLock::new();
                let scale = Quantizing::Scale {
                    blocks,
                    weight,
                    stash,
                };
                (scale, &weight_shape[..])
            }
        };
        holds(s, weight_shape)?;
        Ok(made)
    }

    /// Let `scale` take the scales `weight`'s chunks find: both read the same
    /// source bytes (checked by the caller) in the same blocks. False, and
    /// nothing linked, when they are not a weight and its scales alike.
    pub fn link(weight: &Quantizing, scale: &Quantizing) -> bool {
        let (
            Quantizing::Weight {
                blocks: w,
                stash: a,
            },
            Quantizing::Scale {
                blocks: s,
                stash: b,
                ..
            },
        ) = (weight, scale)
        else {
            return false;
        };
        if !w.same_blocks(s) {
            return false;
        }
        let stash = Arc::new(Stash::new(w.grid()));
        a.set(stash.clone()).is_ok() && b.set(stash).is_ok()
    }
}

impl Kind for Quantizing<'_> {
    fn units(&self, s: &Source) -> Units {
        match self {
            // Each element's f32 value is held while its block is scaled.
            Quantizing::Weight { blocks, .. } => Units {
                count: s.numel,
                align: blocks.block_row_elements(),
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
            Quantizing::Weight { .. } => {
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
        matches!(self, Quantizing::Weight { .. })
    }

    /// For the values: the loss of rounding each `W / s` to e4m3 (counted by
    /// the quantizer, with the input's NaN and inf); scales lose nothing.
    fn rule(&self, s: &Source) -> Option<LossRule> {
        matches!(self, Quantizing::Weight { .. }).then(|| rule_for(DType::F32, s.to))
    }

    fn after(&self) -> Option<&str> {
        match self {
            Quantizing::Scale { weight, .. } => Some(weight),
            Quantizing::Weight { .. } => None,
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
            Quantizing::Weight { blocks, stash } => VALUES.with_borrow_mut(|values| {
                buf.resize(n, 0);
                let per_block_row = blocks.block_row_elements();
                let grid_cols = blocks.grid()[1] as usize;
                // The last block-row may be cut by the weight's edge.
                let mut scales =
                    vec![0f32; (n as u64).div_ceil(per_block_row) as usize * grid_cols];
                let loss = blocks.quantize(src, values, buf, &mut scales, opts);
                if let Some(stash) = stash.get() {
                    stash.put((begin / per_block_row) as usize, &scales);
                }
                put(buf, Some(&loss))
            }),
            Quantizing::Scale { blocks, stash, .. } => {
                let mut scales = vec![0f32; n];
                let first = (begin / blocks.grid()[1]) as usize;
                if !stash
                    .get()
                    .is_some_and(|stash| stash.take(first, &mut scales))
                {
                    blocks.scales(src, &mut scales);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// What `kind` writes for units `[begin, end)` of its tensor.
    fn produce(kind: &Quantizing, s: &Source, begin: u64, end: u64) -> Vec<u8> {
        let mut got = Vec::new();
        let opts = CastOptions::default();
        kind.produce(s, begin, end, &opts, None, &mut |bytes, _| {
            got.extend_from_slice(bytes);
            Ok(0)
        })
        .unwrap();
        got
    }

    /// A 4 x 4 f32 weight read as its e4m3 values and as 2 scales.
    fn sources(w: &[u8]) -> (Source<'_>, Source<'_>) {
        let source = |to, numel| Source {
            src: w,
            file: w,
            from: DType::F32,
            to,
            numel,
        };
        (source(DType::F8E4M3, 16), source(DType::F32, 2))
    }

    fn how(block: (u64, u64)) -> (Quantize, Quantize) {
        let scale = Quantize::Fp8Scale {
            block,
            weight: "w".into(),
            weight_shape: vec![4, 4],
        };
        (Quantize::Fp8Weight { block }, scale)
    }

    #[test]
    fn a_linked_scale_takes_the_scales_its_weight_found() {
        let w = f32_bytes(&(0..16).map(|k| k as f32 - 5.5).collect::<Vec<_>>());
        let (ws, ss) = sources(&w);
        let (weight_how, scale_how) = how((2, 4));
        let weight = Quantizing::check(&weight_how, &ws, &[4, 4]).ok().unwrap();
        let scale = Quantizing::check(&scale_how, &ss, &[2, 1]).ok().unwrap();
        let alone = produce(&scale, &ss, 0, 2);
        assert!(Quantizing::link(&weight, &scale));
        assert!(!Quantizing::link(&weight, &scale), "linked once");
        let values = produce(&weight, &ws, 0, 8);
        assert_eq!(produce(&scale, &ss, 0, 1), alone[..4], "row 0, taken");
        assert_eq!(produce(&scale, &ss, 1, 2), alone[4..], "row 1, computed");
        // Taken, not computed again: numbers left in the stash are written.
        let Quantizing::Weight { stash, .. } = &weight else {
            unreachable!()
        };
        stash.get().unwrap().put(0, &[7.0, 8.0]);
        assert_eq!(produce(&scale, &ss, 0, 2), f32_bytes(&[7.0, 8.0]));
        assert_eq!(produce(&scale, &ss, 0, 2), alone, "taken once");
        assert_eq!(produce(&weight, &ws, 0, 8), values, "values unchanged");
    }

    #[test]
    fn only_a_weight_and_its_scales_in_the_same_blocks_link() {
        let w = f32_bytes(&[1.0; 16]);
        let (ws, ss) = sources(&w);
        let (weight_how, _) = how((2, 4));
        let (other_how, scale_how) = how((4, 2));
        let weight = Quantizing::check(&weight_how, &ws, &[4, 4]).ok().unwrap();
        let other = Quantizing::check(&other_how, &ws, &[4, 4]).ok().unwrap();
        let scale = Quantizing::check(&scale_how, &ss, &[1, 2]).ok().unwrap();
        assert!(!Quantizing::link(&weight, &scale), "other blocks");
        assert!(!Quantizing::link(&weight, &other), "two weights");
        assert!(!Quantizing::link(&scale, &other), "the wrong way round");
        assert!(Quantizing::link(&other, &scale));
    }
}
