//! The index of a sharded checkpoint (`model.safetensors.index.json`): which
//! file holds each tensor. Read here, not with `json.load`: the index of a
//! model of 100k tensors lists 100k names: json.load and the grouping took
//! 60 ms in Python, one pass here with borrowed strings about 19 ms (its maps
//! hash with foldhash, seeded, as `names` does).

use foldhash::{HashMap, HashMapExt};
use std::borrow::Cow;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Why an index cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum IndexProblem {
    /// Not JSON at all (serde_json's message).
    NotJson(String),
    /// JSON, but no `weight_map` object of tensor names to file names.
    NoWeightMap,
}

/// The files an index's `weight_map` names, in name order, each with the
/// tensors it holds in the order the map lists them. As with `json.load`, the
/// last of repeated keys wins (at the place of the first).
pub fn files_of(json: &[u8]) -> Result<Vec<(String, Vec<String>)>, IndexProblem> {
    let text = std::str::from_utf8(json).map_err(|e| IndexProblem::NotJson(e.to_string()))?;
    // One pass; on failure a second tells what is not JSON from JSON of the
    // wrong shape.
    let pairs = match serde_json::from_str::<Top>(text) {
        Ok(Top(Some(pairs))) => pairs,
        Ok(Top(None)) => return Err(IndexProblem::NoWeightMap),
        Err(_) => {
            return Err(match serde_json::from_str::<de::IgnoredAny>(text) {
                Err(e) => IndexProblem::NotJson(e.to_string()),
                Ok(_) => IndexProblem::NoWeightMap,
            })
        }
    };
    // A few files, many tensors: each tensor holds its file's number. (The
    // map is usually sorted by tensor name, so the files interleave.)
    let mut files: Vec<&str> = Vec::new();
    let mut number: HashMap<&str, usize> = HashMap::new();
    let mut listed: Vec<(&str, usize)> = Vec::with_capacity(pairs.len());
    let mut place: HashMap<&str, usize> = HashMap::with_capacity(pairs.len());
    for (tensor, file) in &pairs {
        let f = *number.entry(file).or_insert_with(|| {
            files.push(file);
            files.len() - 1
        });
        match place.get(tensor.as_ref()) {
            Some(&i) => listed[i].1 = f,
            None => {
                place.insert(tensor, listed.len());
                listed.push((tensor, f));
            }
        }
    }
    let mut grouped: Vec<(String, Vec<String>)> =
        files.iter().map(|f| (f.to_string(), Vec::new())).collect();
    for (tensor, f) in listed {
        grouped[f].1.push(tensor.to_owned());
    }
    grouped.retain(|(_, tensors)| !tensors.is_empty()); // a file every tensor left
    grouped.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(grouped)
}

/// An index: its last `weight_map`, if any, every other key skipped.
struct Top<'a>(Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>);

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Top<'de>, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object with a weight_map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
                let mut found = None;
                while let Some(Text(key)) = map.next_key::<Text>()? {
                    if key == "weight_map" {
                        found = Some(map.next_value::<Pairs>()?.0);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(Top(found))
            }
        }
        deserializer.deserialize_map(TopVisitor)
    }
}

/// A JSON object of strings to strings, in order, repeats kept; borrowed from
/// the text where no escape forces a copy.
struct Pairs<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

/// A JSON string, borrowed when it can be.
#[derive(Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Pairs<'de>, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<'de>, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Text(k), Text(v))) = map.next_entry::<Text, Text>()? {
                    pairs.push((k, v));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(json: &str) -> Result<Vec<(String, Vec<String>)>, IndexProblem> {
        files_of(json.as_bytes())
    }

    fn owned(groups: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        groups
            .iter()
            .map(|(f, ts)| (f.to_string(), ts.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    #[test]
    fn groups_tensors_by_file_in_name_order() {
        let json = r#"{"metadata": {"total_size": 12}, "weight_map":
            {"b": "m-2.safetensors", "a": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            files(json).unwrap(),
            owned(&[
                ("m-1.safetensors", &["a"]),
                ("m-2.safetensors", &["b", "c"])
            ])
        );
        assert_eq!(files(r#"{"weight_map": {}}"#).unwrap(), owned(&[]));
        let escaped =
            r#"{"weight_map": {"w\u00e9\"": "d\/m.safetensors", "v": "d/m.safetensors"}}"#;
        assert_eq!(
            files(escaped).unwrap(),
            owned(&[("d/m.safetensors", &["w\u{e9}\"", "v"])])
        );
    }

    #[test]
    fn the_last_of_repeated_keys_wins_as_with_json_load() {
        let json = r#"{"weight_map": {"a": "1", "b": "1", "a": "2"}, "weight_map": {"x": "3", "y": "4", "x": "4"}}"#;
        assert_eq!(files(json).unwrap(), owned(&[("4", &["x", "y"])]));
        let json = r#"{"weight_map": {"a": "1", "b": "1", "a": "2"}}"#;
        assert_eq!(files(json).unwrap(), owned(&[("1", &["b"]), ("2", &["a"])]));
    }

    #[test]
    fn refuses_what_is_not_a_weight_map() {
        assert!(matches!(files("{not json"), Err(IndexProblem::NotJson(_))));
        assert!(matches!(files(""), Err(IndexProblem::NotJson(_))));
        assert!(matches!(
            files("{\"weight_map\": {}} x"),
            Err(IndexProblem::NotJson(_))
        ));
        for json in [
            "[]",
            "3",
            "{}",
            r#"{"weight_map": ["a"]}"#,
            r#"{"weight_map": {"a": 1}}"#,
            r#"{"weight_map": {"a": null}}"#,
            r#"{"weight_map": {"a": ["m.safetensors"]}}"#,
        ] {
            assert_eq!(files(json), Err(IndexProblem::NoWeightMap), "{json}");
        }
    }
}
