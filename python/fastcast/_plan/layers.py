"""``layer_replication``: an adapter trained on a deeper model made of the base's layers.

PEFT's ``replicate_layers`` builds the model the adapter was trained on from the layer
map ``[[start, end), ...]``: ``[[0, 4], [2, 5]]`` stacks base layers 0, 1, 2, 3, 2, 3, 4,
the copies sharing the base's weights, each with its own LoRA (the adapter's keys name
the new layer indices). PEFT cannot merge such an adapter (its merge adds every copy's
update into the one shared weight, and the saved model has the base's depth:
peft#1707). fastcast writes the model the adapter describes: layer ``j`` of the output
is base layer ``map[j]``'s tensors with layer ``j``'s update, ``num_hidden_layers`` (and a
per-layer ``layer_types`` list) following.

The layers are found as PEFT finds them: the one run of names ``<prefix><i>.`` with ``i``
covering ``0 .. num_hidden_layers - 1`` whose prefix ends in ``layers.`` (Llama and most
decoders), ``layer.`` (BERT's ``encoder.layer``) or ``h.`` (Falcon, GPT-2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastcast._core import ModelFolderError
from fastcast._source.entries import TensorEntry

#: A layer's tensor name: the prefix (up to the index) and the index.
LAYER = re.compile(r"^((?:.*\.)?(?:layers|layer|h)\.)(\d+)\.")


@dataclass(frozen=True)
class Replication:
    """The deeper model: output layer ``j`` is base layer ``sources[j]``."""

    prefix: str
    sources: tuple[int, ...]
    depth: int
    """The base's ``num_hidden_layers``."""

    def remap(self, entries: Iterable[TensorEntry]) -> list[TensorEntry]:
        """The output's tensors: ``order``'s, each its source entry renamed."""
        entries = list(entries)
        return [entries[i]._replace(name=name) for i, name in self.order([e.name for e in entries])]

    def order(self, names: list[str]) -> list[tuple[int, str]]:
        """The output's tensors as (index into ``names``, name): those outside the
        layers as they are, then (where the base's first layer tensor was) every output
        layer's, each its source layer's tensors renamed; base layers the map leaves
        out are left out."""
        before: list[tuple[int, str]] = []
        after: list[tuple[int, str]] = []
        layers: dict[int, list[tuple[int, str]]] = {}  # (index, name after index)
        for i, name in enumerate(names):
            m = LAYER.match(name)
            if m is not None and m.group(1) == self.prefix:
                layers.setdefault(int(m.group(2)), []).append((i, name[m.end(2) :]))
            else:
                (after if layers else before).append((i, name))
        out = before
        for j, source in enumerate(self.sources):
            out += [(i, f"{self.prefix}{j}{tail}") for i, tail in layers.get(source, [])]
        return out + after

    def config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config.json keys the deeper model changes."""
        keys: dict[str, Any] = {"num_hidden_layers": len(self.sources)}
        types = config.get("layer_types")
        if isinstance(types, list) and len(types) == self.depth:
            keys["layer_types"] = [types[i] for i in self.sources]
        return keys


def layer_map(given: Any, where: str) -> list[tuple[int, int]]:
    """``layer_replication`` checked: a list of ``[start, end)`` pairs of layer indices."""
    pairs = []
    for pair in given if isinstance(given, list) else [None]:
        start, end = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
        ints = all(isinstance(i, int) and not isinstance(i, bool) for i in (start, end))
        if not ints or not 0 <= start < end:  # type: ignore[operator]
            raise ModelFolderError(
                f"{where}: layer_replication {given!r} is not a list of [start, end) layer "
                "index pairs"
            )
        pairs.append((int(start), int(end)))  # type: ignore[arg-type]
    return pairs


def replication(
    given: Any, where: str, names: dict[str, list[str]], config: dict[str, Any]
) -> tuple[str, Replication] | None:
    """The weight set (by key) whose layers the adapter's ``layer_replication`` stacks
    again, and how; ``names``: each set's tensor names, ``config``: the base's."""
    if given in (None, [], False):
        return None
    pairs = layer_map(given, where)
    depth = config.get("num_hidden_layers")
    if not isinstance(depth, int) or depth <= 0:
        raise ModelFolderError(
            f"{where}: layer_replication, but the base's config.json gives no num_hidden_layers"
        )
    if any(end > depth for _, end in pairs):
        raise ModelFolderError(
            f"{where}: layer_replication {given!r} reaches past the base's {depth} layers"
        )
    found = []
    for key, tensor_names in names.items():
        runs: dict[str, set[int]] = {}
        for name in tensor_names:
            m = LAYER.match(name)
            if m is not None:
                runs.setdefault(m.group(1), set()).add(int(m.group(2)))
        found += [(key, p) for p, ids in runs.items() if ids == set(range(depth))]
    if len(found) != 1:
        what = "none" if not found else ", ".join(p for _, p in found)
        raise ModelFolderError(
            f"{where}: layer_replication needs the base's {depth} layers as one run of "
            f"names <prefix>.<i>. (...layers., ...layer., ...h.); found {what}"
        )
    key, prefix = found[0]
    sources = tuple(i for start, end in pairs for i in range(start, end))
    return key, Replication(prefix, sources, depth)
