//! Runs a conversion plan: maps the inputs, casts in parallel chunks through
//! bounded per-thread buffers, writes each chunk at its final offset.
//!
//! The plan is pure data made by the Python layer (which tensor goes to which
//! shard, at which offset, in which dtype). Nothing here decides layout; it
//! checks that the plan is self-consistent and matches the files on disk,
//! then moves bytes. No tensor, shard or model is ever held in memory: at any
//! moment each worker thread holds one chunk of at most `chunk_bytes` (a
//! dequantized or quantized tensor's chunk holds whole packed units or
//! block-rows of it, so may be larger: see `chunks_of`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::cast::{self, CastOptions};
use crate::dequant::{Dequant, Dequantizer, Operand};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::header::{self, Entry, Header, TensorInfo, MAX_HEADER_LEN};
use crate::journal::{self, ShardRecord};
use crate::loss::{LossRule, LossStats};
use crate::positional;
use crate::quantize::{Fp8Blocks, Quantize};
use crate::shard_file::{self, ShardFile};
use input::Input;

#[cfg(target_os = "linux")]
mod fault;
#[cfg(not(target_os = "linux"))]
mod fault {
    //! Elsewhere a shrinking input's fault is not caught: the size checks remain.
    pub(super) struct Watch;
    impl Watch {
        pub(super) fn new(_range: &[u8]) -> Watch {
            Watch
        }
        pub(super) fn faulted(&self) -> bool {
            false
        }
    }
}
mod input;

/// The plan format this build reads; see [`Plan::version`].
pub const PLAN_VERSION: u32 = 1;

/// A whole conversion: input files and the output shards to produce.
#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    /// The format of this plan, [`PLAN_VERSION`]: a plan made for another
    /// version is refused rather than half understood.
    pub version: u32,
    pub sources: Vec<SourceFile>,
    pub shards: Vec<ShardPlan>,
}

impl Plan {
    /// Refuse a plan in a format this build does not read.
    pub fn check_version(&self) -> Result<()> {
        if self.version == PLAN_VERSION {
            return Ok(());
        }
        Err(Error::Plan {
            path: PathBuf::new(),
            problem: format!(
                "plan version {}, this fastcast reads version {PLAN_VERSION}",
                self.version
            ),
        })
    }
}

/// An input file and the size it had when the plan was made.
#[derive(Debug, Clone, Deserialize)]
pub struct SourceFile {
    pub path: PathBuf,
    pub size: u64,
}

/// One output file.
#[derive(Debug, Clone, Deserialize)]
pub struct ShardPlan {
    /// The shard's output-relative name, as the journal records it
    /// (`unet/diffusion_pytorch_model-00001-of-00002.safetensors`).
    pub name: String,
    /// Where to write it (possibly inside a private staging folder).
    pub path: PathBuf,
    /// `__metadata__` to write, in order.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorPlan>,
}

/// Where one tensor comes from and where it goes.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<u64>,
    /// Index into [`Plan::sources`].
    pub source: usize,
    /// Any name [`DType`] parses (`F32`, `bfloat16`...), read as the plan is.
    #[serde(deserialize_with = "dtype_named")]
    pub src_dtype: DType,
    #[serde(deserialize_with = "dtype_named")]
    pub dst_dtype: DType,
    /// `[begin, end)` in the source *file* (header included).
    pub src_offsets: (u64, u64),
    /// `[begin, end)` in the output's data buffer.
    pub dst_offsets: (u64, u64),
    /// When the source is quantized: how to reconstruct its values, which
    /// are then rounded once to `dst_dtype`.
    #[serde(default)]
    pub dequant: Option<Box<Dequant>>,
    /// When the tensor is written by quantizing its source (a float weight):
    /// the weight's e4m3 values, or its scales.
    #[serde(default)]
    pub quantize: Option<Box<Quantize>>,
}

/// A dtype from its name: a plan of 100k tensors would otherwise hold 200k
/// strings for a handful of dtypes.
fn dtype_named<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<DType, D::Error> {
    let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    name.parse().map_err(serde::de::Error::custom)
}

