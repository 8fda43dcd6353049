"""Several JAX processes on localhost (CPU collectives over gloo): multi-host runs, end to end.

Each process of a two-process job has 2 simulated CPU devices, so the mesh ``data 2 × fsdp
2`` spans both processes (FSDP shards live on different processes); a one-process job has
all 4 devices. Checked: a run, its evaluation and sampling, and resuming; a SIGTERM to only
one process (both save the same step, the restarted pair ends bit-exactly where an
uninterrupted pair does); resuming on another number of processes (2 → 1 and 1 → 2: the
same batches and, up to float32 reduction order, the same parameters).
"""

import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tarflow_jax import checkpointing, input_pipeline, sharding, train, train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS = re.compile(r"\] \[(\d+)\] .*[ ,]loss=([-+0-9.eE]+)")
DEVICES = 4  # in every job, spread over its processes


def free_port() -> int:
    try:
        import portpicker
        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]


def launch(workdir: pathlib.Path, num_processes: int, num_train_steps: int, *extra: str, tag: str = ""):
    """Starts the processes of one training job on ``DEVICES`` CPU devices; returns ``[(Popen, log)]``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // num_processes}"}
    port = free_port()
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", "tarflow_jax.main", "--config=configs/digits.py:smoke",
               f"--workdir={workdir}", f"--config.num_train_steps={num_train_steps}",
               "--config.checkpoint_every_steps=0", "--config.mesh.fsdp=2", "--config.eval.batch_size=152",
               *extra]
        if num_processes > 1:
            cmd += ["--jax_distributed", f"--coordinator_address=localhost:{port}",
                    f"--num_processes={num_processes}", f"--process_id={i}"]
        log = open(workdir.parent / f"{workdir.name}_{num_train_steps}{tag}_{i}.log", "w+")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def wait(procs, timeout: float = 900) -> list[str]:
    """Waits for the processes; returns their logs (each asserted to have exited 0)."""
    logs = []
    try:
        for proc, log in procs:
            proc.wait(timeout=timeout)
            log.seek(0)
            logs.append(log.read())
            assert proc.returncode == 0, logs[-1][-5000:]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    return logs


def run_two_processes(workdir: pathlib.Path, num_train_steps: int, *extra: str, tag: str = "") -> list[str]:
    """Starts processes 0 and 1 of one job; returns their logs (stderr)."""
    return wait(launch(workdir, 2, num_train_steps, *extra, tag=tag))


def losses(log: str) -> dict[int, str]:
    return {int(step): value for step, value in LOSS.findall(log)}


def single_process_losses(num_steps: int) -> list[float]:
    """The same steps in one process on one device (its batches equal the two processes' global ones)."""
    from test_train import get_config

    config = get_config("digits")
    config.num_train_steps = num_steps  # the learning-rate schedule depends on it
    model = train_state.create_model(config)
    tx, schedule = train_state.create_optimizer(config)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    iterator = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    state, _ = train_state.create_train_state(config, model, tx, mesh)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config))
    out = []
    for _ in range(num_steps):
        batch = input_pipeline.make_global_batch(next(iterator), sharding.batch_sharding(mesh))
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return out


@pytest.mark.slow  # ~50 s idle, ~2 min on 2 busy cores: four process start-ups and compiles
def test_two_process_run_and_resume(tmp_path):
    workdir = tmp_path / "run"
    first = run_two_processes(workdir, 3)
    for i, log in enumerate(first):
        assert f"process {i} of 2; 2 local / 4 global devices" in log
        assert "finished at step 3" in log and "test bits/dim" in log
    assert "('fsdp', 'tensor')" in first[0]  # the parameter overview shows shardings
    loss0, loss1 = losses(first[0]), losses(first[1])
    assert sorted(loss0) == [1, 2, 3]
    assert loss0 == loss1  # the same replicated numbers on both processes
    np.testing.assert_allclose([float(loss0[s]) for s in (1, 2, 3)], single_process_losses(3), rtol=1e-5)
    checkpoints = workdir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["3"]
    data = json.loads((checkpoints / "3" / "data" / "metadata").read_text())  # one global position
    assert data["examples_seen"] == 3 * 8 and data["batch_size"] == 8
    assert list((workdir / "samples").glob("samples_00000003.png"))

    resumed = run_two_processes(workdir, 5)
    for log in resumed:
        assert "Resumed from step 3" in log and "finished at step 5" in log
    loss0, loss1 = losses(resumed[0]), losses(resumed[1])
    assert sorted(loss0) == [4, 5] and loss0 == loss1
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["3", "5"]


