//! The resume journal: one JSON object per line, one line per shard put in
//! place, appended (and synced) as each is committed. An interrupted run
//! leaves it behind; the next run reads it to find the shards that are done,
//! which it then checks before reusing any: a shard that is still the file
//! the run synced (its [`FileStamp`] matches) is taken as it is, any other is
//! hashed and compared with its digest.
//!
//! ```text
//! {"name":"model-00001-of-00002.safetensors","size":4986127360,"digest":"0f3c9a1b22e4d5f6",
//!  "chunk_bytes":8388608,"losses":[["model.embed_tokens.weight",262144000,0,12,0,0,0.8125]],
//!  "stamp":{"inode":1835017,"mtime":[1795000000,123456789]}}
//! ```
//! (one line in the file). `digest` is 16 hex digits: JSON numbers past 2^53
//! do not survive every reader. Each loss is a row `[name, elements,
//! overflow, underflow, nan_in, inf_in, max_abs]` (see [`LossStats`]): as
//! objects, a shard of 100k tensors journaled 12 MB and took 24 ms to
//! serialize, write and sync, after its last chunk.

use std::fs::{Metadata, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rules::loss::LossStats;

/// A shard as written: for the journal, for resuming, and for the run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Output-relative name (`unet/diffusion_pytorch_model-00001-of-00002.safetensors`).
    pub name: String,
    /// Bytes in the file.
    pub size: u64,
    /// xxh3 over the header and the per-chunk hashes in offset order; see
    /// [`crate::exec::shard_digest`].
    #[serde(with = "hex_digest")]
    pub digest: u64,
    /// The chunk size the digest was computed with.
    pub chunk_bytes: usize,
    /// Loss counts of the shard's cast tensors, in plan order.
    #[serde(with = "loss_rows")]
    pub losses: Vec<(String, LossStats)>,
    /// The file as synced; absent when the run did not sync (its bytes may
    /// not have reached the disk) and in journals of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

impl ShardRecord {
    /// Whether the file at `path` is provably the one this record was
    /// journaled for: same size, inode and modification time as when it was
    /// synced. Any write changes the mtime and a replacement the inode, so a
    /// match needs no hashing; `false` only means "hash it to find out".
    pub fn unchanged(&self, path: &Path) -> bool {
        self.stamp.is_some_and(|s| s.describes(path, self.size))
    }
}

/// What tells a synced file from one written since: its inode (a file put in
/// its place has another) and its modification time to the nanosecond.
/// A rename keeps both, so a shard stamped under a temporary name still
/// matches under its final one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub inode: u64,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
}

impl FileStamp {
    /// The stamp of a file from its metadata; `None` where the platform has no inodes.
    #[cfg(unix)]
    pub fn of(meta: &Metadata) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        Some(FileStamp {
            inode: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        })
    }

    #[cfg(not(unix))]
    pub fn of(_meta: &Metadata) -> Option<FileStamp> {
        None
    }

    /// Whether the file at `path` has this stamp and `size` bytes.
    pub fn describes(&self, path: &Path, size: u64) -> bool {
        std::fs::metadata(path)
            .is_ok_and(|meta| meta.len() == size && FileStamp::of(&meta) == Some(*self))
    }
}

