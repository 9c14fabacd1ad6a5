"""A zoo of model folders laid out as real repositories are, built by the tests.

Most bugs so far lived in layouts tidy fixtures never had, so each entry copies the
shape of a real repository: a sentence-transformers model (``1_Pooling/``, weights in
``2_Dense/``, ONNX and OpenVINO exports, stale ``.bin``), a Hugging Face cache
(``refs/``, ``snapshots/<sha>/`` links into ``blobs/``, and a user's symlink to the
snapshot), a diffusers pipeline (``model_index.json``, components with their own
configs, sharded and ``.fp16`` variants), a Llama repository (bf16 shards, ``original/``
with ``consolidated.00.pth``, ``onnx/``, old ``.bin`` shards, a variant index naming
shards that are not there), an older Llama that has only ``.bin`` shards (tied
``lm_head``, ``training_args.bin``), a training checkpoint ``.pth`` passed as a file,
a symlinked single file, and a project folder (``.git/``,
``src/``) that someone points ``-o`` at.

Every entry is a :class:`Layout`: the path a user passes to fastcast and what a
correct conversion must contain: the weight sets (by output name, with the tensors
torch would cast), the files copied byte for byte, the files never copied, and the
configs. Tensors are tiny; each entry has one value (7e4) that overflows fp16, so
``--strict`` has something to refuse. Building all of them takes well under a second.

    layout = ZOO["diffusers"](tmp_path)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import require

#: A value bf16 and fp32 hold but fp16 cannot: ``--dtype fp16 --strict`` refuses.
HOT = 7e4


@dataclass
class Layout:
    """A model folder as a user has it, and what its conversion must produce."""

    name: str
    #: The path a user passes to ``fastcast convert`` (a folder, a file, or a link).
    model: Path
    #: Output weight set (``unet/diffusion_pytorch_model``) -> tensor name -> torch tensor.
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Files (relative to the model) that must appear in the output byte for byte.
    copied: set[str] = field(default_factory=set)
    #: Files (relative) that must never appear in the output.
    skipped: set[str] = field(default_factory=set)
    #: config.json files (relative) of transformers models: their dtype is the target's.
    model_configs: set[str] = field(default_factory=set)
    #: config.json files (relative) that are not transformers configs: copied unchanged.
    other_configs: set[str] = field(default_factory=set)
    #: ``--variant`` to pass, if the entry is about converting a variant.
    variant: str | None = None
    #: A target some value of the model overflows (``--strict`` refuses it).
    strict_dtype: str = "fp16"
    #: The default output without its ``-<dtype>`` suffix: relative paths are in the
    #: working directory (None: ``<model>-<dtype>`` beside the input, as usual).
    default_stem: Path | None = None
    #: The Hugging Face cache the model lives in, if it does.
    cache: Path | None = None
    #: A folder that is an output target, not a model (the project folder).
    is_target: bool = False

    @property
    def root(self) -> Path:
        """The folder the layout's relative paths are relative to."""
        return self.model.parent if self.model.is_file() else self.model


def _torch() -> Any:
    return require("torch")


def _save(path: Path, state: dict[str, Any]) -> None:
    st = require("safetensors.torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(state, str(path), metadata={"format": "pt"})


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)


def _json(path: Path, data: object) -> None:
    _write(path, json.dumps(data, indent=2) + "\n")


def _sharded(
    folder: Path, prefix: str, state: dict[str, Any], shards: int, variant: str | None = None
) -> list[str]:
    """Save ``state`` as transformers does: ``prefix[.variant]-0000k-of-0000n.safetensors``
    plus ``prefix.safetensors.index[.variant].json``; returns the file names."""
    names = list(state)
    stem = f"{prefix}.{variant}" if variant else prefix
    files, weight_map = [], {}
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = names[i::shards]
        _save(folder / fname, {k: state[k] for k in group})
        weight_map.update(dict.fromkeys(group, fname))
        files.append(fname)
    index = (
        f"{prefix}.safetensors.index.{variant}.json"
        if variant
        else (f"{prefix}.safetensors.index.json")
    )
    total = sum(t.numel() * t.element_size() for t in state.values())
    _json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, index]


