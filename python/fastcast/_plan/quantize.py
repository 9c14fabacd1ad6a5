"""``--quantize``: what it makes of each tensor of a plain model (the core's rule) and
the quantization_config it writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fastcast import _core
from fastcast._dtypes import COMPUTE_DTYPES, short_name
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import ModelFolder
from fastcast._source.quantization import SURVIVING_ROLES, Quantization

if TYPE_CHECKING:
    from fastcast._plan.dequantize import QuantizedWeight

#: What each ``--quantize`` scheme writes as ``quant_method``.
QUANTIZE_METHODS = {"fp8": "fp8", "fp8-channel": "compressed-tensors"}
#: The compressed-tensors release whose serialisation of ``FP8_DYNAMIC`` the
#: ``fp8-channel`` config reproduces, key for key (compressed-tensors itself is not
#: needed to write it).
CT_VERSION = "0.20.0"
#: Fates of decoder Linears left unquantized, which the config must list.
UNQUANTIZED_FATES = _core.UNQUANTIZED_FATES
#: ``--dequantize --quantize``: the fate of quantization state the dequantization
#: consumes (left out of the output, as ``--dequantize`` leaves it).
CONSUMED = "consumed"


@dataclass(frozen=True)
class QuantizeTarget:
    """What ``--quantize`` makes of one tensor of the plain source (the core's rule,
    ``_core.quantize_targets``).

    >>> QuantizeTarget("F8_E4M3", "quantize", (128, 128),
    ...                ("x.weight_scale_inv", (2, 2))).scale_name
    'x.weight_scale_inv'
    """

    dtype: str
    fate: str
    """``quantize``, ``misfit``, ``fused misfit``, ``kept``, ``router`` or ``other``."""
    block: tuple[int, int] | None
    scale: tuple[str, tuple[int, ...]] | None
    """For a quantized weight: its F32 scale tensor's name and shape."""

    @property
    def scale_name(self) -> str:
        assert self.scale is not None
        return self.scale[0]


def quantize_targets(
    tensors: Sequence[TensorEntry], target: str | None, keep: Sequence[str], scheme: str
) -> list[QuantizeTarget]:
    """What ``--quantize scheme`` makes of each of ``tensors`` (one weight set), converting
    the rest to ``target`` (None: each keeps its dtype): the core's rule, the one convert
    and verify both follow."""
    return targets_of([(t.name, t.dtype, list(t.shape)) for t in tensors], target, keep, scheme)


def targets_of(
    tensors: Sequence[tuple[str, str, list[int]]],
    target: str | None,
    keep: Sequence[str],
    scheme: str,
) -> list[QuantizeTarget]:
    """``quantize_targets`` of tensors given as (name, dtype, shape)."""
    found = _core.quantize_targets(list(tensors), target, list(keep), scheme)
    return [
        QuantizeTarget(dtype, fate, block, None if scale is None else (scale[0], tuple(scale[1])))
        for dtype, fate, block, scale in found
    ]


def requantize_targets(
    tensors: Sequence[TensorEntry],
    weights: Mapping[str, QuantizedWeight],
    target: str,
    keep: Sequence[str],
    scheme: str,
) -> list[QuantizeTarget]:
    """``--dequantize --quantize``: what ``--quantize scheme`` makes of each of
    ``tensors`` (one set of a quantized model), ruled on the plain set ``--dequantize
    --dtype target`` writes (the core's rule, as for a plain model). ``weights`` maps
    each tensor holding a quantized weight's values to the weight: quantized under the
    weight's name and shape, or else written dequantized in ``target``; the state the
    dequantization consumes is ``CONSUMED``; every other tensor keeps the dtype
    ``--dequantize`` gives it (a tensor the model pins in fp32 stays fp32)."""
    names, dtypes = [t.name for t in tensors], [t.dtype for t in tensors]
    roles = _core.quant_roles(names, dtypes)
    written = _core.target_dtypes(list(zip(names, dtypes, strict=True)), target, list(keep),
                                  quantized=True)  # fmt: skip
    plain: list[tuple[str, str, list[int]]] = []
    at: list[int] = []
    for i, (t, role) in enumerate(zip(tensors, roles, strict=True)):
        w = weights.get(t.name)
        if w is not None or role in SURVIVING_ROLES:
            if w is not None:
                plain.append((w.name, target, list(w.shape)))
            else:
                plain.append((t.name, written[i], list(t.shape)))
            at.append(i)
    found = [QuantizeTarget(t.dtype, CONSUMED, None, None) for t in tensors]
    for i, q in zip(at, targets_of(plain, target, keep, scheme), strict=True):
        if q.fate != "quantize":  # as --dequantize writes it
            q = replace(q, dtype=target if tensors[i].name in weights else written[i])
        found[i] = q
    return found


