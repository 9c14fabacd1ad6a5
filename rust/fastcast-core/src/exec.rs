//! Runs a conversion plan: maps the inputs, casts in parallel chunks through
//! bounded per-thread buffers, writes each chunk at its final offset.
//!
//! The plan is pure data made by the Python layer (which tensor goes to which
//! shard, at which offset, in which dtype). Nothing here decides layout; it
//! checks that the plan is self-consistent and matches the files on disk,
//! then moves bytes. No tensor, shard or model is ever held in memory: at any
//! moment each worker thread holds one chunk of at most `chunk_bytes`.

use std::cell::RefCell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{Advice, Mmap};
use rayon::prelude::*;
use serde::Deserialize;

use crate::cast::{self, CastOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::header::{Header, TensorInfo};
use crate::shard_file::{self, ShardFile};

/// A whole conversion: input files and the output shards to produce.
#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    pub sources: Vec<SourceFile>,
    pub shards: Vec<ShardPlan>,
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
    pub src_dtype: String,
    pub dst_dtype: String,
    /// `[begin, end)` in the source *file* (header included).
    pub src_offsets: (u64, u64),
    /// `[begin, end)` in the output's data buffer.
    pub dst_offsets: (u64, u64),
}

/// How a plan runs.
#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    pub cast: CastOptions,
    /// Largest chunk a worker casts at once (input or output side).
    pub chunk_bytes: usize,
    /// Sync each shard before renaming it into place.
    pub fsync: bool,
}

