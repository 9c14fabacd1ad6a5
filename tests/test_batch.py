"""Several models in one command: each converted exactly as alone, a broken one named
while the others finish, a jobs file giving each model its own options, each model
resuming on its own."""

from __future__ import annotations

import json

import fastcast
from commands import cli, killed, ok
from fastcast._execute.queue import ShardBoard
from folders import snapshot
from zoo import llama, sentence_transformers


def broken(tmp_path):
    """A model folder whose weights are not safetensors at all."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"torch_dtype": "float32"}')
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return folder


def three_models(tmp_path):
    """A good model, a broken one, another good one (in that order)."""
    return llama(tmp_path).model, broken(tmp_path), sentence_transformers(tmp_path).model


def alone(model, out, *args):
    """The model converted alone, as a user runs one conversion."""
    ok(cli("convert", model, "-o", out, "--dtype", "bf16", "-q", *args))
    return snapshot(out)


def test_a_broken_model_in_the_middle_stops_nothing(tmp_path):
    a, bad, c = three_models(tmp_path)
    r = cli("convert", a, bad, c, "--dtype", "bf16", "-o", tmp_path / "batch")
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fastcast: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in r.stderr
    assert f"{a.name}-bf16" not in errors[0]
    table = r.stdout
    assert "model" in table and "status" in table and "GB/s" in table and "loss" in table
    assert "failed" in table and "converted" in table and "2 of 3 model(s) done" in table
    # The others: byte for byte what converting each alone writes.
    for model in (a, c):
        got = snapshot(tmp_path / "batch" / f"{model.name}-bf16")
        assert got == alone(model, tmp_path / "alone" / model.name)
    assert not (tmp_path / "batch" / f"{bad.name}-bf16").exists()


def test_without_output_each_lands_beside_its_input(tmp_path):
    a, c = llama(tmp_path).model, sentence_transformers(tmp_path).model
    ok(cli("convert", a, c, "--dtype", "fp16", "-q"))
    for model in (a, c):
        assert json.loads((model.parent / f"{model.name}-fp16" / "fastcast.json").read_text())


def test_jobs_file_gives_each_model_its_own_options(tmp_path):
    a, c = llama(tmp_path).model, sentence_transformers(tmp_path).model
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        f"""
dtype = "bf16"
output_dir = "converted"

[[model]]
path = "{a.name}"
shard_size = "1KB"
keep = ["*norm*"]

[[model]]
path = "{c}"
dtype = "fp16"
output = "elsewhere/st"
"""
    )
    out = ok(cli("convert", "--jobs", jobs))
    assert "2 of 2 model(s) done" in out
    got_a = snapshot(tmp_path / "converted" / f"{a.name}-bf16")
    assert got_a == alone(a, tmp_path / "alone-a", "--shard-size", "1KB", "--keep", "*norm*")
    got_c = snapshot(tmp_path / "elsewhere" / "st")
    ok(cli("convert", c, "-o", tmp_path / "alone-c", "--dtype", "fp16", "-q"))
    assert got_c == snapshot(tmp_path / "alone-c")


def test_jobs_file_mistakes_are_one_line(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('dtpye = "bf16"\n[[model]]\npath = "x"\n')
    r = cli("convert", "--jobs", jobs)
    assert r.returncode == 1 and "unknown key 'dtpye'" in r.stderr and "Traceback" not in r.stderr
    jobs.write_text('dtype = "bf16"\n')
    r = cli("convert", "--jobs", jobs)
    assert r.returncode == 1 and "no [[model]]" in r.stderr


def test_api_reports_each_model_and_resumes_each_on_its_own(tmp_path):
    a, bad, c = three_models(tmp_path)
    out = tmp_path / "out"
    fastcast.convert(a, "bf16", output=out / f"{a.name}-bf16", progress=False)
    batch = fastcast.convert_batch([a, bad, c], "bf16", output_dir=out, resume=True)
    assert isinstance(batch, fastcast.BatchReport) and not batch.ok
    assert [r.status for r in batch.results] == ["already done", "failed", "converted"]
    assert batch.failed[0].model == str(bad) and str(bad) in (batch.failed[0].error or "")
    assert batch.results[2].report is not None and batch.results[2].report.bytes_read > 0
    assert json.loads(json.dumps(batch.to_dict()))["models"][1]["status"] == "failed"


def test_two_models_with_one_output_are_refused(tmp_path):
    a = llama(tmp_path).model
    batch = fastcast.convert_batch([a, a], "bf16", output_dir=tmp_path / "out")
    assert [r.status for r in batch.results] == ["converted", "failed"]
    assert "also the output of" in (batch.results[1].error or "")


def test_a_batch_killed_midway_resumes_model_by_model(tmp_path):
    """SIGKILLed between shards of several models (the queue mixes them): the same
    command with --resume finishes each, byte for byte what single runs write."""
    a, c = llama(tmp_path).model, sentence_transformers(tmp_path).model
    args = ("convert", a, c, "--dtype", "bf16", "-o", tmp_path / "batch", "--shard-size", "1KB")
    killed("replace:6", *args)
    out = ok(cli(*args, "--resume"))
    assert "2 of 2 model(s) done" in out
    for model in (a, c):
        got = snapshot(tmp_path / "batch" / f"{model.name}-bf16")
        assert got == alone(model, tmp_path / "alone" / model.name, "--shard-size", "1KB")


def test_progress_counts_each_shard_once_over_its_attempts():
    """A retried shard (a worker died) shows the most any attempt did, never the sum."""
    board = ShardBoard(0, enabled=False)
    board.add_model("m", 300)
    board.set("m", "s1", "first", 80)
    board.set("m", "s1", "second", 50)  # the retry starts over
    board.set("m", "s2", "a", 100)
    assert board.shown() == 180
    board.set("m", "s1", "second", 200)
    board.set("m", "s1", "first", 90)  # a late report from the dead attempt
    assert board.shown() == 300
    board.close()
