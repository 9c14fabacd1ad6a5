"""Quantized checkpoints: what a model's quantization is, and which tensors hold it.

The method and scheme come from ``quantization_config`` in a config.json beside the
weights (at the top, or nested in a sub-config such as ``text_config``), or, where
there is none, from the tensor names. Which tensors are quantization state is the
core's rule (``_core.quant_roles``), the same one ``_core.target_dtypes`` applies,
so that planning, inspecting and verifying cannot disagree about it.

A cast never touches quantization state: a quantized model is refused unless the user
says what to do with it (``keep_quantized``: cast only the rest and keep the
quantization as it is; ``dequantize``: write a plain model, each quantized weight
reconstructed by the core as its format's reference computes it, from the tensors and
parameters found here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastcast import _core
from fastcast._dtypes import short_name
from fastcast._names import join, listing
from fastcast._source.config import read_config
from fastcast._source.folder import ModelFolder, Skipped

#: Roles that mean a model is quantized (fp32-pinned tensors alone do not): the core's.
STATE_ROLES = frozenset(_core.STATE_ROLES)
#: Methods --dequantize handles: fp8 in every scheme of the fp8 reference, bitsandbytes
#: 4-bit and LLM.int8, GPTQ (v1 and v2; 2, 4 and 8 bits), AutoAWQ GEMM, gpt-oss MXFP4,
#: compressed-tensors' MXFP4 and NVFP4, ModelOpt's NVFP4.
DEQUANTIZES = {
    "fp8", "fbgemm_fp8", "compressed-tensors", "bitsandbytes", "gptq", "awq", "mxfp4",
    "modelopt",
}  # fmt: skip
#: Methods whose every state tensor fastcast recognises, so --keep-quantized is safe
#: (today the same as those it dequantizes; a format may be kept before it is rebuilt).
KNOWN_METHODS = set(DEQUANTIZES)
#: Roles (``_core.quant_roles``) whose tensors a --dequantize writes as themselves: the
#: model's plain tensors and the fp32 ones its method pins (the core's, which leaves the
#: others out as state the dequantized weight consumes).
SURVIVING_ROLES = frozenset(_core.SURVIVING_ROLES)
#: compressed-tensors formats whose state tensors fastcast recognises ...
KNOWN_CT_FORMATS = {
    "float-quantized",
    "pack-quantized",
    "int-quantized",
    "naive-quantized",
    "mxfp4-pack-quantized",
    "nvfp4-pack-quantized",
}
#: ... and those --dequantize reconstructs (every one).
CT_DEQUANTIZES = set(KNOWN_CT_FORMATS)
#: ModelOpt algorithms whose tensors fastcast recognises (the weight, its block scales,
#: the 0-dim second-level scale, input scales, AWQ's pre_quant_scale; FP8's e4m3 weight
#: with one F32 scale). Others, such as
#: NVFP4_SVD with its low-rank residual, are refused by name.
MODELOPT_ALGOS = {"NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "W4A8_NVFP4_FP8", "FP8"}
#: The scheme of gpt-oss's own ``original/`` weights (``block.N.mlp.mlp1_weight.blocks``).
GPT_OSS_ORIGINAL = "gpt-oss original/ layout"
#: ModelOpt's sidecar, which declares the quantization where config.json may not.
MODELOPT_SIDECAR = "hf_quant_config.json"
#: The dtype a method's kernels need the model in, and why.
NEEDS_DTYPE = {
    "gptq": ("F16", "its kernels (exllama, Marlin...) take fp16 scales and activations"),
    "awq": ("F16", "its kernels take fp16 scales, and vLLM refuses AWQ in another dtype"),
    "fbgemm_fp8": ("BF16", "its kernel (f8f8bf16_rowwise) computes in bf16"),
    "mxfp4": (
        "BF16",
        "its kernels compute in bf16, and a dequantizing load into fp16 overflows or "
        "flushes most E8M0 scales",
    ),
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
    not_dequantized: str = ""
    """Why --dequantize cannot reconstruct it ("" when it can)."""
    refused: str = ""
    """Why fastcast converts it in no mode at all ("" when it does)."""

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
        tensors = ws.tensors
        names = [t.name for t in tensors]
        typed = _core.quant_roles(names, [t.dtype for t in tensors])
        for name, role in zip(names, typed, strict=True):
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
        words += ", static input scales" if qc.get("activation_scheme") == "static" else ""
        words += f", {qc['scale_fmt']} scales" if qc.get("scale_fmt") else ""
        return words + (f", {qc['expert_dtype']} experts" if qc.get("expert_dtype") else "")
    if method == "fbgemm_fp8":
        return "e4m3, per-row"
    if method == "mxfp4":
        return "gpt-oss MXFP4 experts, E8M0 scales per 32"
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "?"))
        return algo + (f", group {qc.get('group_size', 16)}" if "NVFP4" in algo else "")
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
                if weights.get("strategy") in ("group", "tensor_group"):
                    part += f" {weights.get('group_size', '?')}"
                part += ", asymmetric" if weights.get("symmetric") is False else ""
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
    """(method, scheme) read from tensor names (and what their dtypes tell of them),
    for a model without a config."""
    unknown = [n for n in names if role_of[n] == "unknown state"]
    if unknown:
        return "unknown", (
            "scales or zero points of a format fastcast does not know, beside fp8 or "
            f"packed weights: {listing(unknown, 2)}"
        )
    mx = [n for n in names if role_of[n] == "quantized weight" and n.endswith("blocks")]
    if any(n.endswith("_blocks") for n in mx):
        return "mxfp4", "gpt-oss MXFP4 experts, E8M0 scales per 32"
    if mx:
        return "mxfp4", GPT_OSS_ORIGINAL
    if any(name.endswith(".W_q") for name in names):
        return "hqq", "packed W_q weights with scale and zero"
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
        if method == "modelopt":
            qc = {**qc, **sidecar_quantization(folder, rel.rpartition("/")[0])}
        where = f"{rel} ({key})" if key else rel
        return assess(method, scheme_of(method, qc), where, qc)
    for rel in sidecars(folder):
        if sidecar := sidecar_quantization(folder, rel.rpartition("/")[0]):
            return assess("modelopt", scheme_of("modelopt", sidecar), rel, sidecar)
    if not any(STATE_ROLES & _core.set_roles([f.entries for f in ws.files])
               for ws in folder.weight_sets):  # fmt: skip
        return None  # a plain model, told without a table of its 100k names
    table = roles(folder)
    names = [name for _, name in table]
    role_of = {n: r for (_, n), r in table.items()}
    method, scheme = method_from_tensors(names, role_of)
    first = next(n for n in names if role_of[n] in STATE_ROLES)
    # Every tensor it names is state fastcast keeps byte for byte: --keep-quantized is
    # safe, even for a format it does not know (it cannot dequantize one).
    guess = assess(method, scheme, f"tensor names, e.g. {first}", {})
    return dataclasses.replace(guess, known=not guess.refused)


def assess(method: str, scheme: str, where: str, qc: dict[str, Any]) -> Quantization:
    """What fastcast can do with a model quantized by ``method`` with config ``qc``:
    keep it (every state tensor known), dequantize it, or nothing at all."""
    known, gap, refused = method in KNOWN_METHODS, "", ""
    if method not in DEQUANTIZES:
        gap = f"--dequantize handles {', '.join(sorted(DEQUANTIZES))} so far"
    if method == "compressed-tensors":
        formats = ct_formats(qc)
        known = bool(formats) and formats <= KNOWN_CT_FORMATS
        if later := sorted(formats - CT_DEQUANTIZES):
            gap = f"--dequantize does not reconstruct {', '.join(later)} yet"
    elif method == "fp8" and (qc.get("scale_fmt") or qc.get("expert_dtype")):
        gap = (
            "--dequantize does not reconstruct DeepSeek-V4-style fp8 (ue8m0 scales, fp4 "
            "experts) yet: its on-disk layout is not confirmed"
        )
    elif method == "mxfp4":
        if scheme == GPT_OSS_ORIGINAL:
            refused = (
                "this is gpt-oss's own original/ layout, for its reference code; convert the "
                "transformers layout at the top of the repository instead"
            )
    elif method == "modelopt":
        algos = modelopt_algos(qc)
        if "NVFP4_AWQ" in algos:
            gap = (
                "--dequantize does not reconstruct ModelOpt NVFP4_AWQ (its pre_quant_scale "
                "would have to be folded into each weight)"
            )
        unknown = sorted(algos - MODELOPT_ALGOS)
        if unknown or not algos:
            refused = (
                f"ModelOpt algorithm {', '.join(unknown) or '(none named)'} is not one whose "
                f"tensors fastcast knows ({', '.join(sorted(MODELOPT_ALGOS))}); it "
                "converts nothing rather than guess"
            )
    return Quantization(method, scheme, where, known and not refused, gap, refused)


def ct_formats(qc: dict[str, Any]) -> set[str]:
    """The compressed-tensors formats a config uses: its ``format``, or each config
    group's own where it is ``mixed-precision``."""
    return each(qc, "format", "mixed-precision", "config_groups")


