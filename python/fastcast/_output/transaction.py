"""The output folder of one conversion, as a transaction: prepare, stage, commit, undo.

prepare  Look at what is there, writing nothing: no folder or an empty one (a fresh
         run), a finished conversion with the same inputs and settings (nothing to
         do), an interrupted one (``--resume`` finishes it), or a previous conversion
         to replace (``--overwrite``). Ownership is proven, never inferred: only what
         a readable record of a fastcast run lists (``fastcast.json``, or an
         interrupted run's ``run.json``) is fastcast's to replace; any other file, a
         folder without a record, or a link anywhere in the output makes it refuse,
         whatever the names.
stage    The run locks the output folder first (``flock`` on the folder itself, held
         to the end), then decides again under the lock, so two runs can never both
         commit; everything it writes goes under ``OUT/.fastcast-staging/`` at its
         final relative path: copies, shards (the Rust executor journals each one
         finished), configs, indexes, the record. ``run.json`` there lists the files
         to commit; the visible folder is not touched, so a previous output stays whole.
commit   Renames into place. Previous fastcast files this run does not rewrite go
         first (indexes before anything, so the folder never claims to be finished
         while it is mixed), then shards and copies, the record, config.json, and the
         indexes last; then the staging folder is renamed out of the way in one step
         and removed. A kill mid-commit is finished by ``--resume``; a kill while the
         renamed staging folder is removed leaves a finished output.
undo     A refusal (``--strict``) or a failure before any shard was finished removes
         exactly what the run created: its staging folder and the folders it made.
         A later failure keeps the finished shards (only those) for ``--resume``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from fastcast import _core
from fastcast._core import InsufficientSpaceError, LossError, OutputExistsError
from fastcast._errors import mark_resumable
from fastcast._names import join, listing
from fastcast._output.record import (
    RECORD_NAME,
    STAGING_DIR,
    STAGING_DONE,
    OutputRecord,
    is_tame,
    read_record,
)

#: A staging folder being made: it gets its final name only with its manifest inside,
#: so that a staging folder always says what it is.
STAGING_PARTIAL = STAGING_DIR + _core.PARTIAL_SUFFIX
#: fastcast's own entries at the top of an output, never a converted file.
OWN_ENTRIES = (STAGING_DIR, STAGING_PARTIAL, STAGING_DONE)
MANIFEST_NAME = "run.json"
JOURNAL_NAME = "journal.jsonl"
MANIFEST_FORMAT = 1
#: What a second run is told while another holds the output.
BUSY = "another fastcast run is writing to it right now"

Mode = Literal["fresh", "resume", "overwrite", "finished"]


@dataclass
class Manifest:
    """``.fastcast-staging/run.json``: what an unfinished run is doing."""

    fingerprint: str
    files: list[str]
    """Every file to put in place, relative to the output, in commit order."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What the fingerprint is made of (see ``OutputRecord.settings``)."""
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


