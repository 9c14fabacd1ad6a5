"""``fastcast.convert``: a model folder in, a re-typed, re-sharded model folder out.

Four steps, one undo path (``_output.py`` holds the output folder's side of it):

prepare  read and validate the input, plan every file of the output, decide what the
         output folder allows (fresh, resume, overwrite, or nothing to do), check the
         disk; nothing is written;
stage    copy the other files and write every shard under the output's hidden staging
         folder; the Rust executor journals each finished shard with its digest and
         its tensors' loss counts;
check    ``strict``: refuse if any value overflowed, in reused shards too;
commit   the record, config.json and the indexes are staged, then everything is
         renamed into place, indexes last.

A refusal removes exactly what the run created. An interrupted or failed run keeps
its finished shards, and only them, for ``resume=True``, which reuses each that is
still the file the run synced (its journaled size, inode and mtime) or, failing that,
matches its journaled digest, and takes its loss counts from the journal instead of
reading its inputs again.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import operator
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from fastcast import _core
from fastcast._arguments import as_patterns, thread_count
from fastcast._config import (
    config_dtypes,
    is_transformers_config,
    read_config,
    retype_config,
    to_json,
    without_quantization,
)
from fastcast._core import (
    InsufficientSpaceError,
    LossError,
    ModelFolderError,
    OutputExistsError,
    QuantizedModelError,
)
from fastcast._dtypes import SHORT_NAMES, short_name, torch_name, uncastable_notes
from fastcast._hf_cache import cache_snapshot, model_path, repo_of
from fastcast._loss import (
    LossTable,
    OverflowWarning,
    RangeRiskWarning,
    TensorLoss,
    describe,
    loss_sum,
    narrowing_risks,
    with_nonzero,
)
from fastcast._model_dir import ModelFolder, TorchOptions, describe_skipped, join, open_model
from fastcast._output import Run, prepare
from fastcast._plan import ConversionPlan, PlannedShard, PlannedTensor, plan_conversion
from fastcast._progress import ByteProgress
from fastcast._quant import (
    QUANTIZE_METHODS,
    Quantization,
    QuantizeTarget,
    check_dequantize,
    check_keep,
    check_quantize,
    detect,
    quantize_config,
    quantized_layers,
    quantized_weights,
    refusal,
    roles,
    scheme_of,
    unquantized_modules,
)
from fastcast._record import RECORD_NAME, OutputRecord
from fastcast._report_file import check_report_path, write_report
from fastcast._units import format_bytes, parse_size

DEFAULT_SHARD_SIZE = "5GB"
#: Room for headers, the index and config.json on top of the tensor bytes.
HEADER_ALLOWANCE = 1 << 20
DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did; ``summary()`` renders it for people, ``to_dict()``
    for machines (``--report``)."""

    source: Path
    output: Path
    dtype: str | None
    """The target; None: every tensor kept its dtype."""
    shards: list[str]
    indexes: list[str]
    tensors_cast: int
    tensors_copied: int
    tensors_dequantized: int
    bytes_read: int
    bytes_written: int
    seconds: float
    config: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    """Per config file (relative), each dtype key changed: (before, after)."""
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    loss: Sequence[TensorLoss] = field(default_factory=list)
    """Per cast tensor (after a run, a ``LossTable``: made as they are looked at)."""
    warnings: list[str] = field(default_factory=list)
    already_done: bool = False
    """True when the output already held this conversion (``resume=True``)."""
    skipped_why: list[str] = field(default_factory=list)
    tensors_quantized: int = 0
    """Weights ``--quantize`` wrote in fp8 (each with a scale tensor beside it)."""
    range_risks: list[str] = field(default_factory=list)
    """The casts that can overflow, announced before the run (``RangeRiskWarning``;
    the summary does not repeat them)."""

    @property
    def throughput(self) -> float:
        """Input bytes per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def overflowed(self) -> int:
        return loss_sum(self.loss, "overflow")

    def summary(self) -> str:
        if self.already_done:
            return "\n".join(
                [
                    f"already converted: {self.output} holds {self.source} in "
                    f"{self.dtype or 'its own dtypes'} "
                    "with these settings; nothing to do",
                    *(f"  warning: {w}" for w in self.warnings),
                ]
            )
        lines = [
            f"converted {self.source} -> {self.output} "
            f"({self.dtype or 'every tensor in its own dtype'})",
            f"  tensors: {self.tensors_cast} cast, "
            + (f"{self.tensors_dequantized} dequantized, " if self.tensors_dequantized else "")
            + (
                f"{self.tensors_quantized} quantized to fp8 (+ as many scales), "
                if self.tensors_quantized
                else ""
            )
            + f"{self.tensors_copied} copied as they were"
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
        for name, changes in self.config.items():
            told = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
            lines.append(f"  {name}: {told}")
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines.extend(f"  skipped: {line}" for line in self.skipped_why)
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
            "tensors_dequantized": self.tensors_dequantized,
            "tensors_quantized": self.tensors_quantized,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "config": {f: {k: list(v) for k, v in c.items()} for f, c in self.config.items()},
            "copied": self.copied,
            "skipped": self.skipped,
            "kept": self.kept,
            "reused": self.reused,
            "already_done": self.already_done,
            "loss_total": {
                "overflow": self.overflowed,
                "underflow": loss_sum(self.loss, "underflow"),
                "nan_in": loss_sum(self.loss, "nan_in"),
                "inf_in": loss_sum(self.loss, "inf_in"),
            },
            "loss": [t.to_dict() for t in self.loss],
            "warnings": self.warnings,
            "range_risks": self.range_risks,
        }


# --- prepare ---------------------------------------------------------------------------


def parse_target(dtype: str) -> str:
    """The target dtype's safetensors name; DtypeError for one fastcast cannot write."""
    target = _core.parse_dtype(dtype)
    if target not in SHORT_NAMES:
        raise _core.DtypeError(
            f"cannot convert to {dtype!r}: the target must be one of "
            + ", ".join(SHORT_NAMES.values())
        )
    return target


