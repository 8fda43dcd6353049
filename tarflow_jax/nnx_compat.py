"""TarFlow inside Flax NNX models, through Flax's own Linen → NNX bridge.

Two supported ways (both tested in ``tests/test_trained.py``):

* **Trainable** (a TarFlow whose weights an NNX optimiser updates): :func:`to_nnx` wraps the
  Linen module in ``flax.nnx.bridge.ToNNX`` and initialises it lazily from dummy inputs
  (``nnx.bridge.lazy_init``), then optionally loads given weights (``flow.to_nnx()`` loads a
  :class:`~tarflow_jax.trained.TrainedFlow`'s). The result is an ``nnx.Module``: put it in an attribute of your own module; its
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
off (unsharded, like ``model.init``), so it works without a mesh. ``flax.nnx`` is imported
when :func:`to_nnx` runs, not with the package.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from tarflow_jax.flow import TarFlow

__all__ = ["to_nnx"]


def to_nnx(model: TarFlow, rngs: Any = None, variables: Mapping[str, Any] | None = None) -> Any:
    """A TarFlow as an ``nnx.Module`` (``nnx.bridge.ToNNX``), initialised and ready to call.

    Args:
      model: the :class:`~tarflow_jax.flow.TarFlow`.
      rngs: ``nnx.Rngs``, a key, or an int seed (default 0) for the initial weights.
      variables: Flax variables ``{"params": ..., "prior": {"var": ...}}`` to load instead of
        the initial values (e.g. ``flow.variables``; ``flow.to_nnx()`` does this).

    Returns:
      ``nnx.bridge.ToNNX`` whose ``__call__(x, y=None)`` returns ``(z, logdet)`` like
      ``TarFlow.__call__`` (``x`` float ``(B, H, W, C)`` in ``[-1, 1]``; ``z`` the same shape,
      ``logdet`` ``(B,)`` nats) and whose ``reverse``/``denoise`` methods work by name.

    Raises:
      TypeError: ``model`` is not a ``TarFlow``.
      ValueError: ``variables`` do not match the model's (NNX names the mismatch).
    """
    from flax import nnx

    if not isinstance(model, TarFlow):
        raise TypeError(f"to_nnx takes a tarflow_jax.TarFlow; got {type(model).__name__}")
    if rngs is None or isinstance(rngs, int):
        rngs = nnx.Rngs(0 if rngs is None else rngs)
    with nnx.use_eager_sharding(False):
        module = nnx.bridge.ToNNX(model.clone(parent=None), rngs=rngs).lazy_init(*model.dummy_inputs())
    if variables is not None:
        # ToNNX keeps each top-level Linen variable as an attribute: blocks_<k>, and `var`.
        state = dict(variables["params"])
        if "prior" in variables:
            state["var"] = variables["prior"]["var"]
        nnx.update(module, jax.tree.map(jax.numpy.asarray, state))
    return module
