"""Write a synthetic Hugging Face style checkpoint, streaming (never in RAM).

    python3 benches/make_model.py OUT [--arch llama|mixtral|gpt-oss] [--size 200MB]
        [--dtype fp32|bf16|fp16|fp8|mxfp4|nvfp4|w4a16|gptq|awq] [--shard-size 2GB] [--seed 0]

``--dtype fp8`` writes a DeepSeek-style block-fp8 checkpoint: every decoder Linear
weight in e4m3 with an F32 ``weight_scale_inv`` per 128x128 block right after it,
embeddings, norms and the output head in bf16, and the ``fp8`` quantization_config
with ``weight_block_size`` (what ``fastcast convert --dequantize`` reads).
``--arch gpt-oss --dtype mxfp4`` writes gpt-oss as transformers stores it (the
20b's hidden, intermediate, experts and attention; a 32k vocabulary): stacked
experts as U8 ``*_blocks`` and E8M0 ``*_scales``, the rest bf16, ``quant_method:
mxfp4``. ``--dtype nvfp4`` writes a compressed-tensors NVFP4A16 Llama: each decoder
Linear as U8 ``weight_packed``, F8_E4M3 ``weight_scale`` per 16 and an F32
``weight_global_scale``. ``--dtype w4a16`` writes a compressed-tensors W4A16 Llama
(``pack-quantized``): each decoder Linear as I32 ``weight_packed`` (eight 4-bit codes a
word), a bf16 ``weight_scale`` per 128 inputs and its I64 ``weight_shape``.
``--dtype gptq`` and ``--dtype awq`` write 4-bit group-128 fp16 Llamas as AutoGPTQ
(``qweight`` ``[in/8, out]``, ``qzeros``, ``scales``, ``g_idx``, ``checkpoint_format:
gptq``) and AutoAWQ GEMM (``qweight`` ``[in, out/8]``) pack them: random codes, every
stored zero point 7 (AutoGPTQ's symmetric 8, minus its one), fp16 scales.
``--dtype bnb-nf4`` writes a bitsandbytes nf4 double-quant bf16 Llama as transformers
saves one: each decoder Linear as U8 ``weight`` (two codes a byte), U8 ``absmax`` per 64
with its F32 ``nested_absmax`` per 256 and the two code tables, and the quant state's
JSON (bitsandbytes' own tables and layout).

Llama- or Mixtral-shaped tensors (names and shapes as transformers saves them,
tied embeddings for llama), a config.json claiming the dtype, a
generation_config.json, a tokenizer_config.json and a sentence-transformers
``1_Pooling/config.json`` (a copied subfolder), shards packed like
``save_pretrained`` plus ``model.safetensors.index.json``. Values are normal
with std 0.02 (norm weights 1.0), written in 8 MiB blocks, so a 100 GB model
takes 8 MiB of memory. Used by README's example and by the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

import fastcast
from fastcast._dtypes import torch_name
from fastcast._plan.shards import pack, shard_names
from fastcast._units import parse_size

BLOCK = 8 << 20
NP_BITS = {
    "F32": np.uint32, "BF16": np.uint16, "F16": np.uint16, "F8_E4M3": np.uint8, "U8": np.uint8,
    "I32": np.uint32,
}  # fmt: skip
#: W4A16 checkpoints: inputs per scale, as compressed-tensors' preset has it.
W4A16_GROUP = 128
#: Tensors whose values are their meaning rather than filler (W4A16's ``weight_shape``).
SHAPES: dict[str, np.ndarray] = {}
#: gpt-oss-20b's sizes (``ModelConfig``): hidden, intermediate, experts, heads.
GPT_OSS = {"hidden": 2880, "intermediate": 2880, "experts": 32, "heads": 64, "kv_heads": 8,
           "head_dim": 64, "vocab": 32000}  # fmt: skip
#: Block-fp8 checkpoints: quantized Linears in blocks of this many rows and columns.
FP8_BLOCK = 128
#: GPTQ and AWQ checkpoints: inputs per scale.
INT4_GROUP = 128
#: The methods whose checkpoints hold packed 4-bit codes.
QUANTIZED = ("mxfp4", "nvfp4", "w4a16", "gptq", "awq", "bnb-nf4")


def llama_tensors(
    h: int, inter: int, vocab: int, layers: int, experts: int
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in state_dict order."""
    kv = h // 4  # grouped-query attention: 4 query heads per kv head
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
        ]
        if experts:
            out.append((p + "block_sparse_moe.gate.weight", (experts, h)))
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out += [
                    (q + "w1.weight", (inter, h)),
                    (q + "w2.weight", (h, inter)),
                    (q + "w3.weight", (inter, h)),
                ]
        else:
            out += [
                (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
            ]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if experts:  # Mixtral does not tie its output embedding
        out.append(("lm_head.weight", (vocab, h)))
    return out


def gpt_oss_specs(layers: int) -> list[Spec]:
    """gpt-oss as transformers stores it, MXFP4 experts: (name, shape, bytes, dtype)."""
    g = GPT_OSS
    h, inter, e, v = g["hidden"], g["intermediate"], g["experts"], g["vocab"]
    q, kv = g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"]

    def bf16(name: str, *shape: int) -> Spec:
        return Spec(name, shape, 2 * int(np.prod(shape)), "BF16")

    out = [bf16("model.embed_tokens.weight", v, h)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [bf16(p + "input_layernorm.weight", h)]
        for proj, (o, n) in {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}.items():
            out += [bf16(f"{p}self_attn.{proj}_proj.weight", o, n),
                    bf16(f"{p}self_attn.{proj}_proj.bias", o)]  # fmt: skip
        out += [bf16(p + "self_attn.sinks", g["heads"]), bf16(p + "mlp.router.weight", e, h),
                bf16(p + "mlp.router.bias", e)]  # fmt: skip
        for proj, (o, n) in {"gate_up_proj": (2 * inter, h), "down_proj": (h, inter)}.items():
            x = f"{p}mlp.experts.{proj}"
            out += [
                Spec(x + "_blocks", (e, o, n // 32, 16), e * o * n // 2, "U8"),
                Spec(x + "_scales", (e, o, n // 32), e * o * n // 32, "U8"),
                bf16(x + "_bias", e, o),
            ]
        out += [bf16(p + "post_attention_layernorm.weight", h)]
    return [*out, bf16("model.norm.weight", h), bf16("lm_head.weight", v, h)]


def gpt_oss_layers(size: int) -> int:
    """Layers of gpt-oss whose tensors add up to about ``size`` bytes."""
    one, two = (sum(s.nbytes for s in gpt_oss_specs(n)) for n in (1, 2))
    return max(1, round((size - (2 * one - two)) / (two - one)))


def nvfp4_specs(tensors: list[tuple[str, tuple[int, ...]]]) -> list[Spec]:
    """compressed-tensors NVFP4A16: decoder Linears packed, the rest bf16."""
    out = []
    for name, shape in tensors:
        if ".layers." in name and len(shape) == 2 and not name.endswith("gate.weight"):
            x = name.removesuffix(".weight")
            rows, cols = shape
            out += [
                Spec(x + ".weight_packed", (rows, cols // 2), rows * cols // 2, "U8"),
                Spec(x + ".weight_scale", (rows, cols // 16), rows * cols // 16, "F8_E4M3"),
                Spec(x + ".weight_global_scale", (1,), 4, "F32"),
            ]
        else:
            out.append(Spec(name, shape, 2 * int(np.prod(shape)), "BF16"))
    return out


def w4a16_specs(tensors: list[tuple[str, tuple[int, ...]]]) -> list[Spec]:
    """compressed-tensors W4A16: decoder Linears packed in int32 words, the rest bf16."""
    out = []
    for name, shape in tensors:
        if ".layers." in name and len(shape) == 2 and not name.endswith("gate.weight"):
            x = name.removesuffix(".weight")
            rows, cols = shape
            groups = cols // W4A16_GROUP
            out += [
                Spec(x + ".weight_packed", (rows, cols // 8), rows * cols // 2, "I32"),
                Spec(x + ".weight_scale", (rows, groups), 2 * rows * groups, "BF16"),
                Spec(x + ".weight_shape", (2,), 16, "I64"),
            ]
            SHAPES[x + ".weight_shape"] = np.array(shape, dtype=np.int64)
        else:
            out.append(Spec(name, shape, 2 * int(np.prod(shape)), "BF16"))
    return out


def int4_specs(tensors: list[tuple[str, tuple[int, ...]]], method: str) -> list[Spec]:
    """GPTQ (AutoGPTQ, ``checkpoint_format: gptq``) or AWQ (AutoAWQ GEMM): decoder Linears
    as I32 ``qweight`` and ``qzeros`` (every zero point 7) and F16 ``scales`` per 128
    inputs (GPTQ: its ``g_idx`` too), the rest fp16."""
    out = []
    for name, shape in tensors:
        if ".layers." in name and len(shape) == 2 and not name.endswith("gate.weight"):
            x = name.removesuffix(".weight")
            rows, cols = shape  # [out, in]
            groups = cols // INT4_GROUP
            packed = (cols // 8, rows) if method == "gptq" else (cols, rows // 8)
            out += [
                Spec(x + ".qweight", packed, rows * cols // 2, "I32"),
                Spec(x + ".qzeros", (groups, rows // 8), groups * rows // 2, "I32"),
                Spec(x + ".scales", (groups, rows), 2 * groups * rows, "F16"),
            ]
            SHAPES[x + ".qzeros"] = np.full(groups * rows // 8, 0x77777777, np.uint32)
            if method == "gptq":
                out.append(Spec(x + ".g_idx", (cols,), 4 * cols, "I32"))
                SHAPES[x + ".g_idx"] = (np.arange(cols) // INT4_GROUP).astype(np.int32)
        else:
            out.append(Spec(name, shape, 2 * int(np.prod(shape)), "F16"))
    return out


def nf4_specs(tensors: list[tuple[str, tuple[int, ...]]]) -> list[Spec]:
    """bitsandbytes nf4 with double quant, as ``Linear4bit`` saves it: decoder Linears as
    packed codes, absmax codes per 64 and their nested F32 absmax per 256, the two tables
    and the quant state (bitsandbytes' own, from a small quantization); the rest bf16."""
    import torch
    from bitsandbytes import functional

    sample = functional.quantize_4bit(torch.ones(64, 256, dtype=torch.bfloat16),
                                      quant_type="nf4", compress_statistics=True)[1]  # fmt: skip
    code, nested_code = sample.code.float().numpy(), sample.state2.code.float().numpy()
    rng = np.random.default_rng(1)
    out = []
    for name, shape in tensors:
        if ".layers." in name and len(shape) == 2 and not name.endswith("gate.weight"):
            n = int(np.prod(shape))
            blocks, nested = n // 64, -(-n // 64 // 256)
            state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
                                "shape": list(shape), "nested_blocksize": 256,
                                "nested_dtype": "float32", "nested_offset": 0.03})  # fmt: skip
            literal = {
                ".absmax": np.frombuffer(
                    rng.integers(0, 256, blocks, np.uint8).tobytes(), np.uint8
                ),
                ".quant_map": code.view(np.uint32),
                ".nested_absmax": rng.uniform(0.05, 0.1, nested).astype(np.float32).view(np.uint32),
                ".nested_quant_map": nested_code.view(np.uint32),
                ".quant_state.bitsandbytes__nf4": np.frombuffer(state.encode(), np.uint8),
            }
            out.append(Spec(name, (n // 2, 1), n // 2, "U8"))
            for suffix, values in literal.items():
                SHAPES[name + suffix] = values
                dtype = "U8" if values.dtype == np.uint8 else "F32"
                out.append(Spec(name + suffix, (len(values),), values.nbytes, dtype))
        else:
            out.append(Spec(name, shape, 2 * int(np.prod(shape)), "BF16"))
    return out


def shapes_for(
    arch: str, size: int, itemsize: int
) -> tuple[dict[str, int], list[tuple[str, tuple[int, ...]]]]:
    """Pick dimensions whose tensors add up to about ``size`` bytes."""
    experts = 8 if arch == "mixtral" else 0
    h = 256
    while True:
        dims = {
            "hidden_size": h,
            "intermediate_size": h * 11 // 4 // 64 * 64 or 64,
            "vocab_size": 32000,
        }
        per_layer = (
            sum(
                np.prod(s)
                for n, s in llama_tensors(h, dims["intermediate_size"], 8, 1, experts)
                if ".layers." in n
            )
            * itemsize
        )
        fixed = (dims["vocab_size"] * h + h) * itemsize
        layers = max(1, round((size - fixed) / per_layer))
        if layers <= 48 or h >= 8192:
            break
        h *= 2
    dims["num_hidden_layers"] = layers
    tensors = llama_tensors(h, dims["intermediate_size"], dims["vocab_size"], layers, experts)
    return dims, tensors


class Spec(NamedTuple):
    """A tensor to write: its name, shape, size and dtype."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    dtype: str


def specs_for(tensors: list[tuple[str, tuple[int, ...]]], dtype: str) -> list[Spec]:
    """The tensors to write; for block fp8, decoder Linears in e4m3, each followed by
    its F32 scale grid, and everything else in bf16."""
    if dtype != "F8_E4M3":
        size = np.dtype(NP_BITS[dtype]).itemsize
        return [Spec(n, s, int(np.prod(s)) * size, dtype) for n, s in tensors]
    out = []
    for name, shape in tensors:
        if ".layers." in name and len(shape) == 2 and not name.endswith("gate.weight"):
            out.append(Spec(name, shape, int(np.prod(shape)), "F8_E4M3"))
            grid = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            out.append(Spec(name + "_scale_inv", grid, 4 * grid[0] * grid[1], "F32"))
        else:
            out.append(Spec(name, shape, 2 * int(np.prod(shape)), "BF16"))
    return out


def write_shard(path: Path, tensors: list[Spec], blocks: dict[str, np.ndarray]) -> None:
    """One shard, streamed: values cycle through ``blocks[dtype]`` (norms are ones)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        pos = 0
        for name, shape, _, dtype in tensors:
            left = int(np.prod(shape))
            if name in SHAPES:
                f.write(SHAPES[name].tobytes())
                continue
            if name.endswith("norm.weight"):
                ones = fastcast.cast_array(np.ones(1, np.float32), dtype).view(NP_BITS[dtype])
                f.write(np.full(left, ones[0], NP_BITS[dtype]).tobytes())
                continue
            block = blocks[block_of(name, dtype, blocks)]
            while left:
                start = pos % len(block)
                take = min(left, len(block) - start)
                f.write(block[start : start + take].tobytes())
                left -= take
                pos += take


def block_of(name: str, dtype: str, blocks: dict[str, np.ndarray]) -> str:
    """Which values a tensor cycles through: its dtype's, or E8M0 exponents for MXFP4
    scales and a plausible global scale for NVFP4's."""
    for suffix, key in (("_scales", "scales"), ("_global_scale", "global")):
        if name.endswith(suffix) and key in blocks:
            return key
    return dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=["llama", "mixtral", "gpt-oss"], default="llama")
    parser.add_argument("--size", default="200MB", help="approximate total tensor bytes")
    parser.add_argument(
        "--dtype",
        default="fp32",
        help="fp32, bf16, fp16, fp8 (block fp8), mxfp4, nvfp4, w4a16, gptq, awq or bnb-nf4",
    )
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quantized = args.dtype if args.dtype in QUANTIZED else None
    if (args.arch == "gpt-oss") != (quantized == "mxfp4"):
        parser.error("gpt-oss is written as MXFP4 (--arch gpt-oss --dtype mxfp4)")
    dtype = "U8" if quantized else fastcast.parse_dtype(args.dtype)
    if dtype not in NP_BITS:
        parser.error(
            "--dtype must be fp32, bf16, fp16, fp8, mxfp4, nvfp4, w4a16, gptq, awq, bnb-nf4"
        )
    itemsize = 1 if quantized else np.dtype(NP_BITS[dtype]).itemsize
    dims, tensors = shapes_for(args.arch, parse_size(args.size), itemsize)
    values = (np.random.default_rng(args.seed).standard_normal(BLOCK // 4) * 0.02).astype(
        np.float32
    )
    blocks = {d: fastcast.cast_array(values, d).view(NP_BITS[d]) for d in ("F32", "BF16", "F16")}
    if dtype == "F8_E4M3":  # codes as a block quantizer leaves them; scales near amax/448
        blocks["F8_E4M3"] = fastcast.cast_array(values * 4480, "fp8_e4m3").view(np.uint8)
        blocks["F32"] = (np.abs(values[:4096]) * 0.01 + 1e-4).view(np.uint32)
    if quantized:  # random codes; E8M0 exponents near 2^-6; E4M3 scales of 1 to 64
        rng = np.random.default_rng(args.seed)
        blocks["U8"] = rng.integers(0, 256, BLOCK, dtype=np.uint8)
        blocks["scales"] = rng.integers(118, 124, 1 << 16, dtype=np.uint8)
        blocks["F8_E4M3"] = fastcast.cast_array(rng.uniform(1, 64, 1 << 16), "fp8_e4m3").view(
            np.uint8
        )
        blocks["global"] = np.full(1, 2688.0 / 0.5, np.float32).view(np.uint32)
        blocks["I32"] = blocks["U8"].view(np.uint32)  # W4A16: any word holds eight codes
    args.out.mkdir(parents=True, exist_ok=True)
    if quantized == "mxfp4":
        specs = gpt_oss_specs(gpt_oss_layers(parse_size(args.size)))
        dims = {"hidden_size": GPT_OSS["hidden"], "intermediate_size": GPT_OSS["intermediate"],
                "vocab_size": GPT_OSS["vocab"],
                "num_hidden_layers": gpt_oss_layers(parse_size(args.size))}  # fmt: skip
    elif quantized == "nvfp4":
        specs = nvfp4_specs(tensors)
    elif quantized == "w4a16":
        specs = w4a16_specs(tensors)
    elif quantized in ("gptq", "awq"):
        specs = int4_specs(tensors, quantized)
    elif quantized == "bnb-nf4":
        specs = nf4_specs(tensors)
    else:
        specs = specs_for(tensors, dtype)
    shards = pack(specs, parse_size(args.shard_size))  # the same rule fastcast uses
    names = shard_names("model", len(shards))
    for name, group in zip(names, shards, strict=True):
        write_shard(args.out / name, group, blocks)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {t.name: n for n, g in zip(names, shards, strict=True) for t in g},
        }
        (args.out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    config = {
        "architectures": [ARCHITECTURES[args.arch]],
        "model_type": args.arch,
        **dims,
        "num_attention_heads": dims["hidden_size"] // 64,
        "num_key_value_heads": dims["hidden_size"] // 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": torch_name(
            "F16"
            if quantized in ("gptq", "awq")
            else dtype
            if dtype in ("F32", "BF16", "F16")
            else "BF16"
        ),
    }
    config |= quantization_config(args.arch, quantized, dims)
    if dtype == "F8_E4M3":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    if args.arch == "mixtral":
        config |= {"num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "generation_config.json").write_text('{\n  "do_sample": false\n}\n')
    (args.out / "tokenizer_config.json").write_text('{\n  "model_max_length": 4096\n}\n')
    # A copied subfolder, as embedding models built on Llama/Mistral have
    # (sentence-transformers' pooling settings): resume and copy paths must handle one.
    (args.out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": dims["hidden_size"], "pooling_mode_lasttoken": True}
    (args.out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    total = sum(s.nbytes for s in specs)
    print(
        f"wrote {args.out}: {args.arch}, {len(specs)} tensors, "
        f"{total / 1e9:.2f} GB {dtype} in {len(shards)} shard(s)"
    )


#: The transformers class of each ``--arch``.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gpt-oss": "GptOssForCausalLM"}  # fmt: skip


def quantization_config(arch: str, quantized: str | None, dims: dict[str, int]) -> dict:
    """The config keys a 4-bit checkpoint adds (gpt-oss's own sizes, the method)."""
    if quantized == "mxfp4":
        g = GPT_OSS
        return {
            "model_type": "gpt_oss", "num_local_experts": g["experts"],
            "num_experts_per_tok": 4, "num_attention_heads": g["heads"],
            "num_key_value_heads": g["kv_heads"], "head_dim": g["head_dim"],
            "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
            "layer_types": [("sliding_attention", "full_attention")[i % 2]
                            for i in range(dims["num_hidden_layers"])],
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router",
                "model.embed_tokens", "lm_head"]},
        }  # fmt: skip
    if quantized == "nvfp4":
        weights = {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "symmetric": True,
            "dynamic": False,
            "scale_dtype": "torch.float8_e4m3fn",
        }
        return {"quantization_config": {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "format": "nvfp4-pack-quantized"}}}}  # fmt: skip
    if quantized == "bnb-nf4":
        return {"quantization_config": {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"}}  # fmt: skip
    if quantized == "gptq":
        return {"quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": INT4_GROUP, "desc_act": False,
            "sym": True, "checkpoint_format": "gptq"}}  # fmt: skip
    if quantized == "awq":
        return {"quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": INT4_GROUP, "zero_point": True,
            "version": "gemm"}}  # fmt: skip
    if quantized == "w4a16":
        weights = {"num_bits": 4, "type": "int", "strategy": "group",
                   "group_size": W4A16_GROUP, "symmetric": True, "dynamic": False}  # fmt: skip
        return {"quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "format": "pack-quantized"}}}}  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
