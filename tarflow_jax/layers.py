"""Transformer layers of a TarFlow block: causal attention with an explicit key/value cache.

Every layer runs in one of two modes with the same parameters:

* full sequence (``cache=None``): causal self-attention over all tokens, used by the
  likelihood pass and training;
* chunk at an offset (``cache`` given): the chunk's keys/values are written into a
  preallocated cache at ``pos`` with ``lax.dynamic_update_slice`` and the chunk attends
  to every cached token up to its own position. One token at a time is the cached
  sequential inverse; a longer chunk is one Gauss-Seidel-Jacobi segment.

Parameters carry logical axis names (``embed``, ``heads``, ``head_dim``, ``mlp``) that
``tarflow_jax.sharding`` maps onto a device mesh.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# The key/value cache of a layer stack: {"k": (L, B, T, H, hd), "v": (L, B, T, H, hd)}.
Cache = dict[str, jax.Array]


def torch_linear_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features, fan_in: int, names: tuple, *, axis=-1, dtype: Dtype, param_dtype: Dtype,
          name: str, kernel_init=None) -> nn.DenseGeneral:
    """A ``DenseGeneral`` with PyTorch's init and logical axis names (kernel names; bias names are the output's)."""
    out_ndim = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init or torch_linear_init(fan_in), names),
        bias_init=nn.with_logical_partitioning(torch_linear_init(fan_in), names[-out_ndim:]),
        name=name,
    )


def layer_norm(name: str, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm computed in float32 with the reference's epsilon and two-pass variance."""
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def constrain_activations(h: jax.Array) -> jax.Array:
    """Shards activations along the batch axis when a logical-axis mesh context is active."""
    return nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))


class TransformerLayer(nn.Module):
    """Pre-norm layer ``h += Attn(LN(h)); h += MLP(LN(h))`` with exact GELU and no dropout."""

    channels: int
    head_dim: int = 64
    expansion: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, cache: Cache | None, pos: jax.Array, temp: jax.Array
                 ) -> tuple[jax.Array, Cache | None]:
        """Applies the layer to ``h (B,S,W)`` at token offset ``pos``; returns ``(h, cache)``.

        ``temp (B,)`` divides each example's attention logits (attention-temperature guidance).
        """
        w, hd = self.channels, self.head_dim
        heads = w // hd
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x = layer_norm("attn_norm", self.param_dtype)(h).astype(self.dtype)
        qkv = dense((3, heads, hd), w, ("embed", "qkv", "heads", "head_dim"), name="qkv", **kw)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, S, H, hd)
        # Folding the per-example temperature into q keeps one scalar logit scale.
        q = q / temp.astype(q.dtype)[:, None, None, None]
        scale = 1.0 / math.sqrt(hd)
        if cache is None:
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
        else:
            k_all = lax_update(cache["k"], k, pos)
            v_all = lax_update(cache["v"], v, pos)
            cache = {"k": k_all, "v": v_all}
            s, t = q.shape[1], k_all.shape[1]
            visible = jnp.arange(t)[None, :] <= (pos + jnp.arange(s))[:, None]  # (S, T)
            out = jax.nn.dot_product_attention(q, k_all, v_all, scale=scale, mask=visible[None, None])
        h = h + dense(w, w, ("heads", "head_dim", "embed"), axis=(-2, -1), name="attn_out", **kw)(out)
        h = constrain_activations(h)

        x = layer_norm("mlp_norm", self.param_dtype)(h).astype(self.dtype)
        x = dense(self.expansion * w, w, ("embed", "mlp"), name="mlp_in", **kw)(x)
        x = nn.gelu(x, approximate=False)
        h = h + dense(w, self.expansion * w, ("mlp", "embed"), name="mlp_out", **kw)(x)
        return constrain_activations(h), cache


def lax_update(buffer: jax.Array, chunk: jax.Array, pos: jax.Array) -> jax.Array:
    """Writes ``chunk (B,S,...)`` into ``buffer (B,T,...)`` at token offset ``pos``."""
    start = (0, pos) + (0,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, chunk.astype(buffer.dtype), start)


class LayerStack(nn.Module):
    """``num_layers`` Transformer layers, as a Python loop or one ``nn.scan`` (compile time flat in depth).

    With ``scan=True`` the parameters of all layers are stacked on a leading ``layers`` axis
    (parameter path ``layers/...``); otherwise each layer is ``layers_<i>/...``. The cache,
    when given, always has the layer axis first.
    """

    channels: int
    num_layers: int
    head_dim: int = 64
    expansion: int = 4
    scan: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, cache: Cache | None, pos: jax.Array, temp: jax.Array
                 ) -> tuple[jax.Array, Cache | None]:
        layer_cls = TransformerLayer
        if self.remat:
            layer_cls = nn.remat(layer_cls, policy=jax.checkpoint_policies.nothing_saveable,
                                 prevent_cse=not self.scan)
        kw = dict(channels=self.channels, head_dim=self.head_dim, expansion=self.expansion,
                  dtype=self.dtype, param_dtype=self.param_dtype)
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
        for i in range(self.num_layers):
            layer_cache = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            h, layer_cache = layer_cls(name=f"layers_{i}", **kw)(h, layer_cache, pos, temp)
            if cache is not None:
                cache = {n: cache[n].at[i].set(layer_cache[n]) for n in ("k", "v")}
        return h, cache
