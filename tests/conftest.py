"""Shared fixtures: the parity folder, tiny models with non-trivial output heads."""

import os
import pathlib
import sys

# torch/torchvision import triton (a GPU kernel compiler) when present; loading its native
# library into a process that already holds TensorFlow's segfaults on these machines, and
# nothing on CPU needs it. A None entry makes `import triton` raise ImportError, which torch
# treats as "no triton".
sys.modules.setdefault("triton", None)

# distrax imports tensorflow-probability, whose package init needs tf-keras once TensorFlow is
# already loaded (the trainer's input pipeline loads it); imported first, it needs nothing more.
try:
    import distrax  # noqa: F401
except Exception:  # noqa: BLE001 - not installed (or broken): its tests skip with the reason
    pass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import TarFlow
from tarflow_jax.tools.benchmark import random_variables  # noqa: F401 (shared with the tests)

PARITY_FILES = ("uncond_rgb16", "cond_gray8", "vp_rgb8")


def parity_dir() -> pathlib.Path | None:
    path = os.environ.get("TARFLOW_PARITY_DIR")
    return pathlib.Path(path) if path and pathlib.Path(path).is_dir() else None


@pytest.fixture(scope="session")
def parity_path():
    path = parity_dir()
    if path is None:
        pytest.skip("parity vectors not found: set TARFLOW_PARITY_DIR to the folder of the "
                    "reference .npz files (CI sets ../shared/parity)")
    return path


def load_parity(path: pathlib.Path, name: str):
    """``(model config dict, reference state dict, the whole npz)`` of one parity file."""
    data = np.load(path / f"{name}.npz")
    cfg = {k[4:]: data[k].item() for k in data.files if k.startswith("cfg/")}
    state = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    return cfg, state, data


@pytest.fixture(scope="session")
def tiny_cond():
    """A tiny class-conditional model (8x8x1, 16 tokens) and its variables."""
    model = TarFlow(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2,
                    layers_per_block=1, num_classes=3)
    return model, random_variables(model)


@pytest.fixture(scope="session")
def tiny_uncond():
    """A tiny unconditional RGB model (8x8x3, 16 tokens) and its variables."""
    model = TarFlow(img_size=8, in_channels=3, patch_size=2, channels=64, num_blocks=2,
                    layers_per_block=1)
    return model, random_variables(model, seed=3)
