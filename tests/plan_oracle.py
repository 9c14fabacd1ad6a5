"""The Python planner: a weight set planned tensor by tensor, an object each, by the
core's rules (``_core.target_dtypes``, ``quant_roles``, ``quantize_targets``, ``pack``,
``lay_out``). fastcast plans every set in the core (``_plan.shards.plan_set``); this is
the oracle ``test_plain_plan.py`` compares it with, object for object, and where it
refuses, refusal for refusal. It was fastcast's planner of every set before the core
planned them, kept here unchanged but for the shard class it builds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from fastcast import _core
from fastcast._dtypes import element_size, is_castable
from fastcast._names import join
from fastcast._plan.dequantize import QuantizedWeight
from fastcast._plan.merge import Patched, SetMerge
from fastcast._plan.quantize import QuantizeTarget
from fastcast._plan.shards import (
    Dequantized,
    PlainColumns,
    PlannedTensor,
    Quantized,
    SetPlan,
    added,
    dequant_dict,
    pack,
    planned,
    refuse_changed,
    shard_names,
)
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import WeightSet
from fastcast._source.quantization import SURVIVING_ROLES


class ObjectShard:
    """One output file planned an object per tensor, read as ``PlannedShard`` is."""

    plain = None  # no core table

    def __init__(self, name: str, tensors: list[PlannedTensor], metadata: dict[str, str]):
        self.name = name
        self.metadata = metadata
        self.tensors, self.data_bytes, self.input_bytes = lay_out(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def source_names(self) -> list[str]:
        return [t.entry.name for t in self.tensors]

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def dtypes(self) -> list[str]:
        return [t.dtype for t in self.tensors]

    def digest(self) -> str:
        return _core.tensors_digest(self.source_names(), self.dtypes())

    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def special(self) -> list[tuple[int, PlannedTensor]]:
        return [(i, t) for i, t in enumerate(self.tensors) if t.special]

    def plain_columns(self) -> PlainColumns:
        plain = [t for t in self.tensors if not t.special]
        return PlainColumns(
            [t.entry.dtype for t in plain],
            [t.dtype for t in plain],
            [t.entry.nbytes for t in plain],
        )

    def uncast(self, target: str) -> list[tuple[str, str, str]]:
        return [
            (t.entry.name, t.label, t.role)
            for t in self.tensors
            if not t.special
            and t.dtype != target and t.dtype == t.entry.dtype and is_castable(t.dtype)
        ]  # fmt: skip

    def plan_rows(self, source_ids: dict[Path, int]) -> list[object]:
        return [tensor_plan(t, source_ids) for t in self.tensors]


def tensor_plan(
    t: PlannedTensor, source_ids: dict[Path, int]
) -> _core.TensorPlan | _core._PlainTensorPlan:
    """One tensor of the plan as the executor reads it: a plain tensor as a row of its
    entry's name and shape (a model may have 100k), any other as a dict."""
    e = t.entry
    if not t.special:
        return (e.name, e.shape, source_ids[e.file], e.dtype, t.dtype, e.offsets, t.offsets)
    out: _core.TensorPlan = {
        "name": t.name,  # dequantized or quantized: its own name and shape
        "shape": t.shape,
        "source": source_ids[e.file],
        "src_dtype": e.dtype,
        "dst_dtype": t.dtype,
        "src_offsets": e.offsets,
        "dst_offsets": t.offsets,
    }
    if isinstance(t.merged, Patched):  # rows replaced (the base is never dequantized)
        assert t.dequant is None and t.quantized is None
        out["rows"] = t.merged.recipe(source_ids)
    elif t.merged is not None:  # a dequantized base's recipe is the merge's base
        base = None if t.dequant is None else dequant_dict(t.dequant, source_ids)
        out["merge"] = t.merged.recipe(source_ids, base)
    elif t.dequant is not None:
        out["dequant"] = dequant_dict(t.dequant, source_ids)
    q = t.quantized
    if q is not None and q.kind == "fp8_weight":
        out["quantize"] = {"kind": "fp8_weight", "block": q.block}
    elif q is not None:
        weight_shape = t.dequant.weight.shape if t.dequant else t.entry.shape
        out["quantize"] = {
            "kind": "fp8_scale",
            "block": q.block,
            "weight": q.weight,
            "weight_shape": list(weight_shape),
        }
    return out


def target_dtypes(
    tensors: Sequence[TensorEntry], dtype: str, keep: Sequence[str], quantized: bool = False
) -> list[str]:
    """What each tensor becomes: the core's rule (floats to ``dtype`` unless a ``keep``
    glob matches their name or, with ``quantized``, they hold quantization state;
    integers, bool and packed formats never change)."""
    return _core.target_dtypes(
        [(t.name, t.dtype) for t in tensors], dtype, list(keep), quantized=quantized
    )


def kept(
    entry: TensorEntry, dtype: str, label: str, role: str, adapter: SetMerge | None
) -> PlannedTensor:
    """A tensor of the set written in ``dtype``: cast (or copied), or, merging an
    adapter (``--merge-lora``), replaced by the adapter's tensor of its name and/or
    with the adapter's update added."""
    if adapter is None:
        return planned(entry, dtype, label, role)
    entry = adapter.replaced.get(entry.name, entry)
    how = adapter.merged.get(entry.name)
    if how is None:
        return planned(entry, dtype, label, role)
    nbytes = entry.numel * element_size(dtype)
    return PlannedTensor(entry, dtype, nbytes, (0, 0), label, None, "plain", None, how)


