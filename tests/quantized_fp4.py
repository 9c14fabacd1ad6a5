"""The 4-bit checkpoints of ``shared/reference/fp4-int4.md``, as their producers write them.

Each builder writes a tiny model folder under the producer's tensor names, dtypes, shapes
and config (Tables A and B of the reference) and returns a :class:`~quantized.QuantModel`
whose ``state`` names every quantization tensor and its role, as ``quantized.py`` does for
the older formats. compressed-tensors builds its own formats here (its presets, its
``calculate_qparams``/``generate_gparam``, its compressors and its config writer); gpt-oss
MXFP4, ModelOpt NVFP4 and DeepSeek-V4 follow the reference's rules in torch (ModelOpt is not
a dependency; its tensors are what ``_export_quantized_weight`` writes).

These are the formats fastcast recognises and protects (refused by a plain cast, kept byte
for byte by ``--keep-quantized``) but does not dequantize yet: ``ALL_FP4`` is kept apart
from ``quantized.ALL``, whose every member ``--dequantize`` handles.

Edge cases on purpose: E8M0 scale bytes 0 (2^-127) and 254 (2^127) in the gpt-oss experts,
a weight whose scales sit in the other shard, layers in the ``ignore`` list, MoE experts
(gpt-oss's stacked ones; ModelOpt's fused ones, made by ModelOpt itself, are in
test_modelopt.py), a 0-dim ModelOpt ``weight_scale_2``
beside a ``[1]`` compressed-tensors ``weight_global_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import require
from quantized import QuantModel, _finish, _json, _Llama, _seeded, _torch, _weight, ct_config

#: E2M1 magnitudes by 3-bit index (bit 3 of a code is the sign).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _fp4_codes(x: Any) -> Any:
    """Nearest E2M1 code of each value (ties to the even index), as uint8 0..15."""
    torch = _torch()
    table = torch.tensor(E2M1)
    idx = (x.abs().unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8)
    return idx | ((x < 0).to(torch.uint8) << 3)


def _pack_nibbles(codes: Any) -> Any:
    """Element 2k in the low nibble of byte k, 2k+1 in the high one, along the last axis."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def mxfp4(w: Any) -> tuple[Any, Any]:
    """OCP MX quantization of ``w[..., n]`` in blocks of 32: (packed codes U8 ``[..., n/2]``,
    E8M0 scale bytes U8 ``[..., n/32]``), the shared exponent ``floor(log2(amax)) - 2``."""
    torch = _torch()
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = blocks.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(amax)) - 2
    e = (exponent + 127).clamp(1, 254).to(torch.uint8)
    scaled = blocks / torch.pow(2.0, exponent).unsqueeze(-1)
    codes = _fp4_codes(scaled).reshape(w.shape)
    return _pack_nibbles(codes), e


# --- compressed-tensors ---------------------------------------------------------------------


