//! Work on a weight set's tensor names: an index checked against the files
//! it names, both ways; a tensor two files hold; a digest of a shard's names
//! and dtypes for a resumed run's fingerprint. Done here, on the core's
//! tables: for a model of 100k tensors the same work on Python strings took
//! 55 ms, and first made 100k Python strings to work on.
//!
//! Names come from untrusted headers: the sets use foldhash's seeded hasher,
//! 2x faster than std's SipHash on 100k names, not open to a crafted set of
//! colliding names as an unseeded one (FxHash) would be.

use foldhash::{HashSet, HashSetExt};

/// Where an index and the files it names disagree.
#[derive(Debug, PartialEq, Eq)]
pub enum Mismatch<'l, 'p> {
    /// The index says file `file` holds `names` (in map order), which it lacks.
    Missing { file: usize, names: Vec<&'l str> },
    /// The files hold these, which the index does not name: (file, name), in
    /// file order.
    Unlisted(Vec<(usize, &'p str)>),
}

/// Check an index against its files: `listed[i]` the tensors the index says
/// file `i` holds, `present[i]` those file `i` holds (its tensors, and a
/// torch.save file's tied duplicates). A tensor the index names must be in
/// its file, and a tensor a file holds must be named in the index (else which
/// copy a loader takes is ambiguous). The first file with a tensor missing
/// is told before any unlisted tensor.
///
/// ```
/// use fastcast_core::names::{cross_check, Mismatch};
/// let listed = [vec!["a".to_string()], vec!["b".to_string()]];
/// assert_eq!(cross_check(&listed, &[vec!["a"], vec!["b"]]), None);
/// assert_eq!(
///     cross_check(&listed, &[vec!["a", "x"], vec!["b"]]),
///     Some(Mismatch::Unlisted(vec![(0, "x")]))
/// );
/// ```
pub fn cross_check<'l, 'p>(
    listed: &'l [Vec<String>],
    present: &[Vec<&'p str>],
) -> Option<Mismatch<'l, 'p>> {
    assert_eq!(listed.len(), present.len(), "one list of names per file");
    for (file, (listed, present)) in listed.iter().zip(present).enumerate() {
        let names = missing(listed, present);
        if !names.is_empty() {
            return Some(Mismatch::Missing { file, names });
        }
    }
    // Each file holds all the index names for it (each name once: the index
    // is a map). A file holding as many as that holds nothing else.
    if listed.iter().zip(present).all(|(l, p)| l.len() == p.len()) {
        return None;
    }
    let all: HashSet<&str> = listed.iter().flatten().map(String::as_str).collect();
    let unlisted: Vec<(usize, &str)> = present
        .iter()
        .enumerate()
        .flat_map(|(f, names)| names.iter().map(move |&name| (f, name)))
        .filter(|(_, name)| !all.contains(name))
        .collect();
    (!unlisted.is_empty()).then_some(Mismatch::Unlisted(unlisted))
}

/// The names of `listed` that `present` lacks, in `listed` order.
fn missing<'l>(listed: &'l [String], present: &[&str]) -> Vec<&'l str> {
    let mut set = HashSet::with_capacity(present.len());
    set.extend(present.iter().copied());
    listed
        .iter()
        .map(String::as_str)
        .filter(|name| !set.contains(name))
        .collect()
}

/// The first name, in file order, that an earlier file of `files` (or the
/// same file, earlier) also holds: (the name, its file, the earlier file).
/// Which of two copies a loader takes is ambiguous.
///
/// ```
/// use fastcast_core::names::first_repeat;
/// assert_eq!(first_repeat(&[vec!["a", "b"], vec!["c", "b", "a"]]), Some(("b", 1, 0)));
/// assert_eq!(first_repeat(&[vec!["a"], vec!["b"]]), None);
/// ```
pub fn first_repeat<'a>(files: &[Vec<&'a str>]) -> Option<(&'a str, usize, usize)> {
    let all = files
        .iter()
        .enumerate()
        .flat_map(|(f, names)| names.iter().map(move |&name| (f, name)));
    let total = files.iter().map(Vec::len).sum();
    let (f, name) = first_repeat_by(all, total, |&(_, name)| name)?;
    let earlier = files.iter().position(|names| names.contains(&name))?;
    Some((name, f, earlier))
}

