"""Sampling at scale: N images in batches, data-parallel over devices, NaNs counted (and redrawn).

Every device runs its own cached inverse on its slice of a batch (``jax.shard_map`` via
:func:`tarflow_jax.sharding.per_device`), with the parameters gathered whole onto each
device once per batch; the token loop has no collectives. The latents are drawn for the
whole batch before it is split, so a batch's images do not depend on the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from tarflow_jax import configlib, sharding, workdir as workdir_lib, xla_cpu
from tarflow_jax.flow import TarFlow


def jit_sample_step(model: TarFlow, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    denoise: bool = False):
    """The jitted sampler :func:`sharded_sample_fn` runs: ``draw(variables, key_data, labels)``.

    ``key_data`` is a raw ``uint32[2]`` key and ``labels`` ``int32 (B,)`` or ``None``, both
    replicated on ``mesh``; returns images ``(B, H, W, C)`` in ``[-1, 1]``, replicated. The
    matmuls run at ``config.matmul_precision``. It can be ``.trace``d with abstract
    arguments (the compile-only dry run, ``tarflow_jax.tools.aot``, does).
    """
    s = config.sample
    shape = (model.img_size, model.img_size, model.in_channels)

    def reverse(variables, z, labels):
        x = model.apply(variables, z, labels, guidance=s.guidance, guide_what=s.guide_what,
                        attn_temp=s.attn_temp, annealed_guidance=s.annealed_guidance,
                        solver=s.solver, method=TarFlow.reverse)
        if denoise:
            clean = model.apply(variables, x, labels, config.noise_std, s.denoise_scale,
                                method=TarFlow.denoise)
            x = jnp.where(jnp.isfinite(clean), clean, x)
        return x

    reverse_per_device = sharding.per_device(reverse, mesh, num_replicated=1)

    def draw(variables, rng, labels):
        batch = s.batch_size if labels is None else labels.shape[0]
        z = jax.random.normal(rng, (batch, *shape))  # drawn whole: the images do not depend on the mesh
        with configlib.matmul_precision(config):
            return reverse_per_device(variables, z, labels)

    return jax.jit(draw, out_shardings=sharding.replicated(mesh),
                   compiler_options=xla_cpu.compiler_options("sample", mesh))


def sharded_sample_fn(model: TarFlow, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      denoise: bool = False):
    """``draw(variables, rng, labels=None)``: images in ``[-1, 1]`` sampled data-parallel on ``mesh``.

    The latents are ``jax.random.normal(rng, (batch, H, W, C))`` with batch
    ``labels.shape[0]``, or ``config.sample.batch_size`` for unconditional models; each
    device inverts only its slice of the batch (``TarFlow.reverse`` with
    ``config.sample``'s options, then ``TarFlow.denoise`` when ``denoise``), with the
    parameters (FSDP- or tensor-sharded ones included) gathered onto every device. Any batch size works
    (padded to a multiple of the device count). The result is replicated on every device,
    so every process can read it (``jax.device_get``) in multi-host runs.
    """
    jitted = jit_sample_step(model, config, mesh, denoise)

    def call(variables: Any, rng: jax.Array, labels: Any = None) -> jax.Array:
        # Key and labels (the same on every process) enter replicated over the whole mesh.
        if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        host = lambda a: jax.device_put(np.asarray(jax.device_get(a)), sharding.replicated(mesh))
        labels = None if labels is None else host(np.asarray(jax.device_get(labels), np.int32))
        return jitted(sharding.put_on_mesh(variables, mesh), host(rng), labels)

    return call


def generate(model: TarFlow, variables: Any, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, num_samples: int, seed: int = 0,
             labels: np.ndarray | None = None, denoise: bool | None = None,
             progress: bool = True) -> dict[str, np.ndarray | int]:
    """Draws ``num_samples`` images as uint8 ``(N,H,W,C)`` with ``config.sample``'s options.

    Pixels are the data's levels scaled to 0..255 by :func:`tarflow_jax.workdir.to_uint8` (the
    inverse of the training data's mapping; for Gaussian-noise models the reference's
    truncation, so the file is exactly what the authors' code feeds its FID).

    Labels: ``labels`` if given, else ``config.sample.labels`` (a list), else uniform random
    classes (conditional models). Denoising (for models trained with Gaussian noise) follows
    ``denoise`` or ``config.sample.denoise``. Samples with a NaN are counted; with
    ``config.sample.redraw_nan`` they are drawn again (up to 10 rounds), else they are kept
    out of the output and reported. Returns ``images``, ``labels`` and ``num_nan``.
    """
    s = config.sample
    batch = s.batch_size
    if batch % mesh.size:
        logging.warning("config.sample.batch_size=%d is not a multiple of the %d devices; each "
                        "batch is padded to %d", batch, mesh.size, batch + (-batch % mesh.size))
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
    draw = sharded_sample_fn(model, config, mesh, denoise=denoise)
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
            out_images.append(workdir_lib.to_uint8(x[~bad], config.dataset.num_levels, config.noise))
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
    """Writes ``samples/<name>.npz`` (uint8 ``arr_0``, the key FID tools read, and ``labels``) and a PNG grid.

    Returns the paths of the ``.npz`` and the PNG.
    """
    out = workdir_lib.samples_dir(workdir)
    arrays = {"arr_0": result["images"]}
    if "labels" in result:
        arrays["labels"] = result["labels"]
    workdir_lib.write_npz(out / f"{name}.npz", **arrays)
    workdir_lib.write_png(out / f"{name}.png", workdir_lib.image_grid(result["images"][:grid_size]))
    return str(out / f"{name}.npz"), str(out / f"{name}.png")


def grid_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
    """Labels for a sample grid: classes in turn (``None`` for unconditional models)."""
    if not config.model.num_classes:
        return None
    return (np.arange(num) % config.model.num_classes).astype(np.int32)
