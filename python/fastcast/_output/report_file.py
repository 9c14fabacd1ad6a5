"""``--report FILE``: where a report may be written, checked before anything else is,
and writing it in one step.

A report is refused inside the input (it would change the model read) or inside the
output (it would land over a shard, or be a file no record lists), through a link, in
a folder that does not exist, and over an existing file that is not a report fastcast
wrote (fastcast never overwrites a file it did not write). Every report carries
``"fastcast_report": 1``, which is how a later run knows the file is one of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastcast import _core
from fastcast._core import OutputExistsError
from fastcast._output.transaction import naming

#: The key (and format) every report carries: a file holding it is fastcast's to replace.
REPORT_MARK = "fastcast_report"
REPORT_FORMAT = 1


def check_report_path(
    report: str | os.PathLike[str], inputs: Iterable[Path], outputs: Iterable[Path]
) -> Path:
    """``report`` checked as a place to write a report: ValueError (or
    OutputExistsError, for a file that is not a report) naming the path and why not.
    ``inputs`` are the model folders or files read, ``outputs`` the folders written."""
    path = Path(report)
    what = f"--report {path}"
    if path.is_symlink():
        raise ValueError(f"{what}: is a link; a report is written only at a plain path")
    if not path.parent.is_dir():
        raise ValueError(f"{what}: its folder {path.parent} does not exist")
    real = path.parent.resolve() / path.name
    for kind, places in (("input", inputs), ("output", outputs)):
        for place in places:
            resolved = place.resolve()
            if real == resolved or resolved in real.parents:
                raise ValueError(
                    f"{what}: is inside the {kind} {place}; write the report outside it"
                )
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{what}: exists and is not a file")
        if not is_report(path):
            raise OutputExistsError(
                f"{what}: exists and is not a report fastcast wrote; fastcast replaces only "
                "its own: choose another path"
            )
    return path


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a report fastcast wrote (its ``fastcast_report`` key)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and REPORT_MARK in data


def write_report(path: Path, report: dict[str, Any], fsync: bool) -> None:
    """The report as JSON, under a temporary name then renamed over ``path`` (a link
    there is replaced, never followed)."""
    temp = Path(_core.partial_path(path))
    try:
        temp.unlink(missing_ok=True)  # a killed run's, or a planted link: never followed
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({REPORT_MARK: REPORT_FORMAT, **report}, indent=2) + "\n")
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        raise naming(e, path) from None
    finally:
        temp.unlink(missing_ok=True)
