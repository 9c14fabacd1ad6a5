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
