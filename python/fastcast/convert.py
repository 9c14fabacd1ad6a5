"""``fastcast.convert``: a model folder in, a re-typed, re-sharded model folder out.

Order of work, chosen so that a folder with an index is a finished conversion:
check everything (input, output, disk space) before writing anything; copy
the other files; write the shards (each under a temporary name, synced and
renamed when complete); then config.json; then the index, last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastcast import _core
from fastcast._core import InsufficientSpaceError, ModelFolderError, OutputExistsError
from fastcast.model_dir import (
    CONFIG_NAME,
    ModelFolder,
    config_dtypes,
    copy_atomic,
    open_model,
    read_config,
    retype_config,
    tree_size,
    write_text_atomic,
)
from fastcast.plan import ConversionPlan, plan_conversion
from fastcast.progress import ByteProgress
from fastcast.units import format_bytes, parse_size

DEFAULT_SHARD_SIZE = "5GB"
#: Folder-name suffix for each target dtype (``model`` → ``model-bf16``).
SHORT_NAMES = {
    "BF16": "bf16",
    "F16": "fp16",
    "F32": "fp32",
    "F64": "fp64",
    "F8_E4M3": "fp8_e4m3",
    "F8_E5M2": "fp8_e5m2",
}
#: Room for headers, the index and config.json on top of the tensor bytes.
HEADER_ALLOWANCE = 1 << 20


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did; ``summary()`` renders it for people."""

    source: Path
    output: Path
    dtype: str
    shards: list[str]
    indexes: list[str]
    tensors_cast: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    config: dict[str, tuple[str, str]] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Input bytes per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} ({self.dtype})",
            f"  tensors: {self.tensors_cast} cast, {self.tensors_copied} copied as they were",
            f"  bytes: {format_bytes(self.bytes_read)} read, "
            f"{format_bytes(self.bytes_written)} written in {len(self.shards)} "
            f"shard{'s' if len(self.shards) != 1 else ''}"
            + (f" + {', '.join(self.indexes)}" if self.indexes else ""),
            f"  time: {self.seconds:.1f} s ({format_bytes(self.throughput)}/s)",
        ]
        if self.config:
            changes = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in self.config.items())
            lines.append(f"  config.json: {changes}")
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def default_output(model: ModelFolder, source: Path, dtype: str) -> Path:
    """``<model>-<dtype>`` beside the input (``model-bf16``, ``weights-fp16``)."""
    short = SHORT_NAMES.get(dtype, dtype.lower())
    if model.is_file:
        return source.parent / f"{model.weight_sets[0].prefix}-{short}"
    resolved = source.resolve()
    return resolved.parent / f"{resolved.name}-{short}"


