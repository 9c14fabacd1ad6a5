//! A shard's plan checked against itself and the inputs before anything is
//! written: every tensor's source bytes, its kind of values, and the header
//! the shard will have (which a reader must accept).

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use super::chunks::scales_of;
use super::input::Input;
use super::Job;
use crate::error::{Error, Result};
use crate::format::header::{Header, TensorInfo, MAX_HEADER_LEN};
use crate::plan::wire::{Plan, ShardPlan, TensorPlan};
use crate::rules::loss::LossStats;
use crate::values::dequant::Operand;
use crate::values::{Invalid, Source, Values};

#[cfg(test)]
impl Checked<'_> {
    /// The JSON length of the header as written (its length prefix).
    pub(super) fn header_len_written(&self) -> u64 {
        self.header_bytes.len() as u64 - 8
    }
}

/// A shard checked against its plan and inputs, ready to write: its header
/// (and the bytes it is written as, made once: 9 ms for 100k tensors) and a
/// job per tensor.
pub(super) struct Checked<'a> {
    pub(super) header: Header,
    pub(super) header_bytes: Vec<u8>,
    pub(super) jobs: Vec<Job<'a>>,
}

/// Check one shard's plan against itself and the inputs; build its header.
pub(super) fn check_shard<'a>(
    shard: &'a ShardPlan,
    plan: &Plan,
    maps: &'a [Input],
) -> Result<Checked<'a>> {
    let bad = |problem: String| Error::Plan {
        path: shard.path.clone(),
        problem,
    };
    let mut infos = Vec::with_capacity(shard.tensors.len());
    let mut jobs = Vec::with_capacity(shard.tensors.len());
    for t in &shard.tensors {
        let (from, to) = (t.src_dtype, t.dst_dtype);
        let map = maps
            .get(t.source)
            .ok_or_else(|| bad(format!("tensor {:?} names source {}", t.name, t.source)))?;
        let path = &plan.sources[t.source].path;
        let (begin, end) = t.src_offsets;
        if begin > end || end > map.len() as u64 {
            return Err(bad(format!(
                "tensor {:?}: bytes [{begin}, {end}) are outside {} ({} bytes)",
                t.name,
                path.display(),
                map.len()
            )));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {:?}: shape overflows", t.name)))?;
        let src = &map[begin as usize..end as usize];
        let source = Source {
            src,
            file: map,
            from,
            to,
            numel,
        };
        let operand = |op: &'a Operand| operand_bytes(op, plan, maps);
        let values = Values::check(&t.value, &source, &t.shape, &operand).map_err(|e| match e {
            Invalid::Core(e) => e,
            Invalid::Plan(problem) => bad(format!("tensor {:?}: {problem}", t.name)),
            // The source holds no tensor of the shape its kind reads (the
            // output's, or for scales their weight's).
            Invalid::Holds(shape) => bad(format!(
                "tensor {:?}: {} bytes in {} do not hold {from} {shape:?}",
                t.name,
                end - begin,
                path.display(),
            )),
        })?;
        let rule = values.kind().rule(&source);
        infos.push(tensor_info(t));
        jobs.push(Job {
            plan: t,
            source,
            map,
            dst_start: 0,
            rule,
            values,
            stats: Mutex::new(LossStats::default()),
            pending: AtomicU64::new(0),
        });
    }
    let mut header = Header {
        metadata: shard.metadata.clone(),
        tensors: infos,
        header_len: 0,
    };
    // Validate the output as a reader will: unique names, sizes that match
    // dtypes and shapes, tensors that tile the data buffer with no gap or
    // overlap (checked in memory: re-reading 100k entries' JSON cost 30 ms).
    let data_end = header
        .tensors
        .iter()
        .map(|t| t.data_offsets.1)
        .max()
        .unwrap_or(0);
    header.check(&shard.path, data_end)?;
    let header_bytes = header.to_bytes();
    header.header_len = header_bytes.len() as u64 - 8;
    too_large(shard, header.header_len)?;
    for job in &mut jobs {
        job.dst_start = header.data_start() + job.plan.dst_offsets.0;
    }
    // A weight's scales take what its chunks found, when both read one source.
    for (w, s) in scales_of(&jobs) {
        let (weight, scale) = (&jobs[w], &jobs[s]);
        if std::ptr::eq(weight.src(), scale.src()) {
            Values::link(&weight.values, &scale.values);
        }
    }
    Ok(Checked {
        header,
        header_bytes,
        jobs,
    })
}

/// Tensor `t`'s entry in its shard's header.
fn tensor_info(t: &TensorPlan) -> TensorInfo {
    TensorInfo {
        name: t.name.clone(),
        dtype: t.dst_dtype,
        shape: t.shape.clone(),
        data_offsets: t.dst_offsets,
    }
}

/// Refuse a shard whose header (`len` bytes of JSON) no reader would open.
fn too_large(shard: &ShardPlan, len: u64) -> Result<()> {
    if len <= MAX_HEADER_LEN {
        return Ok(());
    }
    Err(Error::HeaderTooLarge {
        path: shard.path.clone(),
        len,
        limit: MAX_HEADER_LEN,
        tensors: shard.tensors.len(),
    })
}

/// The bytes of operand `op` (a scale...), checked to lie in its source.
fn operand_bytes<'a>(op: &Operand, plan: &Plan, maps: &'a [Input]) -> Result<&'a [u8], String> {
    let map = maps
        .get(op.source)
        .ok_or_else(|| format!("operand {:?} names source {}", op.name, op.source))?;
    let (begin, end) = op.offsets;
    if begin > end || end > map.len() as u64 {
        return Err(format!(
            "operand {:?}: bytes [{begin}, {end}) are outside {}",
            op.name,
            plan.sources[op.source].path.display()
        ));
    }
    Ok(&map[begin as usize..end as usize])
}
