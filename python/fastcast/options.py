"""A conversion's options, checked once into one typed, frozen object.

``fastcast.convert``'s keywords, the CLI's flags, a jobs file's keys and
``convert_batch``'s options are the same knobs: each caller hands them to
``ConvertOptions.make``, which checks and resolves them (sizes to bytes, the dtype to
its safetensors name, the thread count, the mode) and refuses a bad combination in
one message that says what to type. Everything after reads the result.

The mode is one value, never a set of flags: ``Cast`` (a plain model cast; a quantized
one refused), ``KeepQuantized``, ``Dequantize`` or ``Quantize(scheme)``.

>>> ConvertOptions.make("bf16", shard_size="2GB", quantize="fp8").mode
Quantize(scheme='fp8', dequantize=False)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

from fastcast import _core
from fastcast._arguments import as_patterns, thread_count
from fastcast._units import format_bytes, parse_size

#: ``--shard-size`` when none is given (transformers' default).
DEFAULT_SHARD_SIZE = "5GB"
#: The executor's per-thread buffer when ``max_memory`` does not say.
DEFAULT_CHUNK_BYTES = _core.DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class Cast:
    """Cast a plain model (``--dtype``); a quantized one is refused."""


@dataclass(frozen=True)
class KeepQuantized:
    """Cast only what is not quantization state; keep the quantization byte for byte."""


@dataclass(frozen=True)
class Dequantize:
    """Write a plain model: each quantized weight computed in fp32 and rounded once."""


@dataclass(frozen=True)
class Quantize:
    """Quantize a plain model's decoder Linear weights in ``scheme``; with
    ``dequantize``, a quantized model's, each weight dequantized in fp32 first."""

    scheme: str
    dequantize: bool = False


Mode = Cast | KeepQuantized | Dequantize | Quantize


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion is asked to do, checked (see ``make``)."""

    dtype: str | None = None
    """The target's safetensors name; None: every tensor keeps its dtype."""
    output: Path | None = None
    shard_size: int = 5_000_000_000
    keep: tuple[str, ...] = ()
    variant: str | None = None
    mode: Mode = field(default_factory=Cast)
    strict: bool = False
    overwrite: bool = False
    resume: bool = False
    threads: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    fsync: bool = True
    fp8_overflow: Literal["saturate", "nan"] = "saturate"
    report: Path | None = None
    progress: bool | None = None
    state_dict_key: str | None = None
    strip_prefix: str | None = None
    merge_lora: str | None = None
    """A PEFT LoRA adapter (folder or cached repo id) merged into the weights."""

    @classmethod
    def make(
        cls,
        dtype: str | None = None,
        *,
        output: str | os.PathLike[str] | None = None,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        keep: Sequence[str] = (),
        variant: str | None = None,
        keep_quantized: bool = False,
        dequantize: bool = False,
        quantize: str | None = None,
        strict: bool = False,
        overwrite: bool = False,
        resume: bool = False,
        threads: int | None = None,
        fsync: bool = True,
        max_memory: int | str | None = None,
        fp8_overflow: Literal["saturate", "nan"] = "saturate",
        report: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        state_dict_key: str | None = None,
        strip_prefix: str | None = None,
        merge_lora: str | os.PathLike[str] | None = None,
        stacklevel: int = 2,
    ) -> ConvertOptions:
        """Check and resolve ``convert``'s keywords (see its docstring for each);
        ValueError, TypeError or DtypeError saying what to type instead.
        ``stacklevel`` places a warning (too many threads) at the caller's line."""
        target = _core.castable_target(dtype) if dtype is not None else None
        limit = parse_size(shard_size, "shard size")
        patterns = as_patterns(keep, "keep")
        n_threads = thread_count(threads, stacklevel=stacklevel + 1)
        chunk = chunk_bytes_for(max_memory, n_threads)
        mode = mode_of(target, patterns, keep_quantized, dequantize, quantize)
        if fp8_overflow not in ("saturate", "nan"):
            raise ValueError(f"fp8_overflow must be 'saturate' or 'nan', not {fp8_overflow!r}")
        if merge_lora is not None and isinstance(mode, KeepQuantized):
            raise ValueError(
                f"merge_lora with {MODE_NAMES[type(mode)]}: a merged weight is a new float "
                "weight, so its quantization cannot be kept (a quantized base: --dequantize "
                "--dtype DTYPE; to quantize the merged model: --quantize fp8)"
            )
        return cls(
            dtype=target, output=None if output is None else Path(output), shard_size=limit,
            keep=tuple(patterns), variant=variant, mode=mode, strict=strict,
            overwrite=overwrite, resume=resume, threads=n_threads, chunk_bytes=chunk,
            fsync=fsync, fp8_overflow=fp8_overflow,
            report=None if report is None else Path(report), progress=progress,
            state_dict_key=state_dict_key, strip_prefix=strip_prefix,
            merge_lora=None if merge_lora is None else os.fspath(merge_lora),
        )  # fmt: skip

    @property
    def mode_name(self) -> str:
        """The mode as the record and the messages name it: ``cast``, ``keep``,
        ``dequantize`` or ``quantize``."""
        return MODE_NAMES[type(self.mode)]


