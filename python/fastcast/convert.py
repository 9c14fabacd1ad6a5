"""``fastcast.convert``: a model folder in, a re-typed, re-sharded model folder out.

Order of work, chosen so that a folder with an index is a finished conversion:
check everything (input, output, disk space) before writing anything; write a
run manifest; copy the other files; write the shards (each under a temporary
name, synced and renamed when complete, and journaled); then config.json; then
the index; and last remove the manifest and journal. An interrupted run leaves
complete shards, the manifest and the journal, from which ``resume=True``
finishes the job, checking every shard it reuses against its journaled digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastcast import _core
from fastcast._core import InsufficientSpaceError, ModelFolderError, OutputExistsError
from fastcast.dtype_table import SHORT_NAMES, is_castable, torch_name
from fastcast.loss import (
    OverflowWarning,
    RangeRiskWarning,
    TensorLoss,
    describe,
    narrowing_risks,
    total,
)
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
#: Room for headers, the index and config.json on top of the tensor bytes.
HEADER_ALLOWANCE = 1 << 20
#: Present in an output folder while a conversion into it is unfinished.
MANIFEST = ".fastcast-run.json"
JOURNAL = ".fastcast-journal.jsonl"
DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did; ``summary()`` renders it for people, ``to_dict()``
    for machines (``--report``)."""

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
    kept: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    loss: list[TensorLoss] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Input bytes per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def overflowed(self) -> int:
        return total(self.loss).overflow

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} ({self.dtype})",
            f"  tensors: {self.tensors_cast} cast, {self.tensors_copied} copied as they were"
            + (f" ({len(self.kept)} kept by --keep)" if self.kept else ""),
            f"  bytes: {format_bytes(self.bytes_read)} read, "
            f"{format_bytes(self.bytes_written)} written in {len(self.shards)} "
            f"shard{'s' if len(self.shards) != 1 else ''}"
            + (f" + {', '.join(self.indexes)}" if self.indexes else ""),
            f"  time: {self.seconds:.1f} s ({format_bytes(self.throughput)}/s)",
        ]
        if self.reused:
            lines.append(f"  resumed: {len(self.reused)} shard(s) reused after checking")
        lines.extend(f"  {line}" for line in describe(self.loss))
        if self.config:
            changes = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in self.config.items())
            lines.append(f"  config.json: {changes}")
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report, JSON-ready."""
        return {
            "source": str(self.source),
            "output": str(self.output),
            "dtype": self.dtype,
            "shards": self.shards,
            "indexes": self.indexes,
            "tensors_cast": self.tensors_cast,
            "tensors_copied": self.tensors_copied,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "config": {k: list(v) for k, v in self.config.items()},
            "copied": self.copied,
            "skipped": self.skipped,
            "kept": self.kept,
            "reused": self.reused,
            "loss_total": total(self.loss).to_dict(),
            "loss": [t.to_dict() for t in self.loss],
            "warnings": self.warnings,
        }


def default_output(model: ModelFolder, source: Path, dtype: str) -> Path:
    """``<model>-<dtype>`` beside the input (``model-bf16``, ``weights-fp16``)."""
    short = SHORT_NAMES.get(dtype, dtype.lower())
    if model.is_file:
        return source.parent / f"{model.weight_sets[0].prefix}-{short}"
    resolved = source.resolve()
    return resolved.parent / f"{resolved.name}-{short}"


def check_output(
    output: Path, model: ModelFolder, source: Path, overwrite: bool, resume: bool
) -> None:
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
        if resume and (output / MANIFEST).exists():
            return
        if any(output.iterdir()) and not overwrite:
            hint = (
                "an interrupted run left it; pass --resume to finish it, or --overwrite to "
                "start over"
                if (output / MANIFEST).exists()
                else "pass --overwrite to replace it"
            )
            raise OutputExistsError(f"{output}: already exists and is not empty ({hint})")


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


def chunk_bytes_for(max_memory: int | str | None, threads: int) -> int:
    """Per-thread buffer size that keeps all buffers within half of ``max_memory``
    (the other half is headroom for the interpreter and the plan)."""
    if max_memory is None:
        return DEFAULT_CHUNK_BYTES
    budget = parse_size(max_memory) // 2
    chunk = budget // threads
    if chunk < 64 * 1024:
        raise ValueError(
            f"max_memory {max_memory!r} is too small for {threads} threads "
            f"(needs at least {format_bytes(threads * 128 * 1024)})"
        )
    return min(chunk, 64 << 20)


def fingerprint(folder: ModelFolder, plan: ConversionPlan, fp8_overflow: str) -> str:
    """What a resumed run must share with the run it finishes: the same inputs
    (by path, size and mtime), the same plan, the same fastcast."""
    doc = {
        "fastcast": _core.__version__,
        "inputs": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in plan.sources],
        "dtype": plan.dtype,
        "shard_size": plan.shard_size,
        "fp8_overflow": fp8_overflow,
        "shards": [[s.name, [(t.entry.name, t.dtype) for t in s.tensors]] for s in plan.shards],
        "root": str(folder.root.resolve()),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def reusable_shards(out: Path, plan: ConversionPlan, sizes: dict[Path, int]) -> list[str]:
    """Shards of an interrupted run that are complete and still right: present
    under their final name, in the journal, and with the journaled digest when
    re-read (checked, not trusted)."""
    journal = out / JOURNAL
    records: dict[str, dict[str, Any]] = {}
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: that shard is simply redone
            records[rec["file"]] = rec
    plan_json = plan.to_json(out, sizes)
    reused = []
    for i, shard in enumerate(plan.shards):
        rec = records.get(shard.name)
        path = out / shard.name
        if rec is None or not path.is_file() or path.stat().st_size != rec["size"]:
            continue
        digest = _core.shard_digest(plan_json, i, rec["chunk_bytes"])
        if f"{digest:016x}" == rec["digest"]:
            reused.append(shard.name)
    return reused


def convert(
    model: str | os.PathLike[str],
    dtype: str,
    *,
    output: str | os.PathLike[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    keep: Sequence[str] = (),
    strict: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    threads: int | None = None,
    fsync: bool = True,
    max_memory: int | str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    report: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> ConversionReport:
    """Convert a model folder (or one .safetensors file) to ``dtype``, re-sharded.

    Float tensors are cast bit-exactly as ``torch.Tensor.to`` would; integer and
    bool tensors are copied, and so are float tensors whose names match a
    ``keep`` glob. Shards are packed like transformers'
    ``save_pretrained(max_shard_size=shard_size)``; config.json's dtype is
    updated; every other file is copied. The output defaults to
    ``<model>-<dtype>`` beside the input and must not exist (or be empty)
    unless ``overwrite``; ``resume`` finishes an interrupted run into it.
    Every overflow and underflow is counted (``report.loss``); range-unsafe
    casts warn (``FastcastWarning``) before the run; ``strict`` refuses to put
    anything in place if a value overflowed (``LossError``). ``report`` also
    writes the report as JSON. Memory stays bounded (``max_memory`` caps the
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
    check_output(out, folder, source, overwrite, resume)
    plan = plan_conversion(folder, target, limit, keep)
    config = read_config(folder.config) if folder.config else None
    sizes = {p: p.stat().st_size for p in plan.sources}
    print_ = fingerprint(folder, plan, fp8_overflow)
    reused: list[str] = []
    resuming = resume and (out / MANIFEST).exists()
    if resuming:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("fingerprint") != print_:
            raise OutputExistsError(
                f"{out}: the interrupted run there used other inputs or settings; "
                "pass --overwrite to start over"
            )
        reused = reusable_shards(out, plan, sizes)
    todo = [s for s in plan.shards if s.name not in reused]
    need = (
        sum(s.data_bytes for s in todo)
        + sum(tree_size(c) for c in folder.copies)
        + HEADER_ALLOWANCE * (len(todo) + 1)
    )
    check_space(out, need, overwrite and not resuming)
    risks = narrowing_risks((t.entry.dtype, t.dtype, t.entry.nbytes) for t in plan.tensors)
    for risk in risks:
        warnings.warn(risk, RangeRiskWarning, stacklevel=2)

    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resuming:
        clear_folder(out)
    for partial in out.glob(".*.fastcast-partial"):
        partial.unlink()  # left by a killed run
    write_text_atomic(out / MANIFEST, json.dumps({"fingerprint": print_}) + "\n", fsync)
    for item in folder.copies:
        copy_atomic(item, out / item.name)
    stats = run_plan(
        plan, out, reused, n_threads, fsync, chunk, fp8_overflow, strict, progress, sizes
    )
    changes: dict[str, tuple[str, str]] = {}
    if config is not None:
        retyped = retype_config(config, torch_name(target))
        before, after = config_dtypes(config), config_dtypes(retyped)
        changes = {k: (before.get(k, "(none)"), v) for k, v in after.items()}
        write_text_atomic(out / CONFIG_NAME, to_json(retyped), fsync)
    for sp in plan.sets:
        if sp.index_name:
            write_text_atomic(out / sp.index_name, sp.index_json(), fsync)
    (out / JOURNAL).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)

    by_name = {t.entry.name: t for t in plan.tensors}
    losses = [
        TensorLoss(name, by_name[name].entry.dtype, by_name[name].dtype, **counts)
        for name, counts in stats["losses"]
    ]
    notes = list(folder.warnings) + risks
    kept = [t.entry.name for t in plan.tensors if not t.is_cast and t.entry.dtype != target
            and is_castable(t.entry.dtype)]  # fmt: skip
    if kept:
        notes.append(
            f"{len(kept)} tensor(s) kept in their source dtype by --keep; config.json says "
            f"{target}, and transformers casts them to that on load unless the model class "
            "keeps them (e.g. _keep_in_fp32_modules)"
        )
    result = ConversionReport(
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
        kept=kept,
        reused=reused,
        loss=losses,
        warnings=notes,
    )
    if result.overflowed:
        warnings.warn(
            f"{result.overflowed} value(s) overflowed converting to {target}; see the loss "
            "report (--strict refuses instead)",
            OverflowWarning,
            stacklevel=2,
        )
    if report is not None:
        write_text_atomic(Path(report), json.dumps(result.to_dict(), indent=2) + "\n", fsync)
    return result


