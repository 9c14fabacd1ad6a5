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
use super::dequant::Operand;
use super::merge::{Merge, Merger};
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

thread_local! {
    /// A merged weight's f32 values, for a chunk to quantize.
    static MERGED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A tensor written by quantizing its source, a float weight, or (with a
/// merger) the base weight with a LoRA adapter's delta added, rounded to f32.
pub enum Quantizing<'a> {
    /// The weight's e4m3 values.
    Weight {
        blocks: Fp8Blocks,
        /// Where its chunks leave the scales they find, once linked.
        stash: OnceLock<Arc<Stash>>,
        merge: Option<Box<Merger<'a>>>,
    },
    /// The weight's scales; `weight` is the weight's output name.
    Scale {
        blocks: Fp8Blocks,
        weight: &'a str,
        /// Where the weight's chunks left them, once linked.
        stash: OnceLock<Arc<Stash>>,
        merge: Option<Box<Merger<'a>>>,
    },
}

impl<'a> Quantizing<'a> {
    /// Check how tensor (`shape`) is quantized from its source: a weight's
    /// values are F8_E4M3 of its shape, its scales F32 of the block grid, and
    /// the source holds the weight (or, with `merge`, the base the merger
    /// checks, resolving the adapter's tensors with `operand`).
    pub fn check(
        how: &'a Quantize,
        s: &Source<'a>,
        shape: &'a [u64],
        merge: Option<&'a Merge>,
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<Quantizing<'a>, Invalid> {
        let to = s.to;
        let weight_shape: &'a [u64] = match how {
            Quantize::Fp8Weight { .. } => shape,
            Quantize::Fp8Scale { weight_shape, .. } => weight_shape,
        };
        // Merged values are quantized as the f32 weight a merge would write.
        let (from, merge) = match merge {
            None => (s.from, None),
            Some(m) => {
                let f32_output = Source {
                    to: DType::F32,
                    ..*s
                };
                let merger = Merger::check(m, &f32_output, weight_shape, operand)?;
                (DType::F32, Some(Box::new(merger)))
            }
        };
        let made = match how {
            Quantize::Fp8Weight { block } => {
                if to != DType::F8E4M3 {
                    return Err(Invalid::Plan(format!(
                        "fp8 values written as {to} (they are F8_E4M3)"
                    )));
                }
                let blocks = Fp8Blocks::new(from, shape, *block).map_err(Invalid::Plan)?;
                let stash = OnceLock::new();
                Quantizing::Weight {
                    blocks,
                    stash,
                    merge,
                }
            }
            Quantize::Fp8Scale { block, weight, .. } => {
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
                Quantizing::Scale {
                    blocks,
                    weight,
                    stash,
                    merge,
                }
            }
        };
        if !made.merges() {
            holds(s, weight_shape)?;
        }
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
                ..
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

    /// The merger whose values are quantized, if the weight is merged.
    fn merger(&self) -> Option<&Merger<'a>> {
        match self {
            Quantizing::Weight { merge, .. } | Quantizing::Scale { merge, .. } => merge.as_deref(),
        }
    }

    fn merges(&self) -> bool {
        self.merger().is_some()
    }

    /// The weight's elements units `[begin, end)` read: the values' own, or
    /// the scales' block-rows (the last cut by the weight's edge).
    fn elements(&self, begin: u64, end: u64) -> (u64, u64) {
        match self {
            Quantizing::Weight { .. } => (begin, end),
            Quantizing::Scale { blocks, .. } => {
                let per_block_row = blocks.grid()[1];
                let bytes = blocks.block_rows_bytes(begin / per_block_row, end / per_block_row);
                // a merged weight's blocks are over its f32 values
                let size = DType::F32.size() as u64;
                (bytes.0 as u64 / size, (bytes.0 + bytes.1) as u64 / size)
            }
        }
    }

    /// `f` of the bytes units `[begin, end)` quantize: the source's, or the
    /// merged weight's f32 values.
    fn with_source<R>(&self, s: &Source, begin: u64, end: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.merger() {
            None => f(self.source(s, begin, end)),
            Some(m) => MERGED.with_borrow_mut(|merged| {
                let (e0, e1) = self.elements(begin, end);
                m.f32_values(s, e0, e1, merged);
                f(merged)
            }),
        }
    }
}

