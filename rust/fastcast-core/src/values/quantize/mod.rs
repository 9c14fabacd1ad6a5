//! A float weight quantized to fp8 e4m3 in blocks (or rows), as `--quantize`
//! writes it: the weight's e4m3 values, or its F32 scales (computed from the
//! same source, right after the weight; [`fp8`] holds the math). The weight is
//! its float source, or f32 values made first ([`Made`]): a base merged with a
//! LoRA adapter, or a quantized weight dequantized.
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
use super::dequant::{Dequant, Dequantizer, Operand};
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

/// How a quantized weight's f32 values are made when they are not its float
/// source's: the plan's recipe.
#[derive(Debug, Clone, PartialEq)]
pub enum Made {
    /// The base with a LoRA adapter's delta added (a quantized base
    /// dequantized first), rounded once to f32.
    Merge(Box<Merge>),
    /// A quantized weight dequantized, exactly in f32 (`--dequantize
    /// --quantize`: one format's weight requantized to fp8).
    Dequant(Box<Dequant>),
}

/// A checked [`Made`]: the f32 values of whole rows of the weight, on demand.
pub enum Maker<'a> {
    Merge(Merger<'a>),
    Dequant(Dequantizer<'a>),
}

impl<'a> Maker<'a> {
    /// Check `made` for a weight of `shape` made from `s` (as an f32 output).
    fn check(
        made: &'a Made,
        s: &Source<'a>,
        shape: &[u64],
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<Maker<'a>, Invalid> {
        let f32_output = Source {
            to: DType::F32,
            ..*s
        };
        Ok(match made {
            Made::Merge(m) => Maker::Merge(Merger::check(m, &f32_output, shape, operand)?),
            Made::Dequant(d) => Maker::Dequant(
                Dequantizer::new(d, s.from, shape, s.src.len(), operand).map_err(Invalid::Plan)?,
            ),
        })
    }

    /// The weight's elements `[begin, end)` (whole rows) as little-endian f32,
    /// into `out`.
    fn f32_values(&self, s: &Source, begin: u64, end: u64, out: &mut Vec<u8>) {
        match self {
            Maker::Merge(m) => m.f32_values(s, begin, end, out),
            Maker::Dequant(d) => {
                out.resize(4 * (end - begin) as usize, 0);
                d.dequantize(Kind::source(d, s, begin, end), begin, out);
            }
        }
    }

    /// The source bytes elements `[begin, end)` read.
    fn source<'s>(&self, s: &Source<'s>, begin: u64, end: u64) -> &'s [u8] {
        match self {
            Maker::Merge(m) => m.source(s, begin, end),
            Maker::Dequant(d) => Kind::source(d, s, begin, end),
        }
    }

    /// How its values are cut: the alignment of a chunk, and the bytes held
    /// per element while they are made (the f32 values aside).
    fn tile(&self, s: &Source) -> (u64, u64) {
        match self {
            Maker::Merge(m) => {
                let units = m.units(&Source {
                    to: DType::F32,
                    ..*s
                });
                (units.align, units.held)
            }
            Maker::Dequant(d) => (d.align(), 0),
        }
    }

    fn reads_whole_source(&self) -> bool {
        match self {
            Maker::Merge(m) => m.reads_whole_source(),
            Maker::Dequant(d) => Dequantizer::reads_whole_source(d),
        }
    }
}

