"""torch.save checkpoints in, safetensors out: every tensor bit-exact against
``torch.load(weights_only=True)`` then ``.to()``, for files torch itself saved (a tied
Llama, a BERT with its int64 buffer, sharded ``.bin`` with an index, a nested ``.pth``,
a DDP one, fp8 and unsigned tensors); transformers loads the converted folders with no
arguments and gives the same outputs; ``--resume`` and ``--strict`` work on ``.bin``."""

from __future__ import annotations

import json

import pytest

import fastcast
from commands import cli, killed, ok, refused
from conftest import require
from folders import load_all, snapshot
from torch_files import nested_checkpoint, odd_dtypes, save_bert_bin, save_llama_bin


@pytest.fixture(scope="module")
def st():
    return require("safetensors.torch")


def assert_same(torch, got: dict, state: dict, dtype=None, dropped=()) -> None:
    """``got`` holds every tensor of ``state`` but ``dropped``, bit for bit as torch
    casts it (floats to ``dtype`` if given)."""
    assert set(got) == set(state) - set(dropped)
    for name, got_t in got.items():
        want = state[name]
        if dtype is not None and want.is_floating_point():
            want = want.to(dtype)
        assert got_t.dtype == want.dtype and got_t.shape == want.shape, name
        assert torch.equal(
            got_t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        ), name


def test_tied_llama_bin_to_safetensors_without_a_dtype(tmp_path, torch, st):
    transformers = require("transformers")
    src = tmp_path / "llama"
    save_llama_bin(src)
    before = snapshot(src)
    stdout = ok(cli("convert", src))
    out = tmp_path / "llama-safetensors"
    assert "lm_head.weight (= model.embed_tokens.weight)" in stdout
    oracle = torch.load(src / "pytorch_model.bin", weights_only=True)
    assert_same(torch, load_all(st, out), oracle, dropped={"lm_head.weight"})
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert not list(out.glob("*.bin")) and snapshot(src) == before
    # transformers loads it with no arguments and computes the same thing
    ids = torch.tensor([[1, 5, 9, 3]])
    a = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert "OK" in ok(cli("verify", out))


def test_tied_llama_bin_to_bf16_and_transformers_agrees(tmp_path, torch, st):
    transformers = require("transformers")
    src = tmp_path / "llama"
    save_llama_bin(src)
    out = tmp_path / "out"
    ok(cli("convert", src, "-o", out, "--dtype", "bf16", "--verify"))
    oracle = torch.load(src / "pytorch_model.bin", weights_only=True)
    assert_same(torch, load_all(st, out), oracle, torch.bfloat16, dropped={"lm_head.weight"})
    a = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert b.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_sharded_bin_with_index(tmp_path, torch, st):
    src = tmp_path / "llama"
    state = save_llama_bin(src, shards=3)
    assert len(list(src.glob("pytorch_model-*.bin"))) == 3
    out = tmp_path / "out"
    ok(cli("convert", src, "-o", out, "--dtype", "fp16", "--shard-size", "60KB"))
    got = load_all(st, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert not (out / "pytorch_model.bin.index.json").exists()
    dropped = set(state) - set(got)
    assert dropped <= {"lm_head.weight"}  # tied within one shard: written once
    assert_same(torch, got, {k: v for k, v in state.items()}, torch.float16, dropped=dropped)
    assert "OK" in ok(cli("verify", out))


def test_bert_with_its_int64_buffer(tmp_path, torch, st):
    transformers = require("transformers")
    src = tmp_path / "bert"
    state = save_bert_bin(src)
    out = tmp_path / "out"
    ok(cli("convert", src, "-o", out, "--dtype", "bf16"))
    got = load_all(st, out)
    assert got["embeddings.position_ids"].dtype == torch.int64
    assert_same(torch, got, state, torch.bfloat16)
    b = transformers.AutoModel.from_pretrained(out).eval()
    a = transformers.AutoModel.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[2, 7, 8, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids).last_hidden_state, b(ids).last_hidden_state)


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_nested_pth(tmp_path, torch, st, ddp):
    state = odd_dtypes()
    path = tmp_path / "last.pth"
    torch.save(nested_checkpoint(state, ddp=ddp), path)
    out = tmp_path / "out"
    extra = ["--strip-prefix", "module."] if ddp else []
    stdout = ok(cli("convert", path, "-o", out, *extra))
    assert "other keys skipped: 'epoch', 'optimizer'" in stdout
    assert_same(torch, load_all(st, out), state)
    assert "OK" in ok(cli("verify", out))
    if ddp:
        note = ok(cli("convert", path, "-o", tmp_path / "kept"))
        assert "--strip-prefix module." in note
        assert all(k.startswith("module.") for k in load_all(st, tmp_path / "kept"))


def test_fp8_and_unsigned_tensors_cast_and_copied(tmp_path, torch, st):
    state = odd_dtypes()
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    out = tmp_path / "out"
    ok(cli("convert", path, "-o", out, "--dtype", "bf16"))
    assert_same(torch, load_all(st, out), state, torch.bfloat16)


