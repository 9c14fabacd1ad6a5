"""Quantized checkpoints: what a model's quantization is, and which tensors hold it.

The method and scheme come from ``quantization_config`` in a config.json beside the
weights (at the top, or nested in a sub-config such as ``text_config``), or, where
there is none, from the tensor names. Which tensors are quantization state is the
core's rule (``_core.quant_roles``), the same one ``_core.target_dtypes`` applies,
so that planning, inspecting and verifying cannot disagree about it.

A cast never touches quantization state: a quantized model is refused unless the user
says what to do with it (``keep_quantized``: cast only the rest and keep the
quantization as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastcast import _core
from fastcast._config import read_config
from fastcast._dtypes import short_name
from fastcast._model_dir import ModelFolder

#: Roles that mean a model is quantized (fp32-pinned tensors alone do not).
STATE_ROLES = {"quantized weight", "scale", "zero point", "group index", "quant state"}
#: Methods whose every state tensor fastcast recognises, so --keep-quantized is safe.
KNOWN_METHODS = {"fp8", "fbgemm_fp8", "compressed-tensors", "bitsandbytes", "gptq", "awq"}
#: compressed-tensors formats whose state tensors fastcast recognises.
KNOWN_CT_FORMATS = {"float-quantized", "pack-quantized", "int-quantized", "naive-quantized"}
#: The dtype a method's kernels need the model in, and why.
NEEDS_DTYPE = {
    "gptq": ("F16", "its kernels (exllama, Marlin...) take fp16 scales and activations"),
    "awq": ("F16", "its kernels take fp16 scales, and vLLM refuses AWQ in another dtype"),
    "fbgemm_fp8": ("BF16", "its kernel (f8f8bf16_rowwise) computes in bf16"),
}


@dataclass(frozen=True)
class Quantization:
    """How a model is quantized."""

    method: str
    """``quant_method`` as config.json says it (``fp8``, ``bitsandbytes``...)."""
    scheme: str
    """In words: ``e4m3, 128x128 blocks``, ``nf4 4-bit, double quant``..."""
    where: str
    """Where it was found: ``config.json``, ``config.json (text_config)``, or
    ``tensor names`` when there is no quantization_config."""
    known: bool
    """Every state tensor of this method is one fastcast recognises."""

    def describe(self) -> str:
        return f"{self.method} ({self.scheme}; from {self.where})"

    @property
    def needs_dtype(self) -> tuple[str, str] | None:
        """(dtype, reason) when the method's kernels need the model in one dtype."""
        return NEEDS_DTYPE.get(self.method)


def roles(folder: ModelFolder) -> dict[tuple[str, str], str]:
    """(weight set key, tensor name) -> role, set by set (roles depend on siblings,
    which live in the same set)."""
    found: dict[tuple[str, str], str] = {}
    for ws in folder.weight_sets:
        names = [t.name for t in ws.tensors]
        for name, role in zip(names, _core.quant_roles(names), strict=True):
            found[(ws.key, name)] = role
    return found


def quantization_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(where, quantization_config) of a config, at its top or in a sub-config."""
    top = config.get("quantization_config")
    if isinstance(top, dict):
        return "", top
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(value.get("quantization_config"), dict):
            return key, value["quantization_config"]
    return None


def scheme_of(method: str, qc: dict[str, Any]) -> str:
    """A quantization_config's scheme in words."""
    if method == "fp8":
        block = qc.get("weight_block_size")
        words = f"{qc.get('fmt', 'e4m3')}, " + (
            f"{block[0]}x{block[1]} blocks" if isinstance(block, list) and len(block) == 2
            else "per-tensor"
        )  # fmt: skip
        return words + (", static input scales" if qc.get("activation_scheme") == "static" else "")
    if method == "fbgemm_fp8":
        return "e4m3, per-row"
    if method == "compressed-tensors":
        groups = qc.get("config_groups")
        parts = []
        if not isinstance(groups, dict):
            groups = {}
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict):
                part = f"{weights.get('type', '?')}{weights.get('num_bits', '?')} "
                part += str(weights.get("strategy", "?"))
                inputs = group.get("input_activations")
                if isinstance(inputs, dict) and inputs.get("dynamic") is False:
                    part += ", static input scales"
                parts.append(part)
        return f"{qc.get('format', '?')}: " + ("; ".join(dict.fromkeys(parts)) or "?")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            words = f"{qc.get('bnb_4bit_quant_type', 'fp4')} 4-bit"
            if qc.get("bnb_4bit_use_double_quant"):
                words += ", double quant"
            storage = qc.get("bnb_4bit_quant_storage")
            return words + (f", {storage} storage" if storage not in (None, "uint8") else "")
        return "LLM.int8" if qc.get("load_in_8bit") or qc.get("_load_in_8bit") else "?"
    if method == "gptq":
        words = f"{qc.get('bits', '?')}-bit, group {qc.get('group_size', '?')}"
        words += ", desc_act" if qc.get("desc_act") else ""
        return words + f", {qc.get('checkpoint_format', 'gptq')} format"
    if method == "awq":
        return f"{qc.get('bits', '?')}-bit, group {qc.get('group_size', '?')}, " + str(
            qc.get("version", "gemm")
        )
    return ", ".join(f"{k}={v}" for k, v in list(qc.items())[:3] if k != "quant_method") or "?"


