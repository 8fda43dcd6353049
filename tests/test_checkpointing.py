"""Damaged and partial checkpoints, fingerprints, unwritable or full workdirs.

The damage is done to real Orbax checkpoints written by ``train_and_evaluate``: a
truncated or corrupted array file, missing metadata files, a missing item. The chosen
behaviour (see ``tarflow_jax.checkpointing``): resume from the newest intact step with a
warning that names the damaged step and what was wrong, move the damaged step untouched to
``WORKDIR/damaged_checkpoints/``, and stop with an error when no step is intact.
"""

import errno
import hashlib
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tarflow_jax
from tarflow_jax import checkpointing, sharding, train, train_state

from test_train import get_config


def digits_config(num_train_steps):
    config = get_config("digits")
    config.num_train_steps = num_train_steps
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.ema_decay = 0.9
    config.async_checkpointing = False
    return config


def tree_digest(directory: pathlib.Path) -> dict[str, str]:
    """sha1 of every file under ``directory`` (relative path -> digest)."""
    return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = largest_array_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def flip_bytes(step_dir):
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0x10 for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def remove(relative):
    def damage(step_dir):
        path = step_dir / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


DAMAGE = {  # name -> (damage, what the warning says)
    "truncated_array_file": (truncate, "restore failed"),
    "corrupted_bytes": (flip_bytes, "differ from the fingerprints saved with them"),
    "missing_array_metadata": (remove("state/_METADATA"), "missing metadata file(s) state/_METADATA"),
    "missing_ocdbt_manifest": (remove("state/manifest.ocdbt"), "state/manifest.ocdbt"),
    "missing_step_metadata": (remove("_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA"),
    "missing_state_item": (remove("state"), "missing metadata file(s) state/_METADATA"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits run to step 4 (checkpoints 2 and 4) and the same run straight to step 6."""
    root = tmp_path_factory.mktemp("runs")
    train.train_and_evaluate(digits_config(4), str(root / "run"))
    straight = jax.device_get(train.train_and_evaluate(digits_config(6), str(root / "straight")))
    return root / "run", straight


def fresh_target(config):
    model = train_state.create_model(config)
    tx, _ = train_state.create_optimizer(config)
    mesh = sharding.create_mesh(config.mesh)
    other = config.copy_and_resolve_references()
    other.seed = 7  # different values, so a restore that did nothing would show
    return train_state.create_train_state(other, model, tx, mesh)[0]


def test_fingerprints_see_every_flipped_bit():
    tree = {"f32": jnp.linspace(-3, 3, 24, dtype=jnp.float32).reshape(2, 3, 4),
            "bf16": jnp.arange(10, dtype=jnp.bfloat16), "i32": jnp.arange(5, dtype=jnp.int32),
            "u8": jnp.arange(7, dtype=jnp.uint8), "bool": jnp.array([True, False]),
            "key": jax.random.key(0), "scalar": jnp.float32(2.5)}
    saved = checkpointing.fingerprints(tree)
    assert sorted(saved) == sorted(tree) and checkpointing.fingerprint_mismatches(tree, saved) == []
    rng = np.random.default_rng(0)
    for name in ("f32", "bf16", "i32", "u8", "bool", "scalar"):
        host = np.array(tree[name])
        raw = host.reshape(-1).view(np.uint8)
        for _ in range(3):
            flipped = raw.copy()
            i = int(rng.integers(raw.size))
            flipped[i] ^= np.uint8(1 << int(rng.integers(1 if host.dtype == np.bool_ else 8)))
            changed = {**tree, name: jnp.asarray(flipped.view(host.dtype).reshape(host.shape))}
            assert checkpointing.fingerprint_mismatches(changed, saved) == [name], (name, i)
    swapped = {**tree, "i32": tree["i32"][::-1]}  # same values, other places
    assert checkpointing.fingerprint_mismatches(swapped, saved) == ["i32"]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_step_is_moved_aside_and_the_newest_intact_restored(kind, trained, tmp_path, caplog):
    run, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    damage, reason = DAMAGE[kind]
    damage(workdir / "checkpoints" / "4")
    damaged = tree_digest(workdir / "checkpoints" / "4")
    config = digits_config(6)
    target = fresh_target(config)
    manager = checkpointing.create_manager(str(workdir), config)
    with caplog.at_level(logging.WARNING):
        state, data, step = checkpointing.restore_newest_intact(manager, target)
    assert step == 2 and int(state.step) == 2 and data["examples_seen"] == 2 * config.batch_size
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "Checkpoint step 4" in warning and "is damaged" in warning and reason in warning, warning
    assert manager.all_steps() == [2] and not (workdir / "checkpoints" / "4").exists()
    moved = workdir / "damaged_checkpoints" / "4"
    assert tree_digest(moved) == damaged  # untouched
    assert reason in (workdir / "damaged_checkpoints" / "4.reason.txt").read_text()
    intact = checkpointing.restore(manager, target, step=2)
    for a, b in zip(jax.tree.leaves(jax.device_get(intact)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(a, b)
    manager.close()


def test_resume_past_a_damaged_step_is_exact_and_never_overwrites_it(trained, tmp_path, caplog):
    """End to end: the run resumes from step 2, saves a new step 4, and ends equal to a straight run."""
    run, straight = trained
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    flip_bytes(workdir / "checkpoints" / "4")
    damaged = tree_digest(workdir / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        resumed = jax.device_get(train.train_and_evaluate(digits_config(6), str(workdir)))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "Checkpoint step 4" in warning and "corrupted bytes" in warning
    assert "Resuming from step 2, the newest intact checkpoint" in warning
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # the batches and steps after step 2 are the straight run's
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]  # keep_checkpoints=2 collected step 2, a fresh step 4 was written
    assert tree_digest(workdir / "damaged_checkpoints" / "4") == damaged  # neither deleted nor overwritten
    # `load` reads the new step 4 / 6 fine, and skips a damaged newest step with a warning.
    # (It reads parameters only, so it checks their fingerprints only: damage to the optimizer
    # moments - where flip_bytes may land - does not stop it. A missing metadata file does.)
    remove("state/_METADATA")(workdir / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        _, variables, _, step = checkpointing.load_with_step(str(workdir))
    assert step == 4 and "checkpoint step 6" in caplog.text and (workdir / "checkpoints" / "6").exists()
    with pytest.raises(checkpointing.DamagedCheckpointError, match="step 6.*missing metadata"):
        tarflow_jax.load(str(workdir), step=6)


def test_no_intact_step_stops_instead_of_starting_over(trained, tmp_path):
    run, _ = trained
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    remove("state/_METADATA")(workdir / "checkpoints" / "2")
    truncate(workdir / "checkpoints" / "4")
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=r"no intact checkpoint.*step 4: restore failed.*step 2: missing metadata.*new --workdir"):
        train.train_and_evaluate(digits_config(6), str(workdir))
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir() if p.is_dir()) == ["2", "4"]
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


class CompileCounter:
    """Counts XLA backend compilations (JAX's monitoring events) while active."""

    count = 0
    active = False

    def __init__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = CompileCounter()


def fails_before_compiling(config, workdir, error, match):
    COMPILES.count, COMPILES.active = 0, True
    try:
        with pytest.raises(error, match=match) as info:
            train.train_and_evaluate(config, str(workdir))
    finally:
        COMPILES.active = False
    assert COMPILES.count == 0
    return info.value


def test_unwritable_workdir_fails_before_compiling(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    fails_before_compiling(digits_config(2), blocker / "run", OSError,
                           f"cannot write to the workdir {blocker}/run: Not a directory. Pass a --workdir")
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        fails_before_compiling(digits_config(2), readonly / "run", PermissionError, "cannot write to the workdir")


def test_workdir_without_room_for_a_checkpoint_fails_before_compiling(tmp_path):
    config = digits_config(2)
    config.model.update(width=65536, num_blocks=8, layers_per_block=8, head_dim=64)  # ~40 TB of state
    error = fails_before_compiling(config, tmp_path, OSError, r"GiB free, but one checkpoint of this run needs")
    assert error.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # not even config.json


def test_run_that_skips_almost_every_step_stops_nonzero(tmp_path):
    """148 of 150 steps skipped used to exit 0; the skipped-fraction rule stops it."""
    config = digits_config(150)
    config.checkpoint_every_steps = 0
    config.log_every_steps = 50
    config.max_consecutive_skips = 0  # only the fraction rule
    config.learning_rate = 1e30  # two good steps, then every loss is non-finite
    config.warmup_steps = 0
    config.grad_clip_norm = 0.0
    with pytest.raises(FloatingPointError, match=r"of the 100 training steps so far .* skipped, more than "
                                                 r"config.max_skipped_fraction=0.5"):
        train.train_and_evaluate(config, str(tmp_path))
    config.max_skipped_fraction = 0.0  # 0 disables the rule: the old behaviour
    config.num_train_steps = 4
    train.train_and_evaluate(config, str(tmp_path / "off"))
