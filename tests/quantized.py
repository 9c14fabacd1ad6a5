"""Quantized checkpoints as their producers write them, and the reference dequantizers.

Each builder writes a tiny model folder in one quantized format (``config.json`` with the
producer's exact ``quantization_config``, ``model.safetensors`` or two shards and an index,
``generation_config.json``) under the real tensor names, and returns a :class:`QuantModel`:
which tensors are quantization state (and their role), the reference dequantization of every
quantized Linear, and every plain tensor. The formats, shapes, dtypes and math follow
``shared/reference/quantized.md`` (Tables A to C); each builder names the real repository it
mimics.

Where the producer's own library runs on the CPU it does the work: bitsandbytes quantizes
the bnb fixtures (``quantize_4bit``, ``int8_vectorwise_quant``), compressed-tensors builds its
scheme, scales and fp8 weights, transformers writes the bnb and FBGEMM configs. The rest
(DeepSeek block fp8, FBGEMM rows, AutoFP8 per-tensor, GPTQ and AWQ packing) is the producers'
formula in torch, round to nearest where GPTQ/AWQ would run their calibration.

Edge cases on purpose: fp8 blocks cut by the edge of a weight (``kv_a_proj_with_mqa`` is
[576, 192], a 5 x 2 grid of 128 x 128 blocks whose last row and column are partial), an
all-zero fp8 block and an all-zero FBGEMM row (the clamped scales), a weight and its scale in
different shards, bnb weights whose element count is not a multiple of the 64-element block
and whose 256-block double-quant groups end partial, bnb packed into bf16 storage, GPTQ
groups cut short (80 inputs, group 32) and permuted by ``desc_act``, AWQ zero points at 0 and
15, and int32 words whose top nibble sets the sign bit.

``dequantized`` and :func:`reference_dequantize` are the oracle a quantization-aware
converter is judged by: fp32 ``[out, in]``, computed from the tensors read back from the
folder, in the arithmetic of the library that reads the format (fp32 products, no
intermediate rounding; bitsandbytes int8 multiplies by the fp32 reciprocal of 127, as
bitsandbytes does). Round it once to the target dtype to get what the libraries give.
Building all thirteen takes about a second once torch and the libraries are imported.

    model = ALL["deepseek-fp8"](tmp_path)
    w = reference_dequantize(model, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest import require

if TYPE_CHECKING:
    from torch import Tensor

#: Largest finite float8_e4m3fn value: fp8 scales are ``amax / E4M3_MAX``.
E4M3_MAX = 448.0
#: FBGEMM's floor on a row-wise scale (``computeFP8QuantizeScaleRowwise``).
FBGEMM_MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)
#: AutoAWQ GEMM packs eight 4-bit columns per int32 in this order ...
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: ... and reads them back with its inverse.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
#: What each quantization tensor is for (the values of ``QuantModel.state``).
ROLES = ("quantized weight", "scale", "zero point", "group index", "quant state", "pinned fp32")


@dataclass
class QuantModel:
    """A quantized model folder and what a correct reading of it gives."""

    name: str
    #: The model folder.
    path: Path
    #: ``quantization_config.quant_method`` as config.json says it (None: no config).
    method: str | None
    #: The variant in a few words ("block 128x128", "nf4 double quant", ...).
    scheme: str
    #: The model's ``torch_dtype`` (what the unquantized tensors are in).
    dtype: str
    #: Every quantization tensor -> its role (one of :data:`ROLES`).
    state: dict[str, str] = field(default_factory=dict)
    #: Every quantized Linear ``x.weight`` -> reference dequantization, fp32 ``[out, in]``.
    dequantized: dict[str, Tensor] = field(default_factory=dict)
    #: Every tensor that is not quantization state (norms, embeddings, lm_head, router gate,
    #: biases), as written. GPTQ/AWQ biases are here too: fp16 like the model, but the
    #: kernels want them fp16 whatever the target (reference section 3).
    plain: dict[str, Tensor] = field(default_factory=dict)
    #: Every quantized Linear ``x.weight`` -> the fp32 ``[out, in]`` weight it was made from.
    original: dict[str, Tensor] = field(default_factory=dict)
    #: Every tensor -> the file that holds it (relative to ``path``).
    files: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """config.json as written."""
        return json.loads((self.path / "config.json").read_text())

    @property
    def quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` of config.json (top level or in ``text_config``)."""
        return _quantization_config(self.config)


# --- reading a folder ----------------------------------------------------------------------


class Checkpoint:
    """The tensors of a model folder (one file or index + shards), read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.files: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            st = require("safetensors")
            with st.safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __iter__(self) -> Any:
        return iter(self.files)

    def _open(self, name: str) -> Any:
        st = require("safetensors")
        return st.safe_open(str(self.folder / self.files[name]), framework="pt")

    def __getitem__(self, name: str) -> Tensor:
        with self._open(name) as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype (``F8_E4M3``, ``BF16``, ``U8``...)."""
        with self._open(name) as f:
            return str(f.get_slice(name).get_dtype())

    def shape(self, name: str) -> list[int]:
        with self._open(name) as f:
            return list(f.get_slice(name).get_shape())


def _quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    found = config.get("quantization_config")
    if found is None:
        found = config.get("text_config", {}).get("quantization_config")
    return dict(found or {})


# --- reference dequantization (pure torch, fp32 [out, in]) ---------------------------------


def dequantize_fp8_block(q: Tensor, scale_inv: Tensor, block: Iterable[int] = (128, 128)) -> Tensor:
    """DeepSeek-V3 / FineGrainedFP8: ``W[i, j] = fp32(q[i, j]) * s[i // b0, j // b1]``.

    Blocks cut by the edge are indexed, not derived from the grid (transformers 5.23 derives
    the block size from the grid and fails on them).

    >>> dequantize_fp8_block(q, s).shape == q.shape
    """
    b0, b1 = block
    rows, cols = q.shape
    s = scale_inv.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)
    return q.float() * s[:rows, :cols]


