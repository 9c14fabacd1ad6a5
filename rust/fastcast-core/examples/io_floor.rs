//! The I/O floor for the conversion benchmark: what any converter must at
//! least do, with no cast and no layout work.
//!
//!     io_floor [--fsync] [--writeback] [--stream] [--threads N] OUT_DIR OUT_BYTES INPUT...
//!
//! Maps every input, reads every byte (a sum, so the reads cannot be
//! skipped), and writes OUT_BYTES bytes spread over output files in OUT_DIR
//! (one per input, in proportion), in parallel 8 MiB chunks with pwrite, then
//! optionally fsyncs them. Prints the checksum so the reads stay live.
//!
//! `--writeback` writes the outputs through [`ShardFile`], as fastcast's
//! executor does: writeback started as chunks land, a bounded window of dirty
//! pages, written pages dropped. With `--fsync` that overlaps the disk's
//! writing with the reading, where the plain floor writes everything and only
//! then waits for the disk: a floor fastcast can beat.
//!
//! `--stream` does that and, as the executor does on a model larger than RAM,
//! unmaps each input chunk once summed and drops it from the page cache.
//! Without it the page cache fills with the input and every later read waits
//! for reclaim: again a floor fastcast can beat. (On a warm cache it makes the
//! next run's input cold: `--writeback` is the warm-cache floor.)

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Mutex;

use fastcast_core::exec::positional::write_all_at;
use fastcast_core::exec::shard_file::ShardFile;
use memmap2::Mmap;
use rayon::prelude::*;

const CHUNK: usize = 8 << 20;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let fsync = take_flag(&mut args, "--fsync");
    let stream = take_flag(&mut args, "--stream");
    let writeback = take_flag(&mut args, "--writeback") || stream;
    let threads = take_value(&mut args, "--threads");
    if args.len() < 3 {
        eprintln!(
            "usage: io_floor [--fsync] [--writeback] [--stream] [--threads N] \
             OUT_DIR OUT_BYTES INPUT..."
        );
        std::process::exit(2);
    }
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("thread pool");
    }
    let out_dir = PathBuf::from(&args[0]);
    let out_bytes: u64 = args[1].parse().expect("OUT_BYTES is a number");
    let inputs: Vec<PathBuf> = args[2..].iter().map(PathBuf::from).collect();
    std::fs::create_dir_all(&out_dir).expect("output folder");

    let files: Vec<File> = inputs
        .iter()
        .map(|p| File::open(p).expect("input"))
        .collect();
    let maps: Vec<Mmap> = files
        .iter()
        // SAFETY: read-only map of a file nobody modifies during the run.
        .map(|f| unsafe { Mmap::map(f) }.expect("map"))
        .collect();
    let in_total: u64 = maps.iter().map(|m| m.len() as u64).sum();
    let ratio = out_bytes as f64 / in_total.max(1) as f64;
    let share = |i: usize| (maps[i].len() as f64 * ratio) as u64;
    let outputs: Vec<Output> = (0..maps.len())
        .map(|i| {
            let path = out_dir.join(format!("floor-{i:05}.bin"));
            if writeback {
                return Output::Streamed(ShardFile::create(&path, share(i)).expect("output"));
            }
            Output::Plain(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .expect("output"),
                Mutex::new(()),
            )
        })
        .collect();
    let zeros = vec![0u8; CHUNK];
    let jobs: Vec<(usize, usize)> = maps
        .iter()
        .enumerate()
        .flat_map(|(i, m)| (0..m.len()).step_by(CHUNK).map(move |o| (i, o)))
        .collect();
    let checksum: u64 = jobs
        .par_iter()
        .map(|&(i, offset)| {
            let end = (offset + CHUNK).min(maps[i].len());
            let chunk = &maps[i][offset..end];
            let words = chunk.chunks_exact(8);
            let tail: u64 = words.remainder().iter().map(|&b| b as u64).sum();
            let sum = words
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .fold(tail, u64::wrapping_add);
            // The output may be larger than the input (a dequantization doubles it):
            // write every byte of this chunk's share, in pieces of at most CHUNK.
            let out_off = (offset as f64 * ratio) as u64;
            let out_end = (end as f64 * ratio) as u64;
            let mut at = out_off;
            while at < out_end {
                let n = ((out_end - at) as usize).min(CHUNK);
                outputs[i].write(&zeros[..n], at);
                at += n as u64;
            }
            if stream {
                drop_behind(&files[i], offset, chunk);
            }
            sum
        })
        .reduce(|| 0, u64::wrapping_add);
    outputs.into_par_iter().for_each(|out| match out {
        Output::Plain(f, _) if fsync => f.sync_all().expect("fsync"),
        Output::Plain(..) => {}
        Output::Streamed(f) => {
            f.commit(fsync).expect("commit");
        }
    });
    println!("{checksum:x}");
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let found = args.iter().position(|a| a == flag);
    if let Some(i) = found {
        args.remove(i);
    }
    found.is_some()
}

fn take_value(args: &mut Vec<String>, flag: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == flag)?;
    args.remove(i);
    Some(args.remove(i).parse().expect("a number"))
}

/// An output file: written plainly, or as fastcast's executor writes shards.
/// Either way one thread writes a file at a time: threads writing one file at
/// once spin on its inode lock in the kernel (see `ShardFile::write_at`).
enum Output {
    Plain(File, Mutex<()>),
    Streamed(ShardFile),
}

impl Output {
    fn write(&self, bytes: &[u8], at: u64) {
        match self {
            Output::Plain(f, turn) => {
                let _turn = turn.lock().expect("lock");
                write_all_at(f, bytes, at).expect("write")
            }
            Output::Streamed(f) => {
                f.write_at(bytes, at).expect("write");
                f.written(at, bytes.len() as u64);
            }
        }
    }
}

/// Unmap `chunk` (bytes `offset..` of `file`, page-aligned in its map) and
/// drop it from the page cache.
#[cfg(target_os = "linux")]
fn drop_behind(file: &File, offset: usize, chunk: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: `chunk` starts page-aligned (a multiple of CHUNK into a map) in
    // a live read-only file mapping; dropping our page-table entries and the
    // clean cached pages only makes later reads fault them back in.
    unsafe {
        libc::madvise(
            chunk.as_ptr() as *mut libc::c_void,
            chunk.len(),
            libc::MADV_DONTNEED,
        );
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off64_t,
            chunk.len() as libc::off64_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_behind(_file: &File, _offset: usize, _chunk: &[u8]) {}
