"""Shared fixtures: the parity folder, tiny models with non-trivial output heads."""

import os
import pathlib
import sys

# torch/torchvision import triton (a GPU kernel compiler) when present; loading its native
# library into a process that already holds TensorFlow's segfaults on these machines, and
# nothing on CPU needs it. A None entry makes `import triton` raise ImportError, which torch
# treats as "no triton".
sys.modules.setdefault("triton", None)
# With libtpu installed (the `test` extra brings it for the TPU dry-run tests), JAX would try
# the TPU plugin first and libtpu prints warnings and takes /tmp/libtpu_lockfile. The tests
# run on the CPU; the dry run builds its compile-only TPU devices explicitly. Subprocesses
# started by tests inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# distrax imports tensorflow-probability, whose package init needs tf-keras once TensorFlow is
# already loaded (the trainer's input pipeline loads it); imported first, it needs nothing more.
try:
    import distrax  # noqa: F401
except Exception:  # noqa: BLE001 - not installed (or broken): its tests skip with the reason
    pass

import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUR_DIRS = tuple(str(ROOT / d) + os.sep for d in ("tests", "configs"))
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)  # as in setup.cfg
_warn = warnings.warn


def _package(frame) -> str:
    return str(frame.f_globals.get("__name__", "")).partition(".")[0]


def _ours(frame) -> bool:
    return _package(frame) == "tarflow_jax" or frame.f_code.co_filename.startswith(_OUR_DIRS)


def _deprecated_api_caller(frame):
    """The first frame outside the top-level package of ``frame`` (the code calling into it)."""
    package = _package(frame)
    while frame is not None and _package(frame) == package:
        frame = frame.f_back
    return frame


def _warn_failing_our_deprecated_calls(message, category=None, stacklevel=1, source=None, **kwargs):
    """``warnings.warn`` that raises a library's deprecation warning when our code made the call.

    The ``filterwarnings`` entries in setup.cfg turn deprecations attributed to our modules
    into errors, but a library that warns with the default ``stacklevel=1`` attributes the
    warning to itself (``optax.global_norm`` does), so this walks the stack instead: the first
    frame outside the warning library's top-level package is the caller; if that frame is in
    ``tarflow_jax``, ``tests/`` or ``configs/``, the warning is raised as an error. A
    library's deprecated use of another library (flax calling jax) still only warns.
    """
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    if issubclass(category, _DEPRECATIONS):
        issuer = sys._getframe(1)
        caller = _deprecated_api_caller(issuer)
        if not _ours(issuer) and caller is not None and _ours(caller):
            raise category(f"{message} (deprecated API called at {caller.f_code.co_filename}:"
                           f"{caller.f_lineno})")
    _warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _warn_failing_our_deprecated_calls

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tarflow_jax import TarFlow  # noqa: E402
from tarflow_jax.tools.benchmark import random_variables  # noqa: F401,E402 (shared with the tests)

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
