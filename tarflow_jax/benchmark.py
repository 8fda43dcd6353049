"""Benchmarks: train step, likelihood pass, cached and Jacobi sampling; compile time, memory, MFU.

``python -m tarflow_jax.benchmark --size=small --out=small.json`` measures, for a named
model size (:data:`SIZES`):

* ``train``: the jitted ``train.train_step`` (AdamW, uniform dequantization), images/s and
  the time to lower and compile it;
* ``forward``: the likelihood pass ``TarFlow.apply(variables, x)``, images/s;
* ``sample``: the cached sequential inverse (``solver="cached"``), images/s and ms per
  token step (one token of one flow block for the whole batch);
* ``jacobi``: the (Gauss-Seidel-)Jacobi inverse (``solver="jacobi"``) for each
  ``--jacobi_segments`` value, images/s, its iterations per block and segment, and the
  largest pixel difference to the cached inverse on the same latents.

Method: every function is jitted and compiled first (``jit(...).lower(...).compile()``,
timed as the compile time), run ``--warmup`` times untimed, then ``--steps`` times with
``jax.block_until_ready`` before each clock read; figures are medians. Parameters are a
random initialisation whose zero-initialised output heads are replaced by
``N(0, head_std²)`` draws, so every block really transforms (with zero heads the flow is
the identity and the Jacobi inverse converges after one iteration).

Model FLOPs are analytic (:func:`flop_counts`): ``2·(matmul parameters)·tokens`` plus,
per layer, ``4·T²·W`` for attention counted *full* (not halved for causality): XLA's
``dot_product_attention`` computes the whole masked ``T×T`` product. Training counts 3×
the forward pass (remat's recomputation is not model FLOPs). XLA's own
``cost_analysis()`` count is reported beside it (``xla_flops``); it counts a loop body
once, so it is low for scanned layers and for the samplers. MFU divides the achieved
model FLOP/s by ``--peak_tflops`` or the dense bf16 peak known for the device
(:data:`PEAK_TFLOPS`; none on CPU).

Memory: ``device.memory_stats()["peak_bytes_in_use"]`` where the backend has it (GPU,
TPU; the process-wide peak so far, so later phases include earlier ones; the table shows
it as "(dev)"), and always XLA's ``compiled.memory_analysis()`` of the phase: the table's
"(xla)" figure is arguments + outputs + temporaries − aliased (donated) bytes, an upper
bound on what the executable holds. The JSON also keeps each part and XLA's
``peak_memory_in_bytes`` (``xla_peak_bytes``; on CPU it only tracked the arguments).

``--compile_only`` lowers and compiles the train step from ``jax.ShapeDtypeStruct``s
(no parameters allocated), e.g. the ImageNet-64 model on a laptop:
``python -m tarflow_jax.benchmark --size=imagenet64 --batch=1 --what=train --compile_only --noscan``.

``--torch_compare`` times a PyTorch model with the same shapes as the flow's forward
pass (patchify, per block ``proj_in`` + positions, pre-norm layers with exact GELU and
causal SDPA, ``proj_out``, the affine map), interleaved with the JAX forward pass, and
reports the ratio of the medians. Torch is imported only then.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tarflow_jax import configlib, sampling
from tarflow_jax.flow import MetaBlock, TarFlow, patchify, unpatchify

# Model sizes. ``small`` is the CPU reference; the paper sizes follow configs/*.py.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": dict(img_size=8, in_channels=3, patch_size=2, channels=64, num_blocks=2,
                  layers_per_block=1, num_classes=0),
    "small": dict(img_size=32, in_channels=3, patch_size=2, channels=256, num_blocks=4,
                  layers_per_block=2, num_classes=0),
    "imagenet64": dict(img_size=64, in_channels=3, patch_size=2, channels=768, num_blocks=8,
                       layers_per_block=8, num_classes=0),
    "imagenet128": dict(img_size=128, in_channels=3, patch_size=4, channels=1024, num_blocks=8,
                        layers_per_block=8, num_classes=1000),
    "afhq256": dict(img_size=256, in_channels=3, patch_size=8, channels=768, num_blocks=8,
                    layers_per_block=8, num_classes=3),
}
DEFAULT_BATCH = {"smoke": 2, "small": 8, "imagenet64": 16, "imagenet128": 16, "afhq256": 16}
WHAT = ("train", "forward", "sample", "jacobi")

# Dense bf16 peak TFLOP/s per chip, matched (in order) against the lower-cased device_kind.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0), ("h100", 989.0), ("a100", 312.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("tpu v5", 459.0),
    ("v6 lite", 918.0), ("v6e", 918.0), ("tpu v4", 275.0),
)


# ----------------------------------------------------------------------------- helpers
def known_peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a known accelerator (``None`` for CPUs and unknown devices)."""
    kind = device_kind.lower()
    for key, peak in PEAK_TFLOPS:
        if key in kind:
            return peak
    return None


