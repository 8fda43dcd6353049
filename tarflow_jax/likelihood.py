"""Dequantization, noise augmentation, the training loss, exact log-likelihood and bits per dimension.

Formulas follow the paper's likelihood (arXiv 2412.06329) and the reference's
``transformer_flow.Model.get_loss`` and ``evaluate_bpd.py``; the standard normal prior's
constant ``½·log 2π`` per dimension is :data:`HALF_LOG_2PI` (the only place it is written).
"""

from __future__ import annotations

import math

from typing import Any

import jax
import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # −log N(0|0,1): the Gaussian constant per dimension, nats


def dequantize(key: jax.Array, pixels: jax.Array, num_levels: int = 256) -> jax.Array:
    """Integer images in ``{0..Q-1}`` to ``[-1, 1)`` with one uniform draw: ``(k + u)/Q·2 − 1``."""
    u = jax.random.uniform(key, pixels.shape, jnp.float32)
    return (pixels.astype(jnp.float32) + u) / num_levels * 2.0 - 1.0


def to_unit_range(pixels: jax.Array, num_levels: int = 256) -> jax.Array:
    """Integer images to ``[-1, 1]`` without dequantization (``0 → −1``, ``Q−1 → 1``)."""
    return pixels.astype(jnp.float32) / (num_levels - 1) * 2.0 - 1.0


def add_noise(key: jax.Array, x: jax.Array, noise_std: float) -> jax.Array:
    """Gaussian noise augmentation ``x + σ·ε`` (no clipping), as used for generation models."""
    return x + noise_std * jax.random.normal(key, x.shape, x.dtype)


def flow_loss(z: jax.Array, logdet: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The reference training loss per dimension (nats, constants dropped) and its two parts.

    ``loss = 0.5·mean(z²) − mean(logdet)/N``; returns ``(loss, prior_term, logdet_term)``.
    """
    num_dims = z[0].size
    prior = 0.5 * jnp.mean(jnp.square(z.astype(jnp.float32)))
    logdet_term = -jnp.mean(logdet) / num_dims
    return prior + logdet_term, prior, logdet_term


def bits_per_dim_from_loss(loss: jax.Array, num_levels: int = 256) -> jax.Array:
    """Bits/dim of ``Q``-level data from :func:`flow_loss`'s per-dimension loss (nats).

    ``bpd = (loss + ½·log 2π + log(Q/2)) / log 2``: the loss plus the dropped Gaussian
    constant, plus ``log(Q/2)``, the Jacobian of mapping ``[0, Q)`` onto ``[−1, 1)``
    (reference ``evaluate_bpd.py``, with ``Q = 256``). Exact for uniformly dequantized data.
    """
    return (loss + HALF_LOG_2PI + math.log(num_levels / 2)) / math.log(2.0)


def bits_per_dim(z: jax.Array, logdet: jax.Array, num_levels: int = 256) -> jax.Array:
    """Exact negative log-likelihood of ``Q``-level data in bits/dim, per example.

    Args:
      z: latents ``(B, ...)`` of the flow applied to dequantized data (:func:`dequantize`).
      logdet: total log|det| per example ``(B,)``, nats.
      num_levels: Q, the number of pixel levels (256 for 8-bit images).

    Returns:
      float32 ``(B,)`` bits per dimension (:func:`bits_per_dim_from_loss` per example).
    """
    z = z.astype(jnp.float32).reshape(z.shape[0], -1)
    loss = 0.5 * jnp.mean(jnp.square(z), axis=1) - logdet / z.shape[1]
    return bits_per_dim_from_loss(loss, num_levels)


def log_prob(model: Any, variables: Any, x: jax.Array, y: jax.Array | None) -> jax.Array:
    """Exact ``log p(x|y)`` in nats per example ``(B,)`` under the flow's standard normal prior.

    ``log p(x) = −½·Σ z² − N·½·log 2π + log|det ∂z/∂x|`` (change of variables), for any
    ``model`` whose ``apply(variables, x, y)`` returns ``(z, logdet)`` (a ``TarFlow``).
    """
    z, logdet = model.apply(variables, x, y)
    z = z.astype(jnp.float32).reshape(z.shape[0], -1)
    return -0.5 * jnp.sum(jnp.square(z), axis=1) - z.shape[1] * HALF_LOG_2PI + logdet
