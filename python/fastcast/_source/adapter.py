"""A PEFT LoRA adapter folder read as ``--merge-lora`` merges it, nothing loaded.

What the folder says, as PEFT reads it (``peft/tuners/lora``, ``utils/save_and_load``):
``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``/``alpha_pattern``, ``use_dora``, ``modules_to_save``) and the weights,
``adapter_model.safetensors`` or ``adapter_model.bin`` (read without pickle), named
``base_model.model.<module>.<part>``:

- ``lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` on an
  embedding) and, with DoRA, ``lora_magnitude_vector``: the low-rank update of
  ``<module>.weight``;
- ``<module>.weight`` (and ``.bias``) of a module in ``modules_to_save``, and
  ``<module>.base_layer.weight`` (an embedding PEFT saved because it was targeted or
  resized): tensors that replace the base's of that name; PEFT loads them into the
  model before it merges;
- ``<module>.modules_to_save.weight`` / ``<module>.original_module.weight``: copies some
  versions save beside a replacement, ignored.

Anything else is refused by name: a tensor fastcast does not understand is never
dropped. The scaling of each module is PEFT's: ``rank_pattern`` and ``alpha_pattern``
keys are regexes matched as ``(.*\\.)?(key)$`` against the module's path, the first
match in order wins, rank and alpha looked up separately; ``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcast._core import ModelFolderError
from fastcast._names import listing
from fastcast._source.config import read_config
from fastcast._source.entries import TensorEntry
from fastcast._source.folder import SourceFile, TorchOptions, read_source, read_torch_source
from fastcast._source.hf_cache import model_path

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: The prefix PEFT saves every key under (the PeftModel's path to the base model).
PREFIX = "base_model.model."
#: Tokenizer files an adapter folder may hold (a fine-tune that added tokens or a chat
#: template saves them): they replace the base's in a merged output.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
#: Config keys naming what a plain LoRA merge does not do; each refused when set.
UNSUPPORTED = {
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter updates: ``module.weight`` gets ``scale · (B @ A)``."""

    module: str
    """Its path in the model (``model.layers.0.self_attn.q_proj``)."""
    a: TensorEntry
    b: TensorEntry
    rank: int
    alpha: float
    scale: float
    embedding: bool
    """``lora_embedding_A/B``: the update is transposed."""
    magnitude: TensorEntry | None = None
    """DoRA's magnitude vector."""
    bias: TensorEntry | None = None
    """``lora_bias``: ``lora_B``'s bias, added (scaled) to the module's base bias."""
    parameters: tuple[str, ...] = ()
    """LoRA on a parameter (``target_parameters``, PEFT's ``ParamWrapper``): the names
    of the module's parameters it may update (which one, the base's shapes decide);
    ``rank``, ``alpha`` and ``scale`` are then settled with it."""
    depth: int = 0
    """How deep PEFT nested its wrapper (a module with two parameters targeted holds one
    ``ParamWrapper`` in another: the inner one's tensors are under ``base_layer.``)."""

    @property
    def weight(self) -> str:
        """The base tensor it updates."""
        return f"{self.module}.weight"

    @property
    def saved_as(self) -> str:
        """Its path in the adapter's keys."""
        return self.module + ".base_layer" * self.depth

    @property
    def base_bias(self) -> str:
        """The base bias its ``bias`` updates."""
        return f"{self.module}.bias"


@dataclass(frozen=True)
class TokenRows:
    """PEFT's trainable tokens of one embedding: rows ``indices`` of ``module.weight``
    replaced by the rows of ``delta`` (``[len(indices), dim]``), as its ``index_copy``."""

    module: str
    delta: TensorEntry
    indices: tuple[int, ...]

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter, read and checked against itself (not yet against a base)."""

    given: str
    """As the user gave it: a path or a repo id."""
    folder: Path
    config: dict[str, Any]
    file: SourceFile
    modules: dict[str, LoraModule]
    """By module path."""
    replaces: dict[str, TensorEntry] = field(default_factory=dict)
    """Base tensor name -> the adapter's tensor that replaces it (named as the base's)."""
    tokens: dict[str, TokenRows] = field(default_factory=dict)
    """Trainable tokens (``trainable_token_indices``), by embedding module path."""

    @property
    def tokenizer_files(self) -> dict[str, Path]:
        """Its tokenizer files (regular files at its top), by name."""
        found = {n: self.folder / n for n in TOKENIZER_FILES}
        return {n: p for n, p in found.items() if p.is_file()}

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def digest(self) -> str:
        """sha256 of the weights file, read in blocks: what the record pins."""
        h = hashlib.sha256()
        with open(self.file.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` and the record say of it."""
        settled = [(m.rank, m.alpha) for m in self.modules.values() if not m.parameters]
        for m in self.modules.values():  # a parameter's: those its candidates may have
            settled += [scaling(self.config, f"{m.module}.{p}")[:2] for p in m.parameters]
        ranks, alphas = sorted({r for r, _ in settled}), sorted({a for _, a in settled})
        return {
            "path": self.given,
            "peft_type": self.config.get("peft_type"),
            "base_model": self.config.get("base_model_name_or_path"),
            "ranks": ranks,
            "alphas": alphas,
            "rslora": bool(self.config.get("use_rslora")),
            "dora": self.dora,
            "lora_bias": bool(self.config.get("lora_bias")),
            "modules": sum(not m.parameters for m in self.modules.values()),
            "parameters": sum(bool(m.parameters) for m in self.modules.values()),
            "target_parameters": list(self.config.get("target_parameters") or []),
            "layer_replication": self.config.get("layer_replication") or None,
            "trainable_tokens": {m: len(t.indices) for m, t in self.tokens.items()},
            "replaces": sorted(self.replaces),
            "weights": self.file.path.name,
        }