thread_local! {
    /// A made weight's f32 values, for a chunk to quantize.
    static MADE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A tensor written by quantizing its source, a float weight, or (with a
/// [`Maker`]) the f32 values made from it.
pub enum Quantizing<'a> {
    /// The weight's e4m3 values.
    Weight {
        blocks: Fp8Blocks,
        /// Where its chunks leave the scales they find, once linked.
        stash: OnceLock<Arc<Stash>>,
        made: Option<Box<Maker<'a>>>,
    },
    /// The weight's scales; `weight` is the weight's output name.
    Scale {
        blocks: Fp8Blocks,
        weight: &'a str,
        /// Where the weight's chunks left them, once linked.
        stash: OnceLock<Arc<Stash>>,
        made: Option<Box<Maker<'a>>>,
    },
}

impl<'a> Quantizing<'a> {
    /// Check how tensor (`shape`) is quantized from its source: a weight's
    /// values are F8_E4M3 of its shape, its scales F32 of the block grid, and
    /// the source holds the weight (or, with `made`, what the maker reads,
    /// resolving the adapter's tensors or the format's operands with
    /// `operand`).
    pub fn check(
        how: &'a Quantize,
        s: &Source<'a>,
        shape: &'a [u64],
        made: Option<&'a Made>,
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<Quantizing<'a>, Invalid> {
        let to = s.to;
        let weight_shape: &'a [u64] = match how {
            Quantize::Fp8Weight { .. } => shape,
            Quantize::Fp8Scale { weight_shape, .. } => weight_shape,
        };
        // Made values are quantized as the f32 weight a merge (or a
        // dequantization) to f32 would write.
        let (from, made) = match made {
            None => (s.from, None),
            Some(m) => (
                DType::F32,
                Some(Box::new(Maker::check(m, s, weight_shape, operand)?)),
            ),
        };
        let quantizing = match how {
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
                    made,
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
                    made,
                }
            }
        };
        if quantizing.maker().is_none() {
            holds(s, weight_shape)?;
        }
        Ok(quantizing)
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

    /// What makes the values quantized, if not the float source.
    fn maker(&self) -> Option<&Maker<'a>> {
        match self {
            Quantizing::Weight { made, .. } | Quantizing::Scale { made, .. } => made.as_deref(),
        }
    }

    /// The weight's elements units `[begin, end)` read: the values' own, or
    /// the scales' block-rows (the last cut by the weight's edge).
    fn elements(&self, begin: u64, end: u64) -> (u64, u64) {
        match self {
            Quantizing::Weight { .. } => (begin, end),
            Quantizing::Scale { blocks, .. } => {
                let per_block_row = blocks.grid()[1];
                let bytes = blocks.block_rows_bytes(begin / per_block_row, end / per_block_row);
                // a made weight's blocks are over its f32 values
                let size = DType::F32.size() as u64;
                (bytes.0 as u64 / size, (bytes.0 + bytes.1) as u64 / size)
            }
        }
    }

    /// `f` of the bytes units `[begin, end)` quantize: the source's, or the
    /// made weight's f32 values.
    fn with_source<R>(&self, s: &Source, begin: u64, end: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.maker() {
            None => f(self.source(s, begin, end)),
            Some(m) => MADE.with_borrow_mut(|made| {
                let (e0, e1) = self.elements(begin, end);
                m.f32_values(s, e0, e1, made);
                f(made)
            }),
        }
    }
}