def step_dirs(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_variables(a: pathlib.Path, b: pathlib.Path, exact: bool) -> None:
    """The raw and EMA parameters and the prior of two runs' newest checkpoints agree."""
    for use_ema in (False, True):
        va, vb = (jax.device_get(checkpointing.load(str(w), use_ema=use_ema)[1]) for w in (a, b))
        for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
            if exact:
                np.testing.assert_array_equal(x, y)
            else:  # float32 sums in another order (another process layout), then 3 AdamW steps
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # three two-process jobs (~2-4 min on 2 busy cores)
def test_sigterm_to_one_process_saves_the_same_step_everywhere(tmp_path):
    """Only process 1 gets SIGTERM; both agree on one step, save it and exit; the restart is bit-exact."""
    steps = 400
    flags = ("--config.log_every_steps=1", "--config.ema_decay=0.9")
    interrupted = tmp_path / "interrupted"
    procs = launch(interrupted, 2, steps, *flags)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # until both are training
            logs = [open(log.name).read() for _, log in procs]
            if all(len(losses(log)) >= 2 for log in logs) or any(p.poll() is not None for p, _ in procs):
                break
            time.sleep(0.5)
        procs[1][0].send_signal(signal.SIGTERM)
    except BaseException:
        for proc, _ in procs:
            proc.kill()
        raise
    logs = wait(procs)
    saved = [re.findall(r"Saved step (\d+) after SIGTERM", log) for log in logs]
    assert saved[0] and saved[0] == saved[1], [log[-3000:] for log in logs]
    step = int(saved[0][0])
    assert 2 <= step < steps and step_dirs(interrupted) == [step]
    assert "finished at step" in logs[0] and "test bits/dim" not in logs[0]  # stopped early, no final eval

    resumed = run_two_processes(interrupted, steps, *flags, tag="_resumed")
    assert all(f"Resumed from step {step} " in log for log in resumed)
    straight = tmp_path / "straight"
    reference = run_two_processes(straight, steps, *flags)
    assert step_dirs(interrupted) == [step, steps] and step_dirs(straight) == [steps]
    expected = losses(reference[0])
    got = {**losses(logs[0]), **losses(resumed[0])}
    assert got == expected  # every step's loss, as logged, before and after the restart
    assert_same_variables(interrupted, straight, exact=True)


def single_process_steps(num_steps: int) -> dict[int, float]:
    return {i + 1: loss for i, loss in enumerate(single_process_losses(num_steps))}


@pytest.mark.slow  # four jobs (six processes), ~3-5 min on 2 busy cores
def test_resume_on_another_number_of_processes(tmp_path):
    """2 processes -> resume with 1, and 1 -> 2: the batches and parameters of an uninterrupted run."""
    flags = ("--config.checkpoint_every_steps=3", "--config.ema_decay=0.9")
    one, two = tmp_path / "one", tmp_path / "two"
    runs = {"one": wait(launch(one, 1, 6, *flags)), "two": wait(launch(two, 2, 6, *flags))}
    assert step_dirs(one) == step_dirs(two) == [3, 6]
    expected = single_process_steps(6)  # one process, one device: the same global batches
    for name, logs in runs.items():
        np.testing.assert_allclose([float(losses(logs[0])[s]) for s in range(1, 7)],
                                   [expected[s] for s in range(1, 7)], rtol=1e-5, err_msg=name)
    for source, count, target in (("two", 1, "two_then_one"), ("one", 2, "one_then_two")):
        workdir = tmp_path / target
        shutil.copytree(tmp_path / source, workdir)
        shutil.rmtree(workdir / "checkpoints" / "6")  # as if the job had stopped after step 3
        logs = wait(launch(workdir, count, 6, *flags, tag="_resumed"))
        assert f"Resumed from step 3 in {workdir} (train stream position 24)" in logs[0]
        got = losses(logs[0])
        assert sorted(got) == [4, 5, 6]  # only the remaining steps ran
        np.testing.assert_allclose([float(got[s]) for s in (4, 5, 6)], [expected[s] for s in (4, 5, 6)],
                                   rtol=1e-5, err_msg=target)  # the batches of the uninterrupted run
        # the last three steps ran on the uninterrupted `count`-process layout; the first three did not
        assert_same_variables(workdir, tmp_path / ("one" if count == 1 else "two"), exact=False)
