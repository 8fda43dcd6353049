"""A :class:`~tarflow_jax.trained.TrainedFlow` as a distrax bijector and distribution.

Needs distrax (``pip install 'tarflow_jax[distrax]'``); nothing else in the package imports
this module, so the core works without it. Build these with ``flow.as_bijector(y)`` and
``flow.as_distribution(y)``.

Direction convention: the bijector's ``forward`` is TarFlow's forward map, **data → latent**
(``z, log|det ∂z/∂x| = forward_and_log_det(x)``), the direction that is one parallel pass;
``inverse`` is the sequential decoder. A distribution over images is therefore
``distrax.Transformed(base, distrax.Inverse(flow.as_bijector(y)))`` for a base over latents
of event shape ``(H, W, C)``; with the standard normal base this is
``flow.as_distribution(y)``, and any other distrax base (another scale, a Student-t, ...)
gives a new image model with the same map.

Shapes: events are images ``(H, W, C)``; any leading batch dimensions are allowed and are
flattened into one batch for the model. Labels ``y`` are fixed when the object is built:
``None`` (no label), one integer for every input, or an int array whose shape is the
trailing part of the inputs' batch shape (``-1``: no label). ``distrax.Transformed`` samples
by ``vmap``-ping the bijector over single images, so a ``Transformed`` whose bijector holds
per-example labels evaluates ``log_prob`` but cannot sample: build it with one label (or
``None``) for sampling, or use ``flow.as_distribution(y)``, which samples a batch of labels.
"""

from __future__ import annotations

import math
from typing import Any

import distrax
import jax
import jax.numpy as jnp

from tarflow_jax.trained import TrainedFlow

__all__ = ["FlowBijector", "FlowDistribution", "standard_normal_base"]


def _labels_for(flow: TrainedFlow, y: Any, batch_shape: tuple[int, ...]) -> jax.Array | None:
    """Labels broadcast to ``batch_shape`` and flattened, or None."""
    if y is None:
        return None
    if not flow.num_classes:
        raise ValueError("labels y were given to an unconditional model (num_classes=0); pass y=None")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"labels y must be integers; got dtype {y.dtype}")
    if y.ndim and tuple(y.shape) != tuple(batch_shape[len(batch_shape) - y.ndim:]):
        raise ValueError(f"labels y have shape {tuple(y.shape)}, which does not match the batch shape "
                         f"{tuple(batch_shape)} of the inputs")
    return jnp.broadcast_to(y, batch_shape).reshape(-1).astype(jnp.int32)


def _split(flow: TrainedFlow, value: jax.Array, what: str) -> tuple[tuple[int, ...], jax.Array]:
    """``(batch_shape, value as (B, H, W, C))``; raises a ValueError for a wrong event shape."""
    event = flow.image_shape
    if value.ndim < 3 or tuple(value.shape[-3:]) != event:
        raise ValueError(f"{what} must end in the event shape (H, W, C) = {event}; got shape "
                         f"{tuple(value.shape)}")
    batch_shape = tuple(value.shape[:-3])
    return batch_shape, value.reshape((math.prod(batch_shape), *event))


class FlowBijector(distrax.Bijector):
    """TarFlow as a ``distrax.Bijector`` over images; ``forward``: data → latent.

    ``forward_and_log_det(x)`` returns ``flow.encode(x, y)``: latents and
    ``log|det ∂z/∂x|`` (nats, shape = batch shape). ``inverse(z)`` is the exact sequential
    inverse ``flow.decode(z, y)`` (no guidance); ``inverse_and_log_det(z)`` also returns
    ``log|det ∂x/∂z| = −forward log-det at x`` (one more forward pass). ``event_ndims_in =
    event_ndims_out = 3``.

    Args:
      flow: the :class:`TrainedFlow`.
      y: labels, fixed for this bijector (see the module docstring).
    """

    def __init__(self, flow: TrainedFlow, y: Any = None):
        super().__init__(event_ndims_in=3, event_ndims_out=3, is_constant_jacobian=False)
        if y is not None and not flow.num_classes:
            raise ValueError("labels y were given to an unconditional model (num_classes=0); pass y=None")
        self.flow = flow
        self.y = y

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch_shape, flat = _split(self.flow, jnp.asarray(x), "x")
        z, logdet = self.flow.encode(flat, _labels_for(self.flow, self.y, batch_shape))
        return z.reshape(x.shape), logdet.reshape(batch_shape)

    def inverse(self, y: jax.Array) -> jax.Array:
        batch_shape, flat = _split(self.flow, jnp.asarray(y), "z")
        x = self.flow.decode(flat, _labels_for(self.flow, self.y, batch_shape))
        return x.reshape(y.shape)

    def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.inverse(y)
        _, logdet = self.forward_and_log_det(x)
        return x, -logdet

    def same_as(self, other: distrax.Bijector) -> bool:
        return type(other) is FlowBijector and other.flow is self.flow and other.y is self.y


def standard_normal_base(flow: TrainedFlow) -> distrax.Distribution:
    """The flow's latent prior, ``N(0, I)`` with event shape ``(H, W, C)``."""
    return distrax.Independent(distrax.Normal(jnp.zeros(flow.image_shape, jnp.float32), 1.0),
                               reinterpreted_batch_ndims=3)


class FlowDistribution(distrax.Distribution):
    """The flow's exact density ``p(x|y)`` over images as a ``distrax.Distribution``.

    ``log_prob(x)`` is ``flow.log_prob`` (nats); ``sample`` draws ``z ~ N(0, I)`` and decodes
    it exactly (**no guidance, no denoising**, so samples follow the density ``log_prob``
    reports; use ``flow.sample`` for the run's guided, denoised sampler);
    ``sample_and_log_prob`` returns both. ``event_shape = (H, W, C)``; ``batch_shape`` is
    ``y``'s shape (``()`` for ``None`` or one integer).

    Args:
      flow: the :class:`TrainedFlow`.
      y: labels, fixed for this distribution (see the module docstring).
    """

    def __init__(self, flow: TrainedFlow, y: Any = None):
        if y is not None:
            if not flow.num_classes:
                raise ValueError("labels y were given to an unconditional model (num_classes=0); "
                                 "pass y=None")
            y = jnp.asarray(y)
            if not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"labels y must be integers; got dtype {y.dtype}")
        self.flow = flow
        self.y = y

    @property
    def event_shape(self) -> tuple[int, int, int]:
        return self.flow.image_shape

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return () if self.y is None else tuple(self.y.shape)

    def _sample_n(self, key: jax.Array, n: int) -> jax.Array:
        shape = (n, *self.batch_shape)
        z = jax.random.normal(key, (math.prod(shape), *self.event_shape), jnp.float32)
        x = self.flow.decode(z, _labels_for(self.flow, self.y, shape))
        return x.reshape((*shape, *self.event_shape))

    def log_prob(self, value: jax.Array) -> jax.Array:
        batch_shape, flat = _split(self.flow, jnp.asarray(value), "value")
        return self.flow.log_prob(flat, _labels_for(self.flow, self.y, batch_shape)).reshape(batch_shape)

    def _sample_n_and_log_prob(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        x = self._sample_n(key, n)
        return x, self.log_prob(x)
