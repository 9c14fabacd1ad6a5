//! What each output tensor's values are, and how they are made chunk by chunk.
//!
//! A tensor's values come from exactly one kind, which the plan names
//! ([`Value`]): its source cast (or copied) to the output dtype
//! ([`cast`]), a quantized weight's values reconstructed in f32 and rounded
//! once ([`dequant`]), or a float weight quantized to fp8 ([`quantize`]).
//! Each kind is a file here implementing [`Kind`]; the executor checks a
//! tensor's plan once into its [`Values`] and dispatches on it in one place,
//! [`Values::kind`], never on the kind itself.
//!
//! Adding a kind: a variant of [`Value`] (the plan's wire format, read by the
//! core's serde types and by `fastcast-py`'s `plan/wire.rs`), a file here with a
//! type implementing [`Kind`], and its arms in [`Values::check`] and
//! [`Values::kind`]; `docs/architecture.md` lists the Python side.

pub mod cast;
pub mod dequant;
pub mod merge;
pub mod quantize;
pub mod rows;

use serde::Deserialize;

use crate::cast::CastOptions;
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};
use dequant::{Dequant, Dequantizer, Operand};
use merge::{Merge, Merger};
use quantize::{Made, Quantize};
use rows::{RowPatch, Rows};

/// What a planned tensor's values are: the wire format's one field for it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(try_from = "ValueParts")]
pub enum Value {
    /// Its source's values, cast to the output dtype (or copied when it is
    /// the source's).
    #[default]
    Cast,
    /// A quantized weight's values, reconstructed as the format's reference
    /// computes them in f32, then rounded once to the output dtype.
    Dequant(Box<Dequant>),
    /// A float weight quantized: its e4m3 values, or its F32 scales; with
    /// [`Made`], the weight's f32 values are made first: the base with a LoRA
    /// adapter's delta added (rounded once to f32, as a merge to an f32
    /// output), or a quantized weight dequantized.
    Quantize(Box<Quantize>, Option<Made>),
    /// A base weight (possibly dequantized) with a LoRA adapter's delta
    /// added in f32, then rounded once to the output dtype.
    Merge(Box<Merge>),
    /// A weight with some of its rows replaced (PEFT's trainable tokens).
    Rows(Box<Rows>),
}

/// [`Value`] as a plan spells it: the tensor's optional fields, one per kind
/// (a plain tensor has none; `quantize` may come with `merge` or `dequant`,
/// the weight it quantizes being merged or dequantized first), so plans
/// written before the kinds were one field still read.
#[derive(Deserialize, Default)]
pub struct ValueParts {
    #[serde(default)]
    pub dequant: Option<Box<Dequant>>,
    #[serde(default)]
    pub quantize: Option<Box<Quantize>>,
    #[serde(default)]
    pub merge: Option<Box<Merge>>,
    #[serde(default)]
    pub rows: Option<Box<Rows>>,
}

impl TryFrom<ValueParts> for Value {
    type Error = String;

    fn try_from(parts: ValueParts) -> std::result::Result<Value, String> {
        Value::of(parts)
    }
}

impl Value {
    /// The kind of a tensor given as the plan's optional fields.
    pub fn of(parts: ValueParts) -> std::result::Result<Value, String> {
        if let Some(rows) = parts.rows {
            return match (parts.dequant, parts.quantize, parts.merge) {
                (None, None, None) => Ok(Value::Rows(rows)),
                _ => Err("rows with another kind (replaced rows are their own kind)".into()),
            };
        }
        match (parts.dequant, parts.quantize, parts.merge) {
            (None, None, None) => Ok(Value::Cast),
            (Some(d), None, None) => Ok(Value::Dequant(d)),
            (None, Some(q), None) => Ok(Value::Quantize(q, None)),
            (None, Some(q), Some(m)) => Ok(Value::Quantize(q, Some(Made::Merge(m)))),
            (Some(d), Some(q), None) => Ok(Value::Quantize(q, Some(Made::Dequant(d)))),
            (None, None, Some(m)) => Ok(Value::Merge(m)),
            _ => Err("dequant with merge (a merge's base dequantization is its own field)".into()),
        }
    }
}

/// A tensor's source as its kind reads it.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// The tensor's bytes in its input.
    pub src: &'a [u8],
    /// The whole input `src` lies in (a run of small tensors reads on past
    /// `src`; see [`cast::Cast::source`]).
    pub file: &'a [u8],
    pub from: DType,
    /// The output's dtype.
    pub to: DType,
    /// Elements of the output tensor.
    pub numel: u64,
}

impl<'a> Source<'a> {
    /// Where `src` starts in `file`.
    pub fn offset(&self) -> usize {
        self.src.as_ptr() as usize - self.file.as_ptr() as usize
    }
}

/// How a tensor is cut into chunks: `count` units (elements, or bytes of a
/// sub-byte dtype), chunk bounds on multiples of `align` units, `held` bytes
/// held per unit while a chunk is made (the widest of what is read, computed
/// and written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Units {
    pub count: u64,
    pub align: u64,
    pub held: u64,
}

/// Where a kind hands the bytes of a chunk it made (in the output dtype), with
/// what making them lost; returns the bytes' hash.
pub type Put<'p> = dyn FnMut(&[u8], Option<&LossStats>) -> Result<u64> + 'p;

/// One kind of values, made chunk by chunk: units `[begin, end)` of the
/// output tensor at a time, each a whole number of [`Units::align`].
pub trait Kind: Sync {
    /// How the tensor is cut into chunks.
    fn units(&self, s: &Source) -> Units;