/// How a plan runs.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub cast: CastOptions,
    /// Largest chunk a worker casts at once (input or output side).
    pub chunk_bytes: usize,
    /// Sync each shard before renaming it into place.
    pub fsync: bool,
    /// A file to which each committed shard's [`ShardRecord`] is appended
    /// (one JSON line, synced; see [`journal`]), so an interrupted run can resume.
    pub journal: Option<PathBuf>,
}

impl Default for ExecOptions {
    fn default() -> ExecOptions {
        ExecOptions {
            cast: CastOptions::default(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            fsync: true,
            journal: None,
        }
    }
}

/// Default chunk: large enough for long sequential reads and writes, small
/// enough that a few threads' buffers stay far below any memory budget.
pub const DEFAULT_CHUNK_BYTES: usize = 8 << 20;

/// Source bytes cast and then counted at a time within a chunk: small enough
/// to still be in L2 when the count reads them.
const CAST_BLOCK: usize = 256 << 10;

/// Shared between the executor and whoever watches it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes processed so far.
    pub bytes_done: AtomicU64,
    /// Set to stop at the next chunk; the executor then cleans up and
    /// returns [`Error::Cancelled`].
    pub cancel: AtomicBool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecStats {
    pub tensors_cast: u64,
    pub tensors_copied: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub shards_written: u64,
    /// Every shard written, in plan order: name, size, digest, its losses.
    pub shards: Vec<ShardRecord>,
}

impl ExecStats {
    /// Loss counts of every cast tensor, in plan order (the shards' losses,
    /// not a second copy: a model may have 100k).
    pub fn losses(&self) -> impl Iterator<Item = &(String, LossStats)> {
        self.shards.iter().flat_map(|s| &s.losses)
    }
}

/// A tensor whose plan has been checked, ready to run.
struct Job<'a> {
    plan: &'a TensorPlan,
    from: DType,
    to: DType,
    src: &'a [u8],
    /// The input `src` lies in (released pages must stay inside it).
    map: &'a Input,
    /// Offset of the tensor's first byte in the output file.
    dst_start: u64,
    /// Elements of the output tensor.
    numel: u64,
    /// Loss thresholds, for tensors that are cast (for dequantized ones, of
    /// the f32 values to the target).
    rule: Option<LossRule>,
    /// For a quantized source: how its values are reconstructed.
    dequant: Option<Box<Dequantizer<'a>>>,
    /// For a tensor quantized from its source: its values or its scales.
    quantize: Option<Box<Quantizing<'a>>>,
    /// Loss counts gathered chunk by chunk.
    stats: Mutex<LossStats>,
    /// Chunks not yet done, for a source every chunk reads whole (released
    /// after the last one).
    pending: AtomicU64,
}

/// A tensor written by quantizing its source, a float weight.
enum Quantizing<'a> {
    /// The weight's e4m3 values.
    Weight(Fp8Blocks),
    /// The weight's scales; `weight` is the weight's output name.
    Scale { blocks: Fp8Blocks, weight: &'a str },
}

