"""Two JAX processes on localhost (CPU collectives over gloo): a multi-host run, end to end.

Each process has 2 simulated CPU devices, so the mesh ``data 2 × fsdp 2`` spans both
processes (FSDP shards live on different processes). The run trains 3 steps, evaluates
and samples (shard_map, gathered to every process) and saves one checkpoint; a second
two-process run resumes from it to step 5.
"""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tarflow_jax import input_pipeline, sharding, train, train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS = re.compile(r"\] \[(\d+)\] .*[ ,]loss=([-+0-9.eE]+)")


def free_port() -> int:
    try:
        import portpicker
        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]


def run_two_processes(workdir: pathlib.Path, num_train_steps: int) -> list[str]:
    """Starts processes 0 and 1 of one job; returns their logs (stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "tarflow_jax.main", "--config=configs/digits.py:smoke",
               f"--workdir={workdir}", "--jax_distributed", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}", f"--config.num_train_steps={num_train_steps}",
               "--config.checkpoint_every_steps=0", "--config.mesh.fsdp=2",
               "--config.eval.batch_size=152"]
        log = open(workdir.parent / f"{workdir.name}_{num_train_steps}_{i}.log", "w+")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    logs = []
    try:
        for proc, log in procs:
            proc.wait(timeout=600)
            log.seek(0)
            logs.append(log.read())
            assert proc.returncode == 0, logs[-1][-5000:]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    return logs


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
    assert sorted(p.name for p in (checkpoints / "3" / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert list((workdir / "samples").glob("samples_00000003.png"))

    resumed = run_two_processes(workdir, 5)
    for log in resumed:
        assert "Resumed from step 3" in log and "finished at step 5" in log
    loss0, loss1 = losses(resumed[0]), losses(resumed[1])
    assert sorted(loss0) == [4, 5] and loss0 == loss1
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["3", "5"]
