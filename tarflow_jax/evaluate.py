"""Exact bits/dim over a whole split: every example once, dequantization draws, standard error; results files."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tarflow_jax import configlib, input_pipeline, sharding, workdir as workdir_lib
from tarflow_jax.flow import TarFlow
from tarflow_jax.likelihood import bits_per_dim, dequantize


def _batch_sums(variables: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model: TarFlow,
                num_levels: int, num_draws: int, mesh: jax.sharding.Mesh | None = None
                ) -> dict[str, jax.Array]:
    """Masked sums of per-example bits/dim (mean over draws), its square, and the IW bound.

    With ``mesh`` the forward pass runs per device on its slice of the batch (``shard_map``,
    parameters gathered to every device); the dequantization noise is drawn for the whole
    batch first, so the result does not depend on the mesh.
    """
    y = batch["label"].astype(jnp.int32) if model.num_classes else None

    def forward_bpd(variables, x, y):
        z, logdet = model.apply(variables, x, y)
        return bits_per_dim(z, logdet, num_levels)

    if mesh is not None:
        forward_bpd = sharding.per_device(forward_bpd, mesh, num_replicated=1)

    def one_draw(key):
        return forward_bpd(variables, dequantize(key, batch["image"], num_levels), y)

    bpd = jax.lax.map(one_draw, jax.random.split(rng, num_draws))  # (K, B)
    nats = bpd * (model.num_dims * math.log(2.0))
    iw_nats = -(jax.nn.logsumexp(-nats, axis=0) - math.log(num_draws))
    iw_bpd = iw_nats / (model.num_dims * math.log(2.0))
    mean_bpd = jnp.mean(bpd, axis=0)
    mask = batch["mask"].astype(jnp.float32)
    return {"sum": jnp.sum(mean_bpd * mask), "sum_sq": jnp.sum(jnp.square(mean_bpd) * mask),
            "iw_sum": jnp.sum(iw_bpd * mask), "count": jnp.sum(mask)}


def jit_eval_step(model: TarFlow, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  num_draws: int = 1):
    """The jitted eval step :func:`evaluate_bits_per_dim` runs: ``step(variables, batch, rng) -> sums``.

    ``batch`` is an eval batch (``image``, ``label``, ``mask``) split over the data axes of
    ``mesh``; the forward pass runs per device at ``config.matmul_precision`` (see
    :func:`_batch_sums`). It can be ``.trace``d with abstract arguments (the compile-only
    dry run, ``tarflow_jax.tools.aot``, does).
    """
    sums = functools.partial(_batch_sums, model=model, num_levels=config.dataset.num_levels,
                             num_draws=num_draws, mesh=mesh)

    def step(variables, batch, rng):
        with configlib.matmul_precision(config):
            return sums(variables, batch, rng)

    return jax.jit(step)


def evaluate_bits_per_dim(model: TarFlow, variables: Any, config: ml_collections.ConfigDict,
                          mesh: jax.sharding.Mesh, num_draws: int = 1, seed: int = 0
                          ) -> dict[str, float]:
    """Exact bits/dim of ``model`` over the whole eval split (every example once).

    Each example's bits/dim is :func:`tarflow_jax.likelihood.bits_per_dim` of one uniform
    dequantization draw, averaged over ``num_draws`` draws; the importance-weighted bound
    over the same K draws, ``−log(1/K·Σ_k exp(−nats_k))`` per example, is reported too
    (tighter; reference ``evaluate_bpd.py`` uses one draw). The forward pass runs per
    device on its slice of each batch; padding rows of the last batch are masked out.

    Args:
      model: the flow.
      variables: its variables (any placement; copied onto ``mesh`` when needed).
      config: the run's config: ``dataset`` (the split ``dataset.eval_split``, its
        ``num_levels``) and ``eval.batch_size``.
      mesh: the device mesh; ``eval.batch_size`` must divide over its data-parallel axes.
      num_draws: dequantization draws per example (>= 1).
      seed: seed of the dequantization noise (batch ``i`` uses ``fold_in(key(seed), i)``).

    Returns:
      ``{"bpd": mean bits/dim, "bpd_se": its standard error over examples, "iw_bpd": the
      importance-weighted bits/dim, "num_examples": int, "num_draws": int}``.

    Raises:
      ValueError: ``num_draws < 1``; ``eval.batch_size`` not divisible by the
        data-parallel devices or the process count; an empty split.
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
    totals = {"sum": 0.0, "sum_sq": 0.0, "iw_sum": 0.0, "count": 0.0}
    base = jax.random.PRNGKey(seed)
    if batch_size % jax.process_count():
        raise ValueError(f"config.eval.batch_size={batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    local_batches = input_pipeline.create_eval_iterator(config, batch_size // jax.process_count())
    for i, local in enumerate(local_batches):
        batch = input_pipeline.make_global_batch(local, batch_sharding)
        sums = jax.device_get(step(variables, batch, jax.random.fold_in(base, i)))
        for k in totals:
            totals[k] += float(sums[k])
    n = totals["count"]
    if n == 0:
        raise ValueError("the eval split is empty")
    mean = totals["sum"] / n
    var = max(totals["sum_sq"] / n - mean ** 2, 0.0)
    return {"bpd": mean, "bpd_se": math.sqrt(var / max(n - 1, 1)), "iw_bpd": totals["iw_sum"] / n,
            "num_examples": int(n), "num_draws": num_draws}


def write_results(workdir: str, result: dict[str, Any], config: ml_collections.ConfigDict,
                  step: int, num_params: int) -> tuple[str, str]:
    """Writes ``eval_bpd_<step>.json`` and returns it with a Markdown results-table row."""
    d = config.dataset
    dataset = d.get("tfds_name") if d.name == "tfds" else d.name
    m = config.model
    size = (f"p{m.patch_size}/{m.width}/{m.num_blocks}×{m.layers_per_block} "
            f"({num_params / 1e6:.1f}M)")
    row = (f"| {dataset} {d.eval_split} | {size} | {result['bpd']:.4f} ± {result['bpd_se']:.4f} | "
           f"{result['num_examples']} | {step} |")
    record = {**result, "dataset": dataset, "split": d.eval_split, "step": step,
              "num_params": num_params, "markdown_row": row}
    path = workdir_lib.workdir_path(workdir) / f"eval_bpd_{step:08d}.json"
    if jax.process_index() == 0:
        workdir_lib.write_atomic(path, json.dumps(record, indent=2).encode())
    return str(path), row


MARKDOWN_HEADER = "| data | model (p/width/K×L, params) | bits/dim ± s.e. | examples | step |\n|---|---|---|---|---|"

