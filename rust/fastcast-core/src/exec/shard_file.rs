//! An output shard being written: under a temporary name until it is complete
//! and synced, then renamed into place; removed if anything goes wrong.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::positional;
use crate::error::{Error, Result};
use crate::format::journal::FileStamp;

/// A file written at offsets by many threads, which appears under its final
/// name only through [`ShardFile::commit`]. Dropping it uncommitted removes
/// the temporary file, so an error or an interrupt never leaves a partial
/// file under a final name.
pub struct ShardFile {
    file: File,
    temp: PathBuf,
    path: PathBuf,
    committed: bool,
    /// Held across each write: one writer at a time (see [`ShardFile::write_at`]).
    writing: Mutex<()>,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pending: Mutex<Pending>,
}

/// Output bytes allowed to be dirty or under writeback per shard before the
/// writer waits for the oldest to reach the disk.
pub const WRITEBACK_WINDOW: u64 = 64 << 20;

/// Written bytes are handed to writeback in spans of at least this much, so
/// that a shard of many tiny tensors costs a few syscalls per MiB, not a few
/// per tensor.
pub const WRITEBACK_KICK: u64 = 1 << 20;

/// Written ranges whose writeback has started but not been waited for, and
/// the span of those written since the last start.
#[derive(Default)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Pending {
    ranges: VecDeque<(u64, u64)>,
    bytes: u64,
    /// `[lo, hi)` covering the ranges written since writeback last started,
    /// and their bytes.
    unkicked: Option<(u64, u64)>,
    unkicked_bytes: u64,
}

/// What ends the name of a file still being written (see [`temp_path`]).
pub const PARTIAL_SUFFIX: &str = ".fastcast-partial";

/// The longest file name most filesystems take, in bytes (Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;

/// The temporary name used while `path` is being written: hidden, in the same
/// folder (so the rename is atomic), and recognisable for cleanup. A name
/// too long to take the suffix (a weights file named in 238 bytes or more)
/// is cut and told apart by a hash of it:
/// `.<first bytes>~<16 hex digits>.fastcast-partial`, within [`NAME_MAX`].
///
/// ```
/// use fastcast_core::exec::shard_file::{temp_path, NAME_MAX};
/// use std::path::Path;
/// assert_eq!(temp_path(Path::new("out/model.safetensors")),
///            Path::new("out/.model.safetensors.fastcast-partial"));
/// let long = format!("{}.safetensors", "w".repeat(240));
/// let temp = temp_path(Path::new(&long));
/// assert!(temp.to_str().unwrap().len() <= NAME_MAX);
/// assert!(temp.to_str().unwrap().ends_with(".fastcast-partial"));
/// ```
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default();
    let bytes = name.as_encoded_bytes();
    if 1 + bytes.len() + PARTIAL_SUFFIX.len() <= NAME_MAX {
        let mut temp = std::ffi::OsString::from(".");
        temp.push(name);
        temp.push(PARTIAL_SUFFIX);
        return path.with_file_name(temp);
    }
    let hash = xxhash_rust::xxh3::xxh3_64(bytes);
    let keep = NAME_MAX - (1 + 1 + 16 + PARTIAL_SUFFIX.len());
    // Cut at a character boundary, so the name stays valid UTF-8 if it was.
    let text = String::from_utf8_lossy(&bytes[..keep]);
    let head = text.trim_end_matches(char::REPLACEMENT_CHARACTER);
    path.with_file_name(format!(".{head}~{hash:016x}{PARTIAL_SUFFIX}"))
}

