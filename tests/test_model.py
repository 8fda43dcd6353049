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
    """The returned log-det equals log|det dz/dx| of the whole flow, from a float64 Jacobian.

    The same model and weights run in float64 (scoped ``jax.enable_x64``) give the dense
    Jacobian of the 16-dim map; the tolerances come from the rounding of each side, so the
    check tests the model rather than float32 arithmetic or one library version's luck:

    * float64 log-det vs. float64 Jacobian: LU (``slogdet``) is backward stable and each
      entry of J carries relative error <= m*eps64 (m = 4*width*layers, the longest chain of
      sums in the network), so log|det J| moves by at most about n*cond(J)*(n + m)*eps64;
    * float32 log-det (what training uses) vs. that reference: a float32 sum of n
      log-scales from the same network, relative error <= (n + m)*eps32.
    """
    kw = dict(img_size=4, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=1)
    kw |= {"conditional": dict(num_classes=3), "volume_preserving": dict(nvp=False)}.get(kind, {})
    model = TarFlow(**kw)
    variables = random_variables(model, seed=5, head_std=0.1)
    x = jax.random.uniform(jax.random.key(2), (1, 4, 4, 1), minval=-1, maxval=1)
    y = jnp.array([2]) if model.num_classes else None
    _, logdet32 = model.apply(variables, x, y)
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        variables64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
        x64 = jnp.asarray(x, jnp.float64)
        flat = lambda u: model64.apply(variables64, u.reshape(x.shape), y)[0].reshape(-1)
        jac = jax.jacfwd(flat)(x64.reshape(-1))
        sign, expected = jnp.linalg.slogdet(jac)
        cond = float(jnp.linalg.cond(jac))
        z64, logdet64 = model64.apply(variables64, x64, y)
        assert jac.dtype == z64.dtype == logdet64.dtype == jnp.float64
        sign, expected, logdet64 = float(sign), float(expected), float(logdet64[0])
        jac = np.asarray(jac)
    n, m = jac.shape[0], 4 * model.channels * model.num_blocks * model.layers_per_block
    assert sign == 1.0 and cond < 1e6  # conditioned well enough for the float64 determinant
    tol64 = n * cond * (n + m) * np.finfo(np.float64).eps
    assert abs(logdet64 - expected) <= tol64, (logdet64, expected, tol64)
    if model.nvp:
        assert abs(expected) > 1.0  # the heads really scale
        tol32 = (n + m) * np.finfo(np.float32).eps * abs(expected)
        assert abs(float(logdet32[0]) - expected) <= tol32, (float(logdet32[0]), expected, tol32)
    else:  # volume preserving: shifts only, each block's Jacobian is unit triangular
        assert float(logdet32[0]) == logdet64 == 0.0
        assert np.abs(jac - np.eye(n)).max() > 1e-3  # ...but the flow is not the identity


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


def test_jacobi_plan_from_forward(tiny_cond):
    """The plan ranks blocks by the iterations their Jacobi inverse needs on a forward pass."""
    model, variables = tiny_cond
    y = jnp.array([0, 1, 2])
    x = model.apply(variables, jax.random.normal(jax.random.key(11), (3, 8, 8, 1)), y, method=TarFlow.reverse)
    plan, report = JacobiPlan.from_forward(model, variables, x, y, tol=1e-5)
    counts = report["iterations"]
    assert set(counts) == {"z", "zeros"} and all(len(c) == model.num_blocks for c in counts.values())
    for k in range(model.num_blocks):
        best = min(counts["z"][k], counts["zeros"][k])
        assert 1 <= best <= model.num_tokens - 1 and counts[plan.init[k]][k] == best
        assert best <= plan.max_iters[k] <= model.num_tokens - 1
        assert report["max_abs_error"][plan.init[k]][k] < 1e-4  # converged to the forward pass's input
    assert plan.sequential == ()  # no break-even given: everything iterates
    # blocks above the break-even go to the sequential loop; the samples still match
    tough = int(np.argmax(report["best_iterations"]))
    split, _ = JacobiPlan.from_forward(model, variables, x, y, break_even_iters=report["best_iterations"][tough] - 0.5)
    assert tough in split.sequential
    assert all(report["best_iterations"][k] > report["best_iterations"][tough] - 0.5 for k in split.sequential)
    z = jax.random.normal(jax.random.key(12), (3, 8, 8, 1))
    cached = model.apply(variables, z, y, method=TarFlow.reverse)
    for p in (plan, split):
        jac, iters = model.apply(variables, z, y, solver="jacobi", jacobi=p, return_iterations=True,
                                 method=TarFlow.reverse)
        np.testing.assert_allclose(jac, cached, atol=1e-4)
        for k in p.sequential:
            assert int(iters[k].sum()) == 0
    with pytest.raises(ValueError, match="sequential"):
        JacobiPlan(sequential=(5,)).check(model.num_blocks, model.num_tokens)


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
    with pytest.raises(ValueError, match=r"must be in \[-1, num_classes=3\)"):
        model.apply(variables, good, jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"must be in \[-1, num_classes=3\).*from -2"):
        model.apply(variables, good, jnp.array([-2, 1]))
    with pytest.raises(ValueError, match="attn_temp must be > 0"):
        model.apply(variables, good, jnp.array([0, 1]), guidance=1.0, attn_temp=0.0, method=TarFlow.reverse)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        model.apply(variables, good, jnp.array([0, 1]), guidance=float("nan"), method=TarFlow.reverse)
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


