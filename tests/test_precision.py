"""Mixed precision means what the reference's bfloat16 autocast means.

Under ``torch.autocast(bfloat16)`` the reference multiplies in bfloat16 (Linear inputs cast, outputs
bfloat16) while its parameters, residual stream (a bfloat16 Linear output plus the float32 position
table is float32), LayerNorm (``norm(x.float())``), softmax, attention temperature (a Python float in
``scale=head_dim**-0.5/temp``) and affine maps (``exp`` in float32) stay float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from conftest import random_variables
from tarflow_jax import TarFlow
from tarflow_jax.layers import TransformerLayer, cached_attention

WIDTH = 256  # realistic: 4 heads of 64


def _model_and_input():
    model = TarFlow(img_size=16, in_channels=3, patch_size=2, channels=WIDTH, num_blocks=4, layers_per_block=2)
    variables = random_variables(model, seed=0, head_std=0.02)
    x = jax.random.uniform(jax.random.key(10), (8, 16, 16, 3), minval=-1, maxval=1)
    return model, variables, x


def test_bfloat16_forward_within_bound_of_float32_and_residual_is_float32():
    model, variables, x = _model_and_input()
    z32, ld32 = model.apply(variables, x)
    bf16 = model.clone(dtype=jnp.bfloat16)
    only_layers = lambda module, method: isinstance(module, TransformerLayer) and method == "__call__"
    (z16, ld16), state = bf16.apply(variables, x, capture_intermediates=only_layers)
    assert z16.dtype == jnp.float32 and ld16.dtype == jnp.float32
    n = model.num_dims
    # Measured (CPU, 3 seeds): max |Δz| 0.3-0.5 % of max |z|, RMS Δz 0.003, max |Δ log-det|/N 3-5e-4.
    # The error comes from bfloat16 matmul outputs (the reference rounds them too), not from the
    # residual stream, LayerNorm, softmax or the affine maps.
    assert float(jnp.abs(z16 - z32).max()) <= 1e-2 * float(jnp.abs(z32).max())
    assert float(jnp.sqrt(jnp.mean(jnp.square(z16 - z32)))) <= 5e-3
    assert float(jnp.abs(ld16 - ld32).max()) / n <= 1e-3
    # Every Transformer layer's output (the residual stream) is float32.
    outputs = jax.tree.leaves(state["intermediates"])  # per layer: (h, cache=None)
    assert len(outputs) == model.num_blocks * model.layers_per_block
    assert all(h.shape == (8, model.num_tokens, WIDTH) and h.dtype == jnp.float32 for h in outputs)


def test_layer_multiplies_in_bfloat16_but_keeps_the_stream_float32():
    layer = TransformerLayer(channels=WIDTH, dtype=jnp.bfloat16)
    h = jax.random.normal(jax.random.key(0), (2, 5, WIDTH))
    temp = jnp.ones((2,))
    params = layer.init(jax.random.key(1), h, None, 0, temp)
    out, _ = layer.apply(params, h, None, 0, temp)
    assert out.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(lambda p, h: layer.apply(p, h, None, 0, temp))(params, h)

    def equations(j):  # recursively, into the bodies of jit/custom_jvp/... calls
        for e in j.eqns:
            yield e
            for value in e.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from equations(inner)

    dots = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_attention_temperature_is_not_rounded_to_bfloat16():
    rng = np.random.default_rng(0)
    b, t, h, d = 1, 6, 1, 64
    # q·k/8 = 3·position exactly (so softmax weights differ by e^(3/temp) between keys).
    q = jnp.zeros((b, 1, h, d), jnp.bfloat16).at[..., 0].set(8.0)
    k = jnp.zeros((b, h, t, d), jnp.bfloat16).at[..., 0].set(3.0 * jnp.arange(t))
    v = jnp.asarray(rng.normal(0, 1, (b, h, t, d)), jnp.float32)  # float32 values: an exact comparison
    scale = 1 / 8

    def manual(temp):  # float32 logits of the bfloat16 inputs, one float32 factor
        logits = jnp.einsum("bshd,bhtd->bhst", q.astype(jnp.float32), k.astype(jnp.float32)) * (scale / temp)
        probs = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16)
        return jnp.einsum("bhst,bhtd->bshd", probs.astype(jnp.float32), v.astype(jnp.float32))

    got = cached_attention(q, k, v, t - 1, scale, jnp.full((b,), 0.7, jnp.float32)).astype(jnp.float32)
    exact, rounded = manual(np.float32(0.7)), manual(float(jnp.bfloat16(0.7)))  # 0.7 vs 0.69921875
    gap = float(jnp.abs(rounded - exact).max())
    assert gap > 1e-4  # 0.7 -> 0.6992 visibly moves these softmax weights
    assert float(jnp.abs(got - exact).max()) < 0.1 * gap