def make_model(size: str, dtype: str = "float32", scan: bool = True, remat: bool = False) -> TarFlow:
    return TarFlow(**SIZES[size], dtype=jnp.dtype(dtype), scan_layers=scan, remat=remat)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def random_variables(model: TarFlow, seed: int = 0, head_std: float = 0.05) -> dict[str, Any]:
    """Initialised (unboxed) variables with every block's zero output head drawn from N(0, head_std²)."""
    x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels))
    y = jnp.zeros((1,), jnp.int32) if model.num_classes else None

    @jax.jit
    def init(key):
        variables = nn.meta.unbox(model.init(key, x, y))
        params = dict(variables["params"])
        key = jax.random.fold_in(key, 1)
        for name in sorted(params):
            key, sub = jax.random.split(key)
            block = dict(params[name])
            head = dict(block["proj_out"])
            head["kernel"] = head_std * jax.random.normal(sub, head["kernel"].shape, head["kernel"].dtype)
            block["proj_out"] = head
            params[name] = block
        return {**variables, "params": params}

    return init(jax.random.key(seed))


def flop_counts(model: TarFlow, batch: int) -> dict[str, float]:
    """Analytic model FLOPs of one forward pass, one train step and one cached-inverse sample.

    Matmuls: ``2·(4 + 2e)·W²`` per token and layer (qkv, out, MLP in/out) and
    ``2·3·D·W`` per token and block (``proj_in``, ``proj_out`` with 2D outputs).
    Attention: ``4·T²·W`` per layer and example (QKᵀ and PV, the full masked square).
    The cached inverse runs ``T−1`` one-token steps per block, each attending to the whole
    ``T``-long cache buffer (masked): ``4·T·W`` per layer and step.
    """
    t, w, d, e = model.num_tokens, model.channels, model.token_dim, model.expansion
    layers, blocks = model.layers_per_block, model.num_blocks
    out_dim = 2 * d if model.nvp else d
    token_layer = 2 * (4 + 2 * e) * w * w
    token_block = 2 * (d * w + w * out_dim)
    forward = batch * blocks * (t * (layers * token_layer + token_block) + layers * 4 * t * t * w)
    sample = batch * blocks * (t - 1) * (layers * (token_layer + 4 * t * w) + token_block)
    return {"forward": float(forward), "train": 3.0 * forward, "sample": float(sample)}


def jacobi_flops(model: TarFlow, batch: int, segments: int, iterations: np.ndarray) -> float:
    """Analytic FLOPs of a Jacobi inverse that ran ``iterations[k, s]`` iterations (block k, segment s)."""
    t, w, d, e = model.num_tokens, model.channels, model.token_dim, model.expansion
    out_dim = 2 * d if model.nvp else d
    token_layer = 2 * (4 + 2 * e) * w * w
    token_block = 2 * (d * w + w * out_dim)
    total = 0.0
    for k in range(model.num_blocks):
        nseg = min(segments, t - 1)
        bounds = [round(i * (t - 1) / nseg) for i in range(nseg + 1)]
        for s, (p0, p1) in enumerate(zip(bounds[:-1], bounds[1:])):
            size = p1 - p0
            per_iter = size * (model.layers_per_block * (token_layer + 4 * t * w) + token_block)
            total += float(iterations[k, s]) * batch * per_iter
    return total