impl Kind for Quantizing<'_> {
    fn units(&self, s: &Source) -> Units {
        match self {
            // Each element's f32 value is held while its block is scaled; a
            // merged one's merge too, in whole tiles of the merger's rows.
            Quantizing::Weight { blocks, merge, .. } => {
                let rows = blocks.block_row_elements();
                let (align, held) = match merge {
                    None => (rows, 4),
                    Some(m) => {
                        let tile = m.units(&Source {
                            to: DType::F32,
                            ..*s
                        });
                        (lcm(rows, tile.align), 4 + tile.held)
                    }
                };
                Units {
                    count: s.numel,
                    align,
                    held,
                }
            }
            // Each scale reads a block of the weight (merged: merges it).
            Quantizing::Scale { blocks, merge, .. } => {
                let merging = merge.as_ref().map_or(0, |m| {
                    m.units(&Source {
                        to: DType::F32,
                        ..*s
                    })
                    .held
                });
                let per_value = 4 + merging;
                Units {
                    count: s.numel,
                    align: blocks.grid()[1],
                    held: per_value * blocks.block_elements(),
                }
            }
        }
    }

    /// A weight's values read their elements; its scales, the block-rows of
    /// the weight they cover.
    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        if let Some(m) = self.merger() {
            let (e0, e1) = self.elements(begin, end);
            return m.source(s, e0, e1);
        }
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

    fn reads_whole_source(&self) -> bool {
        self.merger().is_some_and(|m| m.reads_whole_source())
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
        let n = (end - begin) as usize;
        BUFFER.with_borrow_mut(|buf| match self {
            Quantizing::Weight { blocks, stash, .. } => VALUES.with_borrow_mut(|values| {
                buf.resize(n, 0);
                let per_block_row = blocks.block_row_elements();
                let grid_cols = blocks.grid()[1] as usize;
                // The last block-row may be cut by the weight's edge.
                let mut scales =
                    vec![0f32; (n as u64).div_ceil(per_block_row) as usize * grid_cols];
                let loss = self.with_source(s, begin, end, |src| {
                    blocks.quantize(src, values, buf, &mut scales, opts)
                });
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
                    self.with_source(s, begin, end, |src| blocks.scales(src, &mut scales));
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

/// The least common multiple of two alignments.
fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a.max(1), b.max(1));
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a.max(1) / x * b.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// `how` checked for `s`, no merge.
    fn check<'a>(how: &'a Quantize, s: &Source<'a>, shape: &'a [u64]) -> Quantizing<'a> {
        let none = |o: &'a Operand| -> std::result::Result<&'a [u8], String> {
            Err(format!("no {}", o.name))
        };
        Quantizing::check(how, s, shape, None, &none).ok().unwrap()
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
        let weight = check(&weight_how, &ws, &[4, 4]);
        let scale = check(&scale_how, &ss, &[2, 1]);
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
        let weight = check(&weight_how, &ws, &[4, 4]);
        let other = check(&other_how, &ws, &[4, 4]);
        let scale = check(&scale_how, &ss, &[1, 2]);
        assert!(!Quantizing::link(&weight, &scale), "other blocks");
        assert!(!Quantizing::link(&weight, &other), "two weights");
        assert!(!Quantizing::link(&scale, &other), "the wrong way round");
        assert!(Quantizing::link(&other, &scale));
    }

    /// Quantizing a merged weight is quantizing the f32 weight the merge
    /// writes: values and scales, linked or not, in any chunking of whole
    /// block-rows, and with DoRA (whose norms need every column).
    #[test]
    fn a_merged_weight_quantizes_as_its_f32_merge() {
        use crate::values::merge::Merge;
        let (rows, cols, r) = (70u64, 48u64, 4u64);
        let lcg = |seed: &mut u64, n: u64| crate::values::merge::tests::random(n as usize, seed);
        let mut seed = 11;
        let (w, a, b, m) = (
            lcg(&mut seed, rows * cols),
            lcg(&mut seed, r * cols),
            lcg(&mut seed, rows * r),
            lcg(&mut seed, rows),
        );
        let mut file = f32_bytes(&w);
        let at = |v: &[f32], file: &mut Vec<u8>| {
            let begin = file.len() as u64;
            file.extend(f32_bytes(v));
            (begin, file.len() as u64)
        };
        let (a_at, b_at, m_at) = (at(&a, &mut file), at(&b, &mut file), at(&m, &mut file));
        let operand = |name: &str, shape: &[u64], offsets: (u64, u64)| Operand {
            name: name.into(),
            source: 0,
            dtype: "F32".into(),
            shape: shape.to_vec(),
            offsets,
        };
        let merges: Vec<Merge> = [false, true]
            .map(|dora| Merge {
                a: operand("A", &[r, cols], a_at),
                b: operand("B", &[rows, r], b_at),
                scale: 0.5,
                transpose: false,
                magnitude: dora.then(|| operand("m", &[rows], m_at)),
                base: None,
            })
            .into();
        let blocks = [(32u64, 16u64), (1, cols)];
        let hows: Vec<(Quantize, Quantize)> = blocks
            .iter()
            .map(|&block| {
                let scales = Quantize::Fp8Scale {
                    block,
                    weight: "w".into(),
                    weight_shape: vec![rows, cols],
                };
                (Quantize::Fp8Weight { block }, scales)
            })
            .collect();
        let grids: Vec<[u64; 2]> = blocks
            .iter()
            .map(|b| [rows.div_ceil(b.0), cols.div_ceil(b.1)])
            .collect();
        let shape = [rows, cols];
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        for (merge, dora) in merges.iter().zip([false, true]) {
            let source = |to, numel| Source {
                src: &file[..(4 * rows * cols) as usize],
                file: &file,
                from: DType::F32,
                to,
                numel,
            };
            // The f32 merge, as `--merge-lora --dtype f32` writes it.
            let merger = Merger::check(merge, &source(DType::F32, rows * cols), &shape, &op)
                .ok()
                .unwrap();
            let mut merged = Vec::new();
            merger.f32_values(
                &source(DType::F32, rows * cols),
                0,
                rows * cols,
                &mut merged,
            );
            let plain = Source {
                src: &merged,
                file: &merged,
                from: DType::F32,
                to: DType::F8E4M3,
                numel: rows * cols,
            };
            for ((block, (values_how, scales_how)), grid) in blocks.iter().zip(&hows).zip(&grids) {
                let want_values = {
                    let q = check(values_how, &plain, &shape);
                    produce(&q, &plain, 0, rows * cols)
                };
                let scale_source = Source {
                    to: DType::F32,
                    numel: grid[0] * grid[1],
                    ..plain
                };
                let want_scales = {
                    let q = check(scales_how, &scale_source, grid);
                    produce(&q, &scale_source, 0, grid[0] * grid[1])
                };
                let vs = source(DType::F8E4M3, rows * cols);
                let ss = source(DType::F32, grid[0] * grid[1]);
                for linked in [false, true] {
                    let values = Quantizing::check(values_how, &vs, &shape, Some(merge), &op)
                        .ok()
                        .unwrap();
                    let scales = Quantizing::check(scales_how, &ss, grid, Some(merge), &op)
                        .ok()
                        .unwrap();
                    assert!(!linked || Quantizing::link(&values, &scales));
                    let align = values.units(&vs).align;
                    assert_eq!(align % cols, 0, "whole rows");
                    let mut got = Vec::new();
                    for begin in (0..rows * cols).step_by(align as usize) {
                        got.extend(produce(
                            &values,
                            &vs,
                            begin,
                            (begin + align).min(rows * cols),
                        ));
                    }
                    assert_eq!(got, want_values, "values, dora {dora}, {block:?}");
                    let mut got = Vec::new();
                    for g in 0..grid[0] {
                        got.extend(produce(&scales, &ss, g * grid[1], (g + 1) * grid[1]));
                    }
                    assert_eq!(got, want_scales, "scales, dora {dora}, {block:?}, {linked}");
                }
            }
        }
    }
}
