"""Where a conversion reads and writes, checked before anything is written: the
default output, an output that is (or is inside) the input, free space, readable
headers, every file the output will hold in commit order."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastcast import _core
from fastcast._conversion.configs import ConfigFix
from fastcast._core import (
    InsufficientSpaceError,
    ModelFolderError,
    OutputExistsError,
)
from fastcast._dtypes import short_name
from fastcast._output.record import RECORD_NAME
from fastcast._plan.merge import Merging
from fastcast._plan.shards import ConversionPlan
from fastcast._source.folder import ModelFolder
from fastcast._source.hf_cache import cache_snapshot
from fastcast._units import format_bytes

#: Room for headers, the index and config.json on top of the tensor bytes.
HEADER_ALLOWANCE = 1 << 20


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


def inputs_of(
    folder: ModelFolder, source: Path, plan: ConversionPlan, copies: dict[str, Path]
) -> list[Path]:
    """Everything a conversion reads, for the places nothing may be written: the model
    (its folder, or the file given), every weights file (in a Hugging Face cache, the
    blobs the snapshot links to) and every file copied."""
    top = [source] if folder.is_file else [folder.root]
    others = [*copies.values(), *(folder.root / rel for rel in folder.configs)]
    return [*top, *plan.sources, *others]


def copies_of(folder: ModelFolder, merging: Merging | None) -> dict[str, Path]:
    """The files copied into the output, by output path: the model's other files and,
    merging an adapter that has them, its tokenizer files in place of the base's."""
    copies = {rel: folder.root / rel for rel in folder.copies}
    if merging is not None and not folder.is_file:
        copies |= merging.adapter.tokenizer_files
    return copies


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


def commit_order(
    plan: ConversionPlan, copies: dict[str, Path], configs: list[ConfigFix]
) -> list[str]:
    """Every file of the output, in the order it is put in place: shards and copies,
    the record, config.json files, and the indexes last (an index marks a finished set)."""
    return [
        *(s.name for s in plan.shards),
        *copies,
        RECORD_NAME,
        *(c.rel for c in configs),
        *(sp.index_name for sp in plan.sets if sp.index_name),
    ]
