"""The recipes of ``--dequantize``: for each quantized weight, how the core computes
its values (which tensors it reads, the format's numbers), checked against what the
files hold."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastcast import _core
from fastcast._dtypes import COMPUTE_DTYPES, short_name
from fastcast._source.config import read_config
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import ModelFolder
from fastcast._source.quantization import Quantization, quantization_config, refusal

#: DeepSeek's block size, for block-fp8 weights whose config does not say it.
DEFAULT_FP8_BLOCK = (128, 128)
#: The code types bitsandbytes 4-bit writes (``quant_state.bitsandbytes__<type>``).
BNB_4BIT_TYPES = ("nf4", "fp4")
#: GPTQ widths whose values fill int32 words evenly (3-bit values straddle words).
GPTQ_BITS = (2, 4, 8)
#: The dtypes GPTQ/AWQ scales come in (fp16 from every producer; the others decode exactly).
SCALE_DTYPES = ("F16", "BF16", "F32")
#: Where a quant state tensor's JSON stops being plausible.
QUANT_STATE_MAX_BYTES = 1 << 16

Kind = Literal["fp8_scaled", "bnb4", "int8_rows", "gptq", "awq", "fp4", "ct_int"]
#: Values per scale: MXFP4's E8M0 exponents, NVFP4's E4M3 scales.
MX_GROUP, NV_GROUP = 32, 16
#: compressed-tensors ``pack-quantized`` widths whose codes fill int32 words evenly: 3, 5,
#: 6 and 7 bits were packed two incompatible ways (padded, then dense) under one name.
CT_PACKED_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight and how its values come back exactly.

    The output tensor is ``name`` with ``shape`` (GPTQ/AWQ: ``x.weight``, ``[out,
    in]``; bitsandbytes 4-bit: the original shape from its quant state); its
    quantized values are in ``source`` (``x.weight``, or GPTQ/AWQ's ``x.qweight``);
    ``operands`` names the other tensors it reads, by their role in the core's
    dequantization ``kind`` (``scale``, ``absmax``, ``qzeros``...), and ``params``
    holds the format's numbers (``block``, ``blocksize``, ``bits``...).

    >>> QuantizedWeight("fp8_scaled", "x.weight", "x.weight", (4, 4),
    ...                 {"scale": "x.weight_scale"}, {"block": (4, 4)}).kind
    'fp8_scaled'
    """

    kind: Kind
    name: str
    source: str
    shape: tuple[int, ...]
    operands: dict[str, str]
    params: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """Everything that decides its values, JSON-ready (for fingerprints)."""
        return {"kind": self.kind, "source": self.source, "operands": self.operands,
                "params": self.params}  # fmt: skip


def written_as(
    tensors: Sequence[TensorEntry], weights: Iterable[QuantizedWeight]
) -> list[tuple[str, tuple[int, ...]]]:
    """Each tensor's name and shape in the output of a dequantizing run: a ``weights``
    weight's for the tensor holding its quantized values (GPTQ's ``x.qweight`` is
    ``x.weight``, ``[out, in]``), its own for any other."""
    by_source = {w.source: w for w in weights}
    return [
        (w.name, w.shape) if (w := by_source.get(t.name)) else (t.name, t.shape) for t in tensors
    ]


def quantization_settings(folder: ModelFolder) -> dict[str, Any]:
    """The model's quantization_config (empty when it has none)."""
    for rel in folder.configs:
        found = quantization_config(read_config(folder.root / rel))
        if found is not None:
            return found[1]
    return {}


def cannot(t: TensorEntry, quant: Quantization, why: str) -> _core.QuantizedModelError:
    """The refusal for a weight --dequantize cannot reconstruct exactly, naming it."""
    return _core.QuantizedModelError(
        f"{t.file}: {t.name} ({t.dtype} {list(t.shape)}) is quantized with "
        f"{quant.describe()} in a way --dequantize does not reconstruct exactly: {why}; "
        "nothing was written"
    )


