"""Write a synthetic Hugging Face style checkpoint, streaming (never in RAM).

    python3 benches/make_model.py OUT [--arch llama|mixtral] [--size 200MB]
        [--dtype fp32|bf16|fp16|fp8] [--shard-size 2GB] [--seed 0]

``--dtype fp8`` writes a DeepSeek-style block-fp8 checkpoint: every decoder Linear
weight in e4m3 with an F32 ``weight_scale_inv`` per 128x128 block right after it,
embeddings, norms and the output head in bf16, and the ``fp8`` quantization_config
with ``weight_block_size`` (what ``fastcast convert --dequantize`` reads).

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
NP_BITS = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16, "F8_E4M3": np.uint8}
#: Block-fp8 checkpoints: quantized Linears in blocks of this many rows and columns.
FP8_BLOCK = 128


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
            if name.endswith("norm.weight"):
                ones = fastcast.cast_array(np.ones(1, np.float32), dtype).view(NP_BITS[dtype])
                f.write(np.full(left, ones[0], NP_BITS[dtype]).tobytes())
                continue
            block = blocks[dtype]
            while left:
                start = pos % len(block)
                take = min(left, len(block) - start)
                f.write(block[start : start + take].tobytes())
                left -= take
                pos += take


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=["llama", "mixtral"], default="llama")
    parser.add_argument("--size", default="200MB", help="approximate total tensor bytes")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 or fp8 (block fp8)")
    parser.add_argument("--shard-size", default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = fastcast.parse_dtype(args.dtype)
    if dtype not in NP_BITS:
        parser.error("--dtype must be fp32, bf16, fp16 or fp8")
    itemsize = np.dtype(NP_BITS[dtype]).itemsize
    dims, tensors = shapes_for(args.arch, parse_size(args.size), itemsize)
    values = (np.random.default_rng(args.seed).standard_normal(BLOCK // 4) * 0.02).astype(
        np.float32
    )
    blocks = {d: fastcast.cast_array(values, d).view(NP_BITS[d]) for d in ("F32", "BF16", "F16")}
    if dtype == "F8_E4M3":  # codes as a block quantizer leaves them; scales near amax/448
        blocks["F8_E4M3"] = fastcast.cast_array(values * 4480, "fp8_e4m3").view(np.uint8)
        blocks["F32"] = (np.abs(values[:4096]) * 0.01 + 1e-4).view(np.uint32)
    args.out.mkdir(parents=True, exist_ok=True)
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
        "architectures": ["MixtralForCausalLM" if args.arch == "mixtral" else "LlamaForCausalLM"],
        "model_type": args.arch,
        **dims,
        "num_attention_heads": dims["hidden_size"] // 64,
        "num_key_value_heads": dims["hidden_size"] // 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": torch_name("BF16" if dtype == "F8_E4M3" else dtype),
    }
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


if __name__ == "__main__":
    main()
