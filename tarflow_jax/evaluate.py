"""Bits/dim over a whole split: every example once, dequantization draws, standard error, IW bound; results files.

Class-conditional models are scored without labels (label −1) and given the true labels.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tarflow_jax import configlib, input_pipeline, layers, sharding, workdir as workdir_lib, xla_cpu
from tarflow_jax.flow import TarFlow
from tarflow_jax.likelihood import bits_per_dim, dequantize


def _batch_sums(variables: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: TarFlow,
                num_levels: int, num_draws: int, mesh: jax.sharding.Mesh | None = None
                ) -> dict[str, jax.Array]:
    """Masked sums over a batch of per-example bits/dim (mean over draws), its square, and the IW bound.

    Returns arrays of shape ``(M,)`` per key, one entry per labelling mode: ``M = 1``
    (unconditional model: no label) or ``M = 2`` (class-conditional model: index 0 without
    labels, i.e. label −1 / the mean class embedding, index 1 given the true labels). Both
    modes see the same dequantization draws. With ``mesh`` the forward pass runs per device
    on its slice of the batch (``shard_map``, parameters gathered to every device); the
    noise is drawn for the whole batch first, so the result does not depend on the mesh.
    """
    labels = batch["label"].astype(jnp.int32)
    modes = [None] + ([labels] if model.num_classes else [])

    def forward_bpd(variables, x, y):
        z, logdet = model.apply(variables, x, y)
        return bits_per_dim(z, logdet, num_levels)

    if mesh is not None:
        forward_bpd = sharding.per_device(forward_bpd, mesh, num_replicated=1)

    def one_draw(key):
        x = dequantize(key, batch["image"], num_levels)
        return jnp.stack([forward_bpd(variables, x, y) for y in modes])  # (M, B)

    bpd = jax.lax.map(one_draw, jax.random.split(rng, num_draws))  # (K, M, B)
    nats = bpd * (model.num_dims * math.log(2.0))
    iw_nats = -(jax.nn.logsumexp(-nats, axis=0) - math.log(num_draws))
    iw_bpd = iw_nats / (model.num_dims * math.log(2.0))  # (M, B)
    mean_bpd = jnp.mean(bpd, axis=0)  # (M, B)
    mask = batch["mask"].astype(jnp.float32)[None]
    return {"sum": jnp.sum(mean_bpd * mask, axis=1), "sum_sq": jnp.sum(jnp.square(mean_bpd) * mask, axis=1),
            "iw_sum": jnp.sum(iw_bpd * mask, axis=1), "count": jnp.sum(mask, axis=1)}


def jit_eval_step(model: TarFlow, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  num_draws: int = 1):
    """The jitted eval step :func:`evaluate_bits_per_dim` runs: ``step(variables, batch, rng) -> sums``.

    ``batch`` is an eval batch (``image``, ``label``, ``mask``) split over the data axes of
    ``mesh``; the forward pass runs per device at ``config.matmul_precision`` (see
    :func:`_batch_sums`), traced inside :func:`tarflow_jax.layers.forward_pass_kernels` and
    compiled with the ``"forward"`` XLA:CPU options (both change nothing off CPU). It can be
    ``.trace``d with abstract arguments (the compile-only dry run, ``tarflow_jax.tools.aot``,
    does).
    """
    sums = functools.partial(_batch_sums, model=model, num_levels=config.dataset.num_levels,
                             num_draws=num_draws, mesh=mesh)

    def step(variables, batch, rng):
        with configlib.matmul_precision(config), layers.forward_pass_kernels():
            return sums(variables, batch, rng)

    return jax.jit(step, compiler_options=xla_cpu.compiler_options("forward", mesh))


def evaluate_bits_per_dim(model: TarFlow, variables: Any, config: ml_collections.ConfigDict,
                          mesh: jax.sharding.Mesh, num_draws: int = 1, seed: int = 0
                          ) -> dict[str, Any]:
    """Bits/dim over the whole eval split, every example once (padding rows masked out).

    Each example's bits/dim is its dequantization bound ``−log₂ p(x + u)/D`` on the data's
    ``Q``-level scale (:func:`tarflow_jax.likelihood.bits_per_dim`), averaged over ``num_draws``
    uniform draws ``u``; the importance-weighted bound over the same draws,
    ``−log₂ mean_k p(x + u_k)/D``, is never above it and tightens as ``num_draws`` grows (equal
    at one draw; the reference ``evaluate_bpd.py`` uses one draw and no labels). Both are upper bounds on the discrete model's
    bits/dim. A class-conditional model is scored twice on the same draws: without labels
    (label −1, the mean class embedding that label dropout trains) and given the true labels.

    Args:
      model: the flow.
      variables: its variables (any placement; put on ``mesh`` here).
      config: ``config.dataset`` (eval split, levels), ``config.eval.batch_size``.
      mesh: device mesh; the batch is split over its data-parallel axes.
      num_draws: dequantization draws per example (``K``).
      seed: seed of the dequantization noise (batch ``i`` uses ``fold_in(key(seed), i)``).

    Returns:
      ``{"bpd", "bpd_se", "iw_bpd"}`` without labels (``bpd_se``: standard error of the mean
      over examples), ``"num_examples"``, ``"num_draws"``, and for class-conditional models
      ``"conditional": {"bpd", "bpd_se", "iw_bpd"}`` given the true labels. Units: bits/dim.

    Raises:
      ValueError: ``num_draws < 1``, a batch size the devices or processes do not divide, an
        empty split.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1; got {num_draws}")
    batch_size = config.eval.batch_size
    ways = sharding.data_parallel_size(mesh)
    if batch_size % ways:
        raise ValueError(f"config.eval.batch_size={batch_size} is not divisible by the {ways} "
                         f"data-parallel devices")
    step = jit_eval_step(model, config, mesh, num_draws)
    batch_sharding = sharding.batch_sharding(mesh)
    variables = sharding.put_on_mesh(variables, mesh)  # e.g. single-device arrays from `load`
    modes = 2 if model.num_classes else 1
    totals = {k: np.zeros(modes) for k in ("sum", "sum_sq", "iw_sum", "count")}
    base = jax.random.PRNGKey(seed)
    if batch_size % jax.process_count():
        raise ValueError(f"config.eval.batch_size={batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    local_batches = input_pipeline.create_eval_iterator(config, batch_size // jax.process_count())
    for i, local in enumerate(local_batches):
        batch = input_pipeline.make_global_batch(local, batch_sharding)
        sums = jax.device_get(step(variables, batch, jax.random.fold_in(base, i)))
        for k in totals:
            totals[k] += np.asarray(sums[k], np.float64)
    n = float(totals["count"][0])
    if n == 0:
        raise ValueError("the eval split is empty")

    def summary(m: int) -> dict[str, float]:
        mean = totals["sum"][m] / n
        var = max(totals["sum_sq"][m] / n - mean ** 2, 0.0) * n / max(n - 1, 1)  # unbiased
        return {"bpd": float(mean), "bpd_se": math.sqrt(var / n), "iw_bpd": float(totals["iw_sum"][m] / n)}

    result: dict[str, Any] = {**summary(0), "num_examples": int(n), "num_draws": num_draws}
    if model.num_classes:
        result["conditional"] = summary(1)
    return result


def write_results(workdir: str, result: dict[str, Any], config: ml_collections.ConfigDict,
                  step: int, num_params: int) -> tuple[str, str]:
    """Writes ``eval_bpd_<step>.json`` and returns it with Markdown results-table rows (one per labelling)."""
    d = config.dataset
    dataset = d.get("tfds_name") if d.name == "tfds" else d.name
    m = config.model
    size = (f"p{m.patch_size}/{m.width}/{m.num_blocks}×{m.layers_per_block} "
            f"({num_params / 1e6:.1f}M)")
    rows = []
    for labels, r in [("none (label −1)" if m.num_classes else "none", result)] + (
            [("true labels", result["conditional"])] if "conditional" in result else []):
        rows.append(f"| {dataset} {d.eval_split} | {size} | {labels} | {r['bpd']:.4f} ± {r['bpd_se']:.4f} | "
                    f"{r['iw_bpd']:.4f} | {result['num_draws']} | {result['num_examples']} | {step} |")
    row = "\n".join(rows)
    record = {**result, "dataset": dataset, "split": d.eval_split, "step": step,
              "num_params": num_params, "markdown_row": row}
    path = workdir_lib.workdir_path(workdir) / f"eval_bpd_{step:08d}.json"
    if jax.process_index() == 0:
        workdir_lib.write_atomic(path, json.dumps(record, indent=2).encode())
    return str(path), row


MARKDOWN_HEADER = ("| data | model (p/width/K×L, params) | labels | bits/dim ± s.e. | IW bound | draws | examples | step |\n"
                   "|---|---|---|---|---|---|---|---|")

