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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::cast::{self, CastOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::header::{self, Entry};
use crate::format::journal::{self, ShardRecord};
use crate::plan::wire::{Plan, ShardPlan, SourceFile, TensorPlan};
use crate::rules::loss::{LossRule, LossStats};
use crate::values::cast::{span, BUFFER};
use crate::values::{Kind, Source, Values};
use check::{check_shard, Checked};
use chunks::{chunks_of, Chunk};
use input::Input;
use shard_file::ShardFile;

mod check;
mod chunks;
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
pub mod positional;
mod residency;
pub mod shard_file;

/// The bytes hashed and then written at a time: a piece read from memory by
/// the hash is still in the core's L2 cache when the write copies it.
const PIECE: usize = 512 << 10;

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
            // Write `bytes` (already in the target dtype), hashed first: the
            // hash reads them, which maps an input's pages (bytes copied as
            // they are lie in its map), so the write copies without a fault.
            // Linux's buffered write halves its step at each copy cut short by
            // a fault and fills the rest of the write with 4 KiB cache pages:
            // a 1 GB copy made 210k of them instead of 2.7k large ones, and
            // the kernel's share of the run doubled. A [`PIECE`] at a time,
            // so that the write copies from L2 what the hash just read from
            // memory (one read of the input, not two); the streamed hash is
            // the one-shot hash of the whole chunk, which resume recomputes.
            let put = |bytes: &[u8]| -> Result<u64> {
                let mut hash = Xxh3::new();
                let mut at = offset;
                for piece in bytes.chunks(PIECE) {
                    hash.update(piece);
                    out.write_at(piece, at)?;
                    at += piece.len() as u64;
                }
                Ok(hash.digest())
            };
            let hash = if let Some(src) = cached_copy(jobs, c) {
                copy_through(job.map, src, |piece, at| {
                    out.write_at(piece, offset + at as u64)
                })?
            } else if c.last > c.job {
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

/// The source bytes of chunk `c` when it is a copy (its tensors keep their
/// dtype, no loss counted) of input blocks the page cache held when the run
/// began: [`copy_through`] copies those. Others are read through the map,
/// where a cold input's pages come in by the kernel's fault-time readahead.
fn cached_copy<'a>(jobs: &[Job<'a>], c: &Chunk) -> Option<&'a [u8]> {
    let job = &jobs[c.job];
    let copy = |j: &Job| j.values.is_cast() && j.from() == j.to() && j.rule.is_none();
    let src = job.kind().source(&job.source, c.begin, c.end);
    (jobs[c.job..=c.last].iter().all(copy) && job.map.was_cached_range(src)).then_some(src)
}

/// Copy `src` (bytes of `input`) a [`PIECE`] at a time: read into this
/// thread's piece buffer with `pread`, hash, `write(piece, at)` (`at` the
/// piece's offset in `src`); returns the hash of all of `src`.
///
/// Why not from the map, as a cast reads: the map's pages must be faulted in
/// and unmapped again (a TLB shootdown on every core), where `pread` copies
/// from the page cache into a buffer that stays in L2 for the hash and the
/// write. A 2 GB cached file copied on one thread took 1.45 s through the
/// map and 0.96 s so (medians of 6, a test program on this VM).
fn copy_through(
    input: &Input,
    src: &[u8],
    mut write: impl FnMut(&[u8], usize) -> Result<()>,
) -> Result<u64> {
    PIECE_BUFFER.with_borrow_mut(|buf| {
        buf.resize(PIECE.min(src.len()), 0);
        let mut hash = Xxh3::new();
        for at in (0..src.len()).step_by(PIECE) {
            let piece = &mut buf[..PIECE.min(src.len() - at)];
            input.read_at(src, at, piece)?;
            hash.update(piece);
            write(piece, at)?;
        }
        Ok(hash.digest())
    })
}

thread_local! {
    /// Each worker's buffer for [`copy_through`]: one [`PIECE`].
    static PIECE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
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
