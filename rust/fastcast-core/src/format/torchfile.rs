//! PyTorch checkpoints (`torch.save` files: `.bin`, `.pt`, `.pth`) read
//! without running pickle.
//!
//! Three stages over the memory-mapped file, each trusting nothing the
//! previous one did not check:
//! - [`zip`]: the container, parsed strictly (stored members only, names
//!   equal in both headers, no duplicates, overlaps or hidden bytes);
//! - the layout (here): one folder, known members only, `byteorder` and
//!   `version` records, TorchScript refused;
//! - [`pickle`]: `data.pkl` interpreted into plain data, calls turned into
//!   data or refused, never executed;
//! - [`tensors`]: storages checked against their members and tensors turned
//!   into absolute byte ranges of the file; the object tree flattened.
//!
//! ```no_run
//! use fastcast_core::format::torchfile::{Leaf, TorchFile};
//! let file = TorchFile::read("pytorch_model.bin".as_ref())?;
//! for entry in &file.entries {
//!     if let Leaf::Tensor(t) = &entry.leaf {
//!         println!("{}: {} {:?} at {:?}", entry.path.join("."), t.dtype, t.shape, t.offsets);
//!     }
//! }
//! # Ok::<(), fastcast_core::Error>(())
//! ```

mod pickle;
mod tensors;
mod zip;

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest `data.pkl` read (the pickle is copied out of the map).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// The most bytes a small record (`byteorder`, `version`...) may hold.
const MAX_RECORD_BYTES: u64 = 64;
/// The newest serialization `version` record torch writes (2.15 writes 3).
pub const MAX_VERSION: u64 = 3;
/// The first bytes of the pre-1.6 raw format: pickle protocol 2, LONG1 of
/// 10 bytes, then torch's magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// A torch.save file, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchFile {
    /// The zip's one folder (`archive`, or the saved file's stem).
    pub prefix: String,
    /// Always `"little"`: big-endian files are refused.
    pub byteorder: &'static str,
    /// The pickled object flattened through dicts with string keys, in
    /// pickle order.
    pub entries: Vec<Entry>,
    /// `data/<key>` members that no persistent id names (reported, not read).
    pub unreferenced: Vec<String>,
}

/// One leaf of the object tree and the dict keys leading to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Empty when the root itself is the leaf.
    pub path: Vec<String>,
    pub leaf: Leaf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leaf {
    Tensor(TensorView),
    /// Anything else, described: `"int"`, `"list of 3"`, `"object argparse.Namespace"`.
    Other(String),
}

/// A tensor and where its elements lie in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorView {
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// In elements, as pickled.
    pub stride: Vec<u64>,
    /// The storage key: the member `<prefix>/data/<storage>`.
    pub storage: String,
    /// In elements.
    pub storage_offset: u64,
    /// Absolute `[begin, end)` in the file: the elements when contiguous,
    /// else the smallest range covering every element.
    pub offsets: (u64, u64),
    /// Row-major strides (those of size-1 dimensions ignored).
    pub contiguous: bool,
}

impl TorchFile {
    /// Map the file at `path` and read it.
    pub fn read(path: &Path) -> Result<TorchFile> {
        let io_err = |e| Error::io(path, e);
        let file = File::open(path).map_err(io_err)?;
        if file.metadata().map_err(io_err)?.len() == 0 {
            return Err(refused(path, "an empty file, not a torch.save file".into()));
        }
        // SAFETY: the map is read-only and everything read from it is
        // bounds-checked against its length. If another process truncates
        // the file meanwhile, access faults (SIGBUS) as with any mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        TorchFile::parse(path, &map)
    }

    /// Read a torch.save file held in memory; `path` is only used in messages.
    pub fn parse(path: &Path, file: &[u8]) -> Result<TorchFile> {
        parse_bytes(file).map_err(|problem| refused(path, problem))
    }
}

fn refused(path: &Path, problem: String) -> Error {
    Error::Checkpoint {
        path: path.into(),
        problem,
    }
}

fn parse_bytes(file: &[u8]) -> Result<TorchFile, String> {
    detect(file)?;
    let members = zip::members(file, refuse_torchscript)?;
    let layout = layout(file, &members)?;
    // A copy, so the interpreter reads bytes that cannot change under it.
    let pickle = member_bytes(file, layout.pickle).to_vec();
    let pickled = pickle::interpret(&pickle)?;
    let (entries, unreferenced) = tensors::resolve(&pickled, &layout.prefix, &members)?;
    Ok(TorchFile {
        prefix: layout.prefix,
        byteorder: "little",
        entries,
        unreferenced,
    })
}