def method_from_tensors(names: Sequence[str], role_of: dict[str, str]) -> tuple[str, str]:
    """(method, scheme) read from tensor names alone, for a model without a config."""
    for name in names:
        if ".weight.quant_state.bitsandbytes__" in name:
            return "bitsandbytes", f"{name.rsplit('__', 1)[1]} 4-bit"
    if any(name.endswith(".SCB") for name in names):
        return "bitsandbytes", "LLM.int8"
    if any(name.endswith(".qweight") for name in names):
        return "gptq", "packed int weights (gptq or awq: no config says which)"
    if any(name.endswith(".weight_packed") for name in names):
        return "compressed-tensors", "pack-quantized"
    if any(name.endswith(".weight_scale_inv") for name in names):
        return "fp8", "e4m3, block scales"
    if any(role_of[n] == "quantized weight" for n in names):
        return "fp8", "e4m3 with scales"
    return "unknown", "quantization state tensors"


def detect(folder: ModelFolder) -> Quantization | None:
    """How ``folder`` is quantized, or None when it is a plain model."""
    for rel in folder.configs:
        found = quantization_config(read_config(folder.root / rel))
        if found is None:
            continue
        key, qc = found
        method = str(qc.get("quant_method", "unknown"))
        known = method in KNOWN_METHODS and (
            method != "compressed-tensors" or qc.get("format") in KNOWN_CT_FORMATS
        )
        where = f"{rel} ({key})" if key else rel
        return Quantization(method, scheme_of(method, qc), where, known)
    table = roles(folder)
    if not any(role in STATE_ROLES for role in table.values()):
        return None
    names = [name for _, name in table]
    method, scheme = method_from_tensors(names, {n: r for (_, n), r in table.items()})
    return Quantization(method, scheme, "tensor names", method != "unknown")


def refusal(folder: ModelFolder, quant: Quantization, target: str) -> str:
    """Why a quantized model is not simply cast, and the ways forward."""
    return (
        f"{folder.root}: quantized with {quant.describe()}; a plain cast to "
        f"{short_name(target)} would corrupt it (scales and packed weights are not numbers "
        "to round). Pass --keep-quantized to cast only the tensors that are not "
        "quantization state and keep the quantization as it is"
        + (
            f", or --dequantize to write a plain {short_name(target)} model"
            if quant.method in DEQUANTIZES
            else ""
        )
    )


def check_keep(folder: ModelFolder, quant: Quantization, target: str) -> None:
    """Refuse a --keep-quantized conversion that would break the model anyway."""
    where = folder.root
    if not quant.known:
        raise _core.QuantizedModelError(
            f"{where}: quantized with {quant.describe()}, whose tensors fastcast does not "
            "know; it cannot tell which must not be cast, so it converts nothing"
        )
    need = quant.needs_dtype
    if need is not None and need[0] != target:
        raise _core.QuantizedModelError(
            f"{where}: quantized with {quant.describe()}; --keep-quantized keeps it "
            f"{short_name(need[0])}, because {need[1]} (a {short_name(target)} target "
            "would change which kernels load it, or stop them)"
        )
    if target in ("F8_E4M3", "F8_E5M2"):
        raise _core.QuantizedModelError(
            f"{where}: quantized with {quant.describe()}; --keep-quantized to "
            f"{short_name(target)} would leave its other tensors as raw fp8 with no scales"
        )


# --- dequantization --------------------------------------------------------------------

