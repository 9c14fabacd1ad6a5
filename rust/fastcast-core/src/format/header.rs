//! safetensors headers: parsed from untrusted bytes, validated once, written back.
//!
//! Layout: an 8-byte little-endian length `N`, `N` bytes of UTF-8 JSON, then
//! the data buffer. Validation follows the reference reader (huggingface/
//! safetensors) and adds a duplicate-name check: after [`Header::parse`]
//! succeeds, every tensor's bytes lie inside the data buffer, tensors tile it
//! exactly, and sizes agree with dtypes and shapes, so later code can slice
//! the file by `data_offsets` without further checks.

use std::fs::File;
use std::io::Read;
use std::io::Write;
use std::path::Path;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::dtype::DType;
use crate::error::{Error, HeaderProblem, Result};
use crate::names::first_repeat_by;

/// The largest header the reference reader accepts (100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Where one tensor's bytes live and what they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// `[begin, end)` relative to the start of the data buffer.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Number of elements (1 for a scalar, 0 when any dimension is 0).
    pub fn numel(&self) -> u64 {
        // Checked by `Header::parse`, so it cannot overflow here.
        self.shape.iter().product()
    }

    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `__metadata__`, in file order, or `None` when the file has none.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorInfo>,
    /// `N`, the JSON length in bytes; the data buffer starts at `8 + N`.
    pub header_len: u64,
}

/// A tensor entry as it appears in the JSON.
#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The top-level JSON object with every entry kept, duplicates included,
/// and values left unparsed until their key says what they are.
struct RawEntries(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawEntries, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = RawEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    entries.push(entry);
                }
                Ok(RawEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// `__metadata__`: a string → string map whose keys must be unique.
struct RawMetadata(Vec<(String, String)>);

impl<'de> Deserialize<'de> for RawMetadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawMetadata, D::Error> {
        struct MetadataVisitor;
        impl<'de> Visitor<'de> for MetadataVisitor {
            type Value = RawMetadata;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMetadata, A::Error> {
                let mut entries: Vec<(String, String)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    entries.push((k, v));
                }
                match first_repeat(entries.iter().map(|(k, _)| k.as_str())) {
                    Some(k) => Err(de::Error::custom(repeated_key(k))),
                    None => Ok(RawMetadata(entries)),
                }
            }
        }
        deserializer.deserialize_map(MetadataVisitor)
    }
}

impl Header {
    /// Read and validate the header of the safetensors file at `path`.
    ///
    /// Reads only the header: nothing is allocated from the untrusted length
    /// before it has been checked against the limit and the file's size.
    pub fn read(path: &Path) -> Result<Header> {
        let io_err = |e| Error::io(path, e);
        let mut file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut len_bytes = [0u8; 8];
        if file_len < 8 {
            return Err(Error::header(path, HeaderProblem::TooShort { file_len }));
        }
        file.read_exact(&mut len_bytes).map_err(io_err)?;
        let header_len = check_header_len(path, u64::from_le_bytes(len_bytes), file_len)?;
        let mut json = vec![0u8; header_len as usize];
        file.read_exact(&mut json).map_err(io_err)?;
        Header::parse_json(path, &json, file_len - 8 - header_len)
    }

    /// Validate a whole safetensors file held in memory (a map, or bytes from
    /// anywhere); `path` is only used in error messages.
    pub fn parse(path: &Path, file: &[u8]) -> Result<Header> {
        let file_len = file.len() as u64;
        if file_len < 8 {
            return Err(Error::header(path, HeaderProblem::TooShort { file_len }));
        }
        let raw_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
        let header_len = check_header_len(path, raw_len, file_len)?;
        let json = &file[8..8 + header_len as usize];
        Header::parse_json(path, json, file_len - 8 - header_len)
    }