def test_labels_outside_the_classes_under_jit_never_read_another_row(tiny_cond):
    """Traced labels outside [-1, num_classes) give NaN for that example; the others are untouched."""
    model, variables = tiny_cond
    x = jax.random.uniform(jax.random.key(5), (4, 8, 8, 1), minval=-1, maxval=1)
    forward = jax.jit(lambda y: model.apply(variables, x, y))
    z, logdet = forward(jnp.array([0, 3, -2, 2]))
    z_ok, logdet_ok = model.apply(variables, x, jnp.array([0, 1, -1, 2]))
    assert np.isnan(np.asarray(logdet)[1:3]).all() and np.isnan(np.asarray(z)[1:3]).all()
    np.testing.assert_allclose(np.asarray(logdet)[[0, 3]], np.asarray(logdet_ok)[[0, 3]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(z)[[0, 3]], np.asarray(z_ok)[[0, 3]], atol=1e-6)


def test_guidance_one_rule_for_concrete_and_traced_values(tiny_cond):
    """Negative guidance is applied, concrete or traced; -1 is exactly the unguided prediction."""
    model, variables = tiny_cond
    perturbed = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), variables)
    z = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    y = jnp.array([0, 1, 2])
    reverse = lambda w, labels=y, **kw: model.apply(perturbed, z, labels, guidance=w, method=TarFlow.reverse, **kw)
    traced = jax.jit(lambda w: reverse(w))
    for w in (-0.5, -1.0, 0.0, 1.5):
        np.testing.assert_allclose(reverse(w), traced(jnp.float32(w)), atol=1e-4, err_msg=f"guidance {w}")
    assert float(jnp.abs(reverse(-0.5) - reverse(0.0)).max()) > 1e-3  # applied, not switched off
    unguided = reverse(0.0, labels=jnp.full((3,), -1))
    np.testing.assert_allclose(reverse(-1.0), unguided, atol=1e-4)


def test_non_positive_attention_temperature_is_guarded_under_jit(tiny_uncond):
    """A traced attn_temp <= 0 (or NaN) is raised to MIN_ATTN_TEMP: finite samples, never NaN."""
    from tarflow_jax.sampling import MIN_ATTN_TEMP
    model, variables = tiny_uncond
    perturbed = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), variables)
    z = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    sample = jax.jit(lambda t: model.apply(perturbed, z, guidance=1.0, attn_temp=t, method=TarFlow.reverse))
    floor = np.asarray(sample(jnp.float32(MIN_ATTN_TEMP)))
    assert np.isfinite(floor).all()
    for t in (0.0, -1.0, float("nan")):
        np.testing.assert_array_equal(np.asarray(sample(jnp.float32(t))), floor)
    assert float(np.abs(np.asarray(sample(jnp.float32(0.5))) - floor).max()) > 0


def test_labels_as_a_list_work_like_an_array(tiny_cond):
    """A Python list of labels (found by the slow property search) goes through every entry point."""
    model, variables = tiny_cond
    x = jax.random.uniform(jax.random.key(5), (3, model.img_size, model.img_size, model.in_channels),
                           minval=-1, maxval=1)
    z_list, ld_list = model.apply(variables, x, [0, 1, -1])
    z_arr, ld_arr = model.apply(variables, x, np.array([0, 1, -1], np.int32))
    np.testing.assert_array_equal(np.asarray(z_list), np.asarray(z_arr))
    np.testing.assert_array_equal(np.asarray(ld_list), np.asarray(ld_arr))
    guided = lambda y: model.apply(variables, z_arr, y, guidance=1.5, method=TarFlow.reverse)
    np.testing.assert_array_equal(np.asarray(guided([0, 1, 2])), np.asarray(guided(jnp.array([0, 1, 2]))))
