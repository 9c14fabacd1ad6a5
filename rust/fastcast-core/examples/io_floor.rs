//! The I/O floor for the conversion benchmark: what any converter must at
//! least do, with no cast and no layout work.
//!
//!     io_floor [--fsync] [--threads N] OUT_DIR OUT_BYTES INPUT...
//!
//! Maps every input, reads every byte (a sum, so the reads cannot be
//! skipped), and writes OUT_BYTES bytes spread over output files in OUT_DIR
//! (one per input, in proportion), in parallel 8 MiB chunks with pwrite, then
//! optionally fsyncs them. Prints the checksum so the reads stay live.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use fastcast_core::positional::write_all_at;
use memmap2::Mmap;
use rayon::prelude::*;

const CHUNK: usize = 8 << 20;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let fsync = take_flag(&mut args, "--fsync");
    let threads = take_value(&mut args, "--threads");
    if args.len() < 3 {
        eprintln!("usage: io_floor [--fsync] [--threads N] OUT_DIR OUT_BYTES INPUT...");
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

    let maps: Vec<Mmap> = inputs
        .iter()
        .map(|p| {
            let f = File::open(p).expect("input");
            // SAFETY: read-only map of a file nobody modifies during the run.
            unsafe { Mmap::map(&f) }.expect("map")
        })
        .collect();
    let in_total: u64 = maps.iter().map(|m| m.len() as u64).sum();
    let ratio = out_bytes as f64 / in_total.max(1) as f64;
    let outputs: Vec<File> = (0..maps.len())
        .map(|i| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(out_dir.join(format!("floor-{i:05}.bin")))
                .expect("output")
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
                write_all_at(&outputs[i], &zeros[..n], at).expect("write");
                at += n as u64;
            }
            sum
        })
        .reduce(|| 0, u64::wrapping_add);
    if fsync {
        outputs
            .par_iter()
            .for_each(|f| f.sync_all().expect("fsync"));
    }
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
