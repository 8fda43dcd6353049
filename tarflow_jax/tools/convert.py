"""The authors' PyTorch TarFlow checkpoint as a ``tarflow_jax`` workdir.

The workdir is what ``tarflow_jax.load``, ``python -m tarflow_jax.main --mode=eval|sample``
(and ``--mode=train``, to fine-tune) use::

    python -m tarflow_jax.tools.convert --torch_checkpoint=afhq_model_8_768_8_8_0.07.pth \\
        --config=configs/afhq256.py --out=workdir/afhq_authors [--config.model.FIELD=...]

It writes ``OUT/config.json`` and an Orbax checkpoint ``OUT/checkpoints/0/state`` holding a
whole train state (the converted weights, fresh AdamW moments, EMA copy when the config keeps
one, the prior variance ``var``). The config's model fields are checked against the tensors'
shapes first; a mismatch names the config field and the value the checkpoint implies.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from tarflow_jax import checkpointing, configlib, train_state, workdir as workdir_lib
from tarflow_jax.convert import config_mismatches, convert_for_config, infer_model_fields, load_state_dict
from tarflow_jax.flow import count_params
from tarflow_jax.tools import cli

PROG = "python -m tarflow_jax.tools.convert"


def converted_state(variables: Mapping[str, Any], config: ml_collections.ConfigDict) -> train_state.TrainState:
    """A whole ``TrainState`` at step 0 around converted ``variables`` (like ``train_state.init_state``).

    Raises:
      ValueError: (internal) the state's tree or shapes differ from ``init_state``'s.
    """
    model = train_state.create_model(config)
    tx, _ = train_state.create_optimizer(config)
    params = variables["params"]
    if "prior" in variables:
        prior_var = jnp.asarray(variables["prior"]["var"], jnp.float32)
    else:
        prior_var = jnp.ones((model.num_tokens, model.token_dim), jnp.float32)
    _, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=params if config.ema_decay > 0 else None, prior_var=prior_var, rng=train_rng,
        consecutive_skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))
    # What `tarflow_jax.load` and the trainer restore onto: same tree, shapes and dtypes.
    init_fn = lambda rng: train_state.init_state(rng, model=model, tx=tx, config=config)
    target = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    if jax.tree.structure(state) != jax.tree.structure(target):
        raise ValueError("internal: the converted train state's structure differs from init_state's")
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    want = jax.tree_util.tree_flatten_with_path(target)[0]
    for (path, a), (_, b) in zip(got, want):
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            raise ValueError(f"internal: {jax.tree_util.keystr(path)} is {a.shape} {a.dtype}, "
                             f"init_state gives {b.shape} {b.dtype}")
    return state


def _check_no_checkpoints(out: str) -> None:
    directory = workdir_lib.checkpoint_dir(out)
    if directory.is_dir():
        steps = sorted(p.name for p in directory.iterdir() if p.name.isdigit())
        if steps:
            raise FileExistsError(f"{directory} already holds checkpoint steps {steps}; "
                                  f"convert into an empty --out directory")


def write_workdir(out: str, config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                  metadata: Mapping[str, Any] | None = None) -> str:
    """Writes ``out/config.json`` and the step-0 Orbax checkpoint of the converted weights.

    Returns:
      The checkpoint step directory.

    Raises:
      FileExistsError: ``out`` already holds checkpoints (``load`` would pick the latest step).
    """
    _check_no_checkpoints(out)
    state = converted_state(variables, config)
    workdir_lib.save_config(out, config)
    manager = checkpointing.create_manager(out, config)
    try:
        checkpointing.save(manager, 0, state)
        manager.wait_until_finished()
    finally:
        manager.close()
    if metadata is not None and jax.process_index() == 0:
        workdir_lib.write_atomic(workdir_lib.workdir_path(out) / "converted_from.json",
                                 json.dumps(dict(metadata), indent=2).encode())
    return str(workdir_lib.checkpoint_dir(out) / "0")


def convert_checkpoint(torch_checkpoint: str | os.PathLike | Mapping[str, Any],
                       config: ml_collections.ConfigDict, out: str) -> dict[str, Any]:
    """The reference checkpoint as a ``tarflow_jax`` workdir ``out`` for ``config``.

    Returns:
      A summary: ``source``, ``checkpoint`` (the step directory), ``num_params`` and the
      ``inferred`` model fields.

    Raises:
      ValueError: the checkpoint does not fit the config; names the wrong config fields
        (and the first mismatched state dict key, with both shapes).
      FileNotFoundError, FileExistsError, ImportError: see :func:`from_torch_state_dict`
        and :func:`write_workdir`.
    """
    source = os.fspath(torch_checkpoint) if isinstance(torch_checkpoint, (str, os.PathLike)) else "state dict"
    _check_no_checkpoints(out)
    state = load_state_dict(torch_checkpoint)
    if not config_mismatches(state, configlib.model_kwargs(config)):
        train_state.validate_config(config)  # e.g. a width the head dim does not divide
    variables = convert_for_config(state, config, source)
    num_params = count_params(variables["params"])
    inferred = infer_model_fields(state)
    del state
    metadata = {"torch_checkpoint": os.path.abspath(source) if source != "state dict" else source,
                "num_params": num_params, "inferred_from_shapes": inferred}
    step_dir = write_workdir(out, config, variables, metadata)
    return {"source": source, "checkpoint": step_dir, "num_params": num_params, "inferred": inferred}


# --------------------------------------------------------------------------- command line
_USAGE = f"""\
Converts the authors' PyTorch TarFlow checkpoint into a tarflow_jax workdir.

  {PROG} --torch_checkpoint=FILE.pth --config=configs/afhq256.py --out=DIR \\
      [--config.model.FIELD=VALUE ...]

Then: python -m tarflow_jax.main --workdir=DIR --mode=sample  (or --mode=eval, or tarflow_jax.load(DIR)).
"""


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """This tool's flags, on a fresh ``FlagValues``."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]) "
                                    "describing the checkpoint's model; override fields with "
                                    "--config.model.FIELD=VALUE.", flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    flags.DEFINE_string("torch_checkpoint", None, "The reference .pth file (a state dict, or a dict "
                        "holding one under 'state_dict'/'model'/'ema').", flag_values=fv)
    flags.DEFINE_string("out", None, "The workdir to write (config.json, checkpoints/0).", flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    argv = list(sys.argv if argv is None else argv)
    fv = define_flags(argv)
    rest = cli.parse_flags(fv, argv, PROG, _USAGE)
    if isinstance(rest, int):
        return rest
    missing = [f"--{name}" for name in ("config", "torch_checkpoint", "out") if not fv[name].present]
    if missing:
        return cli.usage_error(PROG, f"missing {', '.join(missing)}", _USAGE)
    error = cli.config_load_error(fv, "model")
    if error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    config = fv.config
    try:
        summary = convert_checkpoint(fv.torch_checkpoint, config, fv.out)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    m, d = config.model, config.dataset
    print(f"converted {summary['source']} ({summary['num_params'] / 1e6:.1f}M parameters; "
          f"image {d.image_size}x{d.image_size}x{d.channels}, patch_size={m.patch_size}, width={m.width}, "
          f"{m.num_blocks} blocks x {m.layers_per_block} layers, num_classes={m.num_classes}, nvp={m.nvp}) "
          f"-> {summary['checkpoint']}\n"
          f"next: python -m tarflow_jax.main --workdir={fv.out} --mode=sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
