"""Small model folders built directly with safetensors, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path


def tensors(torch, n_layers: int = 3, width: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"model.embed_tokens.weight": torch.randn(32, width, generator=g)}
    for i in range(n_layers):
        out[f"model.layers.{i}.mlp.weight"] = torch.randn(width, width, generator=g) * 10
        out[f"model.layers.{i}.norm.weight"] = torch.ones(width)
    out["model.step"] = torch.tensor([7, -3], dtype=torch.int64)
    out["model.mask"] = torch.tensor([True, False, True])
    out["model.packed4bit"] = torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g)
    return out


def save_folder(st, folder: Path, state: dict, shards: int = 1, prefix: str = "model") -> Path:
    """Save ``state`` as ``shards`` files (+ index when more than one) and a config."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        st.save_file(state, str(folder / f"{prefix}.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups, 1):
            fname = f"{prefix}-{i:05d}-of-{shards:05d}.safetensors"
            st.save_file(
                {k: state[k] for k in group}, str(folder / fname), metadata={"format": "pt"}
            )
            weight_map.update({k: fname for k in group})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["Tiny"],
        "hidden_size": 64,
        "torch_dtype": "float32",
        "text_config": {"model_type": "tiny_text", "dtype": "float32", "vocab_size": 32},
        # A nested dict that is not a sub-config: its "dtype" is not the model's.
        "rope_scaling": {"type": "linear", "factor": 2.0, "dtype": "int4"},
        "z_last": 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too), relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load_all(st, folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def raw_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """Each tensor of a safetensors file: (dtype, its bytes), whatever its dtype (read
    by fastcast's header reader; numpy and torch lack some dtypes)."""
    import fastcast

    header = fastcast.read_header(path)
    data = path.read_bytes()[header["data_start"] :]
    return {name: (dtype, data[b:e]) for name, dtype, _, (b, e) in header["tensors"]}
