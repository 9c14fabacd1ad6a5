//! A 2-D weight with some of its rows replaced, as PEFT merges trainable
//! tokens (`index_copy` of an adapter's `trainable_tokens_delta` into an
//! embedding): each output row is the base's row, or the adapter's row for
//! that index, cast to the output dtype.
//!
//! Both are read as f32 (exactly, from any float dtype but f64, which rounds
//! as torch rounds an f64 tensor to a narrower one: through f32) and rounded
//! once to the output, a chunk of whole rows at a time.

use std::collections::HashMap;

use serde::Deserialize;

use super::cast::rule_for;
use super::dequant::{Bytes, Operand};
use super::{holds, put_f32, scan_f32, Invalid, Kind, Put, Source, Units, FLOATS};
use crate::cast::{self, CastOptions};
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};

/// The plan's recipe: which rows are replaced, and by what.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Rows {
    /// The replacement rows, `[indices.len(), cols]`, in a float dtype.
    pub rows: Operand,
    /// The row of the weight each replacement row takes, in order.
    pub indices: Vec<u64>,
}

/// A checked [`Rows`], ready to make chunks of whole rows.
pub struct RowPatch<'a> {
    cols: usize,
    patch: Bytes<'a>,
    /// Weight row -> replacement row.
    at: HashMap<u64, usize>,
}

impl<'a> RowPatch<'a> {
    /// Check `how` against the weight it makes (`shape`) and its source, resolving
    /// the replacement rows with `operand`.
    pub fn check(
        how: &'a Rows,
        s: &Source<'a>,
        shape: &[u64],
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<RowPatch<'a>, Invalid> {
        cast::check_buffers(DType::F32, s.to, 0, 0).map_err(Invalid::Core)?;
        let &[rows, cols] = shape else {
            return Err(Invalid::Plan(format!(
                "a weight with rows replaced is 2-D, not {shape:?}"
            )));
        };
        if !FLOATS.contains(&s.from) {
            return Err(Invalid::Plan(format!(
                "the weight is {}, not a float",
                s.from
            )));
        }
        holds(s, shape)?;
        let data = operand(&how.rows).map_err(Invalid::Plan)?;
        let patch = Bytes::new(&how.rows, data).map_err(Invalid::Plan)?;
        patch
            .expect(
                "the replacement rows",
                &FLOATS,
                &[how.indices.len() as u64, cols],
            )
            .map_err(Invalid::Plan)?;
        let mut at = HashMap::with_capacity(how.indices.len());
        for (i, &row) in how.indices.iter().enumerate() {
            if row >= rows {
                return Err(Invalid::Plan(format!(
                    "row {row} replaced in a weight of {rows} rows"
                )));
            }
            if at.insert(row, i).is_some() {
                return Err(Invalid::Plan(format!("row {row} replaced twice")));
            }
        }
        Ok(RowPatch {
            cols: cols as usize,
            patch,
            at,
        })
    }

    /// The f32 values of output elements `[begin, end)` (whole rows), into `out`.
    fn values(&self, s: &Source, begin: u64, end: u64, out: &mut Vec<u8>) {
        let cols = self.cols.max(1);
        out.resize(4 * (end - begin) as usize, 0);
        let (from, size, patch_size) = (s.from, s.from.size(), self.patch.dtype.size());
        let (r0, r1) = (begin as usize / cols, end as usize / cols);
        for (i, row) in (r0..r1).enumerate() {
            let dst = &mut out[4 * i * cols..4 * (i + 1) * cols];
            let (src, dtype) = match self.at.get(&(row as u64)) {
                Some(&p) => (
                    &self.patch.data[p * cols * patch_size..(p + 1) * cols * patch_size],
                    self.patch.dtype,
                ),
                None => (&s.src[row * cols * size..(row + 1) * cols * size], from),
            };
            cast::cast(src, dtype, dst, DType::F32, &CastOptions::default())
                .expect("a float dtype casts to f32");
        }
    }
}

