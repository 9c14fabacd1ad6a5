//! Where tensors go in the output: which shard (packed as huggingface_hub's
//! splitter packs them) and where in it (widest dtype first, no padding).
//!
//! [`plan_set`] plans every weight set: cast, copied, quantized, dequantized
//! or both (safetensors or torch.save files, quantization state kept as it
//! is, `--quantize`, `--dequantize`, `--dequantize --quantize`), with a LoRA
//! adapter merged or not ([`View`]), without a Python object per tensor (a
//! model may have 100k tensors). Python's tensor-by-tensor planner
//! (`tests/plan_oracle.py`) stays as the tests' oracle.

use crate::dtype::DType;
use crate::format::header::TensorInfo;
use std::collections::HashMap;

use crate::rules::fates::{quantize_targets, Target};
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

/// What a placed tensor holds: its source cast (or copied), for `--quantize`
/// a weight's e4m3 values or F32 scales, or values the caller makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Cast,
    /// The weight's e4m3 values, each scale covering `block`; `made`: the
    /// weight's f32 values are the `made`th [`Made`]'s (requantized, or
    /// merged then quantized).
    Values {
        block: (u64, u64),
        made: Option<usize>,
    },
    /// The weight's F32 scales: the plan's `scale`th ([`SetLayout::scales`]).
    Scale {
        block: (u64, u64),
        scale: usize,
        made: Option<usize>,
    },
    /// Values the caller makes (a weight dequantized or merged): its
    /// `made`th [`Made`].
    Made {
        made: usize,
    },
}

/// A tensor whose values the caller makes from set tensor `tensor` (the
/// `tensor`th of the set, files in order, or of its [`View`]), written as
/// `name`, `shape` and `dtype` in its place (`--dequantize`: a quantized
/// weight's values; `--merge-lora`: a weight with its update added). `dtype`
/// None: as the set's rule writes the tensor (and, when `--quantize`
/// quantizes it, its values and scales are made of these values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    pub tensor: usize,
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: Option<DType>,
}

/// A merged set's tensors as its output has them (`--merge-lora`): each
/// tensor in order (the base's, its layers stacked again by
/// `layer_replication`, some replaced by the adapter's), then the tensors the
/// adapter adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub members: Vec<Member>,
    pub added: Vec<Added>,
}

/// One tensor of a [`View`]: the source tensor the set's rules see (its
/// name, dtype and shape in the base; `(source, row)`), the one its values
/// are read from (the adapter's, when it replaces it), and its name when the
/// output renames it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub rules: (usize, usize),
    pub values: (usize, usize),
    pub name: Option<String>,
}

/// A tensor an adapter adds to a set (its own output head): where its
/// values are, its name and the dtype it is written in (no rule applies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    pub values: (usize, usize),
    pub name: String,
    pub dtype: DType,
}

/// One tensor of a set's plan: row `row` of source file `source`, written as
/// `dtype` at `[begin, end)` of its shard's data; `tensor` the set's tensor
/// it is (of its [`View`], added ones after its members); `role` its role in
/// its model's quantization (always [`Role::Plain`] in a model planned as
/// plain); `part` what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub tensor: usize,
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
    /// `--dequantize`: the [`Made`] tensors in the place of their sources,
    /// every other tensor of quantization state ([`Role::is_state`]) left
    /// out, the rest as [`Mode::KeepQuantized`] writes it.
    Dequantize,
    /// `--dequantize --quantize`: the set as [`Mode::Dequantize`] writes it,
    /// then quantized as [`quantize_targets`] rules that plain set.
    Requantize(Scheme),
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

/// A tensor of the set as the rules see it: `(source, row)` where its
/// values are read (`values`), its name, and the source tensor whose dtype
/// and shape the rules go by (`rules`; the same but for a replaced one).
struct Tensor<'a> {
    source: usize,
    row: usize,
    name: &'a str,
    rules: &'a TensorInfo,
    values: &'a TensorInfo,
}

