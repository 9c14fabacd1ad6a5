"""The hostile torch.save corpus (torch_corpus.py, one case per class of the reference's
section 6) end to end: ``fastcast convert`` of a model folder holding each file either
refuses it with one line naming the file (exit 1, no traceback, nothing written, the
input untouched) or, for the few harmless oddities, converts it exactly; in every case
within a time limit, and the canary that an executed payload would create never appears.

The payloads are live: unpickled by Python's own ``pickle`` (what a careless reader
does), they create the canary. That is checked here too, so its absence means something.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastcast
from folders import snapshot
from torch_corpus import CASES, NAME, weights
from torch_files import torch_file

CONFIG = '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}'


def fastcast_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcast.cli", *map(str, args)],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("fastcast: warning:")]
    assert len(lines) == 1 and lines[0].startswith("fastcast: error: "), r.stderr
    return lines[0]


def test_the_corpus_covers_at_least_40_classes():
    classes = {c.number for c in CASES.values()} | {64}  # 64: test_a_symlink_out_is_refused
    assert len(classes) >= 40, sorted(classes)
    assert all(1 <= n <= 65 for n in classes)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_hostile_file_in_a_model_folder(tmp_path, case_id):
    case = CASES[case_id]
    canary = tmp_path / "canary"
    model = tmp_path / "model"
    case.write(model, canary)
    (model / "config.json").write_text(CONFIG)
    before = snapshot(model)
    out = tmp_path / "out"
    r = fastcast_cli("convert", model, "-o", out)
    assert not canary.exists(), "a payload ran"
    assert snapshot(model) == before, "the input changed"
    if case.outcome == "read" or (case.outcome == "either" and r.returncode == 0):
        assert r.returncode == 0, f"{case_id}: {r.stderr}"
        assert (out / "model.safetensors").is_file()
        return
    line = one_error_line(r)
    assert NAME in line, line
    assert not out.exists(), "a refused run leaves no output"


@pytest.mark.parametrize(
    "case_id", sorted(c.id for c in CASES.values() if c.number <= 13 and c.outcome == "refused")
)
def test_hostile_file_named_directly(tmp_path, case_id):
    """The same files passed as the input itself, under names torch users give them."""
    canary = tmp_path / "canary"
    path = CASES[case_id].write(tmp_path / "m", canary)
    for name in ("model.pt", "weights.pth", "last.ckpt", "odd.name"):
        renamed = path.rename(path.with_name(name))
        line = one_error_line(fastcast_cli("convert", renamed, "-o", tmp_path / "out"))
        assert name in line, line
        path = renamed
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_refusals_raise_the_checkpoint_error(tmp_path):
    canary = tmp_path / "canary"
    path = CASES["01-posix-system"].write(tmp_path / "m", canary)
    with pytest.raises(fastcast.InvalidCheckpointError) as info:
        fastcast.convert(tmp_path / "m", output=tmp_path / "out", progress=False)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not canary.exists()
    with pytest.raises(fastcast.InvalidCheckpointError):
        fastcast.inspect(path)


def test_inspect_and_verify_refuse_too(tmp_path):
    canary = tmp_path / "canary"
    CASES["07-rebuild-from-type-arbitrary"].write(tmp_path / "m", canary)
    one_error_line(fastcast_cli("inspect", tmp_path / "m"))
    good = tmp_path / "good"
    good.mkdir()
    (good / NAME).write_bytes(torch_file(weights()))
    out = tmp_path / "out"
    assert fastcast_cli("convert", good, "-o", out).returncode == 0
    one_error_line(fastcast_cli("verify", out, "--against", tmp_path / "m"))
    assert not canary.exists()


def test_a_symlink_out_is_refused(tmp_path):
    """(64) a weights file linking outside the model folder."""
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(torch_file(weights()))
    model = tmp_path / "model"
    model.mkdir()
    (model / NAME).symlink_to(outside)
    line = one_error_line(fastcast_cli("convert", model, "-o", tmp_path / "out"))
    assert "outside the model folder" in line
    # The file the user names is trusted as it is, link or not.
    linked = tmp_path / "link.bin"
    linked.symlink_to(outside)
    assert fastcast_cli("convert", linked, "-o", tmp_path / "out2").returncode == 0


# --- the payloads are live ----------------------------------------------------------------------

LIVE = [
    "01-posix-system",
    "02-builtins-eval",
    "02-builtins-exec",
    "02-builtins-getattr-import",
    "03-stack-global-from-memo",
    "04-inst",
    "04-obj",
    "09-legacy-raw-with-rce",
    "10-tar-layout",
    "11-torchscript",
    "13-hidden-pickle-unreferenced",
    "47-duplicate-data-pkl",
]

UNPICKLE = """
import collections, io, pickle, sys, tarfile, zipfile

class Careless(pickle.Unpickler):
    # what a reader that trusts pickle does, minus torch: torch's rebuilds are stubs
    def find_class(self, module, name):
        if module.startswith("torch"):
            return lambda *args, **kwargs: None
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return None

def load(data):
    f = io.BytesIO(data)
    while f.tell() < len(data):
        Careless(f).load()

raw = open(sys.argv[1], "rb").read()
if raw.startswith(b"PK"):
    z = zipfile.ZipFile(io.BytesIO(raw))
    for info in z.infolist():
        if info.filename.endswith(".pkl") or "/data/9" in info.filename:
            try:
                load(z.read(info))  # zipfile reads the last of two same-named entries
            except Exception:
                pass
elif raw[257:262] == b"ustar":
    load(tarfile.open(fileobj=io.BytesIO(raw)).extractfile("pickle").read())
else:
    load(raw)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the payloads call posix.system")
@pytest.mark.parametrize("case_id", LIVE)
def test_the_payload_would_run_under_pickle(tmp_path, case_id):
    canary = tmp_path / "canary"
    path = CASES[case_id].write(tmp_path / "m", canary)
    subprocess.run(
        [sys.executable, "-c", UNPICKLE, str(path)], capture_output=True, check=False, timeout=60
    )
    assert canary.exists(), f"{case_id}: the payload is not live, so its canary proves nothing"
