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

import fnmatch
import importlib.util
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcast import _core
from fastcast.dtype_table import from_torch_name, is_castable, torch_name
from fastcast.model_dir import (
    ModelFolder,
    TensorEntry,
    config_dtypes,
    open_model,
    read_config,
    tree_size,
)
from fastcast.progress import ByteProgress
from fastcast.units import format_bytes

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

    def describe(self) -> str:
        return (
            f"{self.name} ({self.file}): {self.count} of {self.numel} elements differ from "
            f"torch's cast; worst at {list(self.index)}: stored {self.got!r}, "
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


def infer_dtype(out: ModelFolder) -> str:
    """The target a conversion used: the castable dtype holding most output bytes."""
    by_bytes: dict[str, int] = {}
    for t in out.tensors:
        if is_castable(t.dtype):
            by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
    if not by_bytes:
        raise _core.ModelFolderError(f"{out.root}: holds no float tensors to verify")
    return max(by_bytes, key=lambda d: by_bytes[d])


def expected_dtype(src: TensorEntry, target: str, keep: Sequence[str]) -> str:
    if not is_castable(src.dtype):
        return src.dtype
    if any(fnmatch.fnmatchcase(src.name, p) for p in keep):
        return src.dtype
    return target


def check_structure(
    src: ModelFolder, out: ModelFolder, target: str, keep: Sequence[str]
) -> list[str]:
    """Every structural problem, as one line each (empty when all is well)."""
    problems: list[str] = list(out.warnings)
    want = {t.name: t for t in src.tensors}
    have = {t.name: t for t in out.tensors}
    problems += [f"tensor {n!r} is missing from the output" for n in want if n not in have]
    problems += [f"tensor {n!r} is not in the source" for n in have if n not in want]
    for name, s in want.items():
        o = have.get(name)
        if o is None:
            continue
        if o.shape != s.shape:
            problems.append(
                f"tensor {name!r} ({o.file.name}) has shape {list(o.shape)}, "
                f"the source {list(s.shape)}"
            )
        expected = expected_dtype(s, target, keep)
        if o.dtype != expected:
            problems.append(
                f"tensor {name!r} ({o.file.name}) is stored as {o.dtype}, expected {expected}"
            )
    for ws in out.weight_sets:
        if ws.index is None:
            continue
        meta = json.loads(ws.index.read_text(encoding="utf-8")).get("metadata", {})
        total = sum(t.nbytes for t in ws.tensors)
        if isinstance(meta, dict) and meta.get("total_size") not in (None, total):
            problems.append(
                f"{ws.index.name}: metadata.total_size is {meta['total_size']}, "
                f"the shards hold {total} bytes"
            )
    problems += check_config(src, out, target)
    problems += check_files(src, out)
    return problems


def check_config(src: ModelFolder, out: ModelFolder, target: str) -> list[str]:
    if out.config is None:
        return [f"{out.root}: config.json is missing"] if src.config else []
    expected = torch_name(target)
    claims = config_dtypes(read_config(out.config))
    if not claims:
        return [f"{out.config}: has no dtype; expected torch_dtype={expected}"]
    return [
        f"{out.config}: says {key}={value}, but the weights are {target} ({expected})"
        for key, value in claims.items()
        if from_torch_name(value) != target
    ]


def check_files(src: ModelFolder, out: ModelFolder) -> list[str]:
    problems = []
    for copy in src.copies:
        twin = out.root / copy.name
        if not twin.exists():
            problems.append(f"{copy.name}: in the source but not in the output")
        elif tree_size(twin) != tree_size(copy):
            problems.append(f"{copy.name}: differs in size from the source's")
    for stale in out.skipped:
        problems.append(f"{stale.name}: stray file in the output")
    for partial in out.root.glob(".*.fastcast-partial"):
        problems.append(f"{partial.name}: a half-written file (interrupted conversion?)")
    return problems


# --- values -------------------------------------------------------------------------


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
    src: ModelFolder,
    out: ModelFolder,
    target: str,
    keep: Sequence[str],
    devices: list[str],
    progress: bool | None,
) -> tuple[int, int, list[TensorMismatch]]:
    """Compare every output tensor with torch's cast of its source, file by file.

    Output files are spread over the devices; on each, one tensor pair at a time
    is resident. Returns (tensors, bytes, mismatches).
    """
    from safetensors import safe_open

    sources = {t.name: t for t in src.tensors}
    files = [f for ws in out.weight_sets for f in ws.files]
    total = sum(t.nbytes for f in files for t in f.tensors)

    lock = threading.Lock()

    def roomiest() -> str:
        """The GPU with the most free memory now (shards spread by free memory)."""
        if len(devices) == 1:
            return devices[0]
        import torch

        with lock:
            return max(devices, key=lambda d: torch.cuda.mem_get_info(d)[0])

    def check_file(f: Any) -> tuple[int, int, list[TensorMismatch]]:
        device = roomiest()
        found: list[TensorMismatch] = []
        checked = nbytes = 0
        with ExitStack() as stack:
            handle = stack.enter_context(safe_open(str(f.path), framework="pt", device=device))
            opened: dict[Path, Any] = {}
            for t in f.tensors:
                s = sources.get(t.name)
                if s is None:
                    continue
                if s.file not in opened:
                    opened[s.file] = stack.enter_context(
                        safe_open(str(s.file), framework="pt", device=device)
                    )
                expected = expected_dtype(s, target, keep)
                got = handle.get_tensor(t.name)
                if got.dtype != torch_dtype(expected) or got.shape != s.shape:
                    continue  # a structural problem, reported there
                # torch's own cast, on the same device: the independent oracle.
                want = opened[s.file].get_tensor(s.name).to(torch_dtype(expected))
                mismatch = compare(t.name, f.path.name, got, want, expected)
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


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, torch_name(name))
    return dtype


def load_model(output: Path, devices: list[str]) -> dict[str, int]:
    """Load the whole converted model as a user would; bytes resident per device."""
    import torch

    if importlib.util.find_spec("transformers") is not None and (output / "config.json").exists():
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
    for i, f in enumerate(sorted(output.glob("*.safetensors"))):
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
    against: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    device: str = "auto",
    load: bool = False,
    progress: bool | None = None,
) -> VerifyReport:
    """Check ``output`` against the folder it was converted from.

    ``dtype`` is the conversion's target (default: inferred from the output);
    ``keep`` lists name patterns left in their source dtype. ``device`` is
    ``auto`` (every GPU, else the CPU), ``cpu``, ``cuda`` or a list such as
    ``cuda:0,cuda:1``. ``load`` also loads the whole model as a user would.
    Problems and mismatches are reported, not raised; check ``report.ok``.

    >>> fastcast.verify("model-bf16/", against="model/").ok  # doctest: +SKIP
    True
    """
    started = time.perf_counter()
    src = open_model(against)
    out = open_model(output)
    target = _core.parse_dtype(dtype) if dtype else infer_dtype(out)
    devices = pick_devices(device)
    label = ", ".join(devices) if devices[0] != "cpu" else f"cpu ({os.cpu_count()} threads)"
    report = VerifyReport(Path(output), Path(against), target, label)
    report.problems = check_structure(src, out, target, keep)
    report.tensors_checked, report.bytes_checked, report.mismatches = verify_values(
        src, out, target, keep, devices, progress
    )
    if load:
        report.load = load_model(Path(output), devices)
    report.seconds = time.perf_counter() - started
    return report