def _layer_state(seed: int, prefix: str, width: int, dtype: Any, n: int = 2) -> dict[str, Any]:
    """Linear weights, norms, a bias, and one tensor holding HOT."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for i in range(n):
        out[f"{prefix}{i}.weight"] = (torch.randn(width, width, generator=g) * 0.05).to(dtype)
        out[f"{prefix}{i}.norm.weight"] = torch.ones(width, dtype=dtype)
        out[f"{prefix}{i}.bias"] = torch.randn(width, generator=g).to(dtype)
    hot = torch.randn(width, generator=g)
    hot[3] = HOT
    out[f"{prefix}hot.weight"] = hot.to(dtype)
    return out


def sentence_transformers(tmp: Path) -> Layout:
    """sentence-transformers/all-MiniLM-L6-v2 as the Hub has it."""
    torch = _torch()
    root = tmp / "all-MiniLM-L6-v2"
    bert = _layer_state(1, "encoder.layer.", 16, torch.float32)
    bert["embeddings.position_ids"] = torch.arange(8, dtype=torch.int64).unsqueeze(0)
    _save(root / "model.safetensors", bert)
    dense = {"linear.weight": torch.randn(8, 16), "linear.bias": torch.zeros(8)}
    _save(root / "2_Dense" / "model.safetensors", dense)
    _json(
        root / "config.json",
        {
            "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
            "architectures": ["BertModel"],
            "hidden_size": 16,
            "model_type": "bert",
            "torch_dtype": "float32",
            "transformers_version": "4.41.0",
            "vocab_size": 64,
        },
    )
    _json(
        root / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Dense",
                "type": "sentence_transformers.models.Dense",
            },
        ],
    )
    _json(
        root / "1_Pooling" / "config.json",
        {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True},
    )
    _json(root / "2_Dense" / "config.json", {"in_features": 16, "out_features": 8, "bias": True})
    _json(root / "sentence_bert_config.json", {"max_seq_length": 256, "do_lower_case": False})
    _json(root / "config_sentence_transformers.json", {"__version__": {"pytorch": "2.1.0"}})
    _json(root / "tokenizer.json", {"version": "1.0", "model": {"type": "WordPiece"}})
    _json(root / "tokenizer_config.json", {"do_lower_case": True})
    _json(root / "special_tokens_map.json", {"cls_token": "[CLS]"})
    _write(root / "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    _write(root / "README.md", "---\nlibrary_name: sentence-transformers\n---\n# MiniLM\n")
    _write(root / ".gitattributes", "*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    stale = {
        "pytorch_model.bin": b"PK\x03\x04 a pickle of the same weights",
        "rust_model.ot": b"rust-bert weights",
        "tf_model.h5": b"\x89HDF\r\n",
        "2_Dense/pytorch_model.bin": b"PK\x03\x04 dense",
        "onnx/model.onnx": b"onnx graph",
        "onnx/model_O4.onnx": b"onnx graph, optimised",
        "openvino/openvino_model.bin": b"openvino weights",
        "openvino/openvino_model.xml": "<net/>",
    }
    for rel, content in stale.items():
        _write(root / rel, content)
    return Layout(
        "sentence-transformers",
        root,
        weights={"model": bert, "2_Dense/model": dense},
        copied={
            "modules.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "README.md",
            ".gitattributes",
        },
        skipped=set(stale),
        model_configs={"config.json"},
        other_configs={"1_Pooling/config.json", "2_Dense/config.json"},
    )


def _llama_files(root: Path) -> tuple[dict[str, Any], list[str]]:
    torch = _torch()
    state = _layer_state(2, "model.layers.", 32, torch.bfloat16, n=3)
    state["model.embed_tokens.weight"] = torch.randn(64, 32).to(torch.bfloat16)
    files = _sharded(root, "model", state, shards=2)
    _json(
        root / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0",
        },
    )
    _json(root / "generation_config.json", {"bos_token_id": 1, "do_sample": True})
    _json(root / "tokenizer.json", {"version": "1.0", "model": {"type": "BPE"}})
    _json(root / "tokenizer_config.json", {"model_max_length": 131072})
    _json(root / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>"})
    return state, files


def llama(tmp: Path) -> Layout:
    """meta-llama/Llama-3.1-8B-Instruct as the Hub has it, with an older repo's leftovers."""
    root = tmp / "Llama-tiny-Instruct"
    state, _ = _llama_files(root)
    _write(root / "LICENSE", "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n")
    _write(root / "README.md", "# Llama tiny\n")
    _write(root / "USE_POLICY.md", "# Acceptable use\n")
    stale = {
        "original/consolidated.00.pth": b"PK\x03\x04 meta's own checkpoint",
        "original/params.json": '{"dim": 32, "n_layers": 3}\n',
        "original/tokenizer.model": b"tiktoken ranks",
        "onnx/model.onnx": b"onnx graph",
        "onnx/model.onnx_data": b"onnx external weights",
        "pytorch_model-00001-of-00002.bin": b"PK\x03\x04 one",
        "pytorch_model-00002-of-00002.bin": b"PK\x03\x04 two",
        "pytorch_model.bin.index.json": '{"weight_map": {}}\n',
        "flax_model.msgpack": b"\x80flax",
        "ggml-model-q4_0.gguf": b"GGUF",
        # A variant index whose shards were never uploaded: copying it ships a broken index.
        "model.safetensors.index.fp16.json": json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model.fp16-00001-of-00002.safetensors"}}
        ),
    }
    for rel, content in stale.items():
        _write(root / rel, content)
    return Layout(
        "llama",
        root,
        weights={"model": state},
        copied={
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "LICENSE",
            "README.md",
            "USE_POLICY.md",
        },
        skipped=set(stale),
        model_configs={"config.json"},
    )


