"""Layer-level numerics: the reverse-mode VJPs (dense weight gradients, LayerNorm, GELU) used by the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from tarflow_jax import layers
from tarflow_jax.likelihood import flow_loss


def _loss_fn(model, variables, x, y):
    def loss(params):
        z, logdet = model.apply({**variables, "params": params}, x, y)
        return flow_loss(z, logdet)[0]
    return loss


def test_reverse_mode_vjps_gives_the_same_gradients(tiny_cond):
    model, variables = tiny_cond
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    y = jnp.array([0, 2, -1])
    loss = _loss_fn(model, variables, x, y)
    plain = jax.jit(jax.value_and_grad(loss))(variables["params"])
    with layers.reverse_mode_vjps():
        jaxpr = str(jax.make_jaxpr(loss)(variables["params"]))
        custom = jax.jit(jax.value_and_grad(loss))(variables["params"])
    # The context really swaps the layers' differentiation (and only inside it).
    assert "custom_vjp" in jaxpr
    # (a fresh function: JAX caches the trace of one it has seen)
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda p: loss(p))(variables["params"]))
    np.testing.assert_allclose(custom[0], plain[0], rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(custom[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_reverse_mode_vjps_has_no_forward_mode_and_restores_on_exit(tiny_uncond):
    model, variables = tiny_uncond
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    f = lambda x: model.apply(variables, x)[0]
    with pytest.raises(TypeError, match="custom_vjp"):
        with layers.reverse_mode_vjps():
            jax.jvp(f, (x,), (x,))
    assert not layers._reverse_mode_on()
    jax.jvp(f, (x,), (x,))  # forward mode works again outside the context


def test_reverse_mode_vjps_leaves_non_trailing_contractions_alone():
    dense = layers.dense(5, 4, ("embed", "mlp"), axis=0, dtype=jnp.float32, param_dtype=jnp.float32,
                         name="d", parent=None)
    x = jax.random.normal(jax.random.key(2), (4, 3))
    params = dense.init(jax.random.key(3), x)
    with layers.reverse_mode_vjps():
        jaxpr = str(jax.make_jaxpr(lambda p: dense.apply(p, x).sum())(params))
        out = dense.apply(params, x)
    assert "custom_vjp" not in jaxpr
    np.testing.assert_allclose(out, dense.apply(params, x), rtol=1e-6)


@pytest.mark.parametrize("kwargs, rtol", [
    (dict(scan_layers=True, remat=True), 1e-4),
    (dict(dtype=jnp.bfloat16), 2e-2),  # bfloat16 compute: the two orders round differently
])
def test_reverse_mode_vjps_scanned_remat_and_bfloat16(kwargs, rtol):
    from tarflow_jax import TarFlow
    from conftest import random_variables

    model = TarFlow(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=2,
                    **kwargs)
    variables = random_variables(model)
    x = jax.random.uniform(jax.random.key(4), (4, 8, 8, 1), minval=-1, maxval=1)
    loss = _loss_fn(model, variables, x, None)
    plain = jax.jit(jax.grad(loss))(variables["params"])
    with layers.reverse_mode_vjps():
        custom = jax.jit(jax.grad(lambda p: loss(p)))(variables["params"])
    for a, b in zip(jax.tree.leaves(custom), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol,
                                   atol=rtol * float(np.max(np.abs(np.asarray(b, np.float32)))) + 1e-7)


def test_reverse_mode_vjps_off_switch(monkeypatch, tiny_uncond):
    monkeypatch.setenv("TARFLOW_XLA_CPU_TUNING", "0")
    model, variables = tiny_uncond
    x = jnp.zeros((1, 8, 8, 3))
    with layers.reverse_mode_vjps():
        assert "custom_vjp" not in str(jax.make_jaxpr(lambda v: model.apply(v, x)[0])(variables))


@pytest.mark.parametrize("dtype, param_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                                (jnp.float32, jnp.bfloat16)])
def test_layer_norm_matches_flax_and_its_vjp_matches_autodiff(dtype, param_dtype):
    x = (3.0 * jax.random.normal(jax.random.key(5), (3, 7, 64)) + 1.0).astype(dtype)
    ours = layers.layer_norm("n", param_dtype, dtype, parent=None)
    flax_ln = nn.LayerNorm(epsilon=1e-5, dtype=layers.float32_or_wider(dtype), param_dtype=param_dtype,
                           use_fast_variance=False)
    params = nn.meta.unbox(ours.init(jax.random.key(6), x))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), flax_ln.init(jax.random.key(6), x))
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape, a.dtype), params)
    # Forward: Flax's values exactly (the reference's two-pass LayerNorm).
    np.testing.assert_array_equal(jax.jit(ours.apply)(params, x), jax.jit(flax_ln.apply)(params, x))

    def grads(module):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(3.0 * module.apply(p, x))), argnums=(0, 1)))(params, x)

    expected = grads(flax_ln)
    with layers.reverse_mode_vjps():
        assert "custom_vjp" in str(jax.make_jaxpr(lambda p: ours.apply(p, x))(params))
        got = grads(ours)
    # bfloat16 x: its gradient is rounded to bfloat16 at the end of either computation.
    rtol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_matches_flax_and_its_vjp_matches_autodiff(dtype, rtol):
    x = (3.0 * jax.random.normal(jax.random.key(8), (5, 300))).astype(dtype)
    # The float32 reference, as PyTorch computes GELU for bfloat16 inputs too.
    exact = lambda x: nn.gelu(x.astype(jnp.float32), approximate=False)
    got = jax.jit(layers.gelu)(x)
    assert got.dtype == dtype
    b = np.asarray(jax.jit(exact)(x))
    np.testing.assert_allclose(np.asarray(got, np.float32), b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))
    expected = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(exact(x)))))(x), np.float32)
    with layers.reverse_mode_vjps():
        assert "custom_vjp" in str(jax.make_jaxpr(lambda x: layers.gelu(x))(x))  # a fresh function: traces are cached
        got = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layers.gelu(x).astype(jnp.float32)))))(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(expected))))
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: layers.gelu(x))(x))  # only inside the context
    # bfloat16 in the tail: float32 inside keeps GELU(-3) = -0.00405 instead of rounding 1 + erf to 0.
    if dtype == jnp.bfloat16:
        assert float(layers.gelu(jnp.asarray(-3.0, dtype))) == pytest.approx(-0.00405, rel=1e-2)


@pytest.mark.parametrize("shape, num_axes, dtype", [
    ((2048, 24), 1, jnp.float32),      # tall: groups of 64 rows, then a product with ones
    ((4, 512, 6), 2, jnp.float32),     # tall over two axes
    ((3, 5, 7), 1, jnp.float32),       # short: one product with ones
    ((1000, 8), 1, jnp.float32),       # not a multiple of 64: one product
    ((1024, 16), 1, jnp.bfloat16),     # summed in float32, returned in bfloat16
])
def test_sum_leading_equals_sum(shape, num_axes, dtype):
    x = (jax.random.normal(jax.random.key(8), shape) + 0.5).astype(dtype)
    got = jax.jit(layers.sum_leading, static_argnums=1)(x, num_axes)
    expected = jnp.sum(x.astype(jnp.float32), axis=tuple(range(num_axes)))
    assert got.shape == shape[num_axes:] and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5,
                               atol=1e-4)


def test_add_rows_gradient_and_bad_shapes():
    x = jax.random.normal(jax.random.key(9), (3, 5, 4))
    rows = jax.random.normal(jax.random.key(10), (5, 4))
    f = lambda x, rows: jnp.sum(jnp.sin(layers.add_rows(x, rows)))
    plain = jax.grad(f, argnums=(0, 1))(x, rows)
    with layers.reverse_mode_vjps():
        assert "custom_vjp" in str(jax.make_jaxpr(lambda x, r: f(x, r))(x, rows))
        got = jax.jit(jax.grad(lambda x, r: f(x, r), argnums=(0, 1)))(x, rows)
    for a, b in zip(got, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layers.add_rows(x, rows), x + rows)
    with pytest.raises(ValueError, match="trailing axes"):
        layers.add_rows(x, rows.T)


def test_forward_pass_kernels_same_values_and_derivatives(tiny_cond, monkeypatch):
    model, variables = tiny_cond
    x = jax.random.uniform(jax.random.key(11), (3, 8, 8, 1), minval=-1, maxval=1)
    y = jnp.array([0, 2, -1])
    apply = lambda v, x: model.apply(v, x, y)
    plain_jaxpr = str(jax.make_jaxpr(apply)(variables, x))
    with layers.forward_pass_kernels():
        kernels_jaxpr = str(jax.make_jaxpr(lambda v, x: apply(v, x))(variables, x))
        got = jax.jit(lambda v, x: apply(v, x))(variables, x)
        # derivatives through it are the usual ones (the attention keeps its custom JVP)
        loss = _loss_fn(model, variables, x, y)
        grads = jax.jit(jax.grad(lambda p: loss(p)))(variables["params"])
        jvp_out = jax.jvp(lambda x: apply(variables, x)[0], (x,), (jnp.ones_like(x),))[1]
    assert kernels_jaxpr != plain_jaxpr and kernels_jaxpr.count("dot_general") > plain_jaxpr.count("dot_general")
    for a, b in zip(got, jax.jit(apply)(variables, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.jit(jax.grad(loss))(variables["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jvp_out, jax.jvp(lambda x: apply(variables, x)[0], (x,), (jnp.ones_like(x),))[1],
                               rtol=1e-4, atol=1e-5)
    # nothing changes inside reverse_mode_vjps (the train step) or with the CPU tuning off
    with layers.reverse_mode_vjps():
        reverse_jaxpr = str(jax.make_jaxpr(lambda v, x: apply(v, x))(variables, x))
        with layers.forward_pass_kernels():
            assert str(jax.make_jaxpr(lambda v, x: apply(v, x))(variables, x)) == reverse_jaxpr
    monkeypatch.setenv("TARFLOW_XLA_CPU_TUNING", "0")
    with layers.forward_pass_kernels():
        assert str(jax.make_jaxpr(lambda v, x: apply(v, x))(variables, x)) == plain_jaxpr
    assert not layers._forward_pass_on()


def test_layer_norm_by_products_matches_layer_norm():
    x = 3.0 * jax.random.normal(jax.random.key(12), (5, 7, 96)) + 2.0
    scale, bias = 1.0 + 0.1 * jax.random.normal(jax.random.key(13), (96,)), jnp.full((96,), 0.3)
    np.testing.assert_allclose(layers.layer_norm_by_products(x, scale, bias, 1e-5),
                               layers._layer_norm(x, scale, bias, 1e-5), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("num_axes", [-1, 4, 1.5, True])
def test_sum_leading_rejects_bad_axis_counts(num_axes):
    with pytest.raises(ValueError, match="num_axes must be an integer in 0..3"):
        layers.sum_leading(jnp.ones((2, 3, 4)), num_axes)