def default_output(model: ModelFolder, source: Path, dtype: str | None) -> Path:
    """``<model>-<dtype>`` beside the input as it was typed (a link stays a link:
    ``my-llama`` gives ``my-llama-bf16`` beside it), or, where that would be inside a
    Hugging Face cache, ``./<repo name>-<dtype>`` in the working directory; without a
    dtype (every tensor kept as it is), ``<model>-safetensors``."""
    short = short_name(dtype) if dtype is not None else "safetensors"
    typed = Path(os.path.abspath(source))
    name = model.weight_sets[0].prefix if model.is_file else typed.name
    beside = typed.parent / f"{name}-{short}"
    if cache_snapshot(beside) is None:
        return beside
    snapshot = cache_snapshot(typed)
    inner = snapshot.inner.parts if snapshot else ()
    if model.is_file:
        inner = inner[:-1]
    stem = "-".join([snapshot.name if snapshot else name, *inner])
    return Path.cwd() / f"{stem}-{short}"


def check_not_inside(out: Path, model: ModelFolder, source: Path) -> None:
    """Refuse an output that is, holds or sits inside the input."""
    real_out = out.resolve()
    root = model.root.resolve()
    if model.is_file:
        if real_out == source.resolve():
            raise OutputExistsError(f"{out}: is the input file")
    elif real_out == root or root in real_out.parents:
        raise OutputExistsError(f"{out}: is inside the input folder {model.root}")
    if real_out in root.parents or (model.is_file and real_out == root):
        raise OutputExistsError(f"{out}: holds the input {source}; choose another folder")


def check_space(output: Path, need: int) -> None:
    """Fail before writing anything when the output's filesystem is too full. A
    previous output being replaced stays until the new one is complete, so its space
    is not counted as free."""
    probe = output
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise InsufficientSpaceError(
            28,  # ENOSPC
            f"not enough disk space: the output needs {format_bytes(need)}, "
            f"{format_bytes(free)} is free",
            str(output),
        )


def chunk_bytes_for(max_memory: int | str | None, threads: int) -> int:
    """Per-thread buffer size that keeps all buffers within half of ``max_memory``
    (the other half is headroom for the interpreter and the plan)."""
    if max_memory is None:
        return DEFAULT_CHUNK_BYTES
    budget = parse_size(max_memory, "max memory") // 2
    chunk = budget // threads
    if chunk < 64 * 1024:
        raise ValueError(
            f"max_memory {max_memory!r} is too small for {threads} threads "
            f"(needs at least {format_bytes(threads * 128 * 1024)})"
        )
    return min(chunk, 64 << 20)