def files_below(out: Path) -> list[str]:
    """Every file below ``out`` (links not followed; a link counts as a file), relative,
    sorted; fastcast's own staging folders left out."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        if not rel:
            dirnames[:] = [d for d in dirnames if d not in OWN_ENTRIES]
            filenames = [f for f in filenames if f not in OWN_ENTRIES]
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                filenames.append(d)
        found.extend(join(rel, f) for f in filenames)
    return sorted(found)


def links_below(folder: Path) -> list[Path]:
    """Every link at or below ``folder`` (not followed), the folder itself included."""
    if folder.is_symlink():
        return [folder]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            if os.path.islink(os.path.join(dirpath, name)):
                found.append(Path(dirpath, name))
    return sorted(found)


def refuse_links(out: Path) -> None:
    """fastcast writes no links: one inside an output (or its staging folder) was put
    there by someone else, and renaming or writing through it could reach any file.
    The output folder itself may be a link (the user typed it)."""
    links = [p for p in links_below(out) if p != out]
    if links:
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise OutputExistsError(
            f"{links[0]}: a link inside the output{more}, which fastcast never makes; "
            "nothing is written through it: remove it, or choose another output folder"
        )


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
    return listing(names, shown)


class Run:
    """One conversion's hold on its output folder; see the module docstring."""

    def __init__(
        self,
        out: Path,
        mode: Mode,
        manifest: Manifest,
        record: OutputRecord | None = None,
        request: Request | None = None,
    ) -> None:
        self.out = out
        self.mode = mode
        self.manifest = manifest
        self.record = record
        self.request = request
        self.staging = out / STAGING_DIR
        self.journal = self.staging / JOURNAL_NAME
        self.fsync = True
        self._lock: int | None = None
        self._owns = False
        self._began = False
        self._made_staging = False

    # --- stage -------------------------------------------------------------------

    def __enter__(self) -> Run:
        """Lock the output folder (making it if new), decide again under the lock,
        then make the staging folder, or take over the one an interrupted run left."""
        self._make_output()
        try:
            self._lock = lock_folder(self.out)
            self._owns = True  # locked, or where folders cannot be locked, unopposed
            self._decide_again()
        except BaseException:
            self.undo()
            raise
        making = self.out / STAGING_PARTIAL
        try:
            remove_own(self.out / STAGING_DONE)  # what a kill during a cleanup left
            shutil.rmtree(making, ignore_errors=True)  # one a kill left half made
            if self.mode == "resume":
                for partial in self.staging.rglob(f"*{_core.PARTIAL_SUFFIX}"):
                    partial.unlink()
                self._began = True
                return self
            if self.staging.exists():  # an interrupted run's, replaced (--overwrite)
                remove_own(self.staging)
            making.mkdir()
            write_durably(making / MANIFEST_NAME, self._manifest_json(), fsync=False)
            os.replace(making, self.staging)
            self._made_staging = True
        except BaseException:
            shutil.rmtree(making, ignore_errors=True)
            self.undo()
            raise
        self._began = True
        return self

    def _make_output(self) -> None:
        """Make the output folder and any missing parents, noting those made."""
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue  # another run made it first: not ours to remove
            self.manifest.created.append(str(folder.absolute()))

    def _decide_again(self) -> None:
        """What ``prepare`` decided, unless another run changed the folder in between
        (it took the lock first, and finished or left something)."""
        if self.request is None:
            return
        now = decide(self.out, self.request, locked=True)
        if now.mode != self.mode:
            raise OutputExistsError(
                f"{self.out}: another fastcast run wrote to it while this one was starting "
                f"(it now {DESCRIBED[now.mode]}); run the command again to "
                "see what it holds"
            )
        created = self.manifest.created
        self.manifest, self.record = now.manifest, now.record
        self.manifest.created = created

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
        """Where ``rel`` is written until commit; its folders are made inside the
        staging folder (never through a link), and whatever is at the path itself
        (a killed run's file, a planted link) is removed."""
        folder = self.staging
        for part in rel.split("/")[:-1]:
            folder = folder / part
            if folder.is_symlink():
                refuse_links(self.staging)
            folder.mkdir(exist_ok=True)
        path = self.staging / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        return path

    def copy(self, rel: str, source: Path) -> None:
        """Stage a copy of ``source`` (links followed: they were checked) as ``rel``."""
        target = self.staged(rel)
        try:
            shutil.copyfile(source, target)
            if self.fsync:
                with open(target, "rb+") as f:
                    os.fsync(f.fileno())
        except OSError as e:
            raise naming(e, target) from None

    def write_text(self, rel: str, text: str) -> None:
        write_durably(self.staged(rel), text, self.fsync)

    def has_finished_shards(self) -> bool:
        return bool(_core.read_journal(self.journal)) if self.journal.exists() else False

    # --- commit ------------------------------------------------------------------

    def commit(self) -> None:
        """Put every staged file in place (see the module docstring)."""
        refuse_links(self.out)  # one planted while the run went on
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
        # Out of the way in one step: a kill from here on leaves a finished output
        # (and at worst this folder, which the next run removes).
        done = self.out / STAGING_DONE
        os.replace(self.staging, done)
        if self.fsync:
            sync_folder(self.out)
        shutil.rmtree(done, ignore_errors=True)
        self._release_lock()

    # --- undo --------------------------------------------------------------------

    def undo(self) -> None:
        """Remove exactly what this run created: its staging folder, then the folders
        it made for the output, innermost first, if they are still empty. A run that
        never held the lock removes nothing: the folders are another run's now."""
        if not self._owns:
            return
        if self._made_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release_lock()
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
        write_durably(temp, self._manifest_json(), self.fsync)
        os.replace(temp, path)

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