    /// Validate header JSON given the size of the data buffer that follows it.
    pub fn parse_json(path: &Path, json: &[u8], data_len: u64) -> Result<Header> {
        let bad = |problem| Error::header(path, problem);
        let text = std::str::from_utf8(json).map_err(|e| {
            bad(HeaderProblem::NotUtf8 {
                offset: e.valid_up_to(),
            })
        })?;
        if !text.starts_with('{') {
            return Err(bad(HeaderProblem::NotJson {
                message: "does not start with '{'".into(),
            }));
        }
        let RawEntries(entries) = serde_json::from_str(text).map_err(|e| {
            bad(HeaderProblem::NotJson {
                message: e.to_string(),
            })
        })?;

        // Duplicates first: JSON readers disagree on which copy wins, so a
        // file that lists a name twice means different things to different
        // tools, whatever the entries hold.
        check_unique(entries.iter().map(|(name, _)| name.as_str())).map_err(bad)?;
        let mut metadata = None;
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, raw) in entries {
            if name == "__metadata__" {
                let parsed: Option<RawMetadata> = serde_json::from_str(raw.get()).map_err(|e| {
                    bad(HeaderProblem::BadMetadata {
                        message: e.to_string(),
                    })
                })?;
                metadata = parsed.map(|m| m.0);
                continue;
            }
            let entry: RawTensor = serde_json::from_str(raw.get()).map_err(|e| {
                bad(HeaderProblem::BadEntry {
                    tensor: name.clone(),
                    message: e.to_string(),
                })
            })?;
            tensors.push(check_tensor(name, entry, data_len).map_err(bad)?);
        }
        check_tiling(&tensors, data_len).map_err(bad)?;
        Ok(Header {
            metadata,
            tensors,
            header_len: json.len() as u64,
        })
    }

    /// Check a header built in memory (a shard about to be written) with the
    /// checks [`Header::parse_json`] makes of one read from a file, given the
    /// size of its data buffer: unique metadata keys, unique names (none of
    /// them `__metadata__`), sizes that agree with dtypes and shapes, tensors
    /// that tile the buffer. Its JSON is not re-read: the writer's escaping is
    /// `serde_json`'s, and the tests read it back.
    pub fn check(&self, path: &Path, data_len: u64) -> Result<()> {
        let bad = |problem| Error::header(path, problem);
        let keys = self.metadata.iter().flatten().map(|(k, _)| k.as_str());
        if let Some(k) = first_repeat(keys) {
            return Err(bad(HeaderProblem::BadMetadata {
                message: repeated_key(k),
            }));
        }
        check_unique(self.tensors.iter().map(|t| t.name.as_str())).map_err(bad)?;
        for t in &self.tensors {
            if t.name == "__metadata__" {
                return Err(bad(HeaderProblem::BadEntry {
                    tensor: t.name.clone(),
                    message: "the format keeps this name for the metadata".into(),
                }));
            }
            check_entry(&t.name, t.dtype, &t.shape, t.data_offsets, data_len).map_err(bad)?;
        }
        check_tiling(&self.tensors, data_len).map_err(bad)
    }

    /// Bytes of the data buffer.
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::nbytes).sum()
    }

    /// Offset in the file where the data buffer starts.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// The header as it goes on disk: length prefix, then JSON padded with
    /// spaces so the data buffer starts on an 8-byte boundary.
    ///
    /// Tensors are written in `self.tensors` order; `header_len` is ignored
    /// (the result's length prefix is what counts).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; 8];
        write_json(&mut out, self.metadata.as_deref(), self.entries());
        while !(out.len() - 8).is_multiple_of(8) {
            out.push(b' ');
        }
        let len = (out.len() - 8) as u64;
        out[..8].copy_from_slice(&len.to_le_bytes());
        out
    }

    fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        self.tensors.iter().map(|t| Entry {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data_offsets: t.data_offsets,
        })
    }
}

/// A tensor's entry as a header writes it, borrowed from wherever it lives (a
/// plan of 100k tensors need not be copied to be measured).
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub data_offsets: (u64, u64),
}

/// The length of the header JSON of `metadata` and `entries` as
/// [`Header::to_bytes`] writes it, padding included (what `N` will be), with
/// nothing written: to refuse a header past [`MAX_HEADER_LEN`] before any
/// file is made.
///
/// ```
/// use fastcast_core::format::header::{json_len, Entry, Header, TensorInfo};
/// use fastcast_core::DType;
/// let t = TensorInfo { name: "w".into(), dtype: DType::BF16, shape: vec![2], data_offsets: (0, 4) };
/// let e = Entry { name: "w", dtype: DType::BF16, shape: &[2], data_offsets: (0, 4) };
/// let h = Header { metadata: None, tensors: vec![t], header_len: 0 };
/// assert_eq!(json_len(None, [e]) + 8, h.to_bytes().len() as u64);
/// ```
pub fn json_len<'a>(
    metadata: Option<&[(String, String)]>,
    entries: impl IntoIterator<Item = Entry<'a>>,
) -> u64 {
    let mut count = Count(0);
    write_json(&mut count, metadata, entries);
    count.0.next_multiple_of(8)
}

/// Counts what is written to it.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The header JSON, unpadded, into `out` (a buffer, or a [`Count`]): the one
/// definition of its bytes. Numbers by itoa: a shard may hold 100k tensors.
fn write_json<'a, W: Write>(
    out: &mut W,
    metadata: Option<&[(String, String)]>,
    entries: impl IntoIterator<Item = Entry<'a>>,
) {
    // Writing to memory (or counting) cannot fail.
    let put = |out: &mut W, bytes: &[u8]| out.write_all(bytes).expect("in memory");
    let mut digits = itoa::Buffer::new();
    let quote = |out: &mut W, s: &str| serde_json::to_writer(out, s).expect("strings serialize");
    put(out, b"{");
    if let Some(meta) = metadata {
        put(out, b"\"__metadata__\":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                put(out, b",");
            }
            quote(out, k);
            put(out, b":");
            quote(out, v);
        }
        put(out, b"}");
    }
    for (i, t) in entries.into_iter().enumerate() {
        if i > 0 || metadata.is_some() {
            put(out, b",");
        }
        quote(out, t.name);
        put(out, b":{\"dtype\":\"");
        put(out, t.dtype.safetensors_name().as_bytes());
        put(out, b"\",\"shape\":[");
        for (j, &d) in t.shape.iter().enumerate() {
            if j > 0 {
                put(out, b",");
            }
            put(out, digits.format(d).as_bytes());
        }
        let (begin, end) = t.data_offsets;
        put(out, b"],\"data_offsets\":[");
        put(out, digits.format(begin).as_bytes());
        put(out, b",");
        put(out, digits.format(end).as_bytes());
        put(out, b"]}");
    }
    put(out, b"}");
}