impl Kind for RowPatch<'_> {
    fn units(&self, s: &Source) -> Units {
        Units {
            count: s.numel,
            align: self.cols.max(1) as u64,
            held: 4 + s.to.size() as u64,
        }
    }

    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        let size = s.from.size() as u64;
        &s.src[(begin * size) as usize..(end * size) as usize]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::scalar;

    fn le(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn operand(shape: &[u64], offsets: (u64, u64), dtype: &str) -> Operand {
        Operand {
            name: "delta".into(),
            source: 0,
            dtype: dtype.into(),
            shape: shape.to_vec(),
            offsets,
        }
    }

    /// Rows of a bf16 weight replaced by f32 rows, written as f32 and as bf16
    /// in chunks of any number of rows: each row the base's or its
    /// replacement's, cast once.
    #[test]
    fn replaced_rows_come_from_the_patch_the_rest_from_the_weight() {
        let (rows, cols) = (9u64, 5u64);
        let base: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25).collect();
        let mut file: Vec<u8> = base
            .iter()
            .flat_map(|&v| scalar::f32_to_bf16(v).to_le_bytes())
            .collect();
        let delta: Vec<f32> = (0..2 * cols).map(|i| -1.0 - i as f32 / 3.0).collect();
        let at = file.len() as u64;
        file.extend(le(&delta));
        let how = Rows {
            rows: operand(&[2, cols], (at, file.len() as u64), "F32"),
            indices: vec![7, 2],
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        for to in [DType::F32, DType::BF16] {
            let s = Source {
                src: &file[..at as usize],
                file: &file,
                from: DType::BF16,
                to,
                numel: rows * cols,
            };
            let patch = RowPatch::check(&how, &s, &[rows, cols], &op).ok().unwrap();
            for chunk_rows in [1, 2, 4, 9] {
                let mut got = Vec::new();
                let mut begin = 0;
                while begin < rows * cols {
                    let end = (begin + chunk_rows * cols).min(rows * cols);
                    let mut put = |b: &[u8], _: Option<&LossStats>| {
                        got.extend_from_slice(b);
                        Ok(0)
                    };
                    patch
                        .produce(&s, begin, end, &CastOptions::default(), None, &mut put)
                        .unwrap();
                    begin = end;
                }
                let round = |v: f32| scalar::bf16_to_f32(scalar::f32_to_bf16(v));
                for r in 0..rows as usize {
                    for c in 0..cols as usize {
                        let i = r * cols as usize + c;
                        let value = match r {
                            7 => delta[c],
                            2 => delta[cols as usize + c],
                            _ => round(base[i]), // as the bf16 weight holds it
                        };
                        let (g, want) = if to == DType::F32 {
                            let g = f32::from_le_bytes(got[4 * i..4 * i + 4].try_into().unwrap());
                            (g, value)
                        } else {
                            let bits = u16::from_le_bytes([got[2 * i], got[2 * i + 1]]);
                            (scalar::bf16_to_f32(bits), round(value))
                        };
                        assert_eq!(g.to_bits(), want.to_bits(), "row {r} col {c} {to}");
                    }
                }
            }
        }
    }

    /// Indices past the weight, repeated, or rows of another width are refused.
    #[test]
    fn bad_recipes_are_refused() {
        let (rows, cols) = (4u64, 3u64);
        let file = vec![0u8; (4 * rows * cols + 4 * 2 * cols) as usize];
        let at = 4 * rows * cols;
        let s = Source {
            src: &file[..at as usize],
            file: &file,
            from: DType::F32,
            to: DType::F32,
            numel: rows * cols,
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        let rows_op = operand(&[2, cols], (at, file.len() as u64), "F32");
        for indices in [vec![1, 4], vec![2, 2], vec![1]] {
            let how = Rows {
                rows: rows_op.clone(),
                indices,
            };
            assert!(RowPatch::check(&how, &s, &[rows, cols], &|o| op(o)).is_err());
        }
    }
}
