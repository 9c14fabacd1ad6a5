//! The resume journal: one JSON object per line, one line per shard put in
//! place, appended (and synced) as each is committed. An interrupted run
//! leaves it behind; the next run reads it to find the shards that are done,
//! which it then checks against their digests before reusing any.
//!
//! ```text
//! {"name":"model-00001-of-00002.safetensors","size":4986127360,"digest":"0f3c9a1b22e4d5f6",
//!  "chunk_bytes":8388608,"losses":[["model.embed_tokens.weight",{"elements":262144000,
//!  "overflow":0,"underflow":12,"nan_in":0,"inf_in":0,"max_abs":0.8125}]]}
//! ```
//! (one line in the file). `digest` is 16 hex digits: JSON numbers past 2^53
//! do not survive every reader.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loss::LossStats;

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
    pub losses: Vec<(String, LossStats)>,
}

/// Append `record` to the journal at `path` (created if missing) as one line,
/// synced to disk when `fsync`.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("fastcast-doc-journal-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use fastcast_core::journal::{self, ShardRecord};
/// let path = dir.join(".fastcast-journal.jsonl");
/// let record = ShardRecord {
///     name: "model.safetensors".into(),
///     size: 1024,
///     digest: 0xfeed,
///     chunk_bytes: 8 << 20,
///     losses: vec![],
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
        assert!(first.contains(r#"{"elements":1099511627776,"overflow":3,"underflow":17,"nan_in":1,"inf_in":2,"max_abs":65519.99609375}"#), "{first}");
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