impl Job<'_> {
    /// The source bytes of chunk `c` (for a dequantized tensor, those its
    /// output elements read; for scales, the block-rows of the weight they
    /// cover).
    fn src_of(&self, c: &Chunk) -> &[u8] {
        match (self.dequant.as_deref(), self.quantize.as_deref()) {
            (Some(d), _) => {
                let (begin, end) = d.source_range(c.begin, c.end);
                &self.src[begin..end]
            }
            (_, Some(Quantizing::Scale { blocks, .. })) => {
                let per_block_row = blocks.grid()[1];
                let (at, len) =
                    blocks.block_rows_bytes(c.begin / per_block_row, c.end / per_block_row);
                &self.src[at..at + len]
            }
            // Through the map: a chunk of whole small tensors reads on into
            // the ones after this (`chunks_of` checked they follow it).
            _ => {
                let at = self.src.as_ptr() as usize - self.map.as_ptr() as usize;
                &self.map
                    [at + span(self.from, c.begin) as usize..at + span(self.from, c.end) as usize]
            }
        }
    }

    /// Whether this job reads input bytes that count as read: scales re-read
    /// their weight's, already counted for the weight.
    fn counts_its_reads(&self) -> bool {
        !matches!(self.quantize.as_deref(), Some(Quantizing::Scale { .. }))
    }

    /// Input bytes chunk `c` accounts for in progress: its source bytes, or
    /// its share of a source every chunk reads whole (the shares add up to it).
    fn src_done(&self, c: &Chunk) -> u64 {
        match &self.dequant {
            _ if !self.counts_its_reads() => 0,
            Some(d) if d.reads_whole_source() => {
                let len = self.src.len() as u128;
                let share = |k: u64| (len * k as u128 / self.numel.max(1) as u128) as u64;
                share(c.end) - share(c.begin)
            }
            _ => self.src_of(c).len() as u64,
        }
    }

    /// Done with chunk `c`: release the input pages it alone read (a source
    /// every chunk reads whole, after its last chunk).
    fn release(&self, c: &Chunk) {
        match &self.dequant {
            Some(d) if d.reads_whole_source() => {
                if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    input::release(self.src, self.map);
                }
            }
            _ => input::release(self.src_of(c), self.map),
        }
    }

    /// Cast `values` (elements of `from`, a chunk of this job's source) into
    /// `dst` and count their loss, a cache-sized block at a time: the count
    /// then reads each block from L2 right after the cast read it, instead
    /// of the whole chunk again from memory.
    fn cast_counting(
        &self,
        values: &[u8],
        from: DType,
        dst: &mut [u8],
        opts: &CastOptions,
    ) -> Result<()> {
        let Some(rule) = &self.rule else {
            return cast::cast(values, from, dst, self.to, opts);
        };
        let elems = CAST_BLOCK / from.size();
        let mut found = LossStats::default();
        for (src, out) in values
            .chunks(elems * from.size())
            .zip(dst.chunks_mut(elems * self.to.size()))
        {
            cast::cast(src, from, out, self.to, opts)?;
            found.merge(&rule.scan(src));
        }
        self.add_loss(&found);
        Ok(())
    }

    /// Add the loss of casting `src` (a chunk of this job's source) to its counts.
    fn count_loss(&self, src: &[u8]) {
        if let Some(rule) = &self.rule {
            self.add_loss(&rule.scan(src));
        }
    }

    /// Add loss counts found for a chunk.
    fn add_loss(&self, found: &LossStats) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(found);
    }

    /// Loss counts so far.
    fn loss(&self) -> LossStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One unit of parallel work: elements `[begin, end)` of a job; or, when
/// `last > job`, the whole jobs `job..=last`, small tensors of one dtype pair
/// that follow each other in their input and in the output, cast, written and
/// hashed as one (`end` then counts the elements of all of them).
struct Chunk {
    job: usize,
    begin: u64,
    end: u64,
    last: usize,
}

impl Chunk {
    /// Count what casting `values` (this chunk's source) loses, tensor by tensor.
    fn count_loss(&self, jobs: &[Job], values: &[u8]) {
        if self.last == self.job {
            return jobs[self.job].count_loss(values);
        }
        // A chunk of whole tensors: `values` is their sources, end to end.
        for job in &jobs[self.job..=self.last] {
            job.count_loss(job.src);
        }
    }
}

/// Bytes for `n` elements of `dtype` (sub-byte dtypes are only ever copied,
/// in whole bytes, so `n` counts bytes for them; see `chunks_of`).
fn span(dtype: DType, n: u64) -> u64 {
    if dtype.bits() < 8 {
        n
    } else {
        n * dtype.size() as u64
    }
}