def expect(
    owner: TensorEntry,
    quant: Quantization,
    tensors: dict[str, TensorEntry],
    what: str,
    name: str,
    dtypes: tuple[str, ...],
    shape: tuple[int, ...] | None = None,
) -> TensorEntry:
    """Tensor ``name`` of ``tensors`` (``owner``'s ``what``), checked to exist with one of
    ``dtypes`` and ``shape``; else the refusal naming ``owner``."""
    t = tensors.get(name)
    if t is None:
        raise cannot(owner, quant, f"its {what} {name} is missing")
    if t.dtype not in dtypes or (shape is not None and t.shape != shape):
        needs = " or ".join(dtypes) + (f" {list(shape)}" if shape is not None else "")
        raise cannot(owner, quant, f"its {what} {name} is {t.dtype} {list(t.shape)}, not {needs}")
    return t


def read_tensor_bytes(t: TensorEntry) -> bytes:
    """A small tensor's raw bytes (a quant state's JSON, a weight format byte)."""
    with open(t.file, "rb") as f:
        f.seek(t.offsets[0])
        return f.read(t.nbytes)


def integer(value: object) -> int | None:
    """``value`` when it is an int (and not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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


def quantized_tensors(
    folder: ModelFolder, role_of: dict[tuple[str, str], str]
) -> list[tuple[str, TensorEntry, dict[str, TensorEntry]]]:
    """(set key, tensor, its set's tensors by name) of every quantized weight."""
    found = []
    for ws in folder.weight_sets:
        tensors = {t.name: t for t in ws.tensors}
        for name, t in tensors.items():
            if role_of.get((ws.key, name)) == "quantized weight":
                found.append((ws.key, t, tensors))
    return found


def fp8_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every quantized fp8 weight of the model, with its scale and block."""
    qc = quantization_settings(folder)
    return {(key, t.name): fp8_weight(t, tensors, quant, qc)
            for key, t, tensors in quantized_tensors(folder, role_of)}  # fmt: skip


def fp8_weight(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization, qc: dict[str, Any]
) -> QuantizedWeight:
    """One fp8 weight, with its scale and block."""
    prefix = t.name.removesuffix(".weight")
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
        raise cannot(t, quant, "no scale, or its block is not given by the config")
    return QuantizedWeight(
        "fp8_scaled", t.name, t.name, t.shape, {"scale": scale.name}, {"block": block}
    )


def bnb_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every bitsandbytes weight: LLM.int8 (``x.SCB`` beside it) or 4-bit (a
    ``x.weight.quant_state.bitsandbytes__*`` beside it, read for the block sizes, the
    original shape and the double-quant offset)."""
    found = {}
    for key, t, tensors in quantized_tensors(folder, role_of):
        x = t.name.removesuffix(".weight")
        if f"{x}.SCB" in tensors:
            found[(key, t.name)] = bnb_int8_weight(t, tensors, quant)
        else:
            found[(key, t.name)] = bnb_4bit_weight(t, tensors, quant)
    return found


def bnb_int8_weight(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization
) -> QuantizedWeight:
    """LLM.int8: ``x.weight`` I8 rows, ``x.SCB`` F32 per row, ``x.weight_format`` 0."""
    x = t.name.removesuffix(".weight")
    if t.dtype != "I8" or len(t.shape) != 2:
        raise cannot(t, quant, "an LLM.int8 weight is I8 [out, in]")
    scb = expect(t, quant, tensors, "row scale", f"{x}.SCB", ("F32",), (t.shape[0],))
    if f"{x}.weight_format" in tensors:
        fmt = expect(t, quant, tensors, "weight format", f"{x}.weight_format", ("U8",))
        value = read_tensor_bytes(fmt)
        if value != b"\0":
            raise cannot(
                t, quant, f"its weight_format is {list(value)}, a tiled layout of older "
                "bitsandbytes (only 0, row-major, is read)",
            )  # fmt: skip
    return QuantizedWeight("int8_rows", t.name, t.name, t.shape, {"scb": scb.name}, {})


def bnb_quant_state(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization
) -> tuple[str, dict[str, Any]]:
    """(code type, JSON) of a 4-bit weight's ``quant_state.bitsandbytes__<type>``."""
    states = [n for n in tensors if n.startswith(f"{t.name}.quant_state.bitsandbytes__")]
    if len(states) != 1:
        why = "it has no quant_state" if not states else f"it has {len(states)} quant states"
        raise cannot(t, quant, why)
    qs = tensors[states[0]]
    code = qs.name.rsplit("__", 1)[1]
    if code not in BNB_4BIT_TYPES:
        raise cannot(t, quant, f"its quant state {qs.name} names the code {code!r}, not nf4 or fp4")
    if qs.dtype != "U8" or qs.nbytes > QUANT_STATE_MAX_BYTES:
        raise cannot(t, quant, f"its quant state {qs.name} is {qs.dtype} {list(qs.shape)}, not "
                     "the U8 bytes of a JSON object")  # fmt: skip
    try:
        state = json.loads(read_tensor_bytes(qs).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise cannot(t, quant, f"its quant state {qs.name} is not JSON ({e})") from None
    if not isinstance(state, dict):
        raise cannot(t, quant, f"its quant state {qs.name} is not a JSON object")
    if state.get("quant_type", code) != code:
        raise cannot(t, quant, f"its quant state {qs.name} says quant_type "
                     f"{state.get('quant_type')!r}")  # fmt: skip
    return code, state


def bnb_4bit_weight(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization
) -> QuantizedWeight:
    """nf4/fp4: packed nibbles (any container dtype), ``absmax`` F32 or, with double
    quant, U8 codes with ``nested_absmax`` and ``nested_quant_map``; the JSON quant state
    gives ``blocksize``, ``shape`` and (double quant) ``nested_blocksize`` and
    ``nested_offset``."""
    _, state = bnb_quant_state(t, tensors, quant)
    blocksize = integer(state.get("blocksize"))
    shape = state.get("shape")
    if (
        blocksize is None
        or blocksize <= 0
        or not isinstance(shape, list)
        or any(integer(d) is None or d < 0 for d in shape)
    ):
        raise cannot(t, quant, "its quant state lacks a positive blocksize or a shape "
                     f"(blocksize {state.get('blocksize')!r}, shape {shape!r})")  # fmt: skip
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if t.nbytes != -(-n // 2):
        raise cannot(t, quant, f"its {t.nbytes} bytes do not hold the {n} 4-bit values of "
                     f"shape {list(shape)} (needs {-(-n // 2)})")  # fmt: skip
    blocks = -(-n // blocksize)
    name = t.name
    code = expect(t, quant, tensors, "quant map", f"{name}.quant_map", ("F32",), (16,))
    operands = {"quant_map": code.name, "absmax": f"{name}.absmax"}
    params: dict[str, Any] = {"blocksize": blocksize}
    absmax = tensors.get(f"{name}.absmax")
    if absmax is not None and absmax.dtype == "U8":  # double quant
        expect(t, quant, tensors, "absmax", absmax.name, ("U8",), (blocks,))
        nested_blocksize = integer(state.get("nested_blocksize"))
        offset = state.get("nested_offset")
        if (
            nested_blocksize is None
            or nested_blocksize <= 0
            or not isinstance(offset, int | float)
            or isinstance(offset, bool)
            or state.get("nested_dtype", "float32") != "float32"
        ):
            raise cannot(t, quant, "its absmax is double-quantized but the quant state lacks "
                         "a positive nested_blocksize, a numeric nested_offset or a float32 "
                         "nested_dtype")  # fmt: skip
        groups = -(-blocks // nested_blocksize)
        outer = expect(t, quant, tensors, "nested absmax", f"{name}.nested_absmax", ("F32",),
                       (groups,))  # fmt: skip
        nested_code = expect(t, quant, tensors, "nested quant map", f"{name}.nested_quant_map",
                             ("F32",), (256,))  # fmt: skip
        operands |= {"nested_absmax": outer.name, "nested_quant_map": nested_code.name}
        params |= {"nested_blocksize": nested_blocksize, "offset": float(offset)}
    else:
        expect(t, quant, tensors, "absmax", f"{name}.absmax", ("F32",), (blocks,))
        if f"{name}.nested_absmax" in tensors:
            raise cannot(t, quant, "it has a nested absmax but its absmax is not 8-bit")
    return QuantizedWeight("bnb4", name, name, shape, operands, params)


def packed_output(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization, qc: dict[str, Any]
) -> tuple[str, str]:
    """(prefix, output name) of a GPTQ/AWQ ``x.qweight``, refusing anything else, an
    output name the set already uses, or a model without the quantization_config that
    says how it is packed."""
    if not qc:
        raise cannot(t, quant, "no quantization_config says its bits and group size")
    if not t.name.endswith(".qweight"):
        raise cannot(t, quant, f"{quant.method} weights are x.qweight tensors")
    x = t.name.removesuffix(".qweight")
    if f"{x}.weight" in tensors:
        raise cannot(t, quant, f"{x}.weight, its dequantized name, is taken")
    if t.dtype != "I32" or len(t.shape) != 2:
        raise cannot(t, quant, "a qweight is I32, 2-D")
    return x, f"{x}.weight"


def gptq_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every GPTQ ``x.qweight`` ``[in * bits / 32, out]``, with ``qzeros``, ``scales``
    and ``g_idx``; bits, group size and format (v1 stores zero minus one) from the
    quantization_config."""
    qc = quantization_settings(folder)
    found = {}
    for key, t, tensors in quantized_tensors(folder, role_of):
        x, name = packed_output(t, tensors, quant, qc)
        bits = integer(qc.get("bits"))
        if bits not in GPTQ_BITS:
            why = ", whose values straddle int32 words" if bits == 3 else ""
            raise cannot(
                t, quant, f"it is {qc.get('bits')}-bit GPTQ{why} (2, 4 and 8 bits are unpacked)"
            )
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise cannot(t, quant, f"checkpoint_format {fmt!r} (gptq and gptq_v2 are read)")
        if qc.get("dynamic"):
            raise cannot(t, quant, "its config overrides settings per module (dynamic)")
        per = 32 // bits
        inputs, outputs = t.shape[0] * per, t.shape[1]
        if outputs % per:
            raise cannot(t, quant, f"{outputs} outputs do not pack into {bits}-bit zeros")
        group = integer(qc.get("group_size"))
        if group is None or group == 0 or group < -1:
            raise cannot(t, quant, f"group_size {qc.get('group_size')!r}")
        group = inputs if group == -1 else group
        groups = -(-inputs // group)  # with or without g_idx, as AutoGPTQ sizes them
        scales = expect(t, quant, tensors, "scales", f"{x}.scales", SCALE_DTYPES,
                        (groups, outputs))  # fmt: skip
        qzeros = expect(t, quant, tensors, "zeros", f"{x}.qzeros", ("I32",),
                        (groups, outputs // per))  # fmt: skip
        operands = {"qzeros": qzeros.name, "scales": scales.name}
        if f"{x}.g_idx" in tensors:  # else inputs are grouped in order
            g_idx = expect(t, quant, tensors, "group index", f"{x}.g_idx", ("I32",), (inputs,))
            operands["g_idx"] = g_idx.name
        params = {"group_size": group, "bits": bits, "zero_plus_one": fmt == "gptq"}
        found[(key, t.name)] = QuantizedWeight(
            "gptq", name, t.name, (outputs, inputs), operands, params
        )
    return found


def awq_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every AutoAWQ GEMM ``x.qweight`` ``[in, out / 8]``, with ``qzeros`` and
    ``scales``; bits, group size, version and zero point from the quantization_config."""
    qc = quantization_settings(folder)
    found = {}
    for key, t, tensors in quantized_tensors(folder, role_of):
        x, name = packed_output(t, tensors, quant, qc)
        bits = integer(qc.get("bits", qc.get("w_bit")))
        version = str(qc.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or qc.get("zero_point", True) is not True:
            raise cannot(
                t,
                quant,
                f"{bits}-bit AWQ {version}, zero_point "
                f"{qc.get('zero_point', True)} (4-bit GEMM with zero points is read)",
            )
        group = integer(qc.get("group_size", qc.get("q_group_size")))
        if group is None or group <= 0:
            raise cannot(t, quant, f"group_size {qc.get('group_size')!r}")
        inputs, outputs = t.shape[0], t.shape[1] * 8
        groups = -(-inputs // group)
        scales = expect(t, quant, tensors, "scales", f"{x}.scales", SCALE_DTYPES,
                        (groups, outputs))  # fmt: skip
        qzeros = expect(t, quant, tensors, "zeros", f"{x}.qzeros", ("I32",), (groups, t.shape[1]))
        found[(key, t.name)] = QuantizedWeight(
            "awq", name, t.name, (outputs, inputs),
            {"qzeros": qzeros.name, "scales": scales.name}, {"group_size": group, "bits": 4},
        )  # fmt: skip
    return found


def ct_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """compressed-tensors: fp4 (``x.weight_packed`` U8: MXFP4 or NVFP4, told by the
    scale's dtype, as compressed-tensors' own dequantizer infers each group's format),
    integers (``x.weight_packed`` I32, ``pack-quantized``; ``x.weight`` I8,
    ``int-quantized`` / ``naive-quantized``) and fp8 weights."""
    qc = quantization_settings(folder)
    found = {}
    for key, t, tensors in quantized_tensors(folder, role_of):
        if t.name.endswith(".weight_packed") and t.dtype == "U8":
            found[(key, t.name)] = fp4_weight(t, tensors, quant)
        elif t.name.endswith(".weight_packed") or t.dtype == "I8":
            found[(key, t.name)] = ct_int_weight(t, tensors, quant, qc)
        else:
            found[(key, t.name)] = fp8_weight(t, tensors, quant, qc)
    return found


def ct_int_weight(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization, qc: dict[str, Any]
) -> QuantizedWeight:
    """A compressed-tensors integer weight: ``x.weight_packed`` I32 ``[out, ceil(in *
    bits / 32)]`` with its I64 ``x.weight_shape``, or ``x.weight`` I8 ``[out, in]``; its
    scale ``[out, groups]`` (``[out, 1]`` per channel, one value per tensor), zero point
    when asymmetric and ``weight_g_idx`` when it has one; bits and group size from the
    config group that fits it (``ct_int_args``)."""
    packed = t.name.endswith(".weight_packed")
    x = t.name.removesuffix(".weight_packed" if packed else ".weight")
    name = f"{x}.weight"
    if packed:
        if name in tensors:
            raise cannot(t, quant, f"{name}, its dequantized name, is taken")
        if t.dtype != "I32" or len(t.shape) != 2:
            raise cannot(t, quant, "pack-quantized codes are I32 [out, words]")
        stored = expect(t, quant, tensors, "shape", f"{x}.weight_shape", ("I64", "I32"), (2,))
        fmt = "<2q" if stored.dtype == "I64" else "<2i"
        shape: tuple[int, ...] = struct.unpack(fmt, read_tensor_bytes(stored))
        if shape[0] != t.shape[0] or shape[1] <= 0:
            raise cannot(t, quant, f"its weight_shape {list(shape)} does not fit its "
                         f"{t.shape[0]} packed rows")  # fmt: skip
    else:
        if len(t.shape) != 2 or not t.name.endswith(".weight"):
            raise cannot(t, quant, "int-quantized codes are an I8 x.weight [out, in]")
        shape = t.shape
    rows, cols = shape
    scale = expect(t, quant, tensors, "scale", f"{x}.weight_scale", SCALE_DTYPES)
    zero = tensors.get(f"{x}.weight_zero_point")
    bits, group = ct_int_args(t, quant, qc, packed, (rows, cols), scale, zero)
    operands = {"scale": scale.name}
    if zero is not None:
        operands["zero_point"] = zero.name
    g_idx = tensors.get(f"{x}.weight_g_idx")
    if g_idx is not None:
        expect(t, quant, tensors, "group index", g_idx.name, ("I32",), (cols,))
        operands["g_idx"] = g_idx.name
    params = {"bits": bits, "group_size": group}
    return QuantizedWeight("ct_int", name, t.name, (rows, cols), operands, params)


def ct_int_args(
    t: TensorEntry,
    quant: Quantization,
    qc: dict[str, Any],
    packed: bool,
    shape: tuple[int, int],
    scale: TensorEntry,
    zero: TensorEntry | None,
) -> tuple[int, int]:
    """(bits, inputs per group) of a compressed-tensors integer weight ``[rows, cols]``:
    from the integer config groups of its quantization_config whose arguments fit its
    tensors (the packed width, the scale's shape, a zero point exactly when asymmetric).
    The groups' targets are class names or patterns that only a model's modules resolve,
    so the tensors decide; every fitting group must then give the same values (a group
    size divides the row, as compressed-tensors requires, so the scale's shape fixes it)."""
    rows, cols = shape
    groups = qc.get("config_groups")
    fitting: set[tuple[int, int]] = set()
    straddling: set[int] = set()
    for group in groups.values() if isinstance(groups, dict) else ():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or w.get("type") != "int":
            continue
        bits, strategy, size = integer(w.get("num_bits")), w.get("strategy"), w.get("group_size")
        if bits is None or not 1 <= bits <= 8:
            continue
        if packed and bits not in CT_PACKED_BITS:
            straddling.add(bits)  # a layout told apart only by the writer's version
            continue
        if packed and t.shape[1] != -(-cols * bits // 32):
            continue
        if (w.get("symmetric", True) is False) != (zero is not None):
            continue
        width = bits if packed else 8  # I8 codes are read whole, whatever their range
        if strategy == "tensor" and scale.numel == 1:
            fitting.add((width, cols))
        elif strategy == "channel" and scale.shape == (rows, 1):
            fitting.add((width, cols))
        elif (strategy == "group" and (size := integer(size)) and cols % size == 0
              and scale.shape == (rows, cols // size)):  # fmt: skip
            fitting.add((width, size))
    if len(fitting) == 1:
        return fitting.pop()
    held = f"scale {scale.dtype} {list(scale.shape)}, " + (
        f"zero point {zero.dtype} {list(zero.shape)}" if zero is not None else "no zero point"
    )
    if not fitting and straddling:
        widths = ", ".join(map(str, sorted(straddling)))
        raise cannot(t, quant, f"it is {widths}-bit pack-quantized, whose layout changed "
                     "(padded, then dense) under one format name; 1, 2, 4 and 8 bits are "
                     "unpacked")  # fmt: skip
    if not fitting:
        raise cannot(t, quant, "no integer config group of its quantization_config fits its "
                     f"tensors ({held}; a group's bits, strategy, group size and symmetry "
                     "decide them)")  # fmt: skip
    raise cannot(t, quant, f"config groups that reconstruct it differently all fit its "
                 f"tensors ({held}); fastcast cannot tell which quantized it")  # fmt: skip


def fp4_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every 4-bit float weight: gpt-oss's stacked experts (``x_blocks``), a
    compressed-tensors ``x.weight_packed`` or a ModelOpt ``x.weight``, each with its
    group scales and (NVFP4) its second-level scale."""
    return {(key, t.name): fp4_weight(t, tensors, quant)
            for key, t, tensors in quantized_tensors(folder, role_of)}  # fmt: skip


def modelopt_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """ModelOpt: NVFP4 weights (U8, ``fp4_weight``) and FP8 ones (F8_E4M3 ``x.weight``
    with one F32 ``x.weight_scale`` for the tensor)."""
    qc = quantization_settings(folder)
    return {
        (key, t.name): fp8_weight(t, tensors, quant, qc)
        if t.dtype == "F8_E4M3"
        else fp4_weight(t, tensors, quant)
        for key, t, tensors in quantized_tensors(folder, role_of)
    }


def fp4_weight(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization
) -> QuantizedWeight:
    """One 4-bit float weight, its layout and scales checked."""
    if t.dtype != "U8":
        raise cannot(t, quant, "4-bit float codes are U8, two per byte")
    if t.name.endswith("_blocks"):  # gpt-oss: [E, R, G, 16] -> [E, G * 32, R]
        x = t.name.removesuffix("_blocks")
        if len(t.shape) != 4 or t.shape[3] != MX_GROUP // 2:
            raise cannot(t, quant, "gpt-oss blocks are [experts, rows, groups, 16]")
        experts, rows, groups = t.shape[:3]
        scales = expect(t, quant, tensors, "scales", f"{x}_scales", ("U8",), t.shape[:3])
        stacked = (experts, groups * MX_GROUP, rows)
        return fp4(t, x, stacked, scales, None, tensors, quant, transpose=True)
    if len(t.shape) == 3 and f"{t.name}_weight_scale" in tensors:  # ModelOpt fused experts
        return modelopt_experts(t, tensors, quant)
    if len(t.shape) != 2:
        raise cannot(t, quant, "a 4-bit float weight is [out, in / 2], or ModelOpt's fused "
                     "experts [experts, in / 2, out] beside their x_weight_scale")  # fmt: skip
    shape = (t.shape[0], 2 * t.shape[1])
    if t.name.endswith(".weight_packed"):  # compressed-tensors
        x = t.name.removesuffix(".weight_packed")
        mx = tensors.get(f"{x}.weight_scale")
        if mx is not None and mx.dtype == "U8":
            scale = expect(
                t, quant, tensors, "scale", mx.name, ("U8",), group_shape(shape, MX_GROUP)
            )
            return fp4(t, f"{x}.weight", shape, scale, None, tensors, quant)
        scale = expect(t, quant, tensors, "scale", f"{x}.weight_scale", ("F8_E4M3",),
                       group_shape(shape, NV_GROUP))  # fmt: skip
        divisor = expect(t, quant, tensors, "global scale", f"{x}.weight_global_scale",
                         ("F32",), (1,))  # fmt: skip
        return fp4(t, f"{x}.weight", shape, scale, divisor, tensors, quant, divide=True)
    x = t.name.removesuffix(".weight")  # ModelOpt
    scale = expect(t, quant, tensors, "scale", f"{x}.weight_scale", ("F8_E4M3",),
                   group_shape(shape, NV_GROUP))  # fmt: skip
    found = tensors.get(f"{x}.weight_scale_2")
    one = found.shape if found is not None and found.shape in ((), (1,)) else ()
    times = expect(t, quant, tensors, "second-level scale", f"{x}.weight_scale_2", ("F32",), one)
    return fp4(t, f"{x}.weight", shape, scale, times, tensors, quant, positive_zero=True)


def modelopt_experts(
    t: TensorEntry, tensors: dict[str, TensorEntry], quant: Quantization
) -> QuantizedWeight:
    """ModelOpt's NVFP4 fused experts (``experts.gate_up_proj``: U8 ``[E, in / 2, out]``,
    the pairs and groups of 16 running down each expert's columns, F8_E4M3
    ``x_weight_scale`` ``[E, in / 16, out]``, one F32 ``x_weight_scale_2`` for all
    experts), written as transformers holds the dequantized parameter, ``[E, in, out]``,
    under its own name."""
    experts, half, cols = t.shape
    shape = (experts, 2 * half, cols)
    x = t.name
    scale = expect(t, quant, tensors, "scale", f"{x}_weight_scale", ("F8_E4M3",),
                   (experts, shape[1] // NV_GROUP, cols))  # fmt: skip
    found = tensors.get(f"{x}_weight_scale_2")
    one = found.shape if found is not None and found.shape in ((), (1,)) else ()
    times = expect(t, quant, tensors, "second-level scale", f"{x}_weight_scale_2", ("F32",), one)
    return fp4(t, x, shape, scale, times, tensors, quant, down=True, positive_zero=True)


def group_shape(shape: tuple[int, int], group: int) -> tuple[int, int]:
    """The scales of a ``[rows, cols]`` weight, one per ``group`` columns."""
    return shape[0], shape[1] // group


def fp4(
    t: TensorEntry,
    name: str,
    shape: tuple[int, ...],
    scale: TensorEntry,
    global_scale: TensorEntry | None,
    tensors: dict[str, TensorEntry],
    quant: Quantization,
    *,
    transpose: bool = False,
    down: bool = False,
    divide: bool = False,
    positive_zero: bool = False,
) -> QuantizedWeight:
    """The recipe of a 4-bit float weight written as ``name`` with ``shape``."""
    if name != t.name and name in tensors:
        raise cannot(t, quant, f"{name}, its dequantized name, is taken")
    if down:
        group = shape[-2] // scale.shape[-2]
    else:
        group = shape[-2] // scale.shape[-1] if transpose else shape[-1] // scale.shape[-1]
    operands = {"scale": scale.name}
    if global_scale is not None:
        operands["global"] = global_scale.name
    params = {"group": group, "transpose": transpose, "down": down, "divide": divide,
              "positive_zero": positive_zero}  # fmt: skip
    return QuantizedWeight("fp4", name, t.name, shape, operands, params)


#: Each method's reader of its quantized weights.
READERS: dict[str, Callable[..., dict[tuple[str, str], QuantizedWeight]]] = {
    "fp8": fp8_weights,
    "fbgemm_fp8": fp8_weights,
    "compressed-tensors": ct_weights,
    "mxfp4": fp4_weights,
    "modelopt": modelopt_weights,
    "bitsandbytes": bnb_weights,
    "gptq": gptq_weights,
    "awq": awq_weights,
}


def quantized_weights(
    folder: ModelFolder, quant: Quantization, role_of: dict[tuple[str, str], str]
) -> dict[tuple[str, str], QuantizedWeight]:
    """Every quantized weight of the model and how to dequantize it exactly, by (set
    key, source tensor name); a QuantizedModelError naming the first weight that cannot
    be reconstructed exactly.

    >>> # quantized_weights(folder, detect(folder), roles(folder))
    """
    return READERS[quant.method](folder, quant, role_of)


def check_dequantize(folder: ModelFolder, quant: Quantization, target: str) -> None:
    """Refuse a --dequantize fastcast cannot do exactly, before anything is written."""
    if quant.refused:
        raise _core.QuantizedModelError(refusal(folder, quant, target))
    if quant.not_dequantized:
        raise _core.QuantizedModelError(
            f"{folder.root}: quantized with {quant.describe()}; {quant.not_dequantized} "
            "(--keep-quantized keeps it as it is)"
        )
    if target not in COMPUTE_DTYPES:
        raise _core.QuantizedModelError(
            f"{folder.root}: --dequantize writes "
            f"{', '.join(short_name(t) for t in COMPUTE_DTYPES)}, not {short_name(target)}"
        )
