"""prepare: read and validate the input, plan every file of the output, decide what
the output folder allows (fresh, resume, overwrite, or nothing to do), check the disk;
nothing is written. The result, ``Prepared``, is everything the other steps need."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastcast import _core
from fastcast._conversion.configs import ConfigFix, fix_configs, uncastable, written_dtypes
from fastcast._conversion.fingerprint import fingerprint
from fastcast._conversion.places import (
    HEADER_ALLOWANCE,
    check_headers,
    check_not_inside,
    check_space,
    commit_order,
    copies_of,
    default_output,
    inputs_of,
)
from fastcast._conversion.quantizing import Quantizing, plan_quantization, quantize_notes
from fastcast._core import ModelFolderError, OutputExistsError, QuantizedModelError
from fastcast._loss import narrowing_risks
from fastcast._output.report_file import check_report_path
from fastcast._output.transaction import Run
from fastcast._output.transaction import prepare as prepare_output
from fastcast._plan.dequantize import QuantizedWeight, check_dequantize, quantized_weights
from fastcast._plan.merge import Merging, plan_merge
from fastcast._plan.quantize import check_quantize
from fastcast._plan.shards import ConversionPlan, plan_conversion
from fastcast._source.adapter import open_adapter
from fastcast._source.folder import ModelFolder, TorchOptions, open_model
from fastcast._source.hf_cache import cache_snapshot, model_path
from fastcast._source.quantization import (
    Quantization,
    check_keep,
    detect,
    refusal,
    roles,
    without_sidecars,
)
from fastcast.options import ConvertOptions, Dequantize, KeepQuantized, Quantize


@dataclass
class Prepared:
    """A conversion decided, nothing written: its input, its plan, its output."""

    model: str | os.PathLike[str]
    """The model as given (a repo id stays one)."""
    source: Path
    folder: ModelFolder
    out: Path
    options: ConvertOptions
    quant: Quantization | None
    """The source's quantization, if it has one."""
    dequantized: dict[tuple[str, str], QuantizedWeight] | None
    quantizing: Quantizing | None
    merging: Merging | None
    """``--merge-lora``: what the adapter changes."""
    copies: dict[str, Path]
    """The other files, by output path -> the file copied there."""
    plan: ConversionPlan
    configs: list[ConfigFix]
    report: Path | None
    """``--report``'s path, checked."""
    sizes: dict[Path, int]
    fingerprint: str
    run: Run
    started: float
    notes: list[str] = field(default_factory=list)
    risks: list[str] = field(default_factory=list)
    """The casts that can overflow, announced before the run."""
    reused: dict[str, _core.ShardRecord] = field(default_factory=dict)
    todo: list[str] = field(default_factory=list)
    """The shards still to write (all of them, unless resumed)."""

    @property
    def torch(self) -> TorchOptions:
        return TorchOptions(self.options.state_dict_key, self.options.strip_prefix)


def prepare(model: str | os.PathLike[str], options: ConvertOptions) -> Prepared:
    """Everything a conversion of ``model`` will do, decided; refusals raised here,
    before anything is written (a finished output: ``run.mode == "finished"``)."""
    started = time.perf_counter()
    torch = TorchOptions(options.state_dict_key, options.strip_prefix)
    source = model_path(model)  # a repo id: its snapshot in the local cache
    folder = open_model(source, options.variant, torch)
    out = options.output if options.output is not None else default_output(
        folder, source, options.dtype
    )  # fmt: skip
    check_not_inside(out, folder, source)
    quant = detect(folder)
    dequantized, quantizing = decide(folder, quant, options)
    if dequantized is not None:
        folder = without_sidecars(folder)
    merging = merge_of(folder, quant, options, dequantized)
    plan = plan_conversion(
        folder, options.dtype, options.shard_size, options.keep, quantized=quant is not None,
        dequantize=dequantized, quantize=quantizing.targets if quantizing else None,
        merging=merging, scheme=quantizing.scheme if quantizing else None,
    )  # fmt: skip
    copies = copies_of(folder, merging)
    report = None
    if options.report is not None:
        report = check_report_path(options.report, inputs_of(folder, source, plan, copies), [out])
    sizes = {p: p.stat().st_size for p in plan.sources}
    check_headers(plan, out, sizes)
    claims = written_dtypes(plan)
    target = options.dtype
    configs = fix_configs(
        folder,
        target if target is None or any(target in d for d in claims.values()) else None,
        drop_quantization=dequantized is not None,
        add_quantization=quantizing.configs if quantizing else None,
        claims=claims,
        set_keys={"config.json": merging.config} if merging and merging.config else None,
    )
    stamp, settings = fingerprint(folder, plan, options.fp8_overflow, torch)
    run = prepare_output(
        out, fingerprint=stamp, settings=settings, files=commit_order(plan, copies, configs),
        overwrite=options.overwrite, resume=options.resume,
    )  # fmt: skip
    run.fsync = options.fsync
    prepared = Prepared(
        model, source, folder, out, options, quant, dequantized, quantizing, merging, copies,
        plan, configs, report, sizes, stamp, run, started,
        notes=first_notes(folder, out, quant, options),
    )  # fmt: skip
    if run.mode != "finished":
        what_to_write(prepared, claims)
    return prepared


