"""torch.save checkpoints (``.bin .pt .pth .ckpt``): which tensors of the file are the
model's weights, under which names, as byte ranges of the file.

The Rust core reads the file without running anything (``_core.read_torch_file``) and
returns the pickled object flattened: one entry per path through dicts down to a tensor
or to anything else. This module picks the state dict out of it:

- a top-level dict of tensors is the state dict (``torch.save(model.state_dict())``);
- else one known key holding tensors (``state_dict``, ``model``, ``module``,
  ``model_state_dict``) or the one the user names (``state_dict_key``); every other key
  (``epoch``, ``optimizer``...) is reported and skipped;
- several candidates, or none known, are refused with one line listing them.

Then, within it: a ``module.`` prefix on every name (DistributedDataParallel) is reported
and removed with ``strip_prefix``; tied duplicates (one storage, offset, shape and stride
under two names) are written once under the first name in the file, as transformers does
for a tied Llama (``model.embed_tokens.weight`` kept, ``lm_head.weight`` dropped);
partial overlaps (slices of one flat buffer) each keep their own range; non-contiguous
views (transposed, expanded) are refused by name: the executor copies byte ranges and
fastcast does not gather strided views (yet).

    weights = read_torch_weights(Path("pytorch_model.bin"))
    [t.name for t in weights.tensors]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcast import _core
from fastcast._core import ModelFolderError
from fastcast._names import listing as listing_of
from fastcast._source.entries import TensorEntry

if TYPE_CHECKING:
    from fastcast._core import TorchEntry, TorchFile, TorchTensor
#: Keys that hold the state dict in training checkpoints, in the order they are tried.
KNOWN_KEYS = ("state_dict", "model", "module", "model_state_dict")
#: The prefix DistributedDataParallel (and DataParallel) put on every name.
DDP_PREFIX = "module."
#: Names listed in one line before "and N more".
SHOWN = 4


@dataclass(frozen=True)
class TorchWeights:
    """The weights of one torch.save file, ready for the plan."""

    path: Path
    tensors: list[TensorEntry]
    key: str | None = None
    """The key the state dict was under (None: the top level)."""
    tied: dict[str, str] = field(default_factory=dict)
    """Dropped name -> the name it is tied to (written once, under that name)."""
    notes: list[str] = field(default_factory=list)
    """What a user should know: keys skipped, a prefix seen, members unreferenced."""


def listing(names: list[str], shown: int = SHOWN) -> str:
    """``'a', 'b', 'c' and 2 more``."""
    return listing_of([repr(n) for n in names], shown)


def read_torch_file(path: Path) -> TorchFile:
    """The core's reading of ``path``; InvalidCheckpointError for anything it refuses."""
    return _core.read_torch_file(path)


def read_torch_weights(
    path: Path,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
) -> TorchWeights:
    """Read ``path`` and pick its weights (see the module docstring)."""
    return select_weights(path, read_torch_file(path), state_dict_key, strip_prefix)


def describe_path(path: list[str]) -> str:
    return ".".join(path) if path else "(the top level)"


def choose_key(path: Path, entries: list[TorchEntry], state_dict_key: str | None) -> list[str]:
    """The path of the dict that is the state dict: ``[]`` for the top level."""
    holding: dict[str, None] = {}  # top-level keys with tensors below, in file order
    for e in entries:
        if "tensor" in e and e["path"]:
            holding[e["path"][0]] = None
    if state_dict_key is not None:
        keys = list(dict.fromkeys(e["path"][0] for e in entries if e["path"]))
        if state_dict_key not in keys:
            raise ModelFolderError(
                f"{path}: has no key {state_dict_key!r} (its keys: {listing(keys, 8)})"
            )
        if state_dict_key not in holding:
            raise ModelFolderError(f"{path}: key {state_dict_key!r} holds no tensors")
        return [state_dict_key]
    top = [e["path"][0] for e in entries if "tensor" in e and len(e["path"]) == 1]
    known = [k for k in KNOWN_KEYS if k in holding and k not in top]
    if top and not known:
        return []
    if len(known) == 1 and not top:
        return [known[0]]
    candidates = (["(the top level)"] if top else []) + (known or list(holding))
    if not candidates:
        raise ModelFolderError(f"{path}: holds no tensors")
    hint = f"--state-dict-key {known[0] if known else next(iter(holding))}"
    raise ModelFolderError(
        f"{path}: which state dict to convert is ambiguous: tensors are under "
        f"{', '.join(candidates[:8])}; choose one with {hint}"
    )