def _xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _memory(compiled: Any) -> dict[str, Any]:
    """XLA's memory analysis of one executable, and the device's peak where it reports one."""
    out: dict[str, Any] = {}
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    if m is not None:
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        out.update(xla_argument_bytes=int(m.argument_size_in_bytes), xla_output_bytes=int(m.output_size_in_bytes),
                   xla_temp_bytes=int(m.temp_size_in_bytes), xla_alias_bytes=int(m.alias_size_in_bytes),
                   xla_total_bytes=int(total))
        peak = getattr(m, "peak_memory_in_bytes", 0)
        if peak:
            out["xla_peak_bytes"] = int(peak)
    out["device_peak_bytes"] = device_peak_bytes()
    return out


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of device 0 (``None`` where the backend keeps no statistics, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def compile_timed(fn: Callable, *args: Any, **jit_kwargs: Any) -> tuple[Any, float, float]:
    """``(compiled, lower_s, compile_s)`` of ``jax.jit(fn, **jit_kwargs)`` for ``args`` (arrays or ShapeDtypeStructs)."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, **jit_kwargs).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def time_calls(call: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` calls after ``warmup`` untimed ones, blocking on each result."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return times


def _rate(model_flops: float, seconds: float, peak_tflops: float | None) -> dict[str, Any]:
    achieved = model_flops / seconds / 1e12
    return {"model_flops": model_flops, "model_tflops_per_s": achieved,
            "mfu": None if not peak_tflops else achieved / peak_tflops}


# ------------------------------------------------------------------------ the phases
def train_config(model: TarFlow, batch: int):
    """A trainer config for ``model``: uniform dequantization, AdamW, no EMA, label drop 0.1 if conditional."""
    c = configlib.base_config()
    m = {f: getattr(model, f) for f in ("img_size", "in_channels", "patch_size", "channels", "num_blocks",
                                         "layers_per_block", "num_classes", "nvp", "head_dim", "expansion",
                                         "scan_layers", "remat")}
    c.model.update(**m, dtype=jnp.dtype(model.dtype).name)
    c.dataset.update(image_size=model.img_size, channels=model.in_channels)
    c.noise = "uniform"
    c.label_drop = 0.1 if model.num_classes else 0.0
    c.batch_size = batch
    c.ema_decay = 0.0
    return c


def bench_train(model: TarFlow, batch: int, steps: int, warmup: int, compile_only: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """Compile time, memory and (unless ``compile_only``) throughput of one jitted AdamW step."""
    from tarflow_jax import train  # imports TensorFlow (input pipeline): only when timing training

    config = train_config(model, batch)
    tx, schedule = train.create_optimizer(config)
    init_fn = lambda r: nn.meta.unbox(train.init_state(r, model=model, tx=tx, config=config))
    step_fn = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config)
    shape = (batch, model.img_size, model.img_size, model.in_channels)
    batch_spec = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8)}
    if model.num_classes:
        batch_spec["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    rng = jax.random.PRNGKey(seed)
    if compile_only:
        state_spec = jax.eval_shape(init_fn, rng)
        compiled, lower_s, compile_s = compile_timed(step_fn, state_spec, batch_spec, donate_argnums=(0,))
        return {"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
                "xla_flops": _xla_flops(compiled), "memory": _memory(compiled), "compile_only": True}
    state = jax.jit(init_fn)(rng)
    np_rng = np.random.default_rng(seed)
    data = {"image": jnp.asarray(np_rng.integers(0, 256, shape, dtype=np.uint8))}
    if model.num_classes:
        data["label"] = jnp.asarray(np_rng.integers(0, model.num_classes, (batch,), dtype=np.int32))
    compiled, lower_s, compile_s = compile_timed(step_fn, state, data, donate_argnums=(0,))
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], data)
        return metrics["loss"]

    times = time_calls(call, steps, warmup)
    loss = float(call())
    return {"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
            "times_s": times, "loss": loss, "xla_flops": _xla_flops(compiled), "memory": _memory(compiled)}


def _labels(model: TarFlow, batch: int) -> jax.Array | None:
    return jnp.arange(batch, dtype=jnp.int32) % model.num_classes if model.num_classes else None


def bench_forward(model: TarFlow, variables: Any, batch: int, steps: int, warmup: int,
                  seed: int = 0) -> tuple[dict[str, Any], Callable[[], Any]]:
    x = jax.random.uniform(jax.random.key(seed + 10), (batch, model.img_size, model.img_size,
                                                      model.in_channels), minval=-1, maxval=1)
    y = _labels(model, batch)
    compiled, lower_s, compile_s = compile_timed(lambda v, x, y: model.apply(v, x, y), variables, x, y)
    call = lambda: compiled(variables, x, y)
    times = time_calls(call, steps, warmup)
    return ({"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
             "times_s": times, "xla_flops": _xla_flops(compiled), "memory": _memory(compiled)}, call)


def reverse_jacobi(module: TarFlow, z: jax.Array, y: jax.Array | None, plan: sampling.JacobiPlan,
                   guidance: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``TarFlow.reverse(solver="jacobi")`` that also returns the iterations ``(blocks, segments)``.

    Use as ``model.apply(variables, z, y, plan, method=reverse_jacobi)``: the library's
    reverse pass calls ``sampling.invert_jacobi`` the same way but discards the counts. The
    benchmark times the library's pass and runs this once, untimed, for the counts.
    """
    guide = sampling.Guidance(guidance)
    x = patchify(z.astype(jnp.float32), module.patch_size)
    if module.has_variable("prior", "var"):
        x = x * jnp.sqrt(module.get_variable("prior", "var"))
    params = module.variables["params"]
    cache_shape = (module.layers_per_block, module.channels // module.head_dim, module.head_dim)
    iterations = [None] * module.num_blocks
    for k in reversed(range(module.num_blocks)):
        blk = module.block(k, parent=None)
        predict = functools.partial(blk.apply, {"params": params[f"blocks_{k}"]}, method=MetaBlock.predict)
        xp, iterations[k] = sampling.invert_jacobi(
            predict, blk.permute(x), y, guide, cache_shape, module.dtype,
            plan.for_block(k, module.num_tokens), plan.tol, plan.init)
        x = blk.permute(xp)
    width = max(int(it.shape[0]) for it in iterations)
    iters = jnp.stack([jnp.pad(it, (0, width - it.shape[0])) for it in iterations])
    return unpatchify(x, module.img_size, module.patch_size, module.in_channels), iters


def bench_sample(model: TarFlow, variables: Any, batch: int, steps: int, warmup: int,
                 guidance: float = 0.0, seed: int = 0) -> tuple[dict[str, Any], jax.Array, jax.Array]:
    z = jax.random.normal(jax.random.key(seed + 20), (batch, model.img_size, model.img_size, model.in_channels))
    y = _labels(model, batch)
    fn = lambda v, z, y: model.apply(v, z, y, guidance=guidance, solver="cached", method=TarFlow.reverse)
    compiled, lower_s, compile_s = compile_timed(fn, variables, z, y)
    times = time_calls(lambda: compiled(variables, z, y), steps, warmup)
    x = compiled(variables, z, y)
    token_steps = model.num_blocks * (model.num_tokens - 1)
    return ({"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
             "times_s": times, "token_steps": token_steps,
             "ms_per_token_step": 1e3 * statistics.median(times) / token_steps,
             "finite": bool(jnp.all(jnp.isfinite(x))),
             "xla_flops": _xla_flops(compiled), "memory": _memory(compiled)}, z, x)


def bench_jacobi(model: TarFlow, variables: Any, z: jax.Array, reference: jax.Array | None,
                 plan: sampling.JacobiPlan, steps: int, warmup: int, guidance: float = 0.0
                 ) -> dict[str, Any]:
    """Times the library's ``reverse(solver="jacobi")``; counts iterations with :func:`reverse_jacobi` (untimed)."""
    y = _labels(model, z.shape[0])
    fn = lambda v, z, y: model.apply(v, z, y, guidance=guidance, solver="jacobi", jacobi=plan,
                                     method=TarFlow.reverse)
    compiled, lower_s, compile_s = compile_timed(fn, variables, z, y)
    times = time_calls(lambda: compiled(variables, z, y), steps, warmup)
    x = compiled(variables, z, y)
    counted, iters = jax.jit(lambda v, z, y: model.apply(v, z, y, plan, guidance, method=reverse_jacobi))(
        variables, z, y)
    iters = np.asarray(iters)
    out = {"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
           "times_s": times, "segments": plan.segments, "tol": plan.tol, "max_iters": plan.max_iters,
           "init": plan.init, "iterations": iters.tolist(), "total_iterations": int(iters.sum()),
           "sequential_steps_cached": model.num_blocks * (model.num_tokens - 1),
           "finite": bool(jnp.all(jnp.isfinite(x))), "xla_flops": _xla_flops(compiled),
           "memory": _memory(compiled),
           "iteration_count_path_max_abs_diff": float(jnp.max(jnp.abs(counted - x)))}
    if reference is not None:
        out["max_abs_diff_vs_cached"] = float(jnp.max(jnp.abs(x - reference)))
    return out


# ----------------------------------------------------------------------- torch model
def torch_forward_model(model: TarFlow, seed: int = 0):
    """A PyTorch module with the shapes and operations of ``model``'s forward pass (random weights).

    Not the reference implementation: an equivalent written for timing, float32, eval mode.
    """
    import torch
    from torch import nn as tnn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    w, hd, t, d, p = model.channels, model.head_dim, model.num_tokens, model.token_dim, model.patch_size

    class Layer(tnn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = tnn.LayerNorm(w), tnn.LayerNorm(w)
            self.qkv, self.out = tnn.Linear(w, 3 * w), tnn.Linear(w, w)
            self.mlp_in, self.mlp_out = tnn.Linear(w, model.expansion * w), tnn.Linear(model.expansion * w, w)

        def forward(self, h):
            b = h.shape[0]
            q, k, v = self.qkv(self.attn_norm(h)).reshape(b, t, 3, w // hd, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + self.out(a.transpose(1, 2).reshape(b, t, w))
            return h + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(h))))

    class Block(tnn.Module):
        def __init__(self, flip):
            super().__init__()
            self.flip = flip
            self.proj_in, self.proj_out = tnn.Linear(d, w), tnn.Linear(w, 2 * d)
            self.pos = tnn.Parameter(0.01 * torch.randn(t, w))
            self.layers = tnn.ModuleList(Layer() for _ in range(model.layers_per_block))
            tnn.init.normal_(self.proj_out.weight, std=0.02)

        def forward(self, x):
            if self.flip:
                x = x.flip(1)
            h = self.proj_in(x) + self.pos
            for layer in self.layers:
                h = layer(h)
            a, b = self.proj_out(h).float().chunk(2, dim=-1)
            a = F.pad(a[:, :-1], (0, 0, 1, 0))
            b = F.pad(b[:, :-1], (0, 0, 1, 0))
            z = (x - b) * torch.exp(-a)
            return (z.flip(1) if self.flip else z), -a.sum(dim=(1, 2))

    class Flow(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = tnn.ModuleList(Block(bool(k % 2)) for k in range(model.num_blocks))

        def forward(self, x):  # x (B, H, W, C)
            b, hh, ww, c = x.shape
            x = x.reshape(b, hh // p, p, ww // p, p, c).permute(0, 1, 3, 5, 2, 4).reshape(b, t, d)
            logdet = torch.zeros(b)
            for blk in self.blocks:
                x, ld = blk(x)
                logdet = logdet + ld
            return x, logdet

    return Flow().eval()


def torch_compare(model: TarFlow, jax_call: Callable[[], Any], batch: int, steps: int, warmup: int,
                  seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Interleaved medians of the JAX forward pass and the PyTorch equivalent (same batch and shapes)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    flow = torch_forward_model(model, seed)
    x = torch.rand(batch, model.img_size, model.img_size, model.in_channels) * 2 - 1

    def torch_call():
        with torch.inference_mode():
            return flow(x)

    for _ in range(warmup):
        torch_call()
        jax.block_until_ready(jax_call())
    jax_times, torch_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(jax_call())
        t1 = time.perf_counter()
        torch_call()
        t2 = time.perf_counter()
        jax_times.append(t1 - t0)
        torch_times.append(t2 - t1)
    jm, tm = statistics.median(jax_times), statistics.median(torch_times)
    return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "jax_times_s": jax_times, "torch_times_s": torch_times,
            "jax_images_per_s": batch / jm, "torch_images_per_s": batch / tm,
            "jax_time_over_torch_time": jm / tm}


# ------------------------------------------------------------------------------- main
def _bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=help)
    parser.add_argument(f"--no{name}", dest=name, action="store_false", help=f"disable --{name}")
    parser.set_defaults(**{name: default})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tarflow_jax.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=None, help="examples per step (default per size)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    _bool_flag(p, "scan", True, "nn.scan over the layers of a block (the trainer's default)")
    _bool_flag(p, "remat", False, "rematerialise each layer in the backward pass")
    p.add_argument("--what", default=",".join(WHAT), help=f"comma list of {','.join(WHAT)}")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for MFU (default: known per device)")
    _bool_flag(p, "compile_only", False, "train: only lower+compile from abstract shapes (no memory)")
    p.add_argument("--jacobi_segments", default="1,8", help="comma list; one Jacobi run per value")
    p.add_argument("--jacobi_tol", type=float, default=1e-5)
    p.add_argument("--jacobi_max_iters", type=int, default=None)
    p.add_argument("--jacobi_init", default="z", choices=sampling.JACOBI_INITS)
    p.add_argument("--guidance", type=float, default=0.0, help="sampling guidance weight (doubles the batch)")
    p.add_argument("--head_std", type=float, default=0.02, help="std of the randomised output heads")
    _bool_flag(p, "torch_compare", False, "time a PyTorch model of the same shapes (forward pass)")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch.set_num_threads for --torch_compare (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in args.what if w not in WHAT]
    if bad:
        p.error(f"--what: unknown {bad}; choose from {WHAT}")
    args.jacobi_segments = [int(s) for s in args.jacobi_segments.split(",") if s.strip()]
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.size]
    return args


def _summarise(entry: dict[str, Any], batch: int, flops: float | None, peak: float | None) -> None:
    times = entry.get("times_s")
    if not times:
        return
    med = statistics.median(times)
    entry["median_s"] = med
    entry["images_per_s"] = batch / med
    if flops:
        entry.update(_rate(flops, med, peak))


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark for command-line ``argv``; returns (and optionally writes) the results."""
    args = parse_args(argv)
    model = make_model(args.size, args.dtype, args.scan, args.remat)
    device = jax.devices()[0]
    peak, peak_source = args.peak_tflops, "--peak_tflops"
    if peak is None:
        peak, peak_source = known_peak_tflops(device.device_kind), "known device table (dense bf16)"
        if peak is None:
            peak_source = "none (unknown device, e.g. CPU; pass --peak_tflops)"
    flops = flop_counts(model, args.batch)
    result: dict[str, Any] = {
        "size": args.size, "model": {**SIZES[args.size], "num_tokens": model.num_tokens,
                                     "token_dim": model.token_dim},
        "batch": args.batch, "dtype": args.dtype, "scan": args.scan, "remat": args.remat,
        "steps": args.steps, "warmup": args.warmup,
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                   "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "flops_method": "analytic: 2*matmul_params*tokens + 4*T^2*W per layer (attention full, "
                        "not halved for causality); train = 3x forward",
        "analytic_flops": flops, "results": {},
    }
    res = result["results"]
    if "train" in args.what:
        res["train"] = bench_train(model, args.batch, args.steps, args.warmup, args.compile_only, args.seed)
        _summarise(res["train"], args.batch, flops["train"], peak)
    if args.compile_only:
        x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels))
        y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
        result["params"] = count_params(jax.eval_shape(lambda: model.init(jax.random.key(0), x, y))["params"])
    else:
        variables = random_variables(model, args.seed, args.head_std)
        result["params"] = count_params(variables["params"])
        if "forward" in args.what or args.torch_compare:
            res["forward"], fwd_call = bench_forward(model, variables, args.batch, args.steps, args.warmup,
                                                     args.seed)
            _summarise(res["forward"], args.batch, flops["forward"], peak)
            if args.torch_compare:
                result["torch_compare"] = torch_compare(model, fwd_call, args.batch, args.steps, args.warmup,
                                                        args.seed, args.torch_threads)
        rows = 2 * args.batch if args.guidance > 0 else args.batch
        z, reference = None, None
        if "sample" in args.what or "jacobi" in args.what:
            sample, z, reference = bench_sample(model, variables, args.batch, args.steps, args.warmup,
                                                args.guidance, args.seed)
            if "sample" in args.what:
                res["sample"] = sample
                _summarise(sample, args.batch, flop_counts(model, rows)["sample"], peak)
        if "jacobi" in args.what:
            for segments in args.jacobi_segments:
                plan = sampling.JacobiPlan(segments=segments, max_iters=args.jacobi_max_iters,
                                           tol=args.jacobi_tol, init=args.jacobi_init)
                entry = bench_jacobi(model, variables, z, reference, plan, args.steps, args.warmup, args.guidance)
                nseg = min(segments, model.num_tokens - 1)
                jf = jacobi_flops(model, rows, nseg, np.asarray(entry["iterations"]))
                _summarise(entry, args.batch, jf, peak)
                if "sample" in res and "median_s" in entry:
                    entry["speedup_vs_cached"] = res["sample"]["median_s"] / entry["median_s"]
                res[f"jacobi_s{segments}"] = entry
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mib(entry: dict[str, Any]) -> str:
    mem = entry.get("memory", {})
    if mem.get("device_peak_bytes"):
        return f"{mem['device_peak_bytes'] / 2**20:.0f} (dev)"
    xla = mem.get("xla_total_bytes")
    return "n/a" if xla is None else f"{xla / 2**20:.0f} (xla)"


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of one run."""
    head = (f"size={result['size']} batch={result['batch']} dtype={result['dtype']} scan={result['scan']} "
            f"remat={result['remat']} params={result.get('params', 0) / 1e6:.2f}M device={result['device']['kind']} "
            f"peak={_fmt(result['peak_tflops'], '.0f')} TFLOP/s")
    lines = [head, "",
             "| what | images/s | median s | compile s | memory MiB | model TFLOP/s | MFU | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in result["results"].items():
        notes = []
        if "ms_per_token_step" in e:
            notes.append(f"{e['ms_per_token_step']:.3f} ms/token step")
        if "total_iterations" in e:
            notes.append(f"{e['total_iterations']} iterations")
        if "max_abs_diff_vs_cached" in e:
            notes.append(f"max|x-x_cached|={e['max_abs_diff_vs_cached']:.2e}")
        if "speedup_vs_cached" in e:
            notes.append(f"{e['speedup_vs_cached']:.2f}x cached")
        if e.get("compile_only"):
            notes.append("compile only")
        mfu = e.get("mfu")
        lines.append(f"| {name} | {_fmt(e.get('images_per_s'), '.2f')} | {_fmt(e.get('median_s'), '.4f')} | "
                     f"{e['compile_total_s']:.2f} | {_mib(e)} | {_fmt(e.get('model_tflops_per_s'), '.4f')} | "
                     f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {'; '.join(notes)} |")
    tc = result.get("torch_compare")
    if tc:
        lines += ["", f"forward vs PyTorch {tc['torch_version']} ({tc['torch_threads']} threads), interleaved "
                      f"medians: JAX {tc['jax_images_per_s']:.2f} img/s, torch {tc['torch_images_per_s']:.2f} "
                      f"img/s, JAX time / torch time = {tc['jax_time_over_torch_time']:.2f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