class Bundle(NamedTuple):
    """Tensors that go into one shard together (a quantized weight and its scale), and
    their bytes. A tuple: a model may have 100k of them."""

    tensors: list[PlannedTensor]
    nbytes: int

    @classmethod
    def of(cls, tensors: list[PlannedTensor]) -> Bundle:
        return cls(tensors, sum(t.nbytes for t in tensors))


def lay_out(tensors: list[PlannedTensor]) -> tuple[list[PlannedTensor], int, int]:
    """Order a shard's data widest dtype first (then source order) and assign
    offsets, so every tensor is aligned to its element size with no padding
    (``_core.lay_out``; the header is padded to 8 bytes). Returns the tensors in that
    order, their data bytes and the input bytes they account for."""
    ordered = []
    end = 0
    for i, begin, end in _core.lay_out([(t.dtype, t.nbytes) for t in tensors]):
        t = tensors[i]
        t.offsets = (begin, end)
        ordered.append(t)
    return ordered, end, sum(t.input_nbytes for t in ordered)


def quantized_pair(
    ws: WeightSet,
    entry: TensorEntry,
    how: QuantizeTarget,
    role: str,
    adapter: SetMerge | None = None,
    dequant: Dequantized | None = None,
) -> list[PlannedTensor]:
    """A weight ``--quantize`` quantizes: its e4m3 values, then its F32 scales; merging an
    adapter (``--merge-lora``), both made from the merged weight (as a merge to f32
    writes it); a quantized weight (``dequant``, ``--dequantize --quantize``), from its
    values dequantized to f32 (merged too, with an adapter)."""
    assert how.block is not None and how.scale is not None
    weight = dequant.weight if dequant else entry
    name, shape = weight.name, weight.shape
    merged = refuse_changed(entry, name, adapter)
    scale, grid = how.scale
    values = Quantized("fp8_weight", name, shape, how.block, name)
    scales = Quantized("fp8_scale", scale, grid, how.block, name)
    return [
        PlannedTensor(entry, how.dtype, math.prod(shape), label=join(ws.folder, name),
                      role=role, quantized=values, merged=merged, dequant=dequant),
        PlannedTensor(entry, "F32", 4 * math.prod(grid), label=join(ws.folder, scale),
                      role=role, quantized=scales, merged=merged, dequant=dequant),
    ]  # fmt: skip


def object_set(
    ws: WeightSet,
    dtype: str | None,
    shard_size: int,
    keep: Sequence[str] = (),
    quantized: bool = False,
    dequantize: Mapping[str, QuantizedWeight] | None = None,
    quantize: Sequence[QuantizeTarget] | None = None,
    adapter: SetMerge | None = None,
) -> SetPlan:
    """``plan_set`` tensor by tensor, an object each: the tests' oracle of the core's
    plan of every set (``plain_set``)."""
    quantized = quantized or dequantize is not None or quantize is not None
    entries = ws.tensors if adapter is None else adapter.tensors(ws.tensors)
    roles = (
        _core.quant_roles([t.name for t in entries], [t.dtype for t in entries])
        if quantized
        else ["plain"] * len(entries)
    )
    if quantize is not None:
        targets = [q.dtype for q in quantize]
    elif dtype is None:
        targets = [t.dtype for t in entries]
    else:
        targets = target_dtypes(entries, dtype, keep, quantized)
    if quantize is None and dequantize is None:  # one tensor per entry: packed as they are
        tensors = [
            kept(e, to, join(ws.folder, e.name), role, adapter)
            for e, to, role in zip(entries, targets, roles, strict=True)
        ]
        tensors += added(ws, adapter, dtype)
        groups = pack(tensors, shard_size)
    else:
        by_name = {t.name: t for t in entries}
        bundles = []
        for i, (entry, to) in enumerate(zip(entries, targets, strict=True)):
            w = dequantize.get(entry.name) if dequantize is not None else None
            how = None if w is None else Dequantized(
                w, {role: by_name[n] for role, n in w.operands.items()}
            )  # fmt: skip
            if quantize is not None and quantize[i].fate == "quantize":
                pair = quantized_pair(ws, entry, quantize[i], roles[i], adapter, how)
                bundles.append(Bundle.of(pair))
            elif w is not None:
                assert dtype is not None, "dequantizing needs a target"
                nbytes = math.prod(w.shape) * element_size(dtype)
                label = join(ws.folder, w.name)
                bundles.append(Bundle([
                    PlannedTensor(entry, dtype, nbytes, label=label, dequant=how, role=roles[i],
                                  merged=adapter.merged.get(w.name) if adapter else None)
                ], nbytes))  # fmt: skip
            elif dequantize is None or roles[i] in SURVIVING_ROLES:
                t = kept(entry, to, join(ws.folder, entry.name), roles[i], adapter)
                bundles.append(Bundle([t], t.nbytes))
        bundles += [Bundle([t], t.nbytes) for t in added(ws, adapter, dtype)]
        groups = [[t for b in group for t in b.tensors] for group in pack(bundles, shard_size)]
    # The source's metadata is kept; transformers needs a format, so one is added if absent.
    metadata = {"format": "pt", **ws.metadata}
    names = shard_names(ws.key, len(groups))
    return SetPlan(
        ws.key,
        [ObjectShard(n, g, dict(metadata)) for n, g in zip(names, groups, strict=True)],
    )
