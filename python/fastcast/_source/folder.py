"""The model folder: which files hold the weights, what is copied, what is skipped.

A model is a folder, or one weights file (``.safetensors``, or a torch.save file:
``.bin .pt .pth .ckpt``, told by its content). Its *weight sets* are found at any
depth: an index (``model.safetensors.index.json``,
``unet/diffusion_pytorch_model.safetensors.index.json``...) with the shards it names,
or a standalone ``.safetensors`` file; and torch.save weights (``pytorch_model.bin``,
its shards with ``pytorch_model.bin.index.json``, ``adapter_model.bin``,
``diffusion_pytorch_model.bin``), read without running pickle (``_source/torchfile.py``)
unless safetensors of the same set sit beside them: safetensors win, and the ``.bin``
is reported skipped. Every other file is copied, except

- weights in other formats, at any depth (``.bin .pt .pth .ckpt .h5 .msgpack .ot .onnx
  .gguf .tflite``...) and the folders that hold exports (``onnx/``, ``openvino/``,
  ``original/``, ``coreml/``): next to the converted weights they would be stale
  duplicates in another dtype;
- variants (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``): an
  output holds one set of weights, so a variant is converted (under the plain name)
  only when chosen with ``variant=``, and skipped with a warning otherwise;
- version control and caches (``.git/``, ``.cache/``...) and fastcast's own files.

Paths named by an index must stay inside the folder, and files found in it may link
only to somewhere inside it or, in a Hugging Face cache, to the same repository's
``blobs/``. The path the user typed is trusted as it is: it may be a link anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fastcast import _core
from fastcast._core import ModelFolderError
from fastcast._names import join, listing
from fastcast._output.record import RECORD_NAME, STAGING_DIR, STAGING_DONE
from fastcast._source.config import CONFIG_NAME
from fastcast._source.entries import TensorEntry
from fastcast._source.hf_cache import is_blob_of
from fastcast._source.torchfile import read_torch_weights

WEIGHTS_SUFFIX = ".safetensors"
INDEX = re.compile(r"^(?P<prefix>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")
SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")
#: torch.save weights a folder is read for: ``pytorch_model.bin``, ``adapter_model.bin``,
#: ``diffusion_pytorch_model.bin``, ``model.bin`` and their shards (not
#: ``training_args.bin`` or ``optimizer.bin``, which are not weights).
TORCH_WEIGHTS = re.compile(r"^(?P<prefix>(?:.*_)?model)(?P<shard>-\d{5}-of-\d{5})?\.bin$")
TORCH_INDEX = re.compile(r"^(?P<prefix>(?:.*_)?model)\.bin\.index\.json$")
#: Weights in other formats (and their indexes): never copied, at any depth.
OTHER_FORMAT = re.compile(
    r"\.(bin|pt|pth|ckpt|h5|msgpack|ot|onnx|onnx_data|gguf|tflite|mlmodel|nemo)"
    r"(\.index(\.[^.]+)?\.json)?$|\.ckpt\.",
    re.IGNORECASE,
)
#: Folders of exports and original-format checkpoints: never copied, at any depth.
EXPORT_FOLDERS = {"onnx", "openvino", "original", "coreml"}
#: Version control, caches: never read or copied.
NEVER_COPIED = {".git", ".hg", ".svn", ".cache", "__pycache__", ".ipynb_checkpoints"}
#: Variant names recognised in ``X.<variant>.safetensors`` without a plain ``X`` beside
#: it (a plain twin makes any name a variant; ``sd_xl_base_1.0.safetensors`` is not one).
KNOWN_VARIANTS = {"fp16", "bf16", "fp32", "fp64", "fp8", "ema", "non_ema"}
#: What a conversion leaves in its output; a source's copy is never copied.
FASTCAST_FILES = {RECORD_NAME, STAGING_DIR, STAGING_DONE}


@dataclass(frozen=True)
class SourceFile:
    """An input safetensors file with its validated header."""

    path: Path
    size: int
    metadata: dict[str, str] | None
    entries: _core.Entries
    """Its tensors in data order, as the core's table (a torch.save file's too)."""
    torch: bool = False
    """A torch.save file (``.bin``...), not safetensors."""
    tied: dict[str, str] = field(default_factory=dict)
    """torch.save: tied duplicates not written, each with the name it is written as."""
    notes: list[str] = field(default_factory=list)

    @cached_property
    def tensors(self) -> list[TensorEntry]:
        """Its tensors in data order, made from the core's table on first use (a plain
        model's conversion plans without them: ``_plan.plain_set``)."""
        return list(map(TensorEntry._make, self.entries.rows()))

    @cached_property
    def names(self) -> list[str]:
        """Its tensors' names, in data order (made once: the index check, the duplicate
        check and quantization detection each read them)."""
        return self.entries.names()

    @property
    def held(self) -> _core.Entries | list[str]:
        """The names it holds for an index: its tensors' (its table: no Python string per
        tensor) and (torch.save) the tied duplicates', which the index lists too."""
        return [*self.names, *self.tied] if self.tied else self.entries


