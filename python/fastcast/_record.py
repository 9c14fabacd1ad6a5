"""What an output folder remembers about the conversion that made it.

A finished output holds ``fastcast.json``: the source, the target dtype, the kept
patterns, the variant, the fp8 overflow policy, the fastcast version, the files the
conversion wrote, and what it lost. ``fastcast verify OUT`` reads it instead of asking
for flags; ``--overwrite`` reads it to know which files are fastcast's to replace;
``--resume`` reads it to see that there is nothing left to do.

An unfinished output holds ``.fastcast-staging/`` instead (see ``_output.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The record of a finished conversion, at the top of its output.
RECORD_NAME = "fastcast.json"
#: Where a conversion keeps everything it writes until it commits (hidden, in the output).
STAGING_DIR = ".fastcast-staging"
#: The record's format; a newer one is read as far as its known fields go.
RECORD_FORMAT = 1


@dataclass(frozen=True)
class OutputRecord:
    """How an output folder was made (``fastcast.json``)."""

    fastcast: str
    source: str
    dtype: str | None
    """The target; None: every tensor kept its dtype."""
    keep: list[str]
    variant: str | None
    fp8_overflow: str
    shard_size: int
    fingerprint: str
    files: list[str]
    """Every file the conversion wrote, relative to the output, this record excepted."""
    folders: list[str] = field(default_factory=list)
    """Folders the conversion created inside the output."""
    overflowed: list[tuple[str, int]] = field(default_factory=list)
    """Tensors whose values overflowed, with counts, worst first."""
    underflowed: int = 0
    quantization: dict[str, str] | None = None
    """For a quantized source: its ``method`` and ``scheme``, and ``mode``: ``keep``
    (quantization state copied as it was) or ``dequantize`` (a plain model)."""
    state_dict_key: str | None = None
    """torch.save sources: the key the state dict was read from, if given."""
    strip_prefix: str | None = None
    from_torch: bool = False
    """The source held torch.save weights (``.bin``...)."""
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputRecord:
        """A record read back; ValueError when a path in it could reach outside the
        output (a record is trusted to name files to replace, so it must be tame)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        record = cls(**known)
        for path in [*record.files, *record.folders]:
            if not is_tame(path):
                raise ValueError(f"{path!r} is not a path inside the output")
        return OutputRecord(
            **{**known, "overflowed": [(str(n), int(c)) for n, c in record.overflowed]}
        )


def is_tame(path: object) -> bool:
    """A relative path with no ``..``, no empty part and no backslash: it stays inside
    whatever folder it is joined to."""
    if not isinstance(path, str) or not path or "\\" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def read_record(folder: Path) -> OutputRecord | None:
    """The record in ``folder``, or None if there is none or it cannot be trusted
    (a file someone edited into something else is not evidence of ownership)."""
    path = folder / RECORD_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return OutputRecord.from_dict(data) if isinstance(data, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None
