"""The TarFlow model: patchify, autoregressive flow blocks and their exact inverse.

Layout conventions: images are NHWC in ``[-1, 1]``; tokens are the non-overlapping
``p x p`` patches in raster order, each flattened channel-major (``c·p² + i·p + j``) like
the reference, so imported weights and the VP prior table need no permutation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import likelihood, sampling
from tarflow_jax.layers import (ATTENTIONS, REMAT_POLICIES, Cache, LayerStack, add_rows, decode_layer, dense,
                                float32_or_wider, init_segment_cache, unstack_layers)
from tarflow_jax.layers import cache_segments as _cache_segments

Dtype = Any
GUIDE_WHAT = ("a", "b", "ab")


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """``(B,H,W,C)`` images to ``(B,T,C·p²)`` tokens, channel-major inside a patch."""
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, img_size: int, patch_size: int, channels: int) -> jax.Array:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    p, n = patch_size, img_size // patch_size
    x = tokens.reshape(b, n, n, channels, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, img_size, img_size, channels)


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


class MetaBlock(nn.Module):
    """One autoregressive affine flow block over a (possibly flipped) token sequence."""

    num_tokens: int
    token_dim: int
    channels: int
    num_layers: int
    flip: bool
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing"
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.proj_in = dense(self.channels, self.token_dim, ("patch", "embed"), name="proj_in", **kw)
        table_init = nn.initializers.normal(stddev=0.01)
        self.pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(table_init, ("length", "embed")),
            (self.num_tokens, self.channels), self.param_dtype)
        if self.num_classes:
            self.class_embed = self.param(
                "class_embed", nn.with_logical_partitioning(table_init, ("classes", "embed")),
                (self.num_classes, self.channels), self.param_dtype)
        self.transformer = LayerStack(
            channels=self.channels, num_layers=self.num_layers, head_dim=self.head_dim,
            expansion=self.expansion, scan=self.scan_layers, remat=self.remat,
            remat_policy=self.remat_policy, attention=self.attention, **kw)
        out_dim = 2 * self.token_dim if self.nvp else self.token_dim
        self.proj_out = dense(out_dim, self.channels, ("embed", "patch"), name="proj_out",
                              kernel_init=nn.initializers.zeros, **kw)

    def permute(self, x: jax.Array) -> jax.Array:
        """The block's token order (its own inverse): identity, or reversed for odd blocks."""
        return x[:, ::-1] if self.flip else x

    def class_vector(self, y: jax.Array | None, batch: int) -> jax.Array:
        """Class embedding per example; label ``-1`` or ``None`` takes the mean of the rows.

        A label outside ``[-1, num_classes)`` (possible only for traced labels: concrete ones
        are rejected by ``TarFlow.check_labels``) gives a NaN vector, so that example's
        outputs are NaN: it never reads another class's row.
        """
        mean = jnp.mean(self.class_embed, axis=0)
        if y is None:
            return jnp.broadcast_to(mean, (batch, self.channels))
        rows = jnp.take(self.class_embed, jnp.clip(y, 0, self.num_classes - 1), axis=0)  # numpy params too
        vectors = jnp.where((y >= 0)[:, None], rows, mean)
        valid = (y >= -1) & (y < self.num_classes)
        return jnp.where(valid[:, None], vectors, jnp.nan)

    def predict(self, xp: jax.Array, y: jax.Array | None, temp: jax.Array,
                cache: Cache | None = None, pos: jax.Array | int = 0
                ) -> tuple[jax.Array, jax.Array, Cache | None]:
        """Flow parameters from permuted tokens ``xp (B,S,D)`` at positions ``pos..pos+S-1``.

        Returns ``(a, b)`` in ``float32_or_wider(dtype)`` where row ``s`` is the log-scale and shift of token
        ``pos+s+1`` (unshifted), and the updated cache.
        """
        s = xp.shape[1]
        pos_table = self.pos_embed[::-1] if self.flip else self.pos_embed
        pos_rows = jax.lax.dynamic_slice_in_dim(pos_table, pos, s, axis=0)
        # The residual stream is float32 whatever the compute dtype (as under the reference's
        # autocast: a bfloat16 Linear output plus the float32 position table is float32); the
        # layers cast only their matmul inputs to `dtype`.
        wide = float32_or_wider(self.dtype)
        h = add_rows(self.proj_in(xp.astype(self.dtype)).astype(wide), pos_rows.astype(wide))
        if self.num_classes:
            h = h + self.class_vector(y, xp.shape[0])[:, None].astype(wide)
        h, cache = self.transformer(h, cache, pos, temp)
        out = self.proj_out(h).astype(wide)
        if self.nvp:
            a, b = jnp.split(out, 2, axis=-1)
        else:
            a, b = jnp.zeros_like(out), out
        return a, b, cache

    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Forward map on tokens ``x (B,T,D)``: returns ``z`` and the block's total log|det| ``(B,)``."""
        xp = self.permute(x)
        temp = jnp.ones((x.shape[0],), jnp.float32)
        a, b, _ = self.predict(xp, y, temp)
        shift = lambda u: jnp.pad(u[:, :-1], ((0, 0), (1, 0), (0, 0)))
        a, b = shift(a), shift(b)
        z = (xp.astype(a.dtype) - b) * jnp.exp(-a)
        return self.permute(z), -jnp.sum(a, axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class BlockDecoder:
    """One flow block prepared for the cached sequential inverse, one token per step.

    ``block`` is an unbound :class:`MetaBlock` with unscanned layers and ``params`` its
    parameters in that layout (unboxed). Everything that does not change from token to
    token (the block's position table in its token order, the class rows) is computed once
    by :meth:`prepare`, outside the token loop; :meth:`step` runs one token through the
    block against a segmented key/value cache (see :func:`tarflow_jax.layers.decode_layer`).
    """

    block: MetaBlock
    params: Any
    segments: tuple[tuple[int, int], ...]

    def init_cache(self, rows: int) -> Cache:
        """A zero segmented cache for ``rows`` rows (batch, or both guidance branches)."""
        b = self.block
        return init_segment_cache(b.num_layers, rows, self.segments, b.channels // b.head_dim, b.head_dim,
                                  b.dtype)

    def prepare(self, y: jax.Array | None, rows: int) -> tuple[jax.Array, jax.Array | None]:
        """``(pos_table (T, W), class rows (R, 1, W) or None)`` in the block's token order."""
        b = self.block
        table = self.params["pos_embed"][::-1] if b.flip else self.params["pos_embed"]
        cls = None
        if b.num_classes:
            cls = b.apply({"params": self.params}, y, rows, method=MetaBlock.class_vector)[:, None]
        return table, cls

    def step(self, xt: jax.Array, table: jax.Array, cls: jax.Array | None, temp: jax.Array | None,
             cache: Cache, pos: jax.Array, segment: int, offset: jax.Array
             ) -> tuple[jax.Array, jax.Array, Cache]:
        """Float32 ``(a, b)`` ``(R, 1, D)`` predicted from token ``xt (R, 1, D)`` at ``pos``, and the cache.

        ``segment`` (static) and ``offset`` locate ``pos`` in the cache segments.
        """
        b, p = self.block, self.params
        kw = dict(dtype=b.dtype, param_dtype=b.param_dtype)
        unbound = dict(kw, parent=None)
        proj_in = dense(b.channels, b.token_dim, ("patch", "embed"), name="proj_in", **unbound)
        wide = float32_or_wider(b.dtype)  # the residual stream's type, as in MetaBlock.predict
        h = proj_in.apply({"params": p["proj_in"]}, xt.astype(b.dtype)).astype(wide)
        h = h + jax.lax.dynamic_slice_in_dim(table, pos, 1, axis=0).astype(wide)
        if cls is not None:
            h = h + cls.astype(wide)
        new = {"k": [], "v": []}
        for i in range(b.num_layers):
            h, layer_cache = decode_layer(
                p["transformer"][f"layers_{i}"], h, {n: cache[n][i] for n in new}, segment, offset, pos, temp,
                channels=b.channels, head_dim=b.head_dim, **kw)
            for n in new:
                new[n].append(layer_cache[n])
        out_dim = 2 * b.token_dim if b.nvp else b.token_dim
        proj_out = dense(out_dim, b.channels, ("embed", "patch"), name="proj_out", **unbound)
        out = proj_out.apply({"params": p["proj_out"]}, h).astype(wide)
        if b.nvp:
            a, bb = jnp.split(out, 2, axis=-1)
        else:
            a, bb = jnp.zeros_like(out), out
        return a, bb, {n: tuple(new[n]) for n in new}


class TarFlow(nn.Module):
    """TarFlow: ``num_blocks`` autoregressive Transformer flow blocks over image patches.

    Zhai et al., "Normalizing Flows are Capable Generative Models" (ICML 2025, arXiv
    2412.06329); the numerical reference is the authors' ``transformer_flow.Model``. ``apply(variables, x, y)`` maps
    images to latents (:meth:`__call__`); ``method=TarFlow.reverse`` inverts the flow
    (sampling); ``method=TarFlow.denoise`` takes one score step. Parameters are float32
    (``param_dtype``); ``dtype`` is the matmul compute type (``bfloat16`` allowed): as under
    the reference's bfloat16 autocast, only matmul inputs are cast to it, while the residual
    stream, LayerNorm, softmax, the attention temperature and the flow's affine maps (``exp``,
    shift, log-det sums) stay float32. With ``dtype=param_dtype=jnp.float64`` under
    ``jax.enable_x64`` the forward pass (not ``reverse``) runs wholly in float64, for
    numerical checks. The volume-preserving variant
    (``nvp=False``) keeps its prior variance in the ``prior`` collection
    (``variables["prior"]["var"]``, float32 ``(T, D)`` in token layout).

    Attributes:
      img_size: image height = width H, in pixels; a multiple of ``patch_size``.
      in_channels: image channels C (1 grey, 3 RGB).
      patch_size: side p of the square patches that form the tokens: T = (H/p)² tokens of
        D = C·p² values.
      channels: Transformer width W (a multiple of ``head_dim``); not the image's channels.
      num_blocks: flow blocks K; odd blocks run on the reversed token order.
      layers_per_block: Transformer layers L per block.
      num_classes: class-conditional with this many classes; 0 is unconditional.
      nvp: affine blocks (log-scale and shift); ``False``: volume preserving (shift only).
      head_dim: channels per attention head (64 in the reference).
      expansion: MLP hidden width / W.
      dtype: compute dtype of the matmuls.
      param_dtype: parameter dtype.
      scan_layers: stack a block's layers in one ``nn.scan`` (parameter path
        ``layers/...`` with a leading layer axis; compile time flat in depth); otherwise
        ``layers_<i>/...``.
      remat: rematerialise each layer in the backward pass, keeping what ``remat_policy`` says.
      remat_policy: ``"nothing"`` (each layer keeps only its input) or ``"matmuls"`` (also
        the outputs of its weight matmuls: less recomputation, more memory).
      attention: the full-sequence attention implementation: ``"xla"`` (any backend),
        ``"splash"`` (TPU Pallas kernel; a token count that is a multiple of 128) or
        ``"cudnn"`` (CUDA GPU; bfloat16/float16 ``dtype``). One the backend cannot run
        raises a ValueError when traced (``layers.check_attention``). Neither option
        changes the parameters.

    Raises:
      ValueError: at construction, for sizes that do not fit together (named in the message).
    """

    img_size: int
    in_channels: int = 3
    patch_size: int = 2
    channels: int = 768
    num_blocks: int = 8
    layers_per_block: int = 8
    num_classes: int = 0
    nvp: bool = True
    head_dim: int = 64
    expansion: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing"
    attention: str = "xla"

    def __post_init__(self):
        for field in ("img_size", "in_channels", "patch_size", "channels", "num_blocks", "layers_per_block",
                      "num_classes", "head_dim", "expansion"):
            value = getattr(self, field)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"TarFlow.{field} must be an int; got {value!r}")
        for field in ("nvp", "scan_layers", "remat"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise TypeError(f"TarFlow.{field} must be a bool; got {getattr(self, field)!r}")
        for field in ("dtype", "param_dtype"):
            try:
                dtype = jnp.dtype(getattr(self, field))
            except TypeError as e:
                raise TypeError(f"TarFlow.{field}={getattr(self, field)!r} is not a dtype") from e
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"TarFlow.{field} must be a floating-point dtype (float32, bfloat16, ...); "
                                 f"got {dtype}")
        checks = [
            (self.img_size > 0 and self.patch_size > 0 and self.img_size % self.patch_size == 0,
             f"img_size={self.img_size} must be a positive multiple of patch_size={self.patch_size}"),
            (self.channels > 0 and self.head_dim > 0 and self.channels % self.head_dim == 0,
             f"channels={self.channels} must be a positive multiple of head_dim={self.head_dim}"),
            (self.in_channels > 0, f"in_channels={self.in_channels} must be positive"),
            (self.num_blocks > 0 and self.layers_per_block > 0,
             f"num_blocks={self.num_blocks} and layers_per_block={self.layers_per_block} must be positive"),
            (self.num_classes >= 0, f"num_classes={self.num_classes} must be >= 0 (0: unconditional)"),
            (self.expansion > 0, f"expansion={self.expansion} must be positive (MLP width / channels)"),
            (self.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}; got {self.attention!r}"),
            (self.remat_policy in REMAT_POLICIES,
             f"remat_policy must be one of {REMAT_POLICIES}; got {self.remat_policy!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        super().__post_init__()

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def num_dims(self) -> int:
        """``N = H·W·C``, the dimension of one image."""
        return self.img_size * self.img_size * self.in_channels

    def block(self, k: int, **kwargs: Any) -> MetaBlock:
        """Flow block ``k`` (``parent=None`` gives an unbound copy for functional use)."""
        return MetaBlock(
            num_tokens=self.num_tokens, token_dim=self.token_dim, channels=self.channels,
            num_layers=self.layers_per_block, flip=bool(k % 2), head_dim=self.head_dim,
            expansion=self.expansion, nvp=self.nvp, num_classes=self.num_classes,
            scan_layers=self.scan_layers, remat=self.remat, remat_policy=self.remat_policy,
            attention=self.attention, dtype=self.dtype,
            param_dtype=self.param_dtype, **kwargs)

    def setup(self):
        self.blocks = [self.block(k, name=f"blocks_{k}") for k in range(self.num_blocks)]
        if self.is_initializing():  # the prior variance table; optional at apply time (ones)
            self.variable("prior", "var", jnp.ones, (self.num_tokens, self.token_dim), jnp.float32)

    # ------------------------------------------------------------------ checks
    def check_images(self, x: Any, what: str = "x", *, floating: bool = True) -> None:
        """Checks that ``x`` is a float ``(B, img_size, img_size, in_channels)`` batch, ``B >= 1``.

        Values are checked only when concrete (not under ``jit``): NaN or inf is refused,
        since every output would silently be NaN. ``floating=False`` checks the shape only
        (for integer pixel batches, whose dtype and range the caller checks).

        Raises:
          TypeError: not a floating-point array.
          ValueError: another shape, an empty batch, or (concrete) non-finite values.
        """
        shape = tuple(np.shape(x))
        expected = (self.img_size, self.img_size, self.in_channels)
        if len(shape) != 4:
            raise ValueError(f"{what} must be a 4-D batch of images (B, H, W, C) = (B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}); got shape {shape}")
        if shape[1:] != expected:
            raise ValueError(f"{what} has image shape {shape[1:]} but this model expects (H, W, C) = "
                             f"{expected} (img_size={self.img_size}, in_channels={self.in_channels})")
        if shape[0] < 1:
            raise ValueError(f"{what} holds no images (batch size 0); pass at least one")
        if not floating:
            return
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{what} must be floating-point images in [-1, 1]; got dtype {dtype} (integer "
                            f"pixels: tarflow_jax.likelihood.dequantize or to_unit_range first)")
        if _is_concrete(x) and not np.isfinite(np.asarray(x, np.float32)).all():
            raise ValueError(f"{what} holds NaN or inf values; every output would be NaN")

    def check_labels(self, y: Any, batch: int) -> jax.Array | None:
        """The labels as an array (a list or numpy array becomes a ``jax.Array``), or ``None``.

        Raises:
          ValueError: labels that do not fit the model (values checked when concrete).
        """
        if y is None:
            return None
        if not self.num_classes:
            raise ValueError("labels y were given to an unconditional model (num_classes=0); pass y=None")
        if tuple(np.shape(y)) != (batch,):
            raise ValueError(f"labels y must have shape (B,) = ({batch},); got {tuple(np.shape(y))}")
        dtype = np.asarray(y).dtype if _is_concrete(y) else y.dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"labels y must be integers; got dtype {dtype}")
        if _is_concrete(y) and np.size(y):
            low, high = int(np.min(np.asarray(y))), int(np.max(np.asarray(y)))
            if low < -1 or high >= self.num_classes:
                raise ValueError(f"labels y must be in [-1, num_classes={self.num_classes}) (-1: no label); "
                                 f"got values from {low} to {high}")
        return jnp.asarray(y)

    # ----------------------------------------------------------------- forward
    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The forward (likelihood) direction: images to latents and the log-determinant.

        Per block ``z = (x − b)·exp(−a)`` on the shifted token sequence, log|det| ``−Σ a``
        (reference ``transformer_flow.MetaBlock.forward``); the blocks' log-dets add up.

        Args:
          x: images, float ``(B, H, W, C)`` in ``[-1, 1]`` (dequantized or noised).
          y: int ``(B,)`` labels (``-1``: no label), or ``None``.

        Returns:
          ``(z, logdet)``: latents float32 ``(B, H, W, C)`` and the total log|det ∂z/∂x|
          per example, float32 ``(B,)`` in nats (not divided by the N = H·W·C dims).

        Raises:
          ValueError: ``x`` is not ``(B, img_size, img_size, in_channels)`` with ``B >= 1``,
            holds NaN/inf (checked when concrete), or ``y`` does not fit (given to an
            unconditional model, not ``(B,)`` integers, a concrete label outside
            ``[-1, num_classes)``; traced ones give NaN for that example, see
            ``MetaBlock.class_vector``).
          TypeError: ``x`` is not floating point.
        """
        self.check_images(x)
        y = self.check_labels(y, x.shape[0])
        wide = float32_or_wider(self.dtype)  # float32 (float64 only for float64 checks)
        h = patchify(x.astype(wide), self.patch_size)
        logdet = jnp.zeros((x.shape[0],), wide)
        for blk in self.blocks:
            h, block_logdet = blk(h, y)
            logdet = logdet + block_logdet
        return unpatchify(h, self.img_size, self.patch_size, self.in_channels), logdet

    # ----------------------------------------------------------------- inverse
    def reverse(self, z: jax.Array, y: jax.Array | None = None, guidance: float = 0.0,
                guide_what: str = "ab", attn_temp: float = 1.0, annealed_guidance: bool = False,
                solver: str = "cached", jacobi: sampling.JacobiPlan | None = None,
                return_iterations: bool = False, cache_segments: int | None = None
                ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Inverts the flow: latents to images (sampling when ``z`` is standard normal noise).

        Each block's inverse solves ``x[t+1] = z[t+1]·exp(a_t(x[:t+1])) + b_t(x[:t+1])`` token
        by token (reference ``transformer_flow.MetaBlock.reverse``). Guidance mixes a
        second, unguided prediction (label dropped, attention logits divided by
        ``attn_temp``) into ``a`` and/or ``b``: ``a ← a + w·(a − a_unguided)`` with
        ``w = guidance``, or ``w = guidance·(t+1)/(T−1)`` at token ``t`` when annealed
        (reference ``transformer_flow.Model.reverse``). The same rule holds for concrete
        and traced (jitted) values, negative ones included: ``w < 0`` moves toward the
        unguided prediction (``w = −1`` is exactly the unguided model), and only a concrete
        ``0`` skips the unguided branch (same result, half the work).

        Args:
          z: latents, float ``(B, H, W, C)`` (standard normal for sampling; a VP model
            scales them by the square root of its prior variance first).
          y: int ``(B,)`` class labels, ``-1`` for "no label"; ``None`` for all unlabelled
            or an unconditional model.
          guidance: guidance weight w, finite (0: none; any other value, or a traced one,
            doubles the batch internally).
          guide_what: which flow outputs are guided: ``"a"``, ``"b"`` or ``"ab"``.
          attn_temp: attention temperature of the unguided branch (> 0), used as
            ``max(attn_temp, sampling.MIN_ATTN_TEMP)``; a traced value ``<= 0`` or NaN thus
            gives the temperature ``MIN_ATTN_TEMP`` (near-hard attention), never NaN samples.
          annealed_guidance: ramp the weight linearly over the tokens.
          solver: ``"cached"`` (exact sequential inverse with a key/value cache),
            ``"jacobi"`` (parallel Gauss-Seidel-Jacobi, configured by ``jacobi``) or
            ``"uncached"`` (recomputes the whole prefix every step: a slow test oracle).
          jacobi: the Jacobi plan (default ``JacobiPlan()``: one segment, tol 1e-5).
          return_iterations: also return the Jacobi iterations run (``solver="jacobi"``).
          cache_segments: (cached solver) split the key/value cache into this many token
            segments, so that a token step reads only the segments its prefix can occupy
            (each segment is one more compiled token loop per block). ``None``: automatic
            (:func:`tarflow_jax.layers.cache_segments`); ``1``: one buffer.

        Returns:
          Images float32 ``(B, H, W, C)`` (in ``[-1, 1]`` for a trained model; not clipped).
          With ``return_iterations``, also int32 ``(num_blocks, S)``: the iterations run
          by block ``k`` (forward-pass index) on segment ``s``, ``S`` the largest segment
          count of any block (shorter rows padded with 0).

        Raises:
          ValueError: ``z`` is not ``(B, img_size, img_size, in_channels)``; ``y`` is given
            to an unconditional model, is not ``(B,)`` integers, or holds a label
            ``>= num_classes``; ``guide_what``, ``solver`` or ``jacobi`` is invalid, or
            ``return_iterations`` is set without the Jacobi solver; a concrete ``attn_temp <= 0``
            (or NaN) or non-finite ``guidance``; ``cache_segments`` is not a positive int.
        """
        self.check_images(z, "z")
        y = self.check_labels(y, z.shape[0])
        if guide_what not in GUIDE_WHAT:
            raise ValueError(f"guide_what must be one of {GUIDE_WHAT}; got {guide_what!r}")
        if solver not in sampling.SOLVERS:
            raise ValueError(f"solver must be one of {sampling.SOLVERS}; got {solver!r}")
        if return_iterations and solver != "jacobi":
            raise ValueError(f"return_iterations counts Jacobi iterations; pass solver='jacobi' "
                             f"(got solver={solver!r})")
        for name, value in (("guidance", guidance), ("attn_temp", attn_temp)):
            if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
                raise ValueError(f"{name} must be a real scalar; got {value!r}")
        if _is_concrete(attn_temp) and not float(attn_temp) > 0:
            raise ValueError(f"attn_temp must be > 0; got {attn_temp}")
        if _is_concrete(guidance) and not np.isfinite(float(guidance)):
            raise ValueError(f"guidance must be a finite number; got {guidance}")
        if cache_segments is not None and not (isinstance(cache_segments, int) and cache_segments >= 1):
            raise ValueError(f"cache_segments must be a positive int or None; got {cache_segments!r}")
        plan = jacobi or sampling.JacobiPlan()
        plan.check(self.num_blocks, self.num_tokens)
        guide = sampling.Guidance(guidance, guide_what, attn_temp, annealed_guidance)

        x = patchify(z.astype(jnp.float32), self.patch_size)
        if self.has_variable("prior", "var"):
            x = x * jnp.sqrt(self.get_variable("prior", "var"))
        params = self.variables["params"]
        cache_shape = (self.layers_per_block, self.channels // self.head_dim, self.head_dim)
        iterations = [None] * self.num_blocks
        for k in reversed(range(self.num_blocks)):
            blk = self.block(k, parent=None)
            block_params = params[f"blocks_{k}"]
            if self.scan_layers:  # slice the stacked layers once here, not on every token step
                blk, block_params = blk.clone(scan_layers=False), unstack_layers(block_params)
            predict = functools.partial(blk.apply, {"params": block_params}, method=MetaBlock.predict)
            xp = blk.permute(x)
            if solver == "cached" or (solver == "jacobi" and k in plan.sequential):
                segments = _cache_segments(self.num_tokens, cache_segments,
                                           self.num_blocks * self.layers_per_block)
                decoder = BlockDecoder(blk, nn.meta.unbox(block_params), segments)
                xp = sampling.reverse_cached(decoder, xp, y, guide)
                iterations[k] = jnp.zeros((1,), jnp.int32)  # sequential: no Jacobi iterations
            elif solver == "uncached":
                xp = sampling.reverse_uncached(predict, xp, y, guide)
            else:
                xp, iterations[k] = sampling.reverse_jacobi(
                    predict, xp, y, guide, cache_shape, self.dtype, plan.for_block(k, self.num_tokens),
                    plan.tol, plan.init_for_block(k))
            x = blk.permute(xp)
        x = unpatchify(x, self.img_size, self.patch_size, self.in_channels)
        if not return_iterations:
            return x
        width = max(int(it.shape[0]) for it in iterations)
        return x, jnp.stack([jnp.pad(it, (0, width - it.shape[0])) for it in iterations])

    def jacobi_probe(self, x: jax.Array, y: jax.Array | None, tol: float, init: str
                     ) -> tuple[jax.Array, jax.Array]:
        """Per block, the Jacobi iterations its inverse needs on the forward pass of ``x``.

        Runs the forward pass, then for every block the plain (one-segment, unguided) Jacobi
        iteration from guess ``init`` toward that block's known input (see
        :func:`tarflow_jax.sampling.jacobi_probe`). :meth:`JacobiPlan.from_forward
        <tarflow_jax.sampling.JacobiPlan.from_forward>` ranks the blocks with it.

        Args:
          x: images ``(B, H, W, C)`` in ``[-1, 1]``.
          y: int ``(B,)`` labels or ``None``.
          tol: stopping bound on the largest change between iterates.
          init: initial guess, ``"z"`` or ``"zeros"``.

        Returns:
          ``(iterations, max_abs_error)``: int32 ``(num_blocks,)`` and float32
          ``(num_blocks,)`` in forward-pass block order.
        """
        self.check_images(x)
        y = self.check_labels(y, x.shape[0])
        if init not in sampling.JACOBI_INITS:
            raise ValueError(f"init must be one of {sampling.JACOBI_INITS}; got {init!r}")
        wide = float32_or_wider(self.dtype)
        h = patchify(x.astype(wide), self.patch_size)
        params = self.variables["params"]
        counts, errors = [], []
        for k, blk in enumerate(self.blocks):
            z, _ = blk(h, y)
            unbound = self.block(k, parent=None)
            predict = functools.partial(unbound.apply, {"params": params[f"blocks_{k}"]}, method=MetaBlock.predict)
            n, err = sampling.jacobi_probe(predict, blk.permute(h), blk.permute(z), y, tol, init)
            counts.append(n)
            errors.append(err)
            h = z
        return jnp.stack(counts), jnp.stack(errors)

    def denoise(self, x: jax.Array, y: jax.Array | None, noise_std: float,
                step_scale: float = 1.0) -> jax.Array:
        """One score step ``x + step_scale·σ²·∇ₓ log p(x|y)``, clipped to ``[-1, 1]``.

        Tweedie's formula for data seen with Gaussian noise of std σ (the paper's
        denoising step; the reference's ``sample.ipynb`` takes it as
        ``x − B·N·σ²·∇ₓ loss``). The score is the gradient of the flow's
        exact log-likelihood (:func:`tarflow_jax.likelihood.log_prob`), unguided, with the
        given labels.

        Args:
          x: noisy images, float ``(B, H, W, C)`` in about ``[-1, 1]``.
          y: int ``(B,)`` labels (``-1``: no label) or ``None``.
          noise_std: σ, the std of the Gaussian noise the model was trained with (in
            ``[-1, 1]`` pixel units).
          step_scale: multiplies the step (1: Tweedie's estimate).

        Returns:
          Denoised images float32 ``(B, H, W, C)`` in ``[-1, 1]``.

        Raises:
          ValueError: ``x`` or ``y`` does not fit the model (as for :meth:`__call__`); a
            concrete ``noise_std`` that is negative or not finite, or a non-finite ``step_scale``.
          TypeError: ``x`` is not floating point.
        """
        self.check_images(x)
        y = self.check_labels(y, x.shape[0])
        for name, value in (("noise_std", noise_std), ("step_scale", step_scale)):
            if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
                raise ValueError(f"{name} must be a real scalar; got {value!r}")
            if _is_concrete(value) and not np.isfinite(float(value)):
                raise ValueError(f"{name} must be finite; got {value}")
        if _is_concrete(noise_std) and float(noise_std) < 0:
            raise ValueError(f"noise_std must be >= 0 (a standard deviation); got {noise_std}")
        model, variables = self.clone(parent=None), self.variables
        score = jax.grad(lambda u: jnp.sum(likelihood.log_prob(model, variables, u, y)))(x)
        return jnp.clip(x + step_scale * noise_std ** 2 * score, -1.0, 1.0)

    def dummy_inputs(self) -> tuple[jax.Array, jax.Array | None]:
        """A ``(1, H, W, C)`` float32 zero image and, for conditional models, a ``(1,)`` int32 label: for ``init``."""
        x = jnp.zeros((1, self.img_size, self.img_size, self.in_channels), jnp.float32)
        return x, (jnp.zeros((1,), jnp.int32) if self.num_classes else None)


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays, ``jax.ShapeDtypeStruct`` s or boxed (partitioned) parameters."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))