def dequantize_fp8_scaled(q: Tensor, scale: Tensor) -> Tensor:
    """Per-tensor (``[]``/``[1]``) or per-row (``[out, 1]``) fp8: ``W = fp32(q) * scale``.

    compressed-tensors multiplies in the scale's dtype (bf16); the product of a 4-bit e4m3
    significand and an 8-bit bf16 one is exact, so this equals its result before rounding.

    >>> dequantize_fp8_scaled(q, torch.tensor(0.01)).dtype == torch.float32
    """
    return q.float() * scale.float()


def dequantize_bnb_4bit(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    quant_state: dict[str, Any],
    nested_absmax: Tensor | None = None,
    nested_quant_map: Tensor | None = None,
) -> Tensor:
    """bitsandbytes nf4/fp4: ``W_flat[k] = code[nibble_k] * absmax[k // blocksize]``.

    Nibbles are read high first from the bytes of ``packed`` (whatever its storage dtype).
    With double quant, ``absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // 256] +
    offset``. ``quant_state`` is the JSON of ``x.weight.quant_state.bitsandbytes__*``.

    >>> dequantize_bnb_4bit(w, absmax, code, json.loads(bytes(qs.tolist())))
    """
    torch = require("torch")
    shape = [int(d) for d in quant_state["shape"]]
    n = math.prod(shape)
    blocksize = int(quant_state["blocksize"])
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    nibbles = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n].long()
    if nested_absmax is not None:
        assert nested_quant_map is not None
        nested_blocksize = int(quant_state["nested_blocksize"])
        offset = torch.tensor(float(quant_state["nested_offset"]), dtype=torch.float32)
        outer = nested_absmax.float().repeat_interleave(nested_blocksize)[: absmax.numel()]
        absmax = nested_quant_map.float()[absmax.long()] * outer
        absmax = absmax + offset
    per_element = absmax.float().repeat_interleave(blocksize)[:n]
    return (quant_map.float()[nibbles] * per_element).reshape(shape)


def dequantize_bnb_int8(weight: Tensor, scb: Tensor) -> Tensor:
    """LLM.int8: ``W = CB * SCB[:, None] / 127``, in bitsandbytes' own arithmetic.

    bitsandbytes (``int8_vectorwise_dequant``, also what transformers calls) multiplies by
    the fp32 reciprocal of 127 instead of dividing: 1 ulp apart for some elements, so the
    reference does what the library does.

    >>> dequantize_bnb_int8(cb, scb).shape == cb.shape
    """
    return weight * scb.float().view(-1, 1) * 7.874015718698502e-3


def _unpack_int32(packed: Tensor, bits: int) -> Tensor:
    """``[..., n]`` int32 -> ``[..., n, 32 // bits]`` values, low bits first."""
    torch = require("torch")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def dequantize_gptq(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int = 4,
    checkpoint_format: str = "gptq",
) -> Tensor:
    """GPTQ: ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))``.

    ``qweight`` packs consecutive input rows, ``qzeros`` consecutive output columns, low bits
    first; ``checkpoint_format: gptq`` (v1) stores zero - 1, ``gptq_v2`` the zero itself.

    >>> dequantize_gptq(qweight, qzeros, scales, g_idx).shape == (out, in)
    """
    if 32 % bits:
        raise NotImplementedError(f"{bits}-bit GPTQ packing straddles int32 words")
    rows = _unpack_int32(qweight.t(), bits).reshape(qweight.shape[1], -1).t()  # [in, out]
    zeros = _unpack_int32(qzeros, bits).reshape(qzeros.shape[0], -1)  # [groups, out]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    g = g_idx.long()
    w = scales.float()[g] * (rows - zeros[g]).float()
    return w.t().contiguous()


def dequantize_awq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bits: int = 4
) -> Tensor:
    """AutoAWQ GEMM: unpack with order ``[0, 4, 1, 5, 2, 6, 3, 7]``, ``W = scales * (q - z)``,
    transposed from ``[in, out]`` to ``[out, in]``.

    >>> dequantize_awq(qweight, qzeros, scales, 128).shape == (out, in)
    """
    if bits != 4:
        raise NotImplementedError("AutoAWQ GEMM order is defined for 4 bits")
    order = list(AWQ_REVERSE_ORDER)
    q = _unpack_int32(qweight, bits)[..., order].reshape(qweight.shape[0], -1)  # [in, out]
    z = _unpack_int32(qzeros, bits)[..., order].reshape(qzeros.shape[0], -1)  # [groups, out]
    g = _group_index(q.shape[0], group_size)
    w = scales.float()[g] * (q - z[g]).float()
    return w.t().contiguous()


def _group_index(n: int, group_size: int) -> Tensor:
    torch = require("torch")
    return torch.arange(n) // group_size


