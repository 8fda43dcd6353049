"""Command line: ``python -m tarflow_jax.main --config=configs/digits.py --workdir=DIR [--mode=...]``.

Modes: ``train`` (resumes from ``DIR`` when it holds a checkpoint), ``eval`` (bits/dim over
the full eval split of the latest checkpoint) and ``sample`` (PNG grid and ``.npz``).
Multi-host: ``--jax_distributed`` (or ``TARFLOW_DISTRIBUTED=1``) calls
``jax.distributed.initialize()``, which finds the coordinator on TPU VMs and under Slurm;
elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

from __future__ import annotations

import ast
import logging as pylogging
import os
import sys

import jax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from tarflow_jax import evaluate, generate, sharding, train
from tarflow_jax.checkpointing import checkpoint_dir, load, load_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/digits.py", "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_bool("jax_distributed", os.environ.get("TARFLOW_DISTRIBUTED", "0") == "1",
                  "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, optional).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, optional).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host, optional).")
flags.mark_flags_as_required(["workdir"])


def initialize_distributed() -> None:
    """Joins the multi-host job described by the flags or the environment."""
    kwargs = {k: v for k, v in dict(coordinator_address=FLAGS.coordinator_address,
                                    num_processes=FLAGS.num_processes,
                                    process_id=FLAGS.process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def run_eval(workdir: str, config) -> None:
    """Bits/dim of the latest checkpoint over the full eval split; JSON + Markdown row."""
    model, variables, saved = load(workdir, use_ema=config.eval.use_ema)
    mesh = sharding.create_mesh(config.mesh)
    result = evaluate.evaluate_bits_per_dim(model, variables, config, mesh, num_draws=config.eval.num_draws)
    step = load_step(workdir)
    path, row = evaluate.write_results(workdir, result, saved, step, evaluate.count_params(variables["params"]))
    print(f"test bits/dim {result['bpd']:.4f} ± {result['bpd_se']:.4f} "
          f"(IW bound {result['iw_bpd']:.4f}, {result['num_examples']} examples, "
          f"{result['num_draws']} draws) -> {path}\n{evaluate.MARKDOWN_HEADER}\n{row}")


def run_sample(workdir: str, config) -> None:
    """``config.sample.num_samples`` samples of the latest checkpoint as PNG grid and ``.npz``."""
    model, variables, _ = load(workdir, use_ema=config.eval.use_ema)
    mesh = sharding.create_mesh(config.mesh)
    result = generate.generate(model, variables, config, mesh, config.sample.num_samples, seed=config.seed)
    npz, png = generate.write_samples(workdir, result, f"samples_{load_step(workdir):08d}")
    print(f"{len(result['images'])} samples -> {npz}, grid {png}; NaN samples: {result['num_nan']}"
          + (f", {result['num_missing']} missing after redraws" if result["num_missing"] else ""))


def load_step(workdir: str) -> int:
    """The latest checkpoint step in ``workdir`` (0 if none)."""
    steps = ocp.utils.checkpoint_steps(checkpoint_dir(workdir))
    return max(steps) if steps else 0


class _QuietLibraries(pylogging.Filter):
    """Drops INFO lines of Orbax and grain (one per file they write), keeps warnings and errors."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            part in record.pathname for part in ("/orbax/", "/grain/", "/tensorstore/"))


def apply_overrides(config, argv: list[str]):
    """Applies ``--config.a.b=value`` arguments to ``config`` (values parsed like Python literals)."""
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        key, text = arg[len("--config."):].split("=", 1)
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if name not in node:
            raise ValueError(f"--config.{key}: the run's config has no field {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = node[name]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[name] = value
    return config


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.jax_distributed:
        initialize_distributed()
    config = FLAGS.config
    if FLAGS.mode != "train" and not FLAGS["config"].present:
        # evaluate/sample with the run's own settings, plus any --config.x=v given
        config = apply_overrides(load_config(FLAGS.workdir), sys.argv[1:])
    if FLAGS.mode == "train":
        state = train.train_and_evaluate(config, FLAGS.workdir)
        logging.info("finished at step %d", int(state.step))
    elif FLAGS.mode == "eval":
        run_eval(FLAGS.workdir, config)
    else:
        run_sample(FLAGS.workdir, config)


if __name__ == "__main__":
    app.run(main)