def modelopt_algos(qc: dict[str, Any]) -> set[str]:
    """The ModelOpt algorithms of a quantization dict (``MIXED_PRECISION``: each layer's)."""
    return each(qc, "quant_algo", "MIXED_PRECISION", "quantized_layers")


def each(qc: dict[str, Any], key: str, mixed: str, parts: str) -> set[str]:
    """``qc[key]``, or where it is ``mixed`` the ``key`` of each entry of ``qc[parts]``
    (``"None"`` for an entry without one); empty when there is none."""
    top = qc.get(key)
    if top != mixed:
        return {str(top)} if top is not None else set()
    entries = qc.get(parts)
    if not isinstance(entries, dict):
        return set()
    return {str(e.get(key)) if isinstance(e, dict) else "None" for e in entries.values()}


def without_sidecars(folder: ModelFolder) -> ModelFolder:
    """``folder`` with ModelOpt's sidecar skipped rather than copied: a dequantized
    output declaring NVFP4 would be loaded as quantized."""
    found = sidecars(folder)
    if not found:
        return folder
    return dataclasses.replace(
        folder,
        copies=[rel for rel in folder.copies if rel not in found],
        skipped=[*folder.skipped,
                 *(Skipped(rel, "quantization config of a dequantized model") for rel in found)],
    )  # fmt: skip


