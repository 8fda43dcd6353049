"""TarFlow inside Flax NNX models, through Flax's own Linen → NNX bridge.

Two supported ways (both tested in ``tests/test_trained.py``):

* **Trainable** (a TarFlow whose weights an NNX optimiser updates): :func:`to_nnx` wraps the
  Linen module in ``flax.nnx.bridge.ToNNX`` and initialises it lazily from dummy inputs
  (``nnx.bridge.lazy_init``), or loads a :class:`~tarflow_jax.trained.TrainedFlow`'s weights
  into it. The result is an ``nnx.Module``: put it in an attribute of your own module; its
  weights are ``nnx.Param`` (found by ``nnx.Optimizer(..., wrt=nnx.Param)``), the prior
  variance table is a non-trainable variable of type ``prior``. Call it like the Linen
  module: ``z, logdet = m(x, y)``; other methods by name: ``m.reverse(z, y, guidance=...)``.
* **Frozen** (a fixed prior or likelihood): keep a ``TrainedFlow`` as data,
  ``self.prior = nnx.data(flow)``, and call its methods (``self.prior.log_prob(x, y)``).
  Its arrays are not ``nnx.Param``, so optimisers leave them alone while gradients still
  reach the inputs.

TarFlow's parameters carry logical sharding names (``"embed"``, ``"heads"``, ...). NNX in
Flax 0.12 shards variables eagerly when they carry such names, which needs a mesh and rules
mapping those names to mesh axes; :func:`to_nnx` creates the variables with eager sharding
off (unsharded, like ``model.init``), so it works without a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tarflow_jax.flow import TarFlow

__all__ = ["to_nnx"]


def to_nnx(model_or_flow: Any, rngs: nnx.Rngs | jax.Array | int | None = None) -> nnx.bridge.ToNNX:
    """A TarFlow as an ``nnx.Module`` (``nnx.bridge.ToNNX``), initialised and ready to call.

    Args:
      model_or_flow: a :class:`~tarflow_jax.flow.TarFlow` (fresh weights from ``rngs``) or a
        :class:`~tarflow_jax.trained.TrainedFlow` (its weights and prior variance; ``rngs``
        only seeds the init whose values are then replaced).
      rngs: ``nnx.Rngs``, a key, or an int seed (default 0).

    Returns:
      ``nnx.bridge.ToNNX`` whose ``__call__(x, y=None)`` returns ``(z, logdet)`` like
      ``TarFlow.__call__`` (``x`` float ``(B, H, W, C)`` in ``[-1, 1]``; ``z`` same shape,
      ``logdet`` ``(B,)`` nats) and whose ``reverse``/``denoise`` methods work by name.

    Raises:
      TypeError: for anything but a ``TarFlow`` or ``TrainedFlow``.
    """
    from tarflow_jax.trained import TrainedFlow

    if isinstance(model_or_flow, TrainedFlow):
        model, variables = model_or_flow.model, model_or_flow.variables
    elif isinstance(model_or_flow, TarFlow):
        model, variables = model_or_flow, None
    else:
        raise TypeError(f"to_nnx takes a TarFlow or a TrainedFlow; got {type(model_or_flow).__name__}")
    if rngs is None or isinstance(rngs, int):
        rngs = nnx.Rngs(0 if rngs is None else rngs)
    x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    with nnx.use_eager_sharding(False):
        module = nnx.bridge.ToNNX(model.clone(parent=None), rngs=rngs).lazy_init(x, y)
    if variables is not None:
        # ToNNX keeps each top-level Linen variable as an attribute: blocks_<k>, and `var`.
        nnx.update(module, {**variables["params"], "var": variables["prior"]["var"]})
    return module
