"""Command line: ``python -m tarflow_jax.main --config=configs/digits.py --workdir=DIR [--mode=...]``.

Modes: ``train`` (resumes from ``DIR`` when it holds a checkpoint), ``eval`` (bits/dim over
the full eval split of the latest checkpoint) and ``sample`` (PNG grid and ``.npz``).
``eval`` and ``sample`` without ``--config`` use the run's own ``DIR/config.json``; either
way ``--config.FIELD=VALUE`` overrides any field (ml_collections' override flags).
Multi-host: ``--jax_distributed`` (or ``TARFLOW_DISTRIBUTED=1``) calls
``jax.distributed.initialize()``, which finds the coordinator on TPU VMs and under Slurm;
elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tarflow_jax import checkpointing, evaluate, generate, sharding, train, workdir as workdir_lib
from tarflow_jax.flow import count_params

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/digits.py"
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and samples.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                  "What to do. eval/sample without --config use WORKDIR/config.json.")
flags.DEFINE_bool("jax_distributed", os.environ.get("TARFLOW_DISTRIBUTED", "0") == "1",
                  "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, optional).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, optional).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host, optional).")
flags.mark_flags_as_required(["workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """Defines ``--config`` for the mode at hand, then parses ``argv`` (absl's ``flags_parser``).

    ``--config=FILE`` (or, in train mode without it, ``configs/digits.py``) is a config
    file flag; in eval/sample mode without it, the flag holds the run's stored config
    (``config_flags.DEFINE_config_dict``). Either way ml_collections parses the
    ``--config.FIELD=VALUE`` overrides against that config's field types.
    """
    FLAGS(argv, known_only=True)  # --workdir and --mode decide what --config is
    given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    if given or FLAGS.mode == "train":
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.",
                                        lock_config=True, sys_argv=list(argv))
    else:
        try:
            stored = workdir_lib.load_config(FLAGS.workdir) if FLAGS.workdir else None
        except FileNotFoundError as e:
            sys.exit(f"FATAL: {e}; or pass --config=configs/NAME.py")
        config_flags.DEFINE_config_dict("config", stored, "The run's stored config (WORKDIR/config.json).",
                                        lock_config=True, sys_argv=list(argv))
    return app.parse_flags_with_usage(argv)


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
    model, variables, saved = checkpointing.load(workdir, use_ema=config.eval.use_ema)
    mesh = sharding.create_mesh(config.mesh)
    result = evaluate.evaluate_bits_per_dim(model, variables, config, mesh, num_draws=config.eval.num_draws)
    step = checkpointing.latest_step(workdir) or 0
    path, row = evaluate.write_results(workdir, result, saved, step, count_params(variables["params"]))
    print(f"test bits/dim {result['bpd']:.4f} ± {result['bpd_se']:.4f} "
          f"(IW bound {result['iw_bpd']:.4f}, {result['num_examples']} examples, "
          f"{result['num_draws']} draws) -> {path}\n{evaluate.MARKDOWN_HEADER}\n{row}")


def run_sample(workdir: str, config) -> None:
    """``config.sample.num_samples`` samples of the latest checkpoint as PNG grid and ``.npz``."""
    model, variables, _ = checkpointing.load(workdir, use_ema=config.eval.use_ema)
    mesh = sharding.create_mesh(config.mesh)
    result = generate.generate(model, variables, config, mesh, config.sample.num_samples, seed=config.seed)
    step = checkpointing.latest_step(workdir) or 0
    npz, png = generate.write_samples(workdir, result, f"samples_{step:08d}")
    print(f"{len(result['images'])} samples -> {npz}, grid {png}; NaN samples: {result['num_nan']}"
          + (f", {result['num_missing']} missing after redraws" if result["num_missing"] else ""))


class _QuietLibraries(pylogging.Filter):
    """Drops INFO lines of Orbax and grain (one per file they write), keeps warnings and errors."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            part in record.pathname for part in ("/orbax/", "/grain/", "/tensorstore/"))


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.jax_distributed:
        initialize_distributed()
    config = FLAGS.config
    if FLAGS.mode == "train":
        state = train.train_and_evaluate(config, FLAGS.workdir)
        logging.info("finished at step %d", int(state.step))
    elif FLAGS.mode == "eval":
        run_eval(FLAGS.workdir, config)
    else:
        run_sample(FLAGS.workdir, config)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
