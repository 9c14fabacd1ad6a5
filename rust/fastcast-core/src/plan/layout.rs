//! Where tensors go in the output: which shard (packed as huggingface_hub's
//! splitter packs them) and where in it (widest dtype first, no padding).
//!
//! One definition for both planners: Python's, which plans dequantized,
//! quantized and merged sets tensor by tensor, and [`plan_plain`], which
//! plans a set whose every tensor is cast or copied (safetensors or
//! torch.save files, quantization state kept as it is) without a Python
//! object per tensor (a model may have 100k tensors).

use crate::dtype::DType;
use crate::format::header::TensorInfo;
use crate::rules::glob::KeepRule;
use crate::rules::roles::{typed_roles, Role};
use crate::rules::target::target_dtype;

/// Group items of `sizes` into shards of at most `limit` bytes exactly as
/// huggingface_hub's `split_state_dict_into_shards` does: in order, a new
/// shard when the next item would overflow the current one; an item larger
/// than `limit` goes alone into a shard of its own, placed before the shard
/// being filled. Returns each shard's item indices, at least one shard.
///
/// ```
/// use fastcast_core::plan::layout::pack;
/// assert_eq!(pack([3, 3, 4, 3], 6), vec![vec![0, 1], vec![2], vec![3]]);
/// assert_eq!(pack([3, 9, 3], 6), vec![vec![1], vec![0, 2]]);
/// ```
pub fn pack(sizes: impl IntoIterator<Item = u64>, limit: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, size) in sizes.into_iter().enumerate() {
        if size > limit {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > limit {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// A shard's data laid out: its items widest element first (stable: in
/// their order within a width), each with its `[begin, end)` byte range, end
/// to end from 0, so every tensor is aligned to its element size without
/// padding. `items` are `(element width, bytes)`; returns `(item, begin,
/// end)` in data order.
///
/// ```
/// use fastcast_core::plan::layout::lay_out;
/// assert_eq!(
///     lay_out(&[(2, 4), (4, 8), (2, 2)]),
///     vec![(1, 0, 8), (0, 8, 12), (2, 12, 14)]
/// );
/// ```
pub fn lay_out(items: &[(usize, u64)]) -> Vec<(usize, u64, u64)> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(items[i].0)); // stable
    let mut offset = 0;
    order
        .into_iter()
        .map(|i| {
            let begin = offset;
            offset += items[i].1;
            (i, begin, offset)
        })
        .collect()
}

/// One tensor of a plain plan: row `row` of source file `source`, written as
/// `dtype` at `[begin, end)` of its shard's data; `role` its role in its
/// model's quantization (always [`Role::Plain`] in a model planned as plain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub source: usize,
    pub row: usize,
    pub dtype: DType,
    pub begin: u64,
    pub end: u64,
    pub role: Role,
}

