"""TrainedFlow: every method against the calls it wraps; jit/vmap/grad/shard_map; distrax; NNX; Linen."""

import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_variables
from tarflow_jax import JacobiPlan, TarFlow, layers, likelihood, sharding, trained
from tarflow_jax.trained import SampleOptions, TrainedFlow

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cond_flow(tiny_cond):
    model, variables = tiny_cond
    options = SampleOptions(guidance=1.5, annealed_guidance=True, attn_temp=0.9)
    return TrainedFlow.create(model, variables, num_levels=17, noise_std=0.1, options=options)


@pytest.fixture(scope="module")
def uncond_flow(tiny_uncond):
    model, variables = tiny_uncond
    return TrainedFlow.create(model, variables)


@pytest.fixture(scope="module")
def micro():
    """A 4x4x1 flow (16 dimensions, 4 tokens), small enough for exact Jacobians."""
    model = TarFlow(img_size=4, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=1)
    return TrainedFlow.create(model, random_variables(model, seed=5, head_std=0.1))


def images(flow, batch=3, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, *flow.image_shape), minval=-1, maxval=1)


Y3 = jnp.array([0, 2, -1])


def apply(flow, *args, method=None, **kwargs):
    """``flow.model.apply(flow.variables, *args, ...)`` under one jit (eager compiles far more)."""
    return jax.jit(lambda v, *a: flow.model.apply(v, *a, method=method, **kwargs))(flow.variables, *args)


def same(actual, expected, tol=1e-6):
    """Equal up to float32 rounding (jit fusion may reorder the last bit)."""
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------ methods vs the lower-level calls
def test_encode_and_log_prob_match_model_apply(cond_flow, uncond_flow):
    for flow, y in ((cond_flow, Y3), (uncond_flow, None)):
        x = images(flow)
        z, logdet = flow.encode(x, y)
        z_ref, logdet_ref = apply(flow, x, y)
        same(z, z_ref)
        same(logdet, logdet_ref, 1e-5)
        assert z.dtype == logdet.dtype == jnp.float32 and logdet.shape == (3,)
        ref = likelihood.log_prob(flow.model, flow.variables, x, y)
        np.testing.assert_allclose(flow.log_prob(x, y), ref, rtol=1e-6)


def test_forward_pass_runs_inside_the_forward_pass_kernels_on_cpu(cond_flow, monkeypatch):
    x = images(cond_flow)
    assert "_causal_attention_post" in str(jax.make_jaxpr(lambda f, u: f.log_prob(u, Y3))(cond_flow, x))
    # The unjitted body (the method's jit keeps the trace it made with tuning on).
    monkeypatch.setenv("TARFLOW_XLA_CPU_TUNING", "0")
    off = str(jax.make_jaxpr(lambda f, u: trained._log_prob_impl(f, u, Y3))(cond_flow, x))
    assert "_causal_attention" in off and "_causal_attention_post" not in off


def test_bits_per_dim_matches_dequantize_and_likelihood(cond_flow):
    pixels = jax.random.randint(jax.random.key(1), (3, 8, 8, 1), 0, 17)
    key = jax.random.key(7)
    draws = []
    for k in jax.random.split(key, 4):
        x = likelihood.dequantize(k, pixels, 17)
        draws.append(likelihood.bits_per_dim(*apply(cond_flow, x, Y3), 17))
    draws = jnp.stack(draws)
    got = cond_flow.bits_per_dim(pixels, Y3, key=key, num_draws=4)
    np.testing.assert_allclose(got, draws.mean(0), rtol=1e-6)
    nats = draws * cond_flow.num_dims * np.log(2)
    iw = -(jax.nn.logsumexp(-nats, axis=0) - np.log(4)) / (cond_flow.num_dims * np.log(2))
    got_iw = cond_flow.bits_per_dim(pixels, Y3, key=key, num_draws=4, importance_weighted=True)
    np.testing.assert_allclose(got_iw, iw, rtol=1e-6)
    assert np.all(np.asarray(got_iw) <= np.asarray(got) + 1e-6)
    # a raw uint32 key gives the same draws as the typed key
    np.testing.assert_array_equal(cond_flow.bits_per_dim(pixels, Y3, key=jax.random.PRNGKey(7), num_draws=4), got)