impl ShardFile {
    /// Create the temporary file for `path`, sized to `len` bytes. The space
    /// is reserved up front where the filesystem supports it, so a full disk
    /// fails here rather than halfway through.
    pub fn create(path: &Path, len: u64) -> Result<ShardFile> {
        let temp = temp_path(path);
        // Whatever is at the temporary name (a killed run's partial file, or a
        // link someone planted there) goes: its link is removed, never
        // followed, and the new file is created where none is.
        match fs::remove_file(&temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(&temp, e));
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(&temp, e))?;
        let shard = ShardFile {
            file,
            temp,
            path: path.to_owned(),
            committed: false,
            writing: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
        };
        shard.reserve(len)?;
        Ok(shard)
    }

    fn reserve(&self, len: u64) -> Result<()> {
        #[cfg(target_os = "linux")]
        if self.fallocate(len)? {
            return Ok(());
        }
        // Elsewhere, or where the filesystem cannot: a sparse file; a full
        // disk then shows at write time.
        self.file.set_len(len).map_err(|e| Error::io(&self.path, e))
    }

    /// `fallocate(2)` the whole file: true when done, false when the
    /// filesystem does not support it (NFSv3, many FUSE ones). Not glibc's
    /// `posix_fallocate`, which on such filesystems emulates the call by
    /// writing every block, so that each byte of the shard would be written
    /// twice; there a sparse file is the better reservation.
    #[cfg(target_os = "linux")]
    fn fallocate(&self, len: u64) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let Ok(off_len) = libc::off_t::try_from(len) else {
            return Err(Error::io(
                &self.path,
                std::io::Error::other("file too large"),
            ));
        };
        if len == 0 {
            return Ok(false);
        }
        // SAFETY: the descriptor is open for writing and owned by `self.file`.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, off_len) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(false),
            _ => Err(Error::io(&self.path, err)),
        }
    }

    /// Write `bytes` at `offset`; safe to call from many threads at once, which
    /// take turns. A buffered write holds the file's inode lock while it copies
    /// (ext4, xfs), so writes into one file never ran side by side anyway; but
    /// a thread that finds the lock taken spins on it in the kernel. Copying a
    /// 2 GB checkpoint unchanged on 2 cores, that spinning was a quarter of the
    /// run's CPU, and some runs took 6x as long as others. Waiting here sleeps,
    /// and leaves the core to a thread with casting or hashing to do.
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        let _turn = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        positional::write_all_at(&self.file, bytes, offset).map_err(|e| Error::io(&self.path, e))
    }

    /// Record that `[offset, offset + len)` is written: start writing it back
    /// to disk (once [`WRITEBACK_KICK`] bytes have gathered, as one span), and
    /// once more than [`WRITEBACK_WINDOW`] bytes are in
    /// flight, wait for the oldest ranges to reach the disk and drop them from
    /// the page cache. Dirty and cached output pages so stay bounded, which
    /// keeps a huge conversion from flooding the page cache and lets it run
    /// inside a memory cgroup (where page cache counts against the cap), and
    /// the final sync has almost nothing left to do.
    ///
    /// Linux only (`sync_file_range`, `posix_fadvise`); elsewhere nothing is
    /// done early and the final sync writes everything.
    #[cfg(target_os = "linux")]
    pub fn written(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let range = |o: u64, l: u64| {
            Some((
                libc::off64_t::try_from(o).ok()?,
                libc::off64_t::try_from(l).ok()?,
            ))
        };
        let (kick, settled): ((u64, u64), Vec<(u64, u64)>) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (lo, hi) = pending.unkicked.map_or((offset, offset + len), |(lo, hi)| {
                (lo.min(offset), hi.max(offset + len))
            });
            pending.unkicked_bytes += len;
            if pending.unkicked_bytes < WRITEBACK_KICK {
                pending.unkicked = Some((lo, hi));
                return; // the next ranges, or the final sync, start it
            }
            // Threads write neighbouring ranges out of order: the span may
            // hold a gap another thread fills later, which is harmless to
            // write back early (and is counted again when that range is).
            pending.unkicked = None;
            pending.unkicked_bytes = 0;
            pending.ranges.push_back((lo, hi - lo));
            pending.bytes += hi - lo;
            let mut out = Vec::new();
            while pending.bytes > WRITEBACK_WINDOW {
                let Some(oldest) = pending.ranges.pop_front() else {
                    break;
                };
                pending.bytes -= oldest.1;
                out.push(oldest);
            }
            ((lo, hi - lo), out)
        };
        if let Some((off, n)) = range(kick.0, kick.1) {
            // SAFETY: a plain syscall on a descriptor owned by `self.file`; a
            // failure only means less early writeback, which the final sync
            // covers.
            unsafe { libc::sync_file_range(fd, off, n, libc::SYNC_FILE_RANGE_WRITE) };
        }
        for (o, l) in settled {
            if let Some((off, n)) = range(o, l) {
                let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                // SAFETY: as above; and dropping clean cached pages of our own
                // file is only a hint.
                unsafe {
                    libc::sync_file_range(fd, off, n, wait);
                    libc::posix_fadvise(fd, off, n, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }

    /// Off Linux nothing is written back early: the final sync does it all.
    #[cfg(not(target_os = "linux"))]
    pub fn written(&self, _offset: u64, _len: u64) {}

    /// Sync (unless `fsync` is false) and rename into place. Returns the
    /// synced file's stamp, which a resume trusts instead of re-reading it;
    /// `None` unsynced, when the bytes may not be on the disk.
    ///
    /// After a sync the file's pages are clean, so they are dropped from the
    /// page cache: a 150 GB conversion must not evict everything else.
    pub fn commit(mut self, fsync: bool) -> Result<Option<FileStamp>> {
        let mut stamp = None;
        if fsync {
            self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
            let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
            stamp = FileStamp::of(&meta);
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: advisory syscall on a descriptor owned by `self.file`.
                unsafe {
                    libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
        fs::rename(&self.temp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.committed = true;
        Ok(stamp)
    }
}

impl Drop for ShardFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Sync a directory so that renames into it survive a crash.
#[cfg(unix)]
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Windows cannot open a directory to sync it; NTFS journals the rename.
#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("fastcast-shard-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn appears_only_when_committed() {
        let dir = scratch("commit");
        let path = dir.join("model.safetensors");
        let shard = ShardFile::create(&path, 8).unwrap();
        shard.write_at(b"abcd", 4).unwrap();
        shard.write_at(b"wxyz", 0).unwrap();
        assert!(!path.exists());
        assert!(temp_path(&path).exists());
        let stamp = shard.commit(true).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"wxyzabcd");
        assert!(!temp_path(&path).exists());
        #[cfg(unix)]
        assert_eq!(
            stamp,
            FileStamp::of(&fs::metadata(&path).unwrap()),
            "stamped as renamed"
        );
        let unsynced = ShardFile::create(&dir.join("b.safetensors"), 1).unwrap();
        assert_eq!(unsynced.commit(false).unwrap(), None, "no sync, no stamp");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dropped_uncommitted_leaves_nothing() {
        let dir = scratch("drop");
        let path = dir.join("model.safetensors");
        {
            let shard = ShardFile::create(&path, 1024).unwrap();
            shard.write_at(b"partial", 0).unwrap();
        }
        assert!(!path.exists());
        assert!(!temp_path(&path).exists());
        fs::remove_dir_all(dir).unwrap();
    }

    /// A weights file named in 238 to 255 bytes: its temporary name was its
    /// name plus 18 bytes, and the run failed on its own temporary file.
    #[test]
    fn a_name_of_255_bytes_gets_a_temporary_name_that_fits() {
        let dir = scratch("long");
        for len in [237, 238, 250, 255] {
            let name = format!(
                "{}.st",
                "é".repeat((len - 3) / 2) + &"w".repeat((len - 3) % 2)
            );
            assert_eq!(name.len(), len);
            let path = dir.join(&name);
            let shard = ShardFile::create(&path, 4).unwrap();
            shard.write_at(b"abcd", 0).unwrap();
            let temp = temp_path(&path);
            let temp_name = temp.file_name().unwrap().to_str().unwrap();
            assert!(temp_name.len() <= NAME_MAX, "{len}: {temp_name}");
            assert!(temp_name.ends_with(PARTIAL_SUFFIX));
            shard.commit(false).unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"abcd");
        }
        let a = temp_path(&dir.join("a".repeat(250)));
        let b = temp_path(&dir.join("a".repeat(249) + "b"));
        assert_ne!(a, b, "names that share their first bytes stay apart");
        fs::remove_dir_all(dir).unwrap();
    }

    /// A link planted at the temporary name (an interrupted output someone
    /// tampered with) is replaced, never written through.
    #[cfg(unix)]
    #[test]
    fn a_link_at_the_temporary_name_is_not_followed() {
        let dir = scratch("link");
        let victim = dir.join("victim.txt");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.join("model.safetensors");
        std::os::unix::fs::symlink(&victim, temp_path(&path)).unwrap();
        let shard = ShardFile::create(&path, 4).unwrap();
        shard.write_at(b"abcd", 0).unwrap();
        shard.commit(false).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&path).unwrap(), b"abcd");
        fs::remove_dir_all(dir).unwrap();
    }
}
