"""``fastcast.inspect``: what a model folder holds, read-only, headers only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastcast import _core
from fastcast._arguments import as_patterns
from fastcast._dtypes import (
    dominant_float,
    from_torch_name,
    is_castable,
    short_name,
    torch_name,
    uncastable_notes,
)
from fastcast._loss import Losses, TensorLoss, describe
from fastcast._output.record import STAGING_DIR, read_record
from fastcast._plan.shards import plan_conversion
from fastcast._progress import ByteProgress
from fastcast._source.adapter import CONFIG_NAME as ADAPTER_CONFIG
from fastcast._source.adapter import open_adapter
from fastcast._source.config import CONFIG_NAME, config_dtypes, read_config
from fastcast._source.folder import ModelFolder, TorchOptions, describe_skipped, open_model
from fastcast._source.quantization import Quantization, detect, roles
from fastcast._units import format_bytes


@dataclass(frozen=True)
class DtypeCount:
    dtype: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class RoleCount:
    """Tensors of one quantization role and dtype (``scale``, ``F32``)."""

    role: str
    dtype: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class WeightSetInfo:
    prefix: str
    """The set's name in the model (``unet/diffusion_pytorch_model``)."""
    index: str | None
    shards: list[str]
    variant: str | None = None


@dataclass(frozen=True)
class ModelInspection:
    """Shards, tensors, stored dtypes and what config.json claims about them."""

    path: Path
    weight_sets: list[WeightSetInfo]
    tensors: int
    bytes: int
    dtypes: list[DtypeCount]
    config_dtypes: dict[str, str] = field(default_factory=dict)
    """Dtype claims by key: ``torch_dtype``, ``text_config.dtype`` for the top
    config.json, ``text_encoder/config.json:torch_dtype`` for the others."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What converting would do, for a quantized model."""
    skipped: list[str] = field(default_factory=list)
    made_by: str | None = None
    """For a fastcast output, how it was made (from its fastcast.json)."""
    quantization: str | None = None
    """For a quantized model: its method, scheme and where that was found."""
    roles: list[RoleCount] = field(default_factory=list)
    """For a quantized model: tensors by role in the quantization, and dtype."""
    #: With ``dtype=``: what converting to it would lose, per cast tensor (it prints as
    #: its summary).
    predicted: Losses | None = None
    predicted_dtype: str | None = None
    adapter: str | None = None
    """For a PEFT LoRA adapter folder: what ``--merge-lora`` would merge."""

    @property
    def float_dtype(self) -> str | None:
        """The float dtype holding most of the float bytes, if any."""
        return dominant_float((d.dtype, d.bytes) for d in self.dtypes)

    def render(self) -> str:
        lines = [f"{self.path}"]
        for ws in self.weight_sets:
            lines.append(
                f"  {ws.prefix}: {len(ws.shards)} shard{'s' if len(ws.shards) != 1 else ''}"
                + (f" (index {ws.index})" if ws.index else f" ({ws.shards[0]})")
                + (f", variant {ws.variant}" if ws.variant else "")
            )
        lines.append(f"  {self.tensors} tensors, {format_bytes(self.bytes)}")
        lines.append(f"  {'dtype':<12}{'tensors':>9}{'bytes':>12}{'share':>8}")
        for d in self.dtypes:
            share = 100 * d.bytes / self.bytes if self.bytes else 0
            lines.append(f"  {d.dtype:<12}{d.tensors:>9}{format_bytes(d.bytes):>12}{share:>7.1f}%")
        by_file: dict[str, list[str]] = {}
        for key, value in self.config_dtypes.items():
            file, colon, name = key.rpartition(":")
            by_file.setdefault(file if colon else CONFIG_NAME, []).append(f"{name}={value}")
        for file, claims in by_file.items():
            lines.append(f"  {file}: {', '.join(claims)}")
        if not by_file:
            lines.append("  config.json: no dtype")
        if self.quantization:
            lines.append(f"  quantized: {self.quantization}")
            lines.append(f"  {'role':<18}{'dtype':<10}{'tensors':>9}{'bytes':>12}")
            for r in self.roles:
                lines.append(
                    f"  {r.role:<18}{r.dtype:<10}{r.tensors:>9}{format_bytes(r.bytes):>12}"
                )
        if self.adapter:
            lines.append(f"  adapter: {self.adapter}")
        if self.made_by:
            lines.append(f"  made by {self.made_by}")
        lines.extend(f"  skipped: {s}" for s in self.skipped)
        if self.predicted is not None:
            lines.append(f"  converting to {self.predicted_dtype} would give:")
            lines.extend(f"    {line}" for line in describe(self.predicted))
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def claims_of(folder: ModelFolder) -> dict[str, str]:
    """Every dtype claim of the configs beside the weights, keyed as
    ``ModelInspection.config_dtypes`` documents."""
    claims: dict[str, str] = {}
    for rel in folder.configs:
        prefix = "" if rel == CONFIG_NAME else f"{rel}:"
        for key, value in config_dtypes(read_config(folder.root / rel)).items():
            claims[prefix + key] = value
    return claims


