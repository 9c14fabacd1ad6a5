"""LoRA adapters made by PEFT itself on tiny transformers models, and PEFT's own merge
as the oracle of ``--merge-lora``.

``make_adapter`` wraps a base folder's model with ``get_peft_model`` (B initialised
non-zero: ``init_lora_weights=False``, so every update is real), optionally trains
nothing but perturbs the ``modules_to_save`` copies, and saves the adapter the way a
user's training run does (``save_pretrained``). ``peft_merged`` is PEFT's
``merge_and_unload`` on the base loaded in float32, the reference the issue names.

    base = build_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import require

GPT2 = {"vocab_size": 96, "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 32}


def build_gpt2(path: Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A 2-layer GPT-2: its attention and MLP layers are transformers ``Conv1D``
    (weights ``[in, out]``), ``c_proj`` of the attention square."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


def load_base(base: Path, dtype: str = "float32", vocab: int | None = None) -> Any:
    """The base in ``dtype``; ``vocab``: its embeddings resized first (as a fine-tune that
    added tokens does, and as PEFT needs before loading such an adapter)."""
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    return model


def make_adapter(
    base: Path,
    path: Path,
    *,
    seed: int = 1,
    adapter_dtype: str = "float32",
    safe_serialization: bool = True,
    vocab: int | None = None,
    **config: Any,
) -> Path:
    """A PEFT LoRA adapter of ``base`` saved at ``path`` (``config``: LoraConfig's
    keywords); every A and B random, ``modules_to_save`` copies perturbed."""
    torch = require("torch")
    peft = require("peft")
    torch.manual_seed(seed)
    model = load_base(base, vocab=vocab)
    config.setdefault("init_lora_weights", False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            perturbed = ("modules_to_save", "lora_magnitude_vector", "trainable_tokens_delta")
            if any(p in name for p in perturbed):
                p.add_(torch.randn_like(p) * 0.05)
    wrapped.to(getattr(torch, adapter_dtype))
    wrapped.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def peft_merged(base: Path, adapter: Path, vocab: int | None = None) -> dict[str, Any]:
    """PEFT's merge of ``adapter`` into ``base`` loaded in float32: the state dict of
    ``merge_and_unload()``, every tensor float32."""
    peft = require("peft")
    model = peft.PeftModel.from_pretrained(load_base(base, vocab=vocab), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def peft_logits(
    base: Path, adapter: Path, dtype: str, tokens: Any, vocab: int | None = None
) -> Any:
    """The logits of PEFT's merged model cast to ``dtype`` (a torch name) on ``tokens``."""
    torch = require("torch")
    peft = require("peft")
    model = peft.PeftModel.from_pretrained(load_base(base, vocab=vocab), adapter)
    model = model.merge_and_unload()
    model.to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(tokens).logits.float()
