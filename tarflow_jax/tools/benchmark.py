"""Benchmarks: train step, likelihood pass, cached and Jacobi sampling; compile time, memory, MFU.

``python -m tarflow_jax.tools.benchmark --size=small --out=small.json`` measures, for a named
model size (:data:`SIZES`):

* ``train``: the jitted ``train.train_step`` (AdamW, uniform dequantization), images/s and
  the time to lower and compile it;
* ``forward``: the likelihood pass ``TarFlow.apply(variables, x)``, images/s;
* ``sample``: the cached sequential inverse (``solver="cached"``), images/s and ms per
  token step (one token of one flow block for the whole batch);
* ``jacobi``: the (Gauss-Seidel-)Jacobi inverse (``solver="jacobi"``) for each
  ``--jacobi_segments`` value, images/s, its iterations per block and segment, and the
  largest pixel difference to the cached inverse on the same latents (the counts come
  from the same call, ``TarFlow.reverse(..., return_iterations=True)``).

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
``python -m tarflow_jax.tools.benchmark --size=imagenet64 --batch=1 --what=train --compile_only --noscan``.

``--reference=PATH`` instead times the authors' PyTorch ``Model`` (``PATH`` holds their
``transformer_flow.py``, from the public apple/ml-tarflow repository) side by side with
ours on the same weights and inputs: train step, forward pass and ``reverse``,
alternating, medians, ratio = their time ÷ ours (see
:mod:`tarflow_jax.tools.benchmark_reference`). Torch is imported only then.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from tarflow_jax import configlib, sampling, train, train_state, xla_cpu
from tarflow_jax.flow import TarFlow, count_params
from tarflow_jax.tools import cli
from tarflow_jax.tools import benchmark_reference
from tarflow_jax.tools.benchmark_reference import REFERENCE_WHAT

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


def random_variables(model: TarFlow, seed: int = 0, head_std: float = 0.05) -> dict[str, Any]:
    """Initialised (unboxed) variables with every block's zero output head drawn from N(0, head_std²)."""
    @jax.jit
    def init(key):
        variables = nn.meta.unbox(model.init(key, *model.dummy_inputs()))
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


def jacobi_flops(model: TarFlow, batch: int, segments: int, iterations: np.ndarray,
                 sequential: Sequence[int] = ()) -> float:
    """Analytic FLOPs of a Jacobi inverse that ran ``iterations[k, s]`` iterations (block k, segment s).

    Blocks in ``sequential`` ran the cached loop instead: one block's share of
    ``flop_counts(...)["sample"]``.
    """
    t, w, d, e = model.num_tokens, model.channels, model.token_dim, model.expansion
    out_dim = 2 * d if model.nvp else d
    token_layer = 2 * (4 + 2 * e) * w * w
    token_block = 2 * (d * w + w * out_dim)
    total = 0.0
    for k in range(model.num_blocks):
        if k in sequential:
            total += flop_counts(model, batch)["sample"] / model.num_blocks
            continue
        bounds = sampling.segment_bounds(t, min(segments, t - 1))
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
    m = {f: getattr(model, f) for f in ("patch_size", "num_blocks", "layers_per_block", "num_classes", "nvp",
                                         "head_dim", "expansion", "scan_layers", "remat")}
    c.model.update(**m, width=model.channels, dtype=jnp.dtype(model.dtype).name)
    c.dataset.update(image_size=model.img_size, channels=model.in_channels)
    c.noise = "uniform"
    c.label_drop = 0.1 if model.num_classes else 0.0
    c.batch_size = batch
    c.ema_decay = 0.0
    return c


