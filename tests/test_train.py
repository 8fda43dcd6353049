"""The training loop: a step per config, main end to end, exact resume, NaN skips, load, config errors."""

import functools
import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import tarflow_jax
from tarflow_jax import checkpointing, input_pipeline, sharding, train, train_state
from tarflow_jax.flow import TarFlow

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("digits", "imagenet64_bpd", "imagenet64_bpd_official", "imagenet64_uncond", "imagenet64_cond",
           "imagenet128_cond", "afhq256", "cifar10")


def get_config(name: str, arg: str | None = "smoke"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def write_image_folder(root: pathlib.Path, classes=("cat", "dog", "wild"), per_class=3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (20 + 4 * i, 24)
                Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")


def write_official_imagenet(root: pathlib.Path, per_file: int = 2) -> None:
    """Tiny files in image-net.org's Imagenet64x64 pickle format (64x64, labels 1..1000)."""
    import pickle

    from tarflow_jax.input_pipeline import OFFICIAL_FILES
    rng = np.random.default_rng(0)
    for name in OFFICIAL_FILES["train"] + OFFICIAL_FILES["val"]:
        record = {"data": rng.integers(0, 256, (per_file, 3 * 64 * 64), dtype=np.uint8),
                  "labels": rng.integers(1, 1001, per_file).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(record, f)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_real_step_per_config(name, tmp_path):
    config = get_config(name)
    full = get_config(name, None)
    assert full.model.width >= 128 and full.num_train_steps >= 1000  # the real run is not the smoke one
    if name == "afhq256":
        write_image_folder(tmp_path)
        config.dataset.data_dir = str(tmp_path)
    if config.dataset.name == "imagenet_official":
        write_official_imagenet(tmp_path)
        config.dataset.data_dir = str(tmp_path)
    train_state.validate_config(config, jax.device_count())
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    mesh = sharding.create_mesh(config.mesh)
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=16):
        iterator = input_pipeline.create_train_iterator(config)
        batch = input_pipeline.make_global_batch(next(iterator), sharding.batch_sharding(mesh))
    state, _ = train_state.create_train_state(config, model, tx, mesh)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    assert int(new_state.step) == 1
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
    assert any(jax.tree.leaves(changed))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits smoke config run end to end through ``python -m tarflow_jax.main``."""
    workdir = tmp_path_factory.mktemp("digits")
    cmd = [sys.executable, "-m", "tarflow_jax.main", "--config=configs/digits.py:smoke",
           f"--workdir={workdir}", "--config.num_train_steps=3", "--config.sample_every_steps=3",
           "--config.ema_decay=0.5"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stderr


def test_main_end_to_end(digits_run):
    workdir, log = digits_run
    assert (workdir / "checkpoints" / "3" / "state").is_dir()
    assert list(workdir.glob("events.out.tfevents.*"))
    pngs = list((workdir / "samples").glob("samples_*.png"))
    assert pngs and Image.open(pngs[0]).size[0] > 8
    assert "test bits/dim" in log
    assert json.loads((workdir / "config.json").read_text())["model"]["num_classes"] == 10


def test_load_trained_flow(digits_run):
    workdir, _ = digits_run
    flow = tarflow_jax.load(str(workdir))
    model, variables, config = flow.model, flow.variables, flow.config
    raw = tarflow_jax.load(str(workdir), use_ema=False).variables
    assert isinstance(model, TarFlow) and config.dataset.name == "digits"
    x = jnp.zeros((2, 8, 8, 1))
    z, logdet = model.apply(variables, x, jnp.array([1, 2]))
    assert z.shape == x.shape and np.all(np.isfinite(logdet))
    differs = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["params"], raw["params"])
    assert any(jax.tree.leaves(differs))  # EMA parameters are not the raw ones
    with pytest.raises(FileNotFoundError, match="not a tarflow_jax workdir"):
        tarflow_jax.load(str(workdir / "nothing"))


LOAD_PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import tarflow_jax

workdir = sys.argv[1]
flow = tarflow_jax.load(workdir)
variables = flow.variables
x = flow.sample(jax.random.key(0), 2, jnp.array([1, 2]))
nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))
heavy = ("optax", "clu", "grain", "tensorflow", "tensorflow_datasets", "distrax", "tensorflow_probability")
ours = ("tarflow_jax.train", "tarflow_jax.train_state", "tarflow_jax.input_pipeline", "tarflow_jax.tools",
        "flax.nnx")
print("PROBE " + json.dumps({
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in heavy
                       or any(m == o or m.startswith(o + ".") for o in ours)),
    "keys": sorted(variables), "prior": sorted(variables["prior"]),
    "finite": bool(np.isfinite(np.asarray(x)).all()),
    "returned_bytes": nbytes(variables), "live_bytes": sum(a.nbytes for a in jax.live_arrays()),
}))
"""


def test_load_imports_no_trainer_and_restores_only_parameters(digits_run):
    """``tarflow_jax.load`` + sampling in a fresh process: no trainer/optax/clu/grain/TF, params + prior only."""
    workdir, _ = digits_run
    result = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(workdir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.split("PROBE ", 1)[1])
    assert probe["imported"] == [] and probe["finite"]
    assert probe["keys"] == ["params", "prior"] and probe["prior"] == ["var"]
    # The run kept an EMA and AdamW moments: a whole-state restore would hold >= 4x the parameters.
    assert probe["returned_bytes"] <= probe["live_bytes"] < 1.5 * probe["returned_bytes"]


def test_eval_and_sample_modes(digits_run):
    workdir, _ = digits_run
    # No --config: the run's stored config, with ml_collections overrides (a None-valued field too).
    sample_flags = ["--config.sample.num_samples=3", "--config.sample.labels=(7,8,9)"]
    for mode, extra in (("eval", []), ("sample", sample_flags)):
        result = subprocess.run([sys.executable, "-m", "tarflow_jax.main", f"--workdir={workdir}",
                                 f"--mode={mode}", *extra], cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((workdir / "eval_bpd_00000003.json").read_text())
    assert record["num_examples"] == 297 and record["markdown_row"].startswith("| digits test")
    samples = np.load(workdir / "samples" / "samples_00000003.npz")
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (3, 8, 8, 1)  # the override applies
    np.testing.assert_array_equal(samples["labels"], [7, 8, 9])


def run_training(config, workdir):
    state = train.train_and_evaluate(config, str(workdir))
    return jax.device_get(state)


def test_exact_resume(tmp_path):
    config = get_config("digits")
    config.num_train_steps = 4
    config.checkpoint_every_steps = 2
    config.ema_decay = 0.9
    config.async_checkpointing = False
    straight = run_training(config, tmp_path / "straight")
    config.num_train_steps = 2
    run_training(config, tmp_path / "stopped")
    config.num_train_steps = 4
    resumed = run_training(config, tmp_path / "stopped")
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # bit for bit


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    config = get_config("digits")
    config.num_train_steps = 2
    config.async_checkpointing = False
    run_training(config, tmp_path)
    good = checkpointing.load(str(tmp_path))[1]
    # A learning rate this large blows the parameters up after one step; then every loss is inf/NaN.
    config.num_train_steps = 40
    config.learning_rate = 1e30
    config.warmup_steps = 0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 100
    config.max_consecutive_skips = 3
    with pytest.raises(FloatingPointError, match="3 consecutive training steps had a non-finite"):
        run_training(config, tmp_path)
    after = checkpointing.load(str(tmp_path))[1]
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)  # the last good checkpoint is intact


def test_skipped_step_keeps_state(tmp_path):
    config = get_config("digits")
    config.noise, config.noise_std = "gaussian", float("nan")
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    state, _ = train_state.create_train_state(config, model, tx, sharding.create_mesh(config.mesh))
    batch = {"image": jnp.zeros((8, 8, 8, 1), jnp.uint8), "label": jnp.zeros((8,), jnp.int32)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config))
    new, metrics = step(state, batch)  # jitted, as in training (eager calls refuse NaN images)
    assert int(metrics["skipped"]) == 1 and int(new.consecutive_skips) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_schedule_runs_on_the_global_step_through_a_skipped_step():
    """A NaN batch at step 2 is skipped, yet step 3 applies the reference schedule's rate for step 3."""
    config = get_config("digits")
    config.num_train_steps, config.warmup_steps = 10, 4
    config.learning_rate, config.min_learning_rate = 1e-3, 1e-6
    config.grad_clip_norm = 0.0
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    state, _ = train_state.create_train_state(config, model, tx, sharding.create_mesh(config.mesh))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config))
    good = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 17, (8, 8, 8, 1)), jnp.uint8),
            "label": jnp.arange(8, dtype=jnp.int32) % 10}
    poisoned = {**good, "image": good["image"].astype(jnp.float32).at[0, 0, 0, 0].set(jnp.nan)}

    def reference_lr(s, warmup=4, total=10, lo=1e-6, hi=1e-3):  # utils.CosineLRSchedule, rate used at step s
        if s <= warmup:
            return lo + s / warmup * (hi - lo)
        return lo + 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) * (hi - lo)

    rates, skipped, adam_counts = [], [], []
    for i, batch in enumerate([good, good, poisoned, good, good, good]):
        before = state
        state, metrics = step(state, batch)
        rates.append(float(metrics["learning_rate"]))
        skipped.append(int(metrics["skipped"]))
        applied = float(optax.tree_utils.tree_get(state.opt_state, "learning_rate"))
        if not skipped[-1]:
            assert applied == pytest.approx(rates[-1], rel=1e-6)  # the logged rate is the one applied
        else:
            for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params)):
                np.testing.assert_array_equal(a, b)
        adam = [n for n in jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
                if isinstance(n, optax.ScaleByAdamState)]
        adam_counts.append(int(adam[0].count))
    assert skipped == [0, 0, 1, 0, 0, 0] and int(state.step) == 6
    np.testing.assert_allclose(rates, [reference_lr(s) for s in range(6)], rtol=1e-5)
    assert adam_counts == [1, 2, 2, 3, 4, 5]  # Adam's bias correction counts only applied updates


