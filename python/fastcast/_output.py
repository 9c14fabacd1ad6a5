"""The output folder of one conversion, as a transaction: prepare, stage, commit, undo.

prepare  Look at what is there, writing nothing: no folder or an empty one (a fresh
         run), a finished conversion with the same inputs and settings (nothing to
         do), an interrupted one (``--resume`` finishes it), or files to replace
         (``--overwrite``, which replaces only what a fastcast run recorded writing and
         what this run writes anyway: a user's ``.git/`` or notes make it refuse).
stage    Everything this run writes goes under ``OUT/.fastcast-staging/`` at its final
         relative path: copies, shards (the Rust executor journals each one finished),
         configs, indexes, the record. ``run.json`` there lists the files to commit;
         the visible folder is not touched, so a previous output stays whole.
commit   Renames into place. Previous fastcast files this run does not rewrite go
         first (indexes before anything, so the folder never claims to be finished
         while it is mixed), then shards and copies, the record, config.json, and the
         indexes last; then the staging folder. A kill mid-commit is finished by
         ``--resume``.
undo     A refusal (``--strict``) or a failure before any shard was finished removes
         exactly what the run created: its staging folder and the folders it made.
         A later failure keeps the finished shards (only those) for ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from fastcast import _core
from fastcast._core import LossError, OutputExistsError
from fastcast._record import RECORD_NAME, STAGING_DIR, OutputRecord, is_tame, read_record

#: A staging folder being made: it gets its final name only with its manifest inside,
#: so that a staging folder always says what it is.
STAGING_PARTIAL = STAGING_DIR + _core.PARTIAL_SUFFIX
MANIFEST_NAME = "run.json"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = "lock"
MANIFEST_FORMAT = 1

Mode = Literal["fresh", "resume", "overwrite", "finished"]


@dataclass
class Manifest:
    """``.fastcast-staging/run.json``: what an unfinished run is doing."""

    fingerprint: str
    files: list[str]
    """Every file to put in place, relative to the output, in commit order."""
    retire: list[str] = field(default_factory=list)
    """Files of a previous fastcast output that this run removes at commit."""
    retire_folders: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    """Folders this run created for the output (absolute, outermost first)."""
    phase: Literal["staging", "committing"] = "staging"
    format: int = MANIFEST_FORMAT

    @classmethod
    def read(cls, staging: Path) -> Manifest | None:
        try:
            data = json.loads((staging / MANIFEST_NAME).read_text(encoding="utf-8"))
            manifest = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, UnicodeDecodeError, ValueError, TypeError):
            return None
        paths = [*manifest.files, *manifest.retire, *manifest.retire_folders]
        if manifest.format != MANIFEST_FORMAT or not all(is_tame(p) for p in paths):
            return None
        return manifest


def join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def files_below(out: Path) -> list[str]:
    """Every file below ``out`` (links not followed; a link counts as a file), relative,
    sorted; the staging folder (and one being made) left out."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        if not rel:
            dirnames[:] = [d for d in dirnames if d not in (STAGING_DIR, STAGING_PARTIAL)]
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                filenames.append(d)
        found.extend(join(rel, f) for f in filenames)
    return sorted(found)


