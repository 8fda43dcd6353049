"""The config schema: defaults shared by every experiment, the ``smoke`` shrink, old-name upgrades, the model.

Image geometry has one source: ``config.dataset.image_size`` and ``config.dataset.channels``;
``config.model`` holds the Transformer (``width`` is its channel count, not the image's).
Optional fields that default to ``None`` (``dataset.data_dir``, ``dataset.resize``,
``dataset.label_key``, ``sample.labels``) are typed placeholders, so command-line
overrides such as ``--config.dataset.data_dir=gs://bucket/data`` parse.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from tarflow_jax.flow import TarFlow

# Old config.model fields and what replaced them (configs and run JSON written before the rename).
RENAMED_MODEL_FIELDS = {"channels": "width"}
# Old config.model fields that duplicated config.dataset ones.
MOVED_MODEL_FIELDS = {"img_size": "image_size", "in_channels": "channels"}
# TarFlow fields whose config field has another name; the others are config.model.<field>.
_CONFIG_PATHS = {"channels": "model.width", "img_size": "dataset.image_size",
                 "in_channels": "dataset.channels"}


MATMUL_PRECISIONS = ("default", "high", "highest")


def matmul_precision(config: ml_collections.ConfigDict):
    """A context applying ``config.matmul_precision`` to the matmuls traced inside it.

    ``"default"`` leaves JAX's default (on TPU one bfloat16 pass, also for float32 operands;
    TF32 on recent NVIDIA GPUs), ``"high"`` three bfloat16 passes, ``"highest"`` true float32.
    """
    return jax.default_matmul_precision(config.get("matmul_precision", "default"))


def config_path(model_field: str) -> str:
    """The config field (``"model.width"``, ``"dataset.image_size"``, ...) that sets a ``TarFlow`` field."""
    return _CONFIG_PATHS.get(model_field, f"model.{model_field}")


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with the reference recipe's values as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        name="tfds", tfds_name="", data_dir=config_dict.placeholder(str), train_split="train",
        eval_split="test", image_key="image", label_key=config_dict.placeholder(str),
        image_size=64, channels=3, num_levels=256, random_flip=True,  # the reference flips in every run (utils.get_data)
        resize=config_dict.placeholder(str), cache_dir=config_dict.placeholder(str)))
    c.dataset.label_key = "label"
    c.data_workers = 0
    # The Transformer flow; TarFlow's img_size/in_channels come from config.dataset.
    c.model = ml_collections.ConfigDict(dict(
        patch_size=2, width=768, num_blocks=8, layers_per_block=8, num_classes=0, nvp=True,
        head_dim=64, expansion=4, dtype="float32", scan_layers=False, remat=False,
        remat_policy="nothing", attention="xla"))
    # Matmul precision on accelerators (jax.default_matmul_precision) in the train, eval and
    # sampling steps: "default" (TPU: one bfloat16 pass even for float32), "high" (3 passes),
    # "highest" (true float32: 6 passes on TPU, no TF32 on GPU).
    c.matmul_precision = "default"
    # Input noise: "uniform" dequantization (likelihood models) or "gaussian" with noise_std.
    c.noise = "uniform"
    c.noise_std = 0.0
    c.label_drop = 0.0
    # Optimiser: AdamW, linear warmup from min_learning_rate, cosine to min_learning_rate.
    c.batch_size = 256
    c.num_train_steps = 100_000
    c.learning_rate = 1e-4
    c.min_learning_rate = 1e-6
    c.warmup_steps = 5_000
    c.b1, c.b2 = 0.9, 0.95
    c.weight_decay = 1e-4
    c.grad_clip_norm = 0.0  # 0 disables
    c.ema_decay = 0.0  # 0 disables; warmed up as min(decay, (1+t)/(10+t))
    c.max_consecutive_skips = 100  # non-finite steps in a row before the run stops (0: never)
    c.max_skipped_fraction = 0.5  # stop when more of all steps so far were skipped (0: never)
    # Periodic actions (0 disables; the last step always logs, evaluates, samples and saves).
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every_steps = 25_000
    c.sample_every_steps = 25_000
    c.profile = False
    c.eval = ml_collections.ConfigDict(dict(batch_size=256, num_draws=1, use_ema=True))
    c.sample = ml_collections.ConfigDict(dict(
        grid_size=64, batch_size=64, num_samples=64, guidance=0.0, guide_what="ab", attn_temp=1.0,
        annealed_guidance=False, solver="cached", denoise=True, denoise_scale=1.0,
        labels=config_dict.placeholder(tuple), redraw_nan=False))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a tiny model and a few steps, keeping its data and options (for CI)."""
    c.model.width = 64
    c.model.num_blocks = 2
    c.model.layers_per_block = 1
    size = c.dataset.image_size
    c.model.patch_size = min(c.model.patch_size, 2) if size % 2 == 0 else 1
    if size > 16:
        c.dataset.image_size = 16
        c.dataset.resize = "center_crop"
    c.batch_size = 8
    c.num_train_steps = 2
    c.warmup_steps = 1
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
    c.sample_every_steps = 0
    c.eval.batch_size = 8
    c.sample.grid_size = c.sample.batch_size = c.sample.num_samples = 4
    return c


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies a config's optional argument: nothing, or ``smoke``.

    Raises:
      ValueError: any other argument.
    """
    upgrade_in_place(c, source="the config file")
    if arg == "smoke":
        return smoke(c)
    if arg:
        raise ValueError(f"unknown config arg {arg!r}; expected nothing or 'smoke'")
    return c


def upgrade_in_place(c: ml_collections.ConfigDict, source: str = "the config") -> None:
    """Renames old ``config.model`` fields in ``c`` (with a FutureWarning naming them).

    ``model.channels`` becomes ``model.width``; ``model.img_size`` / ``model.in_channels``
    are dropped after checking that they equal ``dataset.image_size`` / ``dataset.channels``.

    Raises:
      ValueError: an old field contradicts its new home.
    """
    model, dataset = c.get("model"), c.get("dataset")
    if model is None:
        return
    old = [k for k in (*RENAMED_MODEL_FIELDS, *MOVED_MODEL_FIELDS) if k in model]
    if not old:
        return
    warnings.warn(f"{source} uses old field names config.model.{{{', '.join(old)}}}; read as "
                  f"config.model.width and config.dataset.{{image_size, channels}} (rename them: "
                  f"the old names will stop being read in a later release)", FutureWarning, stacklevel=3)
    for name, new in RENAMED_MODEL_FIELDS.items():
        if name in model:
            value = model[name]
            del model[name]
            model[new] = value
    for name, new in MOVED_MODEL_FIELDS.items():
        if name in model:
            value = model[name]
            del model[name]
            if dataset is not None and new in dataset and dataset[new] != value:
                raise ValueError(f"{source}: config.model.{name}={value} differs from "
                                 f"config.dataset.{new}={dataset[new]}; the image geometry lives in "
                                 f"config.dataset only (drop config.model.{name})")
            if dataset is not None and new not in dataset:
                dataset[new] = value


def upgrade(stored: Mapping[str, Any] | ml_collections.ConfigDict, source: str = "the config"
            ) -> ml_collections.ConfigDict:
    """A stored config (e.g. a run's ``config.json``) in today's schema, on top of :func:`base_config`.

    Old field names are upgraded (:func:`upgrade_in_place`); fields the stored config lacks
    take today's defaults, and ``None`` fields keep their placeholder type (so
    ``--config.dataset.data_dir=...`` overrides still parse). Fields unknown to the base are
    kept as stored.
    """
    config = ml_collections.ConfigDict(stored.to_dict() if isinstance(stored, ml_collections.ConfigDict)
                                       else dict(stored))
    upgrade_in_place(config, source)
    out = base_config()
    _merge(out, config)
    return out


def _merge(dst: ml_collections.ConfigDict, src: ml_collections.ConfigDict) -> None:
    for key, value in src.items():
        if key in dst and isinstance(dst[key], ml_collections.ConfigDict) and isinstance(
                value, ml_collections.ConfigDict):
            _merge(dst[key], value)
            continue
        try:
            dst[key] = value
        except TypeError:  # a field whose type changed: take the stored value as it is
            del dst[key]
            dst[key] = value


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``TarFlow`` constructor arguments for ``config``: ``config.model`` plus the dataset's geometry.

    ``model.width`` becomes ``channels`` and ``dtype`` a NumPy dtype; ``img_size`` and
    ``in_channels`` come from ``config.dataset``.
    """
    kwargs = dict(config.model)
    kwargs["channels"] = kwargs.pop("width")
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
    kwargs["img_size"] = config.dataset.image_size
    kwargs["in_channels"] = config.dataset.channels
    return kwargs


def create_model(config: ml_collections.ConfigDict) -> TarFlow:
    """The ``TarFlow`` that ``config`` describes (see :func:`model_kwargs`).

    Raises:
      ValueError: the fields do not make a valid model (e.g. a width not divisible by the head dim).
    """
    return TarFlow(**model_kwargs(config))


def from_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config of an experiment file, ``"configs/NAME.py"`` or ``"configs/NAME.py:ARG"``.

    Runs the file's ``get_config(arg)`` as ``--config=`` on the command line does.

    Raises:
      FileNotFoundError: no such file. ValueError: the file has no ``get_config``.
    """
    path, _, arg = os.fspath(spec).partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r} (expected e.g. configs/afhq256.py[:smoke])")
    module_spec = importlib.util.spec_from_file_location(f"_tarflow_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg)")
    return upgrade(module.get_config(arg or None), source=path)
