//! Reads and writes at an offset that leave no shared file cursor behind, so
//! many threads can use one file at once: `pread`/`pwrite` on Unix,
//! `seek_read`/`seek_write` (an OVERLAPPED offset) in a loop on Windows.

use std::fs::File;
use std::io;

/// Write all of `buf` at `offset`.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("fastcast-doc-positional-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use fastcast_core::exec::positional::{read_exact_at, write_all_at};
/// let path = dir.join("f.bin");
/// let file = std::fs::File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
/// write_all_at(&file, b"world", 6).unwrap();
/// write_all_at(&file, b"hello ", 0).unwrap();
/// let mut buf = [0u8; 5];
/// read_exact_at(&file, &mut buf, 6).unwrap();
/// assert_eq!(&buf, b"world");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[cfg(unix)]
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

/// Fill `buf` from `offset`; `UnexpectedEof` if the file ends first.
#[cfg(unix)]
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Write all of `buf` at `offset`.
#[cfg(windows)]
pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fill `buf` from `offset`; `UnexpectedEof` if the file ends first.
#[cfg(windows)]
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut std::mem::take(&mut buf)[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn writes_land_at_their_offsets_and_short_reads_fail() {
        let dir = Scratch::new("positional");
        let path = dir.0.join("f.bin");
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        write_all_at(&file, &big, 3).unwrap();
        write_all_at(&file, b"abc", 0).unwrap();
        let mut back = vec![0u8; big.len() + 3];
        read_exact_at(&file, &mut back, 0).unwrap();
        assert_eq!(&back[..3], b"abc");
        assert_eq!(&back[3..], &big[..]);
        let mut past = [0u8; 8];
        let err = read_exact_at(&file, &mut past, big.len() as u64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
