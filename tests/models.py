"""Tiny real model folders, built with transformers the way users get them.

Each builder makes a randomly initialised model from a fixed seed and saves it
with ``save_pretrained``: config.json, generation_config.json where the model
has one, ``model.safetensors`` or shards plus ``model.safetensors.index.json``.
Every model is at most a few hundred KB, so building all of them takes seconds.

    folder = build_llama(tmp_path / "tiny-llama", dtype="bfloat16", max_shard_size="40KB")
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import require

LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}

MIXTRAL = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}

#: A tiny gpt-oss: its experts stacked ``[E, in, out]`` in the file as in memory.
GPT_OSS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "tie_word_embeddings": False,
}
#: A tiny Qwen3-MoE: stacked ``[E, out, in]`` in memory, one by one in the file.
QWEN3_MOE = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
}

BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz",
    *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
    *("the", "cat", "sat", "on", "mat"),
]

BERT = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

# What sentence-transformers adds beside a BERT checkpoint: files the converter
# must carry over untouched, one of them in a subfolder.
SENTENCE_TRANSFORMERS_FILES = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ],
    "sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": False},
    "1_Pooling/config.json": {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True},
}


def build_llama(
    path: Path,
    *,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
    **sizes: int | bool,
) -> Path:
    """A 2-layer Llama with tied embeddings, saved in ``dtype`` (a torch name).

    Tied embeddings mean the file holds ``model.embed_tokens.weight`` and no
    ``lm_head.weight``. ``max_shard_size`` saves it as several shards plus an index.
    ``sizes`` override the config (``hidden_size=256``, ``tie_word_embeddings=False``...).
    """
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(LLAMA | sizes)))
    model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def build_mixtral(
    path: Path, *, dtype: str = "float32", seed: int = 0, **sizes: int | bool
) -> Path:
    """A 2-layer, 4-expert Mixtral in ``dtype`` (a torch name); ``sizes`` override the
    config.

    transformers 5 holds the experts fused (``mlp.experts.gate_up_proj``, 3-D) but
    ``save_pretrained`` writes the original per-expert layout
    (``block_sparse_moe.experts.N.w1.weight``) and re-fuses it on load.
    """
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**(MIXTRAL | sizes)))
    model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


def build_moe(
    path: Path, kind: str, *, dtype: str = "float32", seed: int = 0, **sizes: int | bool
) -> Path:
    """A tiny mixture of experts of ``kind`` (``gpt_oss``, ``qwen3_moe``, ``mixtral``) in
    ``dtype``, as transformers saves it; ``sizes`` override the config."""
    if kind == "mixtral":
        return build_mixtral(path, dtype=dtype, seed=seed, **sizes)
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    config = {"gpt_oss": (transformers.GptOssConfig, GPT_OSS),
              "qwen3_moe": (transformers.Qwen3MoeConfig, QWEN3_MOE)}[kind]  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config[0](**(config[1] | sizes)))
    model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


def build_old_bert(path: Path, *, seed: int = 0) -> Path:
    """A BERT encoder laid out as transformers 4.x and sentence-transformers left it.

    Older transformers saved ``embeddings.position_ids`` (int64, ``[1, max_pos]``) in
    the checkpoint; transformers 5 keeps that buffer out of the file (non-persistent)
    and ignores the key on load, so it is written back here with the safetensors
    library. Being 8-byte aligned it is stored first in the file, ahead of float
    tensors whose names sort before it. config.json carries ``torch_dtype`` (as
    configs written before transformers 4.56 do) where ``dtype`` was, so its keys are
    not in sorted order and a converter that re-sorts them shows. A tokenizer,
    sentence-transformers' files and a ``1_Pooling/`` subfolder sit beside it.
    """
    torch = require("torch")
    transformers = require("transformers")
    safetensors_torch = require("safetensors.torch")
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**BERT))
    model.save_pretrained(path)

    weights = path / "model.safetensors"
    # Copies, because the file about to be rewritten may be memory-mapped under them.
    tensors = {k: v.clone() for k, v in safetensors_torch.load_file(weights).items()}
    positions = torch.arange(BERT["max_position_embeddings"], dtype=torch.int64)
    tensors["embeddings.position_ids"] = positions.unsqueeze(0)
    safetensors_torch.save_file(tensors, weights, metadata={"format": "pt"})

    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config = {("torch_dtype" if k == "dtype" else k): v for k, v in config.items()}
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    vocab = {token: i for i, token in enumerate(BERT_VOCAB)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(path)
    for name, content in SENTENCE_TRANSFORMERS_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    (path / "README.md").write_text("# tiny-bert\n\nA tiny BERT for fastcast's tests.\n")
    return path
