"""Memory stays flat with many tiny tensors: the executor unmaps the input pages it is
done with, including those of tensors smaller than a page, which the kernel's
fault-around maps back in around every read. Measured in a child process that samples
its own RssFile (mapped file pages) while converting; without the release the whole
input would be resident at the end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TENSORS = 20_000
VALUES = 1024  # 4 KiB each, at unaligned offsets: 80 MB in all

CHILD = """
import sys, threading, time
import fastcast

# The API loads its modules on first use: the pipeline's code (and the extension
# modules it maps) is loaded before the base is taken, so only the input is measured.
convert = fastcast.convert

def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024

base, peak, done = rss_file(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss_file())
        time.sleep(0.002)

t = threading.Thread(target=sample)
t.start()
convert(sys.argv[1], "bf16", output=sys.argv[2], progress=False)
done.append(1)
t.join()
print(base, peak[0])
"""


def test_many_tiny_tensors_do_not_stay_mapped(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "src"
    src.mkdir()
    values = np.random.default_rng(0).standard_normal(TENSORS * VALUES).astype(np.float32)
    tensors = {f"model.layers.{i}.w": values[i * VALUES : (i + 1) * VALUES]
               for i in range(TENSORS)}  # fmt: skip
    st.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    size = (src / "model.safetensors").stat().st_size
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(src), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    base, peak = map(int, r.stdout.split())
    assert peak - base < size // 4, (
        f"{(peak - base) >> 20} MiB of the {size >> 20} MiB input stayed mapped"
    )
