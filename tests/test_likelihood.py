"""Dequantization, noise augmentation, loss and bits/dim."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax.likelihood import add_noise, bits_per_dim, dequantize, flow_loss, to_unit_range


def test_dequantize_range_and_bins():
    pixels = jnp.array([[0, 16], [8, 3]], jnp.uint8)
    x = dequantize(jax.random.key(0), pixels, num_levels=17)
    assert float(x.min()) >= -1 and float(x.max()) < 1
    np.testing.assert_array_equal(np.floor((np.asarray(x) + 1) / 2 * 17), np.asarray(pixels))


def test_unit_range_and_noise():
    np.testing.assert_allclose(to_unit_range(jnp.array([0, 255])), [-1.0, 1.0])
    x = jnp.zeros((1000,))
    noisy = add_noise(jax.random.key(1), x, 0.1)
    assert 0.08 < float(noisy.std()) < 0.12


def test_bits_per_dim_of_identity_flow_is_gaussian_entropy_formula():
    z = jnp.zeros((2, 2, 2, 1))
    logdet = jnp.zeros((2,))
    expected = (0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
    np.testing.assert_allclose(bits_per_dim(z, logdet), [expected] * 2, rtol=1e-6)
    # a uniform model on [0, Q) levels needs exactly log2(Q) bits: logdet compensates the Gaussian
    np.testing.assert_allclose(
        bits_per_dim(z, jnp.full((2,), 4 * 0.5 * math.log(2 * math.pi)), num_levels=17),
        [math.log2(17 / 2)] * 2, rtol=1e-6)


def test_loss_parts():
    z = jnp.ones((2, 2, 2, 1))
    logdet = jnp.array([8.0, 16.0])
    loss, prior, logdet_term = flow_loss(z, logdet)
    np.testing.assert_allclose([loss, prior, logdet_term], [0.5 - 3.0, 0.5, -3.0])  # N = 4 dims per example