def pattern_key(keys: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key whose regex matches the module's path
    as ``(.*\\.)?(key)$``."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def open_adapter(given: str | os.PathLike[str]) -> Adapter:
    """Read the adapter folder (or cached repo id) ``given``; refuse what a merge cannot
    reproduce, naming it."""
    folder = model_path(given)
    where = os.fspath(given)
    if not folder.is_dir():
        raise ModelFolderError(f"{where}: not an adapter folder (no such folder)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelFolderError(f"{where}: no {CONFIG_NAME}: not a PEFT adapter folder")
    config = read_config(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelFolderError(
            f"{config_path}: a {peft_type} adapter; --merge-lora merges LoRA (and DoRA) adapters"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, [], ""):
            raise ModelFolderError(f"{config_path}: {what} is not merged by fastcast yet")
    if config.get("lora_bias") and config.get("use_dora"):
        raise ModelFolderError(
            f"{config_path}: lora_bias with DoRA (use_dora), which PEFT does not support "
            "either: an adapter of another tool?"
        )
    weights = [folder / n for n in WEIGHT_NAMES if (folder / n).exists()]
    if not weights:
        raise ModelFolderError(f"{where}: no {' or '.join(WEIGHT_NAMES)}")
    path = weights[0]  # safetensors first, as PEFT loads it
    file = read_source(path) if path.suffix == ".safetensors" else read_torch_source(
        path, TorchOptions()
    )  # fmt: skip
    modules, replaces, deltas = read_tensors(config, file)
    tokens = token_rows(config, config_path, deltas)
    if not modules and not replaces and not tokens:
        raise ModelFolderError(f"{path}: no LoRA tensors")
    return Adapter(where, folder, config, file, modules, replaces, tokens)


#: The key suffix of a trainable-tokens delta, after the embedding module's path.
DELTA = ".token_adapter.trainable_tokens_delta"


def token_rows(
    config: dict[str, Any], path: Path, deltas: dict[str, TensorEntry]
) -> dict[str, TokenRows]:
    """Each embedding's trainable tokens: its delta rows and, from the config's
    ``trainable_token_indices`` (a list for the input embedding, or a dict from a module
    name, matched as the end of the module's path, to its list), the rows they take."""
    given = config.get("trainable_token_indices")
    if not deltas and given in (None, [], {}):
        return {}
    if not deltas or given in (None, [], {}):
        raise ModelFolderError(
            f"{path}: trainable_token_indices and the trainable_tokens_delta tensors do not "
            "go together (one without the other)"
        )
    found = {}
    for module, delta in deltas.items():
        if isinstance(given, dict):
            keys = [k for k in given if module == k or module.endswith(f".{k}")]
            indices = given[keys[0]] if len(keys) == 1 else None
        else:
            indices = given if len(deltas) == 1 else None
        ok = isinstance(indices, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        )
        if not ok or indices is None or len(set(indices)) != len(indices):
            raise ModelFolderError(
                f"{path}: trainable_token_indices gives {module} no list of distinct "
                f"token indices ({given!r})"
            )
        if (
            delta.dtype not in ("F32", "BF16", "F16", "F64")
            or len(delta.shape) != 2
            or (delta.shape[0] != len(indices))
        ):
            raise ModelFolderError(
                f"{path}: {delta.name} is {delta.dtype} {list(delta.shape)}, not the "
                f"{len(indices)} float rows trainable_token_indices names"
            )
        found[module] = TokenRows(module, delta, tuple(indices))
    return found


#: The LoRA parts of a key, after the module's path.
PARTS = {
    "lora_A.weight": "a",
    "lora_B.weight": "b",
    "lora_B.bias": "bb",
    "lora_embedding_A": "a",
    "lora_embedding_B": "b",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",
}
IGNORED = (".modules_to_save.", ".original_module.")


def read_tensors(
    config: dict[str, Any], file: SourceFile
) -> tuple[dict[str, LoraModule], dict[str, TensorEntry], dict[str, TensorEntry]]:
    """The adapter's modules, replacement tensors and trainable-token deltas (by
    embedding module), each checked: ranks that agree with each other and the config,
    float dtypes, no tensor left unexplained."""
    parts: dict[tuple[str, int], dict[str, TensorEntry]] = {}
    replaces: dict[str, TensorEntry] = {}
    nested = bool(config.get("target_parameters"))
    deltas: dict[str, TensorEntry] = {}
    unknown = []
    for e in file.tensors:
        name = e.name.removeprefix(PREFIX)
        if any(i in f".{name}" for i in IGNORED):
            continue
        if name.endswith(DELTA):
            deltas[name.removesuffix(DELTA)] = e
            continue
        part = next((p for p in PARTS if name.endswith(f".{p}")), None)
        if part is not None:
            module, depth = name[: -len(part) - 1], 0
            while nested and module.endswith(".base_layer"):  # ParamWrappers, nested
                module, depth = module.removesuffix(".base_layer"), depth + 1
            role = PARTS[part] + ("e" if "embedding" in part else "")
            parts.setdefault((module, depth), {})[role] = e
        elif name.endswith((".weight", ".bias")) and ".lora_" not in name:
            target = name.replace(".base_layer.", ".")
            replaces[target] = e._replace(name=target)
        else:
            unknown.append(e.name)
    if unknown:
        raise ModelFolderError(
            f"{file.path}: tensors a LoRA merge does not know: {listing(unknown, 4)}"
        )
    modules = [lora_module(config, file, m, d, p) for (m, d), p in parts.items()]
    return {m.saved_as: m for m in modules}, replaces, deltas


def targeted_parameters(config: dict[str, Any], module: str) -> tuple[str, ...]:
    """The parameters of ``module`` that ``target_parameters`` names, as PEFT matches
    them: an entry is ``<module>.<parameter>`` exactly or the end of it."""
    found: list[str] = []
    for entry in config.get("target_parameters") or []:
        owner, _, parameter = str(entry).rpartition(".")
        if (not owner or module == owner or module.endswith(f".{owner}")) and (
            parameter not in found
        ):
            found.append(parameter)
    return tuple(found)


def scaling(config: dict[str, Any], key: str) -> tuple[int, float, float]:
    """PEFT's rank, alpha and scale of the module (or parameter) at ``key``."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(list(ranks), key), pattern_key(list(alphas), key)
    r = int(ranks[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alphas[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8))
    return r, alpha, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_module(
    config: dict[str, Any],
    file: SourceFile,
    module: str,
    depth: int,
    parts: dict[str, TensorEntry],
) -> LoraModule:
    """One module's update, its rank and scaling found as PEFT finds them."""
    embedding = "ae" in parts or "be" in parts
    a, b = parts.get("ae" if embedding else "a"), parts.get("be" if embedding else "b")
    if a is None or b is None:
        missing = "A" if a is None else "B"
        raise ModelFolderError(f"{file.path}: module {module} has no lora_{missing}")
    for e in (a, b, parts.get("m"), parts.get("bb")):
        if e is not None and e.dtype not in ("F32", "BF16", "F16", "F64"):
            raise ModelFolderError(f"{file.path}: {e.name} is {e.dtype}, not a float")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise ModelFolderError(
            f"{file.path}: module {module}: lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)} do not have one rank"
        )
    rank = a.shape[0]
    parameters = targeted_parameters(config, module)
    if parameters:  # a ParamWrapper: its rank (per expert) is settled against the base
        flags = config.get("use_dora") or config.get("lora_bias")
        if flags or parts.get("m") is not None or parts.get("bb") is not None or embedding:
            raise ModelFolderError(
                f"{file.path}: module {module}: LoRA on its parameters "
                f"({', '.join(parameters)}) with DoRA, a bias or an embedding's tensors, "
                "which PEFT does not make"
            )
        r, alpha, scale = scaling(config, f"{module}.{parameters[0]}")
        return LoraModule(module, a, b, r, alpha, scale, False, parameters=parameters,
                          depth=depth)  # fmt: skip
    if depth:
        raise ModelFolderError(
            f"{file.path}: module {module}: LoRA tensors under base_layer. but "
            "target_parameters names none of its parameters"
        )
    r, alpha, scale = scaling(config, module)
    if r != rank:
        raise ModelFolderError(
            f"{file.path}: module {module} has rank {rank} but the config says {r}"
        )
    magnitude = flagged(config, "use_dora", file, module, parts.get("m"), "lora_magnitude_vector")
    bias = flagged(config, "lora_bias", file, module, parts.get("bb"), "lora_B.bias")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise ModelFolderError(
            f"{file.path}: module {module}: lora_B.bias {list(bias.shape)} does not fit "
            f"lora_B {list(b.shape)}"
        )
    return LoraModule(module, a, b, rank, alpha, scale, embedding, magnitude, bias)


def flagged(
    config: dict[str, Any],
    flag: str,
    file: SourceFile,
    module: str,
    tensor: TensorEntry | None,
    what: str,
) -> TensorEntry | None:
    """A module's optional tensor (DoRA's magnitudes, ``lora_bias``'s bias), which it has
    exactly when the config's ``flag`` says so."""
    if bool(config.get(flag)) != (tensor is not None):
        has = "has no" if tensor is None else "has a"
        raise ModelFolderError(
            f"{file.path}: module {module} {has} {what} but {flag} is {bool(config.get(flag))}"
        )
    return tensor
