"""Reversing flow blocks: the cached sequential inverse, a Jacobi solver, guidance.

A block's inverse solves ``x[t+1] = z[t+1]·exp(a_t(x[:t+1])) + b_t(x[:t+1])`` token by
token (token 0 passes through). Every solver here works on one block's *permuted* tokens
through a ``predict(x_chunk, y, temp, cache, pos) -> (a, b, cache)`` callback (see
``MetaBlock.predict``) and runs entirely inside ``lax`` loops, so one compile serves every
token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax.layers import init_cache

SOLVERS = ("cached", "jacobi", "uncached")
JACOBI_INITS = ("z", "zeros")

Predict = Callable[..., tuple[jax.Array, jax.Array, Any]]


MIN_ATTN_TEMP = 1e-2  # attention temperatures below this (and NaN) are raised to it


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Guidance settings: weight, what to guide, unguided attention temperature, annealing.

    One rule for concrete and traced values: the weight ``w`` is applied as written,
    ``a ← a + w·(a − a_unguided)`` (negative ``w`` included: it moves the prediction toward
    the unguided one, ``w = −1`` gives exactly the unguided prediction and ``w < −1``
    extrapolates past it); only a concrete ``w == 0`` skips the unguided branch, which gives
    the same result. The unguided branch's attention temperature is used as
    ``max(attn_temp, MIN_ATTN_TEMP)`` (NaN counts as below), so a traced non-positive
    temperature cannot turn samples into NaN; ``TarFlow.reverse`` rejects concrete ones.
    """

    weight: Any = 0.0
    what: str = "ab"
    attn_temp: Any = 1.0
    annealed: bool = False

    @property
    def active(self) -> bool:
        """Whether the unguided branch must run (a traced weight always runs it)."""
        if isinstance(self.weight, jax.core.Tracer):
            return True
        return float(self.weight) != 0

    def temperature(self) -> jax.Array:
        """The unguided branch's attention temperature, float32, at least :data:`MIN_ATTN_TEMP`."""
        temp = jnp.asarray(self.attn_temp, jnp.float32)
        return jnp.where(temp >= MIN_ATTN_TEMP, temp, jnp.float32(MIN_ATTN_TEMP))

    def branches(self, y: jax.Array | None, batch: int) -> tuple[jax.Array | None, jax.Array]:
        """Labels and per-example attention temperatures for the (doubled) batch."""
        if not self.active:
            return y, jnp.ones((batch,), jnp.float32)
        y2 = None if y is None else jnp.concatenate([y, jnp.full_like(y, -1)])
        temp = jnp.concatenate([jnp.ones((batch,), jnp.float32),
                                jnp.broadcast_to(self.temperature(), (batch,))])
        return y2, temp

    def combine(self, a: jax.Array, b: jax.Array, positions: jax.Array, num_tokens: int
                ) -> tuple[jax.Array, jax.Array]:
        """Mixes the guided (first half) and unguided (second half) predictions.

        ``positions (S,)`` are the token indices whose outputs are in ``a, b (2B,S,D)``.
        """
        if not self.active:
            return a, b
        half = a.shape[0] // 2
        g = jnp.asarray(self.weight, jnp.float32)
        if self.annealed:
            g = g * (positions.astype(jnp.float32) + 1.0) / (num_tokens - 1)
        g = jnp.broadcast_to(g, positions.shape)[None, :, None]
        a_c, a_u, b_c, b_u = a[:half], a[half:], b[:half], b[half:]
        if "a" in self.what:
            a_c = a_c + g * (a_c - a_u)
        if "b" in self.what:
            b_c = b_c + g * (b_c - b_u)
        return a_c, b_c


