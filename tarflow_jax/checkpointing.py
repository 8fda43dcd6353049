"""Orbax checkpoints of the train state (and the data iterator's position); ``load`` for other JAX code.

A checkpoint step holds two items: ``state`` (the whole ``TrainState``, sharded arrays
saved from every host) and ``data`` (the input iterator's position, one file per process;
its Orbax arguments come from ``tarflow_jax.input_pipeline``). Orbax writes each step into
a temporary directory and renames it when complete, so a crash never leaves a half-written
step that a restart would pick up.

:func:`load` restores only what a trained flow needs (the EMA or raw parameters and the
prior variance) and imports neither the trainer, optax, clu, grain nor TensorFlow.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tarflow_jax import configlib, workdir as workdir_lib
from tarflow_jax.flow import TarFlow

ITEMS = ("state", "data")


def create_manager(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager for ``workdir/checkpoints`` keeping ``config.keep_checkpoints`` steps, saving asynchronously."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.get("keep_checkpoints", 3), create=True,
        enable_async_checkpointing=config.get("async_checkpointing", True))
    return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), item_names=ITEMS, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data: ocp.args.CheckpointArgs | None = None
         ) -> None:
    """Saves ``state`` as step ``step``, plus the data item when ``data`` (its Orbax save args) is given."""
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
        items["data"] = data
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding targets for restoring into arrays laid out like ``state``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                        if isinstance(a, jax.Array) else a, state)


def restore(manager: ocp.CheckpointManager, target: Any, data: ocp.args.CheckpointArgs | None = None,
            step: int | None = None) -> Any:
    """Restores the latest (or given) step onto ``target``'s shapes and shardings.

    Args:
      manager: from :func:`create_manager`.
      target: a state of arrays or of ``jax.ShapeDtypeStruct`` with shardings, so a
        checkpoint saved on one mesh restores onto another.
      data: Orbax restore args for the data item (they restore the iterator in place);
        ignored when the step has no data item (e.g. a converted checkpoint).
      step: the step; default the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: the manager's directory holds no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_like(target))}
    if data is not None and (manager.directory / str(step) / "data").exists():
        items["data"] = data
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def latest_step(workdir: str | epath.Path) -> int | None:
    """The latest complete checkpoint step in ``workdir`` (``None`` if there is none)."""
    directory = workdir_lib.checkpoint_dir(workdir)
    steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
    return max(steps) if steps else None


def load(workdir: str | epath.Path, use_ema: bool = True, step: int | None = None
         ) -> tuple[TarFlow, dict[str, Any], ml_collections.ConfigDict]:
    """A trained flow from a ``tarflow_jax`` workdir, for use from other JAX code.

    Reads ``workdir/config.json`` (old field names upgraded) and restores from the Orbax
    checkpoint only the parameters (the EMA copy when the run kept one and ``use_ema``,
    else the raw ones) and the prior variance: no optimizer moments, no data state.

    Args:
      workdir: a run's directory (local path or ``gs://...``), written by
        ``python -m tarflow_jax.main`` or the convert tool.
      use_ema: return the EMA parameters when the run kept them (``config.ema_decay > 0``).
      step: the checkpoint step; default the latest.

    Returns:
      ``(model, variables, config)``: the ``TarFlow``, Flax variables
      ``{"params": ..., "prior": {"var": float32 (T, D)}}`` for ``model.apply``, and the
      run's config. Arrays are on the default device (replicated over all devices in a
      multi-process job, so every process can use them).

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
    """
    config = workdir_lib.load_config(workdir)
    model = configlib.create_model(config)
    directory = workdir_lib.checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}")
    if jax.process_count() > 1:  # every process must be able to address the arrays
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
        device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs()))
    as_target = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
    params_key = "ema_params" if use_ema and config.get("ema_decay", 0.0) > 0 else "params"
    target = {params_key: as_target(shapes["params"]), "prior_var": as_target(shapes["prior"]["var"])}
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=options) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                        restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
    return model, {"params": restored[params_key], "prior": {"var": restored["prior_var"]}}, config
