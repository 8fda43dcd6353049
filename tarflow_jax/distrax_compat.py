"""A :class:`~tarflow_jax.trained.TrainedFlow` as a distrax bijector and distribution.

Needs distrax (``pip install 'tarflow_jax[distrax]'``), imported only when a bijector or
distribution is built (``flow.as_bijector(y)``, ``flow.as_distribution(y)``), so the
package imports and works without it. The classes are ``FlowBijector`` and
``FlowDistribution`` (attributes of this module, created on first access).

distrax depends on tensorflow-probability, whose package init requires ``tf-keras`` when
TensorFlow is already imported in the process (as it is after the trainer's TFDS input
pipeline runs). In such processes import distrax first (``import distrax`` at the top of
the script) or install ``tf-keras``; the error says so.

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

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["bijector", "distribution", "standard_normal_base", "FlowBijector", "FlowDistribution"]


def _distrax():
    try:
        import distrax
    except ImportError as e:
        if getattr(e, "name", None) == "tf_keras":
            raise ImportError(
                "distrax could not be imported because TensorFlow was imported first in this process "
                "(e.g. by tensorflow_datasets): distrax's tensorflow-probability then needs tf-keras. "
                "Import distrax before TensorFlow (put `import distrax` at the top of your script), "
                "or pip install tf-keras") from e
        raise ImportError("the distrax bijector and distribution need distrax: "
                          "pip install 'tarflow_jax[distrax]' (or pip install distrax)") from e
    return distrax


def _check_labels(flow: Any, y: Any) -> Any:
    if y is None:
        return None
    if not flow.num_classes:
        raise ValueError("labels y were given to an unconditional model (num_classes=0); pass y=None")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"labels y must be integers; got dtype {y.dtype}")
    return y


def _labels_for(flow: Any, y: Any, batch_shape: tuple[int, ...]) -> jax.Array | None:
    """Labels broadcast to ``batch_shape`` and flattened, or None."""
    y = _check_labels(flow, y)
    if y is None:
        return None
    if y.ndim and tuple(y.shape) != tuple(batch_shape[len(batch_shape) - y.ndim:]):
        raise ValueError(f"labels y have shape {tuple(y.shape)}, which does not match the batch shape "
                         f"{tuple(batch_shape)} of the inputs")
    return jnp.broadcast_to(y, batch_shape).reshape(-1).astype(jnp.int32)


def _split(flow: Any, value: jax.Array, what: str) -> tuple[tuple[int, ...], jax.Array]:
    """``(batch_shape, value as (B, H, W, C))``; raises a ValueError for a wrong event shape."""
    event = flow.image_shape
    if value.ndim < 3 or tuple(value.shape[-3:]) != event:
        raise ValueError(f"{what} must end in the event shape (H, W, C) = {event}; got shape "
                         f"{tuple(value.shape)}")
    batch_shape = tuple(value.shape[:-3])
    return batch_shape, value.reshape((math.prod(batch_shape), *event))


@functools.cache
def _classes() -> dict[str, type]:
    """The distrax subclasses, defined once distrax is importable."""
    distrax = _distrax()

    class FlowBijector(distrax.Bijector):
        """TarFlow as a ``distrax.Bijector`` over images; ``forward``: data → latent.

        ``forward_and_log_det(x)`` returns ``flow.encode(x, y)``: latents and
        ``log|det ∂z/∂x|`` (nats, shape = batch shape). ``inverse(z)`` is the exact sequential
        inverse ``flow.decode(z, y)`` (no guidance); ``inverse_and_log_det(z)`` also returns
        ``log|det ∂x/∂z| = −forward log-det at x`` (one more forward pass).
        ``event_ndims_in = event_ndims_out = 3``.

        Args:
          flow: the :class:`~tarflow_jax.trained.TrainedFlow`.
          y: labels, fixed for this bijector (see the module docstring).
        """

        def __init__(self, flow: Any, y: Any = None):
            super().__init__(event_ndims_in=3, event_ndims_out=3, is_constant_jacobian=False)
            self.flow = flow
            self.y = _check_labels(flow, y)

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

        def same_as(self, other: Any) -> bool:
            return type(other) is type(self) and other.flow is self.flow and other.y is self.y

    class FlowDistribution(distrax.Distribution):
        """The flow's exact density ``p(x|y)`` over images as a ``distrax.Distribution``.

        ``log_prob(x)`` is ``flow.log_prob`` (nats); ``sample`` draws ``z ~ N(0, I)`` and
        decodes it exactly (**no guidance, no denoising**, so samples follow the density
        ``log_prob`` reports; ``flow.sample`` is the run's guided, denoised sampler);
        ``sample_and_log_prob`` returns both. ``event_shape = (H, W, C)``; ``batch_shape`` is
        ``y``'s shape (``()`` for ``None`` or one integer).

        Args:
          flow: the :class:`~tarflow_jax.trained.TrainedFlow`.
          y: labels, fixed for this distribution (see the module docstring).
        """

        def __init__(self, flow: Any, y: Any = None):
            self.flow = flow
            self.y = _check_labels(flow, y)

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
            labels = _labels_for(self.flow, self.y, batch_shape)
            return self.flow.log_prob(flat, labels).reshape(batch_shape)

        def _sample_n_and_log_prob(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
            x = self._sample_n(key, n)
            return x, self.log_prob(x)

    return {"FlowBijector": FlowBijector, "FlowDistribution": FlowDistribution}


def __getattr__(name: str) -> type:
    if name in ("FlowBijector", "FlowDistribution"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bijector(flow: Any, y: Any = None) -> Any:
    """``FlowBijector(flow, y)``: the flow as a ``distrax.Bijector`` (data → latent is forward).

    Raises:
      ImportError: distrax is not installed. ValueError: labels for an unconditional model
      or non-integer labels.
    """
    return _classes()["FlowBijector"](flow, y)


def distribution(flow: Any, y: Any = None) -> Any:
    """``FlowDistribution(flow, y)``: the flow's exact density as a ``distrax.Distribution``.

    Raises:
      ImportError: distrax is not installed. ValueError: as :func:`bijector`.
    """
    return _classes()["FlowDistribution"](flow, y)


def standard_normal_base(flow: Any) -> Any:
    """The flow's latent prior as a distrax distribution: ``N(0, I)``, event shape ``(H, W, C)``."""
    distrax = _distrax()
    return distrax.Independent(distrax.Normal(jnp.zeros(flow.image_shape, jnp.float32), 1.0),
                               reinterpreted_batch_ndims=3)
