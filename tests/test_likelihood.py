"""Dequantization, noise augmentation, loss and bits/dim."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from tarflow_jax.likelihood import (add_noise, bits_per_dim, dequantize, dequantize_with, flow_loss,
                                    levels_to_uint8, quantize, to_uint8, to_unit_range)


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


@pytest.mark.parametrize("levels", [256, 17])
def test_quantize_inverts_dequantize_exactly(levels):
    """Every level, offsets u across [0, 1) (a grid of 2¹² and 4,096 random draws), through jitted dequantization."""
    k = np.arange(levels)
    grid = np.arange(1, 2 ** 12) / 2 ** 12  # 2^-12 .. 1 - 2^-12
    draws = np.asarray(jax.random.uniform(jax.random.key(levels), (4096,)))
    u = np.concatenate([grid, draws[(draws > 2 ** -12) & (draws < 1 - 2 ** -12)]]).astype(np.float32)
    if levels == 256:
        u = np.concatenate([[0.0], u]).astype(np.float32)  # power of two: exact at the interval start too
    kk, uu = np.meshgrid(k, u, indexing="ij")
    x = jax.jit(dequantize_with, static_argnums=2)(jnp.asarray(kk), jnp.asarray(uu), levels)
    got = quantize(np.asarray(x), levels, "uniform")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, kk)
    # Through the drawing function as the trainer calls it.
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, levels, (64, 32)))
    np.testing.assert_array_equal(quantize(dequantize(jax.random.key(1), pixels, levels), levels), pixels)


def test_quantize_clips_and_maps_nan_to_zero():
    x = np.array([-1.5, -1.0, 0.999999, 1.0, 3.0, np.nan], np.float32)
    assert quantize(x, 17).tolist() == [0, 0, 16, 16, 16, 0]
    assert quantize(x, 256, "gaussian").tolist() == [0, 0, 254, 255, 255, 0]
    with pytest.raises(ValueError, match="noise must be one of"):
        quantize(x, 256, "laplace")


def test_uint8_scaling_of_levels():
    assert levels_to_uint8(np.arange(17), 17).tolist() == [round(i * 255 / 16) for i in range(17)]
    assert to_uint8(np.array([-1.0, 1 - 1e-6]), 17, "uniform").tolist() == [0, 255]
    np.testing.assert_array_equal(levels_to_uint8(np.arange(256), 256), np.arange(256))


def test_gaussian_models_quantize_as_the_reference_feeds_fid():
    torch = pytest.importorskip("torch", reason="comparing with the reference's conversion needs torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.7, 20000), [-1, 1, -1.01, 1.01, 0.0]]).astype(np.float32)
    x = np.concatenate([x, np.asarray(to_unit_range(jnp.arange(256)))])  # the data grid itself
    # reference train.py / evaluate_fid.py: fid.update(0.5 * (samples.clip(-1, 1) + 1)), then
    # torchmetrics' normalize=True: (imgs * 255).byte()
    want = ((0.5 * (torch.from_numpy(x).clip(min=-1, max=1) + 1)) * 255).byte().numpy()
    np.testing.assert_array_equal(to_uint8(x, 256, "gaussian"), want)
