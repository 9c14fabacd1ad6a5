"""``fastcast.verify``: prove a converted folder is what it claims, with torch.

Two parts. *Structure*, from headers and json alone: every source tensor is in
the output exactly once with the expected shape and dtype, the index agrees
with the shards, config.json's dtype matches what is stored, and nothing stray
or half-written is left. *Values*: every output tensor is loaded with torch on
the GPU(s) (the CPU without one), the matching source tensor is loaded on the
same device and cast with torch's own ``.to(dtype)``, and the two are compared
bit for bit (NaN equal to NaN) — an independent check of fastcast's kernels.
One tensor at a time is held, on the host and on each device.

torch is imported only here, only when verifying: conversion never needs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcast import _core
from fastcast._config import config_dtypes, is_transformers_config, read_config
from fastcast._dtypes import from_torch_name, is_castable, torch_name
from fastcast._model_dir import (
    ModelFolder,
    SourceFile,
    TensorEntry,
    TorchOptions,
    WeightSet,
    open_model,
)
from fastcast._progress import ByteProgress
from fastcast._quant import (
    QUANTIZE_METHODS,
    Quantization,
    QuantizedWeight,
    QuantizeTarget,
    detect,
    quantize_targets,
    quantized_weights,
    roles,
)
from fastcast._record import RECORD_NAME, STAGING_DIR, OutputRecord, read_record
from fastcast._units import format_bytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMismatch:
    """A tensor whose stored values differ from torch's cast of the source."""

    name: str
    file: str
    count: int
    numel: int
    index: tuple[int, ...]
    got: float
    want: float
    oracle: str = "torch's cast"

    def describe(self) -> str:
        return (
            f"{self.name} ({self.file}): {self.count} of {self.numel} elements differ from "
            f"{self.oracle}; worst at {list(self.index)}: stored {self.got!r}, "
            f"torch gives {self.want!r}"
        )


@dataclass
class VerifyReport:
    """The outcome of a verification; ``ok`` is True only when nothing is wrong."""

    output: Path
    against: Path
    dtype: str
    device: str
    tensors_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    mismatches: list[TensorMismatch] = field(default_factory=list)
    seconds: float = 0.0
    load: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.mismatches

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"verify {self.output} against {self.against} ({self.dtype}): {verdict}",
            f"  values: {self.tensors_checked} tensors, {format_bytes(self.bytes_checked)} "
            f"compared bit for bit with torch on {self.device}",
            f"  time: {self.seconds:.1f} s",
        ]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(f"  mismatch: {m.describe()}" for m in self.mismatches)
        if self.load is not None:
            per_device = ", ".join(f"{d}: {format_bytes(b)}" for d, b in self.load.items())
            lines.append(f"  load: the whole model loaded ({per_device})")
        return "\n".join(lines)


