"""``--quantize``: what it makes of each tensor of each weight set, the
``quantization_config`` it writes, and what a user should know of the layers it
leaves unquantized."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastcast import _core
from fastcast._dtypes import short_name
from fastcast._names import join, listing
from fastcast._plan.dequantize import QuantizedWeight, written_as
from fastcast._plan.quantize import (
    QUANTIZE_METHODS,
    QuantizeTarget,
    quantize_config,
    quantized_layers,
    unquantized_modules,
)
from fastcast._source.config import (
    is_transformers_config,
    read_config,
)
from fastcast._source.folder import ModelFolder
from fastcast._source.quantization import Quantization, scheme_of


@dataclass(frozen=True)
class Quantizing:
    """A ``--quantize`` conversion: what it makes of each tensor, per weight set, and the
    quantization_config it writes, per config.json."""

    scheme: str
    targets: dict[str, list[QuantizeTarget]]
    configs: dict[str, dict[str, Any]]
    names: dict[str, list[str]]
    """Per weight set, each tensor's name in the output (a dequantized weight's, for
    the tensor holding its quantized values)."""
    dequantized: str | None = None
    """``--dequantize --quantize``: the quantization method the source's weights were
    dequantized from."""

    @property
    def quantization(self) -> Quantization:
        """The output's quantization, as detect() will read it back."""
        method = QUANTIZE_METHODS[self.scheme]
        config = next(iter(self.configs.values()), {"quant_method": method})
        return Quantization(method, scheme_of(method, config), "--quantize", True)


def plan_quantization(
    folder: ModelFolder,
    target: str | None,
    keep: Sequence[str],
    scheme: str,
    dequantized: tuple[Quantization, Mapping[tuple[str, str], QuantizedWeight]] | None = None,
) -> Quantizing:
    """What ``--quantize scheme`` makes of every tensor (of a quantized model, given its
    quantization and the weights ``--dequantize`` makes of it: of those), and the
    quantization_config of each transformers config.json beside quantized weights
    (listing the Linear modules its folder's sets leave unquantized)."""
    weights = None if dequantized is None else dequantized[1]
    targets = quantized_layers(folder, target, keep, scheme, weights)
    names = {
        ws.key: [name for name, _ in written_as(ws.tensors, set_weights(weights, ws.key))]
        for ws in folder.weight_sets
    }
    configs = {}
    for rel in folder.configs:
        where = rel.rpartition("/")[0]
        sets = [ws for ws in folder.weight_sets if ws.folder == where]
        if not is_transformers_config(read_config(folder.root / rel)) or not any(
            t.fate == "quantize" for ws in sets for t in targets[ws.key]
        ):
            continue
        skipped = [m for ws in sets for m in unquantized_modules(names[ws.key], targets[ws.key])]
        configs[rel] = quantize_config(scheme, list(dict.fromkeys(skipped)))
    method = None if dequantized is None else dequantized[0].method
    return Quantizing(scheme, targets, configs, names, method)


def set_weights(
    weights: Mapping[tuple[str, str], QuantizedWeight] | None, key: str
) -> list[QuantizedWeight]:
    """The dequantized weights of the weight set ``key``."""
    return [] if weights is None else [w for (k, _), w in weights.items() if k == key]


def quantize_notes(folder: ModelFolder, quantizing: Quantizing, target: str | None) -> list[str]:
    """What a ``--quantize`` run leaves unquantized that a user would want to know: the
    decoder Linears that misfit the blocks (and their fused siblings)."""
    notes = []
    for ws in folder.weight_sets:
        fates = list(zip(quantizing.names[ws.key], quantizing.targets[ws.key], strict=True))
        misfits = [join(ws.folder, n) for n, q in fates if q.fate == "misfit"]
        fused = [join(ws.folder, n) for n, q in fates if q.fate == "fused misfit"]
        if misfits:
            notes.append(
                f"{len(misfits)} decoder Linear weight(s) left unquantized in "
                f"{short_name(target) if target else 'their own dtype'}, their shape not "
                f"fitting {quantizing.scheme}'s "
                f"{_core.FP8_BLOCK}x{_core.FP8_BLOCK} blocks (both sides must be multiples "
                f"of {_core.FP8_BLOCK}), and listed as not to convert: {listing(misfits, 4)}"
            )
        if fused:
            notes.append(
                f"{len(fused)} more left unquantized because a weight fused with them "
                f"(q/k/v, gate/up) does not fit, and vLLM needs fused layers in one "
                f"precision: {listing(fused, 4)}"
            )
    return notes