def _diffusers_config(cls: str, **extra: object) -> dict[str, object]:
    return {"_class_name": cls, "_diffusers_version": "0.30.0", **extra}


def diffusers(tmp: Path, variant: str | None = None) -> Layout:
    """A Stable Diffusion pipeline: components in subfolders, each with fp16 variants."""
    torch = _torch()
    root = tmp / "tiny-sd"
    _json(
        root / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    _json(
        root / "scheduler" / "scheduler_config.json",
        _diffusers_config("PNDMScheduler", num_train_timesteps=1000),
    )
    _json(root / "tokenizer" / "vocab.json", {"a": 0, "b": 1})
    _write(root / "tokenizer" / "merges.txt", "#version: 0.2\na b\n")
    _json(root / "tokenizer" / "tokenizer_config.json", {"model_max_length": 77})
    _write(root / "README.md", "# tiny-sd\n")

    unet = _layer_state(3, "down_blocks.", 16, torch.float32, n=3)
    vae = _layer_state(4, "encoder.conv.", 8, torch.float32)
    clip = _layer_state(5, "text_model.encoder.layers.", 8, torch.float32)
    clip["text_model.embeddings.position_ids"] = torch.arange(4, dtype=torch.int64).unsqueeze(0)

    def to_half(state: dict[str, Any]) -> dict[str, Any]:
        """The fp16 variant as diffusers saves it; HOT clamped to fp16's range (60000
        still overflows fp8, so --strict has something to refuse)."""
        return {
            k: v.clamp(-60000, 60000).half() if v.is_floating_point() else v
            for k, v in state.items()
        }

    half = to_half(clip)
    files = {
        "unet": _sharded(root / "unet", "diffusion_pytorch_model", unet, shards=2),
        "unet_fp16": _sharded(
            root / "unet", "diffusion_pytorch_model", to_half(unet), shards=2, variant="fp16"
        ),
    }
    _json(root / "unet" / "config.json", _diffusers_config("UNet2DConditionModel", in_channels=4))
    _save(root / "vae" / "diffusion_pytorch_model.safetensors", vae)
    _save(root / "vae" / "diffusion_pytorch_model.fp16.safetensors", to_half(vae))
    _json(root / "vae" / "config.json", _diffusers_config("AutoencoderKL", latent_channels=4))
    _save(root / "text_encoder" / "model.safetensors", clip)
    _save(root / "text_encoder" / "model.fp16.safetensors", half)
    _json(
        root / "text_encoder" / "config.json",
        {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": 8,
            "torch_dtype": "float32",
            "transformers_version": "4.41.0",
        },
    )
    _write(root / "unet" / "diffusion_pytorch_model.bin", b"PK\x03\x04 stale unet pickle")

    # The output is named plainly whichever variant it was converted from, so what must
    # never appear in it is the variant's names.
    fp16 = {
        *(f"unet/{f}" for f in files["unet_fp16"]),
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    }
    if variant == "fp16":
        weights = {
            "unet/diffusion_pytorch_model": to_half(unet),
            "vae/diffusion_pytorch_model": to_half(vae),
            "text_encoder/model": half,
        }
    else:
        weights = {
            "unet/diffusion_pytorch_model": unet,
            "vae/diffusion_pytorch_model": vae,
            "text_encoder/model": clip,
        }
    return Layout(
        "diffusers" if variant is None else f"diffusers-{variant}",
        root,
        weights=weights,
        copied={
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "README.md",
        },
        skipped={"unet/diffusion_pytorch_model.bin", *fp16},
        model_configs={"text_encoder/config.json"},
        other_configs={"unet/config.json", "vae/config.json"},
        variant=variant,
        strict_dtype="fp8_e4m3" if variant == "fp16" else "fp16",
    )


def diffusers_fp16(tmp: Path) -> Layout:
    """The same pipeline, converting its fp16 variant (``--variant fp16``)."""
    return diffusers(tmp, variant="fp16")


def _blob(repo: Path, content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    blob = repo / "blobs" / digest
    if not blob.exists():
        _write(blob, content)
    return digest


def _hf_cache(tmp: Path) -> tuple[Path, Path, dict[str, Any], set[str]]:
    """A cache as huggingface_hub lays it out: the real files are ``blobs/<sha256>``,
    ``snapshots/<commit>/...`` holds relative links to them, ``refs/main`` the commit.
    Returns (cache dir, snapshot dir, state, copied files)."""
    cache = tmp / "hf-home" / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    staging = tmp / "download"
    state, _ = _llama_files(staging)
    _write(staging / "original" / "params.json", '{"dim": 32}\n')
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging)
        digest = _blob(repo, path.read_bytes())
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    _write(repo / "refs" / "main", commit)
    copied = {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    return cache, snapshot, state, copied


def hf_snapshot(tmp: Path) -> Layout:
    """A model straight from the Hugging Face cache (``.../snapshots/<commit>``)."""
    cache, snapshot, state, copied = _hf_cache(tmp)
    return Layout(
        "hf-snapshot",
        snapshot,
        weights={"model": state},
        copied=copied,
        skipped={"original/params.json"},
        model_configs={"config.json"},
        default_stem=Path("tiny-llama"),
        cache=cache,
    )


def hf_link(tmp: Path) -> Layout:
    """A user's symlink to a cache snapshot (``ln -s ~/.cache/.../snapshots/abc my-llama``)."""
    cache, snapshot, state, copied = _hf_cache(tmp)
    link = tmp / "my-llama"
    link.symlink_to(snapshot, target_is_directory=True)
    return Layout(
        "hf-link",
        link,
        weights={"model": state},
        copied=copied,
        skipped={"original/params.json"},
        model_configs={"config.json"},
        default_stem=tmp / "my-llama",
        cache=cache,
    )


def symlinked_file(tmp: Path) -> Layout:
    """One .safetensors file reached through a link that lives elsewhere."""
    torch = _torch()
    state = _layer_state(6, "layers.", 8, torch.float32)
    real = tmp / "store" / "a1b2c3-real-name.safetensors"
    _save(real, state)
    link = tmp / "links" / "adapter_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(real, link.parent))
    return Layout(
        "symlinked-file",
        link,
        weights={"adapter_model": state},
        default_stem=tmp / "links" / "adapter_model",
    )


def llama_bin(tmp: Path) -> Layout:
    """An older Llama repository as the Hub has it: fp32 ``.bin`` shards saved by
    ``torch.save`` with ``pytorch_model.bin.index.json``, ``lm_head.weight`` tied to the
    embedding (one storage in the first shard: written once, as transformers does),
    ``training_args.bin`` (a pickle, not weights) and no safetensors."""
    torch = _torch()
    root = tmp / "llama-7b-hf-old"
    state = _layer_state(7, "model.layers.", 16, torch.float32, n=3)
    emb = torch.randn(32, 16)
    names = list(state)
    first = {"model.embed_tokens.weight": emb, "lm_head.weight": emb}
    first.update({n: state[n] for n in names[::2]})
    second = {n: state[n] for n in names[1::2]}
    weight_map = {}
    for i, shard in enumerate((first, second)):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        root.mkdir(parents=True, exist_ok=True)
        torch.save(shard, root / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    _json(root / "pytorch_model.bin.index.json", {"metadata": {}, "weight_map": weight_map})
    _json(
        root / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        },
    )
    _json(root / "generation_config.json", {"bos_token_id": 1})
    _json(root / "tokenizer_config.json", {"model_max_length": 2048})
    _write(root / "training_args.bin", b"PK\x03\x04 a pickled TrainingArguments")
    expected = {"model.embed_tokens.weight": emb, **state}
    return Layout(
        "llama-bin",
        root,
        weights={"model": expected},
        copied={"generation_config.json", "tokenizer_config.json"},
        skipped={
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
            "training_args.bin",
        },
        model_configs={"config.json"},
    )


def checkpoint_pth(tmp: Path) -> Layout:
    """A training script's checkpoint passed as a file: the weights under
    ``state_dict`` beside the epoch and the optimizer's state."""
    torch = _torch()
    state = _layer_state(8, "encoder.", 8, torch.float32)
    path = tmp / "runs" / "epoch3.pth"
    path.parent.mkdir(parents=True)
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    torch.save({"state_dict": state, "epoch": 3, "optimizer": opt.state_dict()}, path)
    return Layout(
        "checkpoint-pth", path, weights={"epoch3": state}, default_stem=tmp / "runs" / "epoch3"
    )


def project(tmp: Path) -> Layout:
    """A user's project folder: the wrong place for ``-o``; fastcast must not touch it."""
    root = tmp / "my-project"
    _write(root / ".git" / "HEAD", "ref: refs/heads/main\n")
    _write(root / ".git" / "objects" / "ab" / "cdef01", b"x\x9c blob")
    _write(root / "src" / "train.py", "print('training')\n")
    _write(root / "notes.md", "# experiments\n")
    return Layout("project", root, is_target=True)


ZOO: dict[str, Callable[[Path], Layout]] = {
    "sentence-transformers": sentence_transformers,
    "llama": llama,
    "diffusers": diffusers,
    "diffusers-fp16": diffusers_fp16,
    "hf-snapshot": hf_snapshot,
    "hf-link": hf_link,
    "symlinked-file": symlinked_file,
    "llama-bin": llama_bin,
    "checkpoint-pth": checkpoint_pth,
}
"""Model layouts: every user-facing command runs against each."""

TARGETS: dict[str, Callable[[Path], Layout]] = {"project": project}
"""Folders that are output targets, not models."""
