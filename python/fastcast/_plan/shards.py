"""Output planning: which tensor goes to which shard, at which offset, in which dtype.

Pure data, no I/O: the plan is handed to the Rust core, which only moves and
casts bytes. Packing follows transformers' ``save_pretrained(max_shard_size=...)``
(huggingface_hub's splitter): tensors in source order; a tensor that would take
the current shard past the limit starts a new one; a tensor larger than the
limit gets a shard of its own at once, while the current shard stays open.
Only tensor bytes count toward the limit.

Which tensors are cast, and to what, is the core's rule (``_core.target_dtypes``:
floats go to the target unless a ``keep`` glob matches; everything else keeps its
dtype; ``_core.quantize_targets`` for ``--quantize``), so that convert, inspect and
verify cannot disagree about it. A quantized weight and its scale are packed into the
same shard: the executor computes the scale right after the weight.

Every weight set (the usual model, safetensors or torch.save, a quantized one kept
quantized, ``--quantize``, ``--dequantize``, ``--merge-lora``) is planned by the core
(``_core.plan_plain``, ``plain_set``) by the same rules, with the same ``pack`` and
``lay_out``: a model may have 100k tensors, and an object per tensor cost more than its
bytes. Its shards make their ``PlannedTensor`` objects only when something asks; a
dequantized or merged weight's recipe is made here, when the plan's rows are
(``--quantize``: for its values and its scales). The tests plan every set once more, an
object per tensor, in Python (``tests/plan_oracle.py``), and compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

from fastcast import _core
from fastcast._dtypes import dominant_float, element_size, is_castable
from fastcast._names import join
from fastcast._plan.dequantize import QuantizedWeight
from fastcast._plan.merge import Change, Merging, Patched, SetMerge, for_set
from fastcast._plan.quantize import QuantizeTarget
from fastcast._plan.wire import operand_plan
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import ModelFolder, SourceFile, WeightSet

if TYPE_CHECKING:
    from fastcast._plan.wire import DequantPlan


@dataclass(frozen=True)
class Dequantized:
    """How a dequantized tensor's values come back: the weight (see
    ``_plan.dequantize.QuantizedWeight``) and the entries of the tensors it reads, by role."""

    weight: QuantizedWeight
    operands: dict[str, TensorEntry]


@dataclass(frozen=True)
class Quantized:
    """A tensor ``--quantize`` writes from a float weight: its e4m3 values, or the F32
    scales of ``weight`` (every block's amax / 448)."""

    kind: Literal["fp8_weight", "fp8_scale"]
    name: str
    shape: tuple[int, ...]
    block: tuple[int, int]
    weight: str
    """The weight's name (the values' own, or the one the scales belong to)."""

    def describe(self) -> dict[str, Any]:
        """Everything that decides its bytes, JSON-ready (for fingerprints)."""
        return {"kind": self.kind, "block": self.block, "weight": self.weight}


@dataclass(slots=True)
class PlannedTensor:
    """A tensor's place in the output. Slotted: a model may have 100k."""

    entry: TensorEntry
    dtype: str
    nbytes: int
    offsets: tuple[int, int] = (0, 0)
    label: str = ""
    """The name reports use: the tensor's, after its set's folder if it has one
    (``2_Dense/linear.weight``): names repeat across a pipeline's components."""
    dequant: Dequantized | None = None
    """Set when the tensor is dequantized rather than cast (``entry`` is then the
    tensor holding its quantized values)."""
    role: str = "plain"
    """Its role in a quantized model's quantization (``pinned fp32``...)."""
    quantized: Quantized | None = None
    """Set when ``--quantize`` writes it (``entry`` is then the float weight)."""
    merged: Change | None = None
    """Set when ``--merge-lora`` adds an adapter's update to it (``entry`` is the base
    weight)."""

    @property
    def special(self) -> bool:
        """Its values are made (dequantized, quantized, merged), not cast."""
        return self.dequant is not None or self.quantized is not None or self.merged is not None

    @property
    def is_cast(self) -> bool:
        return self.dtype != self.entry.dtype

    @property
    def name(self) -> str:
        """Its name in the output (GPTQ/AWQ ``x.qweight`` is dequantized to ``x.weight``,
        a quantized weight's scale is ``x.weight_scale_inv``...)."""
        if self.quantized:
            return self.quantized.name
        return self.dequant.weight.name if self.dequant else self.entry.name

    @property
    def shape(self) -> tuple[int, ...]:
        """Its shape in the output (bitsandbytes 4-bit: the original shape)."""
        if self.quantized:
            return self.quantized.shape
        return self.dequant.weight.shape if self.dequant else self.entry.shape

    @property
    def input_nbytes(self) -> int:
        """The input bytes it accounts for (a scale re-reads its weight's: none)."""
        scale = self.quantized is not None and self.quantized.kind == "fp8_scale"
        return 0 if scale else self.entry.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def values_dtype(self) -> str:
        """The dtype of the values rounded to ``dtype``: the source's, or F32 for a
        dequantized or merged tensor (its values are computed in fp32)."""
        return "F32" if self.dequant or self.merged else self.entry.dtype

    @property
    def values_nbytes(self) -> int:
        return self.numel * 4 if self.dequant or self.merged else self.entry.nbytes


class Making:
    """The tensors whose values a set's plan makes, in the order the core was given them
    (``_core.PlainShard.made`` indexes them): the weights ``--dequantize`` writes (each
    with the change an adapter makes to it, if any), then the weights an adapter
    changes; how each comes back."""

    def __init__(
        self,
        files: list[SourceFile],
        weights: Sequence[QuantizedWeight] = (),
        changes: Mapping[str, Change] | None = None,
        merged: Sequence[tuple[str, Change]] = (),
    ) -> None:
        self.files = files
        self.weights = weights
        self.changes = changes or {}
        """The changes of the dequantized weights, by name."""
        self.merged = merged
        """(name, change) of each weight merged that is not dequantized."""

    @cached_property
    def by_name(self) -> dict[str, TensorEntry]:
        """The set's tensors by name (made on first use, once for all its shards)."""
        return {t.name: t for f in self.files for t in f.tensors}

    def how(self, made: int) -> Dequantized | None:
        if made >= len(self.weights):
            return None
        w = self.weights[made]
        return Dequantized(w, {role: self.by_name[n] for role, n in w.operands.items()})

    def name(self, made: int) -> str:
        """The made weight's name."""
        if made >= len(self.weights):
            return self.merged[made - len(self.weights)][0]
        return self.weights[made].name

    def change(self, made: int) -> Change | None:
        if made >= len(self.weights):
            return self.merged[made - len(self.weights)][1]
        return self.changes.get(self.weights[made].name)

    def recipe(self, made: int, source_ids: dict[Path, int]) -> dict[str, Any]:
        """The fields its row adds: how the executor makes its values."""
        how, change = self.how(made), self.change(made)
        if isinstance(change, Patched):  # rows replaced (the base is never dequantized)
            return {"rows": change.recipe(source_ids)}
        if change is not None:  # a dequantized base's recipe is the merge's base
            base = None if how is None else dequant_dict(how, source_ids)
            return {"merge": change.recipe(source_ids, base)}
        assert how is not None
        return {"dequant": dequant_dict(how, source_ids)}


@dataclass(frozen=True)
class PlainTensors:
    """A shard as the core holds it (``_core.plan_plain``), and what makes its
    ``PlannedTensor`` objects when something asks for them."""

    shard: _core.PlainShard
    files: list[SourceFile]
    """The files planned: ``shard.picks()`` index them (merging, the adapter's last)."""
    folder: str
    """The weight set's folder, for labels."""
    making: Making | None = None
    """The set's dequantized and merged weights, when it has any."""
    renamed: bool = False
    """Merging: tensors may be named other than their sources (``source_names()``)."""

    def entries(self, picks: list[_core._Pick]) -> list[TensorEntry]:
        """Each tensor's source entry (``picks``: the shard's), named as the set names it."""
        tables = [f.tensors for f in self.files]
        entries = [tables[s][r] for s, r, *_ in picks]
        if self.renamed:
            names = self.shard.source_names()
            pairs = zip(entries, names, strict=True)
            entries = [e if e.name == n else e._replace(name=n) for e, n in pairs]
        return entries

    def made(self) -> list[PlannedTensor]:
        """The tensors as objects (``tests/plan_oracle.py`` makes the same)."""
        picks = self.shard.picks()
        made = [
            planned_at(e, dtype, nbytes, (begin, end), self.folder, role)
            for e, (_, _, dtype, nbytes, begin, end, role) in zip(
                self.entries(picks), picks, strict=True
            )
        ]
        for i, t in self.special():
            made[i] = t
        return made

    def special(self) -> list[tuple[int, PlannedTensor]]:
        """The ``--quantize`` tensors (values and scales), the dequantized and the merged
        ones, with their positions."""
        return list(self._special)

    @cached_property
    def _special(self) -> list[tuple[int, PlannedTensor]]:
        # made once: the fingerprint, the checks and the report each ask (a DeepSeek-V3
        # has some 45k dequantized weights)
        found, made = self.shard.quantized(), dict(self.shard.made())
        if not found and not made:
            return []
        picks, names = self.shard.picks(), self.shard.names()
        entries = self.entries(picks)
        weights = {i: self.made_name(k) for i, k in made.items()}
        out = []
        quantized = {i for i, *_ in found}
        for i, kind, name, shape, block in found:  # a made weight's: made of its values
            k = made.get(i)
            weight = weights.get(i, entries[i].name)
            q = Quantized(kind, name, tuple(shape), block, weight)  # type: ignore[arg-type]
            out.append((i, self.planned(entries[i], picks[i], names[i], k, q)))
        for i, k in made.items():
            if i not in quantized:
                out.append((i, self.planned(entries[i], picks[i], names[i], k)))
        return sorted(out, key=lambda it: it[0])

    def made_name(self, made: int) -> str:
        """The name of the shard's ``made``th made weight."""
        assert self.making is not None, "made tensors come with their making"
        return self.making.name(made)

    def planned(
        self,
        entry: TensorEntry,
        pick: _core._Pick,
        name: str,
        made: int | None,
        quantized: Quantized | None = None,
    ) -> PlannedTensor:
        """A special tensor's object: quantized, made, or both."""
        _, _, dtype, nbytes, begin, end, role = pick
        how = change = None
        if made is not None:
            assert self.making is not None
            how, change = self.making.how(made), self.making.change(made)
        return PlannedTensor(entry, dtype, nbytes, (begin, end), join(self.folder, name),
                             how, role, quantized, change)  # fmt: skip

    def special_at(self) -> set[int]:
        """The positions of ``special()``'s tensors, without making them."""
        return {i for i, *_ in self.shard.quantized()} | {i for i, _ in self.shard.made()}

    def plan_rows(self, source_ids: dict[Path, int]) -> _core.PlainRows:
        """Its rows, a made tensor's recipe made with the plan's ids."""
        made = self.shard.made()
        recipes: list[dict[str, Any]] = []
        if made:
            assert self.making is not None
            recipes = [self.making.recipe(k, source_ids) for _, k in made]
        return self.shard.plan_rows([source_ids[f.path] for f in self.files], recipes)


class PlainColumns(NamedTuple):
    """A shard's plain (neither dequantized nor quantized) tensors as columns."""

    src_dtypes: list[str]
    dtypes: list[str]
    src_nbytes: list[int]


class PlannedShard:
    """One output file; its tensors in data (and header) order, as the core planned
    them (``PlainTensors``): what the conversion reads of them, it reads as columns
    from the core's table, and ``tensors`` makes their objects on first use."""

    __slots__ = ("_columns", "_made", "_plain", "data_bytes", "input_bytes", "metadata", "name")

    def __init__(self, name: str, tensors: PlainTensors, metadata: dict[str, str]) -> None:
        self.name = name
        self.metadata = metadata
        self._plain = tensors
        self._made: list[PlannedTensor] | None = None
        self._columns: PlainColumns | None = None
        self.data_bytes = tensors.shard.data_bytes
        """The bytes of its tensors' data."""
        self.input_bytes = tensors.shard.input_bytes
        """The input bytes its tensors account for (``PlannedTensor.input_nbytes``)."""

    def __repr__(self) -> str:
        return f"PlannedShard({self.name!r}, {len(self)} tensors)"

    def __len__(self) -> int:
        return len(self._plain.shard)

    @property
    def tensors(self) -> list[PlannedTensor]:
        if self._made is None:
            self._made = self._plain.made()
        return self._made

    @property
    def plain(self) -> _core.PlainShard | None:
        """The core's table of its tensors, while no objects were made of them."""
        return self._plain.shard if self._made is None else None

    def source_names(self) -> list[str]:
        """Each tensor's name in its source (as the set names it)."""
        return self._plain.shard.source_names()

    def names(self) -> list[str]:
        """Each tensor's name in the output."""
        return self._plain.shard.names()

    def dtypes(self) -> list[str]:
        """The dtype each tensor is written in."""
        return self._plain.shard.dtypes()

    def digest(self) -> str:
        """A digest of its tensors' source names and the dtypes they are written in,
        for a resumed run's fingerprint (made by the core: a model may have 100k)."""
        return self._plain.shard.digest()

    def numel(self) -> int:
        return self._plain.shard.numel

    def special(self) -> list[tuple[int, PlannedTensor]]:
        """The dequantized, quantized and merged tensors, with their positions."""
        return self._plain.special()

    def plain_columns(self) -> PlainColumns:
        """Its plain tensors' source dtypes, dtypes and source bytes (made once: the
        range check and the report both read them)."""
        if self._columns is None:
            self._columns = PlainColumns(*self._plain.shard.cast_columns())
        return self._columns

    def uncast(self, target: str) -> list[tuple[str, str, str]]:
        """(source name, label, role) of each plain tensor left in a castable dtype other
        than ``target``, its own: kept by ``--keep``, or pinned to fp32."""
        c = self.plain_columns()
        if all(d == target or not is_castable(d) for d in set(c.dtypes)):
            return []  # the usual case, told from the few distinct dtypes
        table, folder = self._plain.shard, self._plain.folder
        names, roles, dtypes = table.names(), table.roles(), table.dtypes()
        special = self._plain.special_at()
        return [
            (names[i], join(folder, names[i]), roles[i])
            for i, d in enumerate(dtypes)
            if d != target and is_castable(d) and i not in special  # the source's own
        ]

    def plan_rows(self, source_ids: dict[Path, int]) -> _core.PlainRows:
        """Its tensors as the executor reads them, straight from the core's table."""
        return self._plain.plan_rows(source_ids)


@dataclass
class SetPlan:
    """The output of one weight set: shards and, when there are several, an index.
    Names are relative to the output (``unet/diffusion_pytorch_model.safetensors``)."""

    key: str
    shards: list[PlannedShard]

    @property
    def index_name(self) -> str | None:
        return f"{self.key}.safetensors.index.json" if len(self.shards) > 1 else None

    def index(self) -> dict[str, Any]:
        """The index json transformers writes: total_size, total_parameters, weight_map."""
        weight_map: dict[str, str] = {}
        for s in self.shards:
            weight_map.update(dict.fromkeys(s.names(), s.name.rpartition("/")[2]))
        return {
            "metadata": {
                "total_size": sum(s.data_bytes for s in self.shards),
                "total_parameters": sum(s.numel() for s in self.shards),
            },
            "weight_map": weight_map,
        }

    def index_json(self) -> str:
        return json.dumps(self.index(), indent=2, sort_keys=True) + "\n"


@dataclass
class ConversionPlan:
    """Everything a conversion will write, before anything is written."""

    dtype: str | None
    """The target; None: every tensor keeps its dtype."""
    shard_size: int
    sets: list[SetPlan]
    sources: list[Path] = field(default_factory=list)

    @property
    def shards(self) -> list[PlannedShard]:
        return [s for p in self.sets for s in p.shards]

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for s in self.shards for t in s.tensors]

    def to_dict(
        self, folder: Path, sizes: dict[Path, int], only: Collection[str] | None = None
    ) -> _core.Plan:
        """The plan as the Rust executor takes it (see the core's plan/wire.rs),
        writing each shard at its name below ``folder``; ``only`` keeps just the shards
        of those names (a resumed run writes the rest)."""
        source_ids = {p: i for i, p in enumerate(self.sources)}
        return {
            "version": _core.PLAN_VERSION,
            "sources": [{"path": str(p), "size": sizes[p]} for p in self.sources],
            "shards": [
                {
                    "name": shard.name,
                    "path": str(folder / shard.name),
                    "metadata": list(shard.metadata.items()),
                    "tensors": shard.plan_rows(source_ids),
                }
                for shard in self.shards
                if only is None or shard.name in only
            ],
        }


