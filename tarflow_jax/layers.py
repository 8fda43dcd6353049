"""Transformer layers of a TarFlow block: causal attention with an explicit key/value cache.

Every layer runs in one of two modes with the same parameters:

* full sequence (``cache=None``): causal self-attention over all tokens, used by the
  likelihood pass and training;
* chunk at an offset (``cache`` given): the chunk's keys/values are written into the
  layer's preallocated cache buffers at ``pos`` with ``lax.dynamic_update_slice`` and
  the chunk attends to every cached token up to its own position. One token at a time is
  the cached sequential inverse; a longer chunk is one Gauss-Seidel-Jacobi segment.

The cache holds one ``(B, H, T, hd)`` key buffer and one value buffer per layer (a tuple
over layers, not one stacked array), and each layer writes only its new ``(B, H, S, hd)``
chunk, in place. Separate buffers matter on the sampling hot path: an earlier version kept
an ``(L, B, T, H, hd)`` stack, sliced out each layer's cache and stacked the updated ones
again (or returned them as ``nn.scan``'s stacked outputs), which made XLA copy and re-zero
the whole cache on every token step; even slicing a layer out of a stack for attention
copies it. A scanned stack therefore has no cached mode: the samplers run its parameters
through an unscanned stack (:func:`unstack_layers`, once per block). Heads before tokens make both attention
products batched over ``(B, H)`` without transposing the cache.

Parameters carry logical axis names (``embed``, ``heads``, ``head_dim``, ``mlp``) that
``tarflow_jax.sharding`` maps onto a device mesh. The train step traces the layers inside
:func:`reverse_mode_vjps`, which gives :class:`DenseGeneral` and :class:`LayerNorm`
hand-written backward passes on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tarflow_jax import xla_cpu

Dtype = Any
# The key/value cache of one layer: {"k": (B, H, T, hd), "v": (B, H, T, hd)}; of a layer
# stack: the same keys holding tuples with one such buffer per layer.
Cache = dict[str, Any]


def init_cache(num_layers: int, batch: int, num_tokens: int, heads: int, head_dim: int,
               dtype: Dtype) -> Cache:
    """A zero key/value cache for a stack of ``num_layers`` layers: per key, a tuple of ``(B, H, T, hd)`` buffers."""
    shape = (batch, heads, num_tokens, head_dim)
    return {n: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)) for n in ("k", "v")}


def torch_linear_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DenseGeneral(nn.Module):
    """``y = x·W + b`` contracting ``axis`` of ``x``, like ``nn.DenseGeneral``, with its parameters created whole.

    Flax's ``DenseGeneral`` initialises a flat 2-D kernel and reshapes it, so a
    multi-dimensional kernel's logical axis names (e.g. ``(embed, qkv, heads, head_dim)``)
    meet the flat array first, and under ``jax.set_mesh`` that sharding constraint fails.
    Here the kernel and bias are initialised at their real shapes (for the element-wise
    initialisers used here the values are the same); the computation is Flax's
    (``promote_dtype`` then one ``lax.dot_general``).
    """

    features: int | tuple[int, ...]
    kernel_init: Callable[..., Any]
    bias_init: Callable[..., Any]
    axis: int | tuple[int, ...] = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        kernel = self.param("kernel", self.kernel_init, tuple(x.shape[a] for a in axis) + features,
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        trailing = axis == tuple(range(x.ndim - len(axis), x.ndim))
        if _reverse_mode_on() and trailing:
            k = math.prod(kernel.shape[:len(axis)])
            return _dense_xt_dy(x.reshape(-1, k), kernel.reshape(k, -1), bias.reshape(-1)
                                ).reshape(x.shape[:-len(axis)] + features)
        out = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
        return out + jnp.reshape(bias, (1,) * (x.ndim - len(axis)) + features)


_REVERSE_MODE = threading.local()  # .on: per thread, so other threads' traces are unaffected


def _reverse_mode_on() -> bool:
    """Whether the hand-written VJPs apply to the layers being traced: inside
    :func:`reverse_mode_vjps`, CPU tuning on, CPU target."""
    return getattr(_REVERSE_MODE, "on", False) and xla_cpu.tuning_enabled() and target_platform() == "cpu"


@contextlib.contextmanager
def reverse_mode_vjps():
    """Layers traced inside differentiate through hand-written VJPs (CPU only; reverse mode only).

    Three parts switch, each to a backward pass XLA:CPU runs faster than the one JAX derives
    (the ``small`` train step at batch 32; docs/performance.md):

    * :class:`DenseGeneral` (1.12–1.18×): for ``y = x·W`` with ``x (N, K)`` and ``W (K, M)``,
      JAX's transpose rule computes the weight gradient as ``(dyᵀ·x)ᵀ``, and XLA:CPU then
      copies the large ``dy (N, M)`` into a transposed layout for every weight gradient (for
      TarFlow's ``qkv`` and ``mlp_in`` the biggest tensor of the layer). Here a custom VJP
      computes ``dW = xᵀ·dy`` and ``dx = dy·Wᵀ`` directly: the same products, so the same
      values up to float summation order. Only where the contracted axes are the input's
      trailing ones.
    * :class:`LayerNorm` (about 1.02×): the closed-form backward of :func:`layer_norm_vjp`.
    * :func:`gelu` (about 1.016×, 256 MiB fewer temporaries): :func:`gelu_vjp` keeps only
      its input for the backward pass.

    Applies when the traced code targets CPU (:func:`target_platform`); elsewhere nothing
    changes. It applies to functions traced inside the ``with`` block by the same thread
    (JAX reuses the trace of a function it has already traced). ``TARFLOW_XLA_CPU_TUNING=0``
    turns it off, like the other CPU tuning (:mod:`tarflow_jax.xla_cpu`).

    A custom VJP has no forward-mode derivative: ``jax.jvp``/``jax.jacfwd`` through a
    function traced inside this context raise JAX's TypeError. The library's train step
    (reverse mode only) traces inside it; everything else, including users' own code,
    keeps JAX's own differentiation unless it enters the context.
    """
    with _switched_on(_REVERSE_MODE):
        yield


@contextlib.contextmanager
def _switched_on(flag: threading.local):
    """Sets ``flag.on`` for the ``with`` block, restoring the previous value after."""
    previous = getattr(flag, "on", False)
    flag.on = True
    try:
        yield
    finally:
        flag.on = previous


_FORWARD_PASS = threading.local()  # .on: per thread, like _REVERSE_MODE


def _forward_pass_on() -> bool:
    return (getattr(_FORWARD_PASS, "on", False) and not getattr(_REVERSE_MODE, "on", False)
            and xla_cpu.tuning_enabled() and target_platform() == "cpu")


@contextlib.contextmanager
def forward_pass_kernels():
    """Layers traced inside compute their forward values in forms XLA:CPU runs faster (CPU only).

    For programs that evaluate the flow without differentiating it (the likelihood and
    evaluation passes), compiled with :func:`tarflow_jax.xla_cpu.compiler_options`
    ``("forward")``, which keeps YNNPACK for reductions:

    * :class:`LayerNorm` takes its mean and variance as products with a ``1/W`` vector
      (:func:`layer_norm_by_products`), so that no reduction sits in front of the next
      layer's weight product (YNNPACK would take the two as one fusion and run the product
      at its slower rate);
    * :func:`causal_attention` normalises each piece's ``(rows, hd)`` output by the softmax
      denominator instead of the ``(rows, keys)`` probabilities (``(E·V)/ℓ`` with
      ``E = exp(S − max S)``, ``ℓ = Σ E``), one pass fewer over the ``T×T`` matrix.

    The values differ from the plain forward by float32 rounding (``small``: max |Δz| ~3e-6
    on values up to ~20); derivatives taken through it are the usual ones (the attention
    keeps its custom JVP; the products are differentiable). Together with the ``"forward"``
    options the ``small`` likelihood pass at batch 32 ran 1.23× faster than the earlier
    program (plain layers, no YNNPACK; docs/performance.md). Inside :func:`reverse_mode_vjps`, on other platforms or with
    ``TARFLOW_XLA_CPU_TUNING=0`` it changes nothing. Entered by
    :func:`tarflow_jax.evaluate.jit_eval_step`, the benchmarks' forward passes and
    :class:`tarflow_jax.trained.TrainedFlow`'s forward direction (``encode``, ``log_prob``,
    ``bits_per_dim`` and the score in ``denoise``; with XLA's default options there,
    1.22× for ``small`` at batch 32). Like
    :func:`reverse_mode_vjps` it applies to functions traced inside the ``with`` block: a
    ``jax.jit`` function already traced outside it keeps that trace, so enter the context
    inside the jitted function (as ``jit_eval_step`` does).
    """
    with _switched_on(_FORWARD_PASS):
        yield


def sum_leading(x: jax.Array, num_axes: int) -> jax.Array:
    """Sum of ``x`` over its first ``num_axes`` axes, arranged for XLA:CPU (used by the VJPs below).

    The gradient of a broadcast add (a bias over ``(N, M)`` rows, the position table over the
    batch) is such a column sum. XLA:CPU's YNNPACK reductions, which the train step keeps
    (:mod:`tarflow_jax.xla_cpu`), run it slowly when the summed axis is the outer one:
    ``(32, 65536) → (65536,)`` took 10.7 ms where the product ``ones(32)·x`` takes 1.2 ms, and
    ``(8192, 256) → (256,)`` 1.4 ms where summing rows in groups of 64 first, then the
    128 partial sums as a product with ones, takes 0.85 ms (2-core CPU, isolated, with the
    producing elementwise pass, medians of 21). So a tall ``N×M`` (``N`` a multiple of 64,
    at least 1024) is summed in those two stages and a short one as ``ones(N)·x``; the sum
    runs in ``float32_or_wider(x.dtype)``. The values equal ``jnp.sum(x, axis=range(num_axes))``
    up to float summation order.

    Args:
      x: ``(*lead, *rest)`` array.
      num_axes: how many leading axes to sum over (``0 <= num_axes <= x.ndim``).

    Returns: ``rest``-shaped array in ``x``'s dtype.

    Raises:
      ValueError: ``num_axes`` is not an integer in ``0..x.ndim``.
    """
    if isinstance(num_axes, bool) or not isinstance(num_axes, int) or not 0 <= num_axes <= x.ndim:
        raise ValueError(f"num_axes must be an integer in 0..{x.ndim} (x has shape {x.shape}); got {num_axes!r}")
    lead, rest = x.shape[:num_axes], x.shape[num_axes:]
    n, m = math.prod(lead), math.prod(rest)
    flat = x.reshape(n, m).astype(float32_or_wider(x.dtype))
    if n >= 1024 and n % 64 == 0:  # rows of 64 first (a sum of two sums would be merged back into one)
        flat = jnp.sum(flat.reshape(n // 64, 64, m), axis=1)
    total = jnp.einsum("n,nm->m", jnp.ones((flat.shape[0],), flat.dtype), flat)
    return total.reshape(rest).astype(x.dtype)


def add_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x + rows`` for ``rows`` shaped like ``x``'s trailing axes (the position table over a batch).

    Inside :func:`reverse_mode_vjps` on CPU the gradient of ``rows`` is :func:`sum_leading` of
    the cotangent (for the ``small`` train step's ``(32, 256, 256)`` residual-stream gradient,
    about 25 ms less per step, 1.02–1.03×; docs/performance.md); elsewhere a plain add.

    Args:
      x: ``(*lead, *rest)``.
      rows: ``rest``-shaped (TarFlow passes both in the residual stream's dtype).

    Returns: ``x + rows``, shaped like ``x``, in JAX's promoted dtype of the two.

    Raises:
      ValueError: ``rows``' shape is not the trailing part of ``x``'s.
    """
    if x.shape[x.ndim - rows.ndim:] != rows.shape:
        raise ValueError(f"rows {rows.shape} must match the trailing axes of x {x.shape}")
    if _reverse_mode_on():
        return _add_rows(x, rows, x.ndim - rows.ndim)
    return x + rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_rows(x: jax.Array, rows: jax.Array, lead: int) -> jax.Array:
    return x + rows