    /// The source bytes units `[begin, end)` read.
    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8];

    /// Whether what it reads counts as input read (a weight's scales re-read
    /// bytes the weight counted already).
    fn counts_reads(&self) -> bool {
        true
    }

    /// Whether every chunk reads across the whole source, so that its pages
    /// are released after the last chunk rather than after each.
    fn reads_whole_source(&self) -> bool {
        false
    }

    /// What a rounding of its values loses, if it rounds (None: nothing to
    /// count, no loss record).
    fn rule(&self, s: &Source) -> Option<LossRule>;

    /// The tensor that must be made just before this one (a weight before its
    /// scales, whose pages are then still cached), by output name.
    fn after(&self) -> Option<&str> {
        None
    }

    /// Make units `[begin, end)` in the output dtype and hand them to `put`,
    /// with what making them lost (`rule` is [`Kind::rule`]'s).
    fn produce(
        &self,
        s: &Source,
        begin: u64,
        end: u64,
        opts: &CastOptions,
        rule: Option<&LossRule>,
        put: &mut Put,
    ) -> Result<u64>;

    /// What making units `[begin, end)` would lose, writing nothing (None:
    /// nothing to count).
    fn scan(&self, s: &Source, begin: u64, end: u64, rule: Option<&LossRule>) -> Option<LossStats>;
}

/// Why a tensor's plan does not check, for the executor to word: an error of
/// the core's as it is, a problem with the plan, or a source that does not
/// hold the shape the kind reads (the executor names the file).
pub enum Invalid {
    Core(crate::error::Error),
    Plan(String),
    Holds(Vec<u64>),
}

/// The float dtypes a base weight, an adapter's tensors and replacement rows
/// may be in (read as f32; f64 rounded as torch rounds it).
pub(crate) const FLOATS: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

thread_local! {
    /// Each worker's f32 values of its chunk (dequantized, or before they are
    /// quantized): at most one chunk per thread.
    pub(crate) static VALUES: std::cell::RefCell<Vec<u8>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A chunk of f32 values `make` writes into the worker's buffer, rounded once
/// to `to` and handed to `put` (a kind whose values are made in f32).
pub(crate) fn put_f32(
    make: impl FnOnce(&mut Vec<u8>),
    to: DType,
    opts: &CastOptions,
    rule: Option<&LossRule>,
    put: &mut Put,
) -> Result<u64> {
    VALUES.with_borrow_mut(|values| {
        make(values);
        cast::put_rounded(values, DType::F32, to, opts, rule, put)
    })
}

/// What rounding the f32 values `make` writes would lose, by `rule`.
pub(crate) fn scan_f32(
    make: impl FnOnce(&mut Vec<u8>),
    rule: Option<&LossRule>,
) -> Option<LossStats> {
    VALUES.with_borrow_mut(|values| {
        make(values);
        rule.map(|r| r.scan(values))
    })
}

/// A tensor's values, checked against its plan and inputs: its kind, ready.
pub enum Values<'a> {
    Cast(cast::Cast),
    Dequant(Box<Dequantizer<'a>>),
    Quantize(Box<quantize::Quantizing<'a>>),
    Merge(Box<Merger<'a>>),
    Rows(Box<RowPatch<'a>>),
}

impl<'a> Values<'a> {
    /// Check the kind `value` of a tensor of `shape` written as `s.to` from
    /// `s.src` (of `s.from`), resolving operands with `operand`.
    pub fn check(
        value: &'a Value,
        s: &Source<'a>,
        shape: &'a [u64],
        operand: &dyn Fn(&'a Operand) -> std::result::Result<&'a [u8], String>,
    ) -> std::result::Result<Values<'a>, Invalid> {
        Ok(match value {
            Value::Cast => Values::Cast(cast::Cast::check(s, shape)?),
            Value::Dequant(how) => {
                Values::Dequant(Box::new(dequant::check(how, s, shape, operand)?))
            }
            Value::Quantize(how, made) => Values::Quantize(Box::new(quantize::Quantizing::check(
                how,
                s,
                shape,
                made.as_ref(),
                operand,
            )?)),
            Value::Merge(how) => Values::Merge(Box::new(Merger::check(how, s, shape, operand)?)),
            Value::Rows(how) => Values::Rows(Box::new(RowPatch::check(how, s, shape, operand)?)),
        })
    }

    /// The kind: the one place the executor dispatches on it.
    pub fn kind(&self) -> &dyn Kind {
        match self {
            Values::Cast(k) => k,
            Values::Dequant(k) => &**k,
            Values::Quantize(k) => &**k,
            Values::Merge(k) => &**k,
            Values::Rows(k) => &**k,
        }
    }

    /// Let `other`, which runs right after `self` (see [`Kind::after`]) and
    /// reads the same source bytes, take what `self`'s chunks found on the way:
    /// a quantized weight's scales. True when linked.
    pub fn link(&self, other: &Values) -> bool {
        match (self, other) {
            (Values::Quantize(weight), Values::Quantize(scale)) => {
                quantize::Quantizing::link(weight, scale)
            }
            _ => false,
        }
    }

    /// Whether this is a plain cast or copy (runs of them are made as one).
    pub fn is_cast(&self) -> bool {
        matches!(self, Values::Cast(_))
    }
}

/// That `s.src` holds a tensor of `shape` in `s.from` (sub-byte dtypes by
/// their bits); else [`Invalid::Holds`].
pub fn holds(s: &Source, shape: &[u64]) -> std::result::Result<(), Invalid> {
    let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    if numel.and_then(|n| n.checked_mul(s.from.bits())) == Some(s.src.len() as u64 * 8) {
        return Ok(());
    }
    Err(Invalid::Holds(shape.to_vec()))
}