/// Append `record` to the journal at `path` (created if missing) as one line,
/// synced to disk when `fsync`.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("fastcast-doc-journal-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use fastcast_core::format::journal::{self, ShardRecord};
/// let path = dir.join(".fastcast-journal.jsonl");
/// let record = ShardRecord {
///     name: "model.safetensors".into(),
///     size: 1024,
///     digest: 0xfeed,
///     chunk_bytes: 8 << 20,
///     losses: vec![],
///     stamp: None,
/// };
/// journal::append(&path, &record, true).unwrap();
/// assert_eq!(journal::read(&path).unwrap(), vec![record]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn append(path: &Path, record: &ShardRecord, fsync: bool) -> Result<()> {
    let mut line = serde_json::to_vec(record).map_err(|e| Error::io(path, e.into()))?;
    line.push(b'\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // One write of the whole line: a kill leaves at worst a torn last line.
    file.write_all(&line).map_err(|e| Error::io(path, e))?;
    if fsync {
        file.sync_data().map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Every record in the journal at `path`, in the order written. A line that
/// does not parse (the torn last line of a killed run) is skipped: that shard
/// is simply redone. A missing journal has no records.
pub fn read(path: &Path) -> Result<Vec<ShardRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(bytes
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect())
}

/// A `u64` as exactly 16 lowercase hex digits.
mod hex_digest {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(digest: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{digest:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 16 {
            return Err(D::Error::custom(format!(
                "digest {text:?} is not 16 hex digits"
            )));
        }
        u64::from_str_radix(&text, 16).map_err(D::Error::custom)
    }
}

/// Loss counts as rows `[name, elements, overflow, underflow, nan_in,
/// inf_in, max_abs]`.
mod loss_rows {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::rules::loss::LossStats;

    type Row = (String, u64, u64, u64, u64, u64, f64);

    pub fn serialize<S: Serializer>(
        losses: &[(String, LossStats)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(losses.len()))?;
        for (name, l) in losses {
            seq.serialize_element(&(
                name,
                l.elements,
                l.overflow,
                l.underflow,
                l.nan_in,
                l.inf_in,
                l.max_abs,
            ))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, LossStats)>, D::Error> {
        let rows = Vec::<Row>::deserialize(d)?;
        Ok(rows
            .into_iter()
            .map(
                |(name, elements, overflow, underflow, nan_in, inf_in, max_abs)| {
                    let l = LossStats {
                        elements,
                        overflow,
                        underflow,
                        nan_in,
                        inf_in,
                        max_abs,
                    };
                    (name, l)
                },
            )
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    fn record(name: &str, digest: u64) -> ShardRecord {
        ShardRecord {
            name: name.into(),
            size: 123_456_789_012,
            digest,
            chunk_bytes: 8 << 20,
            losses: vec![
                (
                    "model.layers.0.mlp.down_proj.weight".into(),
                    LossStats {
                        elements: 1 << 40,
                        overflow: 3,
                        underflow: 17,
                        nan_in: 1,
                        inf_in: 2,
                        max_abs: 65519.99609375,
                    },
                ),
                ("lm_head.weight".into(), LossStats::default()),
            ],
            stamp: None,
        }
    }

    #[test]
    fn records_round_trip_in_order() {
        let dir = Scratch::new("journal-round-trip");
        let path = dir.0.join("journal.jsonl");
        let written = vec![
            record("model-00001-of-00002.safetensors", u64::MAX),
            record("unet/diffusion_pytorch_model.safetensors", 0),
            record("naïve \"quoted\"\n.safetensors", 0x0123_4567_89ab_cdef),
        ];
        for r in &written {
            append(&path, r, false).unwrap();
        }
        assert_eq!(read(&path).unwrap(), written);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "one line per record");
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with(
                r#"{"name":"model-00001-of-00002.safetensors","size":123456789012,"digest":"ffffffffffffffff","chunk_bytes":8388608,"losses":[["#
            ),
            "{first}"
        );
        assert!(
            first.contains(
                r#"["model.layers.0.mlp.down_proj.weight",1099511627776,3,17,1,2,65519.99609375]"#
            ),
            "{first}"
        );
        assert!(text.contains(r#""digest":"0123456789abcdef""#), "{text}");
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = Scratch::new("journal-torn");
        let path = dir.0.join("journal.jsonl");
        append(&path, &record("a.safetensors", 1), true).unwrap();
        append(&path, &record("b.safetensors", 2), true).unwrap();
        let full = std::fs::read(&path).unwrap();
        let cut = full.len() - 20; // a kill in the middle of the second line
        std::fs::write(&path, &full[..cut]).unwrap();
        assert_eq!(read(&path).unwrap(), vec![record("a.safetensors", 1)]);
        // A later run appends after the torn line; both good lines are read.
        let mut torn = full[..cut].to_vec();
        torn.extend_from_slice(b"\xff\xfe not even utf-8\n");
        std::fs::write(&path, &torn).unwrap();
        append(&path, &record("c.safetensors", 3), true).unwrap();
        let names: Vec<String> = read(&path).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["a.safetensors", "c.safetensors"]);
    }

    #[test]
    fn a_stamp_round_trips_and_older_lines_have_none() {
        let dir = Scratch::new("journal-stamp");
        let path = dir.0.join("journal.jsonl");
        let stamped = ShardRecord {
            stamp: Some(FileStamp {
                inode: u64::MAX,
                mtime: (1_795_000_000, 999_999_999),
            }),
            ..record("a.safetensors", 1)
        };
        append(&path, &stamped, false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(
                r#""stamp":{"inode":18446744073709551615,"mtime":[1795000000,999999999]}"#
            ),
            "{text}"
        );
        // A line of an older version, without a stamp, still reads.
        let old = text.replace(
            r#","stamp":{"inode":18446744073709551615,"mtime":[1795000000,999999999]}"#,
            "",
        );
        std::fs::write(&path, format!("{text}{old}")).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            vec![stamped, record("a.safetensors", 1)]
        );
    }

    #[test]
    fn only_the_stamped_file_itself_is_unchanged() {
        let dir = Scratch::new("journal-unchanged");
        let file = dir.0.join("a.safetensors");
        std::fs::write(&file, b"0123456789").unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&file).unwrap());
        let rec = ShardRecord {
            size: 10,
            stamp,
            ..record("a.safetensors", 1)
        };
        assert!(rec.unchanged(&file));
        assert!(
            !ShardRecord {
                stamp: None,
                ..rec.clone()
            }
            .unchanged(&file),
            "no stamp: hash it"
        );
        assert!(!ShardRecord {
            size: 11,
            ..rec.clone()
        }
        .unchanged(&file));
        assert!(!rec.unchanged(&dir.0.join("missing")));
        // Moved away and back keeps inode and mtime: still the same file.
        let moved = dir.0.join("b");
        std::fs::rename(&file, &moved).unwrap();
        assert!(rec.unchanged(&moved));
        std::fs::rename(&moved, &file).unwrap();
        // Rewritten in place with bytes of the same size: a later mtime.
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::write(&file, b"9876543210").unwrap();
        assert!(!rec.unchanged(&file));
        // Replaced by a copy that got the old mtime back: another inode.
        let copy = dir.0.join("copy");
        std::fs::write(&copy, b"0123456789").unwrap();
        let (secs, nanos) = stamp.unwrap().mtime;
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, nanos as u32);
        std::fs::File::options()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_modified(when)
            .unwrap();
        std::fs::rename(&copy, &file).unwrap();
        let now = FileStamp::of(&std::fs::metadata(&file).unwrap()).unwrap();
        assert_eq!(
            now.mtime,
            stamp.unwrap().mtime,
            "the copy has the old mtime"
        );
        assert!(!rec.unchanged(&file));
    }

    #[test]
    fn a_missing_journal_is_empty_and_a_bad_digest_is_skipped() {
        let dir = Scratch::new("journal-missing");
        assert_eq!(read(&dir.0.join("nope.jsonl")).unwrap(), vec![]);
        let path = dir.0.join("journal.jsonl");
        std::fs::write(
            &path,
            "{\"name\":\"a\",\"size\":1,\"digest\":\"12\",\"chunk_bytes\":1,\"losses\":[]}\n",
        )
        .unwrap();
        assert_eq!(read(&path).unwrap(), vec![]);
        let err = read(&dir.0).unwrap_err(); // a folder is not a journal
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
