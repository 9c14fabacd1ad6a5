"""Never silent: every lossy step is counted (checked against torch's own casts),
reported, warned about, predictable without writing, and refusable (--strict)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest

import fastcast
from conftest import require
from fastcast import _core
from fastcast._loss import narrowing_risks
from fastcast._units import format_bytes
from folders import save_folder, snapshot


@pytest.fixture(scope="module")
def st_torch():
    return require("safetensors.torch")


def lossy_state(torch):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-12, 8, (4096,), generator=g)
    wide[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    return {
        "a.big": torch.tensor([7e4, -1e5, 1.0, 65504.0, 65519.0, 65520.0, 1e-9, -3e-8, 0.0]),
        "b.wide": wide,
        "c.tame": torch.linspace(-3, 3, 100),
        "d.ids": torch.arange(5, dtype=torch.int64),
    }


@pytest.fixture
def lossy(tmp_path, torch, st_torch):
    state = lossy_state(torch)
    return save_folder(st_torch, tmp_path / "m", state), state


def saturation_start(torch, dtype):
    """Where a saturating cast to ``dtype`` stops rounding and starts clamping, asked of
    torch: halfway from its largest value to the next step up (the step is the gap
    below the largest value, in the same binade); a tie there rounds to the largest
    value when its last mantissa bit is even. Returns (boundary, tie_is_overflow)."""
    t = getattr(torch, dtype)
    top = torch.tensor([torch.finfo(t).max]).to(t)
    below = (top.view(torch.uint8) - 1).view(t)
    step = float(top.float() - below.float())
    tie_rounds_down = int(top.view(torch.uint8)) % 2 == 0
    return float(top.float()) + step / 2, not tie_rounds_down


def torch_counts(torch, x, dtype):
    """Overflow/underflow as torch's own cast shows them."""
    y = x.to(getattr(torch, dtype)).float()
    finite = torch.isfinite(x)
    if dtype == "float8_e4m3fn":  # saturates, so overflow is |x| past the last rounding step
        boundary, tie_overflows = saturation_start(torch, dtype)
        over = finite & ((x.abs() >= boundary) if tie_overflows else (x.abs() > boundary))
    else:
        over = finite & ~torch.isfinite(y)
    under = finite & (x != 0) & (y == 0)
    return int(over.sum()), int(under.sum())


def test_saturation_boundary_is_asked_of_torch(torch):
    boundary, tie_overflows = saturation_start(torch, "float8_e4m3fn")
    assert (boundary, tie_overflows) == (464.0, False)  # 448 + 32/2; 448 = 0x7E is even
    x = torch.tensor([boundary, float(torch.nextafter(torch.tensor(boundary), torch.tensor(1e9)))])
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0]  # both clamp or round


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_counts_agree_with_torch(tmp_path, torch, lossy, dtype):
    src, state = lossy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcast.FastcastWarning)
        report = fastcast.convert(src, dtype, output=tmp_path / "o", progress=False)
    by_name = {t.name: t for t in report.loss}
    assert set(by_name) == {"a.big", "b.wide", "c.tame"}  # the int64 tensor is never cast
    for name, t in by_name.items():
        x = state[name]
        assert (t.overflow, t.underflow) == torch_counts(torch, x, dtype), name
        assert t.nan_in == int(torch.isnan(x).sum()) and t.inf_in == int(torch.isinf(x).sum())
        finite = x[torch.isfinite(x)]
        assert t.max_abs == pytest.approx(float(finite.abs().max()), rel=1e-7)
        assert t.elements == x.numel()


def test_fp16_report_names_the_worst_and_warns(tmp_path, lossy):
    src, _ = lossy
    with pytest.warns(fastcast.OverflowWarning, match="value.s. overflowed converting to F16"):
        report = fastcast.convert(src, "fp16", output=tmp_path / "o", progress=False)
    big = next(t for t in report.loss if t.name == "a.big")
    assert (big.overflow, big.underflow, big.max_abs) == (3, 1, 1e5)
    text = report.summary()
    assert "loss: " in text and "overflowed in 2 tensor(s) (to ±inf (|x| >= 65520))" in text
    assert "a.big: 3 overflowed, 1 underflowed of 9" in text
    assert "input: 1 NaN and 2 inf already present" in text


def test_range_risk_is_named_before_the_run(tmp_path, lossy, torch, st_torch):
    src, _ = lossy
    with pytest.warns(fastcast.RangeRiskWarning, match="casting 3 F32 tensor.s. .* to F16 can"):
        fastcast.convert(src, "fp16", output=tmp_path / "o", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcast.RangeRiskWarning)
        fastcast.convert(src, "bf16", output=tmp_path / "b", progress=False)  # safe range