@dataclass(frozen=True)
class WeightSet:
    """Files converted together into one output set (shards plus index)."""

    folder: str
    """Folder relative to the model (``""`` at the top, ``"unet"``...)."""
    prefix: str
    """``model``, ``diffusion_pytorch_model``, ``adapter_model``..."""
    variant: str | None
    """The variant the files carry (``fp16``), dropped in the output's names."""
    index: Path | None
    files: list[SourceFile]

    @property
    def key(self) -> str:
        """The output's name for the set: ``unet/diffusion_pytorch_model``."""
        return f"{self.folder}/{self.prefix}" if self.folder else self.prefix

    @property
    def tensors(self) -> list[TensorEntry]:
        """Tensors in source order: files in name order, each in data order."""
        return [t for f in self.files for t in f.tensors]

    def names(self) -> list[str]:
        """The tensors' names, in source order."""
        return [n for f in self.files for n in f.names]

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for f in self.files:
            for k, v in (f.metadata or {}).items():
                merged.setdefault(k, v)
        return merged


@dataclass(frozen=True)
class Skipped:
    """A file or folder (``onnx/``) left out of the output, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder (or a lone .safetensors file) holds."""

    root: Path
    is_file: bool
    weight_sets: list[WeightSet]
    configs: list[str] = field(default_factory=list)
    """config.json files (relative) beside weights: their dtype claims follow the cast."""
    copies: list[str] = field(default_factory=list)
    """Files (relative) copied as they are."""
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorEntry]:
        return [t for s in self.weight_sets for t in s.tensors]


def inside(root: Path, path: Path) -> bool:
    """True when ``path``, links resolved, is inside ``root`` (links resolved too) or
    is a blob of the Hugging Face cache repository whose snapshot ``root`` is."""
    real_root = root.resolve()
    real = path.resolve()
    return real == real_root or real_root in real.parents or is_blob_of(path, root)


def read_source(path: Path) -> SourceFile:
    """Read and validate one safetensors file's header."""
    return read_sources([path])[0]


def read_sources(paths: list[Path]) -> list[SourceFile]:
    """Read and validate safetensors files' headers, in parallel (a model of 100k
    tensors has megabytes of them); the first bad file in ``paths`` order raises."""
    for path in paths:
        if not path.is_file():
            raise ModelFolderError(f"{path}: not a regular file")
    return [
        SourceFile(path, path.stat().st_size, metadata, entries)
        for path, (metadata, entries) in zip(paths, _core.read_entries(paths), strict=True)
    ]


@dataclass(frozen=True)
class TorchOptions:
    """How the state dict of torch.save files is picked (see ``_source/torchfile.py``)."""

    state_dict_key: str | None = None
    strip_prefix: str | None = None


def read_torch_source(path: Path, options: TorchOptions) -> SourceFile:
    """One torch.save file's weights, read by the core without running pickle."""
    if not path.is_file():
        raise ModelFolderError(f"{path}: not a regular file")
    w = read_torch_weights(path, options.state_dict_key, options.strip_prefix)
    tensors = sorted(w.tensors, key=lambda t: t.offsets)  # data order, as safetensors'
    rows = [(t.name, t.dtype, t.shape, t.offsets, t.pickle_path or ()) for t in tensors]
    entries = _core.Entries(path, rows)
    return SourceFile(path, path.stat().st_size, None, entries, True, w.tied, w.notes)


def torch_output_prefix(prefix: str) -> str:
    """The safetensors name transformers gives a ``.bin`` set: ``pytorch_model`` ->
    ``model``; ``adapter_model``, ``diffusion_pytorch_model`` stay."""
    return "model" if prefix == "pytorch_model" else prefix


def index_shards(index: Path) -> _core.Index:
    """The shard files an index names, each with its tensors (read by the core: it
    may list 100k tensors), checked for hostile paths."""
    table = _core.read_index(index)
    for file in table.files():  # a few files for many tensors: check each once
        rel = Path(file)
        if rel.is_absolute() or ".." in rel.parts or file.strip() == "":
            raise ModelFolderError(
                f"{index}: tensor {table.tensors(file)[0]!r} points to {file!r}, "
                "outside the model folder"
            )
    return table


