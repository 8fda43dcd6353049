"""Sampling at scale: N images in batches, data-parallel over devices, NaNs counted (and redrawn)."""

from __future__ import annotations

import functools
import io
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tarflow_jax import checkpointing, sharding
from tarflow_jax.flow import TarFlow
from tarflow_jax.train import image_grid, sample, to_uint8


def generate(model: TarFlow, variables: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, num_samples: int, seed: int = 0,
             labels: np.ndarray | None = None, denoise: bool | None = None,
             progress: bool = True) -> dict[str, np.ndarray | int]:
    """Draws ``num_samples`` images as uint8 ``(N,H,W,C)`` with ``config.sample``'s options.

    Labels: ``labels`` if given, else ``config.sample.labels`` (a list), else uniform random
    classes (conditional models). Denoising (for models trained with Gaussian noise) follows
    ``denoise`` or ``config.sample.denoise``. Samples with a NaN are counted; with
    ``config.sample.redraw_nan`` they are drawn again (up to 10 rounds), else they are kept
    out of the output and reported. Returns ``images``, ``labels`` and ``num_nan``.
    """
    s = config.sample
    batch = s.batch_size
    ways = sharding.data_parallel_size(mesh)
    if batch % ways:
        raise ValueError(f"config.sample.batch_size={batch} is not divisible by the {ways} "
                         f"data-parallel devices")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    rng = np.random.default_rng(seed)
    if model.num_classes:
        if labels is None and s.get("labels"):
            labels = np.resize(np.asarray(list(s.labels), np.int32), num_samples)
        if labels is None:
            labels = rng.integers(0, model.num_classes, num_samples).astype(np.int32)
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num_samples,) or labels.max() >= model.num_classes or labels.min() < -1:
            raise ValueError(f"labels must be {num_samples} ints in [-1, {model.num_classes}); "
                             f"got shape {labels.shape}")
    elif labels is not None:
        raise ValueError("labels were given for an unconditional model (num_classes=0)")
    denoise = (s.denoise if denoise is None else denoise) and config.noise == "gaussian"
    draw = jax.jit(functools.partial(sample, model=model, config=config, denoise=denoise),
                   out_shardings=sharding.batch_sharding(mesh))
    out_images, out_labels, num_nan = [], [], 0
    pending = np.arange(num_samples)  # indices still to draw
    key = jax.random.PRNGKey(seed)
    for round_ in range(10 if s.get("redraw_nan") else 1):
        done, redo = 0, []
        for start in range(0, len(pending), batch):
            index = pending[start:start + batch]
            pad = batch - len(index)
            y = None
            if labels is not None:
                y = jnp.asarray(np.pad(labels[index], (0, pad)))
            key, sub = jax.random.split(key)
            x = np.asarray(jax.device_get(draw(variables, sub, y)))[:len(index)]
            bad = ~np.isfinite(x).all(axis=(1, 2, 3))
            num_nan += int(bad.sum())
            out_images.append(to_uint8(x[~bad]))
            if labels is not None:
                out_labels.append(labels[index][~bad])
            redo.append(index[bad])
            done += len(index)
            if progress:
                logging.info("sampled %d/%d (round %d, %d NaN so far)", done, len(pending), round_, num_nan)
        pending = np.concatenate(redo)
        if not len(pending):
            break
    images = np.concatenate(out_images) if out_images else np.zeros((0,), np.uint8)
    result = {"images": images, "num_nan": num_nan, "num_missing": int(len(pending))}
    if labels is not None:
        result["labels"] = np.concatenate(out_labels)
    return result


def write_samples(workdir: str, result: dict[str, Any], name: str = "samples", grid_size: int = 64
                  ) -> tuple[str, str]:
    """Writes ``samples/<name>.npz`` (uint8 ``arr_0``/``images`` and ``labels``) and a PNG grid."""
    out = checkpointing.workdir_path(workdir) / "samples"
    arrays = {"arr_0": result["images"], "images": result["images"]}
    if "labels" in result:
        arrays["labels"] = result["labels"]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    checkpointing.write_atomic(out / f"{name}.npz", buffer.getvalue())
    checkpointing.write_png(out / f"{name}.png", image_grid(result["images"][:grid_size]))
    return str(out / f"{name}.npz"), str(out / f"{name}.png")