def sidecars(folder: ModelFolder) -> list[str]:
    """ModelOpt's sidecars the folder copies beside its weights (one elsewhere, say in a
    folder of another model's files, declares nothing about these)."""
    beside = {join(ws.folder, MODELOPT_SIDECAR) for ws in folder.weight_sets}
    return [rel for rel in folder.copies if rel in beside]


def sidecar_quantization(folder: ModelFolder, where: str) -> dict[str, Any]:
    """The ``quantization`` dict of ModelOpt's sidecar in folder ``where`` (relative),
    if the folder copies one there ({} otherwise)."""
    rel = join(where, MODELOPT_SIDECAR)
    if rel not in folder.copies:
        return {}
    qc = read_config(folder.root / rel).get("quantization")
    return qc if isinstance(qc, dict) else {}


def refusal(folder: ModelFolder, quant: Quantization, target: str) -> str:
    """Why a quantized model is not simply cast, and the ways forward."""
    if quant.refused:
        return f"{folder.root}: quantized with {quant.describe()}; {quant.refused}"
    return (
        f"{folder.root}: quantized with {quant.describe()}; a plain cast to "
        f"{short_name(target)} would corrupt it (scales and packed weights are not numbers "
        "to round). Pass --keep-quantized to cast only the tensors that are not "
        "quantization state and keep the quantization as it is"
        + (f", or --dequantize to write a plain {short_name(target)} model"
           if not quant.not_dequantized else "")
    )  # fmt: skip


def check_keep(folder: ModelFolder, quant: Quantization, target: str) -> None:
    """Refuse a --keep-quantized conversion that would break the model anyway."""
    where = folder.root
    if quant.refused:
        raise _core.QuantizedModelError(refusal(folder, quant, target))
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
