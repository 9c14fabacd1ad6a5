//! Where tensors go in the output: which shard (packed as huggingface_hub's
//! splitter packs them) and where in it (widest dtype first, no padding).
//!
//! One definition for both planners: Python's, which plans dequantized and
//! merged sets tensor by tensor, and [`plan_set`], which plans a set whose
//! every tensor is cast, copied or quantized (safetensors or torch.save
//! files, quantization state kept as it is, `--quantize`) without a Python
//! object per tensor (a model may have 100k tensors).

use crate::dtype::DType;
use crate::format::header::TensorInfo;
use crate::rules::fates::quantize_targets;
use crate::rules::glob::KeepRule;
use crate::rules::roles::{typed_roles, Role};
use crate::rules::scheme::Scheme;
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

/// What a placed tensor holds: its source cast (or copied), or, for
/// `--quantize`, a weight's e4m3 values or F32 scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Cast,
    /// The weight's e4m3 values, each scale covering `block`.
    Values {
        block: (u64, u64),
    },
    /// The weight's F32 scales: the plan's `scale`th ([`SetLayout::scales`]).
    Scale {
        block: (u64, u64),
        scale: usize,
    },
}

/// One tensor of a set's plan: row `row` of source file `source`, written as
/// `dtype` at `[begin, end)` of its shard's data; `role` its role in its
/// model's quantization (always [`Role::Plain`] in a model planned as plain);
/// `part` what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub source: usize,
    pub row: usize,
    pub dtype: DType,
    pub begin: u64,
    pub end: u64,
    pub role: Role,
    pub part: Part,
}

/// How a set's tensors are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Floats cast to the target (unless kept), everything else copied.
    Cast,
    /// As [`Mode::Cast`], quantization state kept as it is (`--keep-quantized`).
    KeepQuantized,
    /// `--quantize`: each weight [`quantize_targets`] quantizes written as its
    /// e4m3 values and, in the same shard, its F32 scales; the rest as that
    /// rule says.
    Quantize(Scheme),
}

/// A scale tensor `--quantize` adds: its name and shape.
pub type ScaleTensor = (String, Vec<u64>);

/// A set's plan: each shard's tensors in data order, and the names and
/// shapes of the scale tensors `--quantize` adds ([`Part::Scale`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetLayout {
    pub shards: Vec<Vec<Placed>>,
    pub scales: Vec<ScaleTensor>,
}

/// The shards of a weight set whose tensors are cast, copied or quantized
/// (no dequantizing, no merging): `sources` are its files' tensors, each in
/// data order, files in the set's order; each tensor goes to `target` as
/// [`target_dtype`] says (`None`: keeps its dtype), and unless `mode` is
/// [`Mode::Cast`] a tensor holding quantization state ([`typed_roles`], over
/// the whole set) keeps its own, as `--keep-quantized` keeps it; with
/// [`Mode::Quantize`], as [`quantize_targets`] says. Shards are packed within
/// `limit` bytes (a weight and its scales together) and laid out as [`pack`]
/// and [`lay_out`] say.
pub fn plan_set(
    sources: &[&[TensorInfo]],
    target: Option<DType>,
    keep: &KeepRule,
    limit: u64,
    mode: Mode,
) -> SetLayout {
    let tensors: Vec<(usize, usize, &TensorInfo)> = sources
        .iter()
        .enumerate()
        .flat_map(|(s, rows)| rows.iter().enumerate().map(move |(r, t)| (s, r, t)))
        .collect();
    let roles = if mode == Mode::Cast {
        vec![Role::Plain; tensors.len()]
    } else {
        let typed: Vec<(&str, DType)> = tensors
            .iter()
            .map(|(_, _, t)| (t.name.as_str(), t.dtype))
            .collect();
        typed_roles(&typed)
    };
    let (items, scales) = written(&tensors, &roles, target, keep, mode);
    let bundles: Vec<u64> = items.iter().map(|b| b.iter().map(|i| i.1).sum()).collect();
    let shards = pack(bundles, limit)
        .into_iter()
        .map(|group| {
            let group: Vec<(usize, &Item)> = group
                .iter()
                .flat_map(|&i| items[i].iter().map(move |item| (i, item)))
                .collect();
            let sizes: Vec<(usize, u64)> =
                group.iter().map(|(_, it)| (it.0.size(), it.1)).collect();
            lay_out(&sizes)
                .into_iter()
                .map(|(k, begin, end)| {
                    let (i, &(dtype, _, part)) = group[k];
                    let (source, row, _) = tensors[i];
                    Placed {
                        source,
                        row,
                        dtype,
                        begin,
                        end,
                        role: roles[i],
                        part,
                    }
                })
                .collect()
        })
        .collect();
    SetLayout { shards, scales }
}

