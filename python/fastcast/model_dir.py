"""The model folder: which files hold the weights, what else to copy, and config.json.

A folder holds one or more *weight sets*: an index
(``model.safetensors.index.json``, ``diffusion_pytorch_model.safetensors.index.json``...)
with the shards it names, or a standalone ``.safetensors`` file. Everything else
at the top level is copied as it is, except weights in other formats (which
would disagree with the converted ones) and version-control or cache folders.

Every path read is checked to stay inside the folder; the one exception is a
Hugging Face cache snapshot, whose files are links into the repo's ``blobs/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcast import _core
from fastcast._core import ModelFolderError

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-\d{5}-of-\d{5}\.safetensors$")
#: Weights in other formats: copying them would ship stale, differently typed
#: duplicates of the converted weights.
OTHER_FORMAT_WEIGHTS = re.compile(
    r"^(pytorch_model.*\.bin|pytorch_model\.bin\.index\.json|tf_model.*\.h5"
    r"|flax_model.*\.msgpack|model\.ckpt.*)$"
)
NEVER_COPIED = {".git", ".cache", ".hg", ".svn", "__pycache__"}
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an input file; ``offsets`` are absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SourceFile:
    """An input safetensors file with its validated header."""

    path: Path
    size: int
    metadata: dict[str, str] | None
    tensors: list[TensorEntry]


@dataclass(frozen=True)
class WeightSet:
    """Files converted together into one output set (shards plus index)."""

    prefix: str
    index: Path | None
    files: list[SourceFile]

    @property
    def tensors(self) -> list[TensorEntry]:
        """Tensors in source order: files in name order, each in data order."""
        return [t for f in self.files for t in f.tensors]

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for f in self.files:
            for k, v in (f.metadata or {}).items():
                merged.setdefault(k, v)
        return merged


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder (or a lone .safetensors file) holds."""

    root: Path
    is_file: bool
    weight_sets: list[WeightSet]
    config: Path | None
    copies: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorEntry]:
        return [t for s in self.weight_sets for t in s.tensors]


def inside(root: Path, path: Path) -> bool:
    """True when ``path``, links resolved, is inside ``root`` or is an HF cache blob
    of the same repository (``snapshots/<rev>/x`` → ``../../blobs/<hash>``)."""
    real_root = root.resolve()
    real = path.resolve()
    if real == real_root or real_root in real.parents:
        return True
    snapshots = real_root.parent
    blobs = snapshots.parent / "blobs"
    return snapshots.name == "snapshots" and real.parent == blobs.resolve()


def read_source(path: Path, root: Path) -> SourceFile:
    """Read and validate one safetensors file's header."""
    if not inside(root, path):
        raise ModelFolderError(f"{path}: links outside the model folder {root}")
    if not path.is_file():
        raise ModelFolderError(f"{path}: not a regular file")
    header = _core.read_header(path)
    start = header["data_start"]
    tensors = [
        TensorEntry(name, dtype, tuple(shape), path, (start + b, start + e))
        for name, dtype, shape, (b, e) in header["tensors"]
    ]
    tensors.sort(key=lambda t: t.offsets)
    return SourceFile(path, path.stat().st_size, header["metadata"], tensors)


