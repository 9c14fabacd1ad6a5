//! The inputs of a run: each file mapped read-only, and which parts of it the
//! page cache held when the run began, so that the pages the run itself
//! brought in can be dropped behind it.
//!
//! Why drop them: converting a model larger than RAM from a cold cache, the
//! input's pages fill the page cache within seconds, and from then on every
//! fault waits for the kernel to reclaim a page first. The same run inside a
//! 1 GiB memory cgroup (which reclaims early, in small batches) was 1.2x
//! faster than uncapped. Dropping what we read once, and only that, leaves
//! the page cache as we found it: an input that was cached stays cached.

use std::fs::File;
use std::ops::Deref;

use memmap2::Mmap;
use std::path::PathBuf;

use super::fault::Watch;
use super::positional;
use super::residency::cached_blocks;
#[cfg(target_os = "linux")]
use super::residency::page_size;
use crate::error::{Error, Result};
use crate::plan::wire::SourceFile;

/// An input file, mapped.
pub(super) struct Input {
    /// Unregistered before the map goes (fields drop in order).
    watch: Watch,
    map: Mmap,
    path: PathBuf,
    /// Its size when the plan was made, and when it was mapped.
    size: u64,
    file: File,
    /// One bit per [`BLOCK`] of the file: set where the page cache held any
    /// page of it when the file was opened. Those blocks are never dropped.
    cached: Vec<u64>,
}

/// The granularity of "was it cached before we came": 2 MiB, the size of a
/// huge page and of the blocks small ranges are released in.
pub(super) const BLOCK: usize = 2 << 20;

