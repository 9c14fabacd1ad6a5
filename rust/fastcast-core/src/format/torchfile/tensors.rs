//! From interpreted pickle to what a converter needs: every storage checked
//! against its zip member, every tensor turned into an absolute byte range,
//! and the object tree flattened into (path, leaf) entries.

use std::collections::{HashMap, HashSet};

use crate::dtype::DType;

use super::pickle::{describe_kind, Id, Pickled, Value};
use super::zip::{quoted, Member};
use super::{Entry, Leaf, TensorView};

/// Dict levels the flattening descends before refusing.
pub const MAX_DEPTH: usize = 16;
/// The most entries a file may flatten to, and the most bytes their paths
/// may hold together (memo sharing can multiply a small pickle's dicts).
pub const MAX_ENTRIES: usize = 1 << 21;
pub const MAX_PATH_BYTES: usize = 1 << 28;

/// Check every storage and tensor of `pickled` against the archive members
/// (`data/<key>` under `prefix`), then flatten the tree. Returns the entries
/// and the storage members no persistent id names.
pub fn resolve(
    pickled: &Pickled,
    prefix: &str,
    members: &[Member],
) -> Result<(Vec<Entry>, Vec<String>), String> {
    let by_name: HashMap<&str, &Member> = members.iter().map(|m| (m.name.as_str(), m)).collect();
    // Storages: the member exists and holds exactly what is declared.
    let mut storage_members = Vec::with_capacity(pickled.storages.len());
    for s in &pickled.storages {
        let name = format!("{prefix}/data/{}", s.key);
        let member = by_name
            .get(name.as_str())
            .ok_or_else(|| format!("storage {} has no zip member {name}", quoted(&s.key)))?;
        let declared = s.numel.checked_mul(s.dtype.size() as u64);
        if declared != Some(member.size) {
            return Err(format!(
                "zip member {name} holds {} bytes, its storage declares {}",
                member.size,
                declared.map_or_else(|| "more than 2^64".into(), |d| d.to_string())
            ));
        }
        storage_members.push(*member);
    }
    let referenced: HashSet<&str> = pickled.storages.iter().map(|s| s.key.as_str()).collect();
    let data_prefix = format!("{prefix}/data/");
    let unreferenced = members
        .iter()
        .filter(|m| {
            m.name
                .strip_prefix(&data_prefix)
                .is_some_and(|key| !referenced.contains(key))
        })
        .map(|m| m.name.clone())
        .collect();

    // Tensors: one dtype per storage, every element inside it.
    let mut storage_dtypes: HashMap<u32, DType> = HashMap::new();
    let mut views = Vec::with_capacity(pickled.tensors.len());
    for t in &pickled.tensors {
        let storage = &pickled.storages[t.storage as usize];
        if let Some(&other) = storage_dtypes.get(&t.storage) {
            if other != t.dtype {
                return Err(format!(
                    "storage {} is used as both {} and {}",
                    quoted(&storage.key),
                    other.torch_name(),
                    t.dtype.torch_name()
                ));
            }
        }
        storage_dtypes.insert(t.storage, t.dtype);
        let member = storage_members[t.storage as usize];
        views.push(view(t, &storage.key, member)?);
    }

    let mut walk = Walk {
        pickled,
        views: &views,
        entries: Vec::new(),
        path: Vec::new(),
        path_bytes: 0,
    };
    walk.visit(pickled.root, 0)?;
    Ok((walk.entries, unreferenced))
}