impl Default for ExecOptions {
    fn default() -> ExecOptions {
        ExecOptions {
            cast: CastOptions::default(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            fsync: true,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecStats {
    pub tensors_cast: u64,
    pub tensors_copied: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub shards_written: u64,
}

/// A tensor whose plan has been checked, ready to run.
struct Job<'a> {
    plan: &'a TensorPlan,
    from: DType,
    to: DType,
    src: &'a [u8],
    /// Offset of the tensor's first byte in the output file.
    dst_start: u64,
}

/// One unit of parallel work: elements `[begin, end)` of a job.
struct Chunk {
    job: usize,
    begin: u64,
    end: u64,
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

/// Run `plan`: every shard is written under a temporary name, synced and
/// renamed into place in plan order; the output folder is synced at the end.
///
/// Stops early (removing the shard in progress) on the first error or when
/// `progress.cancel` is set.
///
/// Each finished shard is handed to a committer thread that syncs and renames
/// it while the workers go on with the next shard, so the sync overlaps the
/// casting instead of stalling it.
pub fn execute(plan: &Plan, opts: &ExecOptions, progress: &Progress) -> Result<ExecStats> {
    let maps = map_sources(&plan.sources)?;
    let mut stats = ExecStats::default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    // Validate every shard before writing any: a bad plan writes nothing.
    let checked = plan
        .shards
        .iter()
        .map(|shard| check_shard(shard, plan, &maps))
        .collect::<Result<Vec<_>>>()?;
    let fsync = opts.fsync;
    std::thread::scope(|scope| -> Result<()> {
        let (to_commit, committer_rx) = std::sync::mpsc::channel::<ShardFile>();
        let committer = scope.spawn(move || -> Result<()> {
            // Commit in order; after the first failure, drop (and so delete)
            // everything still queued.
            let mut failed = None;
            for shard in committer_rx {
                if failed.is_none() {
                    failed = shard.commit(fsync).err();
                }
            }
            failed.map_or(Ok(()), Err)
        });
        let mut written = Ok(());
        for (shard, (header, jobs)) in plan.shards.iter().zip(&checked) {
            match write_shard(shard, header, jobs, opts, progress) {
                Ok(file) => {
                    if to_commit.send(file).is_err() {
                        break; // the committer stopped: its error is reported below
                    }
                }
                Err(e) => {
                    written = Err(e);
                    break;
                }
            }
            stats.shards_written += 1;
            stats.bytes_written += header.data_start() + header.data_len();
            for job in jobs {
                stats.bytes_read += job.src.len() as u64;
                if job.from == job.to {
                    stats.tensors_copied += 1;
                } else {
                    stats.tensors_cast += 1;
                }
            }
            let dir = shard.path.parent().unwrap_or(Path::new(".")).to_owned();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        drop(to_commit);
        let committed = committer.join().unwrap_or_else(|_| {
            Err(Error::Plan {
                path: PathBuf::new(),
                problem: "the commit thread panicked".into(),
            })
        });
        written.and(committed)
    })?;
    if opts.fsync {
        for dir in dirs {
            shard_file::sync_dir(&dir)?;
        }
    }
    Ok(stats)
}

/// Map every input read-only and check it still has the size it had when
/// the plan was made.
fn map_sources(sources: &[SourceFile]) -> Result<Vec<Mmap>> {
    sources
        .iter()
        .map(|s| {
            let file = File::open(&s.path).map_err(|e| Error::io(&s.path, e))?;
            let len = file.metadata().map_err(|e| Error::io(&s.path, e))?.len();
            if len != s.size {
                return Err(Error::SourceChanged {
                    path: s.path.clone(),
                    expected: s.size,
                    actual: len,
                });
            }
            // SAFETY: the map is read-only. If another process truncates the
            // file while we read it, access faults (SIGBUS) as with any
            // mmap-based reader; the size check above catches the common case
            // of a file replaced between planning and running.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&s.path, e))?;
            let _ = map.advise(Advice::Sequential);
            Ok(map)
        })
        .collect()
}

/// Check one shard's plan against itself and the inputs; build its header.
fn check_shard<'a>(
    shard: &'a ShardPlan,
    plan: &Plan,
    maps: &'a [Mmap],
) -> Result<(Header, Vec<Job<'a>>)> {
    let bad = |problem: String| Error::Plan {
        path: shard.path.clone(),
        problem,
    };
    let mut infos = Vec::with_capacity(shard.tensors.len());
    let mut jobs = Vec::with_capacity(shard.tensors.len());
    for t in &shard.tensors {
        let from: DType = t.src_dtype.parse()?;
        let to: DType = t.dst_dtype.parse()?;
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
        if from != to {
            cast::check_buffers(from, to, 0, 0)?;
        }
        let src_bits = numel.checked_mul(from.bits());
        if src_bits != Some((end - begin) * 8) {
            return Err(bad(format!(
                "tensor {:?}: {} bytes in {} do not hold {from} {:?}",
                t.name,
                end - begin,
                source.display(),
                t.shape
            )));
        }
        infos.push(TensorInfo {
            name: t.name.clone(),
            dtype: to,
            shape: t.shape.clone(),
            data_offsets: t.dst_offsets,
        });
        jobs.push(Job {
            plan: t,
            from,
            to,
            src: &map[begin as usize..end as usize],
            dst_start: 0,
        });
    }
    let header = Header {
        metadata: shard.metadata.clone(),
        tensors: infos,
        header_len: 0,
    };
    // Validate the output exactly as a reader will: sizes match dtypes and
    // shapes, and the tensors tile the data buffer with no gap or overlap.
    let bytes = header.to_bytes();
    let data_end = header
        .tensors
        .iter()
        .map(|t| t.data_offsets.1)
        .max()
        .unwrap_or(0);
    let checked = Header::parse_json(&shard.path, &bytes[8..], data_end)?;
    for job in &mut jobs {
        job.dst_start = checked.data_start() + job.plan.dst_offsets.0;
    }
    Ok((checked, jobs))
}

/// Split jobs into chunks of at most `chunk_bytes` on either side.
fn chunks_of(jobs: &[Job], chunk_bytes: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        // Sub-byte tensors are copied, never cast: count them in bytes.
        let units = if job.from.bits() < 8 {
            job.src.len() as u64
        } else {
            job.src.len() as u64 / job.from.size() as u64
        };
        let widest = job.from.size().max(job.to.size()) as u64;
        let per_chunk = (chunk_bytes as u64 / widest).max(1);
        let mut begin = 0;
        while begin < units {
            let end = (begin + per_chunk).min(units);
            chunks.push(Chunk { job: i, begin, end });
            begin = end;
        }
    }
    chunks
}

thread_local! {
    /// Each worker's reusable output buffer: at most one chunk per thread.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn write_shard(
    shard: &ShardPlan,
    header: &Header,
    jobs: &[Job],
    opts: &ExecOptions,
    progress: &Progress,
) -> Result<ShardFile> {
    let header_bytes = header.to_bytes();
    let total = header.data_start() + header.data_len();
    let out = ShardFile::create(&shard.path, total)?;
    out.write_at(&header_bytes, 0)?;
    chunks_of(jobs, opts.chunk_bytes)
        .par_iter()
        .try_for_each(|c| {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let job = &jobs[c.job];
            let src_begin = span(job.from, c.begin) as usize;
            let src = &job.src[src_begin..span(job.from, c.end) as usize];
            let offset = job.dst_start + span(job.to, c.begin);
            let written = span(job.to, c.end - c.begin);
            if job.from == job.to {
                out.write_at(src, offset)?;
            } else {
                BUFFER.with_borrow_mut(|buf| -> Result<()> {
                    buf.resize(written as usize, 0);
                    cast::cast(src, job.from, buf, job.to, &opts.cast)?;
                    out.write_at(buf, offset)
                })?;
            }
            if opts.fsync {
                out.written(offset, written);
            }
            release_pages(src);
            progress
                .bytes_done
                .fetch_add(src.len() as u64, Ordering::Relaxed);
            Ok(())
        })?;
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    Ok(out)
}

/// Unmap the whole pages of an input range we are done with. The data stays
/// in the page cache (re-reads are cheap) but leaves our resident set, so RSS
/// stays flat however large the model, and the pages are easy to reclaim
/// under memory pressure. Safe for a read-only file mapping: a page touched
/// again is simply faulted back in.
fn release_pages(range: &[u8]) {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    let page = *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    });
    let start = range.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let last = (start + range.len()) / page * page;
    if last > first {
        // SAFETY: [first, last) lies inside `range`, which is part of a live
        // read-only file mapping; MADV_DONTNEED only drops our page-table
        // entries for it, and later reads fault the same file data back in.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            );
        }
    }
}

#[cfg(test)]
mod tests;
