//! A LoRA adapter merged into its base weight, as PEFT's `merge_and_unload`
//! computes it in fp32, then rounded once to the output dtype.
//!
//! The base weight `W` is 2-D `[rows, cols]` as stored: `nn.Linear`'s
//! `[out, in]`, transformers `Conv1D`'s `[in, out]`, an embedding's
//! `[tokens, dim]`. With `lora_A` `[r, ·]` and `lora_B` `[·, r]`:
//!
//! - `delta = B @ A` (`[rows, cols]`), or with `transpose` (`fan_in_fan_out`
//!   Conv1D, `lora_embedding_A/B`) `delta = (B @ A)ᵀ`;
//! - `v = W + delta * scale`, the product in f32 (as PEFT's) with `scale` an
//!   f32 (as torch applies it). For an f32 or f64 output the scaling and the
//!   sum are in f64, rounded once by the output's cast, where PEFT's fp32
//!   merge rounds at each operation: an fp32 output is never less exact than
//!   PEFT's. For a narrower one (bf16, fp16) the GEMM adds `scale · (B @ A)`
//!   to W's f32 values in place (PEFT's fp32 order), and that f32 sum is
//!   rounded once to the output: within an ulp of PEFT's, at half the memory
//!   traffic of an f64 pass;
//! - a bias (`lora_bias`): `v = b + scale · B.bias`, as the same product with
//!   `rank` 1, `cols` 1 and `A = [[1]]` (no `lora_A` in the recipe): one rounding
//!   of the sum, as for a weight;
//! - DoRA: `v * (m / ‖v‖)`, the norm taken per output feature over the input
//!   features (a row of `v`; with `transpose`, a column), all in f64, then
//!   rounded to f32 and, for a narrower output, to it (as torch rounds an f64
//!   tensor to bf16: through f32).
//!
//! The product is computed a block of output rows at a time (`matrixmultiply`:
//! as fast as `gemm` and `faer` on one thread here, at a fraction of their
//! build; see CHANGELOG.md), so memory is that of a chunk; `A` and `B` are
//! decoded to f32 once per tensor and worker.
//! A quantized base (`base`) is dequantized to f32 first, by its format's
//! exact reference ([`super::dequant`]), never rounded before the sum.

use std::cell::RefCell;

use serde::Deserialize;

use super::cast::{put_rounded, rule_for};
use super::dequant::{Bytes, Dequant, Dequantizer, Operand};
use super::{holds, Invalid, Kind, Put, Source, Units, FLOATS};
use crate::cast::{self, CastOptions};
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};

/// Output rows a chunk holds a multiple of (the f32 GEMM kernels' tile height
/// divides it).
const ROWS: usize = 32;
/// The widest weight whose chunks are cut in `ROWS` rows (32 rows of 16k f32
/// values are 2 MiB); wider ones are cut at any row, so that a chunk stays
/// near the executor's budget.
const WIDEST_TILED: usize = 1 << 14;

/// How a merged weight's values are made: the plan's recipe.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Merge {
    /// `lora_A` (`lora_embedding_A`): `[r, cols]`, with `transpose` `[r, rows]`;
    /// none for a bias (`lora_bias`), whose update is `B` itself.
    pub a: Option<Operand>,
    /// `lora_B` (`lora_embedding_B`): `[rows, r]`, with `transpose` `[cols, r]`;
    /// for a bias, `lora_B`'s bias, `[rows]`.
    pub b: Operand,
    /// `lora_alpha / r` (or `/ sqrt(r)`), applied as an f32, as torch applies
    /// a Python float to an f32 tensor.
    pub scale: f64,
    /// The delta is `(B @ A)ᵀ`.
    #[serde(default)]
    pub transpose: bool,
    /// DoRA's `lora_magnitude_vector`, one per output feature.
    #[serde(default)]
    pub magnitude: Option<Operand>,
    /// A quantized base's format: its values are dequantized before the sum.
    #[serde(default)]
    pub base: Option<Box<Dequant>>,
    /// LoRA on a parameter of stacked experts (PEFT's `ParamWrapper`): `A` is
    /// `[experts · r, ·]`, grouped by expert, `B` `[·, r · experts]`, the
    /// experts interleaved (column `k · experts + e`); expert `e`'s update is
    /// `B_e @ A_e` (transposed with `transpose`). 1 for any other merge.
    #[serde(default = "one")]
    pub experts: u64,
    /// The rows of one expert's update, the whole update being
    /// `[experts · expert_rows, cols]`; 0: the output's rows.
    #[serde(default)]
    pub expert_rows: u64,
    /// The row of that whole update the output's first row is: a base that
    /// stores its experts one by one holds a slice of it per tensor.
    #[serde(default)]
    pub first_row: u64,
}

