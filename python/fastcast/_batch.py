"""``fastcast.convert_batch``: many models in one run, each its own conversion.

Every model goes through ``convert`` (prepare, stage, check, commit, its own output
folder, staging folder and journal, so each one resumes on its own); a model that
fails is reported with its one-line error and the others go on. What the batch adds
is where the shards are written: one queue for every model's shards (``_jobs.py``),
on this machine or on a Ray cluster (``_ray_executor.py``).
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastcast._arguments import as_patterns, thread_count
from fastcast._convert import ConversionReport, ShardExecutor, convert, default_output, parse_target
from fastcast._hf_cache import model_path
from fastcast._jobs import LocalPool, ShardBoard, ShardPool, shard_executor
from fastcast._loss import loss_sum
from fastcast._model_dir import TorchOptions, open_model
from fastcast._report_file import check_report_path, write_report
from fastcast._units import format_bytes

Executor = Literal["local", "ray"]

#: Shards written at once by the local executor, the core's threads split between them.
#: One: every thread on one shard while the other models are prepared and committed
#: beside it. benches/bench_batch.py on a shared 2-core box could not tell 1, 2 and 3
#: lanes apart (two runs: 0.96x/1.16x, 1.05x/1.07x, 1.48x/0.84x of three runs); measure
#: on more cores before changing it.
LOCAL_LANES = 1
#: Models being prepared, staged or committed at once; their shards share one queue.
MODELS_AT_ONCE = 4

#: What a job (a model of the batch, a ``[[model]]`` of a jobs file) may set, as
#: ``convert`` takes it; ``path`` and ``output`` are the job's own.
JOB_OPTIONS = frozenset(
    {
        "dtype",
        "shard_size",
        "keep",
        "variant",
        "keep_quantized",
        "dequantize",
        "quantize",
        "strict",
        "overwrite",
        "resume",
        "fp8_overflow",
        "max_memory",
        "state_dict_key",
        "strip_prefix",
    }
)


@dataclass(frozen=True)
class ModelJob:
    """One model of a batch: what it is as typed, where it goes, with which options."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)
    """``convert``'s keyword arguments for it, ``dtype`` and ``output`` included."""


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


