"""``fastcast.convert_batch``: many models in one run, each its own conversion.

Every model goes through ``convert`` (prepare, stage, check, commit, its own output
folder, staging folder and journal, so each one resumes on its own); a model that
fails is reported with its one-line error and the others go on. What the batch adds
is where the shards are written: one queue for every model's shards (``_execute/queue.py``),
on this machine or on a Ray cluster (``_execute/ray_pool.py``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastcast._arguments import as_patterns, thread_count
from fastcast._batch.jobs import (
    JobsFile,
    ModelJob,
    PlannedModel,
    Unplanned,
    make_parents,
    output_folders,
    output_of,
    plan_jobs,
    probe_paths,
    read_jobs,
)
from fastcast._conversion import ConversionReport, ShardExecutor, run_conversion
from fastcast._errors import one_line
from fastcast._execute.queue import LocalPool, ShardBoard, ShardPool, shard_executor
from fastcast._loss import loss_sum
from fastcast._output.report_file import check_report_path, write_report
from fastcast._source.hf_cache import model_path
from fastcast._units import format_bytes

__all__ = ["BatchReport", "JobsFile", "ModelJob", "ModelResult", "convert_batch", "read_jobs"]

Executor = Literal["local", "ray"]

#: Shards written at once by the local executor, the core's threads split between them.
#: One: every thread on one shard while the other models are prepared and committed
#: beside it. benches/bench_batch.py on a shared 2-core box could not tell 1, 2 and 3
#: lanes apart (two runs: 0.96x/1.16x, 1.05x/1.07x, 1.48x/0.84x of three runs); measure
#: on more cores before changing it.
LOCAL_LANES = 1
#: Models being prepared, staged or committed at once; their shards share one queue.
MODELS_AT_ONCE = 4


@dataclass(frozen=True)
class ModelResult:
    """What became of one model of a batch."""

    model: str
    status: Literal["converted", "already done", "failed"]
    output: Path | None
    report: ConversionReport | None = None
    error: str | None = None
    """The one-line error of a failed model."""
    seconds: float = 0.0

    def loss_text(self) -> str:
        if self.report is None or self.report.already_done:
            return "-"
        over = loss_sum(self.report.loss, "overflow")
        under = loss_sum(self.report.loss, "underflow")
        if not over and not under:
            return "none"
        return f"{over} over, {under} under"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "status": self.status,
            "output": str(self.output) if self.output else None,
            "error": self.error,
            "seconds": self.seconds,
            "report": self.report.to_dict() if self.report else None,
        }


@dataclass(frozen=True)
class BatchReport:
    """What a batch did, model by model; ``summary()`` is the table the CLI prints."""

    results: list[ModelResult]
    seconds: float
    executor: str = "local"

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    @property
    def failed(self) -> list[ModelResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def bytes_read(self) -> int:
        return sum(r.report.bytes_read for r in self.results if r.report)

    def summary(self, errors: bool = True) -> str:
        """The table, a total line, then each failed model's error (unless ``errors`` is
        False: the CLI prints those on stderr) and each model's warnings."""
        rows = [("model", "status", "bytes", "time", "GB/s", "loss")]
        for r in self.results:
            rep = r.report
            done = rep is not None and not rep.already_done
            rows.append(
                (
                    r.model,
                    r.status,
                    format_bytes(rep.bytes_read) if rep and done else "-",
                    f"{r.seconds:.1f} s",
                    f"{rep.throughput / 1e9:.2f}" if rep and done else "-",
                    r.loss_text(),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]  # fmt: skip
        converted = sum(1 for r in self.results if r.status != "failed")
        rate = self.bytes_read / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"{converted} of {len(self.results)} model(s) done, {len(self.failed)} failed; "
            f"{format_bytes(self.bytes_read)} read in {self.seconds:.1f} s "
            f"({format_bytes(rate)}/s, {self.executor} executor)"
        )
        for r in self.results:
            if r.error and errors:
                lines.append(f"failed: {r.model}: {r.error}")
            for w in [*r.report.range_risks, *r.report.warnings] if r.report else []:
                lines.append(f"warning: {r.model}: {w}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "executor": self.executor,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "models": [r.to_dict() for r in self.results],
        }


# --- the API ---------------------------------------------------------------------------