impl Kind for Quantizing<'_> {
    fn units(&self, s: &Source) -> Units {
        match self {
            // Each element's f32 value is held while its block is scaled; a
            // made one's making too, in whole tiles of the maker's rows.
            Quantizing::Weight { blocks, made, .. } => {
                let rows = blocks.block_row_elements();
                let (align, held) = match made {
                    None => (rows, 4),
                    Some(m) => {
                        let (align, held) = m.tile(s);
                        (lcm(rows, align), 4 + held)
                    }
                };
                Units {
                    count: s.numel,
                    align,
                    held,
                }
            }
            // Each scale reads a block of the weight (made: makes it).
            Quantizing::Scale { blocks, made, .. } => {
                let making = made.as_ref().map_or(0, |m| m.tile(s).1);
                let per_value = 4 + making;
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
        if let Some(m) = self.maker() {
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
        self.maker().is_some_and(Maker::reads_whole_source)
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
                a: Some(operand("A", &[r, cols], a_at)),
                b: operand("B", &[rows, r], b_at),
                scale: 0.5,
                transpose: false,
                magnitude: dora.then(|| operand("m", &[rows], m_at)),
                base: None,
                experts: 1,
                expert_rows: 0,
                first_row: 0,
            })
            .into();
        let shape = [rows, cols];
        let mades: Vec<Made> = merges
            .iter()
            .map(|m| Made::Merge(Box::new(m.clone())))
            .collect();
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        for ((merge, made), dora) in merges.iter().zip(&mades).zip([false, true]) {
            let base = Source {
                src: &file[..(4 * rows * cols) as usize],
                file: &file,
                from: DType::F32,
                to: DType::F32,
                numel: rows * cols,
            };
            // The f32 merge, as `--merge-lora --dtype f32` writes it.
            let merger = Merger::check(merge, &base, &shape, &op).ok().unwrap();
            let mut merged = Vec::new();
            merger.f32_values(&base, 0, rows * cols, &mut merged);
            quantizes_as(made, &base, &merged, &shape, &op, &format!("dora {dora}"));
        }
    }

    /// Quantizing a dequantized weight (`--dequantize --quantize`) is
    /// quantizing the f32 weight `--dequantize --dtype fp32` writes.
    #[test]
    fn a_dequantized_weight_quantizes_as_its_f32_dequantization() {
        use crate::values::dequant::Dequant;
        let (rows, cols) = (70u64, 48u64);
        let mut seed = 5;
        let codes: Vec<u8> = crate::values::merge::tests::random((rows * cols) as usize, &mut seed)
            .iter()
            .map(|v| ((v * 1000.0) as i32 % 128) as i8 as u8)
            .collect();
        let scb: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.37).collect();
        let mut file = codes.clone();
        let scb_at = (file.len() as u64, (file.len() + 4 * scb.len()) as u64);
        file.extend(f32_bytes(&scb));
        let how = Dequant::Int8Rows {
            scb: Operand {
                name: "SCB".into(),
                source: 0,
                dtype: "F32".into(),
                shape: vec![rows],
                offsets: scb_at,
            },
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        let shape = [rows, cols];
        let base = Source {
            src: &file[..(rows * cols) as usize],
            file: &file,
            from: DType::I8,
            to: DType::F32,
            numel: rows * cols,
        };
        let d = Dequantizer::new(&how, DType::I8, &shape, base.src.len(), &op).unwrap();
        let mut dequantized = vec![0u8; (4 * rows * cols) as usize];
        d.dequantize(base.src, 0, &mut dequantized);
        let made = Made::Dequant(Box::new(how.clone()));
        quantizes_as(&made, &base, &dequantized, &shape, &op, "int8 rows");
    }

    /// `made` from `base` quantizes as the f32 weight `want` (`shape`):
    /// values and scales, linked or not, in any chunking of whole block-rows,
    /// in blocks and per row.
    fn quantizes_as<'a>(
        made: &Made,
        base: &Source<'a>,
        want: &[u8],
        shape: &[u64; 2],
        op: &dyn Fn(&Operand) -> std::result::Result<&'a [u8], String>,
        what: &str,
    ) {
        let [rows, cols] = *shape;
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
        let plain = Source {
            src: want,
            file: want,
            from: DType::F32,
            to: DType::F8E4M3,
            numel: rows * cols,
        };
        for ((block, (values_how, scales_how)), grid) in blocks.iter().zip(&hows).zip(&grids) {
            let want_values = {
                let q = check(values_how, &plain, shape);
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
            let vs = Source {
                to: DType::F8E4M3,
                ..*base
            };
            let ss = Source {
                to: DType::F32,
                numel: grid[0] * grid[1],
                ..*base
            };
            for linked in [false, true] {
                let values = Quantizing::check(values_how, &vs, shape, Some(made), &|o| op(o))
                    .ok()
                    .unwrap();
                let scales = Quantizing::check(scales_how, &ss, grid, Some(made), &|o| op(o))
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
                assert_eq!(got, want_values, "values, {what}, {block:?}");
                let mut got = Vec::new();
                for g in 0..grid[0] {
                    got.extend(produce(&scales, &ss, g * grid[1], (g + 1) * grid[1]));
                }
                assert_eq!(got, want_scales, "scales, {what}, {block:?}, {linked}");
            }
        }
    }
}