def one_line(e: BaseException) -> str:
    """One line naming the file and the problem: ``out/x: No space left on device``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror}"
    return str(e)


# --- jobs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobsFile:
    """A jobs file read: its models, its defaults for all of them, its ``output_dir``."""

    jobs: list[ModelJob]
    defaults: dict[str, Any]
    output_dir: Path | None


def read_jobs(path: str | os.PathLike[str]) -> JobsFile:
    """The models of a jobs file (TOML) and its defaults for all of them.

    Top-level keys are defaults (``dtype``, ``shard_size``, ``keep``..., and
    ``output_dir``); each ``[[model]]`` has a ``path`` (a folder, a file or a repo id)
    and may set its own options and ``output``. Paths are relative to the file's folder.

    >>> read_jobs("jobs.toml").jobs[0].model  # doctest: +SKIP
    'meta-llama/Llama-3.1-8B'
    """
    file = Path(path)
    try:
        doc = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{file}: not TOML: {e}") from None
    here = file.parent
    models = doc.pop("model", None)
    if not isinstance(models, list) or not models:
        raise ValueError(f"{file}: no [[model]] tables (each with a path)")
    defaults = checked_options(doc, f"{file}", {"output_dir"})
    output_dir = defaults.pop("output_dir", None)
    jobs = []
    for i, table in enumerate(models, 1):
        where = f"{file}: model {i}"
        if not isinstance(table, dict) or not isinstance(table.get("path"), str):
            raise ValueError(f'{where}: needs path = "folder, file or org/name"')
        options = checked_options(table, where, {"path", "output"})
        typed = options.pop("path")
        local = here / typed
        model = str(local) if local.exists() or typed.startswith((".", "/")) else typed
        if "output" in options:
            options["output"] = here / str(options["output"])
        jobs.append(ModelJob(model, options))
    return JobsFile(jobs, defaults, None if output_dir is None else here / str(output_dir))


def checked_options(table: Mapping[str, Any], where: str, extra: set[str]) -> dict[str, Any]:
    unknown = sorted(set(table) - JOB_OPTIONS - extra)
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(JOB_OPTIONS | extra))})"
        )
    options = dict(table)
    if isinstance(options.get("keep"), str):
        options["keep"] = [options["keep"]]
    return options


def plan_jobs(
    models: Sequence[str | os.PathLike[str] | ModelJob],
    dtype: str | None,
    output_dir: str | os.PathLike[str] | None,
    options: Mapping[str, Any],
) -> list[ModelJob | ModelResult]:
    """Each model's ``convert`` arguments; a ModelResult for one that fails before
    (an output another model of the batch writes too)."""
    planned: list[ModelJob | ModelResult] = []
    outputs: dict[Path, str] = {}
    for m in models:
        job = m if isinstance(m, ModelJob) else ModelJob(os.fspath(m))
        opts = {**options, **job.options}
        opts.setdefault("dtype", dtype)
        try:
            out = opts.get("output")
            if out is None and output_dir is not None:
                out = Path(output_dir) / default_name(job.model, opts)
            if out is not None:
                key = Path(os.path.abspath(out))
                if key in outputs:
                    raise ValueError(f"{out}: is also the output of {outputs[key]} in this batch")
                outputs[key] = job.model
                opts["output"] = out
        except Exception as e:
            planned.append(ModelResult(job.model, "failed", None, error=one_line(e)))
            continue
        planned.append(ModelJob(job.model, opts))
    return planned


def make_parents(planned: Sequence[ModelJob | ModelResult]) -> None:
    """The folders the outputs go in, made once here, not by models racing to make a
    shared parent."""
    for job in planned:
        out = job.options.get("output") if isinstance(job, ModelJob) else None
        if out is not None:
            Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)


def default_name(model: str, opts: Mapping[str, Any]) -> str:
    """The folder name ``convert`` would give the model's output (``name-bf16``;
    ``name-safetensors`` without a dtype)."""
    return default_path(model, opts).name


def default_path(model: str, opts: Mapping[str, Any]) -> Path:
    """The output ``convert`` would write the model to without ``output``."""
    source = model_path(model)
    torch = TorchOptions(opts.get("state_dict_key"), opts.get("strip_prefix"))
    target = None if opts.get("dtype") is None else parse_target(opts["dtype"])
    return default_output(open_model(source, opts.get("variant"), torch), source, target)


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
    planned = plan_jobs(models, dtype, output_dir, options)
    report_path = None
    if report is not None:
        report_path = check_report_path(report, *batch_places(planned, output_dir))
    show = sys.stderr.isatty() if progress is None else progress
    board = ShardBoard(0, show)
    try:
        if executor == "ray":
            from fastcast._ray_executor import RayPool

            with RayPool.start(ray_address, planned, threads, options.get("max_memory")) as pool:
                results = run_models(planned, pool, board, pool.threads)
        else:
            local = LocalPool(n_threads, LOCAL_LANES)
            try:
                results = run_models(planned, local, board, n_threads)
            finally:
                local.close()
    finally:
        board.close()
    batch = BatchReport(results, time.perf_counter() - started, executor)
    if report_path is not None:
        write_report(report_path, batch.to_dict(), fsync=options.get("fsync", True))
    return batch


def batch_places(
    planned: Sequence[ModelJob | ModelResult], output_dir: str | os.PathLike[str] | None
) -> tuple[list[Path], list[Path]]:
    """The models a batch reads and the folders it writes, where a report must not go."""
    inputs: list[Path] = []
    outputs: list[Path] = [Path(output_dir)] if output_dir is not None else []
    for job in planned:
        if not isinstance(job, ModelJob):
            continue
        source = model_path(job.model)
        inputs.append(source)
        out = job.options.get("output")
        outputs.append(Path(out) if out is not None else default_path(job.model, job.options))
    return inputs, outputs


def run_models(
    planned: list[ModelJob | ModelResult], pool: ShardPool, board: ShardBoard, threads: int
) -> list[ModelResult]:
    """Prepare, stage and commit up to ``MODELS_AT_ONCE`` models at a time, their shards
    all going to ``pool``; a failure is the model's result, not the batch's. ``threads``
    sizes each model's buffers (``max_memory`` is shared by that many)."""
    make_parents(planned)  # once the executor is ready: a cluster not joined writes nothing
    jobs = [p for p in planned if isinstance(p, ModelJob)]
    models = ThreadPoolExecutor(max(1, min(MODELS_AT_ONCE, len(jobs))), "fastcast-model")
    try:
        futures = {
            id(job): models.submit(
                convert_one, job, threads, shard_executor(pool, board, job.model)
            )
            for job in jobs
        }
        return [p if isinstance(p, ModelResult) else futures[id(p)].result() for p in planned]
    except BaseException:
        pool.cancel()  # Ctrl-C: every running shard stops, each model keeps what it finished
        raise
    finally:
        models.shutdown(wait=True, cancel_futures=True)


def convert_one(job: ModelJob, threads: int, executor: ShardExecutor) -> ModelResult:
    """One model of the batch, its shards written by ``executor``."""
    started = time.perf_counter()
    opts = dict(job.options)
    dtype = opts.pop("dtype")
    try:
        report = convert(
            job.model, dtype, threads=threads, progress=False, _executor=executor, **opts
        )
    except Exception as e:
        out = opts.get("output")
        return ModelResult(
            job.model,
            "failed",
            Path(out) if out is not None else None,
            error=one_line(e),
            seconds=time.perf_counter() - started,
        )
    status: Literal["converted", "already done"] = (
        "already done" if report.already_done else "converted"
    )
    return ModelResult(job.model, status, report.output, report, None, report.seconds)
