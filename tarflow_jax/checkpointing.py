"""Orbax checkpoints of the train state, its data position and fingerprints; ``load`` for other JAX code.

A checkpoint step holds three items: ``state`` (the whole ``TrainState``, sharded arrays
saved from every host), ``data`` (the train stream's global position, a small JSON from
``tarflow_jax.input_pipeline.data_state``; older checkpoints hold one grain iterator state
per process there) and ``fingerprints`` (two 32-bit hashes of every array's bits, JSON).
Orbax writes each step into a temporary directory and renames it when complete, so a crash
never leaves a half-written step that a restart would pick up.

Damaged steps. Orbax neither checksums array data (a flipped byte restores silently as a
wrong value) nor survives a truncated file or a missing metadata file. So a step counts as
intact only when its metadata files are all there (:data:`REQUIRED_FILES`), it restores
without error and every restored array matches its saved fingerprint. At start-up the
trainer resumes from the newest intact step (:func:`restore_newest_intact`); each newer,
damaged step is logged with a warning naming the step and what was wrong, and moved,
untouched, to ``WORKDIR/damaged_checkpoints/<step>`` (with ``<step>.reason.txt`` beside it),
so that neither Orbax's ``max_to_keep`` clean-up nor a later save of the same step number
can delete or overwrite it. When no step is intact the run stops with an error instead of
starting again from step 0. :func:`load` skips damaged steps the same way (with a warning)
but moves nothing.

:func:`load` restores only what a trained flow needs (the EMA or raw parameters and the
prior variance) and imports neither the trainer, optax, clu, grain nor TensorFlow.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from tarflow_jax import configlib, workdir as workdir_lib
from tarflow_jax.flow import TarFlow

ITEMS = ("state", "data", "fingerprints")
DAMAGED_DIR = "damaged_checkpoints"
# Files Orbax writes for every step (paths inside the step directory); any missing = damaged.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


class DamagedCheckpointError(RuntimeError):
    """No intact checkpoint step to resume from (every step is damaged)."""


def create_manager(workdir: str | epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager for ``workdir/checkpoints`` keeping ``config.keep_checkpoints`` steps, saving asynchronously."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.get("keep_checkpoints", 3), create=True,
        enable_async_checkpointing=config.get("async_checkpointing", True))
    return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), item_names=ITEMS, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data: dict[str, Any] | None = None
         ) -> None:
    """Saves ``state`` as step ``step`` with its fingerprints, plus the data position ``data`` (JSON).

    Raises:
      ValueError: the step already exists (Orbax would otherwise delete it and write anew).
    """
    if step in manager.all_steps():
        raise ValueError(f"checkpoint step {step} already exists in {manager.directory}; not overwriting it")
    items = {"state": ocp.args.StandardSave(state),
             "fingerprints": ocp.args.JsonSave(fingerprints(state))}
    if data is not None:
        items["data"] = ocp.args.JsonSave(data)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding targets for restoring into arrays laid out like ``state``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                        if isinstance(a, jax.Array) else a, state)


# ------------------------------------------------------------------------ fingerprints
def _path_name(path: tuple[Any, ...]) -> str:
    """``params/blocks_0/proj_in/kernel``: the same for a dataclass field and a dict key."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 hashes of an array's bits: ``Σ bits·(2i+1)`` and a mixed sum (mod 2³²).

    Any single changed bit changes the first hash (odd weights), whatever the sharding
    (integer sums do not depend on the reduction order).
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a last axis of 2
    else:
        narrow = {2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):  # the flat index, without reshaping (keeps the sharding)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    first = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    mixed = (bits ^ (bits >> 15)) * jnp.uint32(0x2C1B3C6D) + index * jnp.uint32(0x9E3779B1)
    second = jnp.sum(mixed ^ (mixed >> 13), dtype=jnp.uint32)
    return jnp.stack([first, second])


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(out_sharding: Any):
    return jax.jit(lambda leaves: [_leaf_fingerprint(a) for a in leaves], out_shardings=out_sharding)


