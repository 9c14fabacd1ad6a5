"""``--merge-lora``: which base tensors an adapter updates or replaces, and how.

Each module of the adapter is matched to its base weight ``<module>.weight`` in the
model's weight sets, and the orientation of its update follows the module's type, as
PEFT's does: ``B @ A`` for ``nn.Linear`` (``[out, in]``), transposed for transformers'
``Conv1D`` (``[in, out]``: GPT-2's ``c_attn``/``c_proj``/``c_fc``, whatever the config's
``fan_in_fan_out`` says) and for embeddings. The module type is read from the model
type, never guessed from shapes: GPT-2's ``c_proj`` is square.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcast._core import ModelFolderError
from fastcast._dtypes import is_castable
from fastcast._plan.dequantize import QuantizedWeight
from fastcast._plan.experts import Stacked, parameter_updates
from fastcast._plan.layers import Replication, replication
from fastcast._plan.wire import operand_plan
from fastcast._source.adapter import Adapter, LoraModule, TokenRows
from fastcast._source.config import CONFIG_NAME, read_config
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import ModelFolder, SourceFile

if TYPE_CHECKING:
    from fastcast import _core
    from fastcast._plan.wire import DequantPlan

#: Model types whose layers of these names are transformers' ``Conv1D`` (weight
#: ``[in, out]``), from transformers' modeling files.
CONV1D = {
    "gpt2": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "openai-gpt": {"c_attn", "c_proj", "c_fc"},
    "imagegpt": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "decision_transformer": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "clvp_decoder": {"c_fc", "c_proj"},
}


@dataclass(frozen=True)
class Merged:
    """How a merged weight's values are made: its base values plus the module's
    update, in fp32, rounded once."""

    lora: LoraModule
    transpose: bool
    bias: bool = False
    """The module's bias (``lora_bias``): ``b + scale · lora_B.bias``."""
    stacked: Stacked | None = None
    """LoRA on a parameter (``target_parameters``): where the weight's rows lie in the
    parameter's update (``_plan/experts.py``)."""

    def describe(self) -> dict[str, Any]:
        """Everything that decides its values, JSON-ready (for fingerprints)."""
        m = self.lora
        if self.bias:
            assert m.bias is not None
            return {"kind": "merge", "bias": [m.bias.name, m.bias.offsets], "scale": m.scale}
        described = {
            "kind": "merge",
            "a": [m.a.name, m.a.offsets],
            "b": [m.b.name, m.b.offsets],
            "scale": m.scale,
            "transpose": self.transpose,
            "dora": m.magnitude is not None,
        }
        if self.stacked is not None:
            s = self.stacked
            described["stacked"] = [s.experts, s.expert_rows, s.first_row]
        return described

    def recipe(
        self, source_ids: dict[Path, int], base: DequantPlan | None = None
    ) -> _core.MergePlan:
        """The executor's recipe (the core's ``values/merge.rs``); ``base``: a quantized
        base weight's dequantization."""
        m = self.lora
        if self.bias:  # rank 1 and A = [[1]]: the core's bias merge
            assert m.bias is not None
            return {"base": base, "a": None, "b": operand_plan(m.bias, source_ids),
                    "scale": m.scale, "transpose": False, "magnitude": None}  # fmt: skip
        plan: _core.MergePlan = {
            "base": base,
            "a": operand_plan(m.a, source_ids),
            "b": operand_plan(m.b, source_ids),
            "scale": m.scale,
            "transpose": self.transpose,
            "magnitude": None if m.magnitude is None else operand_plan(m.magnitude, source_ids),
        }
        if self.stacked is not None:
            plan["experts"] = self.stacked.experts
            plan["expert_rows"] = self.stacked.expert_rows
            plan["first_row"] = self.stacked.first_row
        return plan