def read_indexed_set(
    index: Path,
    root: Path,
    folder: str,
    prefix: str,
    variant: str | None,
    torch: TorchOptions | None = None,
) -> WeightSet:
    """A weight set from an index: every shard read, index and headers cross-checked
    both ways (a tensor the index names must be in its shard, and a tensor a shard
    holds must be in the index: otherwise which copy loaders use is ambiguous)."""
    table = index_shards(index)
    names = table.files()
    paths = [index.parent / name for name in names]
    for name, path in zip(names, paths, strict=True):
        if not path.exists():
            raise ModelFolderError(f"{index}: names shard {name!r}, which does not exist")
        if not inside(root, path):
            raise ModelFolderError(f"{path}: links outside the model folder {root}")
    if torch is None:
        files = read_sources(paths)
    else:
        files = [read_torch_source(path, torch) for path in paths]
    found = table.cross_check([f.held for f in files])
    if found is not None:
        kind, at, first, count = found
        more = f" (and {count - 1} more)" if count > 1 else ""
        if kind == "missing":
            raise ModelFolderError(
                f"{index}: says {first!r} is in {names[at]}, but {files[at].path} has no "
                f"such tensor{more}"
            )
        raise ModelFolderError(
            f"{index}: does not list tensor {first!r}, which {files[at].path.name} holds{more}"
        )
    return WeightSet(folder, prefix, variant, index, files)


def check_no_duplicates(sets: Iterable[WeightSet]) -> None:
    """Reject a tensor held by two files of one set: which copy is right is ambiguous."""
    for ws in sets:
        repeat = _core.first_repeat([f.entries for f in ws.files])
        if repeat is not None:
            name, at, earlier = repeat
            raise ModelFolderError(
                f"{ws.files[at].path}: tensor {name!r} is also in {ws.files[earlier].path}; "
                "which copy is right is ambiguous"
            )


def split_variant(stem: str, names: set[str]) -> tuple[str, str | None]:
    """``model.fp16`` -> (``model``, ``fp16``) when that is a variant: a known variant
    name, or any name beside the plain ``model.safetensors`` (or its index).

    >>> split_variant("model.fp16", set()), split_variant("sd_xl_base_1.0", set())
    (('model', 'fp16'), ('sd_xl_base_1.0', None))
    """
    prefix, dot, variant = stem.rpartition(".")
    if not dot or not prefix or not re.fullmatch(r"[A-Za-z0-9_]+", variant):
        return stem, None
    plain = {f"{prefix}{WEIGHTS_SUFFIX}", f"{prefix}.safetensors.index.json"}
    if variant in KNOWN_VARIANTS or plain & names:
        return prefix, variant
    return stem, None