def ct_fp4(tmp: Path, preset: str) -> QuantModel:
    """An llm-compressor 4-bit float checkpoint: ``MXFP4A16`` (``mxfp4-pack-quantized``:
    U8 codes, U8 E8M0 scales per 32) or ``NVFP4`` (``nvfp4-pack-quantized``: U8 codes,
    F8_E4M3 scales per 16, F32 ``[1]`` weight and input global scales, divisors), as
    RedHatAI's ``*-NVFP4`` repositories. compressed-tensors computes the scales and global
    scales and packs the weights; ``lm_head`` is ignored."""
    torch = _torch()
    ct = require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    fmt = {"MXFP4A16": "mxfp4-pack-quantized", "NVFP4": "nvfp4-pack-quantized"}[preset]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    group = scheme.weights.group_size
    compressor = BaseCompressor.get_value_from_registry(fmt)
    g = _seeded({"MXFP4A16": 41, "NVFP4": 42}[preset])
    llama = _Llama()
    bf16 = torch.bfloat16
    root = tmp / f"Llama-tiny-{preset}"
    model = QuantModel(f"ct-{preset.lower()}", root, "compressed-tensors", fmt, "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(bf16)
        groups = w.reshape(w.shape[0], -1, group)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        state: dict[str, Any] = {"weight": w}
        global_scale = None
        if preset == "NVFP4":
            global_scale = generate_gparam(w.amin(), w.amax())
            state["weight_global_scale"] = global_scale
        scale, _ = calculate_qparams(lo, hi, scheme.weights, global_scale=global_scale)
        state["weight_scale"] = scale
        packed = compressor.compress(state, scheme)
        out = {
            f"{x}.weight_packed": (packed["weight_packed"], "quantized weight"),
            f"{x}.weight_scale": (packed["weight_scale"], "scale"),
        }
        if preset == "NVFP4":
            out[f"{x}.weight_global_scale"] = (packed["weight_global_scale"], "scale")
            acts = (torch.randn(16, w.shape[1], generator=g) * 3).to(bf16)
            out[f"{x}.input_global_scale"] = (generate_gparam(acts.amin(), acts.amax()), "scale")
        return out

    tensors = llama.build(g, bf16, quantize, model)
    config = ct_config(root, llama, {"group_0": scheme}, fmt)
    assert config["quantization_config"]["version"] == ct.__version__
    # a weight in the first shard, its scales in the second
    return _finish(model, config, tensors, "model.layers.0.mlp.down_proj.weight_packed")


def ct_mxfp4(tmp: Path) -> QuantModel:
    """compressed-tensors preset MXFP4A16."""
    return ct_fp4(tmp, "MXFP4A16")


def ct_nvfp4(tmp: Path) -> QuantModel:
    """compressed-tensors preset NVFP4 (weights and activations)."""
    return ct_fp4(tmp, "NVFP4")


def ct_mixed(tmp: Path) -> QuantModel:
    """A ``mixed-precision`` compressed-tensors checkpoint: the MLPs NVFP4A16
    (``nvfp4-pack-quantized``), the attention W4A16 int4 (``pack-quantized``: I32 words,
    bf16 group scales, I64 ``weight_shape``), each group naming its own format."""
    torch = _torch()
    require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    mlp = preset_name_to_scheme("NVFP4A16", ["re:.*mlp.*"])
    attn = preset_name_to_scheme("W4A16", ["re:.*self_attn.*"])
    mlp.format, attn.format = "nvfp4-pack-quantized", "pack-quantized"
    g = _seeded(43)
    llama = _Llama()
    bf16 = torch.bfloat16
    root = tmp / "Llama-tiny-mixed"
    model = QuantModel("ct-mixed", root, "compressed-tensors", "mixed-precision", "bfloat16")

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(bf16)
        scheme = mlp if ".mlp." in x else attn
        group = scheme.weights.group_size
        groups = w.reshape(w.shape[0], -1, group)
        state: dict[str, Any] = {"weight": w}
        global_scale = None
        if scheme is mlp:
            global_scale = generate_gparam(w.amin(), w.amax())
            state["weight_global_scale"] = global_scale
        state["weight_scale"], zero = calculate_qparams(
            groups.amin(dim=-1), groups.amax(dim=-1), scheme.weights, global_scale=global_scale
        )
        state["weight_zero_point"] = zero
        packed = BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme)
        out = {f"{x}.weight_packed": (packed["weight_packed"], "quantized weight"),
               f"{x}.weight_scale": (packed["weight_scale"], "scale")}  # fmt: skip
        if scheme is mlp:
            out[f"{x}.weight_global_scale"] = (packed["weight_global_scale"], "scale")
        else:
            out[f"{x}.weight_shape"] = (packed["weight_shape"], "quant state")
        return out

    # attention groups of 128 need inputs of 128: a wider tiny Llama
    llama.hidden, llama.intermediate, llama.heads, llama.kv_heads = 128, 256, 4, 2
    tensors = llama.build(g, bf16, quantize, model)
    config = ct_config(root, llama, {"group_0": mlp, "group_1": attn}, "mixed-precision")
    return _finish(model, config, tensors)


#: compressed-tensors' integer presets and the format each is saved in.
CT_INT = {
    "W4A16": "pack-quantized",  # 4-bit, groups of 128, symmetric
    "W4A16_ASYM": "pack-quantized",  # zero points packed along the outputs
    "W8A16": "pack-quantized",  # 8-bit codes, four to a word
    "W8A8": "int-quantized",  # I8 codes, a scale per channel
}