#: What an output folder holds, by the mode ``prepare`` gives it, in words.
DESCRIBED: dict[str, str] = {
    "fresh": "is empty",
    "resume": "holds an interrupted run",
    "overwrite": "holds a finished conversion",
    "finished": "holds this very conversion",
}


def lock_folder(out: Path) -> int | None:
    """Lock ``out`` for this run (``flock`` on the folder itself: no file to create,
    and the lock goes with the process, however it dies); OutputExistsError while
    another run holds it. Where folders cannot be locked (some network filesystems)
    the run goes on unlocked, as it would on Windows."""
    if sys.platform == "win32":
        return None
    import fcntl

    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputExistsError(f"{out}: {BUSY}") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def is_locked(out: Path) -> bool:
    """Whether another run holds ``out`` now (tried and let go at once)."""
    try:
        fd = lock_folder(out)
    except OutputExistsError:
        return True
    except OSError:
        return False
    if fd is not None:
        os.close(fd)
    return False


def remove_own(folder: Path) -> None:
    """Remove a folder of fastcast's own (a staging folder), never through a link."""
    if folder.is_symlink():
        refuse_links(folder.parent)
    if folder.exists():
        shutil.rmtree(folder)


def naming(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file when the OS named none (a full disk's ``write``
    names nothing); a full disk or quota as ``InsufficientSpaceError``."""
    if e.filename is not None:
        return e
    cls = InsufficientSpaceError if e.errno in (errno.ENOSPC, errno.EDQUOT) else OSError
    return cls(e.errno, e.strerror or str(e), str(path))


def write_durably(path: Path, text: str, fsync: bool) -> None:
    """Write ``text`` to ``path`` (synced when asked); an OSError names ``path``."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise naming(e, path) from None


def sync_folder(folder: Path) -> None:
    """Make renames into ``folder`` durable (a no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Request(NamedTuple):
    """What a run asks of its output folder (``prepare``'s arguments)."""

    fingerprint: str
    settings: dict[str, Any]
    files: list[str]
    overwrite: bool
    resume: bool


def prepare(
    out: Path,
    *,
    fingerprint: str,
    files: list[str],
    overwrite: bool,
    resume: bool,
    settings: dict[str, Any] | None = None,
) -> Run:
    """Decide what this run does with ``out``, writing nothing; OutputExistsError when
    the answer is no. ``files`` is every file the run will write, in commit order;
    ``settings`` what ``fingerprint`` is made of (to say what differs when it does)."""
    request = Request(fingerprint, settings or {}, list(files), overwrite, resume)
    return decide(out, request, locked=False)


def decide(out: Path, request: Request, locked: bool) -> Run:
    """``prepare``'s decision; ``locked``: this run holds the output's lock already
    (it decides again under it), else a run holding it is named as such."""
    fingerprint, settings, files, overwrite, resume = request
    fresh = Manifest(fingerprint, list(files), settings=dict(settings))
    if not out.exists():
        return Run(out, "fresh", fresh, request=request)
    if not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if not locked and is_locked(out):
        raise OutputExistsError(f"{out}: {BUSY}")
    staging = out / STAGING_DIR
    refuse_links(out)
    interrupted = Manifest.read(staging) if staging.is_dir() else None
    if staging.exists() and interrupted is None and not overwrite:
        raise OutputExistsError(
            f"{staging}: an unfinished run's folder that this fastcast cannot read; "
            "pass --overwrite to start over"
        )
    record = read_record(out)
    present = files_below(out)
    owned = owned_files(record, interrupted)
    foreign = [p for p in present if p not in owned]
    if foreign:
        raise OutputExistsError(
            f"{out}: holds files fastcast did not write ({name_a_few(foreign, owned)}); "
            + ("it has no fastcast.json record of a conversion, and " if record is None else "")
            + "fastcast replaces only what a record of its own lists: move them, or choose "
            "another output folder"
        )
    if resume and interrupted is not None:
        if interrupted.fingerprint != fingerprint:
            raise OutputExistsError(
                f"{out}: the interrupted run there used "
                f"{differences(interrupted.settings, settings)}; pass --overwrite to start over"
            )
        if interrupted.phase == "staging":
            interrupted.files = list(files)  # copies are redone, so the current list holds
        return Run(out, "resume", interrupted, request=request)
    if resume and record is not None and interrupted is None:
        missing = [f for f in record.files if not (out / f).exists()]
        if record.fingerprint == fingerprint and not missing:
            return Run(out, "finished", fresh, record, request)
        why = (
            f"{', '.join(missing[:3])} missing"
            if record.fingerprint == fingerprint
            else f"made with {differences(record.settings, settings)}"
        )
        raise OutputExistsError(
            f"{out}: holds a finished conversion ({why}); pass --overwrite to redo it"
        )
    if not present and interrupted is None and not staging.exists():
        return Run(out, "fresh", fresh, request=request)
    if not overwrite:
        hint = (
            "an interrupted run left it; pass --resume to finish it, or --overwrite to start over"
            if interrupted is not None
            else "it holds a fastcast conversion; pass --overwrite to replace it"
        )
        raise OutputExistsError(f"{out}: already exists and is not empty ({hint})")
    writes = set(files)
    fresh.retire = sorted(p for p in owned - writes if p in present)
    fresh.retire_folders = sorted(record.folders) if record else []
    return Run(out, "overwrite", fresh, record, request)


#: The parts of a run's settings, in words, in the order a refusal names them.
SETTING_WORDS = {
    "dtype": "dtype",
    "shard_size": "shard size",
    "fp8_overflow": "fp8 overflow policy",
    "torch": "state dict key and prefix",
    "model": "model folder",
    "fastcast": "fastcast version",
}


def differences(then: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between a recorded run's settings and this run's, in words:
    ``dtype BF16 (now F16), other inputs (model-00002-of-00004.safetensors changed)``;
    "other inputs or settings" when the record does not say (an older fastcast)."""
    if not then:
        return "other inputs or settings"
    told = [
        f"{words} {then.get(key)} (now {now.get(key)})"
        for key, words in SETTING_WORDS.items()
        if then.get(key) != now.get(key)
    ]
    old_inputs = {p: (size, mtime) for p, size, mtime in then.get("inputs", [])}
    new_inputs = {p: (size, mtime) for p, size, mtime in now.get("inputs", [])}
    if old_inputs != new_inputs:
        changed = sorted(p for p in old_inputs.keys() | new_inputs.keys()
                         if old_inputs.get(p) != new_inputs.get(p))  # fmt: skip
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        told.append(
            f"other inputs ({Path(changed[0]).name} is new, gone, or changed size or time{more})"
        )
    if then.get("plan") != now.get("plan") and not told:
        told.append("another plan of the same inputs (--keep, --variant, --quantize...)")
    return ", ".join(told) or "other inputs or settings"


def owned_files(record: OutputRecord | None, interrupted: Manifest | None) -> set[str]:
    """The files of an output that a record proves fastcast wrote: those a finished
    conversion's ``fastcast.json`` lists (and itself), and, of an interrupted run, those
    it was replacing and, once it began committing, those it was putting in place."""
    owned: set[str] = set()
    if record is not None:
        owned |= {RECORD_NAME, *record.files}
    if interrupted is not None:
        owned |= set(interrupted.retire)
        if interrupted.phase == "committing":
            owned |= {RECORD_NAME, *interrupted.files}
    return owned