def _add_rows_fwd(x: jax.Array, rows: jax.Array, lead: int) -> tuple[jax.Array, None]:
    return x + rows, None


def _add_rows_bwd(lead: int, _: None, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    return dy, sum_leading(dy, lead)


_add_rows.defvjp(_add_rows_fwd, _add_rows_bwd)


@jax.custom_vjp
def _dense_xt_dy(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x (N, K) · w (K, M) + b (M,)`` whose backward pass is ``(dy·wᵀ, xᵀ·dy, Σ_n dy)`` (see :func:`reverse_mode_vjps`)."""
    return jnp.matmul(x, w) + b


def _dense_xt_dy_fwd(x: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.matmul(x, w) + b, (x, w)


def _dense_xt_dy_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, w = res
    return (jnp.einsum("nm,km->nk", dy, w).astype(x.dtype), jnp.einsum("nk,nm->km", x, dy).astype(w.dtype),
            sum_leading(dy, 1).astype(w.dtype))


_dense_xt_dy.defvjp(_dense_xt_dy_fwd, _dense_xt_dy_bwd)


def dense(features, fan_in: int, names: tuple, *, axis=-1, dtype: Dtype, param_dtype: Dtype,
          name: str, kernel_init=None, **module_kwargs: Any) -> DenseGeneral:
    """A :class:`DenseGeneral` with PyTorch's init and logical axis names (kernel names; bias names are the output's).

    ``module_kwargs`` go to the module (e.g. ``parent=None`` for an unbound copy).
    """
    out_ndim = 1 if isinstance(features, int) else len(features)
    return DenseGeneral(
        features=features,
        axis=axis,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init or torch_linear_init(fan_in), names),
        bias_init=nn.with_logical_partitioning(torch_linear_init(fan_in), names[-out_ndim:]),
        name=name,
        **module_kwargs,
    )


def float32_or_wider(dtype: Dtype) -> Any:
    """The type of the residual stream, LayerNorm, softmax and the flow's affine maps.

    float32 for ``float32`` and ``bfloat16`` compute; float64 for ``float64`` (under
    ``jax.enable_x64``: the log-det test's float64 Jacobian).
    """
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(name: str, param_dtype: Dtype, dtype: Dtype = jnp.float32, **module_kwargs: Any) -> "LayerNorm":
    """LayerNorm in ``float32_or_wider(dtype)`` with the reference's epsilon and two-pass variance."""
    return LayerNorm(epsilon=1e-5, dtype=float32_or_wider(dtype), param_dtype=param_dtype, name=name, **module_kwargs)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a learned scale and bias (logical axis ``embed``).

    The same parameters, initialisation and forward values as ``nn.LayerNorm(epsilon=...,
    use_fast_variance=False)``, the reference's ``nn.LayerNorm`` (PyTorch): mean, then
    variance as the mean of ``(x − mean)²`` (two passes), ``y = (x − mean)·(rsqrt(var + ε)·scale)
    + bias``, computed in ``promote_types(dtype, float32)``. Inside :func:`reverse_mode_vjps`
    on CPU its gradient comes from a hand-written VJP (:func:`layer_norm_vjp`); elsewhere JAX
    differentiates the forward formula.

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype; the computation runs in ``promote_types(dtype, float32)``
        (TarFlow passes ``float32_or_wider``, so both are float32, or float64 under x64).
      param_dtype: dtype of ``scale`` and ``bias``, shape ``(features,)``.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x (..., W)`` over ``W``; returns ``(..., W)`` in ``dtype``."""
        width = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (width,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (width,), self.param_dtype)
        wide = jnp.promote_types(self.dtype, jnp.float32)
        x, scale, bias = x.astype(wide), scale.astype(wide), bias.astype(wide)
        if _reverse_mode_on():
            norm = layer_norm_vjp
        elif _forward_pass_on():
            norm = layer_norm_by_products
        else:
            norm = _layer_norm
        return norm(x, scale, bias, float(self.epsilon)).astype(self.dtype)


def _layer_norm_stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Two-pass ``mean`` and ``rsqrt(var + epsilon)`` over the last axis (kept as ``(..., 1)``)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    mean, rstd = _layer_norm_stats(x, epsilon)
    return (x - mean) * (rstd * scale) + bias


def layer_norm_by_products(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """:class:`LayerNorm`'s formula with the two-pass mean and variance taken as products ``x·(1/W)``.

    Same statistics as ``jnp.mean`` (two passes: the variance is the mean of ``(x − mean)²``)
    up to summation order; used inside :func:`forward_pass_kernels`. ``x (..., W)``,
    ``scale, bias (W,)``; returns ``(..., W)`` in ``x``'s dtype.
    """
    mean, rstd = _layer_norm_stats_by_products(x, epsilon)
    return (x - mean) * (rstd * scale) + bias


def _layer_norm_stats_by_products(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """:func:`_layer_norm_stats` with each mean taken as a product with a ``(W, 1)`` vector of ``1/W``."""
    weights = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    mean = jnp.matmul(x, weights)
    var = jnp.matmul(jnp.square(x - mean), weights)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_vjp(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """:class:`LayerNorm`'s formula over the last axis of ``x (..., W)`` with ``scale, bias (W,)``, reverse mode only.

    Its VJP is the closed form (Ba et al. 2016, "Layer Normalization"; PyTorch's
    ``native_layer_norm_backward`` computes the same): with ``x̂ = (x − mean)·rstd`` and
    ``g = dy·scale``, ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``, ``dscale = Σ dy·x̂`` and
    ``dbias = Σ dy`` over the leading axes. It keeps ``x``, the mean and ``rstd`` for the
    backward pass and needs two row reductions there, where autodiff of the two-pass
    forward formula derives a longer chain; the ``small`` train step runs about 1.02×
    faster on CPU (docs/performance.md). Its forward pass takes the statistics as products
    (as :func:`layer_norm_by_products`; about 1.01× more). No forward mode (a custom VJP).
    """
    return _layer_norm(x, scale, bias, epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon):
    # Statistics as products here too: with YNNPACK's reductions the train step runs 1.01x faster.
    mean, rstd = _layer_norm_stats_by_products(x, epsilon)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, res, dy):
    x, mean, rstd, scale = res
    x_hat = (x - mean) * rstd
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
    rows = dy.ndim - 1
    return dx, sum_leading(dy * x_hat, rows), sum_leading(dy, rows)


layer_norm_vjp.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def constrain_activations(h: jax.Array) -> jax.Array:
    """Shards activations along the batch axis when a logical-axis mesh context is active."""
    return nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))


# --------------------------------------------------------------------------- attention
ATTENTIONS = ("xla", "splash", "cudnn")
REMAT_POLICIES = ("nothing", "matmuls")
_SPLASH_INTERPRET = [False]


@contextlib.contextmanager
def splash_interpret_mode():
    """Runs ``attention="splash"`` through the Pallas interpreter, on any backend (tests, debugging).

    The splash kernel is TPU code; interpreted it runs (slowly) on CPU with the same
    numerics, which is how the tests compare it with the XLA path. Applies to functions
    traced inside the ``with`` block.
    """
    _SPLASH_INTERPRET[0], previous = True, _SPLASH_INTERPRET[0]
    try:
        yield
    finally:
        _SPLASH_INTERPRET[0] = previous


def target_platform() -> str:
    """The platform the code being traced will run on: the current mesh's, else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def check_attention(attention: str, platform: str, dtype: Dtype, num_tokens: int | None = None) -> None:
    """Raises a ValueError when ``attention`` cannot run on ``platform`` for this model.

    ``"xla"`` runs anywhere. ``"splash"`` (TPU Pallas kernel) needs a TPU, or
    :func:`splash_interpret_mode`, and a token count that is a multiple of 128 (its
    block size). ``"cudnn"`` needs a CUDA GPU and a bfloat16/float16 compute dtype.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}; got {attention!r}")
    if attention == "splash":
        if platform != "tpu" and not _SPLASH_INTERPRET[0]:
            raise ValueError(f"attention='splash' is a TPU kernel; the backend here is {platform!r}. "
                             f"Use attention='xla' (or 'cudnn' on a GPU with bfloat16).")
        if num_tokens is not None and num_tokens % 128:
            raise ValueError(f"attention='splash' needs a token count that is a multiple of 128; "
                             f"this model has {num_tokens} tokens. Use attention='xla'.")
    if attention == "cudnn":
        if platform not in ("gpu", "cuda"):
            raise ValueError(f"attention='cudnn' needs a CUDA GPU; the backend here is {platform!r}. "
                             f"Use attention='xla'" + (" (or 'splash' on a TPU)." if platform != "tpu" else
                                                       " or 'splash' on this TPU."))
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 model dtype; got "
                             f"{jnp.dtype(dtype).name}. Set config.model.dtype='bfloat16' or use attention='xla'.")


def splash_block_sizes(num_tokens: int):
    """The splash kernel's block sizes for ``num_tokens`` (a multiple of 128): the largest of 512/256/128 dividing it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = next(b for b in (512, 256, 128) if num_tokens % b == 0)
    return sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                         block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                         block_q_dq=block, block_kv_dq=block)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Causal attention of ``q, k, v (B, T, H, hd)`` with the TPU splash kernel; ``(B, T, H, hd)``.

    The kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) works on one
    example's ``(H, T, hd)`` and never writes the ``T×T`` logits to HBM; it is mapped over
    the batch. Under a mesh with automatic (GSPMD) axes it runs inside ``jax.shard_map``
    over the batch axes (and heads over ``tensor``), since XLA cannot partition a Pallas
    call itself; inside ``shard_map`` (per-device sampling and evaluation) it is called
    directly.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    def local(q, k, v):
        heads, t = q.shape[2], q.shape[1]
        mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(heads)])
        kernel = sa.make_splash_mha(mask, block_sizes=splash_block_sizes(t), head_shards=1, q_seq_shards=1,
                                    interpret=_SPLASH_INTERPRET[0])
        to_heads = lambda a: jnp.swapaxes(a, 1, 2)
        out = jax.vmap(kernel)(to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v))
        return jnp.swapaxes(out, 1, 2).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.auto_axes:
        return local(q, k, v)
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "heads", "head_dim"))
    spec = jax.sharding.PartitionSpec(*[None if a is None else a for a in spec])
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, attention: str) -> jax.Array:
    """Causal self-attention over the whole sequence with the chosen implementation (see :data:`ATTENTIONS`).

    ``"xla"`` is :func:`causal_attention` on CPU and ``jax.nn.dot_product_attention``'s XLA
    path elsewhere (the same function; the CPU version was tuned there and not measured on
    accelerators).
    """
    platform = target_platform()
    check_attention(attention, platform, q.dtype, q.shape[1])
    if attention == "splash":
        return splash_attention(q, k, v, scale)
    if attention == "xla" and platform == "cpu":
        # The same function in query pieces that skip most of the masked triangle, with a
        # backward pass XLA:CPU runs on its fast matmul path (docs/performance.md).
        return causal_attention(q, k, v, scale)
    implementation = "cudnn" if attention == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)