/// Run `plan`: every shard is written under a temporary name, synced,
/// renamed to its `path` and journaled, in plan order; the folders written
/// into are synced at the end.
///
/// Stops early (removing the shard in progress) on the first error or when
/// `progress.cancel` is set. Shards already put in place stay, journaled.
/// Whether what a cast lost is acceptable is for the caller to decide from
/// the returned losses (write into a staging folder to be able to refuse).
///
/// Each finished shard is handed to a committer thread that syncs, renames
/// and journals it while the workers go on with the next shard, so the sync
/// overlaps the casting instead of stalling it. A failed commit stops the
/// workers at their next chunk, and its error is the one returned.
pub fn execute(plan: &Plan, opts: &ExecOptions, progress: &Progress) -> Result<ExecStats> {
    plan.check_version()?;
    let maps = map_sources(&plan.sources)?;
    let mut stats = ExecStats::default();
    // Validate every shard before writing any: a bad plan writes nothing.
    let mut checked = plan
        .shards
        .iter()
        .map(|shard| check_shard(shard, plan, &maps))
        .collect::<Result<Vec<_>>>()?;
    let (fsync, journal) = (opts.fsync, opts.journal.clone());
    // Set by the committer when a commit fails: nothing after it can be kept.
    let stop = &AtomicBool::new(false);
    stats.shards = std::thread::scope(|scope| -> Result<Vec<ShardRecord>> {
        let (to_commit, committer_rx) = std::sync::mpsc::channel::<(ShardFile, ShardRecord)>();
        let committer = scope.spawn(move || -> Result<Vec<ShardRecord>> {
            // Commit in order; after the first failure, drop (and so delete)
            // everything still queued. The records come back stamped.
            let mut failed = None;
            let mut committed = Vec::new();
            for (shard, mut record) in committer_rx {
                if failed.is_none() {
                    failed = shard
                        .commit(fsync)
                        .and_then(|stamp| {
                            record.stamp = stamp;
                            match &journal {
                                Some(path) => journal::append(path, &record, fsync),
                                None => Ok(()),
                            }
                        })
                        .err();
                    if failed.is_some() {
                        stop.store(true, Ordering::Relaxed);
                    } else {
                        committed.push(record);
                    }
                }
            }
            failed.map_or(Ok(committed), Err)
        });
        let mut written = Ok(());
        for (shard, checked) in plan.shards.iter().zip(&mut checked) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let done = write_shard(shard, checked, opts, progress, stop);
            // An input that shrank under the run read as zeros (or failed a
            // write from its map): the shard is wrong, and the input is named.
            let done = match shrunk(&maps, done.is_err()) {
                Some(e) => Err(e),
                None => done,
            };
            // Written: its header's bytes (8 MB for 100k tensors) are not needed.
            drop(std::mem::take(&mut checked.header_bytes));
            let Checked { header, jobs, .. } = &*checked;
            let (file, digest) = match done {
                Ok(done) => {
                    input::release_all(jobs.iter().map(|job| (job.map, job.src)));
                    done
                }
                Err(e) => {
                    written = Err(e);
                    break;
                }
            };
            let record = ShardRecord {
                name: shard.name.clone(),
                size: header.data_start() + header.data_len(),
                digest,
                chunk_bytes: opts.chunk_bytes,
                losses: jobs
                    .iter()
                    .filter(|job| job.rule.is_some())
                    .map(|job| (job.plan.name.clone(), job.loss()))
                    .collect(),
                stamp: None, // taken by the committer, once synced
            };
            tally(&mut stats, &record, jobs);
            if to_commit.send((file, record)).is_err() {
                break; // the committer stopped: its error is reported below
            }
        }
        drop(to_commit);
        let committed = committer.join().unwrap_or_else(|_| {
            Err(Error::Plan {
                path: PathBuf::new(),
                problem: "the commit thread panicked".into(),
            })
        });
        // A failed commit is the cause; the workers' Cancelled its consequence.
        let committed = committed?;
        written.map(|()| committed)
    })?;
    if opts.fsync {
        let mut dirs: Vec<&Path> = Vec::new();
        for shard in &plan.shards {
            let dir = shard.path.parent().unwrap_or(Path::new("."));
            if !dirs.contains(&dir) {
                shard_file::sync_dir(dir)?;
                dirs.push(dir);
            }
        }
    }
    Ok(stats)
}

/// Add one written shard to the run's counts.
fn tally(stats: &mut ExecStats, record: &ShardRecord, jobs: &[Job]) {
    stats.shards_written += 1;
    stats.bytes_written += record.size;
    for job in jobs {
        if job.counts_its_reads() {
            stats.bytes_read += job.src.len() as u64;
        }
        if job.from == job.to {
            stats.tensors_copied += 1;
        } else {
            stats.tensors_cast += 1;
        }
    }
}

