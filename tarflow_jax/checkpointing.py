"""Orbax checkpoints of the train state and the data iterator; the run's config; ``load``.

A checkpoint step holds two items: ``state`` (the whole ``TrainState``, sharded arrays
saved from every host) and ``data`` (the grain iterator's position, one file per process).
Orbax writes each step into a temporary directory and renames it when complete, so a
crash never leaves a half-written step that a restart would pick up.
"""

from __future__ import annotations

import io
import json
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from PIL import Image

CONFIG_FILE = "config.json"


def workdir_path(workdir: str | epath.Path) -> epath.Path:
    """The workdir as a path object: local paths made absolute, ``gs://`` and other URLs kept."""
    path = epath.Path(workdir)
    return path if "://" in str(workdir) else path.resolve()


def write_atomic(path: str | epath.Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path`` and renames it (local disks and GCS)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
    return workdir_path(workdir) / "checkpoints"


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager for ``workdir/checkpoints`` keeping ``config.keep_checkpoints`` steps, saving asynchronously."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.get("keep_checkpoints", 3), create=True,
        enable_async_checkpointing=config.get("async_checkpointing", True))
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data"),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None) -> None:
    """Saves the state (and the iterator position, when given) as step ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding targets for restoring into arrays laid out like ``state``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                        if isinstance(a, jax.Array) else a, state)


def restore(manager: ocp.CheckpointManager, target: Any, data_iterator: Any | None = None,
            step: int | None = None) -> Any:
    """Restores the latest (or given) step onto ``target``'s shapes and shardings; moves the iterator too.

    ``target`` is a state of arrays or of ``jax.ShapeDtypeStruct`` with shardings, so a
    checkpoint saved on one mesh restores onto another.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = abstract_like(target)
    items = {"state": ocp.args.StandardRestore(abstract)}
    # A checkpoint written by `tarflow_jax.convert` has no data position: the data starts afresh.
    if data_iterator is not None and (manager.directory / str(step) / "data").exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config as JSON (atomically, process 0 only) so ``load`` can rebuild the model."""
    if jax.process_index() == 0:
        write_atomic(workdir_path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2).encode())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with."""
    path = workdir_path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a tarflow_jax workdir "
                                f"(train into it with python -m tarflow_jax.main --workdir=...)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_png(path: str | epath.Path, image: np.ndarray) -> None:
    """Writes a uint8 ``(H,W,C)`` image as PNG via a temporary file (no half-written PNGs)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def load(workdir: str, use_ema: bool = True, step: int | None = None):
    """``(model, variables, config)`` of a trained flow in ``workdir``, for use from other JAX code.

    ``variables`` (``{"params", "prior"}``) are the EMA parameters when the run kept them
    and ``use_ema`` is set; arrays land on the default device (replicated over all devices
    in a multi-process job, so that every process can use them).
    """
    from tarflow_jax import train  # train imports this module

    config = load_config(workdir)
    model = train.create_model(config)
    tx, _ = train.create_optimizer(config)
    init_fn = lambda rng: train.init_state(rng, model=model, tx=tx, config=config)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    if jax.process_count() > 1:  # every process must be able to address the arrays
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
        device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            nn.meta.unbox(abstract))
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}")
    with ocp.CheckpointManager(directory, item_names=("state", "data"), options=options) as manager:
        state = restore(manager, abstract, step=step)
    return model, state.variables(use_ema), config