impl Deref for Input {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Input {
    /// Map `source` read-only and check it still has the size it had when the
    /// plan was made; note which of its blocks the page cache holds.
    pub(super) fn open(source: &SourceFile) -> Result<Input> {
        let file = File::open(&source.path).map_err(|e| Error::io(&source.path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(&source.path, e))?
            .len();
        if len != source.size {
            return Err(Error::SourceChanged {
                path: source.path.clone(),
                expected: source.size,
                actual: len,
            });
        }
        // SAFETY: the map is read-only. If another process truncates the
        // file while we read it, reading past its new end faults (SIGBUS):
        // `Watch` turns that into zeros read and a flag, which `shrunk`
        // reports; the size check above catches a file replaced between
        // planning and running.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&source.path, e))?;
        let watch = Watch::new(&map);
        // No MADV_SEQUENTIAL, though the reads are sequential: with it, a
        // cold 38.6 GB conversion was slower in each of 6 interleaved pairs
        // (median 31.6 s against 28.2 s without). The kernel's default
        // fault-around and readahead do better; dropping what was read is
        // done here, by `release`.
        let cached = cached_blocks(&file, &map, BLOCK);
        Ok(Input {
            watch,
            map,
            path: source.path.clone(),
            size: len,
            file,
            cached,
        })
    }

    /// Whether a read of the map faulted: the file shrank under it.
    pub(super) fn faulted(&self) -> bool {
        self.watch.faulted()
    }

    /// The error to report when the file shrank since it was mapped (a read
    /// past its new end faulted, or its size says so); None while it is whole.
    pub(super) fn shrunk(&self) -> Option<Error> {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(self.size);
        (self.watch.faulted() || now < self.size).then(|| Error::SourceChanged {
            path: self.path.clone(),
            expected: self.size,
            actual: now,
        })
    }

    /// Whether every block `range` (a slice of this input) touches was (partly)
    /// in the page cache when the file was opened.
    pub(super) fn was_cached_range(&self, range: &[u8]) -> bool {
        let start = self.offset_of(range);
        let end = start + range.len();
        (start / BLOCK..end.div_ceil(BLOCK)).all(|b| self.was_cached(b))
    }

    /// Read into `buf` the bytes of `range` (a slice of this input) from
    /// `at` on, with `pread`: nothing is mapped, so there is nothing to unmap.
    pub(super) fn read_at(&self, range: &[u8], at: usize, buf: &mut [u8]) -> Result<()> {
        let offset = self.offset_of(range) + at;
        positional::read_exact_at(&self.file, buf, offset as u64)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Where `range` (a slice of this input) starts in the file.
    fn offset_of(&self, range: &[u8]) -> usize {
        range.as_ptr() as usize - self.map.as_ptr() as usize
    }

    /// Whether block `b` was (partly) in the page cache when we opened the file.
    fn was_cached(&self, b: usize) -> bool {
        self.cached
            .get(b / 64)
            .is_none_or(|word| word & (1 << (b % 64)) != 0)
    }
}

/// Done with `range` of `input`: unmap its pages, and drop from the page
/// cache those the run brought in. Unmapped data stays in the page cache
/// (re-reads are cheap) but leaves our resident set, so RSS stays flat
/// however large the model. Safe for a read-only file mapping: a page touched
/// again is simply faulted back in (from the disk, if it was dropped).
///
/// A range of [`BLOCK`] or more is unmapped with [`FAULT_AROUND`] bytes
/// behind it: reading a page maps its cached neighbours in the same aligned
/// window ("fault-around"), pages of finished data included. Smaller ranges
/// (a model of 100k tiny tensors) release nothing themselves: the one that
/// crosses a block boundary of the mapping releases the whole block behind
/// it. One madvise per tiny tensor cost a TLB shootdown on every core each
/// (and split huge pages), about a third of the run; now it is one per 2 MiB.
/// A neighbour still being read just faults its pages back in.
///
/// Only whole pages of the range itself are dropped from the cache (not the
/// fault-around bytes behind it, which another thread may not have read yet).
#[cfg(target_os = "linux")]
pub(super) fn release(range: &[u8], input: &Input) {
    if range.is_empty() {
        return;
    }
    let page = page_size();
    let base = input.map.as_ptr() as usize;
    let start = range.as_ptr() as usize;
    let end = start + range.len();
    let (lo, hi, drop_from) = if range.len() >= BLOCK {
        (start.saturating_sub(FAULT_AROUND), end, start)
    } else {
        let boundary = base + (end - base) / BLOCK * BLOCK;
        if boundary <= start.max(base) {
            return; // no block boundary inside this range
        }
        let lo = boundary.saturating_sub(BLOCK + FAULT_AROUND);
        (lo, boundary, boundary.saturating_sub(BLOCK))
    };
    unmap(input, lo.max(base) - base, hi - base);
    let from = drop_from.max(base).div_ceil(page) * page - base;
    let to = (hi.min(base + input.map.len()) - base) / page * page;
    drop_behind(input, from, to);
}

/// Done with a shard: drop from the page cache the blocks its sources (in
/// `ranges`, slices of the inputs) cover, those the run brought in. This
/// takes the pages [`release`] leaves: the page cache holds large folios (up
/// to 2 MiB here), and one that straddles two chunks is dropped by neither,
/// being only partly inside each; a quarter of a cold 38 GB input stayed
/// cached so. The next shard's reading has not begun, so whole blocks can go.
///
/// The blocks are unmapped first: a chunk's last fault maps cached pages past
/// its end (fault-around, or a whole large folio), which its own [`release`]
/// leaves mapped when a later chunk finished first, and the page cache keeps
/// a page (its whole folio) while anyone maps it. Under load in CI this left
/// up to 1 MiB per shard boundary of a cold input cached.
#[cfg(target_os = "linux")]
pub(super) fn release_all<'a>(ranges: impl IntoIterator<Item = (&'a Input, &'a [u8])>) {
    let mut span: Option<(&Input, usize, usize)> = None;
    let flush = |(input, lo, hi): (&Input, usize, usize)| {
        let (from, to) = (
            lo / BLOCK * BLOCK,
            (hi.div_ceil(BLOCK) * BLOCK).min(input.map.len()),
        );
        unmap(input, from, to);
        drop_behind(input, from, to);
    };
    for (input, range) in ranges {
        let lo = input.offset_of(range);
        let hi = lo + range.len();
        span = match span {
            Some((i, a, b)) if std::ptr::eq(i, input) && lo <= b.next_multiple_of(BLOCK) => {
                Some((i, a.min(lo), b.max(hi)))
            }
            Some(done) => {
                flush(done);
                Some((input, lo, hi))
            }
            None => Some((input, lo, hi)),
        };
    }
    if let Some(done) = span {
        flush(done);
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn release_all<'a>(_ranges: impl IntoIterator<Item = (&'a Input, &'a [u8])>) {}

/// Unmap the pages of `input` holding bytes `[from, to)` (offsets in the
/// map, widened to whole pages): they leave our resident set and page
/// tables, and the page cache may drop them (it keeps a page anyone maps).
#[cfg(target_os = "linux")]
fn unmap(input: &Input, from: usize, to: usize) {
    let page = page_size();
    let first = from / page * page;
    let last = to.div_ceil(page).min(input.map.len().div_ceil(page)) * page;
    if last <= first {
        return;
    }
    // SAFETY: [first, last) lies in the map's pages (a mapping is whole pages
    // from a page-aligned base, and `last` is at most its last page's end), a
    // live read-only file mapping; MADV_DONTNEED only drops our page-table
    // entries for it, and later reads fault the same file data back in.
    unsafe {
        libc::madvise(
            input.map.as_ptr().add(first) as *mut libc::c_void,
            last - first,
            libc::MADV_DONTNEED,
        );
    }
}

/// Drop file bytes `[from, to)` of `input` from the page cache, except the
/// blocks that were cached before the run.
#[cfg(target_os = "linux")]
fn drop_behind(input: &Input, from: usize, to: usize) {
    use std::os::fd::AsRawFd;
    let mut at = from;
    while at < to {
        let block_end = ((at / BLOCK + 1) * BLOCK).min(to);
        if input.was_cached(at / BLOCK) {
            at = block_end;
            continue;
        }
        // Extend over the following blocks that were not cached either.
        let mut end = block_end;
        while end < to && !input.was_cached(end / BLOCK) {
            end = ((end / BLOCK + 1) * BLOCK).min(to);
        }
        // SAFETY: an advisory syscall on a descriptor we own; it drops only
        // clean pages no one maps, which later reads fetch again.
        unsafe {
            libc::posix_fadvise(
                input.file.as_raw_fd(),
                at as libc::off64_t,
                (end - at) as libc::off64_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        at = end;
    }
}

/// How far behind a released range pages are unmapped too: Linux's default
/// `fault_around_bytes`.
#[cfg(target_os = "linux")]
const FAULT_AROUND: usize = 64 << 10;

/// Off Linux, nothing: the OS reclaims clean mapped file pages on its own terms.
#[cfg(not(target_os = "linux"))]
pub(super) fn release(_range: &[u8], _input: &Input) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::hint::black_box;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::scratch::Scratch;

    /// Bytes of `input` the page cache holds (`mincore` on a mapping of our own).
    fn resident(input: &Input) -> usize {
        let page = page_size();
        // SAFETY: read-only, of a file only this test writes.
        let map = unsafe { Mmap::map(&input.file) }.unwrap();
        let mut vec = vec![0u8; map.len().div_ceil(page)];
        // SAFETY: `vec` has one byte per page of the live mapping.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        vec.iter().filter(|&&v| v & 1 != 0).count() * page
    }

    /// Fault in every page of `range`, as a cast reading it would.
    fn read(range: &[u8]) {
        for page in range.chunks(4096) {
            black_box(page[0]);
        }
    }

    /// Another program truncates an input while it is mapped: reading past
    /// its new end faults (SIGBUS), which killed the process with no message.
    /// Now the read sees zeros, and the input says it shrank, naming itself.
    #[test]
    fn a_file_truncated_under_its_map_is_an_error_not_a_crash() {
        let dir = Scratch::new("truncated");
        let path = dir.0.join("in.bin");
        let size = 64 << 10;
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let source = SourceFile {
            path: path.clone(),
            size: size as u64,
        };
        let input = Input::open(&source).unwrap();
        assert!(input.shrunk().is_none());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let tail: u64 = input[8192..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0, "the missing pages read as zeros");
        assert_eq!(input[0], 7, "the pages still there are the file's");
        assert!(input.faulted());
        let err = input.shrunk().expect("the input shrank").to_string();
        assert!(
            err.contains("in.bin") && err.contains("65536") && err.contains("4096"),
            "{err}"
        );
        // A fault outside any watched map is not ours to hide: that the
        // handler passes it on is what keeps this process's other faults
        // fatal (not run here: it would end the test process).
    }

    /// Two chunks of one shard read by two threads, the later one finishing
    /// first. The earlier one's last fault maps the cached pages around it
    /// (fault-around, 64 KiB; a whole large folio on newer kernels), pages
    /// past its end among them, which its own release leaves mapped; a mapped
    /// page cannot be dropped from the cache. Under load this left 64 KiB to
    /// 1 MiB of a cold input cached in CI. Once the shard is done, none may
    /// stay.
    #[test]
    fn a_finished_shard_leaves_none_of_what_it_read_cached() {
        let dir = Scratch::new("page-cache");
        let path = dir.0.join("in.bin");
        let size = 12 << 20;
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![7u8; size]).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advisory, on our own descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let source = SourceFile {
            path: path.clone(),
            size: size as u64,
        };
        let input = Input::open(&source).unwrap();
        assert_eq!(
            resident(&input),
            0,
            "{} could not be evicted",
            path.display()
        );
        // A boundary off any fault-around window, as a header's length makes it.
        let mid = (6 << 20) + 1000;
        let (early, late) = input.split_at(mid);
        read(late);
        release(late, &input);
        read(early);
        // What the fault-around of the early chunk's last fault maps past it.
        read(&late[..FAULT_AROUND / 2]);
        release(early, &input);
        release_all([(&input, early), (&input, late)]);
        assert_eq!(resident(&input), 0);
    }
}