def fingerprints(tree: Any) -> dict[str, list[int]]:
    """``{path: [hash1, hash2]}`` of every array in ``tree`` (see :func:`_leaf_fingerprint`).

    Computed on the devices where the arrays live (one jitted reduction; multi-host safe:
    every process gets the same numbers).
    """
    flat = [(p, a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(a, "dtype")]
    if not flat:
        return {}
    arrays = [jnp.asarray(a) if not isinstance(a, jax.Array) else a for _, a in flat]
    sharding = arrays[0].sharding
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    hashes = jax.device_get(_fingerprint_fn(out)(arrays))
    return {_path_name(p): [int(h[0]), int(h[1])] for (p, _), h in zip(flat, hashes)}


def fingerprint_mismatches(tree: Any, saved: dict[str, list[int]]) -> list[str]:
    """Paths of ``tree``'s arrays whose fingerprint differs from ``saved`` (paths ``saved`` lacks are skipped)."""
    now = fingerprints(tree)
    return [path for path, value in now.items() if path in saved and list(saved[path]) != value]


# ------------------------------------------------------------------ damaged steps
def _step_dir(directory: epath.Path, step: int) -> epath.Path:
    return epath.Path(directory) / str(step)


def missing_files(directory: epath.Path, step: int) -> list[str]:
    """The :data:`REQUIRED_FILES` (and JSON items' files) absent from step ``step``."""
    step_dir = _step_dir(directory, step)
    missing = [f for f in REQUIRED_FILES if not (step_dir / f).exists()]
    for item in ("data", "fingerprints"):
        if (step_dir / item).is_dir() and not (step_dir / item / "metadata").exists() \
                and not list((step_dir / item).glob("process_*.json")):
            missing.append(f"{item}/metadata")
    return missing


def _read_legacy_data(step_dir: epath.Path) -> dict[str, Any] | None:
    """The per-process grain iterator states that checkpoints before the global data position held."""
    files = sorted((step_dir / "data").glob("process_*.json"))
    if not files:
        return None
    return {"grain_states": [json.loads(f.read_text()) for f in files]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _any_process(flag: bool) -> bool:
    """True when ``flag`` is true on any process (a collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _checked_restore(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]
                     ) -> tuple[dict[str, Any] | None, str | None]:
    """Restores ``items`` (a ``"state"`` item and others) of step ``step`` and checks them: ``(out, problem)``.

    ``problem`` is None for an intact step, else what was wrong: a missing metadata file, the
    restore error, or the restored state arrays whose bits differ from the fingerprints saved
    with them (checked when the step has fingerprints); the processes agree on it. ``out``
    holds the restored items, or None when there is a problem.
    """
    directory = epath.Path(manager.directory)
    out, problem = None, None
    missing = missing_files(directory, step)
    if missing:
        problem = f"missing metadata file(s) {', '.join(missing)}"
    else:
        items = dict(items)
        if (_step_dir(directory, step) / "fingerprints").is_dir():
            items["fingerprints"] = ocp.args.JsonRestore()
        try:
            out = manager.restore(step, args=ocp.args.Composite(**items))
            if "fingerprints" in items:
                bad = fingerprint_mismatches(out["state"], out["fingerprints"])
                if bad:
                    problem = (f"{len(bad)} array(s) differ from the fingerprints saved with them "
                               f"(corrupted bytes), e.g. {bad[0]}")
        except Exception as e:  # noqa: BLE001 - any failure to read the step marks it damaged
            problem = f"restore failed: {_first_line(e)}"
    if _any_process(problem is not None) and problem is None:
        problem = "another process could not restore it"
    return (out if problem is None else None), problem


def check_and_restore(manager: ocp.CheckpointManager, step: int, target: Any,
                      restore_data: bool = True) -> tuple[Any, Any, str | None]:
    """Restores step ``step`` onto ``target`` and checks it: ``(state, data, problem)``.

    ``problem`` is None for an intact step, else what was wrong (a missing file, the
    restore error, or the arrays whose bits differ from their saved fingerprints); the
    processes agree on it, and ``state`` and ``data`` are None then. ``data`` is the data
    item (see ``input_pipeline.resume_position``), or None when the step has none.
    """
    directory = epath.Path(manager.directory)
    step_dir = _step_dir(directory, step)
    items = {"state": ocp.args.StandardRestore(abstract_like(target))}
    legacy = None
    if restore_data and not missing_files(directory, step):
        legacy = _read_legacy_data(step_dir)
        if legacy is None and (step_dir / "data").is_dir():
            items["data"] = ocp.args.JsonRestore()
    out, problem = _checked_restore(manager, step, items)
    if problem is not None:
        return None, None, problem
    data = legacy if legacy is not None else (out["data"] if "data" in items else None)
    return out["state"], data, None


def quarantine(directory: epath.Path, step: int, problem: str) -> epath.Path:
    """Moves damaged step ``step`` to ``WORKDIR/damaged_checkpoints/<step>`` untouched (process 0).

    The reason goes to ``<step>.reason.txt`` beside it. Every process waits for the move.

    Raises:
      DamagedCheckpointError: the step cannot be moved (e.g. a file system without
        directory renames); the message says how to proceed.
    """
    directory = epath.Path(directory)
    source = _step_dir(directory, step)
    root = directory.parent / DAMAGED_DIR
    target = root / str(step)
    n = 1
    while target.exists():
        target, n = root / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            workdir_lib.write_atomic(root / f"{target.name}.reason.txt", (problem + "\n").encode())
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {directory} is damaged ({problem}) and could not be moved "
                f"aside ({_first_line(e)}). Move {source} out of {directory} by hand (e.g. to {target}), "
                f"then restart to resume from the newest intact step.") from e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f"tarflow_quarantine_{step}")
    return target


def restore_newest_intact(manager: ocp.CheckpointManager, target: Any
                          ) -> tuple[Any, Any, int] | None:
    """Resumes from the newest intact step; damaged newer steps are warned about and moved aside.

    Args:
      manager: from :func:`create_manager`.
      target: a state of arrays or ``jax.ShapeDtypeStruct`` with shardings (a checkpoint
        saved on one mesh restores onto another).

    Returns:
      ``(state, data, step)`` of the newest intact step (``data`` as in
      :func:`check_and_restore`), or None when the directory holds no step.

    Raises:
      DamagedCheckpointError: there are steps but none is intact (they are all moved to
        ``damaged_checkpoints/``; nothing is deleted), or a damaged step cannot be moved.
    """
    steps = sorted(manager.all_steps(read=True), reverse=True)
    if not steps:
        return None
    damaged = []
    for step in steps:
        state, data, problem = check_and_restore(manager, step, target)
        if problem is None:
            if damaged:
                manager.reload()
                logging.warning("Resuming from step %d, the newest intact checkpoint; damaged step(s) %s "
                                "were moved to %s", step, ", ".join(str(s) for s, _ in damaged),
                                epath.Path(manager.directory).parent / DAMAGED_DIR)
            return state, data, step
        where = quarantine(manager.directory, step, problem)
        logging.warning("Checkpoint step %d in %s is damaged: %s. Moved it (untouched) to %s; trying "
                        "the next older step.", step, manager.directory, problem, where)
        damaged.append((step, problem))
    manager.reload()
    listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
    raise DamagedCheckpointError(
        f"no intact checkpoint in {manager.directory}: {listing}. They were moved to "
        f"{epath.Path(manager.directory).parent / DAMAGED_DIR}; not starting again from step 0. To start "
        f"afresh, use a new --workdir; to recover, repair a step (or copy it from a backup) and move it "
        f"back into {manager.directory}.")


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """Restores the latest (or given) step onto ``target``'s shapes and shardings, checked.

    Args:
      manager: from :func:`create_manager`.
      target: a state of arrays or of ``jax.ShapeDtypeStruct`` with shardings, so a
        checkpoint saved on one mesh restores onto another.
      step: the step; default the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: the manager's directory holds no checkpoint.
      DamagedCheckpointError: the step is damaged (see :func:`check_and_restore`).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    state, _, problem = check_and_restore(manager, step, target, restore_data=False)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint step {step} in {manager.directory} is damaged: {problem}")
    return state


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
    else the raw ones) and the prior variance: no optimizer moments, no data state. The
    restored arrays are checked against the fingerprints saved with them; without ``step``,
    a damaged latest step is skipped (with a warning naming it and what was wrong) for the
    newest intact one. Nothing in the workdir is moved or changed.

    Args:
      workdir: a run's directory (local path or ``gs://...``), written by
        ``python -m tarflow_jax.main`` or the convert tool.
      use_ema: return the EMA parameters when the run kept them (``config.ema_decay > 0``).
      step: the checkpoint step; default the newest intact one.

    Returns:
      ``(model, variables, config)``: the ``TarFlow``, Flax variables
      ``{"params": ..., "prior": {"var": float32 (T, D)}}`` for ``model.apply``, and the
      run's config. Arrays are on the default device (replicated over all devices in a
      multi-process job, so every process can use them).

    Raises:
      FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
      DamagedCheckpointError: the given ``step``, or every step, is damaged.
    """
    model, variables, config, _ = load_with_step(workdir, use_ema, step)
    return model, variables, config


def load_with_step(workdir: str | epath.Path, use_ema: bool = True, step: int | None = None
                   ) -> tuple[TarFlow, dict[str, Any], ml_collections.ConfigDict, int]:
    """:func:`load`, also returning the step it restored."""
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
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        problems = []
        for candidate in steps:
            restored, problem = _restore_params(manager, candidate, target)
            if problem is None:
                if problems:
                    logging.warning("loading step %d of %s: the newer step(s) are damaged: %s", candidate,
                                    directory, "; ".join(f"step {s}: {p}" for s, p in problems))
                return (model, {"params": restored[params_key], "prior": {"var": restored["prior_var"]}},
                        config, candidate)
            logging.warning("checkpoint step %d in %s is damaged: %s", candidate, directory, problem)
            problems.append((candidate, problem))
    raise DamagedCheckpointError(f"no intact checkpoint to load in {directory}: "
                                 + "; ".join(f"step {s}: {p}" for s, p in problems))


def _restore_params(manager: ocp.CheckpointManager, step: int, target: dict[str, Any]
                    ) -> tuple[dict[str, Any] | None, str | None]:
    """A partial restore of ``target``'s entries of the state item, checked like :func:`check_and_restore`."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    out, problem = _checked_restore(manager, step, {
        "state": ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=restore_args)})
    return (out["state"] if out is not None else None), problem