@pytest.mark.parametrize("field,value,match", [
    ("model.patch_size", 3, "config.dataset.image_size=8 is not divisible by config.model.patch_size=3"),
    ("noise", "salt", "config.noise must be one of"),
    ("batch_size", 12, "config.batch_size=12 is not divisible by the 8 data-parallel devices"),
    ("model.width", 100, "config.model.width=100 is not divisible by the head dim 64"),
    ("ema_decay", 1.5, r"config.ema_decay=1.5 must be in \[0, 1\)"),
    ("mesh.tensor", 3, "config.mesh"),
])
def test_bad_config_errors(field, value, match):
    config = get_config("digits")
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=match):
        train_state.validate_config(config, num_devices=8)


def test_sigterm_saves_before_exiting(tmp_path):
    cmd = [sys.executable, "-m", "tarflow_jax.main", "--config=configs/digits.py:smoke",
           f"--workdir={tmp_path}", "--config.num_train_steps=100000", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:  # wait until training is under way
            if "grad_norm=" in line and "loss=" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert "after SIGTERM" in rest


def test_jacobi_matches_cached_inverse_on_a_trained_digits_model(tmp_path):
    config = get_config("digits")
    config.num_train_steps = 150
    config.model.update(width=64, num_blocks=2, layers_per_block=1)
    config.checkpoint_every_steps = 0
    config.log_every_steps = 50
    config.async_checkpointing = False
    state = run_training(config, tmp_path)
    assert float(checkpointing.load(str(tmp_path))[0].num_dims) == 64
    model = train_state.create_model(config)
    variables = state.variables()
    z = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    y = jnp.array([0, 3, 5, 9])
    kw = dict(guidance=1.0, annealed_guidance=True, method=TarFlow.reverse)
    cached = model.apply(variables, z, y, **kw)
    jacobi = model.apply(variables, z, y, solver="jacobi",
                         jacobi=tarflow_jax.JacobiPlan(segments=2, tol=1e-6), **kw)
    np.testing.assert_allclose(jacobi, cached, atol=1e-4)