def name_a_few(paths: Sequence[str], allowed: Iterable[str], shown: int = 4) -> str:
    """``.git/, src/, notes.md and 3 more``: a folder is named as such when none of
    what it holds is allowed."""
    allowed_tops = {p.split("/")[0] for p in allowed}
    names: list[str] = []
    for p in paths:
        top, slash, _ = p.partition("/")
        name = f"{top}/" if slash and top not in allowed_tops else p
        if name not in names:
            names.append(name)
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class Run:
    """One conversion's hold on its output folder; see the module docstring."""

    def __init__(
        self,
        out: Path,
        mode: Mode,
        manifest: Manifest,
        record: OutputRecord | None = None,
    ) -> None:
        self.out = out
        self.mode = mode
        self.manifest = manifest
        self.record = record
        self.staging = out / STAGING_DIR
        self.journal = self.staging / JOURNAL_NAME
        self.fsync = True
        self._lock: IO[bytes] | None = None
        self._began = False
        self._made_staging = False

    # --- stage -------------------------------------------------------------------

    def __enter__(self) -> Run:
        """Make the staging folder (and the output, if new), or take over the one an
        interrupted run left; hold its lock for the run."""
        if self.mode == "resume":
            self._take_lock()
            for partial in self.staging.rglob(f"*{_core.PARTIAL_SUFFIX}"):
                partial.unlink()
            self._began = True
            return self
        making = self.out / STAGING_PARTIAL
        try:
            missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                self.manifest.created.append(str(folder.absolute()))
            if self.staging.exists():  # an interrupted run's, replaced (--overwrite)
                self._take_lock()  # refused while that run is still writing
                shutil.rmtree(self.staging)
                self._release_lock()
            shutil.rmtree(making, ignore_errors=True)  # one a kill left half made
            making.mkdir()
            (making / MANIFEST_NAME).write_text(self._manifest_json(), encoding="utf-8")
            os.replace(making, self.staging)
            self._made_staging = True
            self._take_lock()
        except BaseException:
            shutil.rmtree(making, ignore_errors=True)
            self.undo()
            raise
        self._began = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """On the way out of a failure: undo a refusal, or a failure with nothing
        worth resuming; keep finished shards otherwise, and say so on the error."""
        try:
            if exc is None or not self._began:
                return
            if self.mode == "resume" and self.manifest.phase == "staging":
                if not isinstance(exc, LossError):
                    mark_resumable(exc, self.out)
                return  # the interrupted run stays as it was, plus what this one finished
            if isinstance(exc, LossError) or not self.has_finished_shards():
                if self.manifest.phase == "staging":
                    self.undo()
                return
            mark_resumable(exc, self.out)
        finally:
            self._release_lock()

    def staged(self, rel: str) -> Path:
        """Where ``rel`` is written until commit; its folder is made."""
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def copy(self, rel: str, source: Path) -> None:
        """Stage a copy of ``source`` (links followed: they were checked) as ``rel``."""
        target = self.staged(rel)
        shutil.copyfile(source, target)
        if self.fsync:
            with open(target, "rb+") as f:
                os.fsync(f.fileno())

    def write_text(self, rel: str, text: str) -> None:
        with open(self.staged(rel), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def has_finished_shards(self) -> bool:
        return bool(_core.read_journal(self.journal)) if self.journal.exists() else False

    # --- commit ------------------------------------------------------------------

    def commit(self) -> None:
        """Put every staged file in place (see the module docstring)."""
        if self.manifest.phase != "committing":
            self.manifest.phase = "committing"
            self._write_manifest()
        retire = [p for p in self.manifest.retire if p not in self.manifest.files]
        indexes_first = sorted(retire, key=lambda p: (not p.endswith(".index.json"), p))
        touched: set[Path] = set()
        for rel in indexes_first:
            (self.out / rel).unlink(missing_ok=True)
            touched.add((self.out / rel).parent)
        for rel in sorted(self.manifest.retire_folders, key=lambda p: -p.count("/")):
            folder = self.out / rel
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        for rel in self.manifest.files:
            if rel.endswith(".index.json") and (self.staging / rel).exists():
                (self.out / rel).unlink(missing_ok=True)  # never an old index over new shards
        for rel in self.manifest.files:
            source, target = self.staging / rel, self.out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.exists():
                os.replace(source, target)
            elif not target.exists():
                raise OutputExistsError(
                    f"{target}: was staged but is gone; cannot finish the run "
                    "(pass --overwrite to start over)"
                )
            touched.add(target.parent)
        if self.fsync:
            for folder in sorted(touched):
                if folder.is_dir():  # a retired folder may be gone
                    sync_folder(folder)
        self._release_lock()
        shutil.rmtree(self.staging)
        if self.fsync:
            sync_folder(self.out)

    # --- undo --------------------------------------------------------------------

    def undo(self) -> None:
        """Remove exactly what this run created: its staging folder, then the folders
        it made for the output, innermost first, if they are still empty."""
        self._release_lock()
        if self._made_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        for folder in reversed([Path(p) for p in self.manifest.created]):
            try:
                folder.rmdir()
            except OSError:
                break  # something else put a file there: it stays, and so do its parents

    # --- internals ---------------------------------------------------------------

    def _manifest_json(self) -> str:
        return json.dumps(asdict(self.manifest), indent=1) + "\n"

    def _write_manifest(self) -> None:
        path = self.staging / MANIFEST_NAME
        temp = Path(_core.partial_path(path))
        temp.write_text(self._manifest_json(), encoding="utf-8")
        os.replace(temp, path)

    def _take_lock(self) -> None:
        """One run per output: a second one (another terminal, a resume while the first
        still runs) is refused instead of writing into the same staging folder."""
        if sys.platform == "win32":
            return
        import fcntl

        lock = open(self.staging / LOCK_NAME, "ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OutputExistsError(
                f"{self.out}: another fastcast run is writing to it right now"
            ) from None
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def mark_resumable(error: BaseException, out: Path) -> None:
    """Tell whoever reports ``error`` that the run's finished shards are kept in ``out``
    (the CLI adds "run the same command with --resume" to its one line)."""
    error.fastcast_resumable = out  # type: ignore[attr-defined]


def sync_folder(folder: Path) -> None:
    """Make renames into ``folder`` durable (a no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare(out: Path, *, fingerprint: str, files: list[str], overwrite: bool, resume: bool) -> Run:
    """Decide what this run does with ``out``, writing nothing; OutputExistsError when
    the answer is no. ``files`` is every file the run will write, in commit order."""
    fresh = Manifest(fingerprint, list(files))
    if not out.exists():
        return Run(out, "fresh", fresh)
    if not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    staging = out / STAGING_DIR
    interrupted = Manifest.read(staging) if staging.is_dir() else None
    if staging.exists() and interrupted is None and not overwrite:
        raise OutputExistsError(
            f"{staging}: an unfinished run's folder that this fastcast cannot read; "
            "pass --overwrite to start over"
        )
    record = read_record(out)
    if resume and interrupted is not None:
        if interrupted.fingerprint != fingerprint:
            raise OutputExistsError(
                f"{out}: the interrupted run there used other inputs or settings; "
                "pass --overwrite to start over"
            )
        if interrupted.phase == "staging":
            interrupted.files = list(files)  # copies are redone, so the current list holds
        return Run(out, "resume", interrupted)
    present = files_below(out)
    if resume and record is not None and interrupted is None:
        missing = [f for f in record.files if not (out / f).exists()]
        if record.fingerprint == fingerprint and not missing:
            return Run(out, "finished", fresh, record)
        why = (
            f"{', '.join(missing[:3])} missing"
            if record.fingerprint == fingerprint
            else "other inputs or settings"
        )
        raise OutputExistsError(
            f"{out}: holds a finished conversion ({why}); pass --overwrite to redo it"
        )
    if not present and interrupted is None and not staging.exists():
        return Run(out, "fresh", fresh)
    if not overwrite:
        hint = (
            "an interrupted run left it; pass --resume to finish it, or --overwrite to start over"
            if interrupted is not None
            else "pass --overwrite to replace it"
        )
        raise OutputExistsError(f"{out}: already exists and is not empty ({hint})")
    owned = {RECORD_NAME, *(record.files if record else ())}
    if interrupted is not None:
        owned.update(interrupted.files)
    writes = set(files)
    foreign = [p for p in present if p not in owned and p not in writes]
    if foreign:
        raise OutputExistsError(
            f"{out}: holds files fastcast did not write ({name_a_few(foreign, owned | writes)}); "
            "--overwrite replaces only a previous conversion's files: move them, or choose "
            "another output folder"
        )
    fresh.retire = sorted(p for p in owned - writes if p in present)
    fresh.retire_folders = sorted(record.folders) if record else []
    return Run(out, "overwrite", fresh, record)
