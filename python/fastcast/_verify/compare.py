"""Comparing tensors bit for bit, in bounded memory, for ``verify``.

Files are mapped, and tensors read as zero-copy torch views of the mapping, so a
tensor's bytes count against the page cache, not the process; only a range of
``chunk`` elements at a time is copied, cast or compared (on the GPU: only that range
is moved there). A 4 GiB tensor so needs a few hundred MiB however large it is.

Tensors of one dtype pair that follow each other in their source file and in the
output (the usual layout: a shard lists its tensors in its source's order) are compared
as one run of elements, so that a model of 740k tiny tensors costs a few torch calls
per chunk, not per tensor; a run that differs is then told apart tensor by tensor.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastcast._dtypes import bits, element_size, is_castable, is_float, torch_name

if TYPE_CHECKING:
    import torch

#: Elements compared at once per worker (its memory is a small multiple of this).
CHUNK_ELEMENTS = 1 << 24


class MappedFile:
    """A file mapped once (copy-on-write, never written: a writable buffer for
    ``torch.frombuffer``, whose pages stay the file's), its byte ranges as tensors.

    Never closed by hand: every tensor made from it holds a reference to the map, which
    is unmapped when the last one goes. Closing it while a tensor lived (one held by a
    traceback's frames, say) would leave that tensor pointing at unmapped memory."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            self.map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def bytes(self, begin: int, end: int) -> torch.Tensor:
        """File bytes ``[begin, end)`` as a uint8 tensor viewing the mapping."""
        import torch

        if end == begin or self.map is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.map, dtype=torch.uint8, count=end - begin, offset=begin)


def in_torch(dtype: str) -> bool:
    """Whether torch has ``dtype`` as whole bytes per element (not fp4/fp6, packed)."""
    import torch

    return getattr(torch, torch_name(dtype), None) is not None and element_size(dtype) * 8 == bits(
        dtype
    )


def typed(raw: torch.Tensor, dtype: str) -> torch.Tensor:
    """Bytes as elements of ``dtype`` (a copy only where they are not aligned for it)."""
    import torch

    size = element_size(dtype)
    if raw.data_ptr() % size:
        raw = raw.clone()
    return raw.view(getattr(torch, torch_name(dtype)))


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of the same width."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.dtype != torch.bool else t.view(torch.uint8)


#: Per float dtype: (mask of the bits past the sign, the first NaN pattern above it).
NAN_ABOVE = {
    "F64": (0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (0x7FFF_FFFF, 0x7F80_0000),
    "F16": (0x7FFF, 0x7C00),
    "BF16": (0x7FFF, 0x7F80),
    "F8_E5M2": (0x7F, 0x7C),
    "F8_E4M3": (0x7F, 0x7E),
}


def nan_mask(bits: torch.Tensor, dtype: str) -> torch.Tensor:
    """NaN positions, from bits in their own width (torch lacks isnan for fp8 on some
    devices; the magnitude masks fit each width's signed integer)."""
    if dtype not in NAN_ABOVE:
        return bits != bits  # never NaN
    magnitude, above = NAN_ABOVE[dtype]
    return (bits & magnitude) > above


def differing(got: torch.Tensor, want: torch.Tensor, dtype: str) -> torch.Tensor:
    """Where ``got`` and ``want`` (same dtype) differ bit for bit, any NaN matching
    any NaN."""
    a, b = bits_of(got), bits_of(want)
    differ = a != b
    if is_castable(dtype):
        differ &= ~(nan_mask(a, dtype) & nan_mask(b, dtype))
    return differ


@dataclass
class Found:
    """A tensor's mismatches so far: how many, and the worst (largest difference; for
    integers and raw bytes, the first)."""

    count: int = 0
    gap: float = -1.0
    at: int = 0
    got: float = 0.0
    want: float = 0.0

    def add(
        self, got: torch.Tensor, want: torch.Tensor, differ: torch.Tensor, start: int, dtype: str
    ) -> None:
        """Count the mismatches of one range (``start``: its first element's index in the
        tensor) and keep the worst."""
        import torch

        n = int(differ.sum())
        if n == 0:
            return
        self.count += n
        if is_castable(dtype):
            gap = (got.double() - want.double()).abs()
            gap = torch.where(differ, torch.nan_to_num(gap, nan=float("inf")), -1.0)
            i = int(gap.argmax())
            worst = float(gap[i])
            values = (float(got[i].double()), float(want[i].double()))
        else:  # integers as themselves; floats no cast reaches, and raw bytes, as bits
            i, worst = int(differ.nonzero()[0]), 0.0
            shown = (got, want) if not is_float(dtype) else (bits_of(got), bits_of(want))
            values = (float(shown[0][i]), float(shown[1][i]))
        if worst > self.gap:
            self.gap, self.at = worst, start + i
            self.got, self.want = values


@dataclass
class Piece:
    """A tensor of a run: its name, where its elements sit in the run, and its shape."""

    name: str
    begin: int
    end: int
    shape: tuple[int, ...]
    found: Found = field(default_factory=Found)


def ranges(n: int, step: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """``[0, n)`` in ranges of about ``step`` elements whose bounds are multiples of
    ``align`` (the last one ends at ``n``)."""
    step = max(align, step // align * align)
    for begin in range(0, n, step):
        yield begin, min(n, begin + step)


def compare_run(
    pieces: list[Piece],
    got: Callable[[int, int], torch.Tensor],
    want: Callable[[int, int], torch.Tensor],
    dtype: str,
    chunk: int,
    align: int = 1,
    done: Callable[[int], None] = lambda n: None,
) -> None:
    """Compare a run of output elements (``got(e0, e1)``) with what they should be
    (``want(e0, e1)``), ``chunk`` elements at a time; mismatches go to the pieces
    (tensors) they fall in. ``done(n)`` is told of each range's elements."""
    total = pieces[-1].end
    first = 0
    for e0, e1 in ranges(total, chunk, align):
        g, w = got(e0, e1), want(e0, e1)
        differ = differing(g, w, dtype)
        if bool(differ.any()):
            while pieces[first].end <= e0:
                first += 1
            for p in pieces[first:]:
                if p.begin >= e1:
                    break
                lo, hi = max(p.begin, e0) - e0, min(p.end, e1) - e0
                p.found.add(g[lo:hi], w[lo:hi], differ[lo:hi], max(p.begin, e0) - p.begin, dtype)
        done(e1 - e0)
        del g, w, differ