@dataclass(frozen=True)
class Patched:
    """An embedding whose trainable tokens' rows the adapter replaces (PEFT's
    ``index_copy``): each row the base's or the adapter's, cast to the output dtype."""

    tokens: TokenRows

    def describe(self) -> dict[str, Any]:
        """Everything that decides its values, JSON-ready (for fingerprints)."""
        d = self.tokens.delta
        return {"kind": "rows", "rows": [d.name, d.offsets], "indices": list(self.tokens.indices)}

    def recipe(self, source_ids: dict[Path, int]) -> _core.RowsPlan:
        """The executor's recipe (the core's ``values/rows.rs``)."""
        return {
            "rows": operand_plan(self.tokens.delta, source_ids),
            "indices": list(self.tokens.indices),
        }


#: What an adapter makes of a base tensor's values.
Change = Merged | Patched


@dataclass(frozen=True)
class Merging:
    """What an adapter does to a model, by (weight set key, base tensor name)."""

    adapter: Adapter
    merged: dict[tuple[str, str], Change]
    replaced: dict[tuple[str, str], TensorEntry]
    """Base tensors whose values the adapter's replace (and, if also ``merged``, are
    what its update is added to); a resized embedding's rows may differ."""
    added: dict[tuple[str, str], TensorEntry] = field(default_factory=dict)
    """Tensors the base does not hold: the output head of a base that ties it to the
    embeddings, trained apart (``modules_to_save=["lm_head"]``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keys of the base's config.json the merge changes: ``vocab_size`` (a resized
    vocabulary), ``tie_word_embeddings`` (an output head of its own),
    ``num_hidden_layers`` (``layer_replication``)."""
    layers: dict[str, Replication] = field(default_factory=dict)
    """``layer_replication``: the weight set (by key) whose layers the output stacks
    again, and how (``_plan/layers.py``)."""


@dataclass(frozen=True)
class SetMerge:
    """What an adapter does to one weight set, by tensor name."""

    merged: dict[str, Change]
    replaced: dict[str, TensorEntry]
    added: list[TensorEntry]
    layers: Replication | None = None
    """``layer_replication``: the output's layers, made of the set's."""
    file: SourceFile | None = None
    """The adapter's weights file (its replacements and added tensors are read there)."""

    def tensors(self, tensors: list[TensorEntry]) -> list[TensorEntry]:
        """The set's ``tensors`` as the output names them (its layers stacked again)."""
        return tensors if self.layers is None else self.layers.remap(tensors)


def for_set(merging: Merging | None, key: str) -> SetMerge | None:
    """``merging``'s part in the weight set ``key``."""
    if merging is None:
        return None
    return SetMerge(
        {name: how for (k, name), how in merging.merged.items() if k == key},
        {name: e for (k, name), e in merging.replaced.items() if k == key},
        [e for (k, _), e in merging.added.items() if k == key],
        merging.layers.get(key),
        merging.adapter.file,
    )