def bench_train(model: TarFlow, batch: int, steps: int, warmup: int, compile_only: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """Compile time, memory and (unless ``compile_only``) throughput of one jitted AdamW step."""
    config = train_config(model, batch)
    tx, schedule = train_state.create_optimizer(config)
    init_fn = lambda r: nn.meta.unbox(train_state.init_state(r, model=model, tx=tx, config=config))
    step_fn = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config)
    shape = (batch, model.img_size, model.img_size, model.in_channels)
    batch_spec = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8)}
    if model.num_classes:
        batch_spec["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    rng = jax.random.PRNGKey(seed)
    if compile_only:
        state_spec = jax.eval_shape(init_fn, rng)
        compiled, lower_s, compile_s = compile_timed(step_fn, state_spec, batch_spec, donate_argnums=(0,),
                                                     compiler_options=xla_cpu.compiler_options("train"))
        return {"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
                "xla_flops": _xla_flops(compiled), "memory": _memory(compiled), "compile_only": True}
    state = jax.jit(init_fn)(rng)
    np_rng = np.random.default_rng(seed)
    data = {"image": jnp.asarray(np_rng.integers(0, 256, shape, dtype=np.uint8))}
    if model.num_classes:
        data["label"] = jnp.asarray(np_rng.integers(0, model.num_classes, (batch,), dtype=np.int32))
    compiled, lower_s, compile_s = compile_timed(step_fn, state, data, donate_argnums=(0,),
                                                 compiler_options=xla_cpu.compiler_options("train"))
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
    compiled, lower_s, compile_s = compile_timed(benchmark_reference.forward_pass(model), variables, x, y,
                                                 compiler_options=xla_cpu.compiler_options("forward"))
    call = lambda: compiled(variables, x, y)
    times = time_calls(call, steps, warmup)
    return ({"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
             "times_s": times, "xla_flops": _xla_flops(compiled), "memory": _memory(compiled)}, call)


def bench_sample(model: TarFlow, variables: Any, batch: int, steps: int, warmup: int,
                 guidance: float = 0.0, seed: int = 0) -> tuple[dict[str, Any], jax.Array, jax.Array]:
    z = jax.random.normal(jax.random.key(seed + 20), (batch, model.img_size, model.img_size, model.in_channels))
    y = _labels(model, batch)
    fn = lambda v, z, y: model.apply(v, z, y, guidance=guidance, solver="cached", method=TarFlow.reverse)
    compiled, lower_s, compile_s = compile_timed(fn, variables, z, y,
                                                 compiler_options=xla_cpu.compiler_options("sample"))
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
    """Times the library's ``reverse(solver="jacobi", return_iterations=True)`` and reports its iteration counts."""
    y = _labels(model, z.shape[0])
    fn = lambda v, z, y: model.apply(v, z, y, guidance=guidance, solver="jacobi", jacobi=plan,
                                     return_iterations=True, method=TarFlow.reverse)
    compiled, lower_s, compile_s = compile_timed(fn, variables, z, y)
    times = time_calls(lambda: compiled(variables, z, y), steps, warmup)
    x, iters = compiled(variables, z, y)
    iters = np.asarray(iters)
    out = {"lower_s": lower_s, "compile_s": compile_s, "compile_total_s": lower_s + compile_s,
           "times_s": times, "segments": plan.segments, "tol": plan.tol, "max_iters": plan.max_iters,
           "init": plan.init, "iterations": iters.tolist(), "total_iterations": int(iters.sum()),
           "sequential_steps_cached": model.num_blocks * (model.num_tokens - 1),
           "finite": bool(jnp.all(jnp.isfinite(x))), "xla_flops": _xla_flops(compiled),
           "memory": _memory(compiled)}
    if reference is not None:
        out["max_abs_diff_vs_cached"] = float(jnp.max(jnp.abs(x - reference)))
    return out


def bench_jacobi_auto(model: TarFlow, variables: Any, z: jax.Array, reference: jax.Array,
                      sample: dict[str, Any], args: types.SimpleNamespace) -> dict[str, Any]:
    """:meth:`JacobiPlan.from_forward` on this machine and batch, then timed like any plan.

    The break-even (how many Jacobi iterations of a block cost one sequential cached pass
    of it) is measured: the cached inverse's median time over that of a Jacobi inverse
    capped at one iteration per block. The blocks are ranked on a forward pass of other
    samples (the cached inverse of other latents), not of the timed ones.
    """
    one = bench_jacobi(model, variables, z, None, sampling.JacobiPlan(max_iters=1, tol=0.0), args.steps,
                       args.warmup, args.guidance)
    break_even = statistics.median(sample["times_s"]) / statistics.median(one["times_s"])
    y = _labels(model, z.shape[0])
    z_plan = jax.random.normal(jax.random.key(args.seed + 30), z.shape)
    x_plan = jax.jit(lambda v, z, y: model.apply(v, z, y, method=TarFlow.reverse))(variables, z_plan, y)
    plan, report = sampling.JacobiPlan.from_forward(model, variables, x_plan, y, tol=args.jacobi_tol,
                                                    break_even_iters=break_even)
    entry = bench_jacobi(model, variables, z, reference, plan, args.steps, args.warmup, args.guidance)
    entry.update(break_even_iters=break_even, one_iteration_s=statistics.median(one["times_s"]),
                 plan_report=report, sequential=list(plan.sequential))
    return entry


# ------------------------------------------------------------------------------- main
USAGE = """\
Benchmarks a TarFlow size: train step, likelihood pass, cached and Jacobi sampling.

  python -m tarflow_jax.tools.benchmark --size=small [--what=train,forward,sample,jacobi] [--out=F.json]
  python -m tarflow_jax.tools.benchmark --size=small --reference=PATH   # side by side with the authors' code
"""


def define_flags() -> flags.FlagValues:
    """This tool's flags, on a fresh ``FlagValues``."""
    fv = flags.FlagValues()
    flags.DEFINE_enum("size", "small", sorted(SIZES), "Model size (see SIZES).", flag_values=fv)
    flags.DEFINE_integer("batch", None, "Examples per step (default per size).", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=fv)
    flags.DEFINE_integer("steps", 5, "Timed repetitions (median reported).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "Untimed runs after compiling.", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("scan", None, "nn.scan over the layers of a block. Default: on (the paper configs' "
                      "setting); with --reference off, TarFlow's own default (scan_layers=False), the model a "
                      "user comparing with the authors' code builds.", flag_values=fv)
    flags.DEFINE_bool("remat", False, "Rematerialise each layer in the backward pass.", flag_values=fv)
    flags.DEFINE_bool("reuse_host_memory", True, "CPU: tarflow_jax.xla_cpu.reuse_host_memory() first, as "
                      "tarflow_jax.main does (process-wide: with --reference the authors' code runs with it "
                      "too). --noreuse_host_memory keeps glibc's and JAX's defaults.", flag_values=fv)
    flags.DEFINE_list("what", list(WHAT), f"Comma list of {','.join(WHAT)}.", flag_values=fv)
    flags.register_validator("what", lambda v: set(v) <= set(WHAT), f"--what takes a comma list of {WHAT}",
                             flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s for MFU (default: known per device).", flag_values=fv)
    flags.DEFINE_bool("compile_only", False, "train: only lower+compile from abstract shapes (no memory).",
                      flag_values=fv)
    flags.DEFINE_list("jacobi_segments", ["1", "8"], "Comma list; one Jacobi run per value.", flag_values=fv)
    flags.register_validator("jacobi_segments", lambda v: all(x.isdigit() and int(x) > 0 for x in v),
                             "--jacobi_segments takes a comma list of positive ints", flag_values=fv)
    flags.DEFINE_float("jacobi_tol", 1e-5, "Jacobi stopping bound on the change between iterates.",
                       flag_values=fv)
    flags.DEFINE_integer("jacobi_max_iters", None, "Jacobi iteration cap per segment (default: exact).",
                         flag_values=fv)
    flags.DEFINE_enum("jacobi_init", "z", list(sampling.JACOBI_INITS), "Jacobi initial guess.", flag_values=fv)
    flags.DEFINE_bool("jacobi_auto", False, "Also run JacobiPlan.from_forward: break-even iterations measured "
                      "here (cached time / one Jacobi iteration's time), blocks ranked on other samples.",
                      flag_values=fv)
    flags.DEFINE_float("guidance", 0.0, "Sampling guidance weight (doubles the batch).", flag_values=fv)
    flags.DEFINE_float("head_std", 0.02, "Std of the randomised output heads.", flag_values=fv)
    flags.DEFINE_string("reference", None, "Folder of the authors' transformer_flow.py (apple/ml-tarflow): time "
                        "their Model side by side with ours (train, forward, sample; imports torch).",
                        flag_values=fv)
    flags.DEFINE_integer("reference_train_batch", 32, "--reference: examples per train step and forward pass.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("reference_sample_batch", 16, "--reference: images per reverse call.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("noise_std", 0.05, "--reference: Gaussian noise std on the training images.",
                       flag_values=fv)
    flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads for --reference (default: torch's own).",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of parameters and inputs.", flag_values=fv)
    flags.DEFINE_string("out", None, "Write the results as JSON here.", flag_values=fv)
    return fv


def settings(fv: flags.FlagValues) -> types.SimpleNamespace:
    """The parsed flags as plain values (Jacobi segments as ints, the size's default batch filled in)."""
    args = types.SimpleNamespace(**fv.flag_values_dict())
    args.jacobi_segments = [int(v) for v in args.jacobi_segments]
    if args.scan is None:
        args.scan = not args.reference
    if args.reference:
        if list(args.what) == list(WHAT):  # the default: every piece the comparison has
            args.what = list(REFERENCE_WHAT)
        bad = [w for w in args.what if w not in REFERENCE_WHAT]
        if bad:
            raise flags.Error(f"--what={','.join(args.what)}: with --reference choose from "
                              f"{','.join(REFERENCE_WHAT)} (not {','.join(bad)})")
        try:
            benchmark_reference.check_reference_path(args.reference)
        except FileNotFoundError as e:
            raise flags.Error(str(e)) from None
    if args.batch is None:
        args.batch = DEFAULT_BATCH[args.size]
    return args


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
    """The settings for command line ``argv`` (``argv[0]`` is the program name).

    Raises:
      absl.flags.Error: an unknown flag, a bad value or a stray argument.
    """
    fv = define_flags()
    rest = fv(list(argv))
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}")
    return settings(fv)


def _summarise(entry: dict[str, Any], batch: int, flops: float | None, peak: float | None) -> None:
    times = entry.get("times_s")
    if not times:
        return
    med = statistics.median(times)
    entry["median_s"] = med
    entry["images_per_s"] = batch / med
    if flops:
        entry.update(_rate(flops, med, peak))


def run(args: types.SimpleNamespace) -> dict[str, Any]:
    """Runs the benchmark ``args`` (from :func:`parse_args`) describe; prints a table, returns (and writes) the results."""
    if args.reuse_host_memory:
        xla_cpu.reuse_host_memory()  # before anything runs: see its docstring
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
        "xla_cpu": xla_cpu.settings(),
    }
    res = result["results"]
    if args.reference:
        result["reference"] = benchmark_reference.compare(  # imports torch
            model, args.what, steps=args.steps, warmup=args.warmup, seed=args.seed, head_std=args.head_std,
            path=args.reference, train_config=train_config(model, args.reference_train_batch),
            train_batch=args.reference_train_batch,
            sample_batch=args.reference_sample_batch, noise_std=args.noise_std,
            torch_threads=args.torch_threads)
        print(benchmark_reference.format_reference(result["reference"]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return result
    if "train" in args.what:
        res["train"] = bench_train(model, args.batch, args.steps, args.warmup, args.compile_only, args.seed)
        _summarise(res["train"], args.batch, flops["train"], peak)
    if args.compile_only:
        result["params"] = count_params(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"])
    else:
        variables = random_variables(model, args.seed, args.head_std)
        result["params"] = count_params(variables["params"])
        if "forward" in args.what:
            res["forward"], _ = bench_forward(model, variables, args.batch, args.steps, args.warmup, args.seed)
            _summarise(res["forward"], args.batch, flops["forward"], peak)
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
            if args.jacobi_auto:
                entry = bench_jacobi_auto(model, variables, z, reference, sample, args)
                jf = jacobi_flops(model, rows, 1, np.asarray(entry["iterations"]), entry["sequential"])
                _summarise(entry, args.batch, jf, peak)
                if "median_s" in entry:
                    entry["speedup_vs_cached"] = sample["median_s"] / entry["median_s"]
                res["jacobi_auto"] = entry
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
    if "xla_cpu" in result:
        head += f" ({xla_cpu.describe(result['xla_cpu'])})"
    lines = [head, "",
             "| what | images/s | median s | compile s | memory MiB | model TFLOP/s | MFU | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in result["results"].items():
        notes = []
        if "ms_per_token_step" in e:
            notes.append(f"{e['ms_per_token_step']:.3f} ms/token step")
        if "total_iterations" in e:
            notes.append(f"{e['total_iterations']} iterations")
        if e.get("sequential"):
            notes.append(f"blocks {e['sequential']} sequential (break-even {e['break_even_iters']:.1f} iterations)")
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
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 2 usage error)."""
    argv = list(sys.argv if argv is None else argv)
    fv = define_flags()
    rest = cli.parse_flags(fv, argv, "python -m tarflow_jax.tools.benchmark", USAGE)
    if isinstance(rest, int):
        return rest
    try:
        args = settings(fv)
    except flags.Error as e:
        return cli.usage_error("python -m tarflow_jax.tools.benchmark", str(e), USAGE)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