# --- structure ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pairing:
    """What verify compares: each output weight set with the source set it came from
    (by output name: ``unet/diffusion_pytorch_model``), and the rules of the run."""

    sets: list[tuple[WeightSet, WeightSet]]
    target: str
    keep: list[str]
    quantization: Quantization | None = None
    """The source's quantization (kept as it was, unless ``dequantized``)."""
    dequantized: dict[str, dict[str, QuantizedWeight]] = field(default_factory=dict)
    """Per source set: each dequantized weight, by its name in the output."""
    quantize: str | None = None
    """The ``--quantize`` scheme that made the output from a plain source, if one did."""

    def quantized(self, source: WeightSet) -> dict[str, Quantized]:
        """``--quantize``: each output tensor written by quantizing a weight of ``source``
        (its values and its scales), by output name."""
        if self.quantize is None:
            return {}
        found = {}
        tensors = source.tensors
        for t, q in zip(tensors, self.targets(source), strict=True):
            if q.fate == "quantize":
                assert q.block is not None
                found[t.name] = Quantized(t.name, q.block, scales=False)
                found[q.scale_name] = Quantized(t.name, q.block, scales=True)
        return found

    def targets(self, source: WeightSet) -> list[QuantizeTarget]:
        """What the ``--quantize`` run made of each tensor of ``source`` (the core's rule)."""
        assert self.quantize is not None
        return quantize_targets(source.tensors, self.target, self.keep, self.quantize)

    def expected(self, source: WeightSet) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor the output should hold -> the dtype (the core's rule) and shape
        the conversion should have stored: a dequantized model holds its plain tensors
        and its dequantized weights (under their names and shapes), no other
        quantization state; a quantized one its quantized weights with their scales."""
        tensors = source.tensors
        if self.quantize is not None:
            want: dict[str, tuple[str, tuple[int, ...]]] = {}
            for t, q in zip(tensors, self.targets(source), strict=True):
                want[t.name] = (q.dtype, t.shape)
                if q.scale is not None:
                    want[q.scale[0]] = ("F32", q.scale[1])
            return want
        dtypes = _core.target_dtypes(
            [(t.name, t.dtype) for t in tensors],
            self.target,
            self.keep,
            quantized=self.quantization is not None,
        )
        weights = self.dequantized.get(source.key)
        if weights is None:
            return {t.name: (d, t.shape) for t, d in zip(tensors, dtypes, strict=True)}
        by_source = {w.source: w for w in weights.values()}
        roles = _core.quant_roles([t.name for t in tensors])
        want = {}
        for t, d, role in zip(tensors, dtypes, roles, strict=True):
            w = by_source.get(t.name)
            if w is not None:
                want[w.name] = (self.target, w.shape)
            elif role in ("plain", "pinned fp32"):
                want[t.name] = (d, t.shape)
        return want


@dataclass(frozen=True)
class Quantized:
    """An output tensor ``--quantize`` wrote from the source weight ``weight``: its e4m3
    values, or (``scales``) their F32 scales."""

    weight: str
    block: tuple[int, int]
    scales: bool


def infer_dtype(out: ModelFolder) -> str:
    """The target a conversion used: the castable dtype holding most output bytes,
    quantization state aside (an fp8 model's weights are fp8 whatever it was cast to)."""
    by_bytes: dict[str, int] = {}
    for ws in out.weight_sets:
        tensors = ws.tensors
        roles = _core.quant_roles([t.name for t in tensors])
        for t, role in zip(tensors, roles, strict=True):
            if is_castable(t.dtype) and role == "plain":
                by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
    if not by_bytes:
        raise _core.ModelFolderError(f"{out.root}: holds no float tensors to verify")
    return max(by_bytes, key=lambda d: by_bytes[d])


def pair_sets(
    src: ModelFolder, out: ModelFolder
) -> tuple[list[tuple[WeightSet, WeightSet]], list[str]]:
    """Output sets matched with source sets by name; a problem line for each set that
    is in one and not the other."""
    theirs = {ws.key: ws for ws in src.weight_sets}
    ours = {ws.key: ws for ws in out.weight_sets}
    if (src.is_file and out.is_file) or len(theirs) == len(ours) == 1:
        return [(src.weight_sets[0], out.weight_sets[0])], []
    problems = [f"weight set {k} is missing from the output" for k in theirs if k not in ours]
    problems += [f"weight set {k} is not in the source" for k in ours if k not in theirs]
    return [(theirs[k], ours[k]) for k in theirs if k in ours], problems


def check_structure(src: ModelFolder, out: ModelFolder, pairing: Pairing) -> list[str]:
    """Every structural problem, as one line each (empty when all is well)."""
    problems: list[str] = list(out.warnings)
    for source, converted in pairing.sets:
        where = f" in {converted.key}" if len(pairing.sets) > 1 else ""
        want = pairing.expected(source)
        role_of = dict(zip(want, _core.quant_roles(list(want)), strict=True))
        have = {t.name: t for t in converted.tensors}
        problems += [
            f"tensor {n!r}{where} is missing from the output" for n in want if n not in have
        ]
        problems += [f"tensor {n!r}{where} is not in the source" for n in have if n not in want]
        for name, (dtype, shape) in want.items():
            o = have.get(name)
            if o is None:
                continue
            if o.shape != shape:
                problems.append(
                    f"tensor {name!r} ({o.file.name}) has shape {list(o.shape)}, "
                    f"the source {list(shape)}"
                )
            if o.dtype != dtype and pairing.quantization and role_of[name] != "plain":
                problems.append(
                    f"tensor {name!r} ({o.file.name}) is quantization state ({role_of[name]}) "
                    f"of a {pairing.quantization.method} model, stored as {o.dtype} instead of "
                    f"{dtype}: a blanket cast, which breaks the model (the scales are "
                    "not applied); convert it again with --keep-quantized"
                )
            elif o.dtype != dtype:
                problems.append(
                    f"tensor {name!r} ({o.file.name}) is stored as {o.dtype}, expected {dtype}"
                )
        if converted.index is not None:
            meta = json.loads(converted.index.read_text(encoding="utf-8")).get("metadata", {})
            total = sum(t.nbytes for t in converted.tensors)
            if isinstance(meta, dict) and meta.get("total_size") not in (None, total):
                problems.append(
                    f"{converted.index.name}: metadata.total_size is {meta['total_size']}, "
                    f"the shards hold {total} bytes"
                )
    if pairing.keep != ["*"]:  # every tensor kept its dtype: the configs were copied
        problems += check_configs(out, pairing.target)
    problems += check_files(src, out)
    return problems


def check_configs(out: ModelFolder, target: str) -> list[str]:
    """Each config.json beside the weights claims the target, if it claims a dtype (a
    transformers config must)."""
    problems = []
    expected = torch_name(target)
    for rel in out.configs:
        path = out.root / rel
        config = read_config(path)
        claims = config_dtypes(config)
        if not claims and is_transformers_config(config):
            problems.append(f"{path}: has no dtype; expected torch_dtype={expected}")
        problems += [
            f"{path}: says {key}={value}, but the weights are {target} ({expected})"
            for key, value in claims.items()
            if from_torch_name(value) != target
        ]
    return problems


def check_files(src: ModelFolder, out: ModelFolder) -> list[str]:
    """The source's other files came along; nothing stray or half-written is left."""
    problems = []
    if not src.is_file:
        for rel in src.copies + [c for c in src.configs if c not in out.configs]:
            twin = out.root / rel
            if not twin.exists():
                problems.append(f"{rel}: in the source but not in the output")
            elif twin.stat().st_size != (src.root / rel).stat().st_size:
                problems.append(f"{rel}: differs in size from the source's")
    for stale in out.skipped:
        if stale.reason == "weights in another format" or stale.reason.startswith("variant"):
            problems.append(f"{stale.path}: stray file in the output ({stale.reason})")
    if not out.is_file:
        if (out.root / STAGING_DIR).exists():
            problems.append(f"{STAGING_DIR}/: an unfinished conversion (finish it with --resume)")
        for partial in out.root.rglob(f"*{_core.PARTIAL_SUFFIX}"):
            problems.append(f"{partial.name}: a half-written file (interrupted conversion?)")
        record = read_record(out.root)
        if record is not None:
            problems += [
                f"{rel}: written by the conversion (see {RECORD_NAME}) but missing"
                for rel in record.files
                if not (out.root / rel).exists()
            ]
    return problems


# --- values -------------------------------------------------------------------------


def was_dequantized(out: ModelFolder, record: OutputRecord | None) -> bool:
    """Whether a quantized source's conversion dequantized it: its record says so, or
    (made elsewhere) the output holds no quantization state."""
    if record is not None and record.quantization is not None:
        return record.quantization.get("mode") == "dequantize"
    return all(
        role == "plain" or role == "pinned fp32"
        for ws in out.weight_sets
        for role in _core.quant_roles([t.name for t in ws.tensors])
    )


def quantize_scheme(src: ModelFolder, out: ModelFolder, record: OutputRecord | None) -> str | None:
    """The ``--quantize`` scheme that made ``out`` from ``src``, if one did: its record
    says so, or (made elsewhere) a plain source has an output quantized in one of the
    layouts --quantize writes."""
    methods = {method: scheme for scheme, method in QUANTIZE_METHODS.items()}
    if record is not None:
        q = record.quantization
        return methods.get(q["method"]) if q and q.get("mode") == "quantize" else None
    found = detect(out)
    if found is None or detect(src) is not None:
        return None
    return methods.get(found.method)


def pick_devices(device: str) -> list[str]:
    """``auto``: every visible GPU, else the CPU; or ``cpu``, ``cuda``, ``cuda:0,cuda:1``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise _core.FastcastError("--device cuda: torch sees no CUDA device")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = [d.strip() for d in device.split(",") if d.strip()]
    for d in devices:
        try:
            torch.empty(0, device=d)
        except (RuntimeError, AssertionError) as e:
            raise _core.FastcastError(f"--device {d}: {e}") from None
    return devices


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of the same width."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.dtype != torch.bool else t.view(torch.uint8)


def nan_mask(bits: torch.Tensor, dtype: str) -> torch.Tensor:
    """NaN positions, from bits (torch lacks isnan for fp8 on some devices)."""
    import torch

    wide = bits.to(torch.int64)
    masks = {
        "F64": (0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
        "F32": (0x7FFF_FFFF, 0x7F80_0000),
        "F16": (0x7FFF, 0x7C00),
        "BF16": (0x7FFF, 0x7F80),
        "F8_E5M2": (0x7F, 0x7C),
    }
    if dtype == "F8_E4M3":
        return (wide & 0x7F) == 0x7F
    if dtype not in masks:
        return bits != bits  # never NaN
    magnitude, inf = masks[dtype]
    return (wide & magnitude) > inf


def compare(
    name: str, file: str, got: torch.Tensor, want: torch.Tensor, dtype: str
) -> TensorMismatch | None:
    """None when equal bit for bit (any NaN matching any NaN); else the count and
    the worst element (largest difference; for integers, the first)."""
    import torch

    a, b = bits_view(got).reshape(-1), bits_view(want).reshape(-1)
    differ = a != b
    is_float = is_castable(dtype)
    if is_float:
        differ &= ~(nan_mask(a, dtype) & nan_mask(b, dtype))
    count = int(differ.sum())
    if count == 0:
        return None
    if is_float:
        gap = (got.reshape(-1).double() - want.reshape(-1).double()).abs()
        gap = torch.where(differ, torch.nan_to_num(gap, nan=float("inf")), -1.0)
        flat = int(gap.argmax())
        got_value = float(got.reshape(-1)[flat].double())
        want_value = float(want.reshape(-1)[flat].double())
    else:
        flat = int(differ.nonzero()[0])
        got_value, want_value = float(a[flat]), float(b[flat])
    index: tuple[int, ...] = ()
    if got.dim():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape))
    return TensorMismatch(name, file, count, got.numel(), index, got_value, want_value)


def verify_values(
    pairing: Pairing, devices: list[str], progress: bool | None
) -> tuple[int, int, list[TensorMismatch]]:
    """Compare every output tensor with torch's cast of its source, file by file.

    Output files are spread over the devices; on each, one tensor pair at a time
    is resident. Returns (tensors, bytes, mismatches).
    """
    from safetensors import safe_open

    # Each output file, with its set's source tensors, the expected dtypes and shapes,
    # and the dequantized weights.
    files: list[FileJob] = []
    for source, converted in pairing.sets:
        sources = {t.name: t for t in source.tensors}
        expected = pairing.expected(source)
        weights = pairing.dequantized.get(source.key, {})
        quantized = pairing.quantized(source)
        files += [(f, sources, expected, weights, quantized) for f in converted.files]
    total = sum(t.nbytes for f, *_ in files for t in f.tensors)

    lock = threading.Lock()

    def roomiest() -> str:
        """The GPU with the most free memory now (shards spread by free memory)."""
        if len(devices) == 1:
            return devices[0]
        import torch

        with lock:
            return max(devices, key=lambda d: torch.cuda.mem_get_info(d)[0])

    def check_file(job: FileJob) -> tuple[int, int, list[TensorMismatch]]:
        f, sources, expected_tensors, weights, quantized = job
        device = roomiest()
        found: list[TensorMismatch] = []
        checked = nbytes = 0
        with ExitStack() as stack:
            handle = stack.enter_context(safe_open(str(f.path), framework="pt", device=device))
            opened: dict[Path, Any] = {}

            def read(name: str) -> torch.Tensor:
                entry = sources[name]
                if entry.pickle_path is not None:  # a torch.save source: torch loads it
                    return torch_source(entry, opened).to(device)
                if entry.file not in opened:
                    opened[entry.file] = stack.enter_context(
                        safe_open(str(entry.file), framework="pt", device=device)
                    )
                tensor: torch.Tensor = opened[entry.file].get_tensor(entry.name)
                return tensor

            for t in f.tensors:
                if t.name not in expected_tensors:
                    continue  # not in the source: a structural problem, reported there
                expected, shape = expected_tensors[t.name]
                got = handle.get_tensor(t.name)
                if got.dtype != torch_dtype(expected) or tuple(got.shape) != shape:
                    continue  # a structural problem, reported there
                # torch on the same device is the independent oracle: its own cast, the
                # reference dequantization (fp32, then its own cast) or quantization.
                w = weights.get(t.name)
                q = quantized.get(t.name)
                if w is not None:
                    want = dequantize_reference(w, read).to(torch_dtype(expected))
                elif q is not None:
                    want = quantize_reference(read(q.weight), q.block)[int(q.scales)]
                else:
                    want = read(t.name).to(torch_dtype(expected))
                mismatch = compare(t.name, f.path.name, got, want, expected)
                if mismatch and w is not None:
                    mismatch = replace(mismatch, oracle="torch's reference dequantization")
                if mismatch and q is not None:
                    mismatch = replace(mismatch, oracle="torch's reference quantization")
                if mismatch:
                    found.append(mismatch)
                checked += 1
                nbytes += t.nbytes
                update_progress(t.nbytes)
                del got, want
        return checked, nbytes, found

    done = [0]
    with ByteProgress(total, "verifying", progress) as update:

        def update_progress(n: int) -> None:
            with lock:
                done[0] += n
                update(done[0])

        workers = len(devices) if devices[0] != "cpu" else min(len(files), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(check_file, files))
    mismatches = [m for r in results for m in r[2]]
    return sum(r[0] for r in results), sum(r[1] for r in results), mismatches


#: An output file to check: its set's source tensors by name, the expected dtypes and
#: shapes, the dequantized weights and the quantized tensors, by output name.
FileJob = tuple[
    SourceFile,
    dict[str, TensorEntry],
    dict[str, tuple[str, tuple[int, ...]]],
    dict[str, QuantizedWeight],
    dict[str, Quantized],
]

#: bitsandbytes' LLM.int8 multiplier (``int8_vectorwise_dequant``): 1/127 as an f32.
RECIPROCAL_127 = 7.874015718698502e-3
#: AutoAWQ GEMM: output ``j`` of each group of eight sits in nibble ``AWQ_NIBBLE[j]``
#: (the inverse of the packing order [0, 2, 4, 6, 1, 3, 5, 7]).
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def dequantize_reference(w: QuantizedWeight, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The reference math of ``w``'s format in torch, on the device its tensors are
    read to (``read(name)``): fp32 values, each as the format's own library computes
    it, independent of fastcast's core. Round once to the target to compare."""
    q = read(w.source)
    ops = {role: read(name) for role, name in w.operands.items()}
    p = w.params
    if w.kind == "fp8_scaled":
        return fp8_reference(q, ops["scale"], p["block"])
    if w.kind == "bnb4":
        return bnb4_reference(q, ops, w.shape, p)
    if w.kind == "int8_rows":
        # bitsandbytes' order: (CB * SCB) * f32(1/127), not / 127.
        return q.float() * ops["scb"].float().view(-1, 1) * RECIPROCAL_127
    if w.kind == "gptq":
        g_idx = ops.get("g_idx")
        return gptq_reference(q, ops["qzeros"], ops["scales"], g_idx, p)
    return awq_reference(q, ops["qzeros"], ops["scales"], p["group_size"])


def fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8: each value as fp32 times its block's scale as fp32 (an fp32 product, as
    DeepSeek's ``weight_dequant`` and compressed-tensors compute it), the weight seen
    as 2-D with partial edge blocks cut to the weight."""
    cols = q.shape[-1] if q.dim() else 1
    rows = q.numel() // cols if cols else 0
    br, bc = block
    grid = scale.float().reshape(-(-rows // br), -(-cols // bc))
    full = grid.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (q.float().reshape(rows, cols) * full).reshape(q.shape)


def bnb4_reference(
    packed: torch.Tensor,
    ops: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    p: dict[str, Any],
) -> torch.Tensor:
    """bitsandbytes nf4/fp4: the container's bytes, two codes each (high nibble first),
    ``quant_map[code] * absmax[k // blocksize]``; with double quant the absmax is
    ``nested_quant_map[absmax_u8] * nested_absmax[b // nested_blocksize]``, then plus the
    offset as an f32 (``dequantize_blockwise``, then ``+=``)."""
    import torch

    n = math.prod(shape)
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n].long()
    absmax = ops["absmax"]
    if "nested_absmax" in ops:
        outer = ops["nested_absmax"].float().repeat_interleave(p["nested_blocksize"])
        absmax = ops["nested_quant_map"].float()[absmax.long()] * outer[: absmax.numel()]
        absmax = absmax + torch.tensor(p["offset"], dtype=torch.float32, device=absmax.device)
    per_value = absmax.float().repeat_interleave(p["blocksize"])[:n]
    return (ops["quant_map"].float()[codes] * per_value).reshape(shape)


def unpack_words(
    words: torch.Tensor, bits: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """int32 words ``[..., m]`` -> ``[..., m * 32 // bits]`` values, low bits first (value
    ``j`` of a word at slot ``order[j]`` when given)."""
    import torch

    slots = list(order) if order is not None else list(range(32 // bits))
    shifts = torch.tensor(slots, dtype=torch.int32, device=words.device) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*words.shape[:-1], -1)


def gptq_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    p: dict[str, Any],
) -> torch.Tensor:
    """GPTQ: ``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])``, ``q`` packed along the
    inputs, ``z`` along the outputs, ``z`` the stored zero plus one for v1, ``g`` =
    ``g_idx[i]`` (else ``i // group_size``); ``[out, in]``."""
    import torch

    bits = p["bits"]
    inputs = qweight.shape[0] * 32 // bits
    q = unpack_words(qweight.t(), bits).t()  # [in, out]
    zeros = unpack_words(qzeros, bits) + int(p["zero_plus_one"])  # [groups, out]
    g = (
        g_idx.long()
        if g_idx is not None
        else torch.arange(inputs, device=qweight.device) // p["group_size"]
    )
    return (scales.float()[g] * (q - zeros[g]).float()).t().contiguous()


def awq_reference(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """AutoAWQ GEMM: values packed along the outputs in AWQ's order, ``W[o, i] =
    scales[i // group_size, o] * (q[i, o] - z[i // group_size, o])``; ``[out, in]``."""
    import torch

    q = unpack_words(qweight, 4, AWQ_NIBBLE)  # [in, out]
    zeros = unpack_words(qzeros, 4, AWQ_NIBBLE)  # [groups, out]
    g = torch.arange(q.shape[0], device=qweight.device) // group_size
    return (scales.float()[g] * (q - zeros[g]).float()).t().contiguous()


#: float8_e4m3fn's largest finite value: a block's scale is its amax over it.
E4M3_MAX = 448.0
#: The smallest amax a scale is made from (an all-zero block's scale stays positive).
MIN_AMAX = 1e-12


def quantize_reference(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``--quantize``'s math in torch, on ``w``'s device, independent of fastcast's core:
    the weight seen as 2-D, per block (edge blocks cut to the weight), ``s =
    amax.clamp(min=1e-12) / 448`` in fp32 (a NaN in the block makes it NaN), then ``q =
    (W / s).clamp(-448, 448)`` rounded to float8_e4m3fn. Returns ``(q, s)``, ``s`` the
    scale grid ``[ceil(rows / block[0]), ceil(cols / block[1])]``."""
    import torch

    cols = w.shape[-1]
    rows = w.numel() // cols
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    x = w.float().reshape(rows, cols)
    magnitude = x.abs()
    if (grid[0] * br, grid[1] * bc) != (rows, cols):  # edge blocks: pad with zeros
        magnitude = torch.nn.functional.pad(magnitude, (0, grid[1] * bc - cols,
                                                        0, grid[0] * br - rows))  # fmt: skip
    amax = magnitude.reshape(grid[0], br, grid[1], bc).amax(dim=(1, 3))
    del magnitude
    s = amax.clamp(min=MIN_AMAX) / E4M3_MAX
    full = s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    q = (x / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(w.shape), s


def torch_source(entry: TensorEntry, opened: dict[Path, Any]) -> torch.Tensor:
    """A tensor of a torch.save file as torch itself loads it (``weights_only=True``,
    mapped): the oracle for what fastcast read from the file without torch."""
    import torch

    if entry.file not in opened:
        opened[entry.file] = torch.load(
            entry.file, map_location="cpu", weights_only=True, mmap=True
        )
    value = opened[entry.file]
    for key in entry.pickle_path or ():
        value = value[key]
    assert isinstance(value, torch.Tensor), entry.pickle_path
    return value.contiguous()


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, torch_name(name))
    return dtype


def load_model(out: ModelFolder, devices: list[str]) -> dict[str, int]:
    """Load the whole converted model as a user would (transformers, for a folder with
    a transformers config.json; else every weight file with safetensors); bytes
    resident per device."""
    import torch

    output = out.root
    config = output / "config.json"
    if (
        importlib.util.find_spec("transformers") is not None
        and not out.is_file
        and config.exists()
        and is_transformers_config(read_config(config))
    ):
        import transformers

        kwargs: dict[str, Any] = {}
        if devices[0] != "cpu":
            kwargs["device_map"] = "auto"
        model = transformers.AutoModel.from_pretrained(output, **kwargs)
        usage: dict[str, int] = {}
        for p in list(model.parameters()) + list(model.buffers()):
            usage[str(p.device)] = usage.get(str(p.device), 0) + p.numel() * p.element_size()
        del model
        return usage
    from safetensors.torch import load_file

    usage = {}
    for i, f in enumerate(f.path for ws in out.weight_sets for f in ws.files):
        device = devices[i % len(devices)]
        state = load_file(str(f), device=device)
        usage[device] = usage.get(device, 0) + sum(
            t.numel() * t.element_size() for t in state.values()
        )
        del state
    if devices[0] != "cpu":
        torch.cuda.empty_cache()
    return usage


def verify(
    output: str | os.PathLike[str],
    against: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    keep: Sequence[str] | None = None,
    variant: str | None = None,
    device: str = "auto",
    load: bool = False,
    progress: bool | None = None,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
) -> VerifyReport:
    """Check ``output`` against the model it was converted from.

    A fastcast output remembers how it was made (its ``fastcast.json``): the source,
    the target dtype, the ``keep`` patterns and the variant, so none of these needs
    saying; each argument given overrides the record (for folders made elsewhere,
    ``against`` is required and ``dtype`` is inferred from the stored weights).
    A torch.save source is read as convert reads it (``state_dict_key`` and
    ``strip_prefix``: the record's pair unless either is given) and its tensors loaded for the
    comparison by torch itself (``torch.load(weights_only=True, mmap=True)``).
    ``device`` is ``auto`` (every GPU, else the CPU), ``cpu``, ``cuda`` or a list
    such as ``cuda:0,cuda:1``. ``load`` also loads the whole model as a user would.
    Problems and mismatches are reported, not raised; check ``report.ok``.

    >>> fastcast.verify("model-bf16/").ok  # doctest: +SKIP
    True
    """
    started = time.perf_counter()
    record = read_record(Path(output)) if Path(output).is_dir() else None
    if against is None:
        if record is None:
            raise _core.ModelFolderError(
                f"{output}: has no {RECORD_NAME} saying what it was converted from; "
                "pass --against SOURCE"
            )
        against = record.source
    options = TorchOptions(state_dict_key, strip_prefix)
    kept_dtypes = False
    if record is not None:
        keep = list(record.keep) if keep is None else keep
        variant = record.variant if variant is None else variant
        kept_dtypes = dtype is None and record.dtype is None
        dtype = record.dtype if dtype is None else dtype
        if state_dict_key is None and strip_prefix is None:
            options = TorchOptions(record.state_dict_key, record.strip_prefix)
    src = open_model(against, variant, options)
    out = open_model(output)
    target = _core.parse_dtype(dtype) if dtype else infer_dtype(out)
    if kept_dtypes:  # converted without a dtype: every tensor kept its own
        keep = ["*"]
    devices = pick_devices(device)
    label = ", ".join(devices) if devices[0] != "cpu" else f"cpu ({os.cpu_count()} threads)"
    report = VerifyReport(Path(output), Path(against), target, label)
    sets, unpaired = pair_sets(src, out)
    quant = detect(src)
    dequantized: dict[str, dict[str, QuantizedWeight]] = {}
    if quant is not None and was_dequantized(out, record):
        for (key, _), w in quantized_weights(src, quant, roles(src)).items():
            dequantized.setdefault(key, {})[w.name] = w
    scheme = quantize_scheme(src, out, record)
    pairing = Pairing(sets, target, list(keep or ()), quant, dequantized, scheme)
    report.problems = unpaired + check_structure(src, out, pairing)
    report.tensors_checked, report.bytes_checked, report.mismatches = verify_values(
        pairing, devices, progress
    )
    if load:
        report.load = load_model(out, devices)
    report.seconds = time.perf_counter() - started
    return report