def to_json(config: dict[str, object]) -> str:
    """config.json as transformers writes it: 2-space indent (key order kept)."""
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def run_plan(
    plan: ConversionPlan,
    out: Path,
    reused: list[str],
    threads: int,
    fsync: bool,
    chunk: int,
    fp8_overflow: Literal["saturate", "nan"],
    strict: bool,
    progress: bool | None,
    sizes: dict[Path, int],
) -> dict[str, Any]:
    """Hand the shards still to write to the Rust executor, with a progress bar in
    input bytes. Counts of reused shards are added back so totals stay whole."""
    todo = [s.name for s in plan.shards if s.name not in reused]
    total_bytes = sum(
        t.entry.nbytes for s in plan.shards if s.name not in reused for t in s.tensors
    )
    try:
        with ByteProgress(total_bytes, "converting", progress) as update:
            stats: dict[str, Any] = _core.execute_plan(
                plan.to_json(out, sizes, only=todo),
                progress=update,
                threads=threads,
                fsync=fsync,
                chunk_bytes=chunk,
                fp8_overflow=fp8_overflow,
                strict=strict,
                journal=out / JOURNAL,
            )
    except FileNotFoundError as e:
        raise ModelFolderError(f"{e} (removed while converting?)") from None
    if reused:
        # The reused shards' loss counts come from a read-only scan of their inputs.
        reused_plan = plan.to_json(out, sizes, only=reused)
        stats["losses"] = _core.scan_plan(reused_plan, threads=threads) + stats["losses"]
    for shard in plan.shards:
        if shard.name in reused:
            stats["tensors_cast"] += sum(1 for t in shard.tensors if t.is_cast)
            stats["tensors_copied"] += sum(1 for t in shard.tensors if not t.is_cast)
            stats["bytes_read"] += sum(t.entry.nbytes for t in shard.tensors)
            stats["bytes_written"] += (out / shard.name).stat().st_size
    return stats