/// Recompute the digest of shard `index` of `plan` from the file already at its
/// final path, with the chunk size it was written with. Used to check, not
/// trust, the shards a resumed run would reuse.
pub fn shard_digest(plan: &Plan, index: usize, chunk_bytes: usize) -> Result<u64> {
    plan.check_version()?;
    let maps = map_sources(&plan.sources)?;
    let shard = plan.shards.get(index).ok_or_else(|| Error::Plan {
        path: PathBuf::new(),
        problem: format!("no shard {index}"),
    })?;
    let Checked { header, jobs, .. } = check_shard(shard, plan, &maps)?;
    let file = File::open(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
    let expected = header.data_start() + header.data_len();
    let actual = file
        .metadata()
        .map_err(|e| Error::io(&shard.path, e))?
        .len();
    if actual != expected {
        return Ok(0); // cannot match a real digest's header part
    }
    let mut head = vec![0u8; header.data_start() as usize];
    positional::read_exact_at(&file, &mut head, 0).map_err(|e| Error::io(&shard.path, e))?;
    let mut hashes: Vec<(u64, u64)> = chunks_of(&jobs, chunk_bytes)
        .par_iter()
        .map(|c| {
            let job = &jobs[c.job];
            let offset = job.dst_start + span(job.to, c.begin);
            let mut buf = vec![0u8; span(job.to, c.end - c.begin) as usize];
            positional::read_exact_at(&file, &mut buf, offset)
                .map_err(|e| Error::io(&shard.path, e))?;
            Ok((offset, xxh3_64(&buf)))
        })
        .collect::<Result<_>>()?;
    hashes.sort_unstable();
    Ok(combine_digest(&head, &hashes))
}

/// A shard's digest: its header bytes and its chunks' hashes in offset order.
fn combine_digest(header: &[u8], chunks: &[(u64, u64)]) -> u64 {
    let mut bytes = Vec::with_capacity(8 + chunks.len() * 16);
    bytes.extend_from_slice(&xxh3_64(header).to_le_bytes());
    for (offset, hash) in chunks {
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&hash.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Loss counts of every cast tensor of `plan`, reading the inputs only: what
/// a conversion would lose, predicted without writing anything.
pub fn scan(plan: &Plan, progress: &Progress) -> Result<Vec<(String, LossStats)>> {
    plan.check_version()?;
    let maps = map_sources(&plan.sources)?;
    let mut out = Vec::new();
    for shard in &plan.shards {
        let Checked { jobs, .. } = check_shard(shard, plan, &maps)?;
        chunks_of(&jobs, DEFAULT_CHUNK_BYTES)
            .par_iter()
            .try_for_each(|c| {
                if progress.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let job = &jobs[c.job];
                match (job.dequant.as_deref(), job.quantize.as_deref()) {
                    (Some(d), _) => with_values(job, d, c, |values| job.count_loss(values)),
                    (_, Some(q)) => {
                        with_quantized(job, q, c, &CastOptions::default(), |_, loss| {
                            loss.inspect(|l| job.add_loss(l));
                        })
                    }
                    (None, None) => c.count_loss(&jobs, job.src_of(c)),
                }
                job.release(c);
                progress
                    .bytes_done
                    .fetch_add(job.src_done(c), Ordering::Relaxed);
                Ok(())
            })
            .map_err(|e| shrunk(&maps, true).unwrap_or(e))?;
        if let Some(e) = shrunk(&maps, false) {
            return Err(e); // what it read of a shrunk input was zeros
        }
        input::release_all(jobs.iter().map(|job| (job.map, job.src)));
        for job in &jobs {
            if job.rule.is_some() {
                out.push((job.plan.name.clone(), job.loss()));
            }
        }
    }
    Ok(out)
}

/// Map every input read-only and check it still has the size it had when
/// the plan was made.
fn map_sources(sources: &[SourceFile]) -> Result<Vec<Input>> {
    sources.iter().map(Input::open).collect()
}

/// The first input that shrank while mapped, as the error to report: one
/// whose read faulted, or (`sizes`, after a failed write, which may be a
/// write from a map whose pages are gone) whose size is now smaller.
fn shrunk(maps: &[Input], sizes: bool) -> Option<Error> {
    maps.iter()
        .filter(|m| sizes || m.faulted())
        .find_map(Input::shrunk)
}

#[cfg(test)]
impl Checked<'_> {
    /// The JSON length of the header as written (its length prefix).
    fn header_len_written(&self) -> u64 {
        self.header_bytes.len() as u64 - 8
    }
}

/// A shard checked against its plan and inputs, ready to write: its header
/// (and the bytes it is written as, made once: 9 ms for 100k tensors) and a
/// job per tensor.
struct Checked<'a> {
    header: Header,
    header_bytes: Vec<u8>,
    jobs: Vec<Job<'a>>,
}

/// Check one shard's plan against itself and the inputs; build its header.
fn check_shard<'a>(shard: &'a ShardPlan, plan: &Plan, maps: &'a [Input]) -> Result<Checked<'a>> {
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
        let source = &plan.sources[t.source].path;
        let (begin, end) = t.src_offsets;
        if begin > end || end > map.len() as u64 {
            return Err(bad(format!(
                "tensor {:?}: bytes [{begin}, {end}) are outside {} ({} bytes)",
                t.name,
                source.display(),
                map.len()
            )));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {:?}: shape overflows", t.name)))?;
        let src = &map[begin as usize..end as usize];
        // The source holds a tensor of `shape` (the output's, or for scales
        // their weight's).
        let holds = |shape: &[u64]| {
            let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            if numel.and_then(|n| n.checked_mul(from.bits())) == Some((end - begin) * 8) {
                return Ok(());
            }
            Err(bad(format!(
                "tensor {:?}: {} bytes in {} do not hold {from} {shape:?}",
                t.name,
                end - begin,
                source.display(),
            )))
        };
        let (dequant, quantize) = match (t.dequant.as_deref(), t.quantize.as_deref()) {
            (None, None) => {
                if from != to {
                    cast::check_buffers(from, to, 0, 0)?;
                }
                holds(&t.shape)?;
                (None, None)
            }
            // The source is packed as its format packs it (the dequantizer
            // checks its size); the f32 values are what is rounded.
            (Some(how), None) => {
                cast::check_buffers(DType::F32, to, 0, 0)?;
                let operand = |op: &'a Operand| operand_bytes(op, plan, maps);
                let d = Dequantizer::new(how, from, &t.shape, src.len(), &operand)
                    .map_err(|e| bad(format!("tensor {:?}: {e}", t.name)))?;
                (Some(d), None)
            }
            (None, Some(how)) => {
                let q = quantizing(t, how, from, to)
                    .map_err(|e| bad(format!("tensor {:?}: {e}", t.name)))?;
                holds(match how {
                    Quantize::Fp8Weight { .. } => &t.shape,
                    Quantize::Fp8Scale { weight_shape, .. } => weight_shape,
                })?;
                (None, Some(q))
            }
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "tensor {:?} is both dequantized and quantized",
                    t.name
                )))
            }
        };
        // For a quantized weight: the loss of rounding each W / s to e4m3
        // (counted by the quantizer, with the input's NaN and inf).
        let rule = match (&dequant, &quantize) {
            (Some(_), _) | (_, Some(Quantizing::Weight(_))) => Some(rule_for(DType::F32, to)),
            (_, Some(Quantizing::Scale { .. })) => None,
            (None, None) => (from != to).then(|| rule_for(from, to)),
        };
        infos.push(tensor_info(t));
        jobs.push(Job {
            plan: t,
            from,
            to,
            src,
            map,
            dst_start: 0,
            numel,
            rule,
            dequant: dequant.map(Box::new),
            quantize: quantize.map(Box::new),
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

/// The length of each shard's header JSON as the executor will write it,
/// from the plan alone (no input is read): to refuse, before anything is
/// written, a shard that safetensors readers would not open.
pub fn header_lens(plan: &Plan) -> Vec<u64> {
    plan.shards
        .iter()
        .map(|shard| header::json_len(shard.metadata.as_deref(), shard.tensors.iter().map(entry)))
        .collect()
}

/// Tensor `t`'s entry in its shard's header, borrowed.
pub fn entry(t: &TensorPlan) -> Entry<'_> {
    Entry {
        name: &t.name,
        dtype: t.dst_dtype,
        shape: &t.shape,
        data_offsets: t.dst_offsets,
    }
}

/// The loss rule of a dtype pair, found once per pair and thread (each is a
/// bisection over the scalar kernels; a model of 100k tensors asked 100k times).
fn rule_for(from: DType, to: DType) -> LossRule {
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

/// How tensor `t` is quantized from its source (`from`), checked: a weight's
/// values are F8_E4M3 of its shape, its scales F32 of the block grid.
fn quantizing<'a>(
    t: &'a TensorPlan,
    how: &'a Quantize,
    from: DType,
    to: DType,
) -> Result<Quantizing<'a>, String> {
    match how {
        Quantize::Fp8Weight { block } => {
            if to != DType::F8E4M3 {
                return Err(format!("fp8 values written as {to} (they are F8_E4M3)"));
            }
            Ok(Quantizing::Weight(Fp8Blocks::new(from, &t.shape, *block)?))
        }
        Quantize::Fp8Scale {
            block,
            weight,
            weight_shape,
        } => {
            if to != DType::F32 {
                return Err(format!("fp8 scales written as {to} (they are F32)"));
            }
            let blocks = Fp8Blocks::new(from, weight_shape, *block)?;
            if t.shape != blocks.grid() {
                return Err(format!(
                    "scales of shape {:?} for {weight:?} {weight_shape:?} in {block:?} blocks \
                     (needs {:?})",
                    t.shape,
                    blocks.grid()
                ));
            }
            Ok(Quantizing::Scale { blocks, weight })
        }
    }
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

/// Split jobs into chunks of at most `chunk_bytes` on either side, in the
/// order they run: plan order, except that scales run right after the weight
/// they are computed from, whose pages are then still in the page cache.
///
/// A dequantized tensor's chunks hold whole packed units of its output (one
/// output row of GPTQ/AWQ at least), a quantized weight's whole block-rows
/// (the blocks whose amax its scales need), so these may be larger than
/// `chunk_bytes`: one block-row of a very wide weight (128 rows of it, in
/// f32, for `fp8`) is the smallest chunk that can be quantized.
fn chunks_of(jobs: &[Job], chunk_bytes: usize) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for i in run_order(jobs) {
        let job = &jobs[i];
        if let Some(c) = chunks.last_mut().filter(|c| joins(jobs, c, i, chunk_bytes)) {
            c.end += job.src.len() as u64 / job.from.size() as u64;
            c.last = i;
            continue;
        }
        let (units, align, widest) = match (job.dequant.as_deref(), job.quantize.as_deref()) {
            (Some(d), _) => (job.numel, d.align(), job.to.size().max(4) as u64),
            // Each element's f32 value is held while its block is scaled.
            (_, Some(Quantizing::Weight(b))) => (job.numel, b.block_row_elements(), 4),
            // Each scale reads a block of the weight.
            (_, Some(Quantizing::Scale { blocks, .. })) => {
                (job.numel, blocks.grid()[1], 4 * blocks.block_elements())
            }
            // Sub-byte tensors are copied, never cast: count them in bytes.
            (None, None) if job.from.bits() < 8 => (job.src.len() as u64, 1, 1),
            (None, None) => (
                job.src.len() as u64 / job.from.size() as u64,
                1,
                job.from.size().max(job.to.size()) as u64,
            ),
        };
        let per_chunk = ((chunk_bytes as u64 / widest) / align).max(1) * align;
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
    let plain = |j: &Job| j.dequant.is_none() && j.quantize.is_none() && j.from.bits() >= 8;
    let widest = head.from.size().max(head.to.size()) as u64;
    let units = next.src.len() as u64 / next.from.size().max(1) as u64;
    i == c.last + 1
        && c.begin == 0
        && plain(head)
        && plain(next)
        && (next.from, next.to) == (head.from, head.to)
        && std::ptr::eq(next.map, head.map)
        && tail.src.as_ptr_range().end == next.src.as_ptr()
        // `c` is whole: it ends where `tail` ends.
        && head.dst_start + span(head.to, c.end) == tail.dst_start + span(tail.to, tail.numel)
        && tail.dst_start + span(tail.to, tail.numel) == next.dst_start
        && (c.end + units) * widest <= chunk_bytes as u64
}

/// The order jobs run in: plan order, each weight's scales right after it
/// (scales whose weight is in another shard stay where the plan put them).
fn run_order(jobs: &[Job]) -> Vec<usize> {
    let scale = |job: &Job| matches!(job.quantize.as_deref(), Some(Quantizing::Scale { .. }));
    if !jobs.iter().any(scale) {
        return (0..jobs.len()).collect(); // no scales: plan order, no name index
    }
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| (job.plan.name.as_str(), i))
        .collect();
    let mut after: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut deferred = vec![false; jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        if let Some(Quantizing::Scale { weight, .. }) = job.quantize.as_deref() {
            if let Some(&w) = index.get(weight) {
                after.entry(w).or_default().push(i);
                deferred[i] = true;
            }
        }
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

thread_local! {
    /// Each worker's reusable output buffer: at most one chunk per thread.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Each worker's dequantized (or quantized, before rounding) f32 values
    /// of its chunk.
    static VALUES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Hand `sink` the f32 values of chunk `c` of a dequantized job.
fn with_values<T>(job: &Job, d: &Dequantizer, c: &Chunk, sink: impl FnOnce(&[u8]) -> T) -> T {
    VALUES.with_borrow_mut(|values| {
        values.resize(4 * (c.end - c.begin) as usize, 0);
        d.dequantize(job.src_of(c), c.begin, values);
        sink(values)
    })
}

/// Hand `sink` the bytes chunk `c` of a quantizing job writes: e4m3 values
/// (with their loss counts) or F32 scales (no loss: not a rounding).
fn with_quantized<T>(
    job: &Job,
    q: &Quantizing,
    c: &Chunk,
    opts: &CastOptions,
    sink: impl FnOnce(&[u8], Option<&LossStats>) -> T,
) -> T {
    let n = (c.end - c.begin) as usize;
    BUFFER.with_borrow_mut(|buf| match q {
        Quantizing::Weight(blocks) => VALUES.with_borrow_mut(|values| {
            buf.resize(n, 0);
            let loss = blocks.quantize(job.src_of(c), values, buf, opts);
            sink(buf, Some(&loss))
        }),
        Quantizing::Scale { blocks, .. } => {
            let mut scales = vec![0f32; n];
            blocks.scales(job.src_of(c), &mut scales);
            buf.clear();
            buf.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            sink(buf, None)
        }
    })
}

fn write_shard(
    shard: &ShardPlan,
    checked: &Checked,
    opts: &ExecOptions,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<(ShardFile, u64)> {
    let stopped = || progress.cancel.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed);
    let Checked {
        header,
        header_bytes,
        jobs,
    } = checked;
    let total = header.data_start() + header.data_len();
    let out = ShardFile::create(&shard.path, total)?;
    out.write_at(header_bytes, 0)?;
    let mut hashes: Vec<(u64, u64)> = chunks_of(jobs, opts.chunk_bytes)
        .par_iter()
        .map(|c| {
            if stopped() {
                return Err(Error::Cancelled);
            }
            let job = &jobs[c.job];
            let offset = job.dst_start + span(job.to, c.begin);
            let written = span(job.to, c.end - c.begin);
            // Write `bytes` (already in the target dtype), hash them.
            let put = |bytes: &[u8]| -> Result<u64> {
                out.write_at(bytes, offset)?;
                Ok(xxh3_64(bytes))
            };
            // Round `values` (elements of `from`) to the target, write, count.
            let cast_put = |values: &[u8], from: DType| -> Result<u64> {
                if from == job.to {
                    c.count_loss(jobs, values);
                    return put(values);
                }
                BUFFER.with_borrow_mut(|buf| -> Result<u64> {
                    buf.resize(written as usize, 0);
                    if c.last == c.job {
                        job.cast_counting(values, from, buf, &opts.cast)?;
                    } else {
                        cast::cast(values, from, buf, job.to, &opts.cast)?;
                        c.count_loss(jobs, values);
                    }
                    put(buf)
                })
            };
            let hash = match (job.dequant.as_deref(), job.quantize.as_deref()) {
                (Some(d), _) => with_values(job, d, c, |values| cast_put(values, DType::F32))?,
                (_, Some(q)) => with_quantized(job, q, c, &opts.cast, |bytes, loss| {
                    loss.inspect(|l| job.add_loss(l));
                    put(bytes)
                })?,
                (None, None) => cast_put(job.src_of(c), job.from)?,
            };
            if opts.fsync {
                out.written(offset, written);
            }
            job.release(c);
            progress
                .bytes_done
                .fetch_add(job.src_done(c), Ordering::Relaxed);
            Ok((offset, hash))
        })
        .collect::<Result<_>>()?;
    if stopped() {
        return Err(Error::Cancelled);
    }
    hashes.sort_unstable();
    Ok((out, combine_digest(header_bytes, &hashes)))
}

#[cfg(test)]
mod tests;
