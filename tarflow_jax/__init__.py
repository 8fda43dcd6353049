"""TarFlow in JAX/Flax: Transformer autoregressive normalizing flows on image pixels.

The package root holds the model core and checkpoint reading: ``TarFlow``, ``JacobiPlan``,
``TrainedFlow`` and ``load`` (a trained flow from a workdir, a ``.pth`` file or a variables
dict). Importing it imports neither the trainer, optax, clu, grain, TensorFlow, distrax nor
``flax.nnx``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from tarflow_jax import checkpointing, configlib, convert
from tarflow_jax.flow import MetaBlock, TarFlow, patchify, unpatchify
from tarflow_jax.sampling import JacobiPlan
from tarflow_jax.trained import SampleOptions, TrainedFlow

__all__ = ["TarFlow", "MetaBlock", "JacobiPlan", "TrainedFlow", "SampleOptions", "load", "patchify",
           "unpatchify"]
__version__ = "0.1.0"


def load(source: str | os.PathLike | Mapping[str, Any], use_ema: bool = True, step: int | None = None,
         *, config: Any = None, model: TarFlow | None = None) -> TrainedFlow:
    """A trained flow as a :class:`TrainedFlow`, from any of the forms a user holds.

    * a **workdir** of ``python -m tarflow_jax.main`` or of the convert tool
      (``python -m tarflow_jax.tools.convert``): its config and, from the newest intact (or
      ``step``) checkpoint, only the parameters (EMA ones when kept and ``use_ema``) and the
      prior variance, checked against the fingerprints saved with them
      (:func:`tarflow_jax.checkpointing.load`);
    * the authors' **``.pth`` file** (or a reference state dict) with ``config=`` describing
      its model, e.g. ``load("afhq_model_8_768_8_8_0.07.pth", config="configs/afhq256.py")``:
      converted in memory (:func:`tarflow_jax.convert.convert_for_config`; needs PyTorch);
    * a Flax **variables** dict (``{"params": ..., "prior": ...}``, e.g. from
      :func:`tarflow_jax.convert.from_torch_state_dict` or a train state) with ``config=``
      or ``model=``.

    ``config`` is a ``ConfigDict``/dict or a config file ``"configs/NAME.py[:arg]"``; it sets
    the model, the pixel levels, the training noise and the default sampling options. With
    ``model=`` alone, the defaults are 256 levels, no noise, no guidance.

    Returns:
      The :class:`TrainedFlow`. Its ``model``, ``variables`` and ``config`` attributes are the
      triple that ``load`` returned before; unpacking ``model, variables, config = load(...)``
      still works but is deprecated (a ``DeprecationWarning``).

    Raises:
      FileNotFoundError: no workdir/config.json/checkpoint or no such file.
      ValueError: a ``.pth``/variables given without ``config`` or ``model``; weights that do
        not fit the config (the wrong config fields are named).
      checkpointing.DamagedCheckpointError: the given ``step``, or every step, is damaged.
    """
    if isinstance(config, (str, os.PathLike)):
        config = configlib.from_file(config)
    if isinstance(source, Mapping):
        if "params" in source:  # Flax variables
            if config is not None:
                return TrainedFlow.from_config(config, source)
            if model is not None:
                return TrainedFlow.create(model, source)
            raise ValueError("load(variables) needs config= (a run config or config file) or model= "
                             "(the TarFlow they belong to)")
        if config is None:
            raise ValueError("load(state_dict) needs config= describing the model, e.g. "
                             "config='configs/afhq256.py'")
        return TrainedFlow.from_config(config, convert.convert_for_config(source, _upgraded(config)))
    path = os.fspath(source)
    if os.path.isfile(path):
        if config is None:
            raise ValueError(f"{path} is a file: pass config= describing its model, e.g. "
                             f"tarflow_jax.load({path!r}, config='configs/afhq256.py')")
        return TrainedFlow.from_config(config, convert.convert_for_config(path, _upgraded(config)))
    if config is not None or model is not None:
        raise ValueError(f"{path} is a workdir: its own config.json describes the model; drop config=/model=")
    stored_model, variables, stored = checkpointing.load(path, use_ema=use_ema, step=step)
    return TrainedFlow.from_config(stored, variables)


def _upgraded(config: Any):
    return configlib.upgrade(config, source="the config given to tarflow_jax.load")