fn one() -> u64 {
    1
}

/// A bias's `A`: `[[1.0]]`, little-endian f32.
static ONE: [u8; 4] = 1f32.to_le_bytes();

/// An adapter tensor's bytes, checked to hold a float tensor of `shape`.
fn floats<'a>(
    what: &str,
    op: &'a Operand,
    data: &'a [u8],
    shape: &[u64],
) -> std::result::Result<(&'a [u8], DType), String> {
    let bytes = Bytes::new(op, data)?;
    bytes.expect(what, &FLOATS, shape)?;
    Ok((bytes.data, bytes.dtype))
}

/// `data` (of `dtype`) as f32 values, exactly (f64 rounded as torch does).
fn decode(data: &[u8], dtype: DType, out: &mut Vec<f32>) {
    out.resize(data.len() / dtype.size(), 0.0);
    decode_into(data, dtype, out);
}

/// `data` (of `dtype`) cast to f32 into `out`, which holds as many elements.
fn decode_into(data: &[u8], dtype: DType, out: &mut [f32]) {
    cast::cast(
        data,
        dtype,
        bytes_of_mut(out),
        DType::F32,
        &CastOptions::default(),
    )
    .expect("a float dtype casts to f32");
}

/// The bytes of a slice of floats (little-endian targets: the casts write them).
fn bytes_of_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: f32/f64 have no invalid bit patterns and a stricter alignment than u8.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The same, read-only.
fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A tensor's `A` and `B` in f32, kept by each worker for the tensor it is on.
#[derive(Default)]
struct Decoded {
    /// The [`Merger::id`] they were decoded for (0: none). Not the bytes'
    /// address: a batch maps one adapter after another, often at the address
    /// the last one had.
    key: u64,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The next [`Merger::id`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static DECODED: RefCell<Decoded> = RefCell::new(Decoded::default());
    /// The base values of a chunk's rows (f32), then their product with the
    /// update's.
    static BASE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PRODUCT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The merged values of a chunk, f64, and (a narrower output) f32.
    static MERGED: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
    static NARROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A checked merge, ready to run a block of rows at a time.
pub struct Merger<'a> {
    rows: usize,
    cols: usize,
    rank: usize,
    /// Stacked experts: their count, the rows of each one's update, and the
    /// update's row the output's first row is (see [`Merge::experts`]).
    experts: usize,
    expert_rows: usize,
    first_row: usize,
    a: (&'a [u8], DType),
    b: (&'a [u8], DType),
    scale: f32,
    transpose: bool,
    /// DoRA: the magnitude per output feature, in f32.
    magnitude: Option<Vec<f32>>,
    /// DoRA with `transpose`: each column's `m / ‖v[:, j]‖`, found by a pass
    /// over the whole weight when the merge is checked.
    column_factors: Option<Vec<f64>>,
    base: Option<Dequantizer<'a>>,
    /// The output is f32 or f64: the values are kept in f64 to its rounding.
    wide: bool,
    /// Unique to this merger, for the workers' decoded `A` and `B`.
    id: u64,
}

impl<'a> Merger<'a> {
    /// Check `how` against the weight it makes (`shape`, the output's) and its
    /// source, resolving the adapter's tensors with `operand`.
    pub fn check(
        how: &'a Merge,
        s: &Source<'a>,
        shape: &[u64],
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<Merger<'a>, Invalid> {
        cast::check_buffers(DType::F64, s.to, 0, 0).map_err(Invalid::Core)?;
        let experts = how.experts;
        let (rows, cols) = match (shape, &how.a) {
            (&[rows, cols], Some(_)) => (rows, cols),
            // a stack held whole: its leading dimension is the experts
            (&[e, rows, cols], Some(_)) if e == experts => (e * rows, cols),
            (&[rows], None) if !how.transpose && how.magnitude.is_none() && experts == 1 => {
                (rows, 1)
            }
            _ => {
                return Err(Invalid::Plan(format!(
                    "a merged weight is 2-D (3-D with stacked experts, a merged bias 1-D), \
                     not {shape:?}"
                )))
            }
        };
        let expert_rows = if how.expert_rows == 0 {
            rows
        } else {
            how.expert_rows
        };
        if experts == 0
            || how.first_row + rows > experts * expert_rows
            || (experts > 1 && how.magnitude.is_some())
        {
            return Err(Invalid::Plan(format!(
                "rows {}..{} of {experts} experts' updates of {expert_rows} rows{}",
                how.first_row,
                how.first_row + rows,
                if how.magnitude.is_some() {
                    " with DoRA"
                } else {
                    ""
                }
            )));
        }
        let base = match &how.base {
            None => {
                if !FLOATS.contains(&s.from) {
                    return Err(Invalid::Plan(format!(
                        "the base weight is {}, not a float",
                        s.from
                    )));
                }
                holds(s, shape)?;
                None
            }
            Some(d) => Some(
                Dequantizer::new(d, s.from, shape, s.src.len(), operand).map_err(Invalid::Plan)?,
            ),
        };
        let (a_other, b_other) = if how.transpose {
            (expert_rows, cols)
        } else {
            (cols, expert_rows)
        };
        let plan = |e: String| Invalid::Plan(e);
        let (rank, a, b) = match &how.a {
            Some(op) => {
                let stacked = op.shape.first().copied().unwrap_or(0);
                let rank = stacked / experts;
                if rank == 0 || stacked % experts != 0 {
                    return Err(Invalid::Plan(format!(
                        "{:?} has {stacked} rows, not a rank for each of {experts} experts",
                        op.name
                    )));
                }
                let a = floats(
                    "lora_A",
                    op,
                    operand(op).map_err(plan)?,
                    &[stacked, a_other],
                );
                let data = operand(&how.b).map_err(plan)?;
                let b = floats("lora_B", &how.b, data, &[b_other, stacked]);
                (rank, a.map_err(plan)?, b.map_err(plan)?)
            }
            None => {
                let data = operand(&how.b).map_err(plan)?;
                let b = floats("lora_B's bias", &how.b, data, &[rows]).map_err(plan)?;
                (1, (&ONE[..], DType::F32), b)
            }
        };
        let magnitude = match &how.magnitude {
            None => None,
            Some(m) => {
                let features = if how.transpose { cols } else { rows };
                let data = operand(m).map_err(plan)?;
                let (data, dtype) = floats("magnitude", m, data, &[features]).map_err(plan)?;
                let mut v = Vec::new();
                decode(data, dtype, &mut v);
                Some(v)
            }
        };
        let mut merger = Merger {
            rows: rows as usize,
            cols: cols as usize,
            rank: rank as usize,
            experts: experts as usize,
            expert_rows: expert_rows as usize,
            first_row: how.first_row as usize,
            a,
            b,
            scale: how.scale as f32,
            transpose: how.transpose,
            magnitude,
            column_factors: None,
            base,
            wide: matches!(s.to, DType::F32 | DType::F64),
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        if merger.transpose && merger.magnitude.is_some() {
            merger.column_factors = Some(merger.column_norms(s));
        }
        Ok(merger)
    }

    /// DoRA with `transpose`: `m / ‖v[:, j]‖` per column, from a pass over
    /// every row (the norm of a column needs all of them).
    fn column_norms(&self, s: &Source) -> Vec<f64> {
        let mut sums = vec![0f64; self.cols];
        let block = (1 << 20) / self.cols.max(1);
        let block = block.clamp(1, self.rows.max(1));
        let mut v = Vec::new();
        let mut begin = 0;
        while begin < self.rows {
            let end = (begin + block).min(self.rows);
            self.merged(s, begin, end, &mut v, false);
            for row in v.chunks_exact(self.cols) {
                for (sum, &x) in sums.iter_mut().zip(row) {
                    *sum += x * x;
                }
            }
            begin = end;
        }
        let m = self.magnitude.as_ref().expect("DoRA");
        sums.iter()
            .zip(m)
            .map(|(&sum, &m)| f64::from(m) / sum.sqrt())
            .collect()
    }

    /// The merged values of rows `[begin, end)` in f64, into `out`; with
    /// `dora`, DoRA's scaling applied.
    fn merged(&self, s: &Source, begin: usize, end: usize, out: &mut Vec<f64>, dora: bool) {
        let (n, cols) = ((end - begin) * self.cols, self.cols);
        out.resize(n, 0.0);
        let scale = f64::from(self.scale);
        BASE.with_borrow_mut(|base| {
            self.base_into(s, begin, end, base);
            PRODUCT.with_borrow_mut(|product| {
                product.resize(n, 0.0);
                self.product(begin, end, product);
                for ((v, &w), &p) in out.iter_mut().zip(base.iter()).zip(product.iter()) {
                    *v = f64::from(w) + f64::from(p) * scale;
                }
            });
        });
        if !dora {
            return;
        }
        if let Some(factors) = &self.column_factors {
            for row in out.chunks_exact_mut(cols) {
                for (v, &f) in row.iter_mut().zip(factors) {
                    *v *= f;
                }
            }
        } else if let Some(m) = &self.magnitude {
            for (row, &m) in out.chunks_exact_mut(cols).zip(&m[begin..end]) {
                let norm = row.iter().map(|&x| x * x).sum::<f64>().sqrt();
                let factor = f64::from(m) / norm;
                for v in row {
                    *v *= factor;
                }
            }
        }
    }

    /// `(B @ A)` (or its transpose) for output rows `[begin, end)`, into `out`.
    fn product(&self, begin: usize, end: usize, out: &mut [f32]) {
        self.gemm(begin, end, out, 1.0, 0.0);
    }

    /// `out = alpha · (B @ A) + beta · out` (or the transpose) for output rows
    /// `[begin, end)`, an expert at a time.
    fn gemm(&self, begin: usize, end: usize, out: &mut [f32], alpha: f32, beta: f32) {
        DECODED.with_borrow_mut(|d| {
            if d.key != self.id {
                decode(self.a.0, self.a.1, &mut d.a);
                decode(self.b.0, self.b.1, &mut d.b);
                d.key = self.id;
            }
            let mut row = begin;
            while row < end {
                let g = self.first_row + row;
                let (e, local) = (g / self.expert_rows, g % self.expert_rows);
                let stop = end.min(row + self.expert_rows - local);
                let out = &mut out[(row - begin) * self.cols..(stop - begin) * self.cols];
                self.expert_gemm(d, e, local, stop - row, out, alpha, beta);
                row = stop;
            }
        });
    }

    /// [`Self::gemm`] for `m` rows of expert `e`'s update from its row `local`:
    /// its `A` rows `e · r ..`, its `B` columns `k · experts + e`.
    #[allow(clippy::too_many_arguments)]
    fn expert_gemm(
        &self,
        d: &Decoded,
        e: usize,
        local: usize,
        m: usize,
        out: &mut [f32],
        alpha: f32,
        beta: f32,
    ) {
        let (k, n, experts) = (self.rank, self.cols, self.experts);
        let kb = (k * experts) as isize; // a row of B
                                         // SAFETY: every pointer and stride below addresses elements inside the
                                         // slices: A holds `[experts · k, ·]`, B `[·, k · experts]` (checked), and
                                         // `out` m × n.
        unsafe {
            if self.transpose {
                // out[i, j] = Σ A[e·k + k', local + i] · B[j, k'·experts + e]
                let a_row = self.expert_rows;
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    alpha,
                    d.a.as_ptr().add(e * k * a_row + local),
                    1,
                    a_row as isize,
                    d.b.as_ptr().add(e),
                    experts as isize,
                    kb,
                    beta,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                );
            } else {
                // out[i, j] = Σ B[local + i, k'·experts + e] · A[e·k + k', j]
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    alpha,
                    d.b.as_ptr().add(local * k * experts + e),
                    kb,
                    experts as isize,
                    d.a.as_ptr().add(e * k * n),
                    n as isize,
                    1,
                    beta,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
    }

    /// The values of output elements `[begin, end)` (whole rows) as bytes, and
    /// their dtype, handed to `f`: f64 for an f32 or f64 output (rounded once,
    /// by the output's cast), else f32, the f64 sum rounded once to it, which
    /// the output's cast rounds as torch rounds an f64 tensor to bf16 or fp16
    /// (through f32: the same bits as from the f64 values, by the SIMD kernels).
    fn with_values<R>(
        &self,
        s: &Source,
        begin: u64,
        end: u64,
        f: impl FnOnce(&[u8], DType) -> R,
    ) -> R {
        let cols = self.cols.max(1) as u64;
        let (r0, r1) = ((begin / cols) as usize, (end / cols) as usize);
        MERGED.with_borrow_mut(|wide| {
            if self.wide || self.magnitude.is_some() {
                self.merged(s, r0, r1, wide, true);
                if self.wide {
                    return f(bytes_of(wide), DType::F64);
                }
            }
            NARROW.with_borrow_mut(|narrow| {
                if self.magnitude.is_some() {
                    narrow.clear();
                    narrow.extend(wide.iter().map(|&v| v as f32));
                } else {
                    self.fused(s, r0, r1, narrow);
                }
                f(bytes_of(narrow), DType::F32)
            })
        })
    }

    /// The values of output elements `[begin, end)` (whole rows) as an f32
    /// output holds them, little-endian, into `out`: the f64 sum rounded once
    /// to f32 (the merger was checked for an f32 output), for `--quantize` to
    /// quantize the merged weight as it would the f32 weight.
    pub(crate) fn f32_values(&self, s: &Source, begin: u64, end: u64, out: &mut Vec<u8>) {
        debug_assert!(self.wide, "checked for an f32 output");
        self.with_values(s, begin, end, |values, dtype| {
            out.clear();
            if dtype == DType::F64 {
                out.extend(values.chunks_exact(8).flat_map(|b| {
                    let v = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    (v as f32).to_le_bytes() // round to nearest even, as the f64 -> f32 cast
                }));
            } else {
                out.extend_from_slice(values);
            }
        });
    }

    /// `W + scale · (B @ A)` of rows `[begin, end)` in f32, in PEFT's order (the
    /// product, scaled, added to W), the GEMM adding it to the base's values in
    /// place: for an output narrower than f32, which rounds them once more.
    fn fused(&self, s: &Source, begin: usize, end: usize, out: &mut Vec<f32>) {
        self.base_into(s, begin, end, out);
        self.gemm(begin, end, out, self.scale, 1.0);
    }

    /// The base's values of rows `[begin, end)` in f32 (cast exactly, or
    /// dequantized), into `out`.
    fn base_into(&self, s: &Source, begin: usize, end: usize, out: &mut Vec<f32>) {
        let (first, last) = ((begin * self.cols) as u64, (end * self.cols) as u64);
        out.resize((last - first) as usize, 0.0);
        let src = self.source(s, first, last);
        match &self.base {
            None => decode_into(src, s.from, out),
            Some(d) => d.dequantize(src, first, bytes_of_mut(out)),
        }
    }

    /// The dtype of the values the output is rounded from.
    fn values_dtype(&self) -> DType {
        if self.wide {
            DType::F64
        } else {
            DType::F32
        }
    }
}

impl Kind for Merger<'_> {
    fn units(&self, s: &Source) -> Units {
        // Whole rows, ROWS of them where the weight has them and they stay
        // small (a chunk holds at least that many): the GEMM's tiles are full
        // then (a partial tile costs a masked kernel).
        let rows = if self.rows >= ROWS && self.cols <= WIDEST_TILED {
            ROWS
        } else {
            1
        };
        // f32 values, or (DoRA, an f32 or f64 output) the base and product in
        // f32 and the sum in f64 and f32; and the output
        let held = if self.wide || self.magnitude.is_some() {
            20
        } else {
            4
        };
        Units {
            count: s.numel,
            align: (self.cols.max(1) * rows) as u64,
            held: held + s.to.size() as u64,
        }
    }

    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        match &self.base {
            None => {
                let size = s.from.size() as u64;
                &s.src[(begin * size) as usize..(end * size) as usize]
            }
            Some(d) => {
                let (from, to) = d.source_range(begin, end);
                &s.src[from..to]
            }
        }
    }

    fn reads_whole_source(&self) -> bool {
        self.base
            .as_ref()
            .is_some_and(Dequantizer::reads_whole_source)
    }

    /// The rounding of the values to the output dtype.
    fn rule(&self, s: &Source) -> Option<LossRule> {
        Some(rule_for(self.values_dtype(), s.to))
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
        self.with_values(s, begin, end, |values, dtype| {
            put_rounded(values, dtype, s.to, opts, rule, put)
        })
    }

    fn scan(&self, s: &Source, begin: u64, end: u64, rule: Option<&LossRule>) -> Option<LossStats> {
        self.with_values(s, begin, end, |values, _| rule.map(|r| r.scan(values)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cast::scalar;

    fn operand(name: &str, shape: &[u64], offset: u64, dtype: &str) -> Operand {
        let size = if dtype == "F32" { 4 } else { 2 };
        let n: u64 = shape.iter().product();
        Operand {
            name: name.into(),
            source: 0,
            dtype: dtype.into(),
            shape: shape.to_vec(),
            offsets: (offset, offset + n * size),
        }
    }

    fn le(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A naive merge in f64 of the same operation order's terms.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        w: &[f32],
        a: &[f32],
        b: &[f32],
        r: usize,
        rows: usize,
        cols: usize,
        t: bool,
        s: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let mut acc = 0f64;
                for k in 0..r {
                    acc += if t {
                        f64::from(a[k * rows + i]) * f64::from(b[j * r + k])
                    } else {
                        f64::from(b[i * r + k]) * f64::from(a[k * cols + j])
                    };
                }
                out[i * cols + j] =
                    (f64::from(w[i * cols + j]) + f64::from(acc as f32) * f64::from(s)) as f32;
            }
        }
        out
    }

    /// `n` values in [-0.5, 0.5), an LCG's.
    pub(crate) fn random(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn run(t: bool, dora: bool) {
        run_to(t, dora, DType::F32);
        run_to(t, dora, DType::BF16);
    }

    fn run_to(t: bool, dora: bool, to: DType) {
        let (rows, cols, r) = (37usize, 23usize, 5usize);
        let mut seed = 7;
        let w = random(rows * cols, &mut seed);
        let (a_other, b_other) = if t { (rows, cols) } else { (cols, rows) };
        let a = random(r * a_other, &mut seed);
        let b = random(b_other * r, &mut seed);
        let m = random(if t { cols } else { rows }, &mut seed);
        let mut file = le(&w);
        let a_at = file.len() as u64;
        file.extend(le(&a));
        let b_at = file.len() as u64;
        file.extend(le(&b));
        let m_at = file.len() as u64;
        file.extend(le(&m));
        let how = Merge {
            a: Some(operand("A", &[r as u64, a_other as u64], a_at, "F32")),
            b: operand("B", &[b_other as u64, r as u64], b_at, "F32"),
            scale: 0.75,
            transpose: t,
            magnitude: dora.then(|| operand("m", &[m.len() as u64], m_at, "F32")),
            base: None,
            experts: 1,
            expert_rows: 0,
            first_row: 0,
        };
        let shape = [rows as u64, cols as u64];
        let s = Source {
            src: &file[..4 * rows * cols],
            file: &file,
            from: DType::F32,
            to,
            numel: (rows * cols) as u64,
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        let merger = Merger::check(&how, &s, &shape, &op).ok().expect("checks");
        let mut want = naive(&w, &a, &b, r, rows, cols, t, 0.75);
        if dora {
            if t {
                for j in 0..cols {
                    let n: f64 = (0..rows)
                        .map(|i| f64::from(want[i * cols + j]).powi(2))
                        .sum();
                    let f = m[j] / n.sqrt() as f32;
                    (0..rows).for_each(|i| want[i * cols + j] *= f);
                }
            } else {
                for i in 0..rows {
                    let row = &mut want[i * cols..(i + 1) * cols];
                    let n: f64 = row.iter().map(|&x| f64::from(x).powi(2)).sum();
                    let f = m[i] / n.sqrt() as f32;
                    row.iter_mut().for_each(|x| *x *= f);
                }
            }
        }
        // in chunks of 3 rows, as the executor cuts them
        let mut got = Vec::new();
        let mut begin = 0;
        while begin < rows * cols {
            let end = (begin + 3 * cols).min(rows * cols);
            let mut put = |bytes: &[u8], _: Option<&LossStats>| {
                if to == DType::BF16 {
                    let bf16 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
                    got.extend(bytes.chunks_exact(2).map(|c| scalar::bf16_to_f32(bf16(c))));
                } else {
                    got.extend(
                        bytes
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    );
                }
                Ok(0)
            };
            merger
                .produce(
                    &s,
                    begin as u64,
                    end as u64,
                    &CastOptions::default(),
                    None,
                    &mut put,
                )
                .unwrap();
            begin = end;
        }
        // f32: a few f32 ulp; bf16: within one bf16 ulp (2^-8 relative, rounded)
        let tol = if to == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1e-3),
                "{g} vs {w} ({to})"
            );
        }
    }

    /// A bias (`lora_bias`): `b + scale · B.bias`, rounded once: to f32 from the
    /// exact f64 sum, to bf16 from PEFT's f32 one (within an ulp); any chunking.
    #[test]
    fn a_bias_merges_as_its_sum() {
        let rows = 70usize;
        let mut seed = 3;
        let (w, lb) = (random(rows, &mut seed), random(rows, &mut seed));
        let mut file = le(&w);
        let b_at = file.len() as u64;
        file.extend(le(&lb));
        let how = Merge {
            a: None,
            b: operand("B.bias", &[rows as u64], b_at, "F32"),
            scale: 0.3,
            transpose: false,
            magnitude: None,
            base: None,
            experts: 1,
            expert_rows: 0,
            first_row: 0,
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        let scale = f64::from(0.3f32);
        for to in [DType::F32, DType::BF16] {
            let s = Source {
                src: &file[..4 * rows],
                file: &file,
                from: DType::F32,
                to,
                numel: rows as u64,
            };
            let merger = Merger::check(&how, &s, &[rows as u64], &op).ok().unwrap();
            let align = merger.units(&s).align as usize;
            let mut got = Vec::new();
            for begin in (0..rows).step_by(align) {
                let end = (begin + align).min(rows);
                let mut put = |bytes: &[u8], _: Option<&LossStats>| {
                    got.extend_from_slice(bytes);
                    Ok(0)
                };
                let opts = CastOptions::default();
                merger
                    .produce(&s, begin as u64, end as u64, &opts, None, &mut put)
                    .unwrap();
            }
            for (i, (&w, &b)) in w.iter().zip(&lb).enumerate() {
                let exact = f64::from(w) + f64::from(b) * scale;
                if to == DType::F32 {
                    let g = f32::from_le_bytes(got[4 * i..4 * i + 4].try_into().unwrap());
                    assert_eq!(g, exact as f32, "element {i}");
                } else {
                    let g = scalar::bf16_to_f32(u16::from_le_bytes([got[2 * i], got[2 * i + 1]]));
                    let ulp = (exact.abs().max(1e-3) as f32) / 128.0;
                    assert!(
                        (g - exact as f32).abs() <= ulp,
                        "element {i}: {g} vs {exact}"
                    );
                }
            }
        }
        let two_d = Merger::check(
            &how,
            &Source {
                src: &file[..4 * rows],
                file: &file,
                from: DType::F32,
                to: DType::F32,
                numel: rows as u64,
            },
            &[rows as u64, 1],
            &op,
        );
        assert!(two_d.is_err(), "a recipe without lora_A is a bias's: 1-D");
    }

    /// Stacked experts (PEFT's `ParamWrapper`), as its einsum defines them:
    /// `A.reshape(E, r, in)`, `B.reshape(out, r, E)`, expert `e`'s update
    /// `Σ_k B[o, k, e] · A[e, k, i]`, laid `[E, out, in]` or (`transpose`)
    /// `[E, in, out]`; the whole tensor, or a slice of its rows (a base storing
    /// its experts one by one), in chunks that straddle experts.
    #[test]
    fn stacked_experts_merge_as_peft_einsum() {
        let (experts, r, outs, ins) = (3usize, 2usize, 5usize, 4usize);
        let mut seed = 11;
        let a = random(experts * r * ins, &mut seed);
        let b = random(outs * r * experts, &mut seed);
        let delta = |e: usize, o: usize, i: usize| -> f32 {
            let acc: f64 = (0..r)
                .map(|k| {
                    f64::from(b[o * r * experts + k * experts + e])
                        * f64::from(a[(e * r + k) * ins + i])
                })
                .sum();
            acc as f32
        };
        for transpose in [false, true] {
            let (d1, d2) = if transpose { (ins, outs) } else { (outs, ins) };
            // the whole stack, then expert 1's rows 1..4 alone
            for (first, rows) in [(0, experts * d1), (d1 + 1, 3)] {
                let w = random(rows * d2, &mut seed);
                let mut file = le(&w);
                let a_at = file.len() as u64;
                file.extend(le(&a));
                let b_at = file.len() as u64;
                file.extend(le(&b));
                let how = Merge {
                    a: Some(operand(
                        "A",
                        &[(experts * r) as u64, ins as u64],
                        a_at,
                        "F32",
                    )),
                    b: operand("B", &[outs as u64, (r * experts) as u64], b_at, "F32"),
                    scale: 0.5,
                    transpose,
                    magnitude: None,
                    base: None,
                    experts: experts as u64,
                    expert_rows: d1 as u64,
                    first_row: first as u64,
                };
                let shape: Vec<u64> = if first == 0 {
                    vec![experts as u64, d1 as u64, d2 as u64]
                } else {
                    vec![rows as u64, d2 as u64]
                };
                let s = Source {
                    src: &file[..4 * rows * d2],
                    file: &file,
                    from: DType::F32,
                    to: DType::F32,
                    numel: (rows * d2) as u64,
                };
                let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
                let merger = Merger::check(&how, &s, &shape, &op).ok().expect("checks");
                let mut got = Vec::new();
                for begin in (0..rows).step_by(2) {
                    let end = (begin + 2).min(rows);
                    let mut put = |bytes: &[u8], _: Option<&LossStats>| {
                        got.extend(
                            bytes
                                .chunks_exact(4)
                                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                        );
                        Ok(0)
                    };
                    let (b0, b1) = ((begin * d2) as u64, (end * d2) as u64);
                    merger
                        .produce(&s, b0, b1, &CastOptions::default(), None, &mut put)
                        .unwrap();
                }
                for row in 0..rows {
                    let g = first + row;
                    let (e, local) = (g / d1, g % d1);
                    for j in 0..d2 {
                        let dv = if transpose {
                            delta(e, j, local)
                        } else {
                            delta(e, local, j)
                        };
                        let want = (f64::from(w[row * d2 + j]) + f64::from(dv) * 0.5) as f32;
                        let got = got[row * d2 + j];
                        assert!(
                            (got - want).abs() <= 1e-6,
                            "t={transpose} row {g} col {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        // DoRA does not stack; rows past the last expert's are refused
        let file = vec![0u8; 4096];
        let s = Source {
            src: &file[..4 * 8],
            file: &file,
            from: DType::F32,
            to: DType::F32,
            numel: 8,
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        let how = Merge {
            a: Some(operand("A", &[4, 2], 0, "F32")),
            b: operand("B", &[2, 4], 64, "F32"),
            scale: 1.0,
            transpose: false,
            magnitude: None,
            base: None,
            experts: 2,
            expert_rows: 2,
            first_row: 3,
        };
        let dora = Merge {
            magnitude: Some(operand("m", &[2], 128, "F32")),
            first_row: 0,
            ..how.clone()
        };
        let ok = Merge {
            first_row: 0,
            ..how.clone()
        };
        assert!(
            Merger::check(&how, &s, &[4, 2], &op).is_err(),
            "rows 3..7 of 4"
        );
        assert!(
            Merger::check(&ok, &s, &[4, 1, 2], &op).is_err(),
            "a stack of 4 for 2 experts"
        );
        let single = Merge {
            a: Some(operand("A", &[2, 2], 0, "F32")),
            b: operand("B", &[4, 2], 64, "F32"),
            experts: 1,
            expert_rows: 4,
            ..ok.clone()
        };
        assert!(
            Merger::check(&single, &s, &[1, 4, 2], &op).is_ok(),
            "a stack of one expert, as PEFT merges it (a Linear's update)"
        );
        assert!(
            Merger::check(&dora, &s, &[2, 2, 2], &op).is_err(),
            "DoRA with experts"
        );
        assert!(Merger::check(&ok, &s, &[2, 2, 2], &op).is_ok());
    }

    #[test]
    fn merges_as_the_naive_product() {
        for t in [false, true] {
            for dora in [false, true] {
                run(t, dora);
            }
        }
    }

    /// A second merge whose adapter lies at the same addresses as the first's
    /// (a batch maps one adapter file after another, often where the last one
    /// was) must read its own values, not the first's decoded ones.
    #[test]
    fn a_new_adapter_at_the_same_address_is_decoded_again() {
        let (rows, cols, r) = (4usize, 3usize, 2usize);
        let w = vec![0f32; rows * cols];
        let mut file = le(&w);
        let a_at = file.len() as u64;
        file.extend(le(&vec![1f32; r * cols]));
        let b_at = file.len() as u64;
        file.extend(le(&vec![1f32; rows * r]));
        let how = Merge {
            a: Some(operand("A", &[r as u64, cols as u64], a_at, "F32")),
            b: operand("B", &[rows as u64, r as u64], b_at, "F32"),
            scale: 1.0,
            transpose: false,
            magnitude: None,
            base: None,
            experts: 1,
            expert_rows: 0,
            first_row: 0,
        };
        let first_value = |file: &[u8]| {
            let s = Source {
                src: &file[..4 * rows * cols],
                file,
                from: DType::F32,
                to: DType::F32,
                numel: (rows * cols) as u64,
            };
            let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
            let merger = Merger::check(&how, &s, &[rows as u64, cols as u64], &op)
                .ok()
                .expect("checks");
            let mut got = 0f32;
            let mut put = |bytes: &[u8], _: Option<&LossStats>| {
                got = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                Ok(0)
            };
            let n = (rows * cols) as u64;
            merger
                .produce(&s, 0, n, &CastOptions::default(), None, &mut put)
                .unwrap();
            got
        };
        assert_eq!(first_value(&file), 2.0); // Σ_k 1 · 1 over rank 2
                                             // the same buffer, other values: A is all 3 now
        let a = a_at as usize;
        file[a..a + 4 * r * cols].copy_from_slice(&le(&vec![3f32; r * cols]));
        assert_eq!(first_value(&file), 6.0);
    }

    #[test]
    fn refuses_shapes_that_do_not_match() {
        let file = vec![0u8; 4096];
        let how = Merge {
            a: Some(operand("A", &[4, 8], 0, "F32")),
            b: operand("B", &[5, 4], 128, "F32"),
            scale: 1.0,
            transpose: false,
            magnitude: None,
            base: None,
            experts: 1,
            expert_rows: 0,
            first_row: 0,
        };
        let s = Source {
            src: &file[..4 * 6 * 8],
            file: &file,
            from: DType::F32,
            to: DType::BF16,
            numel: 48,
        };
        let op = |o: &Operand| Ok(&file[o.offsets.0 as usize..o.offsets.1 as usize]);
        match Merger::check(&how, &s, &[6, 8], &op) {
            Err(Invalid::Plan(p)) => assert!(p.contains("\"B\""), "{p}"),
            _ => panic!("a B of 5 rows merged into 6"),
        }
    }
}
