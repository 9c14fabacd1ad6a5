"""commit: what describes the weights staged (config.json files, indexes, the
record), then everything renamed into place by the output transaction."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fastcast import _core
from fastcast._conversion.check import overflowed
from fastcast._conversion.configs import ConfigFix
from fastcast._conversion.prepare import Prepared
from fastcast._loss import (
    TensorLoss,
    loss_sum,
)
from fastcast._output.record import RECORD_NAME, OutputRecord
from fastcast._output.transaction import Run
from fastcast._plan.shards import ConversionPlan
from fastcast._source.folder import ModelFolder
from fastcast._source.hf_cache import repo_of


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


def record_of(prepared: Prepared, losses: Sequence[TensorLoss]) -> OutputRecord:
    """The output's ``fastcast.json``: how it was made, what it holds, what it lost."""
    p, options = prepared, prepared.options
    files = [f for f in p.run.manifest.files if f != RECORD_NAME]
    quant, mode = p.quant, "dequantize" if p.dequantized is not None else "keep"
    if p.quantizing is not None:
        quant, mode = p.quantizing.quantization, "quantize"
    repo = repo_of(p.model, p.source)
    return OutputRecord(
        fastcast=_core.__version__,
        source=os.path.abspath(p.source),
        dtype=p.plan.dtype,
        keep=list(options.keep),
        variant=options.variant,
        fp8_overflow=options.fp8_overflow,
        shard_size=p.plan.shard_size,
        fingerprint=p.fingerprint,
        settings=p.run.manifest.settings,
        files=files,
        folders=sorted({q.as_posix() for f in files for q in Path(f).parents[:-1]}),
        overflowed=overflowed(losses),
        underflowed=loss_sum(losses, "underflow"),
        quantization=None
        if quant is None
        else {"method": quant.method, "scheme": quant.scheme, "mode": mode}
        | ({"dequantized": dequantized} if (dequantized := requantized_from(p)) else {}),
        state_dict_key=options.state_dict_key,
        strip_prefix=options.strip_prefix,
        from_torch=any(f.torch for ws in p.folder.weight_sets for f in ws.files),
        repo_id=repo[0] if repo else None,
        revision=repo[1] if repo else None,
        merge_lora=None if p.merging is None else {
            "path": p.merging.adapter.given,
            "folder": str(p.merging.adapter.folder.resolve()),
            "sha256": p.merging.adapter.digest(),
        },
    )  # fmt: skip


def requantized_from(prepared: Prepared) -> str | None:
    """``--dequantize --quantize``: the method the source was quantized with."""
    return prepared.quantizing.dequantized if prepared.quantizing is not None else None


def commit(prepared: Prepared, losses: Sequence[TensorLoss]) -> None:
    """Stage the configs, indexes and record (unless a kill interrupted an earlier
    commit: all were staged then), and put everything in place."""
    run = prepared.run
    if run.manifest.phase == "staging":
        record = record_of(prepared, losses)
        stage_metadata(run, prepared.folder, prepared.plan, prepared.configs, record)
    run.commit()