def test_strict_refuses_and_puts_nothing_in_place(tmp_path, lossy):
    src, _ = lossy
    out = tmp_path / "o"
    with pytest.raises(fastcast.LossError) as info:
        fastcast.convert(src, "fp16", output=out, strict=True, shard_size=200, progress=False)
    message = str(info.value)
    assert "refusing to write (strict)" in message
    assert "a.big (3)" in message and "b.wide (" in message
    tensors = info.value.tensors  # (name, overflowed), worst first
    assert dict(tensors)["a.big"] == 3 and {n for n, _ in tensors} == {"a.big", "b.wide"}
    assert [n for _, n in tensors] == sorted((n for _, n in tensors), reverse=True)
    assert not out.exists(), "a refusal leaves no output folder at all"
    report = fastcast.convert(src, "bf16", output=tmp_path / "ok", strict=True, progress=False)
    assert report.overflowed == 0  # bf16 keeps f32's range: nothing to refuse


def test_report_json(tmp_path, lossy):
    src, _ = lossy
    path = tmp_path / "report.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcast.FastcastWarning)
        report = fastcast.convert(src, "fp16", output=tmp_path / "o", report=path, progress=False)
    data = json.loads(path.read_text())
    assert data["loss_total"]["overflow"] == report.overflowed > 0
    assert {t["name"] for t in data["loss"]} == {"a.big", "b.wide", "c.tame"}
    assert data["dtype"] == "F16" and data["shards"] == report.shards


def test_keep_leaves_matching_tensors_in_their_dtype(tmp_path, torch, st_torch, lossy):
    src, state = lossy
    report = fastcast.convert(
        src, "bf16", output=tmp_path / "o", keep=["a.*", "*.tame"], progress=False
    )
    out = st_torch.load_file(str(tmp_path / "o" / "model.safetensors"))
    assert out["a.big"].dtype == torch.float32 and torch.equal(out["a.big"], state["a.big"])
    assert out["c.tame"].dtype == torch.float32
    assert out["b.wide"].dtype == torch.bfloat16
    assert sorted(report.kept) == ["a.big", "c.tame"]
    assert any("kept in their source dtype by --keep" in w for w in report.warnings)
    assert [t.name for t in report.loss] == ["b.wide"]
    check = fastcast.verify(
        tmp_path / "o", against=src, keep=["a.*", "*.tame"], device="cpu", progress=False
    )
    assert check.ok, check.summary()


def test_inspect_predicts_the_loss_without_writing(tmp_path, lossy):
    src, _ = lossy
    before = snapshot(tmp_path)
    info = fastcast.inspect(src, dtype="fp16", progress=False)
    assert snapshot(tmp_path) == before, "inspect must write nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcast.FastcastWarning)
        report = fastcast.convert(src, "fp16", output=tmp_path / "o", progress=False)
    assert info.predicted == report.loss
    assert "converting to F16 would give:" in info.render()


def test_the_loss_table_reads_as_the_list_it_stands_for(tmp_path, lossy):
    """A run's losses stay the core's columns (a ``LossTable``) until looked at; the
    list inspect predicts, made one ``TensorLoss`` at a time, is the oracle."""
    from fastcast._loss import LossTable, describe, loss_sum, total, with_nonzero

    src, _ = lossy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcast.FastcastWarning)
        info = fastcast.inspect(src, dtype="fp16", progress=False)
        report = fastcast.convert(
            src, "fp16", output=tmp_path / "o", shard_size="4KB", progress=False
        )
    # b.wide (8 KB in fp16) is larger than a shard: it gets the first one, the rest the
    # second (huggingface_hub's splitter); the table is in plan order
    assert len(report.shards) == 2, "the table must span more than one shard's columns"
    table = report.loss
    rows = sorted(info.predicted, key=lambda t: t.name != "b.wide")
    assert isinstance(table, LossTable) and not isinstance(rows, LossTable)
    assert table == rows and rows == table and list(table) == rows and len(table) == len(rows)
    assert [table[i] for i in range(-len(rows), len(rows))] == rows + rows
    assert table[1:] == rows[1:] and table[::-1] == rows[::-1]
    with pytest.raises(IndexError):
        table[len(rows)]
    assert total(table) == total(rows) and describe(table) == describe(rows)
    for field in ("elements", "overflow", "underflow", "nan_in", "inf_in"):
        assert (
            loss_sum(table, field) == loss_sum(rows, field) == sum(getattr(t, field) for t in rows)
        )
    assert with_nonzero(table, "overflow") == [t for t in rows if t.overflow] != []
    assert with_nonzero(table, "overflow", "underflow") == [t for t in rows if t.lossy]
    assert report.to_dict()["loss"] == [t.to_dict() for t in rows]
    # a report crosses processes (a Ray task's result): the table pickles as its list
    again = pickle.loads(pickle.dumps(report))
    assert again == report and type(again.loss) is list and again.loss == rows


