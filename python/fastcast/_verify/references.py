"""The formats' reference math in torch, for ``verify``: a dequantized weight's fp32
values and ``--quantize``'s values and scales, computed for a range of the output's
elements at a time, so that a tensor of any size is checked in bounded memory.

Deliberately independent of fastcast's core: each function is the format's own library
math (DeepSeek's ``weight_dequant``, bitsandbytes, GPTQ, AutoAWQ), written again in torch
from the format's definition, never from the Rust code it checks. A range is whole rows
of the output (whole packed units, whole blocks): each element is computed by exactly
the operations, in exactly the order, of the whole-tensor formula, so the bits are the
same whichever ranges it is cut into.

Each reference takes ``read(name)``, the source tensor of that name as a (mapped) CPU
tensor, and ``device``; it moves only the range's slices there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastcast._plan.dequantize import QuantizedWeight

if TYPE_CHECKING:
    import torch

#: Reads a source tensor by name, whole, as a CPU tensor (mapped: no copy).
Read = Callable[[str], "torch.Tensor"]

#: bitsandbytes' LLM.int8 multiplier (``int8_vectorwise_dequant``): 1/127 as an f32.
RECIPROCAL_127 = 7.874015718698502e-3
#: AutoAWQ GEMM: output ``j`` of each group of eight sits in nibble ``AWQ_NIBBLE[j]``
#: (the inverse of the packing order [0, 2, 4, 6, 1, 3, 5, 7]).
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
#: E2M1 magnitudes by the low three bits of a 4-bit float code (bit 3 is the sign).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: float8_e4m3fn's largest finite value: a block's scale is its amax over it.
E4M3_MAX = 448.0
#: The smallest amax a scale is made from (an all-zero block's scale stays positive).
MIN_AMAX = 1e-12
#: Rows of a GPTQ/AWQ output computed at once are a multiple of this: every packing
#: (2, 4 or 8 bits in int32 words, AWQ's groups of eight) fits it whole.
PACK_ROWS = 32


@dataclass(frozen=True)
class Reference:
    """How an output tensor's expected values are computed, range by range.

    ``values(e0, e1, device)`` gives output elements ``[e0, e1)`` (flat) as the format's
    reference computes them (fp32 for a dequantized weight, to be rounded once to the
    output dtype; the output dtype itself for ``--quantize``). ``e0`` and ``e1`` are
    multiples of ``align`` (``e1`` may also be the tensor's end); ``cost`` is the
    source elements read per output element, to size the ranges."""

    numel: int
    align: int
    values: Callable[[int, int, str], torch.Tensor]
    cost: int = 1


def rows_of(shape: Sequence[int]) -> tuple[int, int]:
    """A tensor seen as 2-D: (rows, columns), the last dimension being the columns."""
    cols = shape[-1] if shape else 1
    return (math.prod(shape) // cols if cols else 0), cols


def dequantized(w: QuantizedWeight, read: Read) -> Reference:
    """The reference for a dequantized weight ``w`` (see ``_plan.dequantize.QuantizedWeight``)."""
    numel = math.prod(w.shape)
    p = w.params
    if w.kind == "fp8_scaled":
        return fp8_scaled(read(w.source), read(w.operands["scale"]), p["block"])
    if w.kind == "bnb4":
        return bnb4(read(w.source), {r: read(n) for r, n in w.operands.items()}, w.shape, p)
    if w.kind == "int8_rows":
        return int8_rows(read(w.source), read(w.operands["scb"]))
    if w.kind == "fp4":
        g = read(w.operands["global"]) if "global" in w.operands else None
        return fp4(read(w.source), read(w.operands["scale"]), g, p, w.shape)
    g_idx = read(w.operands["g_idx"]) if "g_idx" in w.operands else None
    if w.kind == "ct_int":
        zero = read(w.operands["zero_point"]) if "zero_point" in w.operands else None
        return ct_int(read(w.source), read(w.operands["scale"]), zero, g_idx, p, w.shape)
    ops = (read(w.source), read(w.operands["qzeros"]), read(w.operands["scales"]))
    if w.kind == "gptq":
        return gptq(*ops, g_idx, p, numel)
    return awq(*ops, p["group_size"], numel)


def fp8_scaled(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> Reference:
    """fp8: each value as fp32 times its block's scale as fp32 (an fp32 product, as
    DeepSeek's ``weight_dequant`` and compressed-tensors compute it), the weight seen as
    2-D with partial edge blocks cut to the weight."""
    rows, cols = rows_of(q.shape)
    br, bc = block
    grid = scale.reshape(-(-rows // br), -(-cols // bc))
    flat = q.reshape(rows, cols)

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        r0, r1 = e0 // cols, -(-e1 // cols)
        g = grid[r0 // br : -(-r1 // br)].to(device).float()
        full = g.repeat_interleave(br, 0)[: r1 - r0].repeat_interleave(bc, 1)[:, :cols]
        return (flat[r0:r1].to(device).float() * full).reshape(-1)

    return Reference(rows * cols, br * cols, values)


def fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    p: dict[str, Any],
    shape: tuple[int, ...],
) -> Reference:
    """4-bit floats, two per byte, the low nibble first: MXFP4 ``code * 2^(e - 127)``
    with the exponent byte read as torch's ``float8_e8m0fnu``; NVFP4 ``code * (f32(s) /
    g)`` (compressed-tensors) or ``code * (f32(s) * g)`` (ModelOpt, whose code 8 is +0),
    fp32 products. ``transpose``: each matrix written with rows and columns swapped, so
    ranges are whole matrices; ``down``: pairs and groups run down each matrix's columns
    (ModelOpt's fused experts), ranges whole matrices; else whole rows."""
    import torch

    table = torch.tensor([*E2M1, *(-v for v in E2M1)], dtype=torch.float32)
    if p["positive_zero"]:
        table[8] = 0.0
    group, transpose = p["group"], p["transpose"]
    if p.get("down"):
        return fp4_down(packed, scale, global_scale, table, group, shape)
    cols = shape[-2] if transpose else shape[-1]
    rows = math.prod(shape) // cols
    data = packed.contiguous().view(torch.uint8).reshape(rows, cols // 2)
    scales = scale.contiguous().reshape(rows, cols // group)
    if global_scale is None:
        multipliers = scales.view(torch.uint8).view(torch.float8_e8m0fnu).float()
    elif p["divide"]:
        multipliers = scales.float() / global_scale.float().reshape(())
    else:
        multipliers = scales.float() * global_scale.float().reshape(())
    matrix = shape[-1] * shape[-2]
    unit = matrix if transpose else cols

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        # ranges are whole units (Reference.align): rows, or matrices when transposed
        r0, r1 = e0 // cols, -(-e1 // unit) * unit // cols
        b = data[r0:r1].to(device)
        codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(r1 - r0, cols).long()
        m = multipliers[r0:r1].to(device).repeat_interleave(group, dim=1)
        v = table.to(device)[codes] * m
        if transpose:
            v = v.reshape(-1, shape[-1], cols).transpose(1, 2)
        return v.reshape(-1)[: e1 - e0]

    return Reference(math.prod(shape), unit, values)


def fp4_down(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    table: torch.Tensor,
    group: int,
    shape: tuple[int, ...],
) -> Reference:
    """ModelOpt's fused NVFP4 experts: bytes ``[M, R / 2, C]``, row ``2k`` of a matrix in
    the low nibbles of byte row ``k``, scales ``[M, R / group, C]``; ``code * (f32(s) *
    g)`` in fp32, written ``[M, R, C]``, by whole matrices."""
    import torch

    rows, cols = shape[-2], shape[-1]
    data = packed.contiguous().view(torch.uint8).reshape(-1, rows // 2, cols)
    scales = scale.contiguous().reshape(-1, rows // group, cols)
    g = global_scale.float().reshape(()) if global_scale is not None else torch.tensor(1.0)
    matrix = rows * cols

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        m0, m1 = e0 // matrix, -(-e1 // matrix)
        b = data[m0:m1].to(device)
        codes = torch.stack([b & 0xF, b >> 4], dim=2).reshape(m1 - m0, rows, cols).long()
        per_block = scales[m0:m1].to(device).float() * g.to(device)
        v = table.to(device)[codes] * per_block.repeat_interleave(group, dim=1)
        return v.reshape(-1)[: e1 - e0]

    return Reference(math.prod(shape), matrix, values)


def int8_rows(q: torch.Tensor, scb: torch.Tensor) -> Reference:
    """LLM.int8: bitsandbytes' order, ``(CB * SCB) * f32(1/127)``, not ``/ 127``."""
    rows, cols = rows_of(q.shape)
    flat = q.reshape(rows, cols)

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        r0, r1 = e0 // cols, -(-e1 // cols)
        s = scb[r0:r1].to(device).float().view(-1, 1)
        return (flat[r0:r1].to(device).float() * s * RECIPROCAL_127).reshape(-1)

    return Reference(rows * cols, cols, values)


def bnb4(
    packed: torch.Tensor,
    ops: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    p: dict[str, Any],
) -> Reference:
    """bitsandbytes nf4/fp4: the container's bytes, two codes each (high nibble first),
    ``quant_map[code] * absmax[k // blocksize]``; with double quant the absmax is
    ``nested_quant_map[absmax_u8] * nested_absmax[b // nested_blocksize]``, then plus the
    offset as an f32 (``dequantize_blockwise``, then ``+=``)."""
    import torch

    n = math.prod(shape)
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    blocksize = p["blocksize"]
    nested = "nested_absmax" in ops
    per_block = blocksize * (p["nested_blocksize"] if nested else 1)

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        chunk = data[e0 // 2 : -(-e1 // 2)].to(device)
        codes = torch.stack([chunk >> 4, chunk & 0xF], dim=1).reshape(-1)[: e1 - e0].long()
        b0, b1 = e0 // blocksize, -(-e1 // blocksize)
        absmax = ops["absmax"][b0:b1].to(device)
        if nested:
            nbs = p["nested_blocksize"]
            outer = ops["nested_absmax"][b0 // nbs : -(-b1 // nbs)].to(device).float()
            outer = outer.repeat_interleave(nbs)[: b1 - b0]
            absmax = ops["nested_quant_map"].to(device).float()[absmax.long()] * outer
            absmax = absmax + torch.tensor(p["offset"], dtype=torch.float32, device=device)
        per_value = absmax.float().repeat_interleave(blocksize)[: e1 - e0]
        return ops["quant_map"].to(device).float()[codes] * per_value

    return Reference(n, per_block, values)


def unpack_words(
    words: torch.Tensor, bits: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """int32 words ``[..., m]`` -> ``[..., m * 32 // bits]`` values, low bits first (value
    ``j`` of a word at slot ``order[j]`` when given)."""
    import torch

    slots = list(order) if order is not None else list(range(32 // bits))
    shifts = torch.tensor(slots, dtype=torch.int32, device=words.device) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*words.shape[:-1], -1)


def gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    p: dict[str, Any],
    numel: int,
) -> Reference:
    """GPTQ: ``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])``, ``q`` packed along the
    inputs, ``z`` along the outputs, ``z`` the stored zero plus one for v1, ``g`` =
    ``g_idx[i]`` (else ``i // group_size``); ``[out, in]``, computed by output rows."""
    import torch

    bits = p["bits"]
    inputs = qweight.shape[0] * 32 // bits
    pack = 32 // bits

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        o0, o1 = e0 // inputs, -(-e1 // inputs)
        q = unpack_words(qweight[:, o0:o1].to(device).t(), bits).t()  # [in, o1 - o0]
        z = unpack_words(qzeros[:, o0 // pack : -(-o1 // pack)].to(device), bits)
        z = z[:, : o1 - o0] + int(p["zero_plus_one"])
        g = (
            g_idx.to(device).long()
            if g_idx is not None
            else torch.arange(inputs, device=device) // p["group_size"]
        )
        s = scales[:, o0:o1].to(device).float()
        return (s[g] * (q - z[g]).float()).t().reshape(-1)

    return Reference(numel, PACK_ROWS * inputs, values)


def awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, numel: int
) -> Reference:
    """AutoAWQ GEMM: values packed along the outputs in AWQ's order, ``W[o, i] =
    scales[i // group_size, o] * (q[i, o] - z[i // group_size, o])``; ``[out, in]``,
    computed by output rows."""
    import torch

    inputs = qweight.shape[0]

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        o0, o1 = e0 // inputs, -(-e1 // inputs)
        words = slice(o0 // 8, -(-o1 // 8))
        q = unpack_words(qweight[:, words].to(device), 4, AWQ_NIBBLE)[:, : o1 - o0]
        z = unpack_words(qzeros[:, words].to(device), 4, AWQ_NIBBLE)[:, : o1 - o0]
        g = torch.arange(inputs, device=device) // group_size
        s = scales[:, o0:o1].to(device).float()
        return (s[g] * (q - z[g]).float()).t().reshape(-1)

    return Reference(numel, PACK_ROWS * inputs, values)


def ct_int(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    p: dict[str, Any],
    shape: tuple[int, ...],
) -> Reference:
    """compressed-tensors integers: ``W[o, i] = s[o, g] * (q[o, i] - z[o, g])``, fp32
    products, ``g`` = ``g_idx[i]`` (else ``i // group_size``). ``q`` is I8, or unpacked
    from I32 words along each row (code ``i`` at bit ``i * bits``, stored plus ``2^(bits -
    1)``); ``z`` is I8 like the scale, or I32 words packed the same way along the
    outputs; a one-value scale (and zero) serves every row. By output rows."""
    import torch

    rows, cols = shape
    bits, size = p["bits"], p["group_size"]
    half, groups = 1 << (bits - 1), -(-cols // size)
    s_all = scale.reshape(-1, groups).float().expand(rows, groups)
    if zero is None:
        z_all = torch.zeros(1, groups, dtype=torch.int32).expand(rows, groups)
    elif zero.dtype == torch.int32:  # packed along the outputs
        z_all = unpack_words(zero.t().contiguous(), bits)[:, :rows].t() - half
    else:
        z_all = zero.reshape(-1, groups).int().expand(rows, groups)
    g = g_idx.long() if g_idx is not None else torch.arange(cols) // size

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        r0, r1 = e0 // cols, -(-e1 // cols)
        if codes.dtype == torch.int32:
            q = unpack_words(codes[r0:r1].to(device), bits)[:, :cols] - half
        else:
            q = codes[r0:r1].to(device).int()
        s, z, gi = s_all[r0:r1].to(device), z_all[r0:r1].to(device), g.to(device)
        out: torch.Tensor = (s[:, gi] * (q - z[:, gi]).float()).reshape(-1)
        return out

    return Reference(rows * cols, cols, values)


def quantized(w: torch.Tensor, block: tuple[int, int], scales: bool) -> Reference:
    """``--quantize``'s math, independent of fastcast's core: the weight seen as 2-D,
    per block (edge blocks cut to the weight), ``s = amax.clamp(min=1e-12) / 448`` in
    fp32 (a NaN in the block makes it NaN), then ``q = (W / s).clamp(-448, 448)`` rounded
    to float8_e4m3fn. ``scales``: the reference for the F32 scale grid ``[ceil(rows /
    block[0]), ceil(cols / block[1])]``, else for the e4m3 values."""
    rows, cols = rows_of(w.shape)
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    flat = w.reshape(rows, cols)

    def block_rows(g0: int, g1: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight's rows of block rows ``[g0, g1)`` as fp32, their scales)."""
        import torch

        x = flat[g0 * br : min(g1 * br, rows)].to(device).float()
        n = x.shape[0]
        magnitude = torch.nn.functional.pad(
            x.abs(), (0, grid[1] * bc - cols, 0, (g1 - g0) * br - n)
        )  # edge blocks: padded with zeros
        amax = magnitude.reshape(g1 - g0, br, grid[1], bc).amax(dim=(1, 3))
        return x, amax.clamp(min=MIN_AMAX) / E4M3_MAX

    def values(e0: int, e1: int, device: str) -> torch.Tensor:
        import torch

        r0, r1 = e0 // cols, -(-e1 // cols)
        x, s = block_rows(r0 // br, -(-r1 // br), device)
        full = s.repeat_interleave(br, 0)[: r1 - r0].repeat_interleave(bc, 1)[:, :cols]
        q = (x / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q.reshape(-1)

    def scale_values(e0: int, e1: int, device: str) -> torch.Tensor:
        g0, g1 = e0 // grid[1], -(-e1 // grid[1])
        return block_rows(g0, g1, device)[1].reshape(-1)

    if scales:
        return Reference(grid[0] * grid[1], grid[1], scale_values, cost=br * bc)
    return Reference(rows * cols, br * cols, values)