/// The first of `items` (about `count` of them) whose `key` an earlier item
/// had: the one search for a repeated name, which the header's checks and a
/// weight set's use, with the seeded hash this module's doc explains.
///
/// ```
/// use fastcast_core::names::first_repeat_by;
/// let items = [(1, "a"), (2, "b"), (3, "a")];
/// assert_eq!(first_repeat_by(items.into_iter(), 3, |&(_, k)| k), Some((3, "a")));
/// ```
pub fn first_repeat_by<'a, T>(
    items: impl Iterator<Item = T>,
    count: usize,
    key: impl Fn(&T) -> &'a str,
) -> Option<T> {
    let mut seen = HashSet::with_capacity(count);
    items.into_iter().find(|item| !seen.insert(key(item)))
}

/// A digest (xxh3-128, hex) of `tensors`, each a name and a dtype name, in
/// order: what a resumed run checks it shares with the run it finishes.
/// Each string is length-prefixed, so no two lists digest alike by where
/// their strings split.
///
/// ```
/// use fastcast_core::names::digest;
/// assert_ne!(digest([("ab", "F32")]), digest([("a", "bF32")]));
/// assert_eq!(digest([("a", "F32")]).len(), 32);
/// ```
pub fn digest<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut bytes = Vec::new();
    for (name, dtype) in tensors {
        for s in [name, dtype] {
            bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(files: &[&[&str]]) -> Vec<Vec<String>> {
        files
            .iter()
            .map(|f| f.iter().map(|n| n.to_string()).collect())
            .collect()
    }

    #[test]
    fn a_missing_tensor_is_told_in_map_order_for_the_first_file_lacking_one() {
        let listed = index(&[&["a"], &["z", "b", "m"], &["q"]]);
        assert_eq!(
            cross_check(&listed, &[vec!["a"], vec!["b"], vec![]]),
            Some(Mismatch::Missing {
                file: 1,
                names: vec!["z", "m"]
            })
        );
    }

    #[test]
    fn a_missing_tensor_is_told_before_an_unlisted_one() {
        let listed = index(&[&["a"], &["b"]]);
        assert_eq!(
            cross_check(&listed, &[vec!["a", "x"], vec![]]),
            Some(Mismatch::Missing {
                file: 1,
                names: vec!["b"]
            })
        );
    }

    #[test]
    fn unlisted_tensors_are_told_for_every_file() {
        let listed = index(&[&["a", "b"], &[], &["c"]]);
        assert_eq!(
            cross_check(&listed, &[vec!["b", "x", "a"], vec!["y"], vec!["c", "b"]]),
            Some(Mismatch::Unlisted(vec![(0, "x"), (1, "y")]))
        );
    }

    #[test]
    fn a_name_the_index_gives_another_file_is_not_unlisted_here() {
        // Both files hold "a", the index names it once: cross_check lets it
        // pass, the duplicate check (first_repeat) refuses it.
        let listed = index(&[&["a"], &["b"]]);
        let present = [vec!["a"], vec!["b", "a"]];
        assert_eq!(cross_check(&listed, &present), None);
        assert_eq!(first_repeat(&present), Some(("a", 1, 0)));
    }

    #[test]
    fn a_repeat_within_one_file_names_that_file_twice() {
        assert_eq!(
            first_repeat(&[vec!["a"], vec!["b", "c", "b"]]),
            Some(("b", 1, 1))
        );
        assert_eq!(first_repeat(&[]), None);
    }
}
