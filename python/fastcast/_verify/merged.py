"""``verify``'s check of a weight ``--merge-lora`` merged: PEFT's merge math, written
again in torch from its definition (``W + scale · (B @ A)``, transposed for Conv1D and
embeddings, DoRA's ``m / ‖·‖`` per output feature), computed in float64.

A merge is not one fixed sequence of fp32 operations the way a dequantization is: the
product's sums run in whatever order the GEMM picks (PEFT's, torch's, ours). So the
output is held to a bound, not to bits: within one unit in the last place of the
output dtype of the exact value, plus the worst error an fp32 computation of it can
make, ``(r + 4) · eps32 · (|W| + |scale| · (|B| @ |A|))`` (times the DoRA factor, and its
own few ulp). A wrong scale, orientation, row or rank lands far outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastcast._plan.experts import Stacked
from fastcast._plan.merge import Merged, Patched
from fastcast._source.entries import TensorEntry

if TYPE_CHECKING:
    import torch

#: fp32's unit roundoff.
EPS32 = 2.0**-24
#: Output rows a range holds at most, for the DoRA column pass.
ROWS_AT_ONCE = 1 << 12


@dataclass(frozen=True)
class MergedReference:
    """The exact merged values of a range of output elements (whole rows), and the
    bound each output element must meet."""

    numel: int
    align: int
    values: Callable[[int, int, str], tuple[torch.Tensor, torch.Tensor]]
    """``(values, bound)`` of elements ``[e0, e1)``, float64, on the device."""


def merged_reference(
    m: Merged, base: torch.Tensor, read: Callable[[TensorEntry], torch.Tensor], dtype: str
) -> MergedReference:
    """The reference of a merged weight: ``base`` is the base weight (any float dtype, on
    the CPU), ``read(entry)`` reads an adapter tensor, ``dtype`` the output's."""
    import torch

    lora = m.lora
    if m.bias:  # b + scale · lora_B.bias: rank 1, A = [[1]]
        assert lora.bias is not None
        base = base.reshape(-1, 1)
        a = torch.ones(1, 1, dtype=torch.float64)
        b = read(lora.bias).double().reshape(-1, 1)
    else:
        a, b = read(lora.a).double(), read(lora.b).double()
    base = base.reshape(-1, base.shape[-1])  # stacked experts: [E * rows, cols]
    rows, cols = base.shape
    # torch applies the Python scale to an fp32 tensor as an fp32
    scale = float(torch.tensor(lora.scale, dtype=torch.float32))
    out_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    finfo = torch.finfo(out_dtype)
    stacked = m.stacked or Stacked(1, rows)
    experts, expert_rows = stacked.experts, stacked.expert_rows or rows
    # PEFT's ParamWrapper reshapes: A as (experts, rank, in), B as (out, rank, experts)
    a3, b3 = a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts)
    rank = a3.shape[1]

    def update(e: int, l0: int, l1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[l0, l1)`` of expert ``e``'s update, and of its magnitudes'."""
        ae, be = a3[e], b3[:, :, e]
        if m.transpose:
            return ae[:, l0:l1].T @ be.T, ae[:, l0:l1].abs().T @ be.abs().T
        return be[l0:l1] @ ae, be[l0:l1].abs() @ ae.abs()

    def merged_rows(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = base[r0:r1].double()
        deltas, sizes = [], []
        g, end = stacked.first_row + r0, stacked.first_row + r1
        while g < end:  # an expert at a time
            e, local = divmod(g, expert_rows)
            stop = min(end, g - local + expert_rows)
            delta, size = update(e, local, local + stop - g)
            deltas.append(delta)
            sizes.append(size)
            g = stop
        delta, size = torch.cat(deltas), torch.cat(sizes)
        v = w + scale * delta
        return v, (rank + 4) * EPS32 * (w.abs() + abs(scale) * size)

    factors = None
    if lora.magnitude is not None:
        magnitude = read(lora.magnitude).double()
        if m.transpose:  # a column's norm needs every row
            sums = torch.zeros(cols, dtype=torch.float64)
            for r0 in range(0, rows, ROWS_AT_ONCE):
                v, _ = merged_rows(r0, min(rows, r0 + ROWS_AT_ONCE))
                sums += (v * v).sum(0)
            factors = magnitude / sums.sqrt()

    def values(e0: int, e1: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        r0, r1 = e0 // cols, e1 // cols
        v, err = merged_rows(r0, r1)
        if lora.magnitude is not None:
            if factors is not None:
                f = factors.view(1, -1)
            else:
                f = (magnitude[r0:r1] / v.norm(dim=1)).view(-1, 1)
            v, err = v * f, err * f.abs() + 8 * EPS32 * (v * f).abs()
        ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=finfo.tiny))))
        return v.reshape(-1).to(device), (err + ulp).reshape(-1).to(device)

    return MergedReference(rows * cols, cols, values)


def patched_reference(
    p: Patched, base: torch.Tensor, read: Callable[[TensorEntry], torch.Tensor], dtype: str
) -> MergedReference:
    """The reference of an embedding with trainable tokens: PEFT's ``index_copy`` of the
    delta rows into the base (in fp32, as PEFT's merge into a base loaded in fp32), then
    torch's cast to the output ``dtype``; held bit for bit (a bound of 0)."""
    import torch

    rows, cols = base.shape
    out_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    delta = read(p.tokens.delta).to(torch.float32)
    index = torch.tensor(p.tokens.indices, dtype=torch.int64)

    def values(e0: int, e1: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        r0, r1 = e0 // cols, e1 // cols
        inside = (index >= r0) & (index < r1)
        w = base[r0:r1].to(torch.float32).index_copy(0, index[inside] - r0, delta[inside])
        v = w.to(out_dtype).double().reshape(-1)
        return v.to(device), torch.zeros_like(v).to(device)

    return MergedReference(rows * cols, cols, values)


#: float8_e4m3fn's largest finite value, and the smallest amax a scale is made from
#: (``--quantize``'s rule, as ``_verify/references.py`` writes it).
E4M3_MAX, MIN_AMAX = 448.0, 1e-12
#: An fp32 value's relative rounding, and the f32 division's: the merged weight fastcast
#: quantizes is the exact merge within ``bound``, then rounded to f32 and divided in f32.
F32_SLACK = 2.0**-22


def quantized_bounds(
    v: torch.Tensor, bound: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of a merged weight (``v`` and ``bound``, ``[rows, cols]``, float64, the
    first row starting a block-row) quantized with the stored F32 ``scales`` of their
    block-rows: ``(lo, hi)``, the e4m3 values each element's code must lie between (the
    codes of the lowest and highest value the merge may have, divided by the stored
    scale), and ``(s_lo, s_hi)``, the range each of those block-rows' scales must lie in
    (``amax / 448`` of the lowest and highest amax the block may have)."""
    import torch

    br, bc = block
    rows, cols = v.shape
    slack = bound + v.abs() * F32_SLACK
    full = scales.double().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]

    def code(x: torch.Tensor) -> torch.Tensor:
        return (x / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double()

    lo, hi = code(v - slack), code(v + slack)
    grid = scales.shape
    pad = (0, grid[1] * bc - cols, 0, grid[0] * br - rows)

    def amax(x: torch.Tensor) -> torch.Tensor:
        blocks = torch.nn.functional.pad(x, pad).reshape(grid[0], br, grid[1], bc)
        return blocks.amax(dim=(1, 3)).clamp(min=MIN_AMAX) / E4M3_MAX

    s_lo = amax((v.abs() - slack).clamp(min=0)) * (1 - F32_SLACK)
    s_hi = amax(v.abs() + slack) * (1 + F32_SLACK)
    return lo, hi, s_lo, s_hi
