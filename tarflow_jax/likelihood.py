"""Dequantization, noise augmentation, the training loss and exact bits per dimension."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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


def bits_per_dim(z: jax.Array, logdet: jax.Array, num_levels: int = 256) -> jax.Array:
    """Exact negative log-likelihood of ``Q``-level data in bits/dim, per example.

    ``z, logdet`` come from the flow applied to dequantized data (:func:`dequantize`);
    ``log(Q/2)`` is the Jacobian of mapping ``[0, Q)`` onto ``[−1, 1)``.
    """
    z = z.astype(jnp.float32).reshape(z.shape[0], -1)
    num_dims = z.shape[1]
    nats = (0.5 * jnp.mean(jnp.square(z), axis=1) + 0.5 * math.log(2 * math.pi)
            - logdet / num_dims + math.log(num_levels / 2))
    return nats / math.log(2.0)