/// Check the untrusted length prefix against the limit and the file size.
fn check_header_len(path: &Path, len: u64, file_len: u64) -> Result<u64> {
    if len > MAX_HEADER_LEN {
        return Err(Error::header(
            path,
            HeaderProblem::HeaderTooLarge {
                len,
                limit: MAX_HEADER_LEN,
            },
        ));
    }
    if len > file_len - 8 {
        return Err(Error::header(
            path,
            HeaderProblem::HeaderPastEnd { len, file_len },
        ));
    }
    Ok(len)
}

/// No name may appear twice.
fn check_unique<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), HeaderProblem> {
    match first_repeat(names) {
        Some(name) => Err(HeaderProblem::DuplicateTensor {
            tensor: name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The first of `items` seen before, if any (`names::first_repeat_by`: the
/// names come from untrusted files).
fn first_repeat<'a>(items: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let count = items.size_hint().0;
    first_repeat_by(items, count, |item| *item)
}

/// What is wrong with `__metadata__` when it lists `key` twice.
fn repeated_key(key: &str) -> String {
    format!("key {key:?} is listed twice")
}

/// Validate one entry on its own: dtype, shape, offsets, size.
fn check_tensor(name: String, raw: RawTensor, data_len: u64) -> Result<TensorInfo, HeaderProblem> {
    let dtype =
        DType::from_safetensors_name(&raw.dtype).ok_or_else(|| HeaderProblem::UnknownDtype {
            tensor: name.clone(),
            dtype: raw.dtype.clone(),
        })?;
    check_entry(&name, dtype, &raw.shape, raw.data_offsets, data_len)?;
    Ok(TensorInfo {
        name,
        dtype,
        shape: raw.shape,
        data_offsets: raw.data_offsets,
    })
}

/// An entry's offsets, shape and size: ordered, no overflow, a whole number of
/// bytes that agrees with its dtype and shape, inside the data buffer.
fn check_entry(
    name: &str,
    dtype: DType,
    shape: &[u64],
    (begin, end): (u64, u64),
    data_len: u64,
) -> Result<(), HeaderProblem> {
    if begin > end {
        return Err(HeaderProblem::OffsetsReversed {
            tensor: name.to_owned(),
            begin,
            end,
        });
    }
    let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let bits = numel.and_then(|n| n.checked_mul(dtype.bits()));
    let Some(bits) = bits else {
        return Err(HeaderProblem::ShapeOverflow {
            tensor: name.to_owned(),
            shape: shape.to_vec(),
        });
    };
    if !bits.is_multiple_of(8) {
        return Err(HeaderProblem::BadEntry {
            tensor: name.to_owned(),
            message: format!("{dtype} shape {shape:?} is not a whole number of bytes"),
        });
    }
    if end - begin != bits / 8 {
        return Err(HeaderProblem::SizeMismatch {
            tensor: name.to_owned(),
            dtype: dtype.safetensors_name(),
            shape: shape.to_vec(),
            begin,
            end,
            expected: bits / 8,
        });
    }
    if end > data_len {
        return Err(HeaderProblem::DataPastEnd {
            tensor: name.to_owned(),
            end,
            data_len,
        });
    }
    Ok(())
}

/// Tensors sorted by offset must cover `[0, data_len)` exactly once.
fn check_tiling(tensors: &[TensorInfo], data_len: u64) -> Result<(), HeaderProblem> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.data_offsets);
    let mut covered = 0u64;
    let mut previous: Option<&TensorInfo> = None;
    for t in order {
        let (begin, end) = t.data_offsets;
        if begin < covered {
            return Err(HeaderProblem::Overlap {
                tensor: t.name.clone(),
                other: previous.map(|p| p.name.clone()).unwrap_or_default(),
                begin,
            });
        }
        if begin > covered {
            return Err(HeaderProblem::Gap {
                tensor: t.name.clone(),
                begin,
                expected: covered,
            });
        }
        covered = end;
        previous = Some(t);
    }
    if covered != data_len {
        return Err(HeaderProblem::TrailingBytes {
            extra: data_len - covered,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