/// A tensor's place in its storage, checked, as an absolute byte range.
fn view(t: &super::pickle::TensorDecl, key: &str, member: &Member) -> Result<TensorView, String> {
    let elsize = t.dtype.size() as u64;
    let outside = || {
        format!(
            "tensor {:?} with stride {:?} at offset {} reaches past the end of storage {} \
             ({} bytes of {})",
            t.shape,
            t.stride,
            t.offset,
            quoted(key),
            member.size,
            t.dtype.torch_name()
        )
    };
    let numel = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let Some(numel) = numel.filter(|n| n.checked_mul(elsize).is_some()) else {
        return Err(format!(
            "tensor shape {:?} has more elements than fit in 64 bits",
            t.shape
        ));
    };
    // Bytes from the storage's start to the end of the last element.
    let end_elements = if numel == 0 {
        Some(t.offset)
    } else {
        t.shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&dim, &stride)| {
                (dim - 1)
                    .checked_mul(stride)
                    .and_then(|s| acc.checked_add(s))
            })
            .and_then(|last| last.checked_add(1))
    };
    let end_bytes = end_elements
        .and_then(|e| e.checked_mul(elsize))
        .filter(|&e| e <= member.size)
        .ok_or_else(outside)?;
    let contiguous = numel == 0 || is_row_major(&t.shape, &t.stride);
    let begin = member.data_start + t.offset * elsize;
    let end = if contiguous {
        begin + numel * elsize
    } else {
        member.data_start + end_bytes
    };
    Ok(TensorView {
        dtype: t.dtype,
        shape: t.shape.clone(),
        stride: t.stride.clone(),
        storage: key.to_owned(),
        storage_offset: t.offset,
        offsets: (begin, end),
        contiguous,
    })
}

/// Row-major strides, ignoring the strides of size-1 dimensions.
fn is_row_major(shape: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&dim, &s) in shape.iter().zip(stride).rev() {
        if dim != 1 && s != expected {
            return false;
        }
        // No overflow: the element count was checked to fit.
        expected *= dim;
    }
    true
}

/// Depth-first flattening of dicts with string keys.
struct Walk<'a> {
    pickled: &'a Pickled,
    views: &'a [TensorView],
    entries: Vec<Entry>,
    path: Vec<String>,
    /// Bytes of every path stored so far.
    path_bytes: usize,
}

impl Walk<'_> {
    fn visit(&mut self, id: Id, depth: usize) -> Result<(), String> {
        let leaf = match self.pickled.value(id) {
            Value::Tensor(i) => Leaf::Tensor(self.views[*i as usize].clone()),
            Value::Dict { items, .. } if items.is_empty() => Leaf::Other("empty dict".into()),
            Value::Dict { items, .. } => {
                let keys: Option<Vec<&str>> = items
                    .iter()
                    .map(|&(k, _)| match self.pickled.value(k) {
                        Value::Str(s) => Some(&**s),
                        _ => None,
                    })
                    .collect();
                match keys {
                    None => Leaf::Other("dict with non-string keys".into()),
                    Some(keys) => return self.visit_dict(items, &keys, depth),
                }
            }
            other => Leaf::Other(describe_kind(other)),
        };
        self.path_bytes += self.path.iter().map(String::len).sum::<usize>();
        if self.entries.len() >= MAX_ENTRIES || self.path_bytes > MAX_PATH_BYTES {
            return Err(format!(
                "the checkpoint flattens to more than {MAX_ENTRIES} entries or \
                 {MAX_PATH_BYTES} bytes of key paths; fastcast stops there"
            ));
        }
        self.entries.push(Entry {
            path: self.path.clone(),
            leaf,
        });
        Ok(())
    }

    fn visit_dict(
        &mut self,
        items: &[(Id, Id)],
        keys: &[&str],
        depth: usize,
    ) -> Result<(), String> {
        if depth >= MAX_DEPTH {
            return Err(format!(
                "dicts nest deeper than {MAX_DEPTH} levels at {}",
                self.where_()
            ));
        }
        let mut seen = HashSet::with_capacity(keys.len());
        for &key in keys {
            if !seen.insert(key) {
                return Err(format!(
                    "duplicate key {} in {}",
                    quoted(key),
                    self.where_()
                ));
            }
        }
        for (&(_, value), &key) in items.iter().zip(keys) {
            self.path.push(key.to_owned());
            self.visit(value, depth + 1)?;
            self.path.pop();
        }
        Ok(())
    }

    /// The current path for a message.
    fn where_(&self) -> String {
        if self.path.is_empty() {
            "the top-level dict".into()
        } else {
            let joined = self.path.join(".");
            quoted(&joined)
        }
    }
}