def plan_merge(
    folder: ModelFolder,
    adapter: Adapter,
    dequantized: Mapping[tuple[str, str], QuantizedWeight] | None = None,
) -> Merging:
    """Match every module and replacement of ``adapter`` to the base tensor it changes,
    refusing (by module) what does not fit: a missing weight, another shape, a base
    weight that is not a float. The base's config.json decides its Conv1D layers (the
    model type) and whether a head is added (its ties). ``dequantized`` ((set key,
    source tensor) -> weight): a quantized base's weights, matched under their
    dequantized names and shapes."""
    path = folder.root / CONFIG_NAME
    config = read_config(path) if path.is_file() else {}
    where: dict[str, tuple[str, TensorEntry]] = {}
    for (key, _), w in (dequantized or {}).items():
        # what --dequantize writes: the weight's name and shape, computed in fp32
        where[w.name] = (key, TensorEntry(w.name, "F32", w.shape, folder.root, (0, 0)))
    tensors = {ws.key: ws.tensors for ws in folder.weight_sets}
    names = {key: [e.name for e in es] for key, es in tensors.items()}
    replicated = replication(adapter.config.get("layer_replication"), adapter.given, names, config)
    if replicated is not None:
        if dequantized:
            raise ModelFolderError(
                f"{adapter.given}: layer_replication into a quantized base is not merged "
                "yet (dequantize it first: --dequantize --dtype fp32)"
            )
        tensors[replicated[0]] = replicated[1].remap(tensors[replicated[0]])
    sets_of: dict[str, list[str]] = {}
    for key, es in tensors.items():
        for e in es:
            where.setdefault(e.name, (key, e))
            sets_of.setdefault(e.name, []).append(key)
    modules = [m for m in adapter.modules.values() if not m.parameters]
    for name in [*(m.weight for m in modules), *adapter.replaces]:
        if len(keys := sets_of.get(name, [])) > 1:  # two components, one tensor name
            raise ModelFolderError(
                f"{adapter.given}: the adapter changes {name}, which weight sets "
                f"{' and '.join(map(repr, keys))} of the base both hold: merge it into the "
                "component's own folder"
            )
    merging = replacements(folder, adapter, config, where)
    if replicated is not None:
        merging.layers[replicated[0]] = replicated[1]
        merging.config.update(replicated[1].config(config))
    # A replaced tensor that is also updated (an embedding PEFT saved as
    # ``base_layer.weight`` beside its LoRA): the update is added to the replacement,
    # as PEFT loads it into the model before it merges (the plan reads both).
    for key, name in merging.replaced:
        where[name] = (key, merging.replaced[key, name])
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else ""
    conv1d = CONV1D.get(model_type, set())
    for m in modules:
        key, base = found(where, m.weight, adapter)
        merging.merged[key, base.name] = update(adapter, m, base, conv1d)
        if m.bias is not None:
            key, bias = base_bias(where, m, adapter)
            merging.merged[key, bias.name] = Merged(m, transpose=False, bias=True)
    merge_parameters(merging, adapter, where, model_type)
    patch_tokens(merging, adapter, where, {w.name for w in (dequantized or {}).values()})
    return merging


def merge_parameters(
    merging: Merging, adapter: Adapter, where: dict[str, tuple[str, TensorEntry]], model_type: str
) -> None:
    """The adapter's LoRA on parameters (``target_parameters``), into ``merging``: each
    base tensor a parameter's update lands on (``_plan/experts.py``)."""
    for m, p in parameter_updates(adapter, where, model_type):
        for piece in p.pieces:
            float_base(piece.entry)
            if (piece.key, piece.entry.name) in merging.merged:
                raise ModelFolderError(
                    f"{adapter.given}: {piece.entry.name} is updated twice (by module "
                    f"{m.module} and as {p.name})"
                )
            merging.merged[piece.key, piece.entry.name] = Merged(
                m, p.transpose, stacked=piece.stacked
            )


def patch_tokens(
    merging: Merging,
    adapter: Adapter,
    where: dict[str, tuple[str, TensorEntry]],
    quantized: set[str],
) -> None:
    """The adapter's trainable tokens, into ``merging``, checked against their embedding
    (``quantized``: the base's dequantized weights, whose rows are not patched yet)."""
    for tokens in adapter.tokens.values():
        key, base = found(where, tokens.weight, adapter)
        if base.name in quantized:
            raise ModelFolderError(
                f"{adapter.given}: trainable tokens of {base.name}, a quantized weight, are "
                "not merged yet"
            )
        if (key, base.name) in merging.merged or (key, base.name) in merging.replaced:
            raise ModelFolderError(
                f"{adapter.given}: {base.name} has trainable tokens and is also updated or "
                "replaced by the adapter (PEFT trains an embedding one way only)"
            )
        rows = base.shape[0] if len(base.shape) == 2 else 0
        if (
            not is_castable(base.dtype)
            or len(base.shape) != 2
            or (tokens.delta.shape[1] != base.shape[1] or max(tokens.indices) >= rows)
        ):
            raise ModelFolderError(
                f"{adapter.given}: trainable tokens {list(tokens.indices)[:4]}... of "
                f"{list(tokens.delta.shape)} do not fit the base's {base.name} "
                f"({base.dtype} {list(base.shape)})"
            )
        merging.merged[key, base.name] = Patched(tokens)


