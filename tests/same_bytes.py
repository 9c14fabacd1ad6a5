"""Same bytes, same messages: a broad set of conversions run with a baseline build of
fastcast and with this checkout, every output file compared byte for byte
(``fastcast.json`` aside: it records the run), exit codes and messages too.

    python3 tests/same_bytes.py --baseline cd75e6f [--work /tmp/same-bytes] [--jobs 2]

The baseline commit is checked out in a git worktree, built as a wheel (maturin) and
unpacked beside it; each conversion runs the CLI in a subprocess, once with the
baseline on ``PYTHONPATH`` and once with this checkout's installed fastcast. Inputs are
the test suite's own: every zoo layout, every quantized fixture, Llama and Mixtral
built by transformers, a ``.bin`` model, LoRA adapters made by PEFT. A refactoring keeps
this at zero differences; the count of conversions and every difference are printed, and
the exit code is 1 when any differs. Not part of the pytest run: it builds another
fastcast (a minute) and runs some 250 conversions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Case:
    """One conversion: its name, its model and its flags (``-o`` is added)."""

    name: str
    model: Path
    flags: tuple[str, ...]


def build_baseline(rev: str, work: Path) -> Path:
    """The baseline's fastcast, unpacked from a wheel built at ``rev``: its folder."""
    site = work / f"baseline-{rev}"
    if (site / "fastcast").is_dir():
        return site
    tree = work / f"tree-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", str(tree), rev],
                       check=True, capture_output=True)  # fmt: skip
    wheels = work / f"wheel-{rev}"
    subprocess.run([sys.executable, "-m", "maturin", "build", "--release", "-q", "-o",
                    str(wheels)], check=True, cwd=tree)  # fmt: skip
    with zipfile.ZipFile(next(wheels.glob("fastcast-*.whl"))) as whl:
        whl.extractall(site)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                   check=False, capture_output=True)  # fmt: skip
    return site


def inputs(work: Path) -> Iterator[Case]:
    """Every case: the zoo in each mode, the quantized fixtures (4-bit ones included;
    they are refused by builds before issue 28) three ways, --quantize
    on models transformers built (the inputs are made anew each run: seconds)."""
    from models import build_llama, build_mixtral
    from quantized import ALL
    from quantized_fp4 import ALL_FP4
    from zoo import ZOO

    root = work / "inputs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name, make in ZOO.items():
        layout = make(root / name)
        if layout.is_target:
            continue  # an output folder, not a model
        v = ("--variant", layout.variant) if layout.variant else ()
        model = layout.model
        for dtype in ("bf16", "fp16", "fp32", "fp8_e4m3"):
            yield Case(f"{name}-{dtype}", model, ("--dtype", dtype, *v))
        yield Case(f"{name}-keep", model, ("--dtype", "bf16", "--keep", "*norm*", *v))
        yield Case(f"{name}-strict", model, ("--dtype", "fp16", "--strict", *v))
        yield Case(f"{name}-as-is", model, v)
        yield Case(f"{name}-shards", model, ("--dtype", "bf16", "--shard-size", "2KB", *v))
    for name, make in {**ALL, **ALL_FP4}.items():
        model = make(root / "q" / name).path
        for target in ("bf16", "fp16"):
            yield Case(f"{name}-refused-{target}", model, ("--dtype", target))
            yield Case(f"{name}-keep-quantized-{target}", model,
                       ("--dtype", target, "--keep-quantized"))  # fmt: skip
        for target in ("bf16", "fp32"):
            yield Case(f"{name}-dequantize-{target}", model,
                       ("--dtype", target, "--dequantize"))  # fmt: skip
    for name, build in (("llama-hf", build_llama), ("mixtral-hf", build_mixtral)):
        model = build(root / name, dtype="bfloat16", hidden_size=256, intermediate_size=512)
        for scheme in ("fp8", "fp8-channel"):
            yield Case(f"{name}-{scheme}", model, ("--dtype", "bf16", "--quantize", scheme))
            yield Case(f"{name}-{scheme}-fp32", model, ("--dtype", "fp32", "--quantize", scheme))
            yield Case(f"{name}-{scheme}-own", model, ("--quantize", scheme))
    yield from merges(root)