@pytest.mark.parametrize("kw", [dict(), dict(guidance=1.5, annealed_guidance=True, attn_temp=0.9),
                                dict(guidance=2.0, guide_what="b", solver="jacobi",
                                     jacobi=JacobiPlan(segments=2, max_iters=8))])
def test_decode_matches_reverse(cond_flow, kw):
    z = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    ref = apply(cond_flow, z, Y3, method=TarFlow.reverse, **kw)
    same(cond_flow.decode(z, Y3, **kw), ref, 1e-5)


def test_decode_inverts_encode(cond_flow, uncond_flow):
    for flow, y in ((cond_flow, Y3), (uncond_flow, None)):
        x = images(flow, seed=3)
        np.testing.assert_allclose(flow.decode(flow.encode(x, y)[0], y), x, atol=1e-5)


def test_sample_matches_reverse_then_denoise(cond_flow):
    key = jax.random.key(4)
    y = jnp.array([0, 1, 2, 1])
    z = jax.random.normal(key, (4, 8, 8, 1))
    raw = apply(cond_flow, z, y, guidance=1.5, annealed_guidance=True, attn_temp=0.9, method=TarFlow.reverse)
    clean = apply(cond_flow, raw, y, 0.1, 1.0, method=TarFlow.denoise)
    same(cond_flow.sample(key, 4, y, denoise=False), raw, 1e-5)
    same(cond_flow.sample(key, 4, y), clean, 1e-5)  # the run's defaults: guided, then denoised
    same(cond_flow.denoise(raw, y), clean, 1e-5)
    # a scalar label means that class for every image; options can be overridden per call
    plain = apply(cond_flow, z, jnp.full((4,), 2), method=TarFlow.reverse)
    same(cond_flow.sample(key, 4, 2, guidance=0.0, denoise=False), plain, 1e-5)
    assert cond_flow.sample(jax.random.PRNGKey(4), 4, y, denoise=False).shape == (4, 8, 8, 1)


def test_uniform_flow_skips_denoising(uncond_flow):
    key = jax.random.key(5)
    z = jax.random.normal(key, (2, 8, 8, 3))
    ref = apply(uncond_flow, z, method=TarFlow.reverse)
    same(uncond_flow.sample(key, 2), ref, 1e-5)  # noise_std=0: nothing to remove
    with pytest.raises(ValueError, match="trained without Gaussian noise"):
        uncond_flow.denoise(ref)
    same(uncond_flow.denoise(ref, noise_std=0.05), apply(uncond_flow, ref, None, 0.05, method=TarFlow.denoise),
         1e-5)


def test_volume_preserving_prior_variance_is_part_of_the_map():
    model = TarFlow(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2,
                    layers_per_block=1, nvp=False)
    variables = random_variables(model, seed=2)
    var = jax.random.uniform(jax.random.key(0), (16, 4), minval=0.5, maxval=2.0)
    flow = TrainedFlow.create(model, {**variables, "prior": {"var": var}})
    x = images(flow)
    z, logdet = flow.encode(x)
    with layers.forward_pass_kernels():  # as encode traces its forward pass
        z_model, logdet_model = apply(flow, x)
    tokens = lambda a: np.asarray(a).reshape(3, 4, 2, 4, 2, 1).transpose(0, 1, 3, 5, 2, 4).reshape(3, 16, 4)
    np.testing.assert_allclose(tokens(z), tokens(z_model) / np.sqrt(np.asarray(var)), rtol=1e-6)
    np.testing.assert_allclose(logdet, logdet_model - 0.5 * np.log(np.asarray(var)).sum(), rtol=1e-5)
    # decode (TarFlow.reverse, which multiplies by sqrt(var)) inverts encode exactly
    np.testing.assert_allclose(flow.decode(z), x, atol=1e-5)
    key = jax.random.key(1)
    same(flow.sample(key, 2), apply(flow, jax.random.normal(key, (2, 8, 8, 1)),
                                          method=TarFlow.reverse), 1e-5)