def convert_batch(
    models: Sequence[str | os.PathLike[str] | ModelJob],
    dtype: str | None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    executor: Executor = "local",
    ray_address: str | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    report: str | os.PathLike[str] | None = None,
    **options: Any,
) -> BatchReport:
    """Convert several models, each as ``convert`` would, into ``output_dir/<name>-<dtype>``
    (beside each input without ``output_dir``).

    ``options`` are ``convert``'s (``shard_size``, ``keep``, ``resume``...), for every
    model; a ``ModelJob`` carries its own (its ``dtype`` and ``output`` too). A model
    that fails is reported (``status == "failed"``, ``error`` its one line) and the
    others go on. ``executor="ray"`` writes the shards on a Ray cluster
    (``ray_address``, else a local one); every node must see the inputs and the outputs
    at the same paths. ``report`` also writes the batch's report there as JSON (checked
    before any model is converted: never inside an input or an output).

    >>> batch = convert_batch(["llama/", "mistral/"], "bf16", output_dir="out")  # doctest: +SKIP
    >>> print(batch.summary())  # doctest: +SKIP
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
    if "keep" in options:
        options["keep"] = as_patterns(options["keep"], "keep")
    n_threads = thread_count(threads) if executor == "local" else (threads or 1)
    started = time.perf_counter()
    planned = plan_jobs(
        models, dtype, output_dir, options, {"threads": n_threads, "progress": False}
    )
    report_path = None
    if report is not None:
        report_path = check_report_path(report, *batch_places(planned, output_dir))
    show = sys.stderr.isatty() if progress is None else progress
    board = ShardBoard(0, show)
    try:
        if executor == "ray":
            from fastcast._execute.ray_pool import RayPool

            paths = probe_paths(planned), output_folders(planned)
            with RayPool.start(ray_address, paths, threads, options.get("max_memory")) as pool:
                results = run_models(planned, pool, board)
        else:
            local = LocalPool(n_threads, LOCAL_LANES)
            try:
                results = run_models(planned, local, board)
            finally:
                local.close()
    finally:
        board.close()
    done = BatchReport(results, time.perf_counter() - started, executor)
    if report_path is not None:
        write_report(report_path, done.to_dict(), fsync=options.get("fsync", True))
    return done


def batch_places(
    planned: Sequence[PlannedModel | Unplanned], output_dir: str | os.PathLike[str] | None
) -> tuple[list[Path], list[Path]]:
    """The models a batch reads and the folders it writes, where a report must not go."""
    inputs: list[Path] = []
    outputs: list[Path] = [Path(output_dir)] if output_dir is not None else []
    for job in planned:
        if isinstance(job, PlannedModel):
            inputs.append(model_path(job.model))
            outputs.append(output_of(job))
    return inputs, outputs


def run_models(
    planned: list[PlannedModel | Unplanned], pool: ShardPool, board: ShardBoard
) -> list[ModelResult]:
    """Prepare, stage and commit up to ``MODELS_AT_ONCE`` models at a time, their shards
    all going to ``pool``; a failure is the model's result, not the batch's."""
    make_parents(planned)  # once the executor is ready: a cluster not joined writes nothing
    jobs = [p for p in planned if isinstance(p, PlannedModel)]
    models = ThreadPoolExecutor(max(1, min(MODELS_AT_ONCE, len(jobs))), "fastcast-model")
    try:
        futures = {
            id(job): models.submit(convert_one, job, shard_executor(pool, board, job.model))
            for job in jobs
        }
        return [
            futures[id(p)].result()
            if isinstance(p, PlannedModel)
            else ModelResult(p.model, "failed", p.output, error=p.error)
            for p in planned
        ]
    except BaseException:
        pool.cancel()  # Ctrl-C: every running shard stops, each model keeps what it finished
        raise
    finally:
        models.shutdown(wait=True, cancel_futures=True)


def convert_one(job: PlannedModel, executor: ShardExecutor) -> ModelResult:
    """One model of the batch, its shards written by ``executor``."""
    started = time.perf_counter()
    try:
        report = run_conversion(job.model, job.options, executor)
    except Exception as e:
        return ModelResult(
            job.model,
            "failed",
            job.options.output,
            error=one_line(e),
            seconds=time.perf_counter() - started,
        )
    status: Literal["converted", "already done"] = (
        "already done" if report.already_done else "converted"
    )
    return ModelResult(job.model, status, report.output, report, None, report.seconds)
