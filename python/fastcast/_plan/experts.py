"""LoRA on parameters (``target_parameters``, PEFT's ``ParamWrapper``): which base
tensors each wrapped parameter's update goes to, and how its rows lie there.

PEFT wraps a parameter, typically a mixture of experts' stacked weights, rather than a
module. Its ``lora_A`` is ``[E * r, in]``, grouped by expert, its ``lora_B`` ``[out,
r * E]`` with the experts interleaved, and expert ``e``'s update is ``B_e @ A_e``
(``einsum("o r e, e r i -> e o i")``), laid ``[E, out, in]``, or ``[E, in, out]`` when the
experts class says ``is_transposed`` (``"e i o"``). A 2-D parameter is updated as a
Linear's weight. The adapter's keys do not name the parameter (two wrapped on one
module nest, the inner one's tensors under ``base_layer.``): the parameter is the one of
the module's targeted ones whose shape the update fits, and one fitting two is refused.

Where a base stores the experts one by one (transformers' checkpoints of Qwen-MoE,
DeepSeek, OLMoE, Mixtral...; it stacks them on load and splits them again on save), each
expert's ``gate_proj`` and ``up_proj`` rows are its slice of ``gate_up_proj``'s update
(gate first, as transformers concatenates them) and its ``down_proj`` is its
``down_proj``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from fastcast._core import ModelFolderError
from fastcast._source.adapter import Adapter, LoraModule, scaling
from fastcast._source.entries import TensorEntry

#: Model types whose stacked experts are ``[E, in, out]``: transformers' experts classes
#: declared ``@use_experts_implementation(is_transposed=True)`` (PEFT reads
#: ``is_transposed``; a test checks this list against the installed transformers).
TRANSPOSED = frozenset({"gpt_oss", "aria", "aria_text", "ergo", "openai_privacy_filter"})
#: Experts stored one by one: the stacked parameter -> the per-expert weights whose rows
#: it concatenates, for each naming (the module path's rename, the parts).
SPLIT = (
    (("", ""), {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
    ((".mlp.", ".block_sparse_moe."), {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
)


@dataclass(frozen=True)
class Stacked:
    """Where an output tensor's rows lie in a stacked parameter's update, which is
    ``[experts * expert_rows, cols]`` flattened: from ``first_row`` on."""

    experts: int
    expert_rows: int
    first_row: int = 0


@dataclass(frozen=True)
class Piece:
    """A base tensor holding rows of a parameter's update."""

    key: str
    entry: TensorEntry
    stacked: Stacked


@dataclass(frozen=True)
class Parameter:
    """A parameter the base holds, as PEFT's ``ParamWrapper`` sees it."""

    name: str
    """``<module>.<parameter>``: what ``rank_pattern``/``alpha_pattern`` match."""
    experts: int
    ins: int
    outs: int
    transpose: bool
    pieces: tuple[Piece, ...]


Where = Mapping[str, tuple[str, TensorEntry]]


def stacked(name: str, key: str, e: TensorEntry, model_type: str) -> list[Parameter]:
    """The ways a parameter stored whole may be updated: ``[out, in]`` when 2-D; when
    3-D as its experts class lays it, or (not square) as its shape alone allows."""
    shape = tuple(e.shape)
    if len(shape) == 2:
        return [Parameter(name, 1, shape[1], shape[0], False, (Piece(key, e, Stacked(1, 0)),))]
    if len(shape) != 3:
        return []
    experts, d1, d2 = shape
    if experts == 0:
        return []  # no expert to update: fits nothing, refused by name
    ways = [model_type in TRANSPOSED] if d1 == d2 else [False, True]
    found = []
    for transpose in ways:
        if transpose and experts == 1:
            continue  # PEFT adds an untransposed [out, in] update there: refused (fits none)
        ins, outs = (d1, d2) if transpose else (d2, d1)
        found.append(Parameter(name, experts, ins, outs, transpose,
                               (Piece(key, e, Stacked(experts, d1)),)))  # fmt: skip
    return found