def mismatches(folder: ModelFolder, role_of: dict[tuple[str, str], str]) -> list[str]:
    """A warning per config.json whose dtype claim disagrees with the float weights
    beside it: the "config says float32 but the weights are bf16" trap. Only tensors
    that are not quantization state count (an fp8 model's weights are fp8 whatever
    its torch_dtype says, and rightly so)."""
    found = []
    for rel in folder.configs:
        where = rel.rpartition("/")[0]
        by_bytes: dict[str, int] = {}
        for ws in folder.weight_sets:
            if ws.folder == where:
                for t in ws.tensors:
                    if is_castable(t.dtype) and role_of.get((ws.key, t.name), "plain") == "plain":
                        by_bytes[t.dtype] = by_bytes.get(t.dtype, 0) + t.nbytes
        if not by_bytes:
            continue
        stored = max(by_bytes, key=lambda d: by_bytes[d])
        for key, claimed in config_dtypes(read_config(folder.root / rel)).items():
            name = from_torch_name(claimed)
            if name is not None and name != stored:
                found.append(
                    f"{rel} says {key}={claimed} but the float weights are stored as "
                    f"{stored} ({torch_name(stored)}); loaders trusting the config will "
                    "up- or down-cast them"
                )
    return found


def inspect(
    model: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    variant: str | None = None,
    progress: bool | None = None,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
) -> ModelInspection:
    """Describe a model folder (or a weights file) from its headers alone.

    Lists the weight sets at every depth, the stored dtypes, what each config.json
    claims, what a conversion would skip, and warns when a config disagrees with the
    stored float weights. With ``dtype``, also reads every tensor (read-only) and
    predicts what converting to it would lose: overflow, underflow, NaN/inf already
    there, max |x|. ``state_dict_key`` and ``strip_prefix`` choose a torch.save
    checkpoint's state dict and names, as for ``convert``.

    >>> print(inspect("model/", dtype="fp16").render())  # doctest: +SKIP
    """
    keep = as_patterns(keep, "keep")
    folder = open_model(model, variant, TorchOptions(state_dict_key, strip_prefix))
    counts: dict[str, list[int]] = {}
    for t in folder.tensors:
        c = counts.setdefault(t.dtype, [0, 0])
        c[0] += 1
        c[1] += t.nbytes
    dtypes = [DtypeCount(d, n, b) for d, (n, b) in sorted(counts.items(), key=lambda i: -i[1][1])]
    target = _core.parse_dtype(dtype) if dtype is not None else None
    quant = detect(folder)
    role_of = roles(folder) if quant is not None else {}
    predicted = None
    if target is not None:
        predicted = predict_loss(folder, target, keep, quant is not None, progress)
    notes = list(folder.warnings) + mismatches(folder, role_of)
    notes += uncastable_notes({d.dtype: d.tensors for d in dtypes})
    advice = [would_do(quant, role_of, target)] if quant and target else []
    made_by = None
    if not folder.is_file:
        record = read_record(folder.root)
        if record is not None:
            made_by = (
                f"fastcast {record.fastcast} from {record.source} ({record.dtype}"
                + (f", keep {' '.join(record.keep)}" if record.keep else "")
                + (f", variant {record.variant}" if record.variant else "")
                + (quantization_words(record.quantization) if record.quantization else "")
                + (f", merged with {record.merge_lora['path']}" if record.merge_lora else "")
                + ")"
            )
        if (folder.root / STAGING_DIR).exists():
            notes.append(
                f"an unfinished conversion is in {STAGING_DIR}/: run the same convert "
                "command with --resume to finish it"
            )
    return ModelInspection(
        path=Path(model),
        weight_sets=[
            WeightSetInfo(
                ws.key,
                ws.index.name if ws.index else None,
                [f.path.name for f in ws.files],
                ws.variant,
            )
            for ws in folder.weight_sets
        ],
        tensors=len(folder.tensors),
        bytes=sum(t.nbytes for t in folder.tensors),
        dtypes=dtypes,
        config_dtypes=claims_of(folder),
        warnings=notes,
        notes=advice,
        skipped=describe_skipped(folder.skipped),
        made_by=made_by,
        quantization=quant.describe() if quant is not None else None,
        roles=role_counts(folder, role_of),
        predicted=predicted,
        predicted_dtype=target,
        adapter=None if folder.is_file else adapter_words(folder.root),
    )


