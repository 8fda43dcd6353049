"""A run's directory: paths, atomic writes, the run's config JSON, PNG/``.npz`` files, images as uint8.

Layout of a workdir::

    config.json                 the run's config (``save_config`` / ``load_config``)
    checkpoints/<step>/         Orbax steps (see ``tarflow_jax.checkpointing``)
    samples/                    PNG grids and ``.npz`` sample files
    eval_bpd_<step>.json        evaluation records

Paths go through ``etils.epath``, so a workdir may be local or on GCS (``gs://...``).
Every write goes to a temporary file beside the target and is renamed into place, so a
crash never leaves a half-written file that a later run would read.
"""

from __future__ import annotations

import io
import json
import math

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from tarflow_jax import configlib

CONFIG_FILE = "config.json"


def workdir_path(workdir: str | epath.Path) -> epath.Path:
    """The workdir as a path object: local paths made absolute, ``gs://`` and other URLs kept."""
    path = epath.Path(workdir)
    return path if "://" in str(workdir) else path.resolve()


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    """``workdir/checkpoints``, where the Orbax steps live."""
    return workdir_path(workdir) / "checkpoints"


def samples_dir(workdir: str | epath.Path) -> epath.Path:
    """``workdir/samples``, where sample grids and ``.npz`` files go."""
    return workdir_path(workdir) / "samples"


def write_atomic(path: str | epath.Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it (local disks and GCS)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def save_config(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config as JSON (atomically, process 0 only) so ``load`` can rebuild the model."""
    if jax.process_index() == 0:
        write_atomic(workdir_path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2).encode())


def load_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with, in today's field names.

    Configs written by older versions are upgraded (see :func:`configlib.upgrade`).

    Raises:
      FileNotFoundError: ``workdir`` holds no ``config.json``.
    """
    path = workdir_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {str(workdir)!r} is not a tarflow_jax workdir "
                                f"(train into it with python -m tarflow_jax.main --workdir=...)")
    return configlib.upgrade(json.loads(path.read_text()), source=str(path))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in ``[-1, 1]`` (any float dtype) to uint8 ``round((x + 1)·127.5)``; NaN → 0."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0)
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """``(N,H,W,C)`` uint8 images tiled into one ``(rows·(H+1)+1, cols·(W+1)+1, C)`` grid (white lines)."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
    return grid


def write_png(path: str | epath.Path, image: np.ndarray) -> None:
    """Writes a uint8 ``(H,W,C)`` image (C = 1 or 3) as PNG via a temporary file (no half-written PNGs)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def write_npz(path: str | epath.Path, **arrays: np.ndarray) -> None:
    """Writes ``arrays`` as an uncompressed ``.npz``, streamed to a temporary file and renamed (one copy in memory)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