#: Each mode's name in records and messages.
MODE_NAMES: dict[type, str] = {
    Cast: "cast",
    KeepQuantized: "keep",
    Dequantize: "dequantize",
    Quantize: "quantize",
}


class Keywords(TypedDict, total=False):
    """``make``'s keywords as a mapping, typed: what the CLI hands over from its flags
    (``tests/test_options.py`` keeps it equal to ``make`` and ``convert``)."""

    output: str | os.PathLike[str] | None
    shard_size: int | str
    keep: Sequence[str]
    variant: str | None
    keep_quantized: bool
    dequantize: bool
    quantize: str | None
    strict: bool
    overwrite: bool
    resume: bool
    threads: int | None
    fsync: bool
    max_memory: int | str | None
    fp8_overflow: Literal["saturate", "nan"]
    report: str | os.PathLike[str] | None
    progress: bool | None
    state_dict_key: str | None
    strip_prefix: str | None
    merge_lora: str | os.PathLike[str] | None


#: The keys a jobs file, and ``convert_batch``'s options, may set: ``make``'s keywords.
KEYS = frozenset(inspect.signature(ConvertOptions.make).parameters) - {"stacklevel"}


def chunk_bytes_for(max_memory: int | str | None, threads: int) -> int:
    """Per-thread buffer size that keeps all buffers within half of ``max_memory``
    (the other half is headroom for the interpreter and the plan)."""
    if max_memory is None:
        return DEFAULT_CHUNK_BYTES
    budget = parse_size(max_memory, "max memory") // 2
    chunk = budget // threads
    if chunk < 64 * 1024:
        raise ValueError(
            f"max_memory {max_memory!r} is too small for {threads} threads "
            f"(needs at least {format_bytes(threads * 128 * 1024)})"
        )
    return min(chunk, 64 << 20)


def mode_of(
    target: str | None,
    keep: Sequence[str],
    keep_quantized: bool,
    dequantize: bool,
    quantize: str | None,
) -> Mode:
    """The one mode the flags ask for; ValueError for flags that exclude each other or
    need a ``--dtype``, saying what to type."""
    if target is None and keep:
        raise ValueError(
            "--keep needs --dtype: it names the tensors left in their dtype while the others "
            "go to DTYPE (e.g. --dtype bf16 --keep '*norm*'); without --dtype every tensor "
            "keeps its own"
        )
    if target is None and dequantize:
        raise ValueError(
            "--dequantize needs --dtype bf16, fp16 or fp32: the dtype its weights are "
            "computed into (e.g. --dequantize --dtype bf16)"
        )
    if keep_quantized and dequantize:
        raise ValueError("keep_quantized and dequantize exclude each other: keep or dequantize")
    if quantize is not None:
        if quantize not in _core.QUANTIZE_SCHEMES:
            raise ValueError(
                f"quantize must be one of {', '.join(_core.QUANTIZE_SCHEMES)}, not {quantize!r}"
            )
        if keep_quantized:
            raise ValueError(
                "quantize and keep_quantized exclude each other: to requantize a quantized "
                "model, dequantize it (--dequantize --dtype bf16 --quantize fp8)"
            )
        return Quantize(quantize, dequantize=dequantize)
    if dequantize:
        return Dequantize()
    return KeepQuantized() if keep_quantized else Cast()
