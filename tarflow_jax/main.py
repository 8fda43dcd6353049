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
import math
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from tarflow_jax import (checkpointing, evaluate, generate, input_pipeline, sharding, train, workdir as workdir_lib,
                         xla_cpu)
from tarflow_jax.flow import count_params

FLAGS = flags.FLAGS
DEFAULT_CONFIG = "configs/digits.py"


def define_flags(fv: flags.FlagValues) -> None:
    """Defines this command's flags (all but ``--config``, which :func:`parse_flags` adds) on ``fv``."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard files and samples.",
                        flag_values=fv)
    flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                      "What to do. eval/sample without --config use WORKDIR/config.json.", flag_values=fv)
    flags.DEFINE_bool("jax_distributed", os.environ.get("TARFLOW_DISTRIBUTED", "0") == "1",
                      "Call jax.distributed.initialize() (multi-host runs).", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, optional).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, optional).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host, optional).", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


define_flags(FLAGS)


def parse_flags(argv: list[str], fv: flags.FlagValues = FLAGS) -> list[str]:
    """Defines ``--config`` for the mode at hand, then parses ``argv`` (absl's ``flags_parser``).

    ``--config=FILE`` (or, in train mode without it, ``configs/digits.py``) is a config
    file flag; in eval/sample mode without it, the flag holds the run's stored config
    (``config_flags.DEFINE_config_dict``). Either way ml_collections parses the
    ``--config.FIELD=VALUE`` overrides against that config's field types.

    Args:
      argv: the command line, program name first.
      fv: the flag set (a fresh ``flags.FlagValues()`` with :func:`define_flags` in tests).

    Returns:
      The arguments left over.
    """
    given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    try:
        fv(argv, known_only=True)  # --workdir and --mode decide what --config is
        if given or fv.mode == "train":
            config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.",
                                            lock_config=True, sys_argv=list(argv), flag_values=fv)
        else:
            stored = workdir_lib.load_config(fv.workdir) if fv.workdir else None
            config_flags.DEFINE_config_dict("config", stored, "The run's stored config (WORKDIR/config.json).",
                                            lock_config=True, sys_argv=list(argv), flag_values=fv)
        rest = app.parse_flags_with_usage(argv) if fv is FLAGS else fv(argv)
        # A config file that failed to load raises only when the config is first used: use it now.
        getattr(fv.config, "keys", None)
        return rest
    except OSError as e:  # --config=FILE that does not exist or cannot be read
        sys.exit(f"FATAL: {e}; pass --config=configs/NAME.py, a config file that exists")
    except KeyError as e:  # --config.no_such_field=...
        sys.exit(f"FATAL Flags parsing error: the config has no field {e}; a --config.FIELD=VALUE "
                 f"override names a field the config does not define (see the config file)")
    except (flags.Error, AttributeError, TypeError, ValueError) as e:  # e.g. a missing --workdir, an unknown --mode
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --help to see help on flags.")


def initialize_distributed() -> None:
    """Joins the multi-host job described by the flags or the environment."""
    kwargs = {k: v for k, v in dict(coordinator_address=FLAGS.coordinator_address,
                                    num_processes=FLAGS.num_processes,
                                    process_id=FLAGS.process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def run_eval(workdir: str, config) -> None:
    """Bits/dim of the newest intact checkpoint over the full eval split; JSON + Markdown row.

    Raises:
      FloatingPointError: the bits/dim is not finite (the model gives NaN/inf likelihoods).
    """
    model, variables, saved, step = checkpointing.load_with_step(workdir, use_ema=config.eval.use_ema)
    data_and_model = ml_collections.ConfigDict(config.to_dict())  # the data given here, the run's model
    data_and_model.model = ml_collections.ConfigDict(saved.model.to_dict())
    input_pipeline.check_config_against_data(data_and_model, splits=("eval",))
    mesh = sharding.create_mesh(config.mesh)
    result = evaluate.evaluate_bits_per_dim(model, variables, config, mesh, num_draws=config.eval.num_draws)
    path, row = evaluate.write_results(workdir, result, saved, step, count_params(variables["params"]))
    lines = [f"test bits/dim {result['bpd']:.4f} ± {result['bpd_se']:.4f} without labels "
             f"(IW bound {result['iw_bpd']:.4f})"]
    if "conditional" in result:
        c = result["conditional"]
        lines.append(f"test bits/dim {c['bpd']:.4f} ± {c['bpd_se']:.4f} given the labels "
                     f"(IW bound {c['iw_bpd']:.4f})")
    print("\n".join(lines) + f"\n({result['num_examples']} examples, {result['num_draws']} dequantization draws "
          f"each) -> {path}\n{evaluate.MARKDOWN_HEADER}\n{row}")
    if not math.isfinite(result["bpd"]):
        raise FloatingPointError(f"the test bits/dim of step {step} is not finite ({result['bpd']}): the "
                                 f"model gives non-finite likelihoods on this data")


def run_sample(workdir: str, config) -> None:
    """``config.sample.num_samples`` samples of the newest intact checkpoint as PNG grid and ``.npz``."""
    model, variables, _, step = checkpointing.load_with_step(workdir, use_ema=config.eval.use_ema)
    mesh = sharding.create_mesh(config.mesh)
    result = generate.generate(model, variables, config, mesh, config.sample.num_samples, seed=config.seed)
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
    # CPU only, before any computation; not for multi-process runs, whose setup above has
    # already started JAX's backends (so it could no longer take effect).
    reused = {} if FLAGS.jax_distributed else xla_cpu.reuse_host_memory()
    if reused:
        logging.info("XLA:CPU: host memory of temporaries reused between steps (%s)", reused)
    config = FLAGS.config
    if FLAGS.mode == "train":
        try:  # the checks that need no devices, before JAX starts any work
            train.validate_config(config)
        except ValueError as e:
            sys.exit(f"FATAL: {e}")
        state = train.train_and_evaluate(config, FLAGS.workdir)
        logging.info("finished at step %d", int(state.step))
    elif FLAGS.mode == "eval":
        run_eval(FLAGS.workdir, config)
    else:
        run_sample(FLAGS.workdir, config)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
