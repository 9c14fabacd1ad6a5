"""A batch's models before they run: a jobs file read, each model's options checked
into its ``ConvertOptions``, its output decided and claimed once.

A leaf of the batch: ``_batch/run.py`` runs what this plans, and the Ray executor reads the
planned paths, without either importing the other's orchestration.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastcast._conversion.places import default_output
from fastcast._core import ModelFolderError
from fastcast._errors import one_line
from fastcast._source.folder import TorchOptions, open_model
from fastcast._source.hf_cache import model_path
from fastcast.options import KEYS, ConvertOptions

#: What a job (a model of the batch, a ``[[model]]`` of a jobs file) may set, as
#: ``convert`` takes it; ``path`` and ``output`` are the job's own, and how the batch
#: runs (threads, progress, its report, fsync) is the batch's.
JOB_OPTIONS = KEYS - {"output", "threads", "progress", "report", "fsync"}


@dataclass(frozen=True)
class ModelJob:
    """One model of a batch: what it is as typed, where it goes, with which options."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)
    """``convert``'s keyword arguments for it, ``dtype`` and ``output`` included."""


@dataclass(frozen=True)
class PlannedModel:
    """A model of the batch ready to run: its options checked, its output decided."""

    model: str
    options: ConvertOptions


@dataclass(frozen=True)
class Unplanned:
    """A model of the batch that fails before it runs: its one-line error."""

    model: str
    error: str
    output: Path | None = None


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


def with_jobs_file(
    models: Sequence[str | ModelJob],
    jobs_file: str | os.PathLike[str] | None,
    dtype: str | None,
    output_dir: str | os.PathLike[str] | None,
    flags: Mapping[str, Any],
) -> tuple[list[str | ModelJob], str | None, str | os.PathLike[str] | None, dict[str, Any]]:
    """The command line's models, dtype, output folder and options with a jobs file's
    added: its models after the named ones, its settings over the flags', except that
    ``-o`` wins over its ``output_dir``."""
    jobs: list[str | ModelJob] = list(models)
    options = dict(flags)
    if jobs_file is not None:
        listed = read_jobs(jobs_file)
        jobs += listed.jobs
        defaults = dict(listed.defaults)
        if "dtype" in defaults:
            dtype = str(defaults.pop("dtype"))
        options.update(defaults)
        output_dir = output_dir or listed.output_dir
    if not jobs:
        raise ValueError("convert needs a model (or --jobs FILE)")
    return jobs, dtype, output_dir, options


def plan_jobs(
    models: Sequence[str | os.PathLike[str] | ModelJob],
    dtype: str | None,
    output_dir: str | os.PathLike[str] | None,
    options: Mapping[str, Any],
    batch: Mapping[str, Any],
) -> list[PlannedModel | Unplanned]:
    """Each model's checked options, ``batch``'s (threads, fsync...) included; an
    Unplanned for one whose options are wrong or whose output another model of the
    batch writes too."""
    planned: list[PlannedModel | Unplanned] = []
    outputs: dict[Path, str] = {}
    for m in models:
        job = m if isinstance(m, ModelJob) else ModelJob(os.fspath(m))
        opts = {**options, **job.options}
        opts.setdefault("dtype", dtype)
        try:
            checked = ConvertOptions.make(**opts, **batch)
        except Exception as e:
            given = opts.get("output")
            output = None if given is None else Path(given)
            planned.append(Unplanned(job.model, one_line(e), output))
            continue
        try:
            out = checked.output
            if out is None and output_dir is not None:
                out = Path(output_dir) / default_path(job.model, checked).name
            if out is not None:
                key = Path(os.path.abspath(out))
                if key in outputs:
                    raise ValueError(f"{out}: is also the output of {outputs[key]} in this batch")
                outputs[key] = job.model
                checked = replace(checked, output=out)
        except Exception as e:
            planned.append(Unplanned(job.model, one_line(e)))
            continue
        planned.append(PlannedModel(job.model, checked))
    return planned


def default_path(model: str, options: ConvertOptions) -> Path:
    """The output ``convert`` writes the model to without ``output``
    (``name-bf16``; ``name-safetensors`` without a dtype)."""
    source = model_path(model)
    torch = TorchOptions(options.state_dict_key, options.strip_prefix)
    return default_output(open_model(source, options.variant, torch), source, options.dtype)


def output_of(job: PlannedModel) -> Path:
    """Where ``job`` writes."""
    if job.options.output is not None:
        return job.options.output
    return default_path(job.model, job.options)


def make_parents(planned: Sequence[PlannedModel | Unplanned]) -> None:
    """The folders the outputs go in, made once here, not by models racing to make a
    shared parent."""
    for job in planned:
        if isinstance(job, PlannedModel) and job.options.output is not None:
            Path(os.path.abspath(job.options.output)).parent.mkdir(parents=True, exist_ok=True)


def probe_paths(planned: Sequence[PlannedModel | Unplanned]) -> list[Path]:
    """For each model of the batch, a weight file every node must be able to read."""
    found = []
    for job in planned:
        if not isinstance(job, PlannedModel):
            continue
        try:
            root = model_path(job.model)
        except ModelFolderError:
            continue  # the model fails on its own, with its own error
        if root.is_file():
            found.append(root)
        else:
            found.extend(sorted(root.rglob("*.safetensors"))[:1])
    return found


def output_folders(planned: Sequence[PlannedModel | Unplanned]) -> list[Path]:
    """The nearest existing folder of each output the batch names (a probe goes there)."""
    found = set()
    for job in planned:
        out = job.options.output if isinstance(job, PlannedModel) else None
        if out is not None:
            folder = Path(os.path.abspath(out))
            while not folder.exists():
                folder = folder.parent
            found.add(folder if folder.is_dir() else folder.parent)
    return sorted(found)