class _Scan:
    """One walk over a model folder, sorting every entry into weights, copies, skips."""

    def __init__(self, root: Path, variant: str | None, torch: TorchOptions) -> None:
        self.root = root
        self.variant = variant
        self.torch = torch
        self.sets: list[WeightSet] = []
        self.configs: list[str] = []
        self.copies: list[str] = []
        self.skipped: list[Skipped] = []
        self.warnings: list[str] = []
        self.claimed: set[Path] = set()
        self.seen: set[Path] = set()

    def skip(self, rel: str, reason: str) -> None:
        self.skipped.append(Skipped(rel, reason))

    def folder(self, rel: str) -> None:
        path = self.root / rel if rel else self.root
        real = path.resolve()
        if real in self.seen:
            self.skip(rel + "/", "a link to a folder already read")
            return
        self.seen.add(real)
        files, folders = [], []
        for entry in sorted(path.iterdir(), key=lambda e: e.name):
            name, child = entry.name, join(rel, entry.name)
            if name in NEVER_COPIED or name.endswith(_core.PARTIAL_SUFFIX):
                continue
            if not rel and name in FASTCAST_FILES:
                continue  # a previous conversion's record: this one writes its own
            if entry.is_dir():
                if not inside(self.root, entry):
                    raise ModelFolderError(f"{entry}: links outside the model folder {self.root}")
                if name.lower() in EXPORT_FOLDERS or name.endswith(".mlpackage"):
                    self.skip(child + "/", "weights in another format")
                else:
                    folders.append(name)
            elif entry.is_file():
                files.append(name)
            else:
                self.skip(child, "not a regular file (a broken link?)")
        self.files(rel, path, files)
        for name in folders:
            self.folder(join(rel, name))

    def files(self, rel: str, path: Path, names: list[str]) -> None:
        present = set(names)
        indexes: dict[str | None, list[tuple[str, str]]] = {}
        singles: dict[str | None, list[tuple[str, str]]] = {}
        shards: list[tuple[str, str | None]] = []
        torch_sets: dict[str, tuple[str | None, list[str]]] = {}  # prefix -> index, files
        for name in names:
            if self.is_claimed(path / name):
                continue
            torch_index, torch_file = TORCH_INDEX.match(name), TORCH_WEIGHTS.match(name)
            if torch_index:
                torch_sets.setdefault(torch_index["prefix"], (None, []))
                torch_sets[torch_index["prefix"]] = (name, torch_sets[torch_index["prefix"]][1])
                continue
            if torch_file:
                torch_sets.setdefault(torch_file["prefix"], (None, []))[1].append(name)
                continue
            index = INDEX.match(name)
            shard = SHARD.match(name)
            if index:
                indexes.setdefault(index["variant"], []).append((name, index["prefix"]))
            elif shard:
                shards.append((name, split_variant(shard["stem"], present)[1]))
            elif name.endswith(WEIGHTS_SUFFIX):
                prefix, variant = split_variant(name[: -len(WEIGHTS_SUFFIX)], present)
                singles.setdefault(variant, []).append((name, prefix))
            elif OTHER_FORMAT.search(name):
                self.skip(join(rel, name), "weights in another format")
            elif name != CONFIG_NAME:
                self.check_inside(path / name)
                self.copies.append(join(rel, name))
        chosen = self.choose_variant(rel, set(indexes) | set(singles) | {v for _, v in shards})
        for variant, found in indexes.items():
            for name, prefix in found:
                if variant == chosen:
                    ws = read_indexed_set(path / name, self.root, rel, prefix, variant)
                    self.sets.append(ws)
                    self.claimed.update(f.path.absolute() for f in ws.files)
                else:
                    self.skip_variant(rel, name, variant)
        for variant, found in singles.items():
            for name, prefix in found:
                if variant != chosen:
                    self.skip_variant(rel, name, variant)
                elif not self.is_claimed(path / name):
                    self.check_inside(path / name)
                    source = read_source(path / name)
                    self.sets.append(WeightSet(rel, prefix, variant, None, [source]))
        for name, variant in shards:
            if self.is_claimed(path / name):
                continue
            if variant != chosen:
                self.skip_variant(rel, name, variant)
            else:
                self.skip(join(rel, name), "a shard no index names")
                self.warnings.append(
                    f"{join(rel, name)} looks like a shard but no index names it; not converted"
                )
        self.torch_sets(rel, path, torch_sets)
        if CONFIG_NAME in present:
            config = join(rel, CONFIG_NAME)
            self.check_inside(path / CONFIG_NAME)
            has_weights = any(ws.folder == rel for ws in self.sets)
            (self.configs if has_weights else self.copies).append(config)

    def torch_sets(
        self, rel: str, path: Path, found: dict[str, tuple[str | None, list[str]]]
    ) -> None:
        """torch.save weight sets of a folder: skipped where safetensors of the same
        set were read (safetensors win), read otherwise (an index with its shards, or
        one file; shards no index names are skipped, as for safetensors)."""
        have = {ws.prefix for ws in self.sets if ws.folder == rel}
        for prefix, (index, files) in sorted(found.items()):
            out = torch_output_prefix(prefix)
            listed = [*([index] if index else []), *files]
            if out in have:
                for name in listed:
                    self.skip(
                        join(rel, name),
                        "torch .bin weights; the safetensors beside them are converted",
                    )
                continue
            if index is not None:
                self.check_inside(path / index)
                ws = read_indexed_set(path / index, self.root, rel, out, None, self.torch)
                self.sets.append(ws)
                self.claimed.update(f.path.absolute() for f in ws.files)
                strays = [n for n in files if not self.is_claimed(path / n)]
            else:
                single = [n for n in files if TORCH_WEIGHTS.match(n)["shard"] is None]  # type: ignore[index]
                strays = [n for n in files if n not in single]
                for name in single:
                    self.check_inside(path / name)
                    source = read_torch_source(path / name, self.torch)
                    self.sets.append(WeightSet(rel, out, None, None, [source]))
            for name in strays:
                self.skip(join(rel, name), "a shard no index names")
                self.warnings.append(
                    f"{join(rel, name)} looks like a shard but no index names it; not converted"
                )

    def choose_variant(self, rel: str, found: set[str | None]) -> str | None:
        """The variant this folder's weights are read from: the one asked for if the
        folder has it, else the plain weights. A folder with only variants (and none
        asked for) is an error rather than a silently weightless output."""
        if self.variant in found:
            return self.variant
        if None in found or not found:
            return None
        variants = ", ".join(sorted(v for v in found if v))
        where = f"{self.root / rel}" if rel else f"{self.root}"
        raise ModelFolderError(
            f"{where}: holds only variant weights ({variants}); choose one with "
            f"--variant {min(v for v in found if v)}"
        )

    def skip_variant(self, rel: str, name: str, variant: str | None) -> None:
        path = join(rel, name)
        if variant is None:
            self.skip(path, f"plain weights (variant {self.variant} chosen)")
            return
        self.skip(path, f"variant {variant}")
        warning = f"variant {variant} not converted (convert it instead with --variant {variant})"
        if warning not in self.warnings:
            self.warnings.append(warning)

    def is_claimed(self, path: Path) -> bool:
        return path.absolute() in self.claimed

    def check_inside(self, path: Path) -> None:
        if not inside(self.root, path):
            raise ModelFolderError(f"{path}: links outside the model folder {self.root}")


