"""The model: parity with the reference, exact inverse, log-det, guidance, denoising, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PARITY_FILES, load_parity, random_variables
from tarflow_jax import JacobiPlan, TarFlow, patchify, unpatchify
from tarflow_jax.convert import from_torch_state_dict
from tarflow_jax.likelihood import flow_loss
from tarflow_jax.likelihood import log_prob


@pytest.mark.parametrize("name", PARITY_FILES)
def test_parity_forward_and_sampling(parity_path, name):
    cfg, state, data = load_parity(parity_path, name)
    model = TarFlow(**cfg)
    variables = from_torch_state_dict(state, model)
    y = data["y"] if "y" in data.files else None
    z, logdet = model.apply(variables, data["x"], y)
    n = model.num_dims
    assert np.abs(np.asarray(z) - data["z"]).max() <= 1e-4
    assert np.abs(np.asarray(logdet) - data["logdet_mean"] * n).max() <= 1e-5 * n
    assert abs(float(flow_loss(z, logdet)[0]) - float(data["loss"])) <= 1e-5
    case = 0
    while f"rev{case}/x" in data.files:
        p = f"rev{case}/"
        x = model.apply(variables, data[p + "noise"], data[p + "y"] if p + "y" in data.files else None,
                        guidance=float(data[p + "guidance"]), guide_what=str(data[p + "guide_what"]),
                        attn_temp=float(data[p + "attn_temp"]), annealed_guidance=bool(data[p + "annealed"]),
                        method=TarFlow.reverse)
        assert np.abs(np.asarray(x) - data[p + "x"]).max() <= 1e-3, f"sampling case {case}"
        case += 1
    assert case > 0


def test_parity_scanned_layers_match(parity_path):
    cfg, state, data = load_parity(parity_path, "uncond_rgb16")
    model = TarFlow(**cfg, scan_layers=True)
    z, _ = model.apply(from_torch_state_dict(state, model), data["x"])
    assert np.abs(np.asarray(z) - data["z"]).max() <= 1e-4


def test_patchify_is_channel_major_and_invertible():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # token 1 is the patch at rows 0-1, columns 2-3; value index c*4 + i*2 + j
    np.testing.assert_array_equal(tokens[0, 1, 4 * 1 + 2 * 1 + 0], x[0, 1, 2, 1])
    np.testing.assert_array_equal(unpatchify(tokens, 4, 2, 3), x)


def test_init_matches_reference_scheme(tiny_cond):
    model, _ = tiny_cond
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    params = jax.tree.map(lambda v: getattr(v, "value", v), variables["params"],
                          is_leaf=lambda v: hasattr(v, "value"))
    block = params["blocks_0"]
    assert np.all(np.asarray(block["proj_out"]["kernel"]) == 0)
    assert np.any(np.asarray(block["proj_out"]["bias"]) != 0)
    assert 0.005 < float(jnp.std(block["pos_embed"])) < 0.02
    assert block["class_embed"].shape == (3, 64)
    np.testing.assert_array_equal(variables["prior"]["var"], np.ones((16, 4)))


@pytest.mark.parametrize("fixture", ["tiny_cond", "tiny_uncond"])
def test_round_trip(fixture, request):
    model, variables = request.getfixturevalue(fixture)
    key = jax.random.key(1)
    x = jax.random.uniform(key, (3, model.img_size, model.img_size, model.in_channels), minval=-1, maxval=1)
    y = jnp.array([0, 2, -1]) if model.num_classes else None
    z, logdet = model.apply(variables, x, y)
    assert float(jnp.abs(logdet).max()) > 1e-2  # the heads really transform
    x_back = model.apply(variables, z, y, method=TarFlow.reverse)
    np.testing.assert_allclose(x_back, x, atol=1e-5)


@pytest.mark.parametrize("kind", ["affine", "conditional", "volume_preserving"])
def test_logdet_equals_jacobian(kind):
    """The returned log-det equals log|det ∂z/∂x| of the whole flow (dense Jacobian of a 16-dim model)."""
    kw = dict(img_size=4, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=1)
    kw |= {"conditional": dict(num_classes=3), "volume_preserving": dict(nvp=False)}.get(kind, {})
    model = TarFlow(**kw)
    variables = random_variables(model, seed=5, head_std=0.2)
    x = jax.random.uniform(jax.random.key(2), (1, 4, 4, 1), minval=-1, maxval=1)
    y = jnp.array([2]) if model.num_classes else None
    flat = lambda u: model.apply(variables, u.reshape(1, 4, 4, 1), y)[0].reshape(-1)
    jac = jax.jacfwd(flat)(x.reshape(-1))
    sign, expected = jnp.linalg.slogdet(jac)
    _, logdet = model.apply(variables, x, y)
    assert float(sign) == 1.0
    if model.nvp:
        assert abs(float(expected)) > 0.1  # the heads really scale
        np.testing.assert_allclose(float(logdet[0]), float(expected), rtol=1e-4)  # float32 slogdet
    else:  # volume preserving: shifts only, the Jacobian is unit triangular
        assert float(logdet[0]) == 0.0 and abs(float(expected)) < 1e-5
        assert float(jnp.abs(jac - jnp.eye(16)).max()) > 1e-3  # ...but not the identity


@pytest.mark.parametrize("guidance,guide_what,annealed", [(0.0, "ab", False), (1.5, "ab", True), (2.0, "b", False)])
def test_cached_inverse_equals_uncached_oracle(tiny_cond, guidance, guide_what, annealed):
    model, variables = tiny_cond
    z = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    y = jnp.array([1, 2])
    kw = dict(guidance=guidance, guide_what=guide_what, attn_temp=0.8, annealed_guidance=annealed,
              method=TarFlow.reverse)
    cached = model.apply(variables, z, y, solver="cached", **kw)
    oracle = model.apply(variables, z, y, solver="uncached", **kw)
    np.testing.assert_allclose(cached, oracle, atol=1e-5)
    if guidance:
        unguided = model.apply(variables, z, y, method=TarFlow.reverse)
        assert float(jnp.abs(cached - unguided).max()) > 1e-3  # guidance changes the sample


def test_attention_temperature_guidance_unconditional(tiny_uncond):
    model, variables = tiny_uncond
    z = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))
    kw = dict(guidance=1.0, attn_temp=0.5, method=TarFlow.reverse)
    cached = model.apply(variables, z, **kw)
    oracle = model.apply(variables, z, solver="uncached", **kw)
    np.testing.assert_allclose(cached, oracle, atol=1e-5)


def test_jacobi_equals_cached(tiny_cond):
    model, variables = tiny_cond
    z = jax.random.normal(jax.random.key(8), (2, 8, 8, 1))
    y = jnp.array([0, 1])
    cached = model.apply(variables, z, y, guidance=1.0, method=TarFlow.reverse)
    for plan in (JacobiPlan(), JacobiPlan(segments=(3, 2), max_iters=(None, 20), init="zeros")):
        jac = model.apply(variables, z, y, guidance=1.0, solver="jacobi", jacobi=plan, method=TarFlow.reverse)
        np.testing.assert_allclose(jac, cached, atol=1e-4)


def test_denoise_raises_likelihood(tiny_cond):
    model, variables = tiny_cond
    y = jnp.array([0, 1, 2, 0])
    x = model.apply(variables, 0.5 * jax.random.normal(jax.random.key(9), (4, 8, 8, 1)), y,
                    method=TarFlow.reverse)
    sigma = 0.05
    noisy = x + sigma * jax.random.normal(jax.random.key(10), x.shape)
    clean = model.apply(variables, noisy, y, sigma, method=TarFlow.denoise)
    before = log_prob(model, variables, noisy, y)
    after = log_prob(model, variables, clean, y)
    assert float(jnp.min(after - before)) > 0
    assert float(jnp.abs(clean).max()) <= 1.0


def test_bfloat16_compute_close_to_float32(tiny_uncond):
    model, variables = tiny_uncond
    x = jax.random.uniform(jax.random.key(11), (2, 8, 8, 3), minval=-1, maxval=1)
    z32, ld32 = model.apply(variables, x)
    z16, ld16 = model.clone(dtype=jnp.bfloat16).apply(variables, x)
    assert z16.dtype == jnp.float32 and ld16.dtype == jnp.float32
    assert float(jnp.abs(ld32).min()) > 0.5  # a log-det far from 0, so the comparison means something
    np.testing.assert_allclose(z16, z32, atol=5e-2)
    # bf16 matmuls, float32 affine maps: the log-det (a sum over N = 192 dims) agrees to 1e-3 nats
    # per dimension (measured: ~3e-4); one block's log-det alone is ~2 nats per example here.
    np.testing.assert_allclose(ld16, ld32, atol=1e-3 * model.num_dims)
    assert float(jnp.abs(ld16 - ld32).max()) > 0  # bfloat16 really ran


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=10, patch_size=4), "img_size=10 must be a positive multiple of patch_size=4"),
    (dict(channels=100), "channels=100 must be a positive multiple of head_dim=64"),
])
def test_bad_model_config(kwargs, match):
    base = dict(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=1, layers_per_block=1)
    with pytest.raises(ValueError, match=match):
        TarFlow(**{**base, **kwargs})


def test_bad_inputs(tiny_cond, tiny_uncond):
    model, variables = tiny_cond
    good = jnp.zeros((2, 8, 8, 1))
    with pytest.raises(ValueError, match="4-D batch of images"):
        model.apply(variables, jnp.zeros((8, 8, 1)), None)
    with pytest.raises(ValueError, match=r"image shape \(8, 8, 3\).*expects"):
        model.apply(variables, jnp.zeros((2, 8, 8, 3)), None)
    with pytest.raises(ValueError, match=r"image shape \(16, 16, 1\)"):
        model.apply(variables, jnp.zeros((2, 16, 16, 1)), None)
    with pytest.raises(ValueError, match="must be < num_classes=3"):
        model.apply(variables, good, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="guide_what must be one of"):
        model.apply(variables, good, jnp.array([0, 1]), guidance=1.0, guide_what="c", method=TarFlow.reverse)
    with pytest.raises(ValueError, match="solver must be one of"):
        model.apply(variables, good, None, solver="newton", method=TarFlow.reverse)
    with pytest.raises(ValueError, match="num_blocks=2"):
        model.apply(variables, good, None, solver="jacobi", jacobi=JacobiPlan(segments=(1, 2, 3)),
                    method=TarFlow.reverse)
    umodel, uvariables = tiny_uncond
    with pytest.raises(ValueError, match="unconditional model"):
        umodel.apply(uvariables, jnp.zeros((2, 8, 8, 3)), jnp.array([0, 1]))


def test_jacobi_exact_after_segment_length_iterations(tiny_uncond):
    model, variables = tiny_uncond
    z = jax.random.normal(jax.random.key(12), (2, 8, 8, 3))
    cached = model.apply(variables, z, method=TarFlow.reverse)
    run = lambda plan: model.apply(variables, z, solver="jacobi", jacobi=plan, method=TarFlow.reverse)
    exact = run(JacobiPlan(max_iters=None, tol=0.0))  # T-1 iterations: exact by construction
    np.testing.assert_allclose(exact, cached, atol=2e-6)
    assert float(jnp.abs(run(JacobiPlan(max_iters=2, tol=0.0)) - cached).max()) > 1e-4