def decide(
    folder: ModelFolder, quant: Quantization | None, options: ConvertOptions
) -> tuple[dict[tuple[str, str], QuantizedWeight] | None, Quantizing | None]:
    """What the mode makes of a (possibly quantized) source: the weights to dequantize,
    or what ``--quantize`` makes of each tensor; refused where it would break it."""
    target, mode = options.dtype, options.mode
    if isinstance(mode, Quantize) and mode.dequantize and quant is not None:
        assert target is not None, "--dequantize needs a target"
        check_quantize(folder, None, target)
        check_dequantize(folder, quant, target)
        weights = quantized_weights(folder, quant, roles(folder))
        return weights, plan_quantization(
            folder, target, options.keep, mode.scheme, (quant, weights)
        )
    if isinstance(mode, Quantize):  # without a target, what is not quantized keeps its dtype
        check_quantize(folder, quant, target)
        return None, plan_quantization(folder, target, options.keep, mode.scheme)
    if target is None or quant is None:
        return None, None  # nothing is cast, or nothing is quantized
    if isinstance(mode, Dequantize):
        check_dequantize(folder, quant, target)
        return quantized_weights(folder, quant, roles(folder)), None
    if not isinstance(mode, KeepQuantized):
        raise QuantizedModelError(refusal(folder, quant, target))
    check_keep(folder, quant, target)
    return None, None


def merge_of(
    folder: ModelFolder,
    quant: Quantization | None,
    options: ConvertOptions,
    dequantized: dict[tuple[str, str], QuantizedWeight] | None,
) -> Merging | None:
    """``--merge-lora``: the adapter read and matched to the base (a quantized one's
    weights as ``--dequantize`` writes them), or None."""
    if options.merge_lora is None:
        return None
    adapter = open_adapter(options.merge_lora)
    if quant is not None and dequantized is None:
        raise QuantizedModelError(
            f"{folder.root}: a {quant.method} model; an adapter is merged into its weights "
            "dequantized: add --dequantize --dtype bf16 (or fp16, fp32)"
        )
    merging = plan_merge(folder, adapter, dequantized)
    if merging.layers and isinstance(options.mode, Quantize):
        raise ModelFolderError(
            f"{options.merge_lora}: layer_replication with --quantize is not supported yet "
            "(merge first, then --quantize the output)"
        )
    return merging


def first_notes(
    folder: ModelFolder, out: Path, quant: Quantization | None, options: ConvertOptions
) -> list[str]:
    """What a user should know even of a run with nothing to do."""
    notes = []
    mode = options.mode
    dequantizing = isinstance(mode, Dequantize) or (isinstance(mode, Quantize) and mode.dequantize)
    if (isinstance(mode, KeepQuantized) or dequantizing) and quant is None:
        flag = "--keep-quantized" if isinstance(mode, KeepQuantized) else "--dequantize"
        notes.append(f"the model is not quantized: {flag} changed nothing")
    if cache_snapshot(out) is not None:
        notes.append(
            f"{out} is inside a Hugging Face cache, which lists it as a revision and may "
            "delete it in a cleanup"
        )
    return notes


def what_to_write(prepared: Prepared, claims: dict[str, Counter[str]]) -> None:
    """For a run that writes: its notes, the shards an interrupted run finished that it
    reuses, those still to write, the room they need, and the casts that can overflow."""
    p, run = prepared, prepared.run
    p.notes += p.folder.warnings
    p.notes += uncastable(claims, p.options.dtype)
    if p.quantizing is not None:
        p.notes += quantize_notes(p.folder, p.quantizing, p.options.dtype)
    if run.mode == "resume":
        p.reused = reusable_shards(run, p.plan, p.plan.to_dict(run.staging, p.sizes))
    p.todo = [s.name for s in p.plan.shards if s.name not in p.reused]
    if run.manifest.phase == "staging":
        need = (
            sum(s.data_bytes for s in p.plan.shards if s.name in p.todo)
            + sum(path.stat().st_size for path in p.copies.values())
            + HEADER_ALLOWANCE * (len(p.todo) + 1)
        )
        check_space(p.out, need)
    p.risks = range_risks(p.plan)


def range_risks(plan: ConversionPlan) -> list[str]:
    """The casts of ``plan`` that can overflow (quantized weights are scaled to fit:
    not among them), and the dequantized weights whose rounding can."""
    plain = [s.plain_columns() for s in plan.shards]
    dequantizing = [t for s in plan.shards for _, t in s.special() if t.dequant and not t.quantized]
    return narrowing_risks(
        [d for c in plain for d in c.src_dtypes],
        [d for c in plain for d in c.dtypes],
        (n for c in plain for n in c.src_nbytes),
    ) + narrowing_risks(
        [t.values_dtype for t in dequantizing],
        [t.dtype for t in dequantizing],
        (t.values_nbytes for t in dequantizing),
        dequantized=True,
    )


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