def test_a_state_dict_key_chooses_among_several(tmp_path, torch, st):
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    path = tmp_path / "two.ckpt"
    torch.save({"model": a, "state_dict": b}, path)
    refused(cli("convert", path, "-o", tmp_path / "out"), "ambiguous", "--state-dict-key")
    ok(cli("convert", path, "-o", tmp_path / "out", "--state-dict-key", "model"))
    assert_same(torch, load_all(st, tmp_path / "out"), a)


def test_inspect_and_verify_take_the_same_choice_of_state_dict(tmp_path, torch):
    """An ambiguous checkpoint: inspect refuses it as convert does, and with the key
    (or the prefix to strip) describes that state dict; verify --against it with the
    same flags checks the output of a conversion made with them."""
    path = tmp_path / "two.ckpt"
    torch.save({"model": {"module.w": torch.ones(2, 3)},
                "state_dict": {"module.v": torch.zeros(5)}}, path)  # fmt: skip
    refused(cli("inspect", path), "ambiguous", "--state-dict-key")
    shown = ok(cli("inspect", path, "--state-dict-key", "model", "--strip-prefix", "module."))
    assert "1 tensors" in shown, shown
    out = tmp_path / "out"
    flags = ("--state-dict-key", "model", "--strip-prefix", "module.")
    ok(cli("convert", path, "-o", out, "--dtype", "bf16", *flags))
    assert "OK" in ok(cli("verify", out))  # from fastcast.json
    assert "OK" in ok(cli("verify", out, "--against", path, "--dtype", "bf16", *flags))
    r = cli("verify", out, "--against", path, "--dtype", "bf16", "--state-dict-key", "model")
    assert r.returncode != 0, "without the prefix stripped, the names do not pair"


def test_a_transposed_view_is_refused_by_name(tmp_path, torch):
    w = torch.randn(4, 3)
    path = tmp_path / "views.bin"
    torch.save({"w": w, "wt": w.t()}, path)
    line = refused(cli("convert", path, "-o", tmp_path / "out"), "views.bin", "'wt'", "view")
    assert "contiguous" in line and not (tmp_path / "out").exists()


def test_safetensors_win_over_bin_beside_them(tmp_path, torch, st):
    src = tmp_path / "both"
    state = save_llama_bin(src)
    st.save_file({"x": torch.ones(3)}, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 stale and unreadable")
    report = fastcast.convert(src, "bf16", output=tmp_path / "out", progress=False)
    assert set(load_all(st, tmp_path / "out")) == {"x"}
    assert "pytorch_model.bin" in report.skipped
    assert "safetensors beside them" in report.summary()
    del state


def test_adapter_and_diffusers_bin_in_subfolders(tmp_path, torch, st):
    src = tmp_path / "pipe"
    (src / "unet").mkdir(parents=True)
    (src / "lora").mkdir()
    unet = {"conv.weight": torch.randn(4, 4, 3, 3), "conv.bias": torch.randn(4)}
    lora = {"base_model.model.q_proj.lora_A.weight": torch.randn(2, 8)}
    torch.save(unet, src / "unet" / "diffusion_pytorch_model.bin")
    torch.save(lora, src / "lora" / "adapter_model.bin")
    (src / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (src / "lora" / "adapter_config.json").write_text('{"r": 2}')
    (src / "lora" / "training_args.bin").write_bytes(b"not weights")
    out = tmp_path / "out"
    ok(cli("convert", src, "-o", out, "--dtype", "fp16"))
    assert_same(
        torch,
        st.load_file(str(out / "unet/diffusion_pytorch_model.safetensors")),
        unet,
        torch.float16,
    )
    assert_same(
        torch, st.load_file(str(out / "lora/adapter_model.safetensors")), lora, torch.float16
    )
    assert (out / "lora/adapter_config.json").exists()
    assert not (out / "lora/training_args.bin").exists()


def test_resume_and_strict_on_bin(tmp_path, torch, st):
    src = tmp_path / "llama"
    save_llama_bin(src, shards=2)
    out = tmp_path / "out"
    killed("executed", "convert", src, "-o", out, "--dtype", "bf16", "--shard-size", "40KB")
    ok(cli("convert", src, "-o", out, "--dtype", "bf16", "--shard-size", "40KB", "--resume"))
    fresh = tmp_path / "fresh"
    ok(cli("convert", src, "-o", fresh, "--dtype", "bf16", "--shard-size", "40KB"))
    assert snapshot(out) == snapshot(fresh)
    hot = tmp_path / "hot.bin"
    torch.save({"w": torch.tensor([1.0, 7e4])}, hot)
    refused(cli("convert", hot, "-o", tmp_path / "o2", "--dtype", "fp16", "--strict"), "overflowed")
    assert not (tmp_path / "o2").exists()