def adapter_words(root: Path) -> str | None:
    """A LoRA adapter folder's type, ranks, alphas, modules and base, in a line (None for
    a folder that is no adapter)."""
    if not (root / ADAPTER_CONFIG).is_file():
        return None
    try:
        a = open_adapter(root).describe()
    except _core.FastcastError as e:
        return f"not mergeable: {e}"
    kind = "DoRA" if a["dora"] else "LoRA"
    ranks = ", ".join(map(str, a["ranks"]))
    alphas = ", ".join(f"{x:g}" for x in a["alphas"])
    replaces = f", replaces {', '.join(a['replaces'])}" if a["replaces"] else ""
    tokens = a["trainable_tokens"]
    if tokens:
        replaces += ", trainable tokens: " + ", ".join(f"{m} ({n})" for m, n in tokens.items())
    targets = f"{a['modules']} modules"
    if a["parameters"]:
        targets += (
            f" and {a['parameters']} parameters (target_parameters: "
            f"{', '.join(a['target_parameters'])})"
        )
    if a["layer_replication"]:
        targets += f" of a model of base layers {a['layer_replication']} (layer_replication)"
    return (
        f"{kind}{' (rsLoRA)' if a['rslora'] else ''}"
        f"{' with trained biases' if a['lora_bias'] else ''} on {targets}, rank "
        f"{ranks}, alpha {alphas}{replaces}; base {a['base_model'] or 'not named'}"
    )


def quantization_words(q: dict[str, str]) -> str:
    """What a fastcast run did with quantization, from its record: ``, fp8 quantization
    kept``, ``, fp8 dequantized``, ``, quantized to fp8 (e4m3, 128x128 blocks)``."""
    method, mode = q.get("method", "?"), q.get("mode", "keep")
    if mode == "quantize":
        source = f" from {q['dequantized']} dequantized" if q.get("dequantized") else ""
        return f", quantized to {method} ({q.get('scheme', '?')}){source}"
    return f", {method} dequantized" if mode == "dequantize" else f", {method} quantization kept"


def role_counts(folder: ModelFolder, role_of: dict[tuple[str, str], str]) -> list[RoleCount]:
    """Tensors and bytes per (role, dtype), state roles first."""
    counts: dict[tuple[str, str], list[int]] = {}
    for ws in folder.weight_sets:
        for t in ws.tensors:
            role = role_of.get((ws.key, t.name))
            if role is not None:
                c = counts.setdefault((role, t.dtype), [0, 0])
                c[0] += 1
                c[1] += t.nbytes
    order = {"quantized weight": 0, "scale": 1, "zero point": 2, "group index": 3}
    return [
        RoleCount(role, dt, n, b)
        for (role, dt), (n, b) in sorted(
            counts.items(), key=lambda kv: (order.get(kv[0][0], 4 if kv[0][0] != "plain" else 5),
                                            kv[0])
        )
    ]  # fmt: skip


def would_do(quant: Quantization, role_of: dict[tuple[str, str], str], target: str) -> str:
    """What ``convert --dtype target`` would do with a quantized model."""
    state = sum(1 for role in role_of.values() if role != "plain")
    weights = sum(1 for role in role_of.values() if role == "quantized weight")
    return (
        f"convert --dtype {short_name(target)} refuses this model ({quant.method}); with "
        f"--keep-quantized it casts only the {len(role_of) - state} tensors that are not "
        f"quantization state and keeps the other {state} byte for byte (the prediction "
        "above is for that)"
        + (
            f"; with --dequantize it writes a plain model, its {weights} quantized weights "
            "times their scales (and with --quantize fp8 too, requantizes them to fp8 from "
            "those values)"
            if not quant.not_dequantized
            else ""
        )
    )


def predict_loss(
    folder: ModelFolder,
    dtype: str,
    keep: Sequence[str],
    quantized: bool,
    progress: bool | None,
) -> Losses:
    """Scan the inputs as a conversion to ``dtype`` would, writing nothing."""
    plan = plan_conversion(folder, dtype, 2**62, keep, quantized)
    sizes = {p: p.stat().st_size for p in plan.sources}
    cast = [t for t in plan.tensors if t.is_cast]  # scan_plan reports them in plan order
    with ByteProgress(sum(t.entry.nbytes for t in cast), "scanning", progress) as update:
        found = _core.scan_plan(plan.to_dict(folder.root, sizes), progress=update)
    return Losses(
        TensorLoss(t.label, t.entry.dtype, t.dtype, **counts)
        for t, (_, counts) in zip(cast, found, strict=True)
    )
