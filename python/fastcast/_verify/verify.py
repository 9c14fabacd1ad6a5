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

import importlib
import importlib.util
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcast import _core
from fastcast._arguments import as_patterns
from fastcast._dtypes import element_size, from_torch_name, is_castable, torch_name
from fastcast._output.record import RECORD_NAME, STAGING_DIR, OutputRecord, load_record, read_record
from fastcast._plan.dequantize import QuantizedWeight, quantized_weights, written_as
from fastcast._plan.merge import Change, Merged, Merging, Patched, SetMerge, for_set, plan_merge
from fastcast._plan.quantize import (
    CONSUMED,
    QUANTIZE_METHODS,
    QuantizeTarget,
    quantize_targets,
    requantize_targets,
)
from fastcast._plan.shards import added
from fastcast._progress import ByteProgress
from fastcast._source.adapter import open_adapter
from fastcast._source.config import config_dtypes, is_transformers_config, read_config
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import (
    ModelFolder,
    SourceFile,
    TorchOptions,
    WeightSet,
    open_model,
)
from fastcast._source.quantization import (
    SURVIVING_ROLES,
    Quantization,
    detect,
    roles,
    without_sidecars,
)
from fastcast._units import format_bytes
from fastcast._verify.compare import (
    CHUNK_ELEMENTS,
    MappedFile,
    Piece,
    bits_of,
    compare_run,
    in_torch,
    ranges,
    typed,
)
from fastcast._verify.merged import merged_reference, patched_reference, quantized_bounds
from fastcast._verify.references import dequantized, quantized

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
    merged: int = 0
    """Of the tensors checked, the weights ``--merge-lora`` merged (held to fp32's
    rounding of PEFT's merge, not to bits)."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.mismatches

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"verify {self.output} against {self.against} ({self.dtype}): {verdict}",
            f"  values: {self.tensors_checked} tensors, {format_bytes(self.bytes_checked)} "
            f"compared bit for bit with torch on {self.device}"
            + (
                f" ({self.merged} merged weights: held to PEFT's merge within fp32 "
                "rounding, not to bits)"
                if self.merged
                else ""
            ),
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
    own_dtypes: bool = False
    """``--quantize`` without a target: every tensor not quantized kept its dtype."""
    merging: Merging | None = None
    """``--merge-lora``: what the recorded adapter changed."""

    def merge_of(self, source: WeightSet) -> SetMerge:
        """The adapter's part in ``source`` (nothing when there was none)."""
        return for_set(self.merging, source.key) or SetMerge({}, {}, [])

    @property
    def copied(self) -> dict[str, Path]:
        """Files copied from elsewhere than the source (a merged adapter's tokenizer)."""
        return self.merging.adapter.tokenizer_files if self.merging else {}

    _expected: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """``expected`` per source set, made once (structure and values both read it)."""

    def quantized(self, source: WeightSet) -> dict[str, Quantized]:
        """``--quantize``: each output tensor written by quantizing a weight of ``source``
        (its values and its scales), by output name."""
        if self.quantize is None:
            return {}
        found = {}
        for (name, _), q in zip(self.written(source), self.targets(source), strict=True):
            if q.fate == "quantize":
                assert q.block is not None
                found[name] = Quantized(name, q.block, scales=False)
                found[q.scale_name] = Quantized(name, q.block, scales=True)
        return found

    def targets(self, source: WeightSet) -> list[QuantizeTarget]:
        """What the ``--quantize`` run made of each tensor of ``source`` (the core's rule;
        of a quantized source's dequantized weights, when it was dequantized first)."""
        assert self.quantize is not None
        weights = self.dequantized.get(source.key)
        if weights is not None:
            by_source = {w.source: w for w in weights.values()}
            return requantize_targets(source.tensors, by_source, self.target, self.keep,
                                      self.quantize)  # fmt: skip
        target = None if self.own_dtypes else self.target
        return quantize_targets(source.tensors, target, self.keep, self.quantize)

    def written(self, source: WeightSet) -> list[tuple[str, tuple[int, ...]]]:
        """Each tensor of ``source`` as the output names and shapes it: a dequantized
        weight's name and shape for the tensor holding its quantized values."""
        return written_as(source.tensors, self.dequantized.get(source.key, {}).values())

    def expected(self, source: WeightSet) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor the output should hold -> the dtype (the core's rule) and shape
        the conversion should have stored: a dequantized model holds its plain tensors
        and its dequantized weights (under their names and shapes), no other
        quantization state; a quantized one its quantized weights with their scales."""
        if source.key not in self._expected:
            self._expected[source.key] = self.make_expected(source)
        return self._expected[source.key]

    def make_expected(self, source: WeightSet) -> dict[str, tuple[str, tuple[int, ...]]]:
        tensors = self.merge_of(source).tensors(source.tensors)
        if self.quantize is not None:
            want: dict[str, tuple[str, tuple[int, ...]]] = {}
            for (name, shape), q in zip(self.written(source), self.targets(source), strict=True):
                if q.fate == CONSUMED:
                    continue  # state its weight's dequantization consumed
                want[name] = (q.dtype, shape)
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
            want = {t.name: (d, t.shape) for t, d in zip(tensors, dtypes, strict=True)}
            return self.merged_shapes(source, want)
        by_source = {w.source: w for w in weights.values()}
        roles = _core.quant_roles([t.name for t in tensors], [t.dtype for t in tensors])
        want = {}
        for t, d, role in zip(tensors, dtypes, roles, strict=True):
            w = by_source.get(t.name)
            if w is not None:
                want[w.name] = (self.target, w.shape)
            elif role in SURVIVING_ROLES:
                want[t.name] = (d, t.shape)
        return self.merged_shapes(source, want)

    def merged_shapes(
        self, source: WeightSet, want: dict[str, tuple[str, tuple[int, ...]]]
    ) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``want`` with ``--merge-lora``'s replacements in their shapes (a resized
        vocabulary) and its added tensors, as the conversion wrote them."""
        merge = self.merge_of(source)
        for name, e in merge.replaced.items():
            if name in want:
                want[name] = (want[name][0], e.shape)
        kept = self.keep == ["*"]  # converted without a dtype
        for t in added(source, merge, None if kept else self.target):
            want[t.name] = (t.dtype, t.shape)
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
        roles = _core.quant_roles([t.name for t in tensors], [t.dtype for t in tensors])
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
        typed = _core.quant_roles(list(want), [d for d, _ in want.values()])
        role_of = dict(zip(want, typed, strict=True))
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
    problems += check_files(src, out, pairing.copied)
    problems += check_readable(out)
    return problems


def check_readable(out: ModelFolder) -> list[str]:
    """Each output shard opens in safetensors itself, the reader users load it with (a
    header it refuses, over its 100 MB limit say, makes a shard no one can load).
    Paths that are not UTF-8 are left out: safetensors opens none."""
    from safetensors import safe_open

    problems = []
    for f in (f for ws in out.weight_sets for f in ws.files if not f.torch):
        try:
            os.fsencode(f.path).decode("utf-8")
        except UnicodeDecodeError:
            continue
        try:
            with safe_open(str(f.path), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # whatever safetensors raises, it is the finding
            problems.append(f"{f.path}: safetensors cannot open it: {e}")
    return problems


def check_configs(out: ModelFolder, target: str) -> list[str]:
    """Each config.json beside the weights claims the target, if it claims a dtype (a
    transformers config must)."""
    problems = []
    expected = torch_name(target)
    held: dict[str, set[str]] = {}
    for ws in out.weight_sets:
        held.setdefault(ws.folder, set()).update(t.dtype for t in ws.tensors)
    for rel in out.configs:
        if target not in held.get(rel.rpartition("/")[0], {target}):
            continue  # no weight beside it is in the target (fp4, fnuz...): left as it was
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


def check_files(
    src: ModelFolder, out: ModelFolder, copied: dict[str, Path] | None = None
) -> list[str]:
    """The source's other files came along (``copied``: those copied from elsewhere, a
    merged adapter's tokenizer files); nothing stray or half-written is left."""
    problems = []
    copied = copied or {}
    if not src.is_file:
        rels = [*src.copies, *(c for c in src.configs if c not in out.configs)]
        for rel in dict.fromkeys([*rels, *copied]):
            twin = out.root / rel
            if not twin.exists():
                problems.append(f"{rel}: in the source but not in the output")
            elif twin.stat().st_size != copied.get(rel, src.root / rel).stat().st_size:
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
        q = record.quantization
        return q.get("mode") == "dequantize" or "dequantized" in q
    return all(
        role in SURVIVING_ROLES
        for ws in out.weight_sets
        for role in _core.quant_roles([t.name for t in ws.tensors], [t.dtype for t in ws.tensors])
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


#: What ``verify`` needs beyond fastcast, and how to get it.
VERIFY_EXTRA = "pip install 'fastcast[verify]'"


def require_torch() -> None:
    """A one-line FastcastError when torch or safetensors (verify's oracle and reader)
    is missing: the conversion itself needs neither, so a plain install lacks them."""
    missing = []
    for module in ("torch", "safetensors"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise _core.FastcastError(
            f"verify compares with torch, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {VERIFY_EXTRA}"
        )


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


#: The fewest elements a worker compares at once, however many workers share the budget.
MIN_CHUNK_ELEMENTS = 1 << 20

#: An output file to check: its set's source tensors by name, the expected dtypes and
#: shapes, the dequantized weights and the quantized tensors, by output name.
FileJob = tuple[
    SourceFile,
    dict[str, TensorEntry],
    dict[str, tuple[str, tuple[int, ...]]],
    dict[str, QuantizedWeight],
    dict[str, Quantized],
    dict[str, Change],
]


def verify_values(
    pairing: Pairing, devices: list[str], progress: bool | None
) -> tuple[int, int, list[TensorMismatch]]:
    """Compare every output tensor with torch's cast of its source (or the format's
    reference math), file by file, in bounded chunks (see ``_verify/compare.py``).

    Output files are spread over the devices. Returns (tensors, bytes, mismatches).
    """
    files: list[FileJob] = []
    for source, converted in pairing.sets:
        merge = pairing.merge_of(source)
        sources = {t.name: t for t in merge.tensors(source.tensors)}
        sources.update(merge.replaced)
        sources.update({e.name: e for e in merge.added})
        expected = pairing.expected(source)
        weights = pairing.dequantized.get(source.key, {})
        quantized = pairing.quantized(source)
        merged = merge.merged
        files += [(f, sources, expected, weights, quantized, merged) for f in converted.files]
    total = sum(t.nbytes for f, *_ in files for t in f.tensors)
    lock = threading.Lock()
    on_cpu = devices[0] == "cpu"
    workers = max(1, len(devices) if not on_cpu else min(len(files), os.cpu_count() or 1))
    chunk = max(MIN_CHUNK_ELEMENTS, CHUNK_ELEMENTS // workers)

    def roomiest() -> str:
        """The GPU with the most free memory now (shards spread by free memory)."""
        if len(devices) == 1:
            return devices[0]
        import torch

        with lock:
            return max(devices, key=lambda d: torch.cuda.mem_get_info(d)[0])

    done = [0]
    with ByteProgress(total, "verifying", progress) as update:

        def update_progress(n: int) -> None:
            with lock:
                done[0] += n
                update(done[0])

        def check(job: FileJob) -> tuple[int, int, list[TensorMismatch]]:
            return FileCheck(job, roomiest(), chunk, update_progress).run()

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, files))
    mismatches = [m for r in results for m in r[2]]
    return sum(r[0] for r in results), sum(r[1] for r in results), mismatches


class FileCheck:
    """One output file compared with its sources on one device: plain tensors in runs
    (``_compare.compare_run``), dequantized and quantized ones against the formats'
    reference math (``_references``), every tensor a chunk at a time."""

    def __init__(
        self, job: FileJob, device: str, chunk: int, progress: Callable[[int], None]
    ) -> None:
        self.file, self.sources, self.expected, self.weights, self.quantized, self.merged = job
        self.device = device
        self.chunk = chunk
        self.progress = progress
        self.mapped: dict[Path, MappedFile] = {}
        self.loaded: dict[Path, Any] = {}  # torch.save sources, as torch loads them
        self.mismatches: list[TensorMismatch] = []
        self.checked = self.nbytes = 0
        #: The last quantized weight ``weight`` dequantized, kept for its next reader.
        self.last_weight: tuple[str, torch.Tensor | None] = ("", None)

    def run(self) -> tuple[int, int, list[TensorMismatch]]:
        plain: list[TensorEntry] = []
        for t in self.file.tensors:
            want = self.expected.get(t.name)
            if want is None or (t.dtype, t.shape) != want:
                continue  # not in the source, or a structural problem: reported there
            q = self.quantized.get(t.name)
            if q is not None and q.weight in self.merged:  # merged, then quantized
                self.merged_quantized(t, q)
                continue
            if t.name in self.merged:  # into a dequantized base too
                self.merge(t)
                continue
            if t.name in self.weights or t.name in self.quantized:
                self.special(t)
                continue
            if plain and not self.continues(plain[-1], t):
                self.plain_run(plain)
                plain = []
            plain.append(t)
        if plain:
            self.plain_run(plain)
        self.mapped.clear()  # unmapped as their last tensor goes
        return self.checked, self.nbytes, self.mismatches

    def map(self, path: Path) -> MappedFile:
        if path not in self.mapped:
            self.mapped[path] = MappedFile(path)
        return self.mapped[path]

    def read(self, name: str) -> torch.Tensor:
        """Source tensor ``name``, whole, on the CPU: a view of its mapped file (a
        torch.save file's as torch itself loads it, mapped)."""
        return self.read_entry(self.sources[name])

    def read_entry(self, entry: TensorEntry) -> torch.Tensor:
        """A tensor of any input (an adapter's too), as ``read``."""
        if entry.pickle_path is not None:
            return torch_source(entry, self.loaded)
        raw = self.map(entry.file).bytes(*entry.offsets)
        return typed(raw, entry.dtype).reshape(entry.shape)

    def continues(self, last: TensorEntry, t: TensorEntry) -> bool:
        """Whether ``t`` extends the run ending in ``last``: it follows it in the output
        and its source follows ``last``'s in the same safetensors file, in the same
        dtype pair."""
        a, b = self.sources[last.name], self.sources[t.name]
        return (
            last.offsets[1] == t.offsets[0]
            and last.dtype == t.dtype
            and a.pickle_path is None
            and b.pickle_path is None
            and a.file == b.file
            and a.dtype == b.dtype
            and a.offsets[1] == b.offsets[0]
        )

    def plain_run(self, run: list[TensorEntry]) -> None:
        """Compare tensors cast (or copied) from their sources, as one run of elements;
        a copy in a dtype no cast touches is compared byte for byte."""
        first = self.sources[run[0].name]
        src_dtype, dtype = first.dtype, run[0].dtype
        as_bytes = src_dtype == dtype and not in_torch(dtype)
        unit = 1 if as_bytes else element_size(dtype)
        src_unit = 1 if as_bytes else element_size(src_dtype)
        pieces, at = [], 0
        for t in run:
            n = t.nbytes // unit
            pieces.append(Piece(t.name, at, at + n, t.shape))
            at += n
        out, base, device = self.map(self.file.path), run[0].offsets[0], self.device

        def got(e0: int, e1: int) -> torch.Tensor:
            raw = out.bytes(base + e0 * unit, base + e1 * unit)
            return (raw if as_bytes else typed(raw, dtype)).to(device)

        want = self.source_run(first, as_bytes, src_unit, dtype)
        compare_run(
            pieces, got, want, "U8" if as_bytes else dtype, self.chunk,
            done=lambda n: self.progress(n * unit),
        )  # fmt: skip
        self.tally(pieces, "torch's cast")
        self.checked += len(run)
        self.nbytes += sum(t.nbytes for t in run)

    def source_run(
        self, first: TensorEntry, as_bytes: bool, unit: int, dtype: str
    ) -> Callable[[int, int], torch.Tensor]:
        """Elements ``[e0, e1)`` of a run's sources, cast by torch on the device to
        ``dtype`` (or, ``as_bytes``, the bytes themselves)."""
        device = self.device
        if first.pickle_path is not None:  # a run of one tensor: as torch loads it
            whole = torch_source(first, self.loaded).reshape(-1)
            cast = None if as_bytes else torch_dtype(dtype)
            if as_bytes:
                whole = bits_of(whole).view(-1).view(torch_dtype("U8"))

            def loaded(e0: int, e1: int) -> torch.Tensor:
                part = whole[e0:e1].to(device)
                return part if cast is None else part.to(cast)

            return loaded
        src, base = self.map(first.file), first.offsets[0]

        def mapped(e0: int, e1: int) -> torch.Tensor:
            raw = src.bytes(base + e0 * unit, base + e1 * unit)
            if as_bytes:
                return raw.to(device)
            return typed(raw, first.dtype).to(device).to(torch_dtype(dtype))

        return mapped

    def special(self, t: TensorEntry) -> None:
        """A dequantized tensor against its format's reference (fp32, then torch's own
        rounding to the output dtype), or a quantized one against --quantize's math."""
        q = self.quantized.get(t.name)
        if q is not None:  # of a dequantized weight too (--dequantize --quantize)
            ref = quantized(self.weight(q.weight), q.block, q.scales)
            oracle = "torch's reference quantization"
        else:
            ref = dequantized(self.weights[t.name], self.read)
            oracle = "torch's reference dequantization"
        out, device, dtype = self.map(self.file.path), self.device, t.dtype
        unit = element_size(dtype)

        def got(e0: int, e1: int) -> torch.Tensor:
            raw = out.bytes(t.offsets[0] + e0 * unit, t.offsets[0] + e1 * unit)
            return typed(raw, dtype).to(device)

        def want(e0: int, e1: int) -> torch.Tensor:
            return ref.values(e0, e1, device).to(torch_dtype(dtype))

        piece = Piece(t.name, 0, ref.numel, t.shape)
        chunk = max(ref.align, self.chunk // ref.cost)
        compare_run([piece], got, want, dtype, chunk, ref.align, lambda n: self.progress(n * unit))
        self.tally([piece], oracle)
        self.checked += 1
        self.nbytes += t.nbytes

    def weight(self, name: str) -> torch.Tensor:
        """Weight ``name`` of the source as the conversion read it: as stored, or a
        quantized one dequantized by its format's reference (fp32, whole)."""
        w = self.weights.get(name)
        if w is None:
            return self.read(name)
        if self.last_weight[0] != name:  # a requantized weight's values, then its scales
            d = dequantized(w, self.read)
            self.last_weight = (name, d.values(0, d.numel, "cpu").reshape(w.shape))
        assert self.last_weight[1] is not None
        return self.last_weight[1]

    def merge(self, t: TensorEntry) -> None:
        """A merged weight against PEFT's merge math in float64, within the bound an fp32
        merge rounded to the output dtype can err by (``_verify/merged.py``)."""
        base = self.weight(t.name)  # a quantized base: as its format's reference dequantizes it
        how = self.merged[t.name]
        if isinstance(how, Patched):
            ref = patched_reference(how, base, self.read_entry, t.dtype)
            oracle = "PEFT's index_copy of the trainable tokens (torch's cast, bit for bit)"
        else:
            ref = merged_reference(how, base, self.read_entry, t.dtype)
            oracle = "PEFT's merge (fp64, within fp32 rounding)"
        out, device, dtype = self.map(self.file.path), self.device, t.dtype
        unit = element_size(dtype)
        piece = Piece(t.name, 0, ref.numel, t.shape)
        for e0, e1 in ranges(ref.numel, self.chunk // 8, ref.align):
            raw = out.bytes(t.offsets[0] + e0 * unit, t.offsets[0] + e1 * unit)
            got = typed(raw, dtype).to(device)
            want, bound = ref.values(e0, e1, device)
            differ = ~((got.double() - want).abs() <= bound)
            if bool(differ.any()):
                piece.found.add(got, want.to(got.dtype), differ, e0, dtype)
            self.progress((e1 - e0) * unit)
        self.tally([piece], oracle)
        self.checked += 1
        self.nbytes += t.nbytes

    def merged_quantized(self, t: TensorEntry, q: Quantized) -> None:
        """A merged weight ``--quantize`` quantized, its e4m3 values and its scales checked
        together (one pass of the merge's reference for both, when the values are met)
        against PEFT's merge math in float64: each scale within the range the block's amax
        may have, each code between the codes of the lowest and highest value the merge
        may have, divided by its stored scale (``merged.quantized_bounds``)."""
        import torch

        if q.scales:
            return  # checked with its values, which a pair's shard holds
        scale_name = next(n for n, o in self.quantized.items()
                          if o.weight == q.weight and o.scales)  # fmt: skip
        stored = {e.name: e for e in self.file.tensors}
        if scale_name not in stored:
            return  # a pair is one shard's; the structure check reports one missing
        out, device = self.map(self.file.path), self.device
        scale_entry = stored[scale_name]
        scales = typed(out.bytes(*scale_entry.offsets), "F32").reshape(scale_entry.shape)
        base = self.weight(q.weight)
        rows, cols = base.shape
        how = self.merged[q.weight]
        assert isinstance(how, Merged), "trainable tokens are never quantized"
        ref = merged_reference(how, base, self.read_entry, "F32")
        br, bc = q.block
        codes = Piece(t.name, 0, math.prod(t.shape), t.shape)
        grid = Piece(scale_name, 0, math.prod(scale_entry.shape), scale_entry.shape)
        unit = element_size(t.dtype)
        step = max(1, self.chunk // (16 * cols * br)) * br  # whole block-rows
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            v, bound = ref.values(r0 * cols, r1 * cols, device)
            v, bound = v.reshape(r1 - r0, cols), bound.reshape(r1 - r0, cols)
            s = scales[r0 // br : -(-r1 // br)].to(device)
            lo, hi, s_lo, s_hi = quantized_bounds(v, bound, s, q.block)
            got = s.double()
            differ = ~((got >= s_lo) & (got <= s_hi))
            if bool(differ.any()):
                grid.found.add(got.reshape(-1), ((s_lo + s_hi) / 2).reshape(-1),
                               differ.reshape(-1), (r0 // br) * scales.shape[1], "F32")  # fmt: skip
            e0 = r0 * cols
            raw = out.bytes(t.offsets[0] + e0 * unit, t.offsets[0] + r1 * cols * unit)
            got = typed(raw, t.dtype).to(device).reshape(r1 - r0, cols).double()
            differ = ~((got >= lo) & (got <= hi))
            if bool(differ.any()):
                want = (v / s.double().repeat_interleave(br, 0)[: r1 - r0]
                        .repeat_interleave(bc, 1)[:, :cols]).clamp(-448, 448)  # fmt: skip
                codes.found.add(got.reshape(-1), want.reshape(-1).to(torch.float64),
                                differ.reshape(-1), e0, t.dtype)  # fmt: skip
            self.progress((r1 - r0) * cols * unit)
        self.tally([codes, grid], "PEFT's merge (fp64) quantized by --quantize's rule")
        self.checked += 2
        self.nbytes += t.nbytes + scale_entry.nbytes

    def tally(self, pieces: list[Piece], oracle: str) -> None:
        """Each piece with a mismatch, as a ``TensorMismatch``."""
        for p in pieces:
            f = p.found
            if f.count:
                index = tuple(unravel(f.at, p.shape))
                self.mismatches.append(
                    TensorMismatch(
                        p.name, self.file.path.name, f.count, p.end - p.begin, index,
                        f.got, f.want, oracle,
                    )
                )  # fmt: skip


def unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    """A flat element index as an index into ``shape``."""
    index = []
    for dim in reversed(shape):
        index.append(flat % dim if dim else 0)
        flat //= dim if dim else 1
    return index[::-1]


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


def merges_of(
    src: ModelFolder,
    record: OutputRecord | None,
    report: VerifyReport,
    weights: dict[tuple[str, str], QuantizedWeight] | None,
) -> Merging | None:
    """What the recorded ``--merge-lora`` adapter changed (None when the output was not
    merged), ``weights`` a dequantized base's; a problem in ``report`` if the adapter
    changed since."""
    if record is None or record.merge_lora is None:
        return None
    given = record.merge_lora.get("folder") or record.merge_lora.get("path", "")
    adapter = open_adapter(given)
    if adapter.digest() != record.merge_lora.get("sha256"):
        report.problems.append(
            f"{adapter.file.path}: the adapter's weights changed since the merge (sha256)"
        )
    return plan_merge(src, adapter, weights)


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
    require_torch()
    keep = None if keep is None else as_patterns(keep, "keep")
    record = load_record(Path(output)) if Path(output).is_dir() else None
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
    scheme = quantize_scheme(src, out, record)
    if kept_dtypes and scheme is None:  # converted without a dtype: every tensor kept its own
        keep = ["*"]
    devices = pick_devices(device)
    label = ", ".join(devices) if devices[0] != "cpu" else f"cpu ({os.cpu_count()} threads)"
    report = VerifyReport(Path(output), Path(against), target, label)
    sets, unpaired = pair_sets(src, out)
    quant = detect(src)
    dequantized: dict[str, dict[str, QuantizedWeight]] = {}
    weights = None
    if quant is not None and was_dequantized(out, record):
        weights = quantized_weights(src, quant, roles(src))
        for (key, _), w in weights.items():
            dequantized.setdefault(key, {})[w.name] = w
        src = without_sidecars(src)  # as the conversion left them out
    merging = merges_of(src, record, report, weights)
    pairing = Pairing(
        sets, target, list(keep or ()), quant, dequantized, scheme, own_dtypes=kept_dtypes,
        merging=merging,
    )  # fmt: skip
    report.problems = unpaired + check_structure(src, out, pairing)
    # held to a bound; trainable tokens' rows are held to bits like every other tensor
    report.merged = sum(isinstance(c, Merged) for c in merging.merged.values()) if merging else 0
    report.tensors_checked, report.bytes_checked, report.mismatches = verify_values(
        pairing, devices, progress
    )
    if load:
        report.load = load_model(out, devices)
    report.seconds = time.perf_counter() - started
    return report