def open_model(
    path: str | os.PathLike[str],
    variant: str | None = None,
    torch: TorchOptions | None = None,
) -> ModelFolder:
    """Find the weights, configs and other files of a model folder or a lone file.

    ``variant`` (``"fp16"``) converts ``X.fp16.safetensors`` files instead of the
    plain ones, in every folder that has them; ``torch`` says how the state dict of
    torch.save files is picked. Raises ModelFolderError (a FastcastError) naming the
    file and the problem, InvalidCheckpointError for a torch.save file refused.

    >>> open_model("tiny-sd/").weight_sets[0].key  # doctest: +SKIP
    'text_encoder/model'
    """
    p = Path(path)
    if not p.exists():
        raise ModelFolderError(f"{p}: no such file or folder")
    options = torch or TorchOptions()
    if p.is_file():
        if not p.name.endswith(WEIGHTS_SUFFIX) or starts_as_zip(p):
            # Told by content: the core refuses what is not a torch.save zip, and says why.
            source = read_torch_source(p, options)
            prefix = torch_output_prefix(p.name.partition(".")[0] or p.name)
            sets = [WeightSet("", prefix, None, None, [source])]
            return ModelFolder(p.parent, True, sets, warnings=list(source.notes))
        siblings = {e.name for e in p.parent.iterdir()} if p.parent.is_dir() else set()
        prefix, found = split_variant(p.name[: -len(WEIGHTS_SUFFIX)], siblings)
        source = read_source(p)  # the user named it: no containment check
        return ModelFolder(p.parent, True, [WeightSet("", prefix, found, None, [source])])
    if not p.is_dir():
        raise ModelFolderError(f"{p}: not a file or folder (a FIFO, a socket or a device)")
    scan = _Scan(p, variant, options)
    scan.folder("")
    if not scan.sets:
        hint = ""
        if any(s.reason == "weights in another format" for s in scan.skipped):
            hint = (
                " (fastcast reads pytorch_model.bin-style names in a folder; pass a "
                "lone .pt/.pth/.ckpt file itself)"
            )
        if (p / STAGING_DIR).is_dir():
            hint = (
                f" (an unfinished conversion is in {STAGING_DIR}/: run the same convert "
                "command with --resume to finish it)"
            )
        raise ModelFolderError(f"{p}: no .safetensors or .bin weights found{hint}")
    if variant is not None and not any(ws.variant == variant for ws in scan.sets):
        raise ModelFolderError(f"{p}: has no weights of variant {variant!r}")
    check_no_duplicates(scan.sets)
    check_utf8_names(p, scan.sets)
    notes = [n for ws in scan.sets for f in ws.files for n in f.notes]
    return ModelFolder(
        p, False, scan.sets, scan.configs, scan.copies, scan.skipped, scan.warnings + notes
    )


def check_utf8_names(root: Path, sets: Iterable[WeightSet]) -> None:
    """Refuse a weight set whose folder or file name is not UTF-8: its output shards
    would bear the name, and an index (JSON) cannot name them, nor readers find them.
    Other files so named are copied as they are."""
    for ws in sets:
        for f in ws.files:
            rel = join(ws.folder, f.path.name)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise ModelFolderError(
                    f"{root / rel}: a weights file or folder whose name is not valid UTF-8; "
                    "no index can name its shards: rename it"
                ) from None


def starts_as_zip(path: Path) -> bool:
    """A zip (a torch.save file) whatever its name says."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def describe_skipped(skipped: list[Skipped], shown: int = 6) -> list[str]:
    """``onnx/, original/, pytorch_model.bin (weights in another format)``, one line per
    reason, naming a few files each."""
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.path)
    lines = []
    for reason, paths in by_reason.items():
        lines.append(f"{listing(paths, shown)} ({reason})")
    return lines