/// Which format the bytes are, by content; only the zip format goes on.
fn detect(file: &[u8]) -> Result<(), String> {
    if file.starts_with(b"PK\x03\x04") {
        return Ok(());
    }
    if file.starts_with(&LEGACY_MAGIC) {
        return Err("legacy (pre-1.6) torch format: re-save it with \
                    torch.save(torch.load(f, weights_only=True), f2)"
            .into());
    }
    if file.get(257..262) == Some(b"ustar") {
        return Err("a tar-format torch file (pre-1.6 torch); fastcast refuses it".into());
    }
    let looks_like = if file.is_empty() {
        " (an empty file)"
    } else if file.starts_with(b"GGUF") {
        " (it looks like a GGUF file)"
    } else if file.starts_with(b"\x93NUMPY") {
        " (it looks like a numpy .npy file)"
    } else if file.starts_with(b"PK\x05\x06") {
        " (an empty zip)"
    } else if file.first() == Some(&0x80) {
        " (a bare pickle, not a torch.save archive)"
    } else if file.len() > 8 && file[8] == b'{' {
        " (it looks like a safetensors file)"
    } else {
        ""
    };
    Err(format!("not a torch.save file{looks_like}"))
}

/// What the member names say.
struct Layout<'a> {
    prefix: String,
    pickle: &'a zip::Member,
}

/// One folder, known members only, and the records torch checks.
fn layout<'a>(file: &[u8], members: &'a [zip::Member]) -> Result<Layout<'a>, String> {
    let Some(first) = members.first() else {
        return Err("the zip is empty".into());
    };
    let Some((prefix, _)) = first.name.split_once('/') else {
        return Err(format!(
            "zip member {} is not in a folder; torch.save puts every member under one",
            zip::quoted(&first.name)
        ));
    };
    let mut pickle = None;
    let mut version = None;
    for m in members {
        let Some(rest) = m
            .name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Err(format!(
                "zip members lie in two folders ({} and {}); torch refuses that",
                zip::quoted(prefix),
                zip::quoted(&m.name)
            ));
        };
        match rest {
            "data.pkl" => {
                if m.size > MAX_PICKLE_BYTES {
                    return Err(format!(
                        "data.pkl is {} bytes; fastcast reads pickles up to {MAX_PICKLE_BYTES}",
                        m.size
                    ));
                }
                pickle = Some(m);
            }
            "byteorder" => match record(file, m)? {
                "little" => {}
                "big" => {
                    return Err("a big-endian file (byteorder 'big'); fastcast reads only \
                                little-endian ones for now"
                        .into())
                }
                other => {
                    return Err(format!(
                        "byteorder record says {}; torch writes little or big",
                        zip::quoted(other)
                    ))
                }
            },
            "version" | ".data/version" => {
                if version.is_some() {
                    return Err("two version records (version and .data/version)".into());
                }
                version = Some(number(record(file, m)?, rest)?);
            }
            ".format_version" | ".storage_alignment" => {
                number(record(file, m)?, rest)?;
            }
            ".data/serialization_id" => {
                record(file, m)?;
            }
            _ if is_storage(rest) => {}
            _ => {
                return Err(format!(
                    "unknown zip member {}; torch.save writes only data.pkl, data/<n> and \
                     version records",
                    zip::quoted(&m.name)
                ))
            }
        }
    }
    let pickle = pickle.ok_or_else(|| format!("no {prefix}/data.pkl in the zip"))?;
    match version {
        None => return Err("no version record in the zip; torch refuses that".into()),
        Some(v) if !(1..=MAX_VERSION).contains(&v) => {
            return Err(format!(
                "serialization version {v}; fastcast reads versions 1 to {MAX_VERSION}"
            ))
        }
        Some(_) => {}
    }
    Ok(Layout {
        prefix: prefix.to_owned(),
        pickle,
    })
}

/// TorchScript archives (`torch.jit.save`) hold code; they are refused by
/// name, before their (compressed) members are.
fn refuse_torchscript(name: &str) -> Result<(), String> {
    let rest = name.split_once('/').map_or(name, |(_, rest)| rest);
    let script = matches!(rest, "constants.pkl" | "bytecode.pkl")
        || rest.starts_with("code/")
        || rest.starts_with("constants/");
    if script {
        return Err(
            "a TorchScript archive (torch.jit.save); fastcast reads only torch.save files".into(),
        );
    }
    Ok(())
}

/// `data/<1 to 20 digits>`.
fn is_storage(rest: &str) -> bool {
    rest.strip_prefix("data/")
        .is_some_and(|k| (1..=20).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_digit()))
}

fn member_bytes<'f>(file: &'f [u8], m: &zip::Member) -> &'f [u8] {
    // In bounds: the zip stage checked every member against the file.
    &file[m.data_start as usize..(m.data_start + m.size) as usize]
}

/// A small text record, its trailing newline dropped.
fn record<'f>(file: &'f [u8], m: &zip::Member) -> Result<&'f str, String> {
    if m.size > MAX_RECORD_BYTES {
        return Err(format!(
            "zip member {} is {} bytes; torch writes a few",
            zip::quoted(&m.name),
            m.size
        ));
    }
    let text = std::str::from_utf8(member_bytes(file, m))
        .map_err(|_| format!("zip member {} is not text", zip::quoted(&m.name)))?;
    Ok(text.strip_suffix('\n').unwrap_or(text))
}

fn number(text: &str, what: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("{what} record {} is not a number", zip::quoted(text)))
}

#[cfg(test)]
mod tests;
