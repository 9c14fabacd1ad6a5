//! How a shard's tensors are cut into the units of parallel work, and in
//! which order they run: whole packed units or block-rows where a kind needs
//! them, runs of small tensors joined into one, scales right after their
//! weight.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::Job;
use crate::values::cast::span;
use crate::values::Units;

/// One unit of parallel work: elements `[begin, end)` of a job; or, when
/// `last > job`, the whole jobs `job..=last`, small tensors of one dtype pair
/// that follow each other in their input and in the output, cast, written and
/// hashed as one (`end` then counts the elements of all of them).
pub(super) struct Chunk {
    pub(super) job: usize,
    pub(super) begin: u64,
    pub(super) end: u64,
    pub(super) last: usize,
}

impl Chunk {
    /// Count what casting `values` (this chunk's source) loses, tensor by tensor.
    pub(super) fn count_loss(&self, jobs: &[Job], values: &[u8]) {
        if self.last == self.job {
            return jobs[self.job].count_loss(values);
        }
        // A chunk of whole tensors: `values` is their sources, end to end.
        for job in &jobs[self.job..=self.last] {
            job.count_loss(job.src());
        }
    }
}

/// Split jobs into chunks of at most `chunk_bytes` on either side, in the
/// order they run: plan order, except that scales run right after the weight
/// they are computed from, whose pages are then still in the page cache.
///
/// A dequantized tensor's chunks hold whole packed units of its output (one
/// output row of GPTQ/AWQ at least), a quantized weight's whole block-rows
/// (the blocks whose amax its scales need), so these may be larger than
/// `chunk_bytes`: one block-row of a very wide weight (128 rows of it, in
/// f32, for `fp8`) is the smallest chunk that can be quantized.
pub(super) fn chunks_of(jobs: &[Job], chunk_bytes: usize) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for i in run_order(jobs) {
        let job = &jobs[i];
        if let Some(c) = chunks.last_mut().filter(|c| joins(jobs, c, i, chunk_bytes)) {
            c.end += job.src().len() as u64 / job.from().size() as u64;
            c.last = i;
            continue;
        }
        let Units {
            count: units,
            align,
            held,
        } = job.kind().units(&job.source);
        let per_chunk = ((chunk_bytes as u64 / held) / align).max(1) * align;
        let first = chunks.len();
        let mut begin = 0;
        while begin < units {
            let end = (begin + per_chunk).min(units);
            chunks.push(Chunk {
                job: i,
                begin,
                end,
                last: i,
            });
            begin = end;
        }
        job.pending
            .store((chunks.len() - first) as u64, Ordering::Release);
    }
    chunks
}

/// Whether job `i`, whole, can join chunk `c`: both plain casts or copies of
/// the same dtypes, `c` whole tensors ending where `i` starts in the same
/// input and in the output, and the two together within `chunk_bytes`. A
/// model of 100k tiny tensors so costs a write, a hash and a cast call per
/// chunk, not per tensor.
fn joins(jobs: &[Job], c: &Chunk, i: usize, chunk_bytes: usize) -> bool {
    let (head, tail, next) = (&jobs[c.job], &jobs[c.last], &jobs[i]);
    let plain = |j: &Job| j.values.is_cast() && j.from().bits() >= 8;
    let widest = head.from().size().max(head.to().size()) as u64;
    let units = next.src().len() as u64 / next.from().size().max(1) as u64;
    let tail_end = tail.dst_start + span(tail.to(), tail.source.numel);
    i == c.last + 1
        && c.begin == 0
        && plain(head)
        && plain(next)
        && (next.from(), next.to()) == (head.from(), head.to())
        && std::ptr::eq(next.map, head.map)
        && tail.src().as_ptr_range().end == next.src().as_ptr()
        // `c` is whole: it ends where `tail` ends.
        && head.dst_start + span(head.to(), c.end) == tail_end
        && tail_end == next.dst_start
        && (c.end + units) * widest <= chunk_bytes as u64
}

/// The order jobs run in: plan order, each weight's scales right after it
/// (scales whose weight is in another shard stay where the plan put them).
pub(super) fn run_order(jobs: &[Job]) -> Vec<usize> {
    let pairs = scales_of(jobs);
    if pairs.is_empty() {
        return (0..jobs.len()).collect(); // no scales here: plan order
    }
    let mut after: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut deferred = vec![false; jobs.len()];
    for &(w, i) in &pairs {
        after.entry(w).or_default().push(i);
        deferred[i] = true;
    }
    let mut order = Vec::with_capacity(jobs.len());
    for i in (0..jobs.len()).filter(|&i| !deferred[i]) {
        order.push(i);
        order.extend(after.remove(&i).unwrap_or_default());
    }
    // A scale naming another scale (never planned) would be lost: keep it.
    order.extend(after.into_values().flatten());
    order
}

/// Each job that must run right after another of the shard (a weight's
/// scales, after the weight), as `(weight, job)` indices, in plan order.
pub(super) fn scales_of(jobs: &[Job]) -> Vec<(usize, usize)> {
    if !jobs.iter().any(|job| job.kind().after().is_some()) {
        return Vec::new(); // no name index for a shard without scales
    }
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| (job.plan.name.as_str(), i))
        .collect();
    jobs.iter()
        .enumerate()
        .filter_map(|(i, job)| Some((*index.get(job.kind().after()?)?, i)))
        .collect()
}