/// One tensor written: its dtype, bytes and what it holds.
type Item = (DType, u64, Part);

/// What each tensor of a set is written as: one item, or a weight's values
/// and scales (packed together); and the scales' names and shapes.
fn written(
    tensors: &[(usize, usize, &TensorInfo)],
    roles: &[Role],
    target: Option<DType>,
    keep: &KeepRule,
    mode: Mode,
) -> (Vec<Vec<Item>>, Vec<ScaleTensor>) {
    let cast = |t: &TensorInfo, to: DType| match to {
        same if same == t.dtype => vec![(same, t.nbytes(), Part::Cast)],
        to => vec![(to, t.numel() * to.size() as u64, Part::Cast)],
    };
    let Mode::Quantize(scheme) = mode else {
        let items = tensors
            .iter()
            .zip(roles)
            .map(|((_, _, t), role)| match target {
                Some(to) if *role == Role::Plain => {
                    cast(t, target_dtype(&t.name, t.dtype, to, keep))
                }
                _ => cast(t, t.dtype),
            })
            .collect();
        return (items, Vec::new());
    };
    let typed: Vec<(&str, DType, &[u64])> = tensors
        .iter()
        .map(|(_, _, t)| (t.name.as_str(), t.dtype, &t.shape[..]))
        .collect();
    let mut scales = Vec::new();
    let items = quantize_targets(&typed, target, keep, scheme)
        .into_iter()
        .zip(tensors)
        .map(|(q, (_, _, t))| match (q.block, q.scale) {
            (Some(block), Some((name, grid))) => {
                let values = (
                    q.dtype,
                    t.numel() * q.dtype.size() as u64,
                    Part::Values { block },
                );
                let nbytes = grid.iter().product::<u64>() * DType::F32.size() as u64;
                let scale = Part::Scale {
                    block,
                    scale: scales.len(),
                };
                scales.push((name, grid));
                vec![values, (DType::F32, nbytes, scale)]
            }
            _ => cast(t, q.dtype),
        })
        .collect();
    (items, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`plan_set`] casting (`quantized`: keeping the quantization state).
    fn plan_plain(
        sources: &[&[TensorInfo]],
        target: Option<DType>,
        keep: &KeepRule,
        limit: u64,
        quantized: bool,
    ) -> Vec<Vec<Placed>> {
        let mode = if quantized {
            Mode::KeepQuantized
        } else {
            Mode::Cast
        };
        let planned = plan_set(sources, target, keep, limit, mode);
        assert!(planned.scales.is_empty());
        planned.shards
    }

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
            part: Part::Cast,
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

    #[test]
    fn plan_set_quantizing_packs_each_weight_with_its_scales() {
        let w = |name: &str, rows: u64| TensorInfo {
            name: name.into(),
            dtype: DType::BF16,
            shape: vec![rows, 256],
            data_offsets: (0, rows * 256 * 2),
        };
        let a = [
            w("model.layers.0.mlp.up_proj.weight", 256),
            info("model.norm.weight", DType::BF16, 256),
            w("model.layers.0.mlp.down_proj.weight", 100), // a misfit of 128x128 blocks
        ];
        let none = KeepRule::default();
        let mode = Mode::Quantize(Scheme::Fp8Block);
        // A shard of 64 KiB: the weight (64 KiB of e4m3) and its 16 bytes of
        // scales are one bundle, larger than the limit, alone in a shard.
        let planned = plan_set(&[&a], Some(DType::F16), &none, 65536, mode);
        let scale = (
            "model.layers.0.mlp.up_proj.weight_scale_inv".into(),
            vec![2, 2],
        );
        assert_eq!(planned.scales, vec![scale]);
        let got: Vec<Vec<(usize, DType, u64, Part)>> = planned
            .shards
            .iter()
            .map(|s| {
                s.iter()
                    .map(|p| (p.row, p.dtype, p.end - p.begin, p.part))
                    .collect()
            })
            .collect();
        let block = (128, 128);
        assert_eq!(
            got,
            vec![
                vec![
                    (0, DType::F32, 16, Part::Scale { block, scale: 0 }),
                    (0, DType::F8E4M3, 65536, Part::Values { block }),
                ],
                vec![
                    (1, DType::F16, 512, Part::Cast),
                    (2, DType::F16, 51200, Part::Cast)
                ],
            ]
        );
    }
}