/// The shards of a weight set whose every tensor is cast or copied as it is
/// (no dequantizing, no quantizing): `sources` are its files' tensors, each
/// in data order, files in the set's order; each tensor goes to `target` as
/// [`target_dtype`] says (`None`: keeps its dtype), and with `quantized` a
/// tensor holding quantization state ([`typed_roles`], over the whole set)
/// keeps its own, as `--keep-quantized` keeps it; shards packed within
/// `limit` bytes and laid out as [`pack`] and [`lay_out`] say. Returns each
/// shard's tensors in data order.
pub fn plan_plain(
    sources: &[&[TensorInfo]],
    target: Option<DType>,
    keep: &KeepRule,
    limit: u64,
    quantized: bool,
) -> Vec<Vec<Placed>> {
    let tensors: Vec<(usize, usize, &TensorInfo)> = sources
        .iter()
        .enumerate()
        .flat_map(|(s, rows)| rows.iter().enumerate().map(move |(r, t)| (s, r, t)))
        .collect();
    let roles = if quantized {
        let typed: Vec<(&str, DType)> = tensors
            .iter()
            .map(|(_, _, t)| (t.name.as_str(), t.dtype))
            .collect();
        typed_roles(&typed)
    } else {
        vec![Role::Plain; tensors.len()]
    };
    let written: Vec<(DType, u64)> = tensors
        .iter()
        .zip(&roles)
        .map(|((_, _, t), role)| match target {
            Some(to) if *role == Role::Plain => match target_dtype(&t.name, t.dtype, to, keep) {
                same if same == t.dtype => (same, t.nbytes()),
                to => (to, t.numel() * to.size() as u64),
            },
            _ => (t.dtype, t.nbytes()),
        })
        .collect();
    pack(written.iter().map(|w| w.1), limit)
        .into_iter()
        .map(|group| {
            let items: Vec<(usize, u64)> = group
                .iter()
                .map(|&i| (written[i].0.size(), written[i].1))
                .collect();
            lay_out(&items)
                .into_iter()
                .map(|(k, begin, end)| {
                    let (source, row, _) = tensors[group[k]];
                    Placed {
                        source,
                        row,
                        dtype: written[group[k]].0,
                        begin,
                        end,
                        role: roles[group[k]],
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dtype: DType, numel: u64) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype,
            shape: vec![numel],
            data_offsets: (0, numel * dtype.size() as u64),
        }
    }

    #[test]
    fn pack_closes_a_shard_only_when_the_next_item_would_overflow_it() {
        assert_eq!(pack([2, 2, 2], 4), vec![vec![0, 1], vec![2]]);
        assert_eq!(pack([4, 4], 4), vec![vec![0], vec![1]]);
        assert_eq!(pack([0, 0], 0), vec![vec![0, 1]]);
    }

    #[test]
    fn pack_puts_an_oversized_item_alone_before_the_shard_being_filled() {
        assert_eq!(pack([1, 5, 1, 1], 2), vec![vec![1], vec![0, 2], vec![3]]);
    }

    #[test]
    fn pack_of_nothing_is_one_empty_shard() {
        assert_eq!(pack([], 10), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn lay_out_is_stable_within_a_width() {
        let placed = lay_out(&[(1, 1), (2, 2), (1, 1), (2, 4)]);
        assert_eq!(placed, vec![(1, 0, 2), (3, 2, 6), (0, 6, 7), (2, 7, 8)],);
    }

    #[test]
    fn plan_plain_casts_floats_keeps_the_rest_and_what_keep_matches() {
        let a = [info("w", DType::F32, 4), info("ids", DType::I64, 2)];
        let b = [info("norm", DType::F32, 2)];
        let keep = KeepRule::new(&["norm"]);
        let shards = plan_plain(&[&a, &b], Some(DType::BF16), &keep, 1 << 20, false);
        let placed = |source, row, dtype, begin, end| Placed {
            source,
            row,
            dtype,
            begin,
            end,
            role: Role::Plain,
        };
        assert_eq!(
            shards,
            vec![vec![
                placed(0, 1, DType::I64, 0, 16),
                placed(1, 0, DType::F32, 16, 24),
                placed(0, 0, DType::BF16, 24, 32),
            ]]
        );
    }

    #[test]
    fn plan_plain_packs_by_the_bytes_written() {
        let a = [info("a", DType::F32, 4), info("b", DType::F32, 4)];
        // 16 bytes each in fp32, 8 in bf16: both fit a 16-byte shard once cast.
        let none = KeepRule::new(&[] as &[&str]);
        let cast = plan_plain(&[&a], Some(DType::BF16), &none, 16, false);
        assert_eq!(cast.len(), 1);
        let kept = plan_plain(&[&a], None, &none, 16, false);
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn plan_plain_of_a_quantized_set_keeps_its_state_across_files() {
        // The weight's scale is in another file: roles are the whole set's.
        let a = [
            info("l.weight", DType::F8E4M3, 8),
            info("norm", DType::F32, 2),
        ];
        let b = [info("l.weight_scale_inv", DType::F32, 1)];
        let none = KeepRule::default();
        let shards = plan_plain(&[&a, &b], Some(DType::BF16), &none, 1 << 20, true);
        let got: Vec<(usize, usize, DType, Role)> = shards[0]
            .iter()
            .map(|p| (p.source, p.row, p.dtype, p.role))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 0, DType::F32, Role::Scale),
                (0, 1, DType::BF16, Role::Plain),
                (0, 0, DType::F8E4M3, Role::QuantizedWeight),
            ]
        );
        // Planned as plain, the same set casts the scale and the codes too.
        let plain = plan_plain(&[&a, &b], Some(DType::BF16), &none, 1 << 20, false);
        assert!(plain[0]
            .iter()
            .all(|p| p.dtype == DType::BF16 && p.role == Role::Plain));
        // No target: every dtype kept, the roles still told.
        let kept = plan_plain(&[&a, &b], None, &none, 1 << 20, true);
        assert!(kept[0].iter().any(|p| p.role == Role::QuantizedWeight));
    }
}