impl<'a> Tensor<'a> {
    /// The set's tensors: every row of `sources` in order, or `view`'s
    /// members then its added tensors.
    fn of(sources: &[&'a [TensorInfo]], view: Option<&'a View>) -> Vec<Self> {
        let Some(view) = view else {
            return (sources.iter().enumerate())
                .flat_map(|(s, rows)| {
                    rows.iter().enumerate().map(move |(r, t)| Tensor {
                        source: s,
                        row: r,
                        name: &t.name,
                        rules: t,
                        values: t,
                    })
                })
                .collect();
        };
        let at = |(s, r): (usize, usize)| &sources[s][r];
        let members = view.members.iter().map(|m| {
            let rules = at(m.rules);
            Tensor {
                source: m.values.0,
                row: m.values.1,
                name: m.name.as_deref().unwrap_or(&rules.name),
                rules,
                values: at(m.values),
            }
        });
        let added = view.added.iter().map(|a| Tensor {
            source: a.values.0,
            row: a.values.1,
            name: &a.name,
            rules: at(a.values),
            values: at(a.values),
        });
        members.chain(added).collect()
    }

    /// Its bytes written as `dtype`: its values' own, or cast.
    fn written_as(&self, dtype: DType) -> Item {
        let v = self.values;
        match dtype {
            same if same == v.dtype => (same, v.nbytes(), Part::Cast),
            to => (to, v.numel() * to.size() as u64, Part::Cast),
        }
    }
}

/// The shards of a weight set: `sources` are its files' tensors, each in
/// data order, files in the set's order (and, merging, the adapter's file);
/// `view` (`--merge-lora`) says which tensors the set has, else every row of
/// `sources`. Each tensor goes to `target` as [`target_dtype`] says (`None`:
/// keeps its dtype), and unless `mode` is [`Mode::Cast`] a tensor holding
/// quantization state ([`typed_roles`], over the whole set) keeps its own,
/// as `--keep-quantized` keeps it; with [`Mode::Quantize`], as
/// [`quantize_targets`] says. Shards are packed within `limit` bytes (a
/// weight and its scales together) and laid out as [`pack`] and [`lay_out`]
/// say. `made` are the tensors whose values the caller makes: the weights
/// [`Mode::Dequantize`] and [`Mode::Requantize`] write, merged weights.
pub fn plan_set(
    sources: &[&[TensorInfo]],
    target: Option<DType>,
    keep: &KeepRule,
    limit: u64,
    mode: Mode,
    made: &[Made],
    view: Option<&View>,
) -> SetLayout {
    let tensors = Tensor::of(sources, view);
    let ruled = tensors.len() - view.map_or(0, |v| v.added.len());
    let mut roles = if mode == Mode::Cast {
        vec![Role::Plain; ruled]
    } else {
        let typed: Vec<(&str, DType)> = (tensors[..ruled].iter())
            .map(|t| (t.name, t.rules.dtype))
            .collect();
        typed_roles(&typed)
    };
    let (mut items, mut scales) = written(&tensors[..ruled], &roles, target, keep, mode);
    if matches!(mode, Mode::Dequantize | Mode::Requantize(_)) {
        for (i, role) in roles.iter().enumerate() {
            if role.is_state() {
                items[i].clear(); // consumed by the weight it dequantizes
            }
        }
    }
    let dtypes = make(&mut items, made);
    if let Mode::Requantize(scheme) = mode {
        let set = Requantized {
            tensors: &tensors,
            made,
            dtypes: &dtypes,
            target,
            keep,
            scheme,
        };
        set.quantize(&mut items, &mut scales);
    }
    for (t, a) in tensors[ruled..]
        .iter()
        .zip(view.map_or(&[][..], |v| &v.added))
    {
        items.push(vec![t.written_as(a.dtype)]);
        roles.push(Role::Plain);
    }
    // (tensor, items) of the tensors written, in order
    let bundles: Vec<(usize, Vec<Item>)> = items
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .collect();
    let sizes = bundles.iter().map(|(_, b)| b.iter().map(|i| i.1).sum());
    let shards = pack(sizes, limit)
        .into_iter()
        .map(|group| {
            let group: Vec<(usize, &Item)> = group
                .iter()
                .flat_map(|&b| {
                    let (tensor, items) = &bundles[b];
                    items.iter().map(move |item| (*tensor, item))
                })
                .collect();
            let sizes: Vec<(usize, u64)> =
                group.iter().map(|(_, it)| (it.0.size(), it.1)).collect();
            lay_out(&sizes)
                .into_iter()
                .map(|(k, begin, end)| {
                    let (i, &(dtype, _, part)) = group[k];
                    Placed {
                        tensor: i,
                        source: tensors[i].source,
                        row: tensors[i].row,
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

/// Put each of `made` in the place of its tensor: one tensor of its dtype
/// (or the one the rule gave the tensor), or, where `--quantize` quantizes
/// the tensor, its values and scales made of it. Returns each one's dtype.
fn make(items: &mut [Vec<Item>], made: &[Made]) -> Vec<DType> {
    let mut dtypes = Vec::with_capacity(made.len());
    for (k, m) in made.iter().enumerate() {
        let slot = &mut items[m.tensor];
        if let (None, [(_, _, Part::Values { made, .. }), (_, _, Part::Scale { made: of, .. })]) =
            (m.dtype, slot.as_mut_slice())
        {
            (*made, *of) = (Some(k), Some(k));
            dtypes.push(DType::F32); // quantized from its values in f32
            continue;
        }
        // The caller names the dtype of a tensor the rule drops (a dequantized
        // weight's codes are quantization state).
        let dtype = m.dtype.or(slot.first().map(|it| it.0));
        let dtype = dtype.expect("a made tensor's dtype: given, or its tensor's");
        let nbytes = m.shape.iter().product::<u64>() * dtype.size() as u64;
        *slot = vec![(dtype, nbytes, Part::Made { made: k })];
        dtypes.push(dtype);
    }
    dtypes
}

/// What each tensor of a set is written as: one item, or a weight's values
/// and scales (packed together); and the scales' names and shapes.
fn written(
    tensors: &[Tensor<'_>],
    roles: &[Role],
    target: Option<DType>,
    keep: &KeepRule,
    mode: Mode,
) -> (Vec<Vec<Item>>, Vec<ScaleTensor>) {
    let Mode::Quantize(scheme) = mode else {
        // and Requantize: written as Dequantize writes, then quantized
        let items = tensors
            .iter()
            .zip(roles)
            .map(|(t, role)| match target {
                Some(to) if *role == Role::Plain => {
                    vec![t.written_as(target_dtype(t.name, t.rules.dtype, to, keep))]
                }
                _ => vec![t.written_as(t.rules.dtype)],
            })
            .collect();
        return (items, Vec::new());
    };
    let typed: Vec<(&str, DType, &[u64])> = tensors
        .iter()
        .map(|t| (t.name, t.rules.dtype, &t.rules.shape[..]))
        .collect();
    let mut scales = Vec::new();
    let items = quantize_targets(&typed, target, keep, scheme)
        .into_iter()
        .zip(tensors)
        .map(|(q, t)| {
            let dtype = q.dtype;
            let numel = t.values.numel();
            quantized(q, numel, None, &mut scales).unwrap_or_else(|| vec![t.written_as(dtype)])
        })
        .collect();
    (items, scales)
}

/// A weight `q` quantizes (of `numel` elements; `made`: its f32 values are
/// that [`Made`]'s): its values and its scales, one bundle, the scales'
/// name and shape added to `scales`. None when `q` does not quantize it.
fn quantized(
    q: Target,
    numel: u64,
    made: Option<usize>,
    scales: &mut Vec<ScaleTensor>,
) -> Option<Vec<Item>> {
    let (Some(block), Some((name, grid))) = (q.block, q.scale) else {
        return None;
    };
    let values = (
        q.dtype,
        numel * q.dtype.size() as u64,
        Part::Values { block, made },
    );
    let nbytes = grid.iter().product::<u64>() * DType::F32.size() as u64;
    let scale = Part::Scale {
        block,
        scale: scales.len(),
        made,
    };
    scales.push((name, grid));
    Some(vec![values, (DType::F32, nbytes, scale)])
}

/// `--dequantize --quantize` of a set: what [`quantize_targets`] makes of
/// the plain set `--dequantize` writes.
struct Requantized<'a> {
    tensors: &'a [Tensor<'a>],
    made: &'a [Made],
    /// Each made tensor's dtype as written (`make`).
    dtypes: &'a [DType],
    target: Option<DType>,
    keep: &'a KeepRule,
    scheme: Scheme,
}

impl Requantized<'_> {
    /// Replace each weight of `items` (as `--dequantize` writes them) that
    /// `--quantize` quantizes with its values and scales.
    fn quantize(&self, items: &mut [Vec<Item>], scales: &mut Vec<ScaleTensor>) {
        let made_at: HashMap<usize, usize> = (self.made.iter().enumerate())
            .map(|(k, m)| (m.tensor, k))
            .collect();
        // (tensor, name, dtype, shape) of each tensor written, as written
        let written: Vec<(usize, &str, DType, &[u64])> = (items.iter().enumerate())
            .filter(|(_, it)| !it.is_empty())
            .map(|(i, it)| match made_at.get(&i) {
                Some(&k) => {
                    let m = &self.made[k];
                    (i, m.name.as_str(), self.dtypes[k], &m.shape[..])
                }
                None => {
                    let t = &self.tensors[i];
                    (i, t.name, it[0].0, &t.rules.shape[..])
                }
            })
            .collect();
        let typed: Vec<(&str, DType, &[u64])> = written.iter().map(|w| (w.1, w.2, w.3)).collect();
        let targets = quantize_targets(&typed, self.target, self.keep, self.scheme);
        for (&(i, _, _, shape), q) in written.iter().zip(targets) {
            let numel = shape.iter().product();
            if let Some(pair) = quantized(q, numel, made_at.get(&i).copied(), scales) {
                items[i] = pair;
            }
        }
    }
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
        let planned = plan_set(sources, target, keep, limit, mode, &[], None);
        assert!(planned.scales.is_empty());
        planned.shards
    }

    /// (row, dtype, bytes, part) of each tensor of a shard.
    fn parts(shard: &[Placed]) -> Vec<(usize, DType, u64, Part)> {
        shard
            .iter()
            .map(|p| (p.row, p.dtype, p.end - p.begin, p.part))
            .collect()
    }

    /// The scales of a 256x256 `up_proj` weight in 128x128 blocks.
    fn up_proj_scales() -> Vec<ScaleTensor> {
        let name = "model.layers.0.mlp.up_proj.weight_scale_inv";
        vec![(name.into(), vec![2, 2])]
    }

    /// The fp8 scales and values of row 0, a 256x256 weight in 128x128
    /// blocks (`made`: of that dequantized weight), as [`parts`] has them.
    fn pair_of_first(made: Option<usize>) -> [(usize, DType, u64, Part); 2] {
        let block = (128, 128);
        let scale = Part::Scale {
            block,
            scale: 0,
            made,
        };
        let values = Part::Values { block, made };
        [
            (0, DType::F32, 16, scale),
            (0, DType::F8E4M3, 65536, values),
        ]
    }

    /// A weight made in BF16 of set tensor 0.
    fn made_of_first(name: &str, shape: Vec<u64>) -> [Made; 1] {
        let (tensor, name, dtype) = (0, name.into(), Some(DType::BF16));
        [Made {
            tensor,
            name,
            shape,
            dtype,
        }]
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
        let placed = |tensor, source, row, dtype, begin, end| Placed {
            tensor,
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
                placed(1, 0, 1, DType::I64, 0, 16),
                placed(2, 1, 0, DType::F32, 16, 24),
                placed(0, 0, 0, DType::BF16, 24, 32),
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
        let planned = plan_set(&[&a], Some(DType::F16), &none, 65536, mode, &[], None);
        assert_eq!(planned.scales, up_proj_scales());
        let got: Vec<_> = planned.shards.iter().map(|s| parts(s)).collect();
        let [scales, values] = pair_of_first(None);
        let casts = vec![
            (1, DType::F16, 512, Part::Cast),
            (2, DType::F16, 51200, Part::Cast),
        ];
        assert_eq!(got, vec![vec![scales, values], casts]);
    }

    #[test]
    fn plan_set_dequantizing_writes_the_made_in_place_and_leaves_the_state_out() {
        let a = [
            info("l.qweight", DType::I32, 4),
            info("l.scales", DType::F16, 2),
            info("l.qzeros", DType::I32, 1),
            info("norm", DType::F32, 2),
        ];
        let made = made_of_first("l.weight", vec![4, 8]);
        let none = KeepRule::default();
        let planned = plan_set(
            &[&a],
            Some(DType::BF16),
            &none,
            1 << 20,
            Mode::Dequantize,
            &made,
            None,
        );
        let got = parts(&planned.shards[0]);
        assert_eq!(
            got,
            vec![
                (0, DType::BF16, 64, Part::Made { made: 0 }),
                (3, DType::BF16, 4, Part::Cast),
            ]
        );
        // Every tensor dropped but one weight: no empty shard is planned.
        let planned = plan_set(
            &[&a[..3]],
            Some(DType::BF16),
            &none,
            1,
            Mode::Dequantize,
            &made,
            None,
        );
        assert_eq!(planned.shards.len(), 1);
    }

    #[test]
    fn plan_set_requantizing_quantizes_the_weights_dequantize_writes() {
        let a = [
            info("model.layers.0.mlp.up_proj.qweight", DType::I32, 8192),
            info("model.layers.0.mlp.up_proj.scales", DType::F16, 256),
            info("model.norm.weight", DType::F32, 256),
        ];
        let made = made_of_first("model.layers.0.mlp.up_proj.weight", vec![256, 256]);
        let none = KeepRule::default();
        let mode = Mode::Requantize(Scheme::Fp8Block);
        let planned = plan_set(&[&a], Some(DType::BF16), &none, 1 << 20, mode, &made, None);
        assert_eq!(planned.scales, up_proj_scales());
        let [scales, values] = pair_of_first(Some(0));
        let cast = (2, DType::BF16, 512, Part::Cast);
        assert_eq!(parts(&planned.shards[0]), vec![scales, cast, values]);
    }

    #[test]
    fn plan_set_of_a_view_renames_replaces_merges_and_adds() {
        // Two layers, stacked as 1, 0, 1; a head replaced by a larger one of
        // the adapter's (source 1); a merged weight; a tensor added.
        let base = [
            info("layers.0.w", DType::F32, 4),
            info("layers.1.w", DType::F32, 4),
            info("head", DType::F32, 4),
        ];
        let adapter = [
            info("saved.head", DType::F16, 6),
            info("own", DType::F32, 2),
        ];
        let member = |row, values, name: Option<&str>| Member {
            rules: (0, row),
            values,
            name: name.map(Into::into),
        };
        let view = View {
            members: vec![
                member(1, (0, 1), Some("layers.0.w")),
                member(0, (0, 0), Some("layers.1.w")),
                member(1, (0, 1), Some("layers.2.w")),
                member(2, (1, 0), Some("head")),
            ],
            added: vec![Added {
                values: (1, 1),
                name: "lm_head".into(),
                dtype: DType::BF16,
            }],
        };
        // the second layer's weight merged: its dtype the rule's
        let made = [Made {
            tensor: 1,
            name: "layers.1.w".into(),
            shape: vec![4],
            dtype: None,
        }];
        let none = KeepRule::default();
        let planned = plan_set(
            &[&base, &adapter],
            Some(DType::BF16),
            &none,
            1 << 20,
            Mode::Cast,
            &made,
            Some(&view),
        );
        let got: Vec<_> = (planned.shards[0].iter())
            .map(|p| (p.tensor, p.source, p.row, p.dtype, p.end - p.begin, p.part))
            .collect();
        let cast = Part::Cast;
        assert_eq!(
            got,
            vec![
                (0, 0, 1, DType::BF16, 8, cast),
                (1, 0, 0, DType::BF16, 8, Part::Made { made: 0 }),
                (2, 0, 1, DType::BF16, 8, cast),
                (3, 1, 0, DType::BF16, 12, cast), // the replacement's 6 elements
                (4, 1, 1, DType::BF16, 4, cast),
            ]
        );
        // No target: the replacement is written in the base tensor's dtype.
        let kept = plan_set(
            &[&base, &adapter],
            None,
            &none,
            1 << 20,
            Mode::Cast,
            &[],
            Some(&view),
        );
        assert_eq!(
            kept.shards[0].iter().find(|p| p.tensor == 3).unwrap().dtype,
            DType::F32
        );
    }
}
