"""The scripts under examples/ run end to end on the digits smoke run."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_smoke(tmp_path_factory):
    """A trained (3 steps) digits smoke run, through the command line."""
    workdir = tmp_path_factory.mktemp("digits_smoke")
    cmd = [sys.executable, "-m", "tarflow_jax.main", "--config=configs/digits.py:smoke",
           f"--workdir={workdir}", "--config.num_train_steps=3", "--config.ema_decay=0.5"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_digits_flow_example(digits_smoke, tmp_path):
    out = tmp_path / "example"
    cmd = [sys.executable, "examples/digits_flow.py", f"--workdir={digits_smoke}", f"--out={out}",
           "--num_test=30", "--per_class=2", "--num_inpaint=4", "--steps=5"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 test images:" in result.stdout and "bits/dim" in result.stdout
    assert "argmax_y log p(x|y) accuracy" in result.stdout and "MAP inpainting" in result.stdout
    # one column per class (10), 2 rows of 8x8 digits with 1-pixel borders
    samples = np.asarray(Image.open(out / "samples_per_class.png"))
    assert samples.shape[:2] == (2 * 9 + 1, 10 * 9 + 1)
    inpainting = np.asarray(Image.open(out / "inpainting.png"))
    assert inpainting.shape[:2] == (3 * 9 + 1, 4 * 9 + 1)
