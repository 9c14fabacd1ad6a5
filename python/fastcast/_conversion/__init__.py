"""A conversion as its steps, with one undo path (the output folder's side of it is
``_output/transaction.py``):

prepare  read and validate the input, plan every file of the output, decide what the
         output folder allows (fresh, resume, overwrite, or nothing to do), check the
         disk; nothing is written (``prepare.py``);
stage    copy the other files and write every shard under the output's hidden staging
         folder; the Rust executor journals each finished shard with its digest and
         its tensors' loss counts (``stage.py``);
check    every shard's loss counts; ``strict`` refuses if a value overflowed, in
         reused shards too (``check.py``);
commit   the record, config.json and the indexes are staged, then everything is
         renamed into place, indexes last (``commit.py``);

and the report of what was done (``report.py``).

A refusal removes exactly what the run created. An interrupted or failed run keeps
its finished shards, and only them, for ``resume=True``, which reuses each that is
still the file the run synced (its journaled size, inode and mtime) or, failing that,
matches its journaled digest, and takes its loss counts from the journal instead of
reading its inputs again.
"""

from __future__ import annotations

import os
import warnings

from fastcast._conversion.check import check
from fastcast._conversion.commit import commit
from fastcast._conversion.prepare import Prepared, prepare
from fastcast._conversion.report import ConversionReport, already_done, finish_report
from fastcast._conversion.stage import Executed, ShardExecutor, Shards, run_executor, stage
from fastcast._loss import RangeRiskWarning
from fastcast.options import ConvertOptions

__all__ = [
    "ConversionReport",
    "Executed",
    "Prepared",
    "ShardExecutor",
    "Shards",
    "run_conversion",
    "run_executor",
]


def run_conversion(
    model: str | os.PathLike[str],
    options: ConvertOptions,
    executor: ShardExecutor = run_executor,
    stacklevel: int = 2,
) -> ConversionReport:
    """Convert ``model`` as ``options`` say, its shards written by ``executor``: the
    steps above. Warnings name the line ``stacklevel`` frames above the caller."""
    prepared = prepare(model, options)
    if prepared.run.mode == "finished":
        return already_done(prepared)
    for risk in prepared.risks:
        warnings.warn(risk, RangeRiskWarning, stacklevel=stacklevel + 1)
    with prepared.run:
        stats = stage(prepared, executor)
        losses = check(prepared, stats)
        commit(prepared, losses)
    return finish_report(prepared, stats, losses, stacklevel + 1)