def dequantize_folder(folder: Path, name: str) -> Tensor:
    """Reference dequantization of the Linear weight ``name`` (``x.weight``) of any model
    folder, fp32 ``[out, in]``: the tensors from the safetensors files, the format from
    config.json. A weight with no quantization tensors beside it (lm_head, or any weight of
    a dequantized output) comes back as it is, in fp32. With no ``quantization_config``,
    only the self-describing formats are read (fp8 with a scale, bitsandbytes); GPTQ and
    AWQ need the config's group size and format.

    >>> dequantize_folder(out_dir, "model.layers.0.mlp.down_proj.weight")
    """
    torch = require("torch")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    qc = _quantization_config(config)
    ckpt = Checkpoint(folder)
    x = name.removesuffix(".weight")
    found = _quantized_by(ckpt, x)
    if found is None:
        return ckpt[name].to(torch.float32)
    method = qc.get("quant_method")
    if method is None:
        if found in ("gptq", "awq"):
            raise ValueError(f"{folder}: {x} is {found}-packed but config.json has no settings")
        method = found
    if method == "fp8" and f"{x}.weight_scale_inv" in ckpt:
        block = qc.get("weight_block_size") or (128, 128)
        return dequantize_fp8_block(ckpt[name], ckpt[f"{x}.weight_scale_inv"], block)
    if method in ("fp8", "fbgemm_fp8"):
        return dequantize_fp8_scaled(ckpt[name], ckpt[f"{x}.weight_scale"])
    if method == "compressed-tensors":
        if qc.get("format") != "float-quantized":
            raise NotImplementedError(f"compressed-tensors format {qc.get('format')!r}")
        return dequantize_fp8_scaled(ckpt[name], ckpt[f"{x}.weight_scale"])
    if method == "bitsandbytes":
        if f"{x}.SCB" in ckpt:
            return dequantize_bnb_int8(ckpt[name], ckpt[f"{x}.SCB"])
        (key,) = (k for k in ckpt if k.startswith(f"{name}.quant_state.bitsandbytes__"))
        quant_state = json.loads(bytes(ckpt[key].tolist()))
        nested = f"{name}.nested_absmax" in ckpt
        return dequantize_bnb_4bit(
            ckpt[name],
            ckpt[f"{name}.absmax"],
            ckpt[f"{name}.quant_map"],
            quant_state,
            ckpt[f"{name}.nested_absmax"] if nested else None,
            ckpt[f"{name}.nested_quant_map"] if nested else None,
        )
    if method == "gptq":
        bits = int(qc.get("bits", 4))
        fmt = qc.get("checkpoint_format", "gptq")
        qweight = ckpt[f"{x}.qweight"]
        g_idx = (
            ckpt[f"{x}.g_idx"]
            if f"{x}.g_idx" in ckpt
            else _group_index(qweight.shape[0] * 32 // bits, int(qc["group_size"]))
        )
        return dequantize_gptq(qweight, ckpt[f"{x}.qzeros"], ckpt[f"{x}.scales"], g_idx, bits, fmt)
    if method == "awq":
        return dequantize_awq(
            ckpt[f"{x}.qweight"],
            ckpt[f"{x}.qzeros"],
            ckpt[f"{x}.scales"],
            int(qc["group_size"]),
            int(qc.get("bits", 4)),
        )
    raise NotImplementedError(f"{folder}: quant_method {method!r}")


def _quantized_by(ckpt: Checkpoint, x: str) -> str | None:
    """Which format's tensors sit beside the Linear ``x`` (None: it is not quantized)."""
    if f"{x}.weight_scale_inv" in ckpt or f"{x}.weight_scale" in ckpt:
        return "fp8"
    if f"{x}.SCB" in ckpt or f"{x}.weight.absmax" in ckpt:
        return "bitsandbytes"
    if f"{x}.qweight" in ckpt:
        return "gptq" if f"{x}.g_idx" in ckpt else "awq"
    return None


def reference_dequantize(model: QuantModel, name: str) -> Tensor:
    """The reference dequantization of ``name`` (``x.weight``), read from ``model.path``.

    Point it at another folder (a converter's output) with :func:`with_path`.

    >>> torch.equal(reference_dequantize(model, name), model.dequantized[name])
    """
    return dequantize_folder(model.path, name)


# --- writing a folder ----------------------------------------------------------------------


def load_all(folder: Path) -> dict[str, Tensor]:
    """Every tensor of every safetensors file under ``folder``, by name."""
    st = require("safetensors.torch")
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    torch = _torch()
    return bool(
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _torch() -> Any:
    return require("torch")


def _json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(path: Path, state: dict[str, Any]) -> None:
    st = require("safetensors.torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(
        {k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )


def _write_weights(root: Path, tensors: dict[str, Any], first_shard_ends: str | None) -> None:
    """One ``model.safetensors``, or, when ``first_shard_ends`` names a tensor, two shards
    split right after it in state-dict order (as ``save_pretrained`` splits by size) and
    ``model.safetensors.index.json``."""
    if first_shard_ends is None:
        _save(root / "model.safetensors", tensors)
        return
    names = list(tensors)
    cut = names.index(first_shard_ends) + 1
    weight_map = {}
    for i, group in enumerate((names[:cut], names[cut:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        _save(root / fname, {k: tensors[k] for k in group})
        weight_map.update(dict.fromkeys(group, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _json(
        root / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _finish(
    model: QuantModel,
    config: dict[str, Any],
    tensors: dict[str, Any],
    first_shard_ends: str | None = None,
) -> QuantModel:
    """Write the folder, then fill the oracle from what was written."""
    root = model.path
    root.mkdir(parents=True, exist_ok=True)
    _write_weights(root, tensors, first_shard_ends)
    _json(root / "config.json", config)
    _json(
        root / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": config.get("bos_token_id", 1),
            "eos_token_id": config.get("eos_token_id", 2),
            "transformers_version": config.get("transformers_version", "4.46.0"),
        },
    )
    ckpt = Checkpoint(root)
    model.files = dict(ckpt.files)
    missing = set(model.state) - set(ckpt.files)
    assert not missing, f"state names not written: {sorted(missing)}"
    assert set(model.state.values()) <= set(ROLES)
    model.plain = {k: ckpt[k] for k in ckpt if k not in model.state}
    model.dequantized = {k: dequantize_folder(root, k) for k in model.original}
    return model


def _seeded(seed: int) -> Any:
    return _torch().Generator().manual_seed(seed)


def _weight(g: Any, out: int, inp: int, std: float = 0.02) -> Any:
    """A Linear weight with a few outliers, so scales differ from block to block."""
    torch = _torch()
    w = torch.randn(out, inp, generator=g) * std
    hot = torch.randint(0, out * inp, (max(1, out * inp // 2000),), generator=g)
    w.view(-1)[hot] *= 8
    return w


def _norm(g: Any, n: int) -> Any:
    torch = _torch()
    return 1.0 + 0.1 * torch.randn(n, generator=g)


@dataclass
class _Llama:
    """A tiny Llama: sizes, and the config a transformers Llama would write."""

    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Decoder Linear prefixes -> (out, in), in module order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, int]] = {}
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out[f"{p}.self_attn.q_proj"] = (h, h)
            out[f"{p}.self_attn.k_proj"] = (kv, h)
            out[f"{p}.self_attn.v_proj"] = (kv, h)
            out[f"{p}.self_attn.o_proj"] = (h, h)
            out[f"{p}.mlp.gate_proj"] = (self.intermediate, h)
            out[f"{p}.mlp.up_proj"] = (self.intermediate, h)
            out[f"{p}.mlp.down_proj"] = (h, self.intermediate)
        return out

    def config(self, dtype: str, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": self.bias,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 256,
            "mlp_bias": self.bias,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "quantization_config": quantization_config,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "transformers_version": "4.46.0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }

    def build(
        self,
        g: Any,
        dtype: Any,
        quantize: Callable[[str, Any, Any], dict[str, tuple[Any, str]]],
        model: QuantModel,
    ) -> dict[str, Any]:
        """State-dict-ordered tensors: plain ones in ``dtype``; for each decoder Linear,
        ``quantize(prefix, W_fp32, bias)`` returns name -> (tensor, role or "" for plain).
        Records the roles and the originals on ``model``."""
        torch = _torch()
        linears = self.linears()
        tensors: dict[str, Any] = {
            "model.embed_tokens.weight": (torch.randn(self.vocab, self.hidden, generator=g) * 0.02)
        }
        for i in range(self.layers):
            p = f"model.layers.{i}"
            for x, (o, n) in linears.items():
                if not x.startswith(f"{p}."):
                    continue
                w = _weight(g, o, n)
                bias = (torch.randn(o, generator=g) * 0.01) if self.bias else None
                for name, (t, role) in quantize(x, w, bias).items():
                    tensors[name] = t
                    if role:
                        model.state[name] = role
            tensors[f"{p}.input_layernorm.weight"] = _norm(g, self.hidden)
            tensors[f"{p}.post_attention_layernorm.weight"] = _norm(g, self.hidden)
        tensors["model.norm.weight"] = _norm(g, self.hidden)
        tensors["lm_head.weight"] = torch.randn(self.vocab, self.hidden, generator=g) * 0.02
        for name, t in tensors.items():
            if name not in model.state and t.is_floating_point() and t.dtype == torch.float32:
                tensors[name] = t.to(dtype)
        return tensors


def _model_dtype(w: Any, dtype: Any) -> Any:
    """The weight as the producer saw it: the checkpoint's dtype, computed on in fp32."""
    return w.to(dtype).float()


def _to_int32(x: Any) -> Any:
    """int64 words (0 .. 2**32 - 1) -> the int32 with the same bits."""
    torch = _torch()
    return (((x + 2**31) % 2**32) - 2**31).to(torch.int32)


def _pack_rows(values: Any, bits: int) -> Any:
    """``[n, m]`` small ints -> ``[n * bits / 32, m]`` int32, consecutive rows, low bits first."""
    torch = _torch()
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per, per, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def _pack_cols(values: Any, bits: int, order: Iterable[int] | None = None) -> Any:
    """``[n, m]`` small ints -> ``[n, m * bits / 32]`` int32, consecutive columns in
    ``order`` (word position k holds column ``order[k]``), low bits first."""
    torch = _torch()
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], values.shape[1] // per, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return _to_int32((v << shifts).sum(dim=-1))


# --- fp8 ------------------------------------------------------------------------------------


def _fp8(x: Any) -> Any:
    torch = _torch()
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(w: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 block fp8 (and ``fastcast --quantize``): per block of the valid region
    of ``w`` (``[rows, cols]``, edge blocks cut), in fp32, ``s = amax.clamp(min=1e-12) /
    448``, ``q = clamp(W / s, -448, 448)`` rounded to e4m3. A per-row scale is the block
    ``(1, cols)``. Returns ``(q, s)``, ``s`` ``[ceil(rows / b0), ceil(cols / b1)]`` fp32.

    >>> q, s = quantize_fp8(w, (1, w.shape[1]))  # compressed-tensors' FP8_DYNAMIC rows
    """
    torch = _torch()
    w = w.float()
    rows, cols = w.shape
    b0, b1 = block
    grid = (-(-rows // b0), -(-cols // b1))
    scale = torch.empty(grid, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            r = slice(bi * b0, (bi + 1) * b0)
            c = slice(bj * b1, (bj + 1) * b1)
            s = w[r, c].abs().amax().clamp(min=1e-12) / E4M3_MAX
            scale[bi, bj] = s
            q[r, c] = _fp8(w[r, c] / s)
    return q, scale


def deepseek_fp8(tmp: Path) -> QuantModel:
    """deepseek-ai/DeepSeek-V3 (and R1): block fp8, ``weight_scale_inv`` per 128 x 128 block.

    Two layers (dense MLP, then MoE with two routed experts and a shared one), the real MLA
    projections: ``kv_a_proj_with_mqa`` [576, 192] (grid [5, 2], partial last row and column
    of blocks), ``kv_b_proj`` [128, 512] (whole blocks, one all zero). Router ``mlp.gate``,
    norms, embeddings and lm_head bf16; ``e_score_correction_bias`` fp32. Two shards, the
    first ending after ``model.layers.0.self_attn.kv_a_proj_with_mqa.weight``, so its
    ``weight_scale_inv`` opens the second.
    """
    torch = _torch()
    g = _seeded(61)
    hidden, vocab, heads, q_lora, kv_lora = 192, 64, 2, 96, 512
    nope, rope, v_dim, inter, moe_inter, experts = 32, 64, 32, 160, 64, 2
    root = tmp / "DeepSeek-V3-tiny"
    model = QuantModel("deepseek-fp8", root, "fp8", "block 128x128", "bfloat16")
    bf16 = torch.bfloat16
    tensors: dict[str, Any] = {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(bf16)
    }

    def linear(x: str, out: int, inp: int) -> None:
        w = _model_dtype(_weight(g, out, inp), bf16)
        if x == "model.layers.0.self_attn.kv_b_proj":
            w[:128, 384:512] = 0  # a pruned block: its scale is the clamped one
        q, s = quantize_fp8(w)
        tensors[f"{x}.weight"] = q
        tensors[f"{x}.weight_scale_inv"] = s
        model.state[f"{x}.weight"] = "quantized weight"
        model.state[f"{x}.weight_scale_inv"] = "scale"
        model.original[f"{x}.weight"] = w

    for i in range(2):
        p = f"model.layers.{i}"
        linear(f"{p}.self_attn.q_a_proj", q_lora, hidden)
        tensors[f"{p}.self_attn.q_a_layernorm.weight"] = _norm(g, q_lora).to(bf16)
        linear(f"{p}.self_attn.q_b_proj", heads * (nope + rope), q_lora)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", kv_lora + rope, hidden)
        tensors[f"{p}.self_attn.kv_a_layernorm.weight"] = _norm(g, kv_lora).to(bf16)
        linear(f"{p}.self_attn.kv_b_proj", heads * (nope + v_dim), kv_lora)
        linear(f"{p}.self_attn.o_proj", hidden, heads * v_dim)
        if i == 0:
            linear(f"{p}.mlp.gate_proj", inter, hidden)
            linear(f"{p}.mlp.up_proj", inter, hidden)
            linear(f"{p}.mlp.down_proj", hidden, inter)
        else:
            gate = torch.randn(experts, hidden, generator=g) * 0.02
            tensors[f"{p}.mlp.gate.weight"] = gate.to(bf16)
            bias = torch.randn(experts, generator=g) * 0.1
            tensors[f"{p}.mlp.gate.e_score_correction_bias"] = bias
            model.state[f"{p}.mlp.gate.e_score_correction_bias"] = "pinned fp32"
            for e in [*(f"experts.{k}" for k in range(experts)), "shared_experts"]:
                linear(f"{p}.mlp.{e}.gate_proj", moe_inter, hidden)
                linear(f"{p}.mlp.{e}.up_proj", moe_inter, hidden)
                linear(f"{p}.mlp.{e}.down_proj", hidden, moe_inter)
        tensors[f"{p}.input_layernorm.weight"] = _norm(g, hidden).to(bf16)
        tensors[f"{p}.post_attention_layernorm.weight"] = _norm(g, hidden).to(bf16)
    tensors["model.norm.weight"] = _norm(g, hidden).to(bf16)
    tensors["lm_head.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).to(bf16)
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "kv_lora_rank": kv_lora,
        "max_position_embeddings": 256,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": moe_inter,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 2,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": q_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": v_dim,
        "vocab_size": vocab,
    }
    return _finish(
        model,
        config,
        tensors,
        first_shard_ends="model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
    )


def ct_fp8(tmp: Path, strategy: str) -> QuantModel:
    """An llm-compressor FP8 checkpoint (compressed-tensors ``float-quantized``), e.g.
    RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8 (``strategy="tensor"``, preset ``FP8``: static
    per-tensor input scales) or RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8-dynamic
    (``strategy="channel"``, preset ``FP8_DYNAMIC``).

    compressed-tensors itself builds the scheme, the scales (``calculate_qparams`` on the
    observer's min/max, in bf16 as its observers work in the weight's dtype), the fp8
    weights (``FloatQuantizationCompressor.compress``) and the config (``ModelCompressor.
    update_config``). Scales are bf16 ``[1]`` or ``[out, 1]``; ``lm_head`` is ignored.
    """
    torch = _torch()
    ct = require("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    preset = {"tensor": "FP8", "channel": "FP8_DYNAMIC"}[strategy]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    g = _seeded({"tensor": 11, "channel": 12}[strategy])
    llama = _Llama()
    bf16 = torch.bfloat16
    suffix = {"tensor": "FP8", "channel": "FP8-dynamic"}[strategy]
    root = tmp / f"Llama-tiny-{suffix}"
    words = {"tensor": "per-tensor static", "channel": "per-channel"}[strategy]
    model = QuantModel(f"ct-fp8-{strategy}", root, "compressed-tensors", words, "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(bf16)
        if strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        scale, _ = calculate_qparams(lo, hi, scheme.weights)
        packed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        model.original[f"{x}.weight"] = w.float()
        out = {
            f"{x}.weight": (packed["weight"], "quantized weight"),
            f"{x}.weight_scale": (packed["weight_scale"], "scale"),
        }
        if strategy == "tensor":
            # static_minmax over a calibration batch of this layer's inputs
            acts = (torch.randn(16, w.shape[1], generator=g) * 3).to(bf16)
            lo, hi = acts.amin().reshape(1), acts.amax().reshape(1)
            input_scale, _ = calculate_qparams(lo, hi, scheme.input_activations)
            out[f"{x}.input_scale"] = (input_scale, "scale")
        return out

    tensors = llama.build(g, bf16, quantize, model)
    config = ct_config(root, llama, {"group_0": scheme}, "float-quantized")
    assert config["quantization_config"]["version"] == ct.__version__
    return _finish(model, config, tensors)


def ct_config(root: Path, llama: _Llama, groups: dict[str, Any], fmt: str) -> dict[str, Any]:
    """config.json with compressed-tensors' own ``quantization_config`` for these scheme
    groups in format ``fmt`` (``ModelCompressor.update_config``; ``lm_head`` ignored)."""
    require("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(
        config_groups=groups,
        quant_method="compressed-tensors",
        format=fmt,
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    config = llama.config("bfloat16", {})
    del config["quantization_config"]
    root.mkdir(parents=True, exist_ok=True)
    _json(root / "config.json", config)
    ModelCompressor(quantization_config=qc).update_config(str(root))
    return json.loads((root / "config.json").read_text())


def ct_fp8_tensor(tmp: Path) -> QuantModel:
    """compressed-tensors preset FP8: per-tensor weight scales, static input scales."""
    return ct_fp8(tmp, "tensor")


def ct_fp8_channel(tmp: Path) -> QuantModel:
    """compressed-tensors preset FP8_DYNAMIC: per-channel weight scales, dynamic inputs."""
    return ct_fp8(tmp, "channel")


def fbgemm_fp8(tmp: Path) -> QuantModel:
    """meta-llama/Llama-3.1-405B-Instruct-FP8 (transformers ``fbgemm_fp8``): row-wise fp8,
    ``weight_scale`` fp32 ``[out, 1]`` = ``max(row_amax / 448, 1 / (448 * 512))``. One row of
    ``model.layers.0.self_attn.q_proj`` is all zero, so its scale is the floor. The config is
    transformers' ``FbgemmFp8Config.to_dict()``.
    """
    torch = _torch()
    transformers = require("transformers")
    g = _seeded(405)
    llama = _Llama()
    root = tmp / "Llama-tiny-Instruct-FP8"
    model = QuantModel("fbgemm-fp8", root, "fbgemm_fp8", "per-row", "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = _model_dtype(w, torch.bfloat16)
        if x == "model.layers.0.self_attn.q_proj":
            w[5] = 0
        model.original[f"{x}.weight"] = w
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = torch.clamp(amax / E4M3_MAX, min=FBGEMM_MIN_SCALE)
        return {
            f"{x}.weight": (_fp8(w / scale), "quantized weight"),
            f"{x}.weight_scale": (scale, "scale"),
        }

    tensors = llama.build(g, torch.bfloat16, quantize, model)
    qc = transformers.FbgemmFp8Config(
        activation_scale_ub=1200.0, modules_to_not_convert=["lm_head"]
    ).to_dict()
    return _finish(model, llama.config("bfloat16", qc), tensors)


def vllm_fp8_static(tmp: Path) -> QuantModel:
    """An AutoFP8 checkpoint as vLLM reads it (neuralmagic/Meta-Llama-3-8B-Instruct-FP8):
    ``quant_method: fp8``, ``activation_scheme: static``, no block size; per-tensor
    ``weight_scale`` and ``input_scale``, both fp32 scalars (shape ``[]``).
    """
    torch = _torch()
    g = _seeded(8)
    llama = _Llama()
    root = tmp / "Llama-tiny-Instruct-FP8-static"
    model = QuantModel("vllm-fp8-static", root, "fp8", "per-tensor static", "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = _model_dtype(w, torch.bfloat16)
        model.original[f"{x}.weight"] = w
        scale = (w.abs().amax() / E4M3_MAX).reshape(())
        acts = torch.randn(16, w.shape[1], generator=g) * 3
        input_scale = (acts.abs().amax() / E4M3_MAX).reshape(())
        return {
            f"{x}.weight": (_fp8(w / scale), "quantized weight"),
            f"{x}.weight_scale": (scale, "scale"),
            f"{x}.input_scale": (input_scale, "scale"),
        }

    tensors = llama.build(g, torch.bfloat16, quantize, model)
    qc = {"activation_scheme": "static", "ignored_layers": ["lm_head"], "quant_method": "fp8"}
    return _finish(model, llama.config("bfloat16", qc), tensors)


# --- bitsandbytes ---------------------------------------------------------------------------


def _bnb_llama() -> _Llama:
    """72 wide: k_proj holds 2592 elements (40.5 blocks of 64), gate_proj 16704 (261 blocks,
    so double quant has a second, partial, group of 256)."""
    return _Llama(hidden=72, intermediate=232, heads=4, kv_heads=2)


def bnb_4bit(tmp: Path, quant_type: str, double_quant: bool, storage: str) -> QuantModel:
    """A QLoRA-style checkpoint saved by transformers + bitsandbytes (e.g.
    unsloth/llama-3-8b-bnb-4bit): ``bitsandbytes.functional.quantize_4bit`` on the bf16
    weights, saved as ``Linear4bit._save_to_state_dict`` does (``x.weight`` packed, then
    ``x.weight.`` + each key of ``QuantState.as_dict(packed=True)``). Config from
    transformers' ``BitsAndBytesConfig.to_dict()``. With double quant the folder has two
    shards, the first ending after ``model.layers.0.self_attn.q_proj.weight``, so its
    ``absmax`` and quant state open the second.
    """
    torch = _torch()
    transformers = require("transformers")
    functional = require("bitsandbytes.functional")
    g = _seeded(4 if quant_type == "nf4" else 5)
    llama = _bnb_llama()
    bf16 = torch.bfloat16
    quant_storage = getattr(torch, storage)
    name = f"bnb-{quant_type}" + ("-dq" if double_quant else "")
    if storage != "uint8":
        name = f"bnb-{quant_type}-{'bf16' if storage == 'bfloat16' else storage}-storage"
    root = tmp / f"llama-tiny-{name}"
    scheme = f"{quant_type}" + (" double quant" if double_quant else "")
    if storage != "uint8":
        scheme += f" {storage} storage"
    model = QuantModel(name, root, "bitsandbytes", scheme, "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(bf16)
        model.original[f"{x}.weight"] = w.float()
        packed, qs = functional.quantize_4bit(
            w,
            quant_type=quant_type,
            compress_statistics=double_quant,
            quant_storage=quant_storage,
        )
        out = {f"{x}.weight": (packed, "quantized weight")}
        for k, v in qs.as_dict(packed=True).items():
            role = "scale" if k in ("absmax", "nested_absmax") else "quant state"
            out[f"{x}.weight.{k}"] = (v, role)
        return out

    tensors = llama.build(g, bf16, quantize, model)
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=bf16,
        bnb_4bit_quant_storage=quant_storage,
    ).to_dict()
    split = "model.layers.0.self_attn.q_proj.weight" if double_quant else None
    return _finish(model, llama.config("bfloat16", qc), tensors, first_shard_ends=split)


def bnb_nf4_dq(tmp: Path) -> QuantModel:
    """nf4, double quant, uint8 storage (transformers' usual 4-bit save)."""
    return bnb_4bit(tmp, "nf4", True, "uint8")


def bnb_fp4(tmp: Path) -> QuantModel:
    """fp4, fp32 absmax (no double quant), uint8 storage."""
    return bnb_4bit(tmp, "fp4", False, "uint8")


def bnb_nf4_bf16_storage(tmp: Path) -> QuantModel:
    """nf4, double quant, packed into bf16 storage (FSDP-QLoRA): the weight is BF16 but
    holds nibbles, so a cast destroys it."""
    return bnb_4bit(tmp, "nf4", True, "bfloat16")


def bnb_8bit(tmp: Path) -> QuantModel:
    """An LLM.int8 checkpoint saved by transformers + bitsandbytes (``load_in_8bit``):
    ``int8_vectorwise_quant`` of the weight (in fp16, as ``Int8Params`` quantizes), saved as
    ``Linear8bitLt._save_to_state_dict`` does: ``x.weight`` I8, ``x.SCB`` F32 row absmax,
    ``x.weight_format`` U8 scalar 0.
    """
    torch = _torch()
    transformers = require("transformers")
    functional = require("bitsandbytes.functional")
    g = _seeded(127)
    llama = _bnb_llama()
    root = tmp / "llama-tiny-bnb-8bit"
    model = QuantModel("bnb-int8", root, "bitsandbytes", "int8", "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(torch.bfloat16)
        model.original[f"{x}.weight"] = w.float()
        cb, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16))
        return {
            f"{x}.weight": (cb, "quantized weight"),
            f"{x}.SCB": (scb, "scale"),
            f"{x}.weight_format": (torch.tensor(0, dtype=torch.uint8), "quant state"),
        }

    tensors = llama.build(g, torch.bfloat16, quantize, model)
    qc = transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict()
    return _finish(model, llama.config("bfloat16", qc), tensors)


# --- GPTQ and AWQ ---------------------------------------------------------------------------


def gptq(tmp: Path, version: str, desc_act: bool) -> QuantModel:
    """A 4-bit, group 32, symmetric GPTQ checkpoint as AutoGPTQ packs it
    (``qlinear_exllama.pack``), e.g. TheBloke/Llama-2-7B-GPTQ; ``version="gptq_v2"`` is
    GPTQModel's ``checkpoint_format: gptq_v2`` (zeros stored as is, not minus one).

    Round to nearest instead of GPTQ's Hessian updates; packing is AutoGPTQ's:
    ``intweight = round((W + zeros * scales) / scales)`` clamped to [0, 15], with the fp16
    scales. 80 and 232 inputs make last groups of 16 and 8; ``desc_act`` permutes which
    inputs form each group (``g_idx = invperm // 32``). fp16 model, decoder Linears with
    biases; embeddings, norms and lm_head fp16. With ``desc_act`` the folder has two
    shards, split between ``model.layers.0.self_attn.q_proj.qweight`` and its ``qzeros``.
    """
    torch = _torch()
    bits, group = 4, 32
    g = _seeded(32 + desc_act + 2 * (version == "gptq_v2"))
    llama = _Llama(hidden=80, intermediate=232, heads=4, kv_heads=2, bias=True)
    f16 = torch.float16
    name = "gptq-v2" if version == "gptq_v2" else "gptq-v1" + ("-desc-act" if desc_act else "")
    root = tmp / f"Llama-tiny-{name}"
    v = "v2" if version == "gptq_v2" else "v1"
    scheme = f"gptq {v} 4-bit g32" + (" desc_act" if desc_act else "")
    model = QuantModel(name, root, "gptq", scheme, "float16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = _model_dtype(w, f16)
        out_f, in_f = w.shape
        if desc_act:
            perm = torch.randperm(in_f, generator=g)
            g_idx = torch.argsort(perm) // group
        else:
            g_idx = torch.arange(in_f) // group
        groups = -(-in_f // group)
        xmax = torch.stack([w[:, g_idx == k].abs().amax(dim=1) for k in range(groups)])
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scales = (2 * xmax / (2**bits - 1)).to(f16)  # [groups, out]
        zeros = torch.full((groups, out_f), 2 ** (bits - 1), dtype=torch.int64)
        s = scales.float()[g_idx]  # [in, out]
        intweight = torch.round((w.t() + zeros[g_idx] * s) / s).clamp(0, 2**bits - 1)
        stored = zeros - 1 if version == "gptq" else zeros
        model.original[f"{x}.weight"] = w
        return {
            f"{x}.qweight": (_pack_rows(intweight.long(), bits), "quantized weight"),
            f"{x}.qzeros": (_pack_cols(stored, bits), "zero point"),
            f"{x}.scales": (scales, "scale"),
            f"{x}.g_idx": (g_idx.to(torch.int32), "group index"),
            f"{x}.bias": (bias.to(f16), ""),
        }

    tensors = llama.build(g, f16, quantize, model)
    qc: dict[str, Any] = {
        "bits": bits,
        "checkpoint_format": version,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "group_size": group,
        "model_file_base_name": None,
        "model_name_or_path": None,
        "quant_method": "gptq",
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
    }
    if version == "gptq_v2":
        qc["meta"] = {
            "quantizer": ["gptqmodel:2.2.0"],
            "uri": "https://github.com/modelcloud/gptqmodel",
        }
        qc["pack_dtype"] = "int32"
    split = "model.layers.0.self_attn.q_proj.qweight" if desc_act else None
    return _finish(model, llama.config("float16", qc), tensors, first_shard_ends=split)


def gptq_v1(tmp: Path) -> QuantModel:
    """GPTQ v1 (AutoGPTQ, ``checkpoint_format: gptq``), inputs in order."""
    return gptq(tmp, "gptq", False)


def gptq_v1_desc_act(tmp: Path) -> QuantModel:
    """GPTQ v1 with ``desc_act``: permuted ``g_idx``."""
    return gptq(tmp, "gptq", True)


def gptq_v2(tmp: Path) -> QuantModel:
    """GPTQModel ``checkpoint_format: gptq_v2``: zeros without the minus one."""
    return gptq(tmp, "gptq_v2", False)


def awq(tmp: Path) -> QuantModel:
    """An AutoAWQ GEMM checkpoint (e.g. TheBloke/Llama-2-7B-AWQ, hugging-quants/
    Meta-Llama-3.1-8B-Instruct-AWQ-INT4): 4-bit, group 32, zero point, packed along the
    output with order ``[0, 2, 4, 6, 1, 3, 5, 7]`` as ``WQLinear_GEMM.from_linear`` does;
    fp16 scales and biases. Round to nearest as ``pseudo_quantize_tensor`` does (without
    the activation-aware search). In ``model.layers.0.mlp.gate_proj`` the first input group
    spans [0, max] and the second [min, 0]: zero points 0 and 15.
    """
    torch = _torch()
    bits, group = 4, 32
    g = _seeded(44)
    llama = _Llama(bias=True)
    f16 = torch.float16
    root = tmp / "Llama-tiny-AWQ"
    model = QuantModel("awq", root, "awq", "awq gemm 4-bit g32 zero point", "float16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = _model_dtype(w, f16)
        if x == "model.layers.0.mlp.gate_proj":
            # a group in [0, max] and one in [min, 0]: zero points 0 and 15, no clipping
            w[:, :group] = w[:, :group].abs()
            w[:, group : 2 * group] = -w[:, group : 2 * group].abs()
            w[:, [0, group]] = 0
        out_f, in_f = w.shape
        grouped = w.reshape(out_f, in_f // group, group)
        hi, lo = grouped.amax(dim=2), grouped.amin(dim=2)  # [out, groups]
        scales = ((hi - lo).clamp(min=1e-5) / (2**bits - 1)).t().contiguous()  # [groups, out]
        zeros = (-torch.round(lo.t() / scales)).clamp(0, 2**bits - 1)
        scales = scales.to(f16)
        gi = torch.arange(in_f) // group
        s = scales.float()[gi]  # [in, out]
        intweight = torch.round((w.t() + zeros[gi] * s) / s).clamp(0, 2**bits - 1)
        model.original[f"{x}.weight"] = w
        return {
            f"{x}.qweight": (_pack_cols(intweight.long(), bits, AWQ_ORDER), "quantized weight"),
            f"{x}.qzeros": (_pack_cols(zeros.long(), bits, AWQ_ORDER), "zero point"),
            f"{x}.scales": (scales, "scale"),
            f"{x}.bias": (bias.to(f16), ""),
        }

    tensors = llama.build(g, f16, quantize, model)
    qc = {
        "bits": bits,
        "group_size": group,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    return _finish(model, llama.config("float16", qc), tensors)


ALL: dict[str, Callable[[Path], QuantModel]] = {
    "deepseek-fp8": deepseek_fp8,
    "ct-fp8-tensor": ct_fp8_tensor,
    "ct-fp8-channel": ct_fp8_channel,
    "fbgemm-fp8": fbgemm_fp8,
    "vllm-fp8-static": vllm_fp8_static,
    "bnb-nf4-dq": bnb_nf4_dq,
    "bnb-fp4": bnb_fp4,
    "bnb-nf4-bf16-storage": bnb_nf4_bf16_storage,
    "bnb-int8": bnb_8bit,
    "gptq-v1": gptq_v1,
    "gptq-v1-desc-act": gptq_v1_desc_act,
    "gptq-v2": gptq_v2,
    "awq": awq,
}
"""Every quantized layout, one builder per case: every quantization-aware command runs
against each."""


def with_path(model: QuantModel, path: Path) -> QuantModel:
    """The same model read from another folder (a converter's output)."""
    return dataclasses.replace(model, path=path)
