"""Paths in a Hugging Face cache, recognised from their shape alone.

huggingface_hub keeps each repository as ``<cache>/models--<org>--<name>/`` with the
real files in ``blobs/``, one folder per revision in ``snapshots/<commit>/`` holding
relative links into ``blobs/``, and ``refs/``. Two rules follow for fastcast: a
snapshot's links into its repository's ``blobs/`` belong to the model, and nothing may
be written inside a cache (huggingface_hub would list an output in ``snapshots/`` as a
detached revision, and a cache cleanup would delete it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: How huggingface_hub names a repository's folder: ``models--org--name``.
REPO_KINDS = ("models--", "datasets--", "spaces--")


@dataclass(frozen=True)
class Snapshot:
    """Where a path sits in a cache."""

    repo: Path
    """The repository folder (``.../models--org--name``)."""
    folder: Path
    """The revision's folder (``.../snapshots/<commit>``)."""
    inner: Path
    """The path below the revision's folder (``.`` for the folder itself)."""

    @property
    def name(self) -> str:
        """The repository's name without its organisation: ``Llama-3.1-8B``."""
        return self.repo.name.split("--")[-1]

    @property
    def blobs(self) -> Path:
        return self.repo / "blobs"


def snapshot_of(path: Path) -> Snapshot | None:
    """The cache snapshot ``path`` lies in, judged from its components only.

    >>> snapshot_of(Path("/c/hub/models--meta--Llama/snapshots/ab12/unet")).name
    'Llama'
    """
    parts = path.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(REPO_KINDS):
            repo = Path(*parts[:i])
            return Snapshot(repo, repo / "snapshots" / parts[i + 1], Path(*parts[i + 2 :]))
    return None


def cache_snapshot(path: Path) -> Snapshot | None:
    """The snapshot ``path`` is in, as typed or once links are resolved."""
    return snapshot_of(Path(os.path.abspath(path))) or snapshot_of(path.resolve())


def is_blob_of(path: Path, root: Path) -> bool:
    """True when ``path`` (resolved) is a blob of the repository whose snapshot holds
    ``root``: a snapshot's links into ``blobs/`` are part of the model."""
    snapshot = cache_snapshot(root)
    if snapshot is None:
        return False
    real = path.resolve()
    return real.parent == snapshot.blobs.resolve()


#: ``org/name`` or ``org/name@revision``, as the Hub spells repo ids.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?")


def model_path(typed: str | os.PathLike[str]) -> Path:
    """The path of the model ``typed`` names: itself when it exists (a local folder
    wins over a repo id of the same name) or is no repo id, else the snapshot of
    ``org/name[@revision]`` in the local Hugging Face cache (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``), found offline: fastcast never downloads.

    >>> model_path("meta-llama/Llama-3.1-8B@main")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/0e9e...')
    """
    path = Path(typed)
    text = os.fspath(typed)
    if path.exists() or not REPO_ID.fullmatch(text):
        return path
    from fastcast._core import ModelFolderError

    repo, _, revision = text.partition("@")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise ModelFolderError(
            f"{text}: no such file or folder (to read it as a Hugging Face repo id from the "
            "local cache: pip install huggingface_hub)"
        ) from None
    try:
        found = snapshot_download(repo, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise ModelFolderError(
            f"{text}: no such folder here, and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fastcast never downloads: "
            f"hf download {repo}{f' --revision {revision}' if revision else ''} first"
        ) from None
    return Path(str(found))


def repo_of(typed: str | os.PathLike[str], resolved: Path) -> tuple[str, str] | None:
    """(repo id, commit) when ``typed`` named a repo of the local cache that
    ``model_path`` resolved to the snapshot ``resolved``; None for a path."""
    text = os.fspath(typed)
    if Path(typed).exists() or not REPO_ID.fullmatch(text):
        return None
    return text.partition("@")[0], resolved.name