def index_shards(index: Path, root: Path) -> dict[str, list[str]]:
    """Shard file name → tensor names, from an index, checked for hostile paths."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{index}: not valid JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelFolderError(f"{index}: has no weight_map of tensor names to file names")
    shards: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        rel = Path(file)
        if rel.is_absolute() or ".." in rel.parts or file.strip() == "":
            raise ModelFolderError(
                f"{index}: tensor {tensor!r} points to {file!r}, outside the model folder"
            )
        shards.setdefault(file, []).append(tensor)
    return dict(sorted(shards.items()))


def read_indexed_set(index: Path, root: Path) -> WeightSet:
    """A weight set from an index: every shard read, index and headers cross-checked
    both ways (a tensor the index names must be in its shard, and a tensor a shard
    holds must be in the index: otherwise which copy loaders use is ambiguous)."""
    prefix = index.name[: -len(INDEX_SUFFIX)]
    shards = index_shards(index, root)
    listed = {tensor for tensors in shards.values() for tensor in tensors}
    files = []
    for name, in_this_shard in shards.items():
        path = root / name
        if not path.exists():
            raise ModelFolderError(f"{index}: names shard {name!r}, which does not exist")
        source = read_source(path, root)
        present = {t.name for t in source.tensors}
        missing = [t for t in in_this_shard if t not in present]
        if missing:
            raise ModelFolderError(
                f"{index}: says {missing[0]!r} is in {name}, but {path} has no such tensor"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        files.append(source)
    extra = [(t.name, f.path.name) for f in files for t in f.tensors if t.name not in listed]
    if extra:
        raise ModelFolderError(
            f"{index}: does not list tensor {extra[0][0]!r}, which {extra[0][1]} holds"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return WeightSet(prefix, index, files)


def check_no_duplicates(sets: list[WeightSet]) -> None:
    """Reject a tensor held by two files of one set: which copy is right is ambiguous."""
    for ws in sets:
        where: dict[str, Path] = {}
        for f in ws.files:
            for t in f.tensors:
                if t.name in where:
                    raise ModelFolderError(
                        f"{f.path}: tensor {t.name!r} is also in {where[t.name]}; "
                        "which copy is right is ambiguous"
                    )
                where[t.name] = f.path


def open_model(path: str | os.PathLike[str]) -> ModelFolder:
    """Find the weights, config and other files of a model folder or a lone file.

    Raises ModelFolderError (a FastcastError) naming the file and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFolderError(f"{p}: no such file or folder")
    if p.is_file():
        if not p.name.endswith(WEIGHTS_SUFFIX):
            raise ModelFolderError(f"{p}: not a .safetensors file or a model folder")
        source = read_source(p, p.parent)
        return ModelFolder(
            p.parent, True, [WeightSet(p.name[: -len(WEIGHTS_SUFFIX)], None, [source])], None
        )

    root = p
    entries = sorted(root.iterdir(), key=lambda e: e.name)
    sets = [read_indexed_set(e, root) for e in entries if e.name.endswith(INDEX_SUFFIX)]
    claimed = {f.path.name for s in sets for f in s.files} | {s.index.name for s in sets if s.index}
    copies, skipped, warnings = [], [], []
    for e in entries:
        name = e.name
        if name in claimed or name in NEVER_COPIED or name.endswith(".fastcast-partial"):
            continue
        if name == CONFIG_NAME:
            continue
        if name.endswith(WEIGHTS_SUFFIX) and e.is_file():
            if SHARD_NAME.match(name):
                skipped.append(e)
                warnings.append(f"{name} looks like a shard but no index names it; not converted")
            else:
                sets.append(WeightSet(name[: -len(WEIGHTS_SUFFIX)], None, [read_source(e, root)]))
            continue
        if OTHER_FORMAT_WEIGHTS.match(name):
            skipped.append(e)
            continue
        nested = list(e.rglob("*")) if e.is_dir() and not e.is_symlink() else []
        for item in [e, *nested]:
            if not inside(root, item):
                raise ModelFolderError(f"{item}: links outside the model folder {root}")
        copies.append(e)
    if not sets:
        hint = ""
        if any(OTHER_FORMAT_WEIGHTS.match(s.name) for s in skipped):
            hint = " (pytorch_model.bin and friends are pickles; fastcast reads safetensors)"
        raise ModelFolderError(f"{root}: no .safetensors weights found{hint}")
    check_no_duplicates(sets)
    if skipped and any(OTHER_FORMAT_WEIGHTS.match(s.name) for s in skipped):
        names = ", ".join(s.name for s in skipped if OTHER_FORMAT_WEIGHTS.match(s.name))
        warnings.append(f"not copied (weights in another format, now stale): {names}")
    config = root / CONFIG_NAME if (root / CONFIG_NAME).is_file() else None
    if config is not None and not inside(root, config):
        raise ModelFolderError(f"{config}: links outside the model folder {root}")
    return ModelFolder(root, False, sets, config, copies, skipped, warnings)


# --- config.json ----------------------------------------------------------------

DTYPE_KEYS = ("torch_dtype", "dtype")


def config_dtypes(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every dtype claim in a config, by dotted key (``text_config.torch_dtype``)."""
    found: dict[str, str] = {}
    for key, value in config.items():
        if key in DTYPE_KEYS and isinstance(value, str):
            found[prefix + key] = value
        elif isinstance(value, dict) and is_sub_config(key, value):
            found.update(config_dtypes(value, f"{prefix}{key}."))
    return found


def is_sub_config(key: str, value: dict[str, Any]) -> bool:
    """Nested configs (text_config, vision_config, encoder...) carry their own dtype;
    quantization settings and the like do not."""
    return key != "quantization_config" and (
        key.endswith("_config") or key in ("encoder", "decoder") or "model_type" in value
    )


def retype_config(config: dict[str, Any], torch_name: str, top: bool = True) -> dict[str, Any]:
    """``config`` with every dtype key set to ``torch_name``; key order kept.

    The top level always gets ``torch_dtype`` (read by every transformers
    version); ``dtype`` (the newer key) is set wherever it already exists.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in DTYPE_KEYS and (value is None or isinstance(value, str)):
            out[key] = torch_name
        elif isinstance(value, dict) and is_sub_config(key, value):
            out[key] = retype_config(value, torch_name, top=False)
        else:
            out[key] = value
    if top and "torch_dtype" not in out:
        out["torch_dtype"] = torch_name
    return out


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: not a JSON object")
    return data


# --- writing into the output folder ------------------------------------------------


def write_text_atomic(path: Path, text: str, fsync: bool = True) -> None:
    """Write ``text`` under a temporary name, then rename it into place."""
    temp = Path(_core.partial_path(path))
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or folder (following links, which were checked to stay inside
    the model folder) under a temporary name, then rename it into place."""
    temp = Path(_core.partial_path(dst))
    try:
        if src.is_dir():
            shutil.copytree(src, temp, symlinks=False)
        else:
            shutil.copy2(src, temp)
        os.replace(temp, dst)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def tree_size(path: Path) -> int:
    """Bytes a copy of ``path`` (file or folder, links followed) will take."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
