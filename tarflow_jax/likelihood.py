"""Dequantization, noise augmentation, the training loss, exact log-likelihood and bits per dimension.

Formulas follow the paper's likelihood (arXiv 2412.06329) and the reference's
``transformer_flow.Model.get_loss`` and ``evaluate_bpd.py``; the standard normal prior's
constant ``½·log 2π`` per dimension is :data:`HALF_LOG_2PI` (the only place it is written).
"""

from __future__ import annotations

import math
from typing import Any

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NOISE_KINDS = ("uniform", "gaussian")

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # −log N(0|0,1): the Gaussian constant per dimension, nats


def dequantize(key: jax.Array, pixels: jax.Array, num_levels: int = 256) -> jax.Array:
    """Integer images in ``{0..Q-1}`` to ``[-1, 1)`` with one uniform draw: ``(k + u)/Q·2 − 1``."""
    u = jax.random.uniform(key, pixels.shape, jnp.float32)
    return dequantize_with(pixels, u, num_levels)


def dequantize_with(pixels: jax.Array, u: jax.Array, num_levels: int = 256) -> jax.Array:
    """``(k + u)/Q·2 − 1`` for given offsets ``u`` in ``[0, 1)`` (float32); :func:`dequantize` draws them."""
    return (pixels.astype(jnp.float32) + u) / num_levels * 2.0 - 1.0


def to_unit_range(pixels: jax.Array, num_levels: int = 256) -> jax.Array:
    """Integer images to ``[-1, 1]`` without dequantization (``0 → −1``, ``Q−1 → 1``)."""
    return pixels.astype(jnp.float32) / (num_levels - 1) * 2.0 - 1.0


def quantize(x: Any, num_levels: int = 256, noise: str = "uniform") -> np.ndarray:
    """Model outputs in ``[-1, 1]`` back to the data's integer levels ``0..Q−1`` (host NumPy).

    Args:
      x: images in ``[-1, 1]`` (any shape; float32 or convertible). NaN becomes level 0.
      num_levels: ``Q``, the data's levels (``config.dataset.num_levels``).
      noise: how the model saw its data (``config.noise``):

        * ``"uniform"``: the inverse of :func:`dequantize` (``(k + u)/Q·2 − 1``, ``u`` in
          ``[0, 1)``): ``floor((x + 1)·Q/2)`` (in float64), clipped to ``0..Q−1``, the level
          whose interval ``[k/Q·2 − 1, (k+1)/Q·2 − 1)`` holds ``x``. So
          ``quantize(dequantize(k, u)) == k`` except where float32 rounding inside
          :func:`dequantize` has already moved ``x`` across an interval end, which needs ``u``
          within about ``Q·2⁻²³`` of 0 or 1 (never at ``u = 0`` when ``Q`` is a power of two).
        * ``"gaussian"``: the data were ``k/(Q−1)·2 − 1`` (:func:`to_unit_range`), and the
          reference's sampling code turns samples into pixels by truncation: torchmetrics'
          ``(0.5·(x.clip(−1, 1) + 1)·255).byte()`` in ``train.py`` / ``evaluate_fid.py``, i.e.
          ``floor(0.5·(clip(x) + 1)·(Q − 1))`` in float32 — bit for bit the reference's FID input.

    Returns:
      int32 levels, the shape of ``x``.

    Raises:
      ValueError: an unknown ``noise`` or ``num_levels < 2``.
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}; got {noise!r}")
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2; got {num_levels}")
    x = np.asarray(x, np.float32)
    nan = np.isnan(x)
    x = np.where(nan, np.float32(-1.0), x)
    if noise == "uniform":
        levels = np.floor((x.astype(np.float64) + 1.0) * (num_levels / 2.0))
    else:
        v = np.float32(0.5) * (np.clip(x, np.float32(-1.0), np.float32(1.0)) + np.float32(1.0))
        levels = np.trunc(v * np.float32(num_levels - 1))
    return np.clip(levels, 0, num_levels - 1).astype(np.int32)


def levels_to_uint8(levels: Any, num_levels: int = 256) -> np.ndarray:
    """Integer levels ``0..Q−1`` to pixel values ``0..255`` (``round(k·255/(Q−1))``; identity for ``Q = 256``)."""
    levels = np.asarray(levels)
    if num_levels == 256:
        return levels.astype(np.uint8)
    return np.round(levels.astype(np.float32) * np.float32(255.0 / (num_levels - 1))).astype(np.uint8)


def to_uint8(x: Any, num_levels: int, noise: str) -> np.ndarray:
    """Model outputs in ``[-1, 1]`` to 0..255 pixels: :func:`quantize`, then :func:`levels_to_uint8`.

    The one conversion used for PNGs, sample files and FID. For 8-bit data of a Gaussian-noise
    model it equals the reference's ``(0.5·(x.clip(−1, 1) + 1)·255).byte()`` exactly.
    """
    return levels_to_uint8(quantize(x, num_levels, noise), num_levels)


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