class TransformerLayer(nn.Module):
    """Pre-norm layer ``h += Attn(LN(h)); h += MLP(LN(h))`` with exact GELU and no dropout.

    ``attention`` picks the full-sequence attention implementation (:data:`ATTENTIONS`);
    the cached (sampling) path always uses :func:`cached_attention`.
    """

    channels: int
    head_dim: int = 64
    expansion: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, h: jax.Array, cache: Cache | None, pos: jax.Array, temp: jax.Array
                 ) -> tuple[jax.Array, Cache | None]:
        """Applies the layer to ``h (B,S,W)`` at token offset ``pos``; returns ``(h, cache)``.

        ``temp (B,)`` divides each example's attention logits (attention-temperature guidance).
        ``cache`` is this layer's ``{"k", "v"}`` buffers ``(B, H, T, hd)``.
        """
        w, hd = self.channels, self.head_dim
        heads = w // hd
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = constrain_activations(h)

        x = layer_norm("attn_norm", self.param_dtype, self.dtype)(h).astype(self.dtype)
        qkv = dense((3, heads, hd), w, ("embed", "qkv", "heads", "head_dim"), name="qkv", **kw)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, S, H, hd)
        scale = 1.0 / math.sqrt(hd)
        # The temperature stays float32 (never rounded to the compute dtype: 0.7 would become
        # 0.6992 in bfloat16), as the reference's `scale=head_dim**-0.5 / temp`.
        wide = float32_or_wider(self.dtype)
        if cache is None and wide == jnp.float64:  # float64 checks: dot_product_attention's softmax is float32
            out = cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), 0, scale, temp)
        elif cache is None:
            # Per-example temperatures folded into q in float32 (exact for the forward pass's temp = 1).
            q = (q.astype(wide) / temp.astype(wide)[:, None, None, None]).astype(q.dtype)
            # Initialisation only needs shapes: the XLA path, which runs anywhere.
            out = full_attention(q, k, v, scale, "xla" if self.is_initializing() else self.attention)
        else:
            cache = {"k": cache_write(cache["k"], k, pos), "v": cache_write(cache["v"], v, pos)}
            out = cached_attention(q, cache["k"], cache["v"], pos, scale, temp)
        h = h + dense(w, w, ("heads", "head_dim", "embed"), axis=(-2, -1), name="attn_out", **kw)(out)
        h = constrain_activations(h)

        x = layer_norm("mlp_norm", self.param_dtype, self.dtype)(h).astype(self.dtype)
        x = dense(self.expansion * w, w, ("embed", "mlp"), name="mlp_in", **kw)(x)
        x = gelu(x)
        h = h + dense(w, self.expansion * w, ("mlp", "embed"), name="mlp_out", **kw)(x)
        return constrain_activations(h), cache


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x·Φ(x) = 0.5·x·(1 + erf(x/√2))``, the reference's (PyTorch's) formula.

    Same function as ``nn.gelu(x, approximate=False)``, which evaluates ``erfc``: on XLA:CPU
    ``erf`` is one vectorised polynomial, ``erfc`` a branchy one that costs more per element.
    Computed in float32 for bfloat16 ``x`` (as PyTorch's GELU does; in bfloat16, ``1 + erf``
    rounds to 0 for ``x`` below about −2.5), returned in ``x``'s dtype. Inside
    :func:`reverse_mode_vjps` (CPU) it differentiates through :func:`gelu_vjp`.
    """
    if _reverse_mode_on():
        return gelu_vjp(x)
    return _gelu(x)


def _gelu(x: jax.Array) -> jax.Array:
    wide = x.astype(float32_or_wider(x.dtype))  # as PyTorch: bfloat16 in and out, float32 inside
    return (0.5 * wide * (1.0 + jax.lax.erf(wide * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


@jax.custom_vjp
def gelu_vjp(x: jax.Array) -> jax.Array:
    """:func:`gelu` (any shape and float dtype) whose backward pass keeps only ``x`` and recomputes ``Φ`` and ``φ``.

    ``d/dx [x·Φ(x)] = Φ(x) + x·φ(x)`` with ``φ(x) = exp(−x²/2)/√(2π)``. Autodiff of the
    forward formula makes the forward pass write ``erf`` and ``exp`` terms of the
    ``(tokens, expansion·width)`` hidden layer as extra residuals (five elementwise passes
    where the value needs one); here the backward pass computes the derivative from ``x`` in
    one fused pass. ``Φ`` is written there as ``0.5·(1 − erf(−x/√2))`` (the same value: ``erf``
    is odd), so that XLA's common-subexpression pass cannot merge it with the forward's
    ``erf(x/√2)`` and keep that as a residual after all. ``small`` train step at batch 32 on
    CPU: 1.016× faster, 256 MiB fewer temporaries (docs/performance.md). Reverse mode only.
    """
    return _gelu(x)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _gelu(x), x


def _gelu_bwd(x: jax.Array, dy: jax.Array) -> tuple[jax.Array]:
    wide = x.astype(float32_or_wider(x.dtype))
    cdf = 0.5 * (1.0 - jax.lax.erf(wide * (-1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * wide * wide) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((dy.astype(wide.dtype) * (cdf + wide * pdf)).astype(x.dtype),)


gelu_vjp.defvjp(_gelu_fwd, _gelu_bwd)


# Query rows per piece of the causal attention below: each piece attends only to the keys
# up to its last row, so the masked upper triangle is mostly skipped
# ((n+1)/(2n) of the square is computed for n pieces).
ATTENTION_CHUNK = 128


def _chunk_bounds(num_tokens: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, num_tokens)) for a in range(0, num_tokens, chunk)]


def _join_pieces(pieces: list[jax.Array]) -> jax.Array:
    """The per-piece ``(B,H,rows,hd)`` attention outputs joined along the rows."""
    return jnp.concatenate(pieces, axis=2) if len(pieces) > 1 else pieces[0]


def _causal_logits(q: jax.Array, k: jax.Array, a: int, b: int, scale: float) -> jax.Array:
    """Float32 scaled logits of rows ``a..b-1`` over keys ``0..b-1`` of heads-first ``q, k (B,H,T,hd)``, masked."""
    logits = jnp.einsum("bhtd,bhsd->bhts", q[:, :, a:b], k[:, :, :b], preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    visible = jnp.arange(b)[None, :] <= jnp.arange(a, b)[:, None]
    return jnp.where(visible, logits, 0.7 * jnp.finfo(jnp.float32).min)


def _causal_probs(q: jax.Array, k: jax.Array, a: int, b: int, scale: float) -> jax.Array:
    """Float32 softmax of :func:`_causal_logits`."""
    return jax.nn.softmax(_causal_logits(q, k, a, b, scale), axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _causal_attention_hf(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int) -> jax.Array:
    outs = [jnp.einsum("bhts,bhsd->bhtd", _causal_probs(q, k, a, b, scale).astype(v.dtype), v[:, :, :b])
            for a, b in _chunk_bounds(q.shape[2], chunk)]
    return _join_pieces(outs)


def _causal_attention_post(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int) -> jax.Array:
    """:func:`_causal_attention_hf`'s values with each piece's output normalised after ``E·V``."""
    outs = []
    for a, b in _chunk_bounds(q.shape[2], chunk):
        logits = _causal_logits(q, k, a, b, scale)
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        denominator = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum("bhts,bhsd->bhtd", e.astype(v.dtype), v[:, :, :b], preferred_element_type=jnp.float32)
        outs.append((out * (1.0 / denominator)).astype(v.dtype))
    return _join_pieces(outs)


_causal_attention_hf_post = jax.custom_jvp(_causal_attention_post, nondiff_argnums=(3, 4))


@_causal_attention_hf.defjvp
def _causal_attention_jvp(scale, chunk, primals, tangents):
    """Tangents written so that their transposes (the backward pass) are ``(M,K)·(K,N)`` products.

    XLA:CPU sends those to YNNPACK; the products autodiff derives on its own for ``dK`` and
    ``dV`` (``dSᵀ·Q``, ``Pᵀ·dO``) contract the row axis of a ``T×T`` matrix and ran on a
    slower Eigen kernel. Here the ``k`` and ``v`` tangents enter through ``(B,H,hd,T)``
    transposes, so the backward computes ``dKᵀ = Qᵀ·dS`` and ``dVᵀ = dOᵀ·P``.
    """
    q, k, v = primals
    dq, dk, dv = tangents
    f32 = jnp.float32
    q_t, dk_t, dv_t = (jnp.swapaxes(x, 2, 3) for x in (q, dk, dv))  # (B,H,hd,T)
    outs, d_outs = [], []
    for a, b in _chunk_bounds(q.shape[2], chunk):
        p = _causal_probs(q, k, a, b, scale)
        pv = p.astype(v.dtype)
        outs.append(jnp.einsum("bhts,bhsd->bhtd", pv, v[:, :, :b]))
        d_logits = (jnp.einsum("bhtd,bhsd->bhts", dq[:, :, a:b], k[:, :, :b], preferred_element_type=f32)
                    + jnp.einsum("bhdt,bhds->bhts", q_t[:, :, :, a:b], dk_t[:, :, :, :b],
                                 preferred_element_type=f32)) * f32(scale)
        dp = p * (d_logits - jnp.sum(p * d_logits, axis=-1, keepdims=True))
        d_out = jnp.einsum("bhts,bhsd->bhtd", dp.astype(v.dtype), v[:, :, :b])
        d_outs.append(d_out + jnp.swapaxes(jnp.einsum("bhds,bhts->bhdt", dv_t[:, :, :, :b], pv), 2, 3))
    return _join_pieces(outs), _join_pieces(d_outs)


_causal_attention_hf_post.defjvp(_causal_attention_jvp)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     chunk: int = ATTENTION_CHUNK) -> jax.Array:
    """Causal softmax attention of ``q, k, v (B,T,H,hd)``; returns ``(B,T,H,hd)`` in ``v``'s dtype.

    The same function as ``jax.nn.dot_product_attention(q, k, v, scale=scale,
    is_causal=True)`` on its XLA path (float32 logits and softmax, masked logits set to
    ``0.7·finfo(float32).min``), computed in pieces of ``chunk`` query rows that each see
    only the keys up to their last row. Differentiable in both modes through a custom JVP
    whose transpose (the backward pass) keeps every product in a form XLA:CPU runs fast.
    Inside :func:`forward_pass_kernels` (CPU) the undifferentiated values are computed with
    the softmax denominator applied to the output rows instead (same values up to rounding).
    """
    hf = lambda x: jnp.swapaxes(x, 1, 2)
    attention = _causal_attention_hf_post if _forward_pass_on() else _causal_attention_hf
    return hf(attention(hf(q), hf(k), hf(v), float(scale), int(chunk)))


def cache_write(buffer: jax.Array, chunk: jax.Array, pos: jax.Array | int) -> jax.Array:
    """Writes ``chunk (B,S,H,hd)`` into ``buffer (B,H,T,hd)`` at tokens ``pos..pos+S-1`` (in place)."""
    update = jnp.swapaxes(chunk, 1, 2).astype(buffer.dtype)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buffer, update, (zero, zero, jnp.asarray(pos, jnp.int32), zero))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array | int, scale: float,
                     temp: jax.Array | None = None) -> jax.Array:
    """Attention of queries ``q (B,S,H,hd)`` at positions ``pos..pos+S-1`` to a cache ``k, v (B,H,T,hd)``.

    Keys after a query's own position are masked; the same computation as the XLA path of
    ``jax.nn.dot_product_attention`` (float32 logits and softmax, the same large negative
    fill), laid out so both products are batched over ``(B, H)`` with no cache transpose.
    ``temp (B,)``, if given, divides each example's logits: the float32 logits are multiplied
    by ``scale / temp`` in float32, as the reference's ``scaled_dot_product_attention(...,
    scale=head_dim**-0.5 / temp)`` (the temperature is not rounded to the compute dtype).
    """
    s, t = q.shape[1], k.shape[2]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bshd,bhtd->bhst", q, k, preferred_element_type=logits_dtype)
    factor = jnp.asarray(scale, logits_dtype)
    if temp is not None:
        factor = factor / temp.astype(logits_dtype)[:, None, None, None]
    logits = logits * factor
    visible = jnp.arange(t)[None, :] <= (pos + jnp.arange(s))[:, None]  # (S, T)
    logits = jnp.where(visible, logits, 0.7 * jnp.finfo(logits_dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(k.dtype)
    return jnp.einsum("bhst,bhtd->bshd", probs, v)


# ------------------------------------------------------------- one-token decoding
# The cached sequential inverse (``sampling.reverse_cached``) feeds one token at a time. Its
# key/value cache is split along the tokens into segments, one buffer each, and the token
# loop runs once per segment: while writing segment ``j`` a token attends to segments
# ``0..j`` only. Reading the cache is what a token step spends most of its time on (at
# batch 16 on `small` the cache is 4 MiB per layer and tensor), and this way a step reads
# on average a bit over half of it instead of all of it. (Slicing a prefix out of one
# buffer instead would make XLA copy the buffer, and a dynamic-length read is not
# expressible.)
MAX_CACHE_SEGMENTS = 4
MIN_SEGMENT_TOKENS = 32
SEGMENTED_LAYER_BUDGET = 32  # blocks × layers × segments compiled by default (compile time)


def cache_segments(num_tokens: int, num_segments: int | None = None, num_layers_total: int = 1
                   ) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` token ranges of the cache segments covering positions ``0..T-2``.

    Only the first ``T-1`` positions are ever written (the last token has no successor to
    predict). ``num_segments=None`` picks it: segments of at least
    :data:`MIN_SEGMENT_TOKENS` tokens, at most :data:`MAX_CACHE_SEGMENTS`, and at most
    ``SEGMENTED_LAYER_BUDGET / num_layers_total`` so that the sampler's compile time (one
    token loop per block and segment, ``num_layers_total`` = blocks × layers per block)
    stays bounded: `small` (4×2 layers, 256 tokens) gets 4 segments, ImageNet-64 (8×8
    layers) one.
    """
    used = max(num_tokens - 1, 1)
    if num_segments is None:
        num_segments = min(MAX_CACHE_SEGMENTS, used // MIN_SEGMENT_TOKENS,
                           SEGMENTED_LAYER_BUDGET // max(num_layers_total, 1))
    num_segments = max(1, min(int(num_segments), used))
    bounds = [round(i * used / num_segments) for i in range(num_segments + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


def init_segment_cache(num_layers: int, batch: int, segments: tuple[tuple[int, int], ...], heads: int,
                       head_dim: int, dtype: Dtype) -> Cache:
    """A zero segmented cache: per key, per layer, a tuple of ``(B, H, end-start, hd)`` buffers."""
    def layer():
        return tuple(jnp.zeros((batch, heads, b - a, head_dim), dtype) for a, b in segments)
    return {n: tuple(layer() for _ in range(num_layers)) for n in ("k", "v")}


def decode_layer(params: Any, h: jax.Array, cache: Cache, segment: int, offset: jax.Array,
                 pos: jax.Array, temp: jax.Array | None, *, channels: int, head_dim: int,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> tuple[jax.Array, Cache]:
    """:class:`TransformerLayer` for one new token against a segmented key/value cache.

    Args:
      params: the layer's parameters (``attn_norm``, ``qkv``, ``attn_out``, ``mlp_norm``,
        ``mlp_in``, ``mlp_out``), unboxed, as :class:`TransformerLayer` names them.
      h: ``(R, 1, W)`` the token's residual stream (R rows: batch, or both guidance branches).
      cache: this layer's ``{"k", "v"}``: tuples of segment buffers ``(R, H, len, hd)``.
      segment: (static) index of the segment the token's key/value goes into; the token
        attends to segments ``0..segment``.
      offset: the token's slot inside that segment (int32 scalar).
      pos: the token's absolute position (int32 scalar); later slots are masked.
      temp: ``(R,)`` per-row attention temperature dividing the logits, or ``None`` (1).

    Returns:
      ``(h, cache)``: the updated ``(R, 1, W)`` stream and cache. The math is the layer's own
      (the same sub-modules applied functionally), so the result equals
      ``TransformerLayer`` with a full cache up to summation order.
    """
    w, hd = channels, head_dim
    heads = w // hd
    expansion = params["mlp_in"]["kernel"].shape[-1] // w
    kw = dict(dtype=dtype, param_dtype=param_dtype, parent=None)
    apply = lambda module, name, x: module.apply({"params": params[name]}, x)
    x = apply(layer_norm("attn_norm", param_dtype, dtype, parent=None), "attn_norm", h).astype(dtype)
    qkv = apply(dense((3, heads, hd), w, ("embed", "qkv", "heads", "head_dim"), name="qkv", **kw), "qkv", x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (R, 1, H, hd)
    zero = jnp.zeros((), jnp.int32)
    new = {}
    for name, value in (("k", k), ("v", v)):
        segs = list(cache[name])
        update = jnp.swapaxes(value, 1, 2).astype(segs[segment].dtype)
        segs[segment] = jax.lax.dynamic_update_slice(segs[segment], update, (zero, zero, offset, zero))
        new[name] = tuple(segs)
    # As cached_attention: float32 logits times scale/temp (the temperature never rounded to
    # the compute dtype), the same large negative fill, float32 softmax.
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    factor = jnp.asarray(1.0 / math.sqrt(hd), f32)
    if temp is not None:
        factor = factor / temp.astype(f32)[:, None, None, None]
    logits = jnp.concatenate(
        [jnp.einsum("bshd,bhtd->bhst", q, new["k"][i], preferred_element_type=f32) for i in range(segment + 1)],
        axis=-1) * factor
    visible = jnp.arange(logits.shape[-1]) <= pos
    logits = jnp.where(visible, logits, 0.7 * jnp.finfo(f32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(new["v"][0].dtype)
    out, start = None, 0
    for i in range(segment + 1):
        length = new["v"][i].shape[2]
        part = jnp.einsum("bhst,bhtd->bshd", probs[..., start:start + length], new["v"][i])
        out = part if out is None else out + part
        start += length
    h = h + apply(dense(w, w, ("heads", "head_dim", "embed"), axis=(-2, -1), name="attn_out", **kw),
                  "attn_out", out.astype(dtype))
    x = apply(layer_norm("mlp_norm", param_dtype, dtype, parent=None), "mlp_norm", h).astype(dtype)
    x = gelu(apply(dense(expansion * w, w, ("embed", "mlp"), name="mlp_in", **kw), "mlp_in", x))
    h = h + apply(dense(w, expansion * w, ("mlp", "embed"), name="mlp_out", **kw), "mlp_out", x)
    return h, new


def unstack_layers(params: Any) -> Any:
    """Parameters of scanned stacks (``layers/...``, stacked on axis 0) as unrolled stacks' (``layers_<i>/...``).

    Works on any parameter subtree (a block's, the whole model's); other entries pass
    through. Use it to run a ``scan_layers=True`` model's parameters through the same model
    with ``scan_layers=False``: the samplers do this once per block, outside their token
    loop, because XLA does not hoist the per-layer parameter slices out of a loop and would
    otherwise copy every weight matrix on every token step.
    """
    if not isinstance(params, dict) and not hasattr(params, "items"):
        return params
    out = {}
    for name, value in params.items():
        if name == "layers" and hasattr(value, "items"):
            stacked = nn.meta.unbox(value)
            num = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(num):
                out[f"layers_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
        else:
            out[name] = unstack_layers(value)
    return out


def remat_policy(name: str) -> Callable[..., bool]:
    """The ``jax.checkpoint`` policy of a remat policy name (:data:`REMAT_POLICIES`).

    ``"nothing"``: a layer keeps only its input; the backward pass reruns its whole forward
    pass. ``"matmuls"``: the outputs of the weight matmuls (qkv, attention out, MLP in and
    out: ``dot_general`` without batch dimensions) are kept too, so only attention, the
    norms and GELU are recomputed; the ``T×T`` attention products (batched over heads) are
    never kept.
    """
    policies = {"nothing": jax.checkpoint_policies.nothing_saveable,
                "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if name not in policies:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}; got {name!r}")
    return policies[name]


class LayerStack(nn.Module):
    """``num_layers`` Transformer layers, as a Python loop or one ``nn.scan`` (compile time flat in depth).

    With ``scan=True`` the parameters of all layers are stacked on a leading ``layers`` axis
    (parameter path ``layers/...``); otherwise each layer is ``layers_<i>/...``. The cache,
    when given, holds a tuple of per-layer buffers (see :func:`init_cache`) and needs
    ``scan=False``: sample a scanned model through an unscanned stack with
    :func:`unstack_layers` parameters, sliced once before the token loop (slicing inside
    it would copy every weight matrix on every step). The sampler's compile time grows with
    depth; the train step's does not.
    """

    channels: int
    num_layers: int
    head_dim: int = 64
    expansion: int = 4
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, h: jax.Array, cache: Cache | None, pos: jax.Array, temp: jax.Array
                 ) -> tuple[jax.Array, Cache | None]:
        layer_cls = TransformerLayer
        if self.remat:
            layer_cls = nn.remat(layer_cls, policy=remat_policy(self.remat_policy),
                                 prevent_cse=not self.scan)
        kw = dict(channels=self.channels, head_dim=self.head_dim, expansion=self.expansion,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
        if self.scan and cache is not None:
            raise ValueError("a scanned LayerStack has no cached (per-token) mode; run its parameters "
                             "through scan=False with layers.unstack_layers (TarFlow.reverse does)")
        if self.scan:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(name="layers", **kw)(h, cache, pos, temp)
        new = {"k": [], "v": []}
        for i in range(self.num_layers):
            layer_cache = None if cache is None else {n: cache[n][i] for n in new}
            h, layer_cache = layer_cls(name=f"layers_{i}", **kw)(h, layer_cache, pos, temp)
            if cache is not None:
                for n in new:
                    new[n].append(layer_cache[n])
        return h, (None if cache is None else {n: tuple(new[n]) for n in new})