def fingerprint(
    folder: ModelFolder, plan: ConversionPlan, fp8_overflow: str, torch: TorchOptions
) -> tuple[str, dict[str, Any]]:
    """What a resumed run must share with the run it finishes: the same inputs (by
    resolved path, size and mtime), the same plan, the same fastcast. Returns its digest
    and its parts (recorded, so that a refusal can say which part differs)."""
    # resolved: the same model typed another way (../base, a link) is the same run
    inputs = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in plan.sources]
    shards = [shard_fingerprint(s) for s in plan.shards]
    parts: dict[str, Any] = {
        "fastcast": _core.__version__,
        "model": str(folder.root.resolve()),
        "dtype": plan.dtype,
        "shard_size": plan.shard_size,
        "fp8_overflow": fp8_overflow,
        "torch": [torch.state_dict_key, torch.strip_prefix],
        "inputs": inputs,
        "plan": hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def shard_fingerprint(s: PlannedShard) -> list[Any]:
    """A planned shard's part of the fingerprint: its name, a digest of its tensors'
    source names and dtypes (``PlannedShard.digest``), and for each dequantized or
    quantized one what decides its values (``special_fingerprint``), by position."""
    return [s.name, s.digest(), [[i, special_fingerprint(t)] for i, t in s.special()]]


def special_fingerprint(t: PlannedTensor) -> list[Any]:
    """What decides a dequantized or quantized tensor's values: its name, and its
    source's config parameters and operands, or its block."""
    if t.dequant is not None:
        return [t.name, t.dequant.weight.describe()]
    assert t.quantized is not None
    return [t.name, t.quantized.describe()]


@dataclass(frozen=True)
class ConfigFix:
    """One config.json of the output: its new text, or None to copy it unchanged."""

    rel: str
    text: str | None
    changes: dict[str, tuple[str, str]]


def fix_configs(
    folder: ModelFolder,
    target: str | None,
    drop_quantization: bool = False,
    add_quantization: dict[str, dict[str, Any]] | None = None,
    claims: dict[str, Counter[str]] | None = None,
) -> list[ConfigFix]:
    """Every config.json beside the weights, with its dtype claims set to the target
    (and, for a dequantized model, without quantization_config; for a quantized one,
    with the ``quantization_config`` that ``add_quantization`` gives for its path).
    ``claims``: the dtypes written in each folder; a config beside none written in the
    target keeps its claims (it would name a dtype no weight of it has)."""
    if target is None and not add_quantization:  # every tensor keeps its dtype: so do
        return [ConfigFix(rel, None, {}) for rel in folder.configs]  # the configs
    fixes = []
    for rel in folder.configs:
        config = read_config(folder.root / rel)
        where = rel.rpartition("/")[0]
        held = claims.get(where) if claims is not None else None
        if target is not None and held is not None and not held[target]:
            fixes.append(ConfigFix(rel, None, {}))  # no weight beside it is in the target
            continue
        retyped = retype_config(config, torch_name(target)) if target else dict(config)
        if drop_quantization:
            retyped = without_quantization(retyped)
        added = (add_quantization or {}).get(rel)
        if added is not None:
            retyped["quantization_config"] = added
        if retyped == config:
            fixes.append(ConfigFix(rel, None, {}))
            continue
        before, after = config_dtypes(config), config_dtypes(retyped)
        changes = {k: (before.get(k, "(none)"), v) for k, v in after.items() if before.get(k) != v}
        if drop_quantization and without_quantization(config) != config:
            changes["quantization_config"] = ("present", "removed")
        if added is not None:
            method = str(added["quant_method"])
            changes["quantization_config"] = ("(none)", f"{method} ({scheme_of(method, added)})")
        fixes.append(ConfigFix(rel, to_json(retyped), changes))
    return fixes


def inputs_of(folder: ModelFolder, source: Path, plan: ConversionPlan) -> list[Path]:
    """Everything a conversion reads, for the places nothing may be written: the model
    (its folder, or the file given), every weights file (in a Hugging Face cache, the
    blobs the snapshot links to) and every file copied."""
    top = [source] if folder.is_file else [folder.root]
    others = [folder.root / rel for rel in (*folder.copies, *folder.configs)]
    return [*top, *plan.sources, *others]


def check_headers(plan: ConversionPlan, out: Path, sizes: dict[Path, int]) -> None:
    """Refuse, before anything is written, a shard whose header safetensors readers
    would not open (past ``MAX_HEADER_LEN`` bytes: too many tensors, or names too
    long, for one shard), saying what ``--shard-size`` fixes it."""
    limit = _core.MAX_HEADER_LEN
    lengths = _core.header_lengths(plan.to_dict(out, sizes))
    for shard, length in zip(plan.shards, lengths, strict=True):
        if length > limit:
            fits = max(1, shard.data_bytes * limit // length * 9 // 10)
            raise ModelFolderError(
                f"{out / shard.name}: its header would be {length:,} bytes for "
                f"{len(shard):,} tensors, past the {limit:,}-byte limit of safetensors "
                f"readers; a smaller --shard-size puts fewer tensors in each shard "
                f"(--shard-size {fits} would do); nothing was written"
            )


def written_dtypes(plan: ConversionPlan) -> dict[str, Counter[str]]:
    """How many tensors each folder's weights write in each dtype (``unet`` ->
    {``BF16``: 190...})."""
    found: dict[str, Counter[str]] = {}
    for sp in plan.sets:
        where = sp.key.rpartition("/")[0]
        for shard in sp.shards:
            found.setdefault(where, Counter()).update(shard.dtypes())
    return found


def uncastable(written: dict[str, Counter[str]], target: str | None) -> list[str]:
    """What a user should know of float tensors no cast reaches (``uncastable_notes``)."""
    if target is None:
        return []
    return uncastable_notes(sum(written.values(), Counter()))


@dataclass(frozen=True)
class Quantizing:
    """A ``--quantize`` conversion: what it makes of each tensor, per weight set, and the
    quantization_config it writes, per config.json."""

    scheme: str
    targets: dict[str, list[QuantizeTarget]]
    configs: dict[str, dict[str, Any]]

    @property
    def quantization(self) -> Quantization:
        """The output's quantization, as detect() will read it back."""
        method = QUANTIZE_METHODS[self.scheme]
        config = next(iter(self.configs.values()), {"quant_method": method})
        return Quantization(method, scheme_of(method, config), "--quantize", True)


def plan_quantization(
    folder: ModelFolder, target: str | None, keep: Sequence[str], scheme: str
) -> Quantizing:
    """What ``--quantize scheme`` makes of every tensor, and the quantization_config of
    each transformers config.json beside quantized weights (listing the Linear modules
    its folder's sets leave unquantized)."""
    targets = quantized_layers(folder, target, keep, scheme)
    configs = {}
    for rel in folder.configs:
        where = rel.rpartition("/")[0]
        sets = [ws for ws in folder.weight_sets if ws.folder == where]
        if not is_transformers_config(read_config(folder.root / rel)) or not any(
            t.fate == "quantize" for ws in sets for t in targets[ws.key]
        ):
            continue
        skipped = [
            m
            for ws in sets
            for m in unquantized_modules([t.name for t in ws.tensors], targets[ws.key])
        ]
        configs[rel] = quantize_config(scheme, list(dict.fromkeys(skipped)))
    return Quantizing(scheme, targets, configs)


def quantize_notes(folder: ModelFolder, quantizing: Quantizing, target: str | None) -> list[str]:
    """What a ``--quantize`` run leaves unquantized that a user would want to know: the
    decoder Linears that misfit the blocks (and their fused siblings)."""
    notes = []
    for ws in folder.weight_sets:
        fates = list(zip(ws.tensors, quantizing.targets[ws.key], strict=True))
        misfits = [join(ws.folder, t.name) for t, q in fates if q.fate == "misfit"]
        fused = [join(ws.folder, t.name) for t, q in fates if q.fate == "fused misfit"]
        if misfits:
            notes.append(
                f"{len(misfits)} decoder Linear weight(s) left unquantized in "
                f"{short_name(target) if target else 'their own dtype'}, their shape not "
                f"fitting {quantizing.scheme}'s "
                f"{_core.FP8_BLOCK}x{_core.FP8_BLOCK} blocks (both sides must be multiples "
                f"of {_core.FP8_BLOCK}), and listed as not to convert: {listing(misfits)}"
            )
        if fused:
            notes.append(
                f"{len(fused)} more left unquantized because a weight fused with them "
                f"(q/k/v, gate/up) does not fit, and vLLM needs fused layers in one "
                f"precision: {listing(fused)}"
            )
    return notes


def listing(names: Sequence[str], shown: int = 4) -> str:
    """``a, b, c, d and 3 more``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def commit_order(plan: ConversionPlan, folder: ModelFolder, configs: list[ConfigFix]) -> list[str]:
    """Every file of the output, in the order it is put in place: shards and copies,
    the record, config.json files, and the indexes last (an index marks a finished set)."""
    return [
        *(s.name for s in plan.shards),
        *folder.copies,
        RECORD_NAME,
        *(c.rel for c in configs),
        *(sp.index_name for sp in plan.sets if sp.index_name),
    ]


# --- stage and check -------------------------------------------------------------------


def reusable_shards(
    run: Run, plan: ConversionPlan, staged: _core.Plan
) -> dict[str, _core.ShardRecord]:
    """Shards an interrupted run finished that are still right: in the journal and
    staged either as the very file the run synced (same size, inode and mtime: no byte
    of it is read) or with the journaled size and digest. Mid-commit, every shard was
    finished and checked already; some are in place."""
    records = {r.name: r for r in _core.read_journal(run.journal)}
    if run.manifest.phase == "committing":
        missing = [s.name for s in plan.shards if s.name not in records]
        if missing:
            raise OutputExistsError(
                f"{run.out}: the interrupted commit's journal lacks {missing[0]}; "
                "pass --overwrite to start over"
            )
        return {s.name: records[s.name] for s in plan.shards}
    reused = {}
    for i, shard in enumerate(plan.shards):
        rec = records.get(shard.name)
        path = run.staging / shard.name
        if rec is None or not path.is_file() or path.stat().st_size != rec.size:
            continue
        if rec.unchanged(path) or _core.shard_digest(staged, i, rec.chunk_bytes) == rec.digest:
            reused[shard.name] = rec
    return reused


def shard_losses(plan: ConversionPlan, records: dict[str, _core.ShardRecord]) -> LossTable:
    """Loss counts of every cast tensor, in plan order, matched within each shard (a
    tensor name is unique in a shard, not across a pipeline's components). A
    dequantized tensor's loss is that of rounding its fp32 values."""
    return LossTable(
        (*records[shard.name].loss_columns(), ShardLabels(shard)) for shard in plan.shards
    )


class ShardLabels:
    """A shard's tensor names to (label, dtype of the values, dtype written), for the
    loss records of the few tensors a report names; the table is built on first use."""

    def __init__(self, shard: PlannedShard) -> None:
        self.shard = shard
        self.by_name: dict[str, PlannedTensor] | None = None

    def __call__(self, name: str) -> tuple[str, str, str]:
        if self.by_name is None:
            self.by_name = {t.name: t for t in self.shard.tensors}
        t = self.by_name[name]
        return t.label, t.values_dtype, t.dtype


def overflowed(losses: Sequence[TensorLoss]) -> list[tuple[str, int]]:
    """(tensor, values overflowed) for every tensor that overflowed, worst first."""
    over = with_nonzero(losses, "overflow")
    return sorted(((t.name, t.overflow) for t in over), key=lambda x: (-x[1], x[0]))


def refuse_overflow(bad: list[tuple[str, int]], why: str = "") -> None:
    """``strict``: a LossError naming every tensor that overflowed, worst first."""
    if not bad:
        return
    shown = ", ".join(f"{name} ({n})" for name, n in bad[:5])
    if len(bad) > 5:
        shown += f", and {len(bad) - 5} more"
    raise LossError(
        f"refusing to write (strict){why}: {sum(n for _, n in bad)} value(s) overflowed "
        f"in {len(bad)} tensor(s): {shown}",
        bad,
    )


class Executed(Protocol):
    """What running the shards of one conversion did: the core's ``ExecStats``, or a
    batch executor's sum over the shards it ran one by one (``_jobs.py``)."""

    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def shards(self) -> list[_core.ShardRecord]: ...


#: Runs the shards still to write of one conversion into its staging folder, journaling
#: each: ``run_executor``, or a batch's shared queue or Ray cluster (``_batch.py``).
ShardExecutor = Callable[
    [
        ConversionPlan,
        Run,
        list[str],
        int,
        int,
        Literal["saturate", "nan"],
        bool | None,
        dict[Path, int],
    ],
    Executed | None,
]


def run_executor(
    plan: ConversionPlan,
    run: Run,
    todo: list[str],
    threads: int,
    chunk: int,
    fp8_overflow: Literal["saturate", "nan"],
    progress: bool | None,
    sizes: dict[Path, int],
) -> _core.ExecStats | None:
    """Hand the shards still to write to the Rust executor, with a progress bar in
    input bytes."""
    if not todo:
        return None
    total_bytes = sum(s.input_bytes for s in plan.shards if s.name in todo)
    for name in todo:
        run.staged(name)  # the shard's folder
    try:
        with ByteProgress(total_bytes, "converting", progress) as update:
            return _core.execute_plan(
                plan.to_dict(run.staging, sizes, only=set(todo)),
                progress=update,
                threads=threads,
                fsync=run.fsync,
                chunk_bytes=chunk,
                fp8_overflow=fp8_overflow,
                journal=run.journal,
            )
    except FileNotFoundError as e:
        raise ModelFolderError(f"{e.filename}: {e.strerror} (removed while converting?)") from None


# --- the API ---------------------------------------------------------------------------

P = ParamSpec("P")
R = TypeVar("R")
#: ``stacklevel`` of a warning raised in ``convert``'s body that names the line that
#: called it (``convert`` runs inside the ``gc_paused`` wrapper: one frame more).
CALLER = 3


def gc_paused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with Python's cyclic garbage collector off. Planning a model of 100k
    tensors makes hundreds of thousands of small, acyclic objects, and the collector,
    triggered by allocation counts, spent a quarter of such a run re-scanning them;
    reference counting frees them all the same, and cycles wait for the next collection."""

    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


@gc_paused
def convert(
    model: str | os.PathLike[str],
    dtype: str | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    keep: Sequence[str] = (),
    variant: str | None = None,
    keep_quantized: bool = False,
    dequantize: bool = False,
    quantize: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    threads: int | None = None,
    fsync: bool = True,
    max_memory: int | str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    report: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
    _executor: ShardExecutor | None = None,
) -> ConversionReport:
    """Convert a model folder (or one weights file) to ``dtype``, re-sharded.

    The input may hold safetensors or torch.save weights (``pytorch_model.bin`` and its
    shards, ``adapter_model.bin``, a lone ``.pt/.pth/.ckpt``), which are read without
    running pickle; of a training checkpoint the state dict is used (the top level, a
    known key such as ``state_dict``, or ``state_dict_key``), ``strip_prefix``
    (``"module."``) removed from every name. Without ``dtype`` every tensor keeps its
    dtype and config.json is unchanged: a ``.bin`` model becomes the same model in
    safetensors, into ``<model>-safetensors`` by default.

    Float tensors are cast bit-exactly as ``torch.Tensor.to`` would; integer and
    bool tensors are copied, and so are float tensors whose names match a ``keep``
    glob. Weight sets are found at any depth (diffusers' ``unet/``, ``vae/``...) and
    packed like transformers' ``save_pretrained(max_shard_size=shard_size)``;
    config.json dtypes are updated; other files are copied, except weights in other
    formats and variants (``variant="fp16"`` converts ``*.fp16.safetensors`` instead,
    under the plain names). A quantized model (``quantization_config``, or
    quantization tensors) is refused (``QuantizedModelError``) unless
    ``keep_quantized``, which casts only what is not quantization state and keeps the
    quantization byte for byte, or ``dequantize``, which writes a plain model: each
    quantized weight (fp8 with its scales, bitsandbytes 4-bit and LLM.int8, GPTQ, AWQ)
    computed in fp32 as its format's reference computes it and rounded once to
    ``dtype`` (bf16, fp16 or fp32), the quantization state left out,
    ``quantization_config`` removed. ``quantize`` writes a plain model quantized:
    ``"fp8"`` (128x128 blocks, F32 ``weight_scale_inv``, the ``fp8`` config that
    transformers and vLLM read) or ``"fp8-channel"`` (compressed-tensors ``FP8_DYNAMIC``,
    F32 ``weight_scale`` per row); only decoder Linear weights are quantized (``s =
    amax / 448`` per block, ``q = e4m3(W / s)``), every other tensor goes to ``dtype``
    (bf16, fp16 or fp32), and the layers that do not fit the blocks stay in it, listed.
    The output defaults to ``<model>-<dtype>`` beside the input
    (``./<repo>-<dtype>`` for a Hugging Face cache snapshot) and records how it was
    made in ``fastcast.json``. Nothing appears in it until the whole conversion
    succeeded. It must be new or empty unless ``overwrite`` (which replaces only a
    previous conversion's files) or ``resume`` (which finishes an interrupted run, or
    says there is nothing to do). Every overflow and underflow is counted
    (``report.loss``); range-narrowing casts warn (``RangeRiskWarning``) first;
    ``strict`` refuses to put anything in place if a value overflowed (``LossError``).
    Memory stays bounded (``max_memory`` caps the buffers). Raises a
    ``FastcastError`` subclass, or an ``OSError``, naming the file and the problem.

    >>> report = convert("model/", "bf16", shard_size="5GB")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    started = time.perf_counter()
    target = parse_target(dtype) if dtype is not None else None
    limit = parse_size(shard_size, "shard size")
    keep = as_patterns(keep, "keep")
    n_threads = thread_count(threads, stacklevel=CALLER + 1)
    chunk = chunk_bytes_for(max_memory, n_threads)
    if target is None and keep:
        raise ValueError(
            "--keep needs --dtype: it names the tensors left in their dtype while the others "
            "go to DTYPE (e.g. --dtype bf16 --keep '*norm*'); without --dtype every tensor "
            "keeps its own"
        )
    if target is None and dequantize:
        raise ValueError(
            "--dequantize needs --dtype bf16, fp16 or fp32: the dtype its weights are "
            "computed into (e.g. --dequantize --dtype bf16)"
        )
    if keep_quantized and dequantize:
        raise ValueError("keep_quantized and dequantize exclude each other: keep or dequantize")
    if quantize is not None:
        if quantize not in _core.QUANTIZE_SCHEMES:
            raise ValueError(
                f"quantize must be one of {', '.join(_core.QUANTIZE_SCHEMES)}, not {quantize!r}"
            )
        if keep_quantized or dequantize:
            flag = "keep_quantized" if keep_quantized else "dequantize"
            raise ValueError(f"quantize and {flag} exclude each other: quantize a plain model")

    # prepare: nothing is written
    source = model_path(model)  # a repo id: its snapshot in the local cache
    folder = open_model(source, variant, TorchOptions(state_dict_key, strip_prefix))
    out = Path(output) if output is not None else default_output(folder, source, target)
    check_not_inside(out, folder, source)
    quant = detect(folder)
    dequantized = None
    quantizing = None
    if quantize is not None:  # without a target, what is not quantized keeps its dtype
        check_quantize(folder, quant, target)
        quantizing = plan_quantization(folder, target, keep, quantize)
    elif target is None:
        pass  # nothing is cast: a quantized model's state is copied as it is
    elif quant is not None and dequantize:
        check_dequantize(folder, quant, target)
        dequantized = quantized_weights(folder, quant, roles(folder))
    elif quant is not None:
        if not keep_quantized:
            raise QuantizedModelError(refusal(folder, quant, target))
        check_keep(folder, quant, target)
    plan = plan_conversion(
        folder, target, limit, keep, quantized=quant is not None, dequantize=dequantized,
        quantize=quantizing.targets if quantizing else None,
    )  # fmt: skip
    report_path = (
        None
        if report is None
        else check_report_path(report, inputs_of(folder, source, plan), [out])
    )
    sizes = {p: p.stat().st_size for p in plan.sources}
    check_headers(plan, out, sizes)
    claims = written_dtypes(plan)
    configs = fix_configs(
        folder,
        target if target is None or any(target in d for d in claims.values()) else None,
        drop_quantization=dequantized is not None,
        add_quantization=quantizing.configs if quantizing else None,
        claims=claims,
    )
    stamp, settings = fingerprint(
        folder, plan, fp8_overflow, TorchOptions(state_dict_key, strip_prefix)
    )
    run = prepare(
        out,
        fingerprint=stamp,
        settings=settings,
        files=commit_order(plan, folder, configs),
        overwrite=overwrite,
        resume=resume,
    )
    run.fsync = fsync
    notes = []
    if (keep_quantized or dequantize) and quant is None:
        flag = "--keep-quantized" if keep_quantized else "--dequantize"
        notes.append(f"the model is not quantized: {flag} changed nothing")
    if cache_snapshot(out) is not None:
        notes.append(
            f"{out} is inside a Hugging Face cache, which lists it as a revision and may "
            "delete it in a cleanup"
        )
    if run.mode == "finished":
        return already_done(run, folder, source, target, strict, notes)
    notes += folder.warnings
    notes += uncastable(claims, target)
    if quantizing is not None:
        notes += quantize_notes(folder, quantizing, target)
    reused: dict[str, _core.ShardRecord] = {}
    if run.mode == "resume":
        reused = reusable_shards(run, plan, plan.to_dict(run.staging, sizes))
    todo = [s.name for s in plan.shards if s.name not in reused]
    if run.manifest.phase == "staging":
        need = (
            sum(s.data_bytes for s in plan.shards if s.name in todo)
            + sum((folder.root / c).stat().st_size for c in folder.copies)
            + HEADER_ALLOWANCE * (len(todo) + 1)
        )
        check_space(out, need)
    # quantized weights are scaled to fit: not warned about
    plain = [s.plain_columns() for s in plan.shards]
    dequantizing = [t for s in plan.shards for _, t in s.special() if t.dequant]
    risks = narrowing_risks(
        [d for c in plain for d in c.src_dtypes],
        [d for c in plain for d in c.dtypes],
        (n for c in plain for n in c.src_nbytes),
    ) + narrowing_risks(
        [t.values_dtype for t in dequantizing],
        [t.dtype for t in dequantizing],
        (t.values_nbytes for t in dequantizing),
        dequantized=True,
    )
    for risk in risks:
        warnings.warn(risk, RangeRiskWarning, stacklevel=CALLER)

    with run:
        stats = None
        staging = run.manifest.phase == "staging"  # else a kill mid-commit: just finish it
        if staging:
            for rel in folder.copies:
                run.copy(rel, folder.root / rel)
            execute = _executor or run_executor  # a batch runs every model's shards together
            stats = execute(plan, run, todo, n_threads, chunk, fp8_overflow, progress, sizes)
        # check: every shard's loss counts, journaled ones for reused shards
        written = {r.name: r for r in stats.shards} if stats else {}
        losses = shard_losses(plan, {**reused, **written})
        if strict:
            refuse_overflow(
                overflowed(losses),
                " (including shards reused from the interrupted run)" if reused else "",
            )
        if staging:
            mode = "dequantize" if dequantized is not None else "keep"
            if quantizing is not None:
                quant, mode = quantizing.quantization, "quantize"
            record = make_record(
                run, source, plan, keep, variant, fp8_overflow, stamp, losses, quant, mode
            )
            repo = repo_of(model, source)
            record = replace(
                record,
                state_dict_key=state_dict_key,
                strip_prefix=strip_prefix,
                from_torch=any(f.torch for ws in folder.weight_sets for f in ws.files),
                repo_id=repo[0] if repo else None,
                revision=repo[1] if repo else None,
            )
            stage_metadata(run, folder, plan, configs, record)
        run.commit()
    result = finish_report(
        source, out, plan, folder, configs, stats, reused, losses, notes, started,
        report_path, fsync, risks,
    )  # fmt: skip
    return result


def stage_metadata(
    run: Run,
    folder: ModelFolder,
    plan: ConversionPlan,
    configs: list[ConfigFix],
    record: OutputRecord,
) -> None:
    """Stage what describes the weights: config.json files, indexes, the record."""
    for fix in configs:
        if fix.text is None:
            run.copy(fix.rel, folder.root / fix.rel)
        else:
            run.write_text(fix.rel, fix.text)
    for sp in plan.sets:
        if sp.index_name:
            run.write_text(sp.index_name, sp.index_json())
    run.write_text(RECORD_NAME, record.to_json())


def finish_report(
    source: Path,
    out: Path,
    plan: ConversionPlan,
    folder: ModelFolder,
    configs: list[ConfigFix],
    stats: Executed | None,
    reused: dict[str, _core.ShardRecord],
    losses: Sequence[TensorLoss],
    notes: list[str],
    started: float,
    report: str | os.PathLike[str] | None,
    fsync: bool,
    risks: list[str],
) -> ConversionReport:
    """The report of a committed conversion; warns if values overflowed; writes
    ``--report``."""
    target = plan.dtype
    kinds: Counter[str | None] = Counter()
    kept: list[str] = []
    pinned: list[str] = []
    for shard in plan.shards:  # as columns: a model may have 100k tensors
        c = shard.plain_columns()
        kinds["cast"] += (cast := sum(map(operator.ne, c.src_dtypes, c.dtypes)))
        kinds["copied"] += len(c.dtypes) - cast
        kinds.update(tensor_kind(t) for _, t in shard.special())
        uncast = shard.uncast(target) if target is not None else []
        kept += [name for name, _, role in uncast if role == "plain"]
        pinned += [label for _, label, role in uncast if role == "pinned fp32"]
    if kept:
        notes.append(
            f"{len(kept)} tensor(s) kept in their source dtype by --keep; config.json says "
            f"{target}, and transformers casts them to that on load unless the model class "
            "keeps them (e.g. _keep_in_fp32_modules)"
        )
    if pinned:
        notes.append(
            f"{len(pinned)} tensor(s) left in fp32, as the model class pins them "
            f"({', '.join(pinned[:3])}{' ...' if len(pinned) > 3 else ''})"
        )
    result = ConversionReport(
        source=source,
        output=out,
        dtype=target,
        shards=[s.name for s in plan.shards],
        indexes=[sp.index_name for sp in plan.sets if sp.index_name],
        tensors_cast=kinds["cast"],
        tensors_copied=kinds["copied"],
        tensors_dequantized=kinds["dequantized"],
        tensors_quantized=kinds["quantized"],
        bytes_read=stats.bytes_read if stats else 0,
        bytes_written=stats.bytes_written if stats else 0,
        seconds=time.perf_counter() - started,
        config={c.rel: c.changes for c in configs if c.changes},
        copied=list(folder.copies),
        skipped=[s.path for s in folder.skipped],
        skipped_why=describe_skipped(folder.skipped),
        kept=kept,
        reused=sorted(reused),
        loss=losses,
        warnings=notes,
        range_risks=risks,
    )
    if result.overflowed:
        warnings.warn(
            f"{result.overflowed} value(s) overflowed converting to {target}; see the loss "
            "report (--strict refuses instead)",
            OverflowWarning,
            stacklevel=CALLER + 1,  # from finish_report: the caller of convert()
        )
    if report is not None:
        write_report(Path(report), result.to_dict(), fsync)
    return result


def tensor_kind(t: PlannedTensor) -> str | None:
    """How the report counts a dequantized or quantized tensor (a plain one is cast or
    copied: ``finish_report`` counts those as columns): dequantized, quantized (the e4m3
    values), else None: a quantized weight's scales are counted with it ("+ as many
    scales"), whatever the dtype of the weight they were computed from."""
    if t.dequant is not None:
        return "dequantized"
    assert t.quantized is not None
    return "quantized" if t.quantized.kind == "fp8_weight" else None


def make_record(
    run: Run,
    source: Path,
    plan: ConversionPlan,
    keep: list[str],
    variant: str | None,
    fp8_overflow: str,
    stamp: str,
    losses: Sequence[TensorLoss],
    quant: Quantization | None,
    mode: str,
) -> OutputRecord:
    files = [f for f in run.manifest.files if f != RECORD_NAME]
    return OutputRecord(
        fastcast=_core.__version__,
        source=os.path.abspath(source),
        dtype=plan.dtype,
        keep=keep,
        variant=variant,
        fp8_overflow=fp8_overflow,
        shard_size=plan.shard_size,
        fingerprint=stamp,
        settings=run.manifest.settings,
        files=files,
        folders=sorted({p.as_posix() for f in files for p in Path(f).parents[:-1]}),
        overflowed=overflowed(losses),
        underflowed=loss_sum(losses, "underflow"),
        quantization=None
        if quant is None
        else {"method": quant.method, "scheme": quant.scheme, "mode": mode},
    )


def already_done(
    run: Run,
    folder: ModelFolder,
    source: Path,
    target: str | None,
    strict: bool,
    notes: list[str],
) -> ConversionReport:
    """``resume`` on a finished output with the same inputs and settings: nothing to do
    (``strict`` still refuses one whose values overflowed)."""
    record = run.record
    assert record is not None
    if strict:
        refuse_overflow(record.overflowed, f" (the finished output in {run.out} holds them)")
    if record.overflowed:
        total = sum(c for _, c in record.overflowed)
        notes.append(
            f"it holds {total} overflowed value(s) in {len(record.overflowed)} tensor(s) "
            f"(see {run.out / RECORD_NAME})"
        )
    shards = [f for f in record.files if f.endswith(".safetensors")]
    return ConversionReport(
        source=source,
        output=run.out,
        dtype=target,
        shards=shards,
        indexes=[f for f in record.files if f.endswith(".index.json")],
        tensors_cast=0,
        tensors_copied=0,
        tensors_dequantized=0,
        bytes_read=0,
        bytes_written=0,
        seconds=0.0,
        reused=shards,
        warnings=notes,
        already_done=True,
        skipped=[s.path for s in folder.skipped],
    )