def dequant_dict(d: Dequantized, source_ids: dict[Path, int]) -> DequantPlan:
    """How the executor reconstructs a dequantized tensor (see the core's values/dequant/)."""

    def operand(role: str) -> _core.OperandPlan:
        return operand_plan(d.operands[role], source_ids)

    w, p = d.weight, d.weight.params
    if w.kind == "fp8_scaled":
        return {"kind": "fp8_scaled", "scale": operand("scale"), "block": p["block"]}
    if w.kind == "bnb4":
        nested: _core.NestedAbsmaxPlan | None = None
        if "nested_absmax" in d.operands:
            nested = {
                "absmax": operand("nested_absmax"),
                "quant_map": operand("nested_quant_map"),
                "blocksize": p["nested_blocksize"],
                "offset": p["offset"],
            }
        return {
            "kind": "bnb4",
            "absmax": operand("absmax"),
            "quant_map": operand("quant_map"),
            "blocksize": p["blocksize"],
            "nested": nested,
        }
    if w.kind == "int8_rows":
        return {"kind": "int8_rows", "scb": operand("scb")}
    if w.kind == "fp4":
        return {
            "kind": "fp4",
            "scale": operand("scale"),
            "group": p["group"],
            "global_scale": operand("global") if "global" in d.operands else None,
            "divide": p["divide"],
            "transpose": p["transpose"],
            "down": p["down"],
            "positive_zero": p["positive_zero"],
        }
    if w.kind == "ct_int":
        return {
            "kind": "ct_int",
            "scale": operand("scale"),
            "zero_point": operand("zero_point") if "zero_point" in d.operands else None,
            "g_idx": operand("g_idx") if "g_idx" in d.operands else None,
            "bits": p["bits"],
            "group_size": p["group_size"],
        }
    if w.kind == "gptq":
        return {
            "kind": "gptq",
            "qzeros": operand("qzeros"),
            "scales": operand("scales"),
            "g_idx": operand("g_idx") if "g_idx" in d.operands else None,
            "group_size": p["group_size"],
            "bits": p["bits"],
            "zero_plus_one": p["zero_plus_one"],
        }
    return {
        "kind": "awq",
        "qzeros": operand("qzeros"),
        "scales": operand("scales"),
        "group_size": p["group_size"],
        "bits": p["bits"],
    }


