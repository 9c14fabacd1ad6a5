"""What an output folder remembers about the conversion that made it.

A finished output holds ``fastcast.json``: the source, the target dtype, the kept
patterns, the variant, the fp8 overflow policy, the fastcast version, the files the
conversion wrote, and what it lost. ``fastcast verify OUT`` reads it instead of asking
for flags; ``--overwrite`` reads it to know which files are fastcast's to replace;
``--resume`` reads it to see that there is nothing left to do.

An unfinished output holds ``.fastcast-staging/`` instead (see ``_output/transaction.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastcast._core import ModelFolderError

#: The record of a finished conversion, at the top of its output.
RECORD_NAME = "fastcast.json"
#: Where a conversion keeps everything it writes until it commits (hidden, in the output).
STAGING_DIR = ".fastcast-staging"
#: A committed run's staging folder, renamed in one step before it is removed: a kill
#: during the removal leaves a finished output and this, which the next run removes.
STAGING_DONE = ".fastcast-staging.done"
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
    settings: dict[str, Any] = field(default_factory=dict)
    """What the fingerprint is made of (inputs, dtype, shard size...), so that a run
    refused for other inputs or settings can be told which."""
    folders: list[str] = field(default_factory=list)
    """Folders the conversion created inside the output."""
    overflowed: list[tuple[str, int]] = field(default_factory=list)
    """Tensors whose values overflowed, with counts, worst first."""
    underflowed: int = 0
    quantization: dict[str, str] | None = None
    """For a quantized source: its ``method`` and ``scheme``, and ``mode``: ``keep``
    (quantization state copied as it was) or ``dequantize`` (a plain model). For a
    ``--quantize`` output: its own, ``mode`` ``quantize``, and ``dequantized``, the
    source's method, when a quantized source was dequantized first."""
    state_dict_key: str | None = None
    """torch.save sources: the key the state dict was read from, if given."""
    strip_prefix: str | None = None
    from_torch: bool = False
    """The source held torch.save weights (``.bin``...)."""
    repo_id: str | None = None
    """When the source was given as a Hugging Face repo id: the id (``org/name``)..."""
    revision: str | None = None
    """...and the commit of the cached snapshot converted (``source`` is its path)."""
    merge_lora: dict[str, str] | None = None
    """``--merge-lora``: the adapter as given (``path``), where it was read
    (``folder``) and the sha256 of its weights file (``sha256``)."""
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputRecord:
        """A record read back; ValueError saying which field is wrong when one is
        missing or of the wrong type, or when a path in it could reach outside the
        output (a record is trusted to name files to replace, so it must be tame)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name, f in cls.__dataclass_fields__.items():
            if name not in known:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"{name!r} is missing")
                continue
            if not FIELD_CHECKS[name](known[name]):
                raise ValueError(f"{name!r} is {json.dumps(known[name])[:60]}, not {f.type}")
        record = cls(**known)
        for path in [*record.files, *record.folders]:
            if not is_tame(path):
                raise ValueError(f"{path!r} is not a path inside the output")
        return OutputRecord(
            **{**known, "overflowed": [(str(n), int(c)) for n, c in record.overflowed]}
        )


def _strs(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(pair: object) -> bool:
    """``[tensor name, count]``."""
    return isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _int(pair[1])


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


#: What each field of a record must hold to be read back (an edited record is not
#: half trusted: one wrong field and it is refused, naming the field).
def _str_map(value: object) -> bool:
    return value is None or (
        isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    )


FIELD_CHECKS: dict[str, Callable[[object], bool]] = {
    "fastcast": lambda v: isinstance(v, str),
    "source": lambda v: isinstance(v, str),
    "dtype": _optional_str,
    "keep": _strs,
    "variant": _optional_str,
    "fp8_overflow": lambda v: v in ("saturate", "nan"),
    "shard_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "fingerprint": lambda v: isinstance(v, str),
    "settings": lambda v: isinstance(v, dict),
    "files": _strs,
    "folders": _strs,
    "overflowed": lambda v: isinstance(v, list) and all(_count(p) for p in v),
    "underflowed": _int,
    "quantization": lambda v: (
        v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values())))
    ),
    "state_dict_key": _optional_str,
    "strip_prefix": _optional_str,
    "from_torch": lambda v: isinstance(v, bool),
    "repo_id": _optional_str,
    "revision": _optional_str,
    "merge_lora": _str_map,
    "format": _int,
}


def is_tame(path: object) -> bool:
    """A relative path with no ``..``, no empty part and no backslash: it stays inside
    whatever folder it is joined to."""
    if not isinstance(path, str) or not path or "\\" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def read_record(folder: Path) -> OutputRecord | None:
    """The record in ``folder``, or None if there is none or it cannot be trusted
    (a file someone edited into something else is not evidence of ownership)."""
    try:
        return load_record(folder)
    except ModelFolderError:
        return None


def load_record(folder: Path) -> OutputRecord | None:
    """The record in ``folder``, None if there is none; ModelFolderError naming the
    file and what is wrong with it when it is not a record fastcast can read (for
    ``verify``, which takes its settings from it)."""
    path = folder / RECORD_NAME
    if not path.is_file() or path.is_symlink():
        if path.is_symlink() or path.exists():
            raise ModelFolderError(f"{path}: not a regular file")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return OutputRecord.from_dict(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ModelFolderError(
            f"{path}: not a record fastcast can read ({why}); pass the settings as "
            "options (--against, --dtype...) or convert again"
        ) from None
    except OSError as e:
        raise ModelFolderError(f"{path}: {e.strerror or e}") from None