def split(module: str, parameter: str, where: Where) -> list[Parameter]:
    """The parameter of a base that stores its experts one by one, if it does."""
    for (old, new), layouts in SPLIT:
        parts = layouts.get(parameter)
        owner = module.replace(old, new) if old else module
        if parts is None or f"{owner}.0.{parts[0]}.weight" not in where:
            continue
        experts: list[list[tuple[str, TensorEntry]]] = []
        while f"{owner}.{len(experts)}.{parts[0]}.weight" in where:
            names = [f"{owner}.{len(experts)}.{p}.weight" for p in parts]
            if any(n not in where for n in names):
                raise ModelFolderError(
                    f"the base's experts of {owner} are not all whole: no "
                    f"{next(n for n in names if n not in where)}"
                )
            experts.append([where[n] for n in names])
        shapes = {tuple(tuple(e.shape) for _, e in expert) for expert in experts}
        first = experts[0]
        if len(shapes) != 1 or any(len(e.shape) != 2 for _, e in first):
            raise ModelFolderError(f"the base's experts of {owner} differ in their shapes")
        ins = first[0][1].shape[1]
        if any(e.shape[1] != ins for _, e in first):
            raise ModelFolderError(f"the base's {' and '.join(parts)} of {owner} differ in width")
        rows = sum(e.shape[0] for _, e in first)
        pieces = []
        for i, expert in enumerate(experts):
            offset = i * rows
            for key, e in expert:
                pieces.append(Piece(key, e, Stacked(len(experts), rows, offset)))
                offset += e.shape[0]
        return [Parameter(f"{module}.{parameter}", len(experts), ins, rows, False, tuple(pieces))]
    return []


def fits(m: LoraModule, p: Parameter) -> bool:
    """Whether ``m``'s ``lora_A`` and ``lora_B`` are an update of ``p``."""
    stacked_rank, ins = m.a.shape
    outs, columns = m.b.shape
    return (
        (ins, outs) == (p.ins, p.outs)
        and stacked_rank == columns
        and (stacked_rank % p.experts == 0)
    )


def parameter_updates(
    adapter: Adapter, where: Where, model_type: str
) -> list[tuple[LoraModule, Parameter]]:
    """Each of ``adapter``'s parameter updates with the base parameter it updates, its
    rank and scale settled (``rank_pattern`` keys match ``<module>.<parameter>``)."""
    wrappers: dict[str, list[LoraModule]] = {}
    for m in adapter.modules.values():
        if m.parameters:
            wrappers.setdefault(m.module, []).append(m)
    found = []
    for module, ms in wrappers.items():
        held = []
        for parameter in ms[0].parameters:
            name = f"{module}.{parameter}"
            if name in where:
                key, e = where[name]
                held += stacked(name, key, e, model_type)
            else:
                held += split(module, parameter, where)
        taken: set[str] = set()
        for m in sorted(ms, key=lambda m: m.depth):
            p = fitting(adapter, m, held)
            if p.name in taken:
                raise ModelFolderError(f"{adapter.given}: module {module}: two updates of {p.name}")
            taken.add(p.name)
            r, alpha, scale = scaling(adapter.config, p.name)
            if r * p.experts != m.a.shape[0]:
                raise ModelFolderError(
                    f"{adapter.given}: {p.name}: lora_A {list(m.a.shape)} is not rank {r} "
                    f"for each of its {p.experts} experts, as the config says"
                )
            found.append((replace(m, rank=r, alpha=alpha, scale=scale), p))
    return found


def fitting(adapter: Adapter, m: LoraModule, held: list[Parameter]) -> Parameter:
    """The one parameter of ``held`` ``m`` is an update of, or a refusal naming it."""
    fit = [p for p in held if fits(m, p)]
    if len(fit) == 1:
        return fit[0]
    shapes = f"lora_A {list(m.a.shape)} and lora_B {list(m.b.shape)}"
    names = [f"{m.module}.{p}" for p in m.parameters]
    if not held:
        raise ModelFolderError(
            f"{adapter.given}: the adapter updates {' or '.join(names)}, which the base "
            "does not have (an adapter for another model?)"
        )
    if not fit:
        raise ModelFolderError(
            f"{adapter.given}: module {m.module}: {shapes} fit none of "
            f"{', '.join(sorted({p.name for p in held}))} in the base (an adapter for "
            "another model or size?)"
        )
    raise ModelFolderError(
        f"{adapter.given}: module {m.module}: {shapes} fit both "
        f"{' and '.join(sorted({p.name for p in fit}))}: which one it updates is not known"
    )