#: Methods --dequantize handles (fp8 in every scheme of the reference).
DEQUANTIZES = {"fp8", "fbgemm_fp8", "compressed-tensors"}
#: Targets --dequantize writes.
DEQUANTIZE_TARGETS = ("BF16", "F16", "F32")
#: DeepSeek's block size, for block-fp8 weights whose config does not say it.
DEFAULT_FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Weight:
    """A quantized fp8 weight, its scale tensor, and the block each scale covers
    (rows x columns of the weight seen as 2-D)."""

    weight: str
    scale: str
    block: tuple[int, int]


def quantization_settings(folder: ModelFolder) -> dict[str, Any]:
    """The model's quantization_config (empty when it has none)."""
    for rel in folder.configs:
        found = quantization_config(read_config(folder.root / rel))
        if found is not None:
            return found[1]
    return {}


def ct_block(qc: dict[str, Any], rows: int, cols: int) -> tuple[int, int] | None:
    """compressed-tensors: the block of its (single) weight strategy."""
    groups = qc.get("config_groups")
    strategies = []
    for group in (groups or {}).values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            strategies.append(weights)
    if len(strategies) != 1:
        return None
    w = strategies[0]
    if w.get("symmetric") is False or w.get("type") != "float":
        return None  # zero points, or int weights: not a scaled fp8 tensor
    strategy = w.get("strategy")
    if strategy == "tensor":
        return rows, cols
    if strategy == "channel":
        return 1, cols
    if strategy == "group" and isinstance(w.get("group_size"), int):
        return 1, int(w["group_size"])
    block = w.get("block_structure")
    if strategy == "block" and isinstance(block, list) and len(block) == 2:
        return int(block[0]), int(block[1])
    return None


def fp8_block(
    quant: Quantization, qc: dict[str, Any], rows: int, cols: int, scale_numel: int, inverse: bool
) -> tuple[int, int] | None:
    """The block one scale covers, from the method and its config; None if the config
    does not say (the block is never worked out from the scale grid: partial edge
    blocks make that ambiguous)."""
    if quant.method == "compressed-tensors":
        return ct_block(qc, rows, cols)
    if quant.method == "fbgemm_fp8":
        return 1, cols
    block = qc.get("weight_block_size")
    if isinstance(block, list) and len(block) == 2:
        return int(block[0]), int(block[1])
    if inverse:  # weight_scale_inv without a config: DeepSeek's blocks
        return DEFAULT_FP8_BLOCK
    return (rows, cols) if scale_numel == 1 else None


def fp8_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], Fp8Weight]:
    """Every quantized fp8 weight of the model, with its scale and block; a
    QuantizedModelError naming the first weight that cannot be dequantized exactly."""
    qc = quantization_settings(folder)
    found = {}
    for ws in folder.weight_sets:
        tensors = {t.name: t for t in ws.tensors}
        for name, t in tensors.items():
            if role_of.get((ws.key, name)) != "quantized weight":
                continue
            prefix = name.removesuffix(".weight")
            scale = next(
                (tensors[s] for s in (f"{prefix}.weight_scale_inv", f"{prefix}.weight_scale")
                 if s in tensors), None,
            )  # fmt: skip
            cols = t.shape[-1] if t.shape else 1
            rows = t.numel // cols if cols else 0
            block = None
            if scale is not None and t.dtype in ("F8_E4M3", "F8_E5M2"):
                inverse = scale.name.endswith("_inv")
                block = fp8_block(quant, qc, rows, cols, scale.numel, inverse)
            if scale is None or block is None:
                raise _core.QuantizedModelError(
                    f"{t.file}: {name} ({t.dtype}) is quantized with {quant.describe()} in a "
                    "way --dequantize does not reconstruct exactly (no scale, or its block is "
                    "not given by the config); nothing was written"
                )
            found[(ws.key, name)] = Fp8Weight(name, scale.name, block)
    return found


def check_dequantize(folder: ModelFolder, quant: Quantization, target: str) -> None:
    """Refuse a --dequantize fastcast cannot do exactly, before anything is written."""
    if quant.method not in DEQUANTIZES:
        raise _core.QuantizedModelError(
            f"{folder.root}: quantized with {quant.describe()}; --dequantize handles "
            f"{', '.join(sorted(DEQUANTIZES))} so far (--keep-quantized keeps it as it is)"
        )
    if target not in DEQUANTIZE_TARGETS:
        raise _core.QuantizedModelError(
            f"{folder.root}: --dequantize writes "
            f"{', '.join(short_name(t) for t in DEQUANTIZE_TARGETS)}, not {short_name(target)}"
        )
