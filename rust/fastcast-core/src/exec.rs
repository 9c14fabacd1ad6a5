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

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::cast::{self, CastOptions};
use crate::dequant::Operand;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::header::{self, Entry, Header, TensorInfo, MAX_HEADER_LEN};
use crate::journal::{self, ShardRecord};
use crate::loss::{LossRule, LossStats};
use crate::positional;
use crate::shard_file::{self, ShardFile};
use crate::values::cast::{span, BUFFER};
use crate::values::{Invalid, Kind, Source, Units, Value, Values};
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
    /// What its values are: its source cast, a quantized weight's values
    /// reconstructed, a float weight quantized (see [`crate::values`]).
    #[serde(flatten)]
    pub value: Value,
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
    /// Its source bytes and dtypes, as its kind reads them.
    source: Source<'a>,
    /// The input its source lies in (released pages must stay inside it).
    map: &'a Input,
    /// Offset of the tensor's first byte in the output file.
    dst_start: u64,
    /// What a rounding of its values loses, when they are rounded.
    rule: Option<LossRule>,
    /// Its kind of values, checked.
    values: Values<'a>,
    /// Loss counts gathered chunk by chunk.
    stats: Mutex<LossStats>,
    /// Chunks not yet done, for a source every chunk reads whole (released
    /// after the last one).
    pending: AtomicU64,
}

impl Job<'_> {
    /// Its kind: every per-kind step goes through this.
    fn kind(&self) -> &dyn Kind {
        self.values.kind()
    }

    fn from(&self) -> DType {
        self.source.from
    }

    fn to(&self) -> DType {
        self.source.to
    }

    fn src(&self) -> &[u8] {
        self.source.src
    }

    /// The source bytes of chunk `c`.
    fn src_of(&self, c: &Chunk) -> &[u8] {
        self.kind().source(&self.source, c.begin, c.end)
    }

    /// Input bytes chunk `c` accounts for in progress: its source bytes, or
    /// its share of a source every chunk reads whole (the shares add up to it).
    fn src_done(&self, c: &Chunk) -> u64 {
        let kind = self.kind();
        if !kind.counts_reads() {
            return 0;
        }
        if kind.reads_whole_source() {
            let len = self.src().len() as u128;
            let share = |k: u64| (len * k as u128 / self.source.numel.max(1) as u128) as u64;
            return share(c.end) - share(c.begin);
        }
        self.src_of(c).len() as u64
    }

    /// Done with chunk `c`: release the input pages it alone read (a source
    /// every chunk reads whole, after its last chunk).
    fn release(&self, c: &Chunk) {
        if !self.kind().reads_whole_source() {
            return input::release(self.src_of(c), self.map);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            input::release(self.src(), self.map);
        }
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
            job.count_loss(job.src());
        }
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
                    input::release_all(jobs.iter().map(|job| (job.map, job.src())));
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
        let committed = committer.join().unwrap_or(Err(Error::WorkerDied {
            what: "the commit thread panicked",
        }));
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
        if job.kind().counts_reads() {
            stats.bytes_read += job.src().len() as u64;
        }
        if job.from() == job.to() {
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
            let offset = job.dst_start + span(job.to(), c.begin);
            let mut buf = vec![0u8; span(job.to(), c.end - c.begin) as usize];
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
                if c.last > c.job {
                    c.count_loss(&jobs, job.src_of(c));
                } else if let Some(found) =
                    job.kind()
                        .scan(&job.source, c.begin, c.end, job.rule.as_ref())
                {
                    job.add_loss(&found);
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
        input::release_all(jobs.iter().map(|job| (job.map, job.src())));
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
fn run_order(jobs: &[Job]) -> Vec<usize> {
    if !jobs.iter().any(|job| job.kind().after().is_some()) {
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
        if let Some(&w) = job.kind().after().and_then(|weight| index.get(weight)) {
            after.entry(w).or_default().push(i);
            deferred[i] = true;
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
            let offset = job.dst_start + span(job.to(), c.begin);
            let written = span(job.to(), c.end - c.begin);
            // Write `bytes` (already in the target dtype), hash them.
            let put = |bytes: &[u8]| -> Result<u64> {
                out.write_at(bytes, offset)?;
                Ok(xxh3_64(bytes))
            };
            let hash = if c.last > c.job {
                cast_run(jobs, c, written, &opts.cast, put)?
            } else {
                job.kind().produce(
                    &job.source,
                    c.begin,
                    c.end,
                    &opts.cast,
                    job.rule.as_ref(),
                    &mut |bytes, loss| {
                        if let Some(found) = loss {
                            job.add_loss(found);
                        }
                        put(bytes)
                    },
                )?
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

/// Make chunk `c`, a run of whole small tensors of one dtype pair that follow
/// each other in their input and in the output (see [`joins`]), as one cast
/// (or copy) of `written` bytes, counting each tensor's loss, and `put` it.
fn cast_run(
    jobs: &[Job],
    c: &Chunk,
    written: u64,
    opts: &CastOptions,
    put: impl FnOnce(&[u8]) -> Result<u64>,
) -> Result<u64> {
    let job = &jobs[c.job];
    let values = job.src_of(c);
    c.count_loss(jobs, values);
    if job.from() == job.to() {
        return put(values);
    }
    BUFFER.with_borrow_mut(|buf| {
        buf.resize(written as usize, 0);
        cast::cast(values, job.from(), buf, job.to(), opts)?;
        put(buf)
    })
}

#[cfg(test)]
mod tests;