# ------------------------------------------------------------------ transforms
def test_jit_vmap_and_grad_through_log_prob(cond_flow):
    x = images(cond_flow)
    expected = cond_flow.log_prob(x, Y3)
    np.testing.assert_allclose(jax.jit(lambda f, u: f.log_prob(u, Y3))(cond_flow, x), expected, rtol=1e-6)
    per_example = jax.vmap(lambda u, y: cond_flow.log_prob(u[None], y[None])[0])(x, Y3)
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    # vmap over two flows: the variables are ordinary pytree leaves
    other = TrainedFlow.create(cond_flow.model, random_variables(cond_flow.model, seed=9),
                               num_levels=17, noise_std=0.1, options=cond_flow.options)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), cond_flow, other)
    both = jax.vmap(lambda f: f.log_prob(x, Y3))(stacked)
    np.testing.assert_allclose(both[0], expected, rtol=1e-5)
    np.testing.assert_allclose(both[1], other.log_prob(x, Y3), rtol=1e-5)
    # gradients: w.r.t. the images, and w.r.t. the weights (the flow is a pytree)
    ref = lambda u: jnp.sum(likelihood.log_prob(cond_flow.model, cond_flow.variables, u, Y3))
    np.testing.assert_allclose(jax.jit(jax.grad(lambda u: jnp.sum(cond_flow.log_prob(u, Y3))))(x),
                               jax.jit(jax.grad(ref))(x), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda f: jnp.sum(f.log_prob(x, Y3))))(cond_flow)
    assert isinstance(grads, TrainedFlow)
    ref_params = jax.jit(jax.grad(lambda p: jnp.sum(likelihood.log_prob(
        cond_flow.model, {**cond_flow.variables, "params": p}, x, Y3))))(cond_flow.params)
    for a, b in zip(jax.tree.leaves(grads.params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_once_per_shape(cond_flow):
    x = images(cond_flow)
    cond_flow.log_prob(x, Y3)
    before = trained._log_prob._cache_size()
    cond_flow.log_prob(x + 0.01, jnp.array([1, 1, 0]))
    cond_flow.log_prob(x * 0.5, 2)
    assert trained._log_prob._cache_size() == before
    key = jax.random.key(0)
    cond_flow.sample(key, 2, 1, denoise=False)
    before = trained._sample._cache_size()
    for weight in (0.5, 3.0):  # the guidance weight is traced, not a compile-time constant
        cond_flow.sample(jax.random.key(1), 2, 1, guidance=weight, denoise=False)
    cond_flow.sample(jax.random.key(2), 2, 0, attn_temp=0.5, denoise=False)
    assert trained._sample._cache_size() == before


def test_shard_map_on_a_mesh(cond_flow):
    import ml_collections

    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    x = images(cond_flow, batch=4)
    y = jnp.array([0, 1, 2, -1])
    fn = jax.jit(sharding.per_device(lambda f, u, v: f.log_prob(u, v), mesh, num_replicated=1))
    np.testing.assert_allclose(fn(cond_flow, x, y), cond_flow.log_prob(x, y), rtol=1e-6)


def test_shard_map_over_two_devices():
    """The flow as a replicated shard_map argument on two (simulated) CPU devices."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        from tarflow_jax import TarFlow, TrainedFlow
        assert jax.device_count() == 2
        model = TarFlow(img_size=4, in_channels=1, patch_size=2, channels=64, num_blocks=2,
                        layers_per_block=1, num_classes=2)
        flow = TrainedFlow.create(model, jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs()))
        x = jax.random.uniform(jax.random.key(0), (4, 4, 4, 1), minval=-1, maxval=1)
        y = jnp.array([0, 1, 1, -1])
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        fn = jax.jit(jax.shard_map(lambda f, u, v: f.log_prob(u, v), mesh=mesh,
                                   in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
        np.testing.assert_allclose(fn(flow, x, y), flow.log_prob(x, y), rtol=1e-6)
        print("OK")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------ errors
def test_errors_name_the_problem(cond_flow, uncond_flow):
    x = images(cond_flow)
    with pytest.raises(ValueError, match=r"image shape \(8, 8, 3\)"):
        cond_flow.log_prob(jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="float images"):
        cond_flow.log_prob(jnp.zeros((2, 8, 8, 1), jnp.int32))
    with pytest.raises(ValueError, match="unconditional model"):
        uncond_flow.log_prob(images(uncond_flow), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[-1, num_classes=3\)"):
        cond_flow.log_prob(x, jnp.array([0, 3, 1]))
    with pytest.raises(ValueError, match="got values from -2 to 1"):
        cond_flow.encode(x, jnp.array([0, -2, 1]))
    with pytest.raises(ValueError, match="must be integers"):
        cond_flow.log_prob(x, 1.5)
    with pytest.raises(ValueError, match="pixels must be integer images in 0..16"):
        cond_flow.bits_per_dim(x, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"0..16 \(num_levels=17\); got values 0..17"):
        cond_flow.bits_per_dim(jnp.full((1, 8, 8, 1), 17).at[0, 0, 0, 0].set(0), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_draws must be >= 1"):
        cond_flow.bits_per_dim(jnp.zeros((1, 8, 8, 1), jnp.int32), key=jax.random.key(0), num_draws=0)
    with pytest.raises(ValueError, match="guide_what must be one of"):
        cond_flow.sample(jax.random.key(0), 2, guide_what="c")
    with pytest.raises(ValueError, match="attn_temp must be > 0"):
        cond_flow.decode(x, attn_temp=0.0)
    with pytest.raises(ValueError, match="num must be >= 1"):
        cond_flow.sample(jax.random.key(0), 0)
    wider = TarFlow(img_size=8, in_channels=1, patch_size=2, channels=128, num_blocks=2,
                    layers_per_block=1, num_classes=3)
    with pytest.raises(ValueError, match=r"has shape \(3, 64\), but the model expects \(3, 128\)"):
        TrainedFlow.create(wider, cond_flow.variables)
    with pytest.raises(ValueError, match="'params' collection"):
        TrainedFlow.create(cond_flow.model, {"weights": {}})
    with pytest.raises(ValueError, match="num_levels must be >= 2"):
        TrainedFlow.create(cond_flow.model, cond_flow.variables, num_levels=1)


def test_create_accepts_boxed_numpy_and_missing_prior(tiny_cond):
    model, variables = tiny_cond
    boxed = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())
    flow = TrainedFlow.create(model, {"params": boxed["params"]})
    np.testing.assert_array_equal(flow.variables["prior"]["var"], np.ones((16, 4)))
    host = jax.tree.map(np.asarray, variables)
    flow = TrainedFlow.create(model, host)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(flow))
    assert "TrainedFlow(8x8x1" in repr(flow) and "num_classes=3" in repr(flow)


def test_options_from_config_and_deprecated_unpacking(tiny_cond):
    import ml_collections

    from tarflow_jax import configlib

    model, variables = tiny_cond
    config = configlib.base_config()
    config.model.update(patch_size=2, width=64, num_blocks=2, layers_per_block=1, num_classes=3)
    config.dataset.update(image_size=8, channels=1, num_levels=17)
    config.noise, config.noise_std = "gaussian", 0.07
    config.sample.update(guidance=3.4, annealed_guidance=True)
    flow = TrainedFlow.from_config(config, variables)
    assert (flow.num_levels, flow.noise_std) == (17, 0.07)
    assert flow.options.guidance == 3.4 and flow.options.annealed_guidance and flow.options.denoise
    assert isinstance(flow.config, ml_collections.ConfigDict) and flow.config.sample.guidance == 3.4
    assert flow.replace_options(guidance=1.0).options.guidance == 1.0 and flow.options.guidance == 3.4
    with pytest.warns(DeprecationWarning, match="flow.model, flow.variables and flow.config"):
        m, v, c = flow
    assert m == flow.model and v is flow.variables and c.noise_std == 0.07


# ------------------------------------------------------------------ distrax
DISTRAX_REASON = "the distrax extra: pip install 'tarflow_jax[distrax]'"


def test_distrax_round_trip_and_logdet_signs_vs_jacobian(micro):
    pytest.importorskip("distrax", reason=DISTRAX_REASON)
    bij = micro.as_bijector()
    x = jax.random.uniform(jax.random.key(2), (1, 4, 4, 1), minval=-1, maxval=1)
    z, fwd_logdet = bij.forward_and_log_det(x)
    np.testing.assert_allclose(bij.inverse(z), x, atol=1e-5)
    x_back, inv_logdet = bij.inverse_and_log_det(z)
    np.testing.assert_allclose(x_back, x, atol=1e-5)
    flat_fwd = lambda u: bij.forward(u.reshape(1, 4, 4, 1)).reshape(-1)
    flat_inv = lambda u: bij.inverse(u.reshape(1, 4, 4, 1)).reshape(-1)
    sign, jac_fwd = jnp.linalg.slogdet(jax.jacfwd(flat_fwd)(x.reshape(-1)))
    _, jac_inv = jnp.linalg.slogdet(jax.jacfwd(flat_inv)(z.reshape(-1)))
    assert abs(float(jac_fwd)) > 0.5 and float(sign) != 0
    np.testing.assert_allclose(float(fwd_logdet[0]), float(jac_fwd), rtol=1e-4)   # log|det dz/dx|
    np.testing.assert_allclose(float(inv_logdet[0]), float(jac_inv), rtol=1e-4)   # log|det dx/dz|
    np.testing.assert_allclose(float(inv_logdet[0]), -float(fwd_logdet[0]), rtol=1e-5)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x), fwd_logdet, rtol=1e-6)
    assert (bij.event_ndims_in, bij.event_ndims_out) == (3, 3)


def test_distrax_transformed_and_distribution(cond_flow):
    distrax = pytest.importorskip("distrax", reason=DISTRAX_REASON)
    from tarflow_jax.distrax_compat import standard_normal_base

    x = images(cond_flow)
    base = standard_normal_base(cond_flow)
    model = distrax.Transformed(base, distrax.Inverse(cond_flow.as_bijector(Y3)))
    np.testing.assert_allclose(model.log_prob(x), cond_flow.log_prob(x, Y3), rtol=1e-5)
    dist = cond_flow.as_distribution(Y3)
    assert dist.event_shape == (8, 8, 1) and dist.batch_shape == (3,)
    np.testing.assert_allclose(dist.log_prob(x), cond_flow.log_prob(x, Y3), rtol=1e-6)
    samples, log_prob = dist.sample_and_log_prob(seed=jax.random.key(3), sample_shape=(2,))
    assert samples.shape == (2, 3, 8, 8, 1) and log_prob.shape == (2, 3)
    np.testing.assert_allclose(log_prob[1], cond_flow.log_prob(samples[1], Y3), rtol=1e-6)
    # sampling decodes N(0, I) latents exactly: the latents come back
    z = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    np.testing.assert_allclose(cond_flow.encode(cond_flow.as_distribution(1).sample(
        seed=jax.random.key(4), sample_shape=(2,)), 1)[0], z, atol=1e-4)
    # Transformed samples by vmapping the bijector over single images: one label for all
    one = distrax.Transformed(base, distrax.Inverse(cond_flow.as_bijector(1)))
    s, lp = one.sample_and_log_prob(seed=jax.random.key(5), sample_shape=(2,))
    assert s.shape == (2, 8, 8, 1)
    same(lp, cond_flow.log_prob(s, 1), 1e-4)
    # any base: a narrower Gaussian changes only the base term
    narrow = distrax.Independent(distrax.Normal(jnp.zeros((8, 8, 1)), 0.8), 3)
    tempered = distrax.Transformed(narrow, distrax.Inverse(cond_flow.as_bijector(Y3)))
    z, logdet = cond_flow.encode(x, Y3)
    np.testing.assert_allclose(tempered.log_prob(x), narrow.log_prob(z) + logdet, rtol=1e-5)
    # the distrax objects are pytrees too
    np.testing.assert_allclose(jax.jit(lambda d, u: d.log_prob(u))(dist, x), dist.log_prob(x), rtol=1e-6)


def test_distrax_after_tensorflow_names_the_fix():
    """tensorflow-probability (under distrax) needs tf-keras once TensorFlow is loaded: a clear error."""
    import importlib.util

    pytest.importorskip("distrax", reason=DISTRAX_REASON)
    if importlib.util.find_spec("tf_keras") is not None:
        pytest.skip("tf-keras is installed: distrax imports after TensorFlow")
    code = textwrap.dedent("""
        import tensorflow
        from tarflow_jax import distrax_compat
        try:
            distrax_compat.bijector(None)
        except ImportError as e:
            print("ERROR", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "ERROR distrax could not be imported because TensorFlow was imported first" in proc.stdout, \
        proc.stderr[-2000:]
    assert "import distrax` at the top of your script), or pip install tf-keras" in proc.stdout


def test_distrax_batch_shapes_and_errors(cond_flow, uncond_flow):
    pytest.importorskip("distrax", reason=DISTRAX_REASON)
    bij = cond_flow.as_bijector(jnp.array([0, 1, 2]))
    x = jax.random.uniform(jax.random.key(0), (2, 3, 8, 8, 1), minval=-1, maxval=1)
    z, logdet = bij.forward_and_log_det(x)
    assert z.shape == x.shape and logdet.shape == (2, 3)
    np.testing.assert_allclose(logdet[1], cond_flow.encode(x[1], jnp.array([0, 1, 2]))[1], rtol=1e-6)
    with pytest.raises(ValueError, match="event shape"):
        bij.forward(jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="does not match the batch shape"):
        bij.forward(jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="unconditional"):
        uncond_flow.as_distribution(1)


# ------------------------------------------------------------------ Flax NNX and Linen
def test_nnx_wrapper_holds_the_trained_weights(cond_flow):
    from flax import nnx

    module = cond_flow.to_nnx()
    x = images(cond_flow)
    z, logdet = module(x, Y3)
    z_ref, logdet_ref = cond_flow.encode(x, Y3)
    same(z, z_ref)
    same(logdet, logdet_ref, 1e-5)
    np.testing.assert_allclose(module.reverse(z, Y3), x, atol=1e-5)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_nnx_train_step_lowers_the_loss():
    from flax import nnx

    from tarflow_jax.nnx_compat import to_nnx

    class Density(nnx.Module):
        """An NNX model containing a TarFlow: a learned affine input map, then the flow."""

        def __init__(self, rngs: nnx.Rngs):
            model = TarFlow(img_size=4, in_channels=1, patch_size=2, channels=64, num_blocks=2,
                            layers_per_block=1, num_classes=2)
            self.flow = to_nnx(model, rngs)
            self.log_scale = nnx.Param(jnp.zeros(()))

        def __call__(self, x, y):
            z, logdet = self.flow(x * jnp.exp(self.log_scale[...]), y)
            logdet = logdet + x[0].size * self.log_scale[...]
            return likelihood.flow_loss(z, logdet)[0]

    model = Density(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: m(x, y))(model)
        optimizer.update(model, grads)
        return loss

    x = 0.3 * jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
    y = jnp.arange(16) % 2
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
    assert float(model.log_scale[...]) != 0.0


def test_frozen_prior_in_nnx_and_linen(cond_flow):
    from flax import nnx

    y = jnp.array([0, 2])
    weights = jax.tree.map(np.array, cond_flow.variables)

    class Restore(nnx.Module):
        """NNX: the flow as frozen data, one learned image per label."""

        def __init__(self, flow):
            self.prior = nnx.data(flow)
            self.logits = nnx.Param(jnp.zeros((2, 8, 8, 1)))

        def __call__(self, y):
            return -jnp.mean(self.prior.log_prob(jnp.tanh(self.logits[...]), y))

    model = Restore(cond_flow)
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(nnx_step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0], losses

    class LinenRestore(nn.Module):
        """Linen: the flow as a frozen prior field; only ``logits`` are parameters."""

        prior: TrainedFlow

        @nn.compact
        def __call__(self, y):
            logits = self.param("logits", nn.initializers.zeros, (2, *self.prior.image_shape))
            return -jnp.mean(self.prior.log_prob(jnp.tanh(logits), y))

    params = LinenRestore(cond_flow).init(jax.random.key(0), y)
    assert list(params["params"]) == ["logits"]
    tx = optax.adam(0.05)
    opt_state = tx.init(params)

    @jax.jit
    def linen_step(params, opt_state, flow):  # the flow is an argument: its weights are not constants
        loss, grads = jax.value_and_grad(lambda p: LinenRestore(flow).apply(p, y))(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    linen_losses = []
    for _ in range(8):
        params, opt_state, loss = linen_step(params, opt_state, cond_flow)
        linen_losses.append(float(loss))
    np.testing.assert_allclose(linen_losses[0], losses[0], rtol=1e-5)  # same problem, same start
    assert linen_losses[-1] < linen_losses[0]
    for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(cond_flow.variables)):
        np.testing.assert_array_equal(a, b)  # the prior never moved
