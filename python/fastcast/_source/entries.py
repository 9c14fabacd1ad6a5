"""A tensor of an input file, as every reader (safetensors header, torch.save file)
describes it: a leaf module, so the readers and the folder model share it without
importing each other."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple


class TensorEntry(NamedTuple):
    """One tensor of an input file; ``offsets`` are absolute in the file. A named
    tuple: a model may have 100k tensors, and the core hands over their rows ready
    made (``_core.read_entries``); immutable and compared field by field."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]
    pickle_path: tuple[str, ...] | None = None
    """In a torch.save file: the keys leading to it (verify loads it there with torch)."""

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