def unquantized_modules(names: Sequence[str], targets: Sequence[QuantizeTarget]) -> list[str]:
    """The Linear modules a ``--quantize`` output leaves unquantized, as its config lists
    them (``modules_to_not_convert``, ``ignored_layers``, ``ignore``): ``lm_head``, then
    every decoder Linear that misfits, is kept or is a router gate, in model order."""
    modules = [
        name.removesuffix(".weight")
        for name, t in zip(names, targets, strict=True)
        if t.fate in UNQUANTIZED_FATES
    ]
    return ["lm_head", *(m for m in modules if m != "lm_head")]


def quantize_config(scheme: str, unquantized: Sequence[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a ``--quantize`` output.

    ``fp8``: DeepSeek/FineGrained block fp8, with the skipped modules under the names
    transformers (``modules_to_not_convert``) and vLLM (``ignored_layers``) read.
    ``fp8-channel``: compressed-tensors' ``FP8_DYNAMIC`` preset exactly as
    compressed-tensors serialises it (``ModelCompressor.update_config``), ``ignore``
    listing the skipped modules.

    >>> quantize_config("fp8", ["lm_head"])["weight_block_size"]
    [128, 128]
    """
    skipped = list(unquantized)
    if scheme == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [_core.FP8_BLOCK, _core.FP8_BLOCK],
            "modules_to_not_convert": skipped,
            "ignored_layers": list(skipped),
        }
    float8 = {"group_size": None, "num_bits": 8, "symmetric": True, "type": "float"}
    return {
        "config_groups": {
            "group_0": {
                "format": None,
                "input_activations": {"dynamic": True, **float8, "strategy": "token"},
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {"dynamic": False, **float8, "strategy": "channel"},
            }
        },
        "format": "float-quantized",
        "global_compression_ratio": None,
        "ignore": skipped,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def check_quantize(folder: ModelFolder, quant: Quantization | None, target: str | None) -> None:
    """Refuse a --quantize fastcast cannot do, before anything is written: an already
    quantized source, a target other than bf16, fp16 or fp32 (none: every tensor not
    quantized keeps its dtype)."""
    if target is not None and target not in COMPUTE_DTYPES:
        raise _core.DtypeError(
            f"--quantize writes the unquantized tensors in "
            f"{', '.join(short_name(t) for t in COMPUTE_DTYPES)}, not {short_name(target)}"
        )
    if quant is not None:
        raise _core.QuantizedModelError(
            f"{folder.root}: already quantized with {quant.describe()}; --quantize needs a "
            "plain model: add --dequantize to dequantize it first, in one run "
            "(--dequantize --dtype bf16 --quantize fp8)"
        )


def quantized_layers(
    folder: ModelFolder,
    target: str | None,
    keep: Sequence[str],
    scheme: str,
    weights: Mapping[tuple[str, str], QuantizedWeight] | None = None,
) -> dict[str, list[QuantizeTarget]]:
    """Per weight set, what ``--quantize scheme`` makes of each tensor (of a quantized
    model, with ``weights`` the weights ``--dequantize`` makes: ``requantize_targets``);
    a ModelFolderError when it would quantize nothing."""
    found = {}
    for ws in folder.weight_sets:
        if weights is None:
            found[ws.key] = quantize_targets(ws.tensors, target, keep, scheme)
        else:
            assert target is not None, "dequantizing needs a target"
            mine = {src: w for (key, src), w in weights.items() if key == ws.key}
            found[ws.key] = requantize_targets(ws.tensors, mine, target, keep, scheme)
    if not any(t.fate == "quantize" for targets in found.values() for t in targets):
        misfits = sum(t.fate == "misfit" for targets in found.values() for t in targets)
        why = (
            f"none of its {misfits} decoder Linear weight(s) fits {scheme}'s "
            f"{_core.FP8_BLOCK}x{_core.FP8_BLOCK} blocks (try fp8-channel)"
            if misfits
            else "it has no decoder Linear weight (a 2-D float *.weight inside .layers.N., "
            ".h.N. or .blocks.N.) that --keep leaves"
        )
        raise _core.ModelFolderError(
            f"{folder.root}: --quantize {scheme} would quantize nothing: {why}; nothing was written"
        )
    return found