def select_weights(
    path: Path,
    tf: TorchFile,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
) -> TorchWeights:
    """The weights of a file the core has read: the state dict chosen, names made
    (nested dicts inside it joined with ``.``), tied duplicates dropped, views refused."""
    entries = tf["entries"]
    root_tensor = next((e for e in entries if "tensor" in e and not e["path"]), None)
    if root_tensor is not None:
        raise ModelFolderError(f"{path}: holds a single tensor, not a dict of named tensors")
    if not any("tensor" in e for e in entries):
        objects = [e for e in entries if str(e.get("other", "")).startswith("object ")]
        if objects:
            where = describe_path(objects[0]["path"])
            raise ModelFolderError(
                f"{path}: holds a pickled {objects[0]['other'].removeprefix('object ')} "
                f"object at {where} (torch.save of a model, not of its state_dict), whose "
                "tensors fastcast cannot read without running its code; save "
                "model.state_dict() instead"
            )
        raise ModelFolderError(f"{path}: holds no tensors")
    prefix = choose_key(path, entries, state_dict_key)
    n = len(prefix)
    notes: list[str] = []
    outside = list(dict.fromkeys(e["path"][0] for e in entries if e["path"][:n] != prefix))
    if outside:
        notes.append(
            f"{path.name}: weights read from {describe_path(prefix)!r}; other keys skipped: "
            f"{listing(outside)}"
        )
    chosen = [e for e in entries if e["path"][:n] == prefix]
    others = [".".join(e["path"][n:]) for e in chosen if "tensor" not in e]
    if others:
        notes.append(
            f"{path.name}: {len(others)} entr{'y' if len(others) == 1 else 'ies'} of the "
            f"state dict that are not tensors skipped: {listing(others)}"
        )
    named = [(".".join(e["path"][n:]), e["tensor"]) for e in chosen if "tensor" in e]
    origin = {".".join(e["path"][n:]): tuple(e["path"]) for e in chosen if "tensor" in e}
    names = [name for name, _ in named]
    if "" in names:
        raise ModelFolderError(f"{path}: holds a tensor with an empty name")
    if strip_prefix:
        if not any(name.startswith(strip_prefix) for name in names):
            raise ModelFolderError(f"{path}: no tensor name starts with {strip_prefix!r}")
        origin = {name.removeprefix(strip_prefix): p for name, p in origin.items()}
        named = [(name.removeprefix(strip_prefix), t) for name, t in named]
        names = [name for name, _ in named]
        if "" in names:
            raise ModelFolderError(f"{path}: a tensor is named just {strip_prefix!r}")
    elif len(names) > 1 and all(name.startswith(DDP_PREFIX) for name in names):
        notes.append(
            f"{path.name}: every tensor name starts with {DDP_PREFIX!r} (a "
            f"DistributedDataParallel save); --strip-prefix {DDP_PREFIX} removes it"
        )
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ModelFolderError(f"{path}: two tensors would both be named {name!r}")
        seen.add(name)
    views = [name for name, t in named if not t["contiguous"]]
    if views:
        t = dict(named)[views[0]]
        raise ModelFolderError(
            f"{path}: tensor{'s' if len(views) > 1 else ''} {listing(views)} "
            f"{'are views' if len(views) > 1 else 'is a view'} that fastcast cannot copy as "
            f"bytes (shape {t['shape']}, stride {t['stride']}): save "
            f"{'them' if len(views) > 1 else 'it'} with .contiguous() first"
        )
    tensors, tied = dedupe(path, named, origin)
    if tied:
        pairs = [f"{d} (= {k})" for d, k in tied.items()]
        notes.append(
            f"{path.name}: {len(tied)} tied duplicate(s) written once, under the first "
            f"name, as transformers does: {listing_of(pairs, SHOWN)}"
        )
    if tf["unreferenced"]:
        notes.append(
            f"{path.name}: {len(tf['unreferenced'])} zip member(s) no tensor uses, not "
            f"read: {listing(tf['unreferenced'])}"
        )
    return TorchWeights(path, tensors, prefix[0] if prefix else None, tied, notes)


def dedupe(
    path: Path, named: list[tuple[str, TorchTensor]], origin: dict[str, tuple[str, ...]]
) -> tuple[list[TensorEntry], dict[str, str]]:
    """TensorEntries in file order, each exact alias (same storage, offset, shape,
    stride, dtype) after the first dropped: dropped name -> kept name."""
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    tensors = []
    for name, t in named:
        alias = (t["storage"], t["storage_offset"], *t["shape"], "/", *t["stride"], t["dtype"])
        if alias in first and math.prod(t["shape"]) > 0:  # empty tensors share no bytes
            tied[name] = first[alias]
            continue
        first.setdefault(alias, name)
        begin, end = t["offsets"]
        shape = tuple(t["shape"])
        tensors.append(TensorEntry(name, t["dtype"], shape, path, (begin, end), origin[name]))
    return tensors, tied


def is_torch_file(path: str | os.PathLike[str]) -> bool:
    """True for a file starting as a zip does: the only torch.save format fastcast
    reads (the core decides the rest, and says why it refuses a file)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