def check_output(output: Path, model: ModelFolder, source: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or sits inside the input, or that exists."""
    out = output.resolve()
    root = model.root.resolve()
    if model.is_file:
        if out == source.resolve():
            raise OutputExistsError(f"{output}: is the input file")
    elif out == root or root in out.parents:
        raise OutputExistsError(f"{output}: is inside the input folder {model.root}")
    if out in root.parents or (model.is_file and out == root):
        raise OutputExistsError(f"{output}: holds the input {source}; choose another folder")
    if output.exists():
        if not output.is_dir():
            raise OutputExistsError(f"{output}: exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"{output}: already exists and is not empty (pass --overwrite to replace it)"
            )


def check_space(output: Path, need: int, overwrite: bool) -> None:
    """Fail before writing anything when the output's filesystem is too full."""
    probe = output
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    reclaimed = tree_size(output) if overwrite and output.exists() else 0
    if need > free + reclaimed:
        raise InsufficientSpaceError(
            f"{output}: not enough disk space: the output needs {format_bytes(need)}, "
            f"{format_bytes(free + reclaimed)} is free"
        )


def clear_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def chunk_bytes_for(max_memory: int | str | None, threads: int) -> int | None:
    """Per-thread buffer size that keeps all buffers within half of ``max_memory``
    (the other half is headroom for the interpreter and the plan)."""
    if max_memory is None:
        return None
    budget = parse_size(max_memory) // 2
    chunk = budget // threads
    if chunk < 64 * 1024:
        raise ValueError(
            f"max_memory {max_memory!r} is too small for {threads} threads "
            f"(needs at least {format_bytes(threads * 128 * 1024)})"
        )
    return min(chunk, 64 << 20)


def convert(
    model: str | os.PathLike[str],
    dtype: str,
    *,
    output: str | os.PathLike[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    threads: int | None = None,
    fsync: bool = True,
    max_memory: int | str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    progress: bool | None = None,
) -> ConversionReport:
    """Convert a model folder (or one .safetensors file) to ``dtype``, re-sharded.

    Float tensors are cast bit-exactly as ``torch.Tensor.to`` would; integer and
    bool tensors are copied. Shards are packed like transformers'
    ``save_pretrained(max_shard_size=shard_size)``; config.json's dtype is
    updated; every other file is copied. The output defaults to
    ``<model>-<dtype>`` beside the input and must not exist (or be empty)
    unless ``overwrite``. Memory stays bounded (``max_memory`` caps the
    buffers). Raises a ``FastcastError`` subclass naming the file and problem.

    >>> report = convert("model/", "bf16", shard_size="5GB")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    started = time.perf_counter()
    target = _core.parse_dtype(dtype)
    if target not in SHORT_NAMES:
        raise _core.DtypeError(
            f"cannot convert to {dtype!r}: the target must be one of "
            + ", ".join(SHORT_NAMES.values())
        )
    limit = parse_size(shard_size)
    n_threads = threads if threads is not None else (os.cpu_count() or 1)
    if n_threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    chunk = chunk_bytes_for(max_memory, n_threads)

    source = Path(model)
    folder = open_model(source)
    out = Path(output) if output is not None else default_output(folder, source, target)
    check_output(out, folder, source, overwrite)
    plan = plan_conversion(folder, target, limit)
    config = read_config(folder.config) if folder.config else None
    need = (
        sum(s.data_bytes for s in plan.shards)
        + sum(tree_size(c) for c in folder.copies)
        + HEADER_ALLOWANCE * (len(plan.shards) + 1)
    )
    check_space(out, need, overwrite)

    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_folder(out)
    for item in folder.copies:
        copy_atomic(item, out / item.name)
    stats = run_plan(plan, out, n_threads, fsync, chunk, fp8_overflow, progress)
    changes: dict[str, tuple[str, str]] = {}
    if config is not None:
        torch_name = next(d["torch_name"] for d in _core.dtypes() if d["name"] == target)
        retyped = retype_config(config, torch_name)
        before, after = config_dtypes(config), config_dtypes(retyped)
        changes = {k: (before.get(k, "(none)"), v) for k, v in after.items()}
        write_text_atomic(out / CONFIG_NAME, to_json(retyped), fsync)
    for sp in plan.sets:
        if sp.index_name:
            write_text_atomic(out / sp.index_name, sp.index_json(), fsync)
    return ConversionReport(
        source=source,
        output=out,
        dtype=target,
        shards=[s.name for s in plan.shards],
        indexes=[sp.index_name for sp in plan.sets if sp.index_name],
        tensors_cast=stats["tensors_cast"],
        tensors_copied=stats["tensors_copied"],
        bytes_read=stats["bytes_read"],
        bytes_written=stats["bytes_written"],
        seconds=time.perf_counter() - started,
        config=changes,
        copied=[c.name for c in folder.copies],
        skipped=[s.name for s in folder.skipped],
        warnings=list(folder.warnings),
    )


def to_json(config: dict[str, object]) -> str:
    """config.json as transformers writes it: 2-space indent (key order kept)."""
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def run_plan(
    plan: ConversionPlan,
    out: Path,
    threads: int,
    fsync: bool,
    chunk: int | None,
    fp8_overflow: Literal["saturate", "nan"],
    progress: bool | None,
) -> dict[str, int]:
    """Hand the plan to the Rust executor, with a progress bar in input bytes."""
    sizes = {p: p.stat().st_size for p in plan.sources}
    total = sum(t.entry.nbytes for t in plan.tensors)
    try:
        with ByteProgress(total, "converting", progress) as update:
            return _core.execute_plan(
                plan.to_json(out, sizes),
                progress=update,
                threads=threads,
                fsync=fsync,
                chunk_bytes=chunk,
                fp8_overflow=fp8_overflow,
            )
    except FileNotFoundError as e:
        raise ModelFolderError(f"{e} (removed while converting?)") from None
