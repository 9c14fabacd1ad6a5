//! A tensor's source values cast to the output dtype, bit-exact with
//! `torch.Tensor.to`, or copied as they are when the dtype is the same.

use std::cell::RefCell;

use super::{holds, Invalid, Kind, Put, Source, Units};
use crate::cast::{self, CastOptions};
use crate::dtype::DType;
use crate::error::Result;
use crate::rules::loss::{LossRule, LossStats};

/// Source bytes cast and then counted at a time within a chunk: small enough
/// to still be in L2 when the count reads them.
pub(crate) const CAST_BLOCK: usize = 256 << 10;

thread_local! {
    /// Each worker's reusable output buffer: at most one chunk per thread.
    pub(crate) static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The cast (or copy) of a checked tensor.
#[derive(Clone, Copy, Debug)]
pub struct Cast;

impl Cast {
    /// Check that the pair casts and that the source holds the tensor.
    pub fn check(s: &Source, shape: &[u64]) -> std::result::Result<Cast, Invalid> {
        if s.from != s.to {
            cast::check_buffers(s.from, s.to, 0, 0).map_err(Invalid::Core)?;
        }
        holds(s, shape)?;
        Ok(Cast)
    }
}

/// Bytes for `n` units of `dtype` (sub-byte dtypes are only ever copied, in
/// whole bytes, so `n` counts bytes for them).
pub fn span(dtype: DType, n: u64) -> u64 {
    if dtype.bits() < 8 {
        n
    } else {
        n * dtype.size() as u64
    }
}

impl Kind for Cast {
    fn units(&self, s: &Source) -> Units {
        if s.from.bits() < 8 {
            // Sub-byte tensors are copied, never cast: count them in bytes.
            return Units {
                count: s.src.len() as u64,
                align: 1,
                held: 1,
            };
        }
        Units {
            count: s.src.len() as u64 / s.from.size() as u64,
            align: 1,
            held: s.from.size().max(s.to.size()) as u64,
        }
    }

    /// Through the whole input: a run of small tensors cast as one reads on
    /// into the ones after this (the executor checked they follow it).
    fn source<'a>(&self, s: &Source<'a>, begin: u64, end: u64) -> &'a [u8] {
        let at = s.offset();
        &s.file[at + span(s.from, begin) as usize..at + span(s.from, end) as usize]
    }

    fn rule(&self, s: &Source) -> Option<LossRule> {
        (s.from != s.to).then(|| rule_for(s.from, s.to))
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
        let values = self.source(s, begin, end);
        if s.from == s.to {
            return put(values, None); // a copy: straight from the map
        }
        BUFFER.with_borrow_mut(|buf| {
            buf.resize(span(s.to, end - begin) as usize, 0);
            let loss = cast_counting(values, s.from, buf, s.to, opts, rule)?;
            put(buf, loss.as_ref())
        })
    }

    fn scan(&self, s: &Source, begin: u64, end: u64, rule: Option<&LossRule>) -> Option<LossStats> {
        rule.map(|r| r.scan(self.source(s, begin, end)))
    }
}

/// Cast `values` (elements of `from`) into `dst` (of `to`) and count their
/// loss by `rule`, a cache-sized block at a time: the count then reads each
/// block from L2 right after the cast read it, instead of the whole chunk
/// again from memory.
pub fn cast_counting(
    values: &[u8],
    from: DType,
    dst: &mut [u8],
    to: DType,
    opts: &CastOptions,
    rule: Option<&LossRule>,
) -> Result<Option<LossStats>> {
    let Some(rule) = rule else {
        cast::cast(values, from, dst, to, opts)?;
        return Ok(None);
    };
    let elems = CAST_BLOCK / from.size();
    let mut found = LossStats::default();
    for (src, out) in values
        .chunks(elems * from.size())
        .zip(dst.chunks_mut(elems * to.size()))
    {
        cast::cast(src, from, out, to, opts)?;
        found.merge(&rule.scan(src));
    }
    Ok(Some(found))
}

/// Hand `values` (of `from`, computed wider than the output: a dequantized or
/// merged tensor's) to `put` rounded to `to`, with what rounding them lost by
/// `rule`; as they are when `to` is their own dtype.
pub fn put_rounded(
    values: &[u8],
    from: DType,
    to: DType,
    opts: &CastOptions,
    rule: Option<&LossRule>,
    put: &mut Put,
) -> Result<u64> {
    if to == from {
        let loss = rule.map(|r| r.scan(values));
        return put(values, loss.as_ref());
    }
    BUFFER.with_borrow_mut(|buf| {
        buf.resize(values.len() / from.size() * to.size(), 0);
        let loss = cast_counting(values, from, buf, to, opts, rule)?;
        put(buf, loss.as_ref())
    })
}

/// The loss rule of a dtype pair, found once per pair and thread (each is a
/// bisection over the scalar kernels; a model of 100k tensors asked 100k times).
pub fn rule_for(from: DType, to: DType) -> LossRule {
    thread_local! {
        static RULES: RefCell<Vec<((DType, DType), LossRule)>> = const { RefCell::new(Vec::new()) };
    }
    RULES.with_borrow_mut(|rules| {
        if let Some((_, rule)) = rules.iter().find(|(pair, _)| *pair == (from, to)) {
            return *rule;
        }
        let rule = LossRule::new(from, to);
        rules.push(((from, to), rule));
        rule
    })
}