def base_bias(
    where: dict[str, tuple[str, TensorEntry]], m: LoraModule, adapter: Adapter
) -> tuple[str, TensorEntry]:
    """The base bias ``lora_bias`` updates, checked: present (PEFT cannot merge a
    ``lora_bias`` into a layer without one either), a float of ``lora_B``'s rows."""
    assert m.bias is not None
    if m.base_bias not in where:
        raise ModelFolderError(
            f"{adapter.given}: module {m.module} has a trained bias (lora_bias) but the "
            f"base has no {m.base_bias} to add it to"
        )
    key, bias = where[m.base_bias]
    if not is_castable(bias.dtype) or tuple(bias.shape) != tuple(m.bias.shape):
        raise ModelFolderError(
            f"{adapter.given}: module {m.module}: lora_B.bias {list(m.bias.shape)} does not "
            f"fit the base's {bias.name} ({bias.dtype} {list(bias.shape)})"
        )
    return key, bias


def float_base(base: TensorEntry) -> None:
    """Refuse a base weight that is not a float (a quantized one not dequantized)."""
    if not is_castable(base.dtype):
        raise ModelFolderError(
            f"{base.file}: {base.name} is {base.dtype}, not a float weight (a "
            "quantized base is merged with --dequantize --dtype DTYPE)"
        )


def update(adapter: Adapter, m: LoraModule, base: TensorEntry, conv1d: set[str]) -> Merged:
    """Module ``m``'s update of ``base``, its orientation by the module's type."""
    float_base(base)
    transpose = m.embedding or m.module.rpartition(".")[2] in conv1d
    a, b = m.a.shape, m.b.shape
    fits = (a[1], b[0]) if transpose else (b[0], a[1])
    if tuple(base.shape) != fits:
        raise ModelFolderError(
            f"{adapter.given}: module {m.module}: lora_A {list(a)} and lora_B {list(b)} "
            f"do not fit the base's {base.name} {list(base.shape)} (an adapter for "
            "another model or size?)"
        )
    if m.magnitude is not None and tuple(m.magnitude.shape) != (b[0],):
        raise ModelFolderError(
            f"{adapter.given}: module {m.module}: lora_magnitude_vector "
            f"{list(m.magnitude.shape)} does not fit lora_B {list(b)}"
        )
    return Merged(m, transpose)


def replacements(
    folder: ModelFolder,
    adapter: Adapter,
    config: dict[str, Any],
    where: dict[str, tuple[str, TensorEntry]],
) -> Merging:
    """The adapter's replacements matched to the base: same shape, or (a resized
    vocabulary) more or fewer rows; an output head the base ties to its embeddings,
    added (``tie_word_embeddings`` then false)."""
    merging = Merging(adapter, {}, {})
    tied = config.get("tie_word_embeddings", True) is not False
    for name, entry in adapter.replaces.items():
        if name not in where and tied and name.rpartition(".")[0].endswith("lm_head"):
            key = folder.weight_sets[0].key if folder.weight_sets else "model"
            merging.added[key, name] = entry
            merging.config["tie_word_embeddings"] = False
            continue
        key, base = found(where, name, adapter)
        if not is_castable(entry.dtype) or not is_castable(base.dtype):
            raise ModelFolderError(
                f"{adapter.given}: {name}: replacing a {base.dtype} tensor with a "
                f"{entry.dtype} one is not supported"
            )
        if tuple(base.shape) != tuple(entry.shape):
            if len(entry.shape) != 2 or tuple(base.shape[1:]) != tuple(entry.shape[1:]):
                raise ModelFolderError(
                    f"{adapter.given}: {name} is {list(entry.shape)} in the adapter but "
                    f"{list(base.shape)} in the base (an adapter for another model?)"
                )
            merging.config["vocab_size"] = entry.shape[0]  # a resized embedding or head
        merging.replaced[key, name] = entry
    return merging


def found(
    where: dict[str, tuple[str, TensorEntry]], name: str, adapter: Adapter
) -> tuple[str, TensorEntry]:
    """The weight set and base tensor of ``name``, or a refusal naming it."""
    if name not in where:
        raise ModelFolderError(
            f"{adapter.given}: the adapter changes {name}, which the base does not have "
            "(an adapter for another model?)"
        )
    return where[name]