def planned(entry: TensorEntry, dtype: str, label: str, role: str) -> PlannedTensor:
    """A tensor written cast to ``dtype`` (or copied, when that is its own)."""
    nbytes = entry.nbytes if dtype == entry.dtype else entry.numel * element_size(dtype)
    # positional: a model may have 100k tensors
    return PlannedTensor(entry, dtype, nbytes, (0, 0), label, None, role)


def planned_at(
    entry: TensorEntry, dtype: str, nbytes: int, offsets: tuple[int, int], folder: str, role: str
) -> PlannedTensor:
    """A tensor of a plain plan (cast or copied), where the core placed it."""
    return PlannedTensor(entry, dtype, nbytes, offsets, join(folder, entry.name), None, role)


class Sized(Protocol):
    """Anything with a byte count: planned tensors, or a benchmark's synthetic specs."""

    @property
    def nbytes(self) -> int: ...


SizedT = TypeVar("SizedT", bound=Sized)


def pack(tensors: list[SizedT], limit: int) -> list[list[SizedT]]:
    """Group tensors into shards exactly as huggingface_hub's splitter does
    (``_core.pack``)."""
    return [[tensors[i] for i in group] for group in _core.pack([t.nbytes for t in tensors], limit)]


def shard_names(prefix: str, count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-00003.safetensors``...
    (``prefix`` may have a folder: ``unet/diffusion_pytorch_model``)."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def refuse_changed(entry: TensorEntry, name: str, adapter: SetMerge | None) -> Change | None:
    """What ``adapter`` does to weight ``name`` (of ``entry``), which ``--quantize``
    quantizes: a refusal where the adapter replaces it or its rows, else its change."""
    if adapter is not None and name in adapter.replaced:
        raise _core.QuantizedModelError(
            f"{entry.file}: the adapter replaces {name} (modules_to_save), which "
            "--quantize would quantize; quantizing a replaced weight is not supported yet "
            "(merge first, then --quantize the output)"
        )
    merged = adapter.merged.get(name) if adapter is not None else None
    if isinstance(merged, Patched):
        raise _core.QuantizedModelError(
            f"{entry.file}: the adapter replaces rows of {name} (trainable tokens), which "
            "--quantize would quantize: not supported yet (merge first, then --quantize)"
        )
    return merged


def plan_set(
    ws: WeightSet,
    dtype: str | None,
    shard_size: int,
    keep: Sequence[str] = (),
    quantized: bool = False,
    dequantize: Mapping[str, QuantizedWeight] | None = None,
    quantize: Sequence[QuantizeTarget] | None = None,
    adapter: SetMerge | None = None,
    *,
    scheme: str | None = None,
) -> SetPlan:
    """One weight set's output, named after the set without its variant.

    ``dequantize`` maps each tensor holding a quantized weight's values to the weight:
    those are written dequantized to ``dtype`` (under the weight's name and shape, in
    the place of the source tensor), and every other quantization-state tensor is left
    out (the output is a plain model). ``quantize`` says what ``--quantize`` makes of
    each tensor (``_plan.quantize.quantize_targets``): a quantized weight is written as its
    e4m3 values and, in the same shard, its scales. ``adapter`` says what
    ``--merge-lora`` does to the set: base weights with the update added, base tensors
    replaced by the adapter's (in the base tensor's dtype, or the target), tensors added
    at the end (in the set's float dtype, or the target). ``scheme`` names the
    ``--quantize`` scheme ``quantize`` was ruled by: the core plans the set by that rule
    (``plain_set``; ``quantize`` only tells it what the adapter must not change)."""
    if quantize is not None and scheme is None:
        raise ValueError("what --quantize makes of each tensor, but not the scheme that ruled it")
    if adapter is not None and quantize is not None:
        weights = {src: w.name for src, w in (dequantize or {}).items()}
        for entry, q in zip(ws.tensors, quantize, strict=True):
            if q.fate == "quantize":
                refuse_changed(entry, weights.get(entry.name, entry.name), adapter)
    return plain_set(ws, dtype, shard_size, keep, quantized, scheme, dequantize, adapter)


def added(ws: WeightSet, adapter: SetMerge | None, dtype: str | None) -> list[PlannedTensor]:
    """The tensors an adapter adds to the set (an output head of its own), in ``dtype``
    or, without one, the float dtype holding most of the set's bytes."""
    if adapter is None or not adapter.added:
        return []
    if dtype is None:
        dtype = dominant_float((e.dtype, e.nbytes) for e in ws.tensors)
    return [
        planned(e, dtype if dtype and is_castable(e.dtype) else e.dtype,
                join(ws.folder, e.name), "plain")
        for e in adapter.added
    ]  # fmt: skip


def plain_set(
    ws: WeightSet,
    dtype: str | None,
    shard_size: int,
    keep: Sequence[str] = (),
    quantized: bool = False,
    scheme: str | None = None,
    dequantize: Mapping[str, QuantizedWeight] | None = None,
    adapter: SetMerge | None = None,
) -> SetPlan:
    """A weight set with every tensor cast, copied, quantized, dequantized or merged
    (safetensors or torch.save files; ``quantized``: its quantization state kept as it
    is; ``scheme``: quantized by ``--quantize scheme``; ``dequantize``: those weights
    written dequantized; ``adapter``: merged, as ``plan_set`` says): planned by the core
    (``_core.plan_plain``) without an object per tensor (a model may have 100k)."""
    tables = [f.entries for f in ws.files]
    made = None
    if dequantize is not None:
        assert dtype is not None, "dequantizing needs a target"
        at = {name: i for i, name in enumerate(ws.names())}
        made = [(at[src], w.name, list(w.shape), dtype) for src, w in dequantize.items()]
    files, merge, making = ws.files, None, None
    if adapter is not None:  # its Making holds the dequantized weights' too
        merge = MergeRequest.of(ws, adapter, dtype, dequantize)
        files, making = [*ws.files, merge.file], merge.making
        tables.append(merge.file.entries)
    elif dequantize is not None:
        making = Making(ws.files, list(dequantize.values()))
    shards = _core.plan_plain(
        tables, dtype, list(keep), shard_size, quantized=quantized, quantize=scheme,
        dequantize=made, merged=None if merge is None else merge.merged,
        view=None if merge is None else merge.view,
    )  # fmt: skip
    metadata = {"format": "pt", **ws.metadata}
    names = shard_names(ws.key, len(shards))
    renamed = merge is not None
    return SetPlan(
        ws.key,
        [
            PlannedShard(n, PlainTensors(s, files, ws.folder, making, renamed), dict(metadata))
            for n, s in zip(names, shards, strict=True)
        ],
    )


@dataclass(frozen=True)
class MergeRequest:
    """What the core is told of a set an adapter is merged into (``_core.plan_plain``'s
    ``view`` and ``merged``), the adapter's file the last of its sources."""

    file: SourceFile
    view: tuple[list[tuple[int, int, int, int, str | None]], list[tuple[int, int, str, str]]]
    merged: list[tuple[int, str, list[int]]]
    making: Making

    @classmethod
    def of(
        cls,
        ws: WeightSet,
        adapter: SetMerge,
        dtype: str | None,
        dequantize: Mapping[str, QuantizedWeight] | None,
    ) -> MergeRequest:
        """The set's tensors as the output names them (its layers stacked again), the
        adapter's replacing some, its own added at the end; its merged weights (a
        dequantized one's change goes with its ``dequantize`` recipe)."""
        assert adapter.file is not None, "the adapter's file"
        assert adapter.layers is None or not dequantize, "refused by plan_merge"
        own = len(ws.files)  # the adapter's file, among the sources
        rows = {(t.offsets, t.dtype, t.shape): r for r, t in enumerate(adapter.file.tensors)}
        base = [(s, r) for s, f in enumerate(ws.files) for r in range(len(f.entries))]
        names = ws.names()
        order = list(enumerate(names)) if adapter.layers is None else adapter.layers.order(names)
        weights = list((dequantize or {}).values())
        made = {w.name for w in weights}
        members, merged, changes = [], [], []
        for j, (i, name) in enumerate(order):
            s, r = base[i]
            values, renamed = (s, r), (None if name == names[i] else name)
            if (e := adapter.replaced.get(name)) is not None:
                values, renamed = (own, rows[e.offsets, e.dtype, e.shape]), name
            members.append((s, r, *values, renamed))
            change = adapter.merged.get(name)
            if change is not None and name not in made:
                shape = ws.files[s].tensors[r].shape if e is None else e.shape
                merged.append((j, name, list(shape)))
                changes.append((name, change))
        extra = [  # in the dtype ``added`` gives them (verify reads the same rule)
            (own, rows[t.entry.offsets, t.entry.dtype, t.entry.shape], t.entry.name, t.dtype)
            for t in added(ws, adapter, dtype)
        ]
        mine = {w.name: adapter.merged[w.name] for w in weights if w.name in adapter.merged}
        making = Making(ws.files, weights, mine, changes)
        return cls(adapter.file, (members, extra), merged, making)


def plan_conversion(
    model: ModelFolder,
    dtype: str | None,
    shard_size: int,
    keep: Sequence[str] = (),
    quantized: bool = False,
    dequantize: Mapping[tuple[str, str], QuantizedWeight] | None = None,
    quantize: Mapping[str, Sequence[QuantizeTarget]] | None = None,
    *,
    merging: Merging | None = None,
    scheme: str | None = None,
) -> ConversionPlan:
    """Plan the output of every weight set of ``model``; ``quantized`` leaves every
    quantization-state tensor as it is, ``dequantize`` ((set key, source tensor) ->
    quantized weight) writes those weights dequantized and the rest of the state not at
    all, ``quantize`` (set key -> what ``--quantize`` makes of each tensor) writes fp8
    weights with their scales (``scheme``: the ``--quantize`` scheme that ruled it),
    ``merging`` the updates and replacements of a LoRA adapter (``_plan.merge``).

    >>> # plan_conversion(open_model("model/"), "BF16", parse_size("5GB"), keep=["*norm*"])
    """
    sets = [
        plan_set(
            ws, dtype, shard_size, keep, quantized,
            None if dequantize is None
            else {name: how for (key, name), how in dequantize.items() if key == ws.key},
            None if quantize is None else quantize[ws.key],
            for_set(merging, ws.key), scheme=scheme,
        )
        for ws in model.weight_sets
    ]  # fmt: skip
    written: dict[str, str] = {}
    for sp in sets:
        for name in [s.name for s in sp.shards] + ([sp.index_name] if sp.index_name else []):
            if name in written:
                raise _core.ModelFolderError(
                    f"{model.root}: weight sets {written[name]!r} and {sp.key!r} would both "
                    f"write {name}"
                )
            written[name] = sp.key
    paths = [f.path for ws in model.weight_sets for f in ws.files]
    if merging is not None:
        paths.append(merging.adapter.file.path)
    sources = list(dict.fromkeys(paths))
    return ConversionPlan(dtype, shard_size, sets, sources)
