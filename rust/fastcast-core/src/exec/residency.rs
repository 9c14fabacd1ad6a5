//! Which blocks of an input the page cache holds when a run begins: asked of
//! the kernel with `cachestat` (Linux 6.5), or `mincore` where it lacks that.
//!
//! Why not `mincore` alone: it answers a byte per 4 KiB page, looking each
//! one up, so on a cached 5 GB input it cost 0.087 s before any work could
//! start (2.6 s for 150 GB), where `cachestat` counts a range's cached pages
//! folio by folio: one call per 2 MiB block took 0.0006 s for the same 5 GB
//! (measured on this VM, kernel 6.18).

use std::fs::File;

/// One bit per `block` bytes of `file` (its first `len` bytes, mapped at
/// `map`): set where the page cache holds any page of the block. Every bit
/// is set where that cannot be told, so that nothing is taken for ours to drop.
#[cfg(target_os = "linux")]
pub(super) fn cached_blocks(file: &File, map: &[u8], block: usize) -> Vec<u64> {
    cachestat_blocks(file, map.len(), block).unwrap_or_else(|| mincore_blocks(map, block))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn cached_blocks(_file: &File, _map: &[u8], _block: usize) -> Vec<u64> {
    Vec::new()
}

/// The kernel's `struct cachestat_range` (include/uapi/linux/mman.h).
#[cfg(target_os = "linux")]
#[repr(C)]
struct Range {
    off: u64,
    len: u64,
}

/// The kernel's `struct cachestat`: counts of pages.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct Stat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// `cachestat`'s number, the same on every architecture's unified table; the
/// `libc` crate names it only for some targets.
#[cfg(target_os = "linux")]
const SYS_CACHESTAT: libc::c_long = 451;

/// Pages of `file` in `[off, off + len)` the page cache holds; None where the
/// kernel cannot say (older than 6.5, a filter refusing the call, a file
/// system without a page cache).
#[cfg(target_os = "linux")]
fn cached_pages(file: &File, off: u64, len: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let range = Range { off, len };
    let mut stat = Stat::default();
    // SAFETY: both pointers are to live values of the layouts the kernel
    // reads and writes; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    (rc == 0).then_some(stat.nr_cache)
}

/// [`cached_blocks`] by `cachestat`: the whole file first, which settles a
/// wholly cached or wholly cold input in one call, then block by block.
#[cfg(target_os = "linux")]
fn cachestat_blocks(file: &File, len: usize, block: usize) -> Option<Vec<u64>> {
    let blocks = len.div_ceil(block);
    let words = blocks.div_ceil(64);
    let whole = cached_pages(file, 0, len as u64)?;
    if whole == 0 {
        return Some(vec![0; words]);
    }
    let all = whole >= len.div_ceil(page_size()) as u64;
    let mut bits = vec![0u64; words];
    for b in 0..blocks {
        let off = b * block;
        let span = block.min(len - off);
        if all || cached_pages(file, off as u64, span as u64)? > 0 {
            bits[b / 64] |= 1 << (b % 64);
        }
    }
    Some(bits)
}

/// [`cached_blocks`] by `mincore` on the mapping, a window at a time.
#[cfg(target_os = "linux")]
fn mincore_blocks(map: &[u8], block: usize) -> Vec<u64> {
    let page = page_size();
    let blocks = map.len().div_ceil(block);
    let mut bits = vec![0u64; blocks.div_ceil(64)];
    const WINDOW: usize = 1 << 30;
    let mut vec = Vec::new();
    for start in (0..map.len()).step_by(WINDOW) {
        let len = WINDOW.min(map.len() - start);
        vec.resize(len.div_ceil(page), 0u8);
        // SAFETY: [start, start + len) lies in the live mapping, whose base is
        // page-aligned (so is `start`, a multiple of WINDOW); `vec` holds one
        // byte per page of it, as mincore requires.
        let ok = unsafe {
            libc::mincore(
                map.as_ptr().add(start) as *mut libc::c_void,
                len,
                vec.as_mut_ptr(),
            )
        } == 0;
        for (i, &v) in vec.iter().enumerate() {
            if !ok || v & 1 != 0 {
                let b = (start + i * page) / block;
                bits[b / 64] |= 1 << (b % 64);
            }
        }
    }
    bits
}

#[cfg(target_os = "linux")]
pub(super) fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use memmap2::Mmap;

    use super::*;
    use crate::scratch::Scratch;

    const BLOCK: usize = 2 << 20;

    /// Unmap all of `map` (the cache keeps a page anyone maps) and drop its
    /// file's pages from the cache.
    fn drop_cached(file: &File, map: &Mmap) {
        // SAFETY: MADV_DONTNEED on a live read-only file mapping only drops
        // our page-table entries; fadvise is advisory, on our own descriptor.
        unsafe {
            libc::madvise(map.as_ptr() as *mut _, map.len(), libc::MADV_DONTNEED);
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Both ways of asking give the same blocks on a file wholly cached,
    /// wholly cold, and cached in patches (one page of a block, a tail block
    /// shorter than the others), so swapping `mincore` for `cachestat` drops
    /// and keeps exactly what it did.
    #[test]
    fn cachestat_and_mincore_name_the_same_blocks() {
        let dir = Scratch::new("residency");
        let path = dir.0.join("in.bin");
        let size = 9 * BLOCK + 12345;
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![3u8; size]).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: read-only, of a file only this test writes.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        // No readahead: a read caches the pages it touches and no others, so
        // the blocks expected are exactly those read.
        map.advise(memmap2::Advice::Random).unwrap();
        // SAFETY: advisory, on our own descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let read = |from: usize, to: usize| {
            let mut sum = 0u64;
            for at in (from..to).step_by(4096) {
                sum += u64::from(map[at]);
            }
            std::hint::black_box(sum);
        };
        let ask = || {
            let by_cachestat = cachestat_blocks(&file, map.len(), BLOCK);
            let by_mincore = mincore_blocks(&map, BLOCK);
            if let Some(bits) = &by_cachestat {
                assert_eq!(bits, &by_mincore);
            }
            by_mincore
        };
        read(0, size);
        assert_eq!(ask(), vec![(1 << 10) - 1], "wholly cached");
        drop_cached(&file, &map);
        if ask() != vec![0] {
            return; // this file system kept the pages: nothing to compare cold
        }
        assert_eq!(cachestat_blocks(&file, map.len(), BLOCK), Some(vec![0]));
        read(BLOCK + 5 * 4096, BLOCK + 6 * 4096);
        read(4 * BLOCK, 6 * BLOCK);
        read(9 * BLOCK + 4096, size);
        let bits = ask();
        assert_eq!(bits, vec![0b10_0011_0010], "blocks 1, 4, 5 and 9");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let version: Vec<u32> = release
            .split(|c: char| !c.is_ascii_digit())
            .take(2)
            .filter_map(|n| n.parse().ok())
            .collect();
        if version >= vec![6, 5] {
            assert!(
                cached_pages(&file, 0, 0).is_some(),
                "cachestat failed on kernel {release}: the test compared nothing"
            );
        }
    }
}