def ct_int(
    tmp: Path,
    preset: str,
    dtype: str = "bfloat16",
    g_idx: bool = False,
    naive: dict[str, Any] | None = None,
) -> QuantModel:
    """An llm-compressor integer checkpoint, as Kimi K2 and the W4A16/W8A8 releases are:
    ``pack-quantized`` (I32 ``weight_packed`` ``[out, ceil(in * bits / 32)]``, I64
    ``weight_shape``, ``weight_scale`` in the model dtype, packed I32 ``weight_zero_point``
    when asymmetric) or ``int-quantized`` (I8 ``weight``), groups of 32 rather than the
    presets' 128 so that each row has several. compressed-tensors computes the
    scales and zero points and packs the codes; ``lm_head`` is ignored; layer 0's
    down_proj is split from its scale and shape by the shard boundary.

    ``g_idx``: the older activation-ordered layout (``actorder: "group"``, which
    compressed-tensors 0.20 no longer writes): each input's group is ``weight_g_idx[i]``,
    a permutation's rank over the group size, the codes quantized against their group's
    scale and packed by compressed-tensors' own ``pack_to_int32``.

    ``naive``: weight arguments overriding the preset's, saved as ``naive-quantized``
    (I8 codes as they are; asymmetric zero points I8 like the scale), e.g. W8A8 with a
    zero point per channel, or one scale for the tensor."""
    torch = _torch()
    require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    fmt = "naive-quantized" if naive else CT_INT[preset]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    for key, value in (naive or {}).items():
        setattr(args, key, value)
    if args.strategy == "group":  # several groups per row of this tiny model (presets: 128)
        args.group_size = 32
    compressor = BaseCompressor.get_value_from_registry(fmt)
    g = _seeded(50 + sorted(CT_INT).index(preset) + 10 * g_idx)
    llama = _Llama()
    llama.hidden, llama.intermediate, llama.heads, llama.kv_heads = 128, 256, 4, 2
    torch_dtype = getattr(torch, dtype)
    suffix = ("-gidx" if g_idx else "") + ("" if dtype == "bfloat16" else f"-{dtype}")
    suffix += "".join(f"-{k}-{v}" for k, v in (naive or {}).items())
    root = tmp / f"Llama-tiny-{preset}{suffix}"
    model = QuantModel(f"ct-{preset.lower()}{suffix}", root, "compressed-tensors", fmt, dtype)
    roles = {"weight_packed": "quantized weight", "weight": "quantized weight",
             "weight_scale": "scale", "weight_zero_point": "zero point",
             "weight_shape": "quant state", "weight_g_idx": "group index"}  # fmt: skip

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        w = w.to(torch_dtype)
        if g_idx:  # inputs grouped by a permutation's rank, as GPTQ's desc_act leaves them
            group = args.group_size
            order = torch.randperm(w.shape[1], generator=g)
            index = (torch.argsort(order) // group).to(torch.int32)
            chosen = w[:, order].reshape(w.shape[0], -1, group)  # group k: order[k*g:...]
            scale, _ = calculate_qparams(chosen.amin(dim=-1), chosen.amax(dim=-1), args)
            q = torch.round(w.float() / scale.float()[:, index.long()]).clamp(-8, 7)
            packed = pack_to_int32(q.to(torch.int8), 4)
            return {f"{x}.weight_packed": (packed, "quantized weight"),
                    f"{x}.weight_scale": (scale, "scale"),
                    f"{x}.weight_shape": (torch.tensor(w.shape), "quant state"),
                    f"{x}.weight_g_idx": (index, "group index")}  # fmt: skip
        if args.strategy == "group":
            groups = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        else:  # tensor
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        return {f"{x}.{k}": (v, roles[k]) for k, v in compressor.compress(state, scheme).items()}

    tensors = llama.build(g, torch_dtype, quantize, model)
    config = ct_config(root, llama, {"group_0": scheme}, fmt)
    config["torch_dtype"] = dtype
    if g_idx:
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    return _finish(model, config, tensors, "model.layers.0.mlp.down_proj.weight_scale")


# --- gpt-oss MXFP4 --------------------------------------------------------------------------

#: A tiny gpt-oss: E experts, hidden H, intermediate I (multiples of 32).
GPT_OSS = {"experts": 4, "hidden": 64, "intermediate": 64, "layers": 2, "vocab": 128}


def gpt_oss_config(quantization_config: dict[str, Any] | None) -> dict[str, Any]:
    s = GPT_OSS
    config: dict[str, Any] = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_local_experts": s["experts"],
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": s["vocab"],
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"],
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    return config


def gpt_oss_mxfp4(tmp: Path, edges: bool = True) -> QuantModel:
    """openai/gpt-oss-20b as transformers' converter writes it (``quant_method: mxfp4``):
    each layer's experts stacked, ``gate_up_proj_blocks`` U8 ``[E, 2I, H/32, 16]`` (gate and
    up rows interleaved) and ``gate_up_proj_scales`` U8 E8M0 ``[E, 2I, H/32]``, the same for
    ``down_proj``; biases, attention (with sinks), router, norms and embeddings bf16. One
    scale byte is 0 and one 254 (the E8M0 edges; ``edges=False`` for finite logits), and
    layer 0's ``down_proj_scales`` sit in the second shard, away from its blocks."""
    torch = _torch()
    s = GPT_OSS
    e, h, inter = s["experts"], s["hidden"], s["intermediate"]
    g = _seeded(44)
    bf16 = torch.bfloat16
    root = tmp / "gpt-oss-tiny"
    model = QuantModel("gpt-oss-mxfp4", root, "mxfp4", "gpt-oss experts", "bfloat16")
    tensors: dict[str, Any] = {"model.embed_tokens.weight": _weight(g, s["vocab"], h).to(bf16)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}"
        for proj, (o, n) in {"q": (64, h), "k": (32, h), "v": (32, h), "o": (h, 64)}.items():
            tensors[f"{p}.self_attn.{proj}_proj.weight"] = _weight(g, o, n).to(bf16)
            tensors[f"{p}.self_attn.{proj}_proj.bias"] = (torch.randn(o, generator=g) * 0.01).to(
                bf16
            )
        tensors[f"{p}.self_attn.sinks"] = torch.randn(4, generator=g).to(bf16)
        tensors[f"{p}.mlp.router.weight"] = _weight(g, e, h).to(bf16)
        tensors[f"{p}.mlp.router.bias"] = torch.zeros(e, dtype=bf16)
        for proj, (o, n) in {"gate_up_proj": (2 * inter, h), "down_proj": (h, inter)}.items():
            w = torch.stack([_weight(g, o, n) for _ in range(e)])
            blocks, scales = mxfp4(w)
            if edges and i == 0 and proj == "gate_up_proj":
                scales[0, 0, 0], scales[0, 1, 0] = 0, 254
            name = f"{p}.mlp.experts.{proj}"
            tensors[f"{name}_blocks"] = blocks.reshape(e, o, n // 32, 16)
            tensors[f"{name}_scales"] = scales
            tensors[f"{name}_bias"] = (torch.randn(e, o, generator=g) * 0.01).to(bf16)
            model.state[f"{name}_blocks"] = "quantized weight"
            model.state[f"{name}_scales"] = "scale"
        tensors[f"{p}.input_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(bf16)
        tensors[f"{p}.post_attention_layernorm.weight"] = (
            1 + 0.1 * torch.randn(h, generator=g)
        ).to(bf16)
    tensors["model.norm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(bf16)
    tensors["lm_head.weight"] = _weight(g, s["vocab"], h).to(bf16)
    # down_proj_blocks of layer 0 end the first shard; its scales open the second
    first, moved = (f"model.layers.0.mlp.experts.down_proj_{x}" for x in ("blocks", "scales"))
    names = [k for k in tensors if k != moved]
    cut = names.index(first) + 1
    tensors = {k: tensors[k] for k in [*names[:cut], moved, *names[cut:]]}
    qc = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    return _finish(model, gpt_oss_config(qc), tensors, first)


def gpt_oss_original(tmp: Path) -> QuantModel:
    """gpt-oss's own ``original/`` layout (``gpt_oss/torch/weights.py``): no
    ``quantization_config``, ``block.N.mlp.mlp1_weight.blocks`` / ``.scales`` U8, the same
    shapes as the transformers layout."""
    torch = _torch()
    s = GPT_OSS
    e, h, inter = s["experts"], s["hidden"], s["intermediate"]
    g = _seeded(45)
    bf16 = torch.bfloat16
    root = tmp / "gpt-oss-tiny-original"
    model = QuantModel("gpt-oss-original", root, None, "gpt-oss original/ layout", "bfloat16")
    tensors: dict[str, Any] = {"embedding.weight": _weight(g, s["vocab"], h).to(bf16)}
    for i in range(s["layers"]):
        p = f"block.{i}"
        tensors[f"{p}.attn.norm.scale"] = torch.ones(h)
        tensors[f"{p}.attn.qkv.weight"] = _weight(g, 128, h).to(bf16)
        tensors[f"{p}.attn.sinks"] = torch.randn(4, generator=g).to(bf16)
        tensors[f"{p}.mlp.norm.scale"] = torch.ones(h)
        tensors[f"{p}.mlp.gate.weight"] = _weight(g, e, h).to(bf16)
        for proj, (o, n) in {"mlp1": (2 * inter, h), "mlp2": (h, inter)}.items():
            blocks, scales = mxfp4(torch.stack([_weight(g, o, n) for _ in range(e)]))
            tensors[f"{p}.mlp.{proj}_weight.blocks"] = blocks.reshape(e, o, n // 32, 16)
            tensors[f"{p}.mlp.{proj}_weight.scales"] = scales
            tensors[f"{p}.mlp.{proj}_bias"] = torch.zeros(e, o, dtype=bf16)
            model.state[f"{p}.mlp.{proj}_weight.blocks"] = "quantized weight"
            model.state[f"{p}.mlp.{proj}_weight.scales"] = "scale"
    tensors["norm.scale"] = torch.ones(h)
    tensors["unembedding.weight"] = _weight(g, s["vocab"], h).to(bf16)
    config = {"num_hidden_layers": s["layers"], "num_experts": e, "experts_per_token": 2,
              "vocab_size": s["vocab"], "hidden_size": h, "intermediate_size": inter,
              "swiglu_limit": 7.0, "head_dim": 16, "num_attention_heads": 4,
              "num_key_value_heads": 2, "sliding_window": 128}  # fmt: skip
    return _finish(model, config, tensors)


# --- ModelOpt NVFP4 -------------------------------------------------------------------------


def nvfp4_modelopt(w: Any) -> tuple[Any, Any, Any]:
    """ModelOpt's NVFP4 of ``w[out, in]``: (packed U8 ``[out, in/2]``, F8_E4M3 block scales
    ``[out, in/16]``, F32 0-dim ``weight_scale_2 = amax / (6 * 448)``, a multiplier)."""
    torch = _torch()
    w = w.float()
    scale_2 = w.abs().amax() / (6.0 * 448.0)
    blocks = w.reshape(w.shape[0], -1, 16)
    block_scale = (blocks.abs().amax(dim=-1) / (6.0 * scale_2)).to(torch.float8_e4m3fn)
    per_block = block_scale.float() * scale_2
    codes = _fp4_codes(blocks / per_block.clamp(min=1e-30).unsqueeze(-1)).reshape(w.shape)
    return _pack_nibbles(codes), block_scale, scale_2.reshape(())


def modelopt_nvfp4(tmp: Path, form: str = "sidecar", algo: str = "NVFP4") -> QuantModel:
    """An NVIDIA ModelOpt NVFP4 export (``unified_export_hf.py``): each quantized Linear's
    ``weight`` U8 ``[out, in/2]`` (under the bf16 weight's name), ``weight_scale`` F8_E4M3
    ``[out, in/16]``, ``weight_scale_2`` F32 0-dim and ``input_scale`` F32 0-dim;
    ``hf_quant_config.json`` beside it. ``form="sidecar"``: the quantization is declared
    only there (config.json has none); ``"config"``: config.json's CT-looking dict with
    ``quant_method: modelopt`` too. ``algo="NVFP4_AWQ"`` adds ``pre_quant_scale`` (the
    input smoothing a plain Linear would have to fold in)."""
    torch = _torch()
    g = _seeded(46)
    llama = _Llama()
    bf16 = torch.bfloat16
    root = tmp / f"Llama-tiny-modelopt-{algo}-{form}"
    model = QuantModel(f"modelopt-{algo.lower()}-{form}", root,
                       "modelopt" if form == "config" else None, algo, "bfloat16")  # fmt: skip

    def quantize(x: str, w: Any, bias: Any) -> dict[str, tuple[Any, str]]:
        packed, scale, scale_2 = nvfp4_modelopt(w.to(bf16))
        out = {
            f"{x}.weight": (packed, "quantized weight"),
            f"{x}.weight_scale": (scale, "scale"),
            f"{x}.weight_scale_2": (scale_2, "scale"),
            f"{x}.input_scale": (torch.tensor(0.0123, dtype=torch.float32).reshape(()), "scale"),
        }
        if algo == "NVFP4_AWQ":
            out[f"{x}.pre_quant_scale"] = (
                (1 + 0.1 * torch.rand(w.shape[1], generator=g)).to(bf16),
                "scale",
            )
        return out

    tensors = llama.build(g, bf16, quantize, model)
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16,
                    "exclude_modules": ["lm_head"]}  # fmt: skip
    config = llama.config("bfloat16", {})
    del config["quantization_config"]
    if form == "config":
        weights = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
        config["quantization_config"] = {
            "config_groups": {"group_0": {"weights": weights, "targets": ["Linear"]}},
            "ignore": ["lm_head"],
            "quant_algo": algo,
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quant_method": "modelopt",
        }
    root.mkdir(parents=True, exist_ok=True)
    producer = {"name": "modelopt", "version": "0.47.0"}
    _json(root / "hf_quant_config.json", {"producer": producer, "quantization": quantization})
    return _finish(model, config, tensors)


def modelopt_sidecar(tmp: Path) -> QuantModel:
    return modelopt_nvfp4(tmp, "sidecar")


def modelopt_config(tmp: Path) -> QuantModel:
    return modelopt_nvfp4(tmp, "config")


# --- DeepSeek-V4 ----------------------------------------------------------------------------


def deepseek_v4(tmp: Path) -> QuantModel:
    """A DeepSeek-V4-style checkpoint as transformers reads it: ``quant_method: fp8`` with
    ``scale_fmt: ue8m0`` and ``expert_dtype: fp4``; dense Linears F8_E4M3 ``.weight`` with
    F8_E8M0 ``.scale`` per 128x128 block, routed experts FP4 packed in I8 ``[out, in/2]``
    with F8_E8M0 ``.scale`` per 32. The on-disk dtypes are the reference's best reading
    (its section 7: not confirmed), so fastcast keeps it and refuses to dequantize it."""
    torch = _torch()
    g = _seeded(47)
    bf16 = torch.bfloat16
    root = tmp / "DeepSeek-V4-tiny"
    model = QuantModel("deepseek-v4", root, "fp8", "ue8m0 scales, fp4 experts", "bfloat16")
    h, inter, e = 128, 128, 2
    e8m0 = torch.float8_e8m0fnu
    tensors: dict[str, Any] = {"embed.weight": _weight(g, 128, h).to(bf16)}
    for i in range(2):
        p = f"layers.{i}"
        for proj in ("wq", "wo"):
            w = _weight(g, h, h)
            tensors[f"{p}.attn.{proj}.weight"] = w.to(torch.float8_e4m3fn)
            tensors[f"{p}.attn.{proj}.scale"] = torch.ones(1, 1).to(e8m0)
            model.state[f"{p}.attn.{proj}.weight"] = "quantized weight"
            model.state[f"{p}.attn.{proj}.scale"] = "scale"
        for x in range(e):
            for proj, (o, n) in {"w1": (inter, h), "w2": (h, inter), "w3": (inter, h)}.items():
                packed, scales = mxfp4(_weight(g, o, n))
                name = f"{p}.ffn.experts.{x}.{proj}"
                tensors[f"{name}.weight"] = packed.view(torch.int8)
                tensors[f"{name}.scale"] = scales.view(e8m0)
                model.state[f"{name}.weight"] = "quantized weight"
                model.state[f"{name}.scale"] = "scale"
        tensors[f"{p}.ffn.gate.weight"] = _weight(g, e, h).to(bf16)
        tensors[f"{p}.ffn.gate.bias"] = torch.zeros(e, dtype=torch.float32)
        tensors[f"{p}.attn_norm.weight"] = torch.ones(h, dtype=bf16)
    tensors["norm.weight"] = torch.ones(h, dtype=bf16)
    tensors["head.weight"] = _weight(g, 128, h).to(bf16)
    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "hidden_size": h,
        "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "scale_fmt": "ue8m0",
                                "weight_block_size": [128, 128], "expert_dtype": "fp4"},
    }  # fmt: skip
    return _finish(model, config, tensors)


ALL_FP4: dict[str, Callable[[Path], QuantModel]] = {
    "ct-mxfp4": ct_mxfp4,
    "ct-nvfp4": ct_nvfp4,
    "ct-mixed": ct_mixed,
    "ct-w4a16": lambda tmp: ct_int(tmp, "W4A16"),
    "ct-w4a16_asym": lambda tmp: ct_int(tmp, "W4A16_ASYM"),
    "ct-w8a16": lambda tmp: ct_int(tmp, "W8A16"),
    "ct-w8a8": lambda tmp: ct_int(tmp, "W8A8"),
    "ct-w4a16-gidx": lambda tmp: ct_int(tmp, "W4A16", g_idx=True),
    "gpt-oss-mxfp4": gpt_oss_mxfp4,
    "modelopt-nvfp4-sidecar": modelopt_sidecar,
    "modelopt-nvfp4-config": modelopt_config,
    "deepseek-v4": deepseek_v4,
}
"""The 4-bit layouts fastcast protects and keeps: every quantization-aware command runs
against each (``gpt-oss-original`` and ModelOpt's ``NVFP4_AWQ`` are refused by name)."""