def test_cli_strict_keep_report_and_inspect(tmp_path, lossy):
    src, _ = lossy
    cli = [sys.executable, "-m", "fastcast.cli"]
    r = subprocess.run(
        [*cli, "convert", str(src), "-o", str(tmp_path / "s"), "--dtype", "fp16", "--strict"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "fastcast: warning: casting 3 F32" in r.stderr
    assert "fastcast: error: refusing to write (strict)" in r.stderr
    r = subprocess.run(
        [
            *cli,
            "convert",
            str(src),
            "-o",
            str(tmp_path / "d"),
            "--dtype",
            "fp16",
            "--report",
            str(tmp_path / "r.json"),
            "--keep",
            "c.*",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "fastcast: warning: 3" not in r.stderr  # a.big alone overflows 3; b.wide more
    assert "overflowed converting to F16" in r.stderr and "a.big: 3 overflowed" in r.stdout
    assert (tmp_path / "r.json").exists()
    q = subprocess.run(
        [*cli, "convert", str(src), "-o", str(tmp_path / "q"), "--dtype", "fp16", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert q.stdout == "" and "can overflow" not in q.stderr and "overflowed" in q.stderr
    i = subprocess.run(
        [*cli, "inspect", str(src), "--dtype", "fp8_e4m3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert i.returncode == 0 and "converting to F8_E4M3 would give:" in i.stdout


def test_non_float_tensors_are_never_cast(tmp_path, torch, st_torch):
    state = {
        "q.packed": torch.randint(0, 255, (64,), dtype=torch.uint8),
        "q.i8": torch.randint(-128, 127, (64,), dtype=torch.int8),
        "q.i32": torch.arange(64, dtype=torch.int32),
        "q.mask": torch.ones(64, dtype=torch.bool),
        "w": torch.randn(64),
    }
    src = save_folder(st_torch, tmp_path / "q", state)
    for dtype in ("bf16", "fp8_e4m3", "fp64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fastcast.FastcastWarning)
            report = fastcast.convert(src, dtype, output=tmp_path / dtype, progress=False)
        out = st_torch.load_file(str(tmp_path / dtype / "model.safetensors"))
        for name in ("q.packed", "q.i8", "q.i32", "q.mask"):
            assert out[name].dtype == state[name].dtype and torch.equal(out[name], state[name])
        assert report.tensors_cast == 1 and report.tensors_copied == 4


def test_range_risks_count_each_narrowing_pair_and_its_bytes():
    """Per pair of dtypes that narrows range: its tensors and bytes, checked against
    the core's rule tensor by tensor; sizes are not read when no pair narrows."""
    src = ["F32", "F32", "BF16", "F32", "BF16", "F16", "I64", "F32"]
    dst = ["F16", "BF16", "F16", "F16", "BF16", "F8_E4M3", "I64", "F8_E4M3"]
    sizes = [400, 4, 20, 40, 6, 8, 16, 12]
    expected: dict[tuple[str, str], list[int]] = {}
    for s, d, n in zip(src, dst, sizes, strict=True):
        if s != d and _core.cast_rule(s, d)["narrows_range"]:
            entry = expected.setdefault((s, d), [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + n
    assert len(expected) == 4  # F32->F16, BF16->F16, F16->E4M3, F32->E4M3
    risks = narrowing_risks(src, dst, iter(sizes))
    assert len(risks) == len(expected)
    for (s, d), (n, size) in sorted(expected.items()):
        line = f"casting {n} {s} tensor(s) ({format_bytes(size)}) to {d} can overflow"
        assert any(r.startswith(line) for r in risks), (line, risks)

    def unread() -> Iterator[int]:
        raise AssertionError("sizes read although no pair narrows")
        yield 0

    assert narrowing_risks(["F32", "BF16", "I64"], ["BF16", "BF16", "I64"], unread()) == []