@dataclasses.dataclass(frozen=True)
class JacobiPlan:
    """How the Jacobi inverse solves each block.

    Each of ``segments``, ``max_iters`` and ``init`` is one value for every block or a
    sequence with one value per block (block index as in the forward pass):
    * ``segments``: number of equal token segments solved in order (1 = plain Jacobi);
    * ``max_iters``: iteration cap per segment (``None``: the segment length, where the
      solution is exact);
    * ``tol``: stop a segment once the largest change between iterates is ``<= tol``;
    * ``init``: initial guess, ``"z"`` (the block's input) or ``"zeros"`` (after token 0);
    * ``sequential``: blocks solved by the exact cached token loop instead (the "tough"
      blocks of GS-Jacobi, where iterating costs more than the sequential pass).

    :meth:`from_forward` chooses all of these from a forward pass.
    """

    segments: int | Sequence[int] = 1
    max_iters: int | None | Sequence[int | None] = None
    tol: float = 1e-5
    init: str | Sequence[str] = "z"
    sequential: Sequence[int] = ()

    def for_block(self, k: int, num_tokens: int) -> tuple[int, int | None]:
        """``(segments, max_iters)`` of block ``k``, segments clipped to the ``T-1`` solved tokens."""
        pick = lambda v: v[k] if isinstance(v, (list, tuple)) else v
        return min(int(pick(self.segments)), num_tokens - 1), pick(self.max_iters)

    def init_for_block(self, k: int) -> str:
        """The initial guess of block ``k``."""
        return self.init[k] if isinstance(self.init, (list, tuple)) else self.init

    def check(self, num_blocks: int, num_tokens: int) -> None:
        """Raises a ValueError for a plan that does not fit the model."""
        for name in ("segments", "max_iters", "init"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != num_blocks:
                raise ValueError(f"JacobiPlan.{name} has {len(value)} entries; the model has "
                                 f"num_blocks={num_blocks} (give one per block or a single value)")
        for k in range(num_blocks):
            segments, max_iters = self.for_block(k, max(num_tokens, 2))
            if segments < 1:
                raise ValueError(f"JacobiPlan.segments must be >= 1; got {segments} for block {k}")
            if max_iters is not None and max_iters < 1:
                raise ValueError(f"JacobiPlan.max_iters must be >= 1 or None; got {max_iters} for block {k}")
            if self.init_for_block(k) not in JACOBI_INITS:
                raise ValueError(f"JacobiPlan.init must be one of {JACOBI_INITS}; got "
                                 f"{self.init_for_block(k)!r} for block {k}")
        bad = [k for k in self.sequential if not (isinstance(k, int) and 0 <= k < num_blocks)]
        if bad:
            raise ValueError(f"JacobiPlan.sequential names blocks {bad}; the model has blocks 0..{num_blocks - 1}")
        if not self.tol >= 0:
            raise ValueError(f"JacobiPlan.tol must be >= 0; got {self.tol}")

    @classmethod
    def from_forward(cls, model: Any, variables: Any, x: jax.Array, y: jax.Array | None = None, *,
                     tol: float = 1e-5, break_even_iters: float | None = None, margin: float = 1.5,
                     ) -> tuple["JacobiPlan", dict[str, Any]]:
        """A plan chosen from a forward pass (GS-Jacobi's convergence ranking and initial guess).

        The forward pass of ``x`` gives every block's true input and output. From that
        output, each block's Jacobi iteration is run as the solver would run it (unguided,
        one segment, stopping at ``tol``) from each initial guess; the iterations it takes
        rank the blocks (the convergence ranking) and pick each block's guess (the
        initial-guess metric: the one needing fewer iterations). A block whose count
        exceeds ``break_even_iters`` is "tough" and goes to the exact sequential loop
        (``sequential``); the others iterate, capped at ``margin`` times their count.

        Args:
          model: the :class:`~tarflow_jax.flow.TarFlow`.
          variables: its variables.
          x: images ``(B, H, W, C)`` in ``[-1, 1]`` representative of what is sampled (e.g.
            training images, or earlier samples); a handful suffices.
          y: their labels (conditional models), or ``None``.
          tol: the plan's stopping bound (largest change between iterates, pixels).
          break_even_iters: how many Jacobi iterations of a block cost as much as its
            sequential cached pass on the target machine and batch (``python -m
            tarflow_jax.tools.benchmark --what=sample,jacobi --jacobi_auto`` measures it);
            ``None``: never sequential.
          margin: the cap per block is ``ceil(margin · iterations)`` (at most ``T − 1``).

        Returns:
          ``(plan, report)``: the report holds, per block (forward-pass order), the
          ``iterations`` each initial guess needed (``{"z": [...], "zeros": [...]}``), the
          ``max_abs_error`` from the true block input after stopping, and the chosen
          ``init`` and ``sequential`` blocks.
        """
        counts, errors = {}, {}
        for init in JACOBI_INITS:
            n, err = model.apply(variables, x, y, tol, init, method=type(model).jacobi_probe)
            counts[init], errors[init] = np.asarray(n).tolist(), np.asarray(err).tolist()
        num_blocks, limit = len(counts["z"]), model.num_tokens - 1
        inits = [min(JACOBI_INITS, key=lambda i: (counts[i][k], JACOBI_INITS.index(i)))
                 for k in range(num_blocks)]
        best = [counts[inits[k]][k] for k in range(num_blocks)]
        sequential = tuple(k for k in range(num_blocks)
                           if break_even_iters is not None and best[k] > break_even_iters)
        caps = [min(limit, max(1, math.ceil(margin * n))) for n in best]
        plan = cls(segments=1, max_iters=tuple(caps), tol=tol, init=tuple(inits), sequential=sequential)
        report = {"iterations": counts, "max_abs_error": errors, "init": inits, "best_iterations": best,
                  "sequential": list(sequential), "break_even_iters": break_even_iters, "max_iters": caps}
        return plan, report


def segment_bounds(num_tokens: int, num_segments: int) -> list[int]:
    """Boundaries ``[p_0=0, ..., p_S=T-1]`` of ``S`` near-equal segments of the ``T-1`` solved positions.

    Segment ``s`` covers input positions ``p_s..p_{s+1}-1`` (their outputs are tokens
    ``p_s+1..p_{s+1}``).
    """
    return [round(i * (num_tokens - 1) / num_segments) for i in range(num_segments + 1)]


def _double(x: jax.Array, guide: Guidance) -> jax.Array:
    return jnp.concatenate([x, x]) if guide.active else x


def _empty_cache(guide: Guidance, batch: int, num_tokens: int, cache_shape: tuple[int, int, int],
                 dtype: Any) -> Any:
    """A zero key/value cache with a row per example of the (doubled, when guided) batch."""
    layers, heads, head_dim = cache_shape
    return init_cache(layers, 2 * batch if guide.active else batch, num_tokens, heads, head_dim, dtype)


def reverse_cached(decoder: Any, zp: jax.Array, y: jax.Array | None, guide: Guidance) -> jax.Array:
    """Exact sequential inverse of one block with a preallocated, segmented key/value cache.

    ``decoder`` is the block's :class:`~tarflow_jax.flow.BlockDecoder`. The guided and
    unguided branches run as one batch of ``2B`` rows. The token loop runs once per cache
    segment (``decoder.segments``): while a token's key/value goes into segment ``j`` it
    attends to segments ``0..j`` only, so a step reads only the part of the cache that can
    hold its prefix. Position and class terms are computed once, before the loop.
    """
    batch, num_tokens, _ = zp.shape
    y2, temp = guide.branches(y, batch)
    rows = temp.shape[0]
    table, cls = decoder.prepare(y2, rows)
    # Unguided rows divide their logits by 1: skip it. Guided rows keep the temperature
    # (the unguided branch's attn_temp; the guided branch's 1).
    temp = temp if guide.active else None
    cache = decoder.init_cache(rows)
    x = zp
    for segment, (start, end) in enumerate(decoder.segments):
        def step(t, carry, segment=segment, start=start):
            x, cache = carry
            xt = jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
            a, b, cache = decoder.step(_double(xt, guide), table, cls, temp, cache, t, segment, t - start)
            a, b = guide.combine(a, b, t[None], num_tokens)
            z_next = jax.lax.dynamic_slice_in_dim(zp, t + 1, 1, axis=1)
            x = jax.lax.dynamic_update_slice_in_dim(x, z_next * jnp.exp(a) + b, t + 1, axis=1)
            return x, cache

        x, cache = jax.lax.fori_loop(start, end, step, (x, cache))
    return x


def reverse_uncached(predict: Predict, zp: jax.Array, y: jax.Array | None, guide: Guidance
                     ) -> jax.Array:
    """Sequential inverse recomputing the whole sequence every step: the test oracle."""
    batch, num_tokens, _ = zp.shape
    y2, temp = guide.branches(y, batch)

    def step(t, x):
        a, b, _ = predict(_double(x, guide), y2, temp)
        a = jax.lax.dynamic_slice_in_dim(a, t, 1, axis=1)
        b = jax.lax.dynamic_slice_in_dim(b, t, 1, axis=1)
        a, b = guide.combine(a, b, t[None], num_tokens)
        z_next = jax.lax.dynamic_slice_in_dim(zp, t + 1, 1, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(x, z_next * jnp.exp(a) + b, t + 1, axis=1)

    return jax.lax.fori_loop(0, num_tokens - 1, step, zp)


def reverse_jacobi(predict: Predict, zp: jax.Array, y: jax.Array | None, guide: Guidance,
                   cache_shape: tuple[int, int, int], dtype: Any,
                   block_plan: tuple[int, int | None], tol: float = 1e-5, init: str = "z"
                   ) -> tuple[jax.Array, jax.Array]:
    """(Gauss-Seidel-)Jacobi inverse of one block; returns ``x`` and iterations per segment.

    The ``T-1`` input positions ``0..T-2`` (whose outputs give tokens ``1..T-1``) are split
    into ``segments`` contiguous pieces solved in order. Within a segment all tokens are
    updated in parallel from the previous iterate; earlier segments serve through the
    key/value cache. A segment of ``S`` positions is exact after ``S`` iterations.
    """
    batch, num_tokens, _ = zp.shape
    num_segments, max_iters = block_plan
    y2, temp = guide.branches(y, batch)
    cache = _empty_cache(guide, batch, num_tokens, cache_shape, dtype)
    x = zp if init == "z" else zp.at[:, 1:].set(0.0)
    bounds = segment_bounds(num_tokens, num_segments)
    iterations = []
    for p0, p1 in zip(bounds[:-1], bounds[1:]):
        size = p1 - p0
        cap = size if max_iters is None else max_iters
        positions = jnp.arange(p0, p1)
        z_seg = zp[:, p0 + 1:p1 + 1]

        def update(x, cache, p0=p0, p1=p1, positions=positions, z_seg=z_seg):
            a, b, cache = predict(_double(x[:, p0:p1], guide), y2, temp, cache, p0)
            a, b = guide.combine(a, b, positions, num_tokens)
            new = z_seg * jnp.exp(a) + b
            delta = jnp.max(jnp.abs(new - x[:, p0 + 1:p1 + 1]))
            return x.at[:, p0 + 1:p1 + 1].set(new), cache, delta

        def cond(carry, cap=cap):
            _, _, delta, i = carry
            return (i < cap) & (delta > tol)

        def body(carry, update=update):
            x, cache, _, i = carry
            x, cache, delta = update(x, cache)
            return x, cache, delta, i + 1

        x, cache, _, n = jax.lax.while_loop(cond, body, (x, cache, jnp.float32(jnp.inf), jnp.int32(0)))
        iterations.append(n)
    return x, jnp.stack(iterations)



def jacobi_probe(predict: Predict, xp_true: jax.Array, zp: jax.Array, y: jax.Array | None, tol: float,
                 init: str) -> tuple[jax.Array, jax.Array]:
    """Iterations plain Jacobi needs on one block whose true input is known, and its final error.

    ``xp_true``/``zp`` are the block's permuted input and output ``(B, T, D)`` from a
    forward pass; the iteration is the solver's (one segment, unguided, full sequence
    without cache, stop when the largest change is ``<= tol``, at most ``T - 1``).

    Returns:
      ``(iterations, max_abs_error)``: int32 and float32 scalars, the error being
      ``max |x − xp_true|`` at the stop.
    """
    batch, num_tokens, _ = zp.shape
    temp = jnp.ones((batch,), jnp.float32)
    x0 = zp if init == "z" else zp.at[:, 1:].set(0.0)

    def cond(carry):
        _, delta, i = carry
        return (i < num_tokens - 1) & (delta > tol)

    def body(carry):
        x, _, i = carry
        a, b, _ = predict(x[:, :-1], y, temp)
        new = zp[:, 1:] * jnp.exp(a) + b
        delta = jnp.max(jnp.abs(new - x[:, 1:]))
        return x.at[:, 1:].set(new), delta, i + 1

    x, _, n = jax.lax.while_loop(cond, body, (x0, jnp.float32(jnp.inf), jnp.int32(0)))
    return n, jnp.max(jnp.abs(x - xp_true))