def merges(root: Path) -> Iterator[Case]:
    """--merge-lora: LoRA on attention and MLP to each target, as-is, in small shards and
    quantized; ``modules_to_save``; ``layer_replication``; GPT-2's Conv1D; a quantized
    base dequantized. Adapters made by PEFT, as the merge tests make them."""
    import fastcast
    from adapters import build_gpt2, make_adapter
    from models import build_llama
    from quantized import ALL

    llama = build_llama(root / "merge-llama", tie_word_embeddings=False, num_hidden_layers=4)
    lora = make_adapter(llama, root / "ad-lora", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])  # fmt: skip
    for flags in (("--dtype", "bf16"), ("--dtype", "fp32"), (), ("--dtype", "fp16"),
                  ("--dtype", "bf16", "--shard-size", "100KB"),
                  ("--dtype", "bf16", "--quantize", "fp8"),  # refused: no weight fits its blocks
                  ("--dtype", "bf16", "--quantize", "fp8-channel"), ("--quantize", "fp8-channel"),
                  ("--dtype", "bf16", "--keep", "*mlp*")):  # fmt: skip
        tag = "-".join(f.strip("-*") for f in flags) or "as-is"
        yield Case(f"merge-lora-{tag}", llama, ("--merge-lora", str(lora), *flags))
    adapters = {
        "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "layer-replication": dict(target_modules=["q_proj"], layer_replication=[[0, 3], [1, 4]]),
        "embedding": dict(target_modules=["embed_tokens", "o_proj"]),
        "resized": dict(vocab=136, target_modules=["q_proj", "embed_tokens"],
                        modules_to_save=["lm_head"]),
        "trainable-tokens": dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 127]),
        "dora": dict(target_modules=["v_proj", "down_proj"], use_dora=True),
        "replaced-linear": dict(target_modules=["q_proj"], modules_to_save=["up_proj"]),
    }  # fmt: skip
    for tag, config in adapters.items():
        adapter = make_adapter(llama, root / f"ad-{tag}", r=4, lora_alpha=8, **config)
        yield Case(f"merge-{tag}", llama, ("--merge-lora", str(adapter), "--dtype", "bf16"))
        yield Case(f"merge-{tag}-as-is-small", llama,
                   ("--merge-lora", str(adapter), "--shard-size", "100KB"))  # fmt: skip
        yield Case(f"merge-{tag}-fp8-channel", llama,
                   ("--merge-lora", str(adapter), "--quantize", "fp8-channel"))  # fmt: skip
    tied = build_llama(root / "merge-tied", num_hidden_layers=2)
    head = make_adapter(tied, root / "ad-head", r=4, target_modules=["v_proj"],
                        modules_to_save=["lm_head"])  # fmt: skip
    for flags in ((), ("--dtype", "bf16"), ("--dtype", "bf16", "--shard-size", "50KB")):
        tag = "-".join(f.strip("-") for f in flags) or "as-is"
        yield Case(f"merge-head-added-{tag}", tied, ("--merge-lora", str(head), *flags))
    gpt2 = build_gpt2(root / "merge-gpt2")
    conv = make_adapter(gpt2, root / "ad-gpt2", r=4, lora_alpha=8, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"])  # fmt: skip
    yield Case("merge-gpt2-conv1d", gpt2, ("--merge-lora", str(conv), "--dtype", "bf16"))
    quantized = ALL["awq"](root / "merge-awq").path
    plain = root / "merge-awq-fp32"  # the base as PEFT trains on it: dequantized to fp32
    fastcast.convert(quantized, "fp32", output=plain, dequantize=True, progress=False)
    adapter = make_adapter(plain, root / "ad-awq", r=4, lora_alpha=8,
                           target_modules=["q_proj", "down_proj"])  # fmt: skip
    for flags in (("--dtype", "bf16"), ("--dtype", "bf16", "--quantize", "fp8-channel")):
        yield Case(f"merge-awq-dequantize-{flags[-1]}", quantized,
                   ("--merge-lora", str(adapter), "--dequantize", *flags))  # fmt: skip


TIMES = re.compile(r"time: [\d.]+ s \([\d.]+ [kMGT]?B/s\)")


def run(case: Case, side: str, work: Path, site: Path | None) -> tuple[int, str, str, Path]:
    out = work / side / case.name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-m", "fastcast.cli", "convert", str(case.model), "-o",
                        str(out), *case.flags], capture_output=True, text=True, env=env,
                       check=False, cwd=work)  # fmt: skip

    def clean(text: str) -> str:
        return TIMES.sub("time: -", text.replace(str(work / side), "OUT"))

    return r.returncode, clean(r.stdout), clean(r.stderr), out


def files(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "fastcast.json"
    }


def compare(case: Case, work: Path, site: Path) -> list[str]:
    base = run(case, "base", work, site)
    head = run(case, "head", work, None)
    found = []
    if base[0] != head[0]:
        found.append(f"exit {base[0]} then, {head[0]} now")
    if base[2] != head[2]:
        found.append(f"stderr differs:\n  then: {base[2]!r}\n  now:  {head[2]!r}")
    if base[1] != head[1]:
        found.append(f"stdout differs:\n  then: {base[1]!r}\n  now:  {head[1]!r}")
    a, b = files(base[3]), files(head[3])
    if a.keys() != b.keys():
        found.append(f"files differ: {sorted(a.keys() ^ b.keys())}")
    found += [f"{rel}: bytes differ" for rel in a.keys() & b.keys() if a[rel] != b[rel]]
    return [f"{case.name}: {f}" for f in found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--work", default="/tmp/fastcast-same-bytes")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    site = build_baseline(args.baseline, work)
    cases = list(inputs(work))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: compare(c, work, site), cases))
    differences = [d for r in results for d in r]
    for d in differences:
        print(d)
    print(f"{len(cases)} conversions compared with {args.baseline}: "
          f"{len(differences)} difference(s)")  # fmt: skip
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
