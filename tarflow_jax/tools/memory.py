"""Parameter count and per-chip training-memory estimate of a TarFlow config.

``count_params(model_cfg)`` is exact: it lists every parameter the Flax model creates
(the same shapes and logical axis names as ``TarFlow.init``) and sums their sizes.
``estimate_memory(...)`` gives the bytes one chip holds during a training step:

* **params / optimizer / EMA / grads** (exact up to padding): every parameter is float32
  and is split the way ``tarflow_jax.sharding`` places it: logical axis ``embed`` over
  ``fsdp``, ``heads`` and ``mlp`` over ``tensor``, everything else replicated, and 1-D
  arrays always replicated. (With ``scan_layers`` the per-layer vectors are stacked to 2-D
  and so are sharded too.) A dimension that does not divide is counted as ``ceil(n / k)``,
  the padded shard size. AdamW keeps 2 float32 moments with the parameters' sharding, the
  EMA one more float32 copy, and the gradients one float32 copy (reduce-scattered to the
  parameters' sharding). Optax's scalar step counter is ignored.
* **activations**: the residuals JAX's autodiff saves for the backward pass (as listed by
  ``jax.ad_checkpoint.print_saved_residuals`` for this model), with ``b`` = examples per
  data-parallel shard, ``T`` tokens, ``W`` width, ``H = W/64`` heads, ``e = 4`` MLP
  expansion, ``t`` = ``mesh["tensor"]``, ``c`` bytes of the compute dtype. Per Transformer
  layer, without remat::

      2·(3·4 + c)·b·T·W      each LayerNorm (float32): centred input, normalised, scaled,
                             plus its output in the compute dtype (the matmul input)
      c·b·T·W                the layer output (the next layer's input)
      4·c·b·T·W/t            q, k, v and the attention output (the out-projection input)
      (9 + c)·b·(H/t)·T²     causal attention: boolean mask (1), masked float32 logits (4),
                             float32 exp (4) and the probabilities in the compute dtype (c);
                             jax.nn.dot_product_attention's XLA path (used on TPU, and on GPU
                             unless cuDNN is requested) materialises these T² tensors
      4·c·b·T·e·W/t          exact GELU: its scaled input, erfc, exp and the GELU output

  plus, per flow block, ``b·T·D·(c + 12)`` for the float32 flow tensors, and with a bf16
  compute dtype the bf16 casts of the (sharded) weight matrices. With remat
  (``nothing_saveable`` per layer) only each layer's input ``c·b·T·W`` (and the proj_out
  input) is kept and one layer's full set above is rebuilt at a time in the backward pass.
  Both variants add the backward pass's transient work space for one layer: float32
  gradients of the attention logits/probabilities (``2·4·b·(H/t)·T²``) and two float32
  residual-stream cotangents (``2·4·b·T·W``). XLA may fuse cheap elementwise residuals
  (mask, exp, erfc) into their backward consumers and so use somewhat less. Check: on CPU,
  ``temp_size_in_bytes`` of XLA's ``memory_analysis()`` for the jitted gradient of small
  float32 models (T=256/W=128 and T=256/W=256, 8 layers, 4 examples) is 8-9% below this
  estimate without remat and within 6% of it with remat. (CPU is no guide for bfloat16:
  it computes bf16 elementwise ops in float32.)
* **fsdp_gather**: the transient all-gathered weights of one layer (compute dtype, both
  the forward/backward use and a prefetched next layer: ×2) and that layer's full
  float32 weight gradient before its reduce-scatter; zero when ``fsdp == 1``.

Not counted: XLA's own scratch buffers, fragmentation, the input images, the sampler's
key/value cache (evaluation/sampling only) and the runtime's reserve. The activation count
errs high and these omissions err low; plan for ``total`` to stay under ~85% of HBM.

``python -m tarflow_jax.tools.memory`` prints the Markdown table of the paper configs used in
``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
import types
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from absl import flags
from jax.sharding import PartitionSpec

from tarflow_jax import configlib, sharding
from tarflow_jax.flow import TarFlow
from tarflow_jax.tools import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter array: its path, shape, logical axis names and the mesh axes they map to."""

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    mesh_axes: tuple[Any, ...]  # per dimension: None, a mesh axis name or a tuple of them

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def shard_size(self, mesh: Mapping[str, int]) -> int:
        """Elements of this array on one chip (1-D arrays are replicated; uneven splits padded)."""
        if len(self.shape) <= 1:  # as sharding.logical_shardings places them
            return self.size
        n = 1
        for dim, axes in zip(self.shape, self.mesh_axes):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            n *= -(-dim // math.prod(int(mesh.get(a, 1)) for a in names))
        return n


def _model(model_cfg: Mapping[str, Any]) -> TarFlow:
    """``TarFlow(**model_cfg)`` (TarFlow field names; ``dtype`` irrelevant to shapes and dropped)."""
    fields = {k: v for k, v in dict(model_cfg).items() if k not in ("dtype", "param_dtype")}
    if "img_size" not in fields:
        raise ValueError("model_cfg needs img_size")
    return TarFlow(**fields)


@functools.lru_cache(maxsize=64)
def _param_specs(items: tuple[tuple[str, Any], ...]) -> tuple[ParamSpec, ...]:
    model = _model(dict(items))
    boxed = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    names = nn.get_partition_spec(boxed)
    flat_names = dict(jax.tree_util.tree_flatten_with_path(
        names, is_leaf=lambda x: isinstance(x, PartitionSpec))[0])
    specs = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]:
        axes = tuple(flat_names.get(path, PartitionSpec()))
        axes = axes + (None,) * (len(leaf.shape) - len(axes))
        mesh_axes = tuple(nn.logical_to_mesh_axes(axes, sharding.LOGICAL_RULES))
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        specs.append(ParamSpec(name, tuple(leaf.shape), axes, mesh_axes))
    return tuple(specs)


def param_specs(model_cfg: Mapping[str, Any]) -> list[ParamSpec]:
    """Every parameter of ``TarFlow(**model_cfg)``, from ``jax.eval_shape`` of its init (nothing allocated).

    Logical axis names are the model's own annotations; the mesh axes come from
    ``tarflow_jax.sharding.LOGICAL_RULES``, so the estimate shards exactly as the trainer does.
    """
    return list(_param_specs(tuple(sorted(dict(model_cfg).items()))))


def dims(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Derived sizes: tokens T, token dim D, width W, heads H, layers, blocks, expansion."""
    m = _model(model_cfg)
    return dict(T=m.num_tokens, D=m.token_dim, W=m.channels, H=m.channels // m.head_dim, hd=m.head_dim,
                L=m.layers_per_block, K=m.num_blocks, e=m.expansion)


def count_params(model_cfg: Mapping[str, Any]) -> int:
    """Exact number of trainable parameters of ``TarFlow(**model_cfg)`` (the ``params`` collection).

    Per block: ``D·W + W`` (proj_in) ``+ T·W`` (pos) ``+ classes·W`` ``+ W·2D + 2D`` (proj_out)
    ``+ layers·((2e+4)·W² + (e+9)·W)``; the ``prior`` variance table is not a parameter.
    """
    return sum(s.size for s in param_specs(model_cfg))


def _mesh(mesh: Mapping[str, int] | None) -> dict[str, int]:
    m = {"data": 1, "fsdp": 1, "tensor": 1, "dcn": 1}
    m.update({k: int(v) for k, v in dict(mesh or {}).items()})
    if any(v < 1 for v in m.values()):
        raise ValueError(f"mesh sizes must be explicit positive ints; got {m}")
    return m


def activation_bytes(model_cfg: Mapping[str, Any], batch_per_chip: int, tensor: int = 1,
                     remat: bool = False, compute_dtype: str = "float32") -> int:
    """Bytes one chip keeps for the backward pass of one step, excluding weight casts (see the module docstring)."""
    d, c = dims(model_cfg), DTYPE_BYTES[str(compute_dtype)]
    b, T, D, W, H, e, t = batch_per_chip, d["T"], d["D"], d["W"], d["H"], d["e"], tensor
    heads, w_t, mlp_t = -(-H // t), -(-W // t), -(-e * W // t)
    layer_full = b * (2 * (12 + c) * T * W + c * T * W + 4 * c * T * w_t
                      + (9 + c) * heads * T * T + 4 * c * T * mlp_t)
    layer_input = c * b * T * W
    block_extra = b * T * D * (c + 12)
    backward_work = 2 * 4 * b * heads * T * T + 2 * 4 * b * T * W
    if remat:
        per_block = d["L"] * layer_input + layer_input + block_extra  # + the proj_out input
        return d["K"] * per_block + layer_full + backward_work
    return d["K"] * (d["L"] * layer_full + block_extra) + backward_work


def estimate_memory(model_cfg: Mapping[str, Any], batch_per_chip: int, mesh: Mapping[str, int],
                    ema: bool, remat: bool, compute_dtype: str = "float32") -> dict[str, int]:
    """Bytes per chip for one training step of ``TarFlow(**model_cfg)``.

    ``batch_per_chip``: examples per data-parallel shard (global batch / (dcn·data·fsdp));
    chips of one ``tensor`` group share the same examples. ``mesh``: ``{"data", "fsdp",
    "tensor"}`` sizes (missing = 1). Returns ``params``, ``optimizer``, ``ema``, ``grads``,
    ``activations`` (for the given ``remat``), ``activations_no_remat``,
    ``activations_remat``, ``fsdp_gather`` and ``total`` (= the state, grads, the chosen
    activations and ``fsdp_gather``), all in bytes, plus ``num_params`` (global count).
    """
    m = _mesh(mesh)
    if batch_per_chip < 1:
        raise ValueError(f"batch_per_chip must be >= 1; got {batch_per_chip}")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPE_BYTES)}; got {compute_dtype!r}")
    specs = param_specs(model_cfg)
    param_bytes = 4 * sum(s.shard_size(m) for s in specs)
    c, d = DTYPE_BYTES[compute_dtype], dims(model_cfg)
    act = {r: activation_bytes(model_cfg, batch_per_chip, m["tensor"], r, compute_dtype)
           for r in (False, True)}
    # bf16 weight casts saved by the forward pass (not with remat: recomputed per layer).
    matrix_bytes = 4 * sum(s.shard_size(m) for s in specs if len(s.shape) > 1)
    if c != 4:
        act[False] += matrix_bytes * c // 4
    W, e, t = d["W"], d["e"], m["tensor"]
    layer_matrix = (2 + 2 * e) * W * W // t  # qkv + out + mlp_in + mlp_out, one tensor shard
    gather = 0 if m["fsdp"] == 1 else layer_matrix * (2 * c + 4)
    out = dict(params=param_bytes, optimizer=2 * param_bytes, ema=param_bytes if ema else 0,
               grads=param_bytes, activations=act[bool(remat)], activations_no_remat=act[False],
               activations_remat=act[True], fsdp_gather=gather)
    out["total"] = (out["params"] + out["optimizer"] + out["ema"] + out["grads"]
                    + out["activations"] + out["fsdp_gather"])
    out["num_params"] = sum(s.size for s in specs)
    return out


# ------------------------------------------------------------------- the docs table
PAPER_CONFIGS = ("imagenet64_bpd", "imagenet64_uncond", "imagenet64_cond", "imagenet128_cond", "afhq256")


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    hbm_gb: float  # memory per chip, GB (1e9 bytes)
    chips: int  # the reference cluster size of the first table
    chips_per_host: int
    slice_name: str  # how that cluster is named/bought


PLATFORMS = (
    Platform("TPU v5p", 95, 32, 4, "v5p-64"),
    Platform("TPU v4", 32, 32, 4, "v4-64"),
    Platform("H100 80GB", 80, 32, 8, "4 nodes × 8"),
)
HEADROOM = 0.85  # plan to use at most this fraction of HBM
CHIP_COUNTS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)


def config_from_file(name: str, config_dir: str | None = None):
    """``configs/<name>.py``'s ``get_config()`` (imported by path, like ``--config``)."""
    config_dir = config_dir or os.path.join(REPO_ROOT, "configs")
    path = name if name.endswith(".py") else os.path.join(config_dir, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tarflow_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def recommend_mesh(platform: Platform, chips: int | None = None, tensor: int = 1) -> dict[str, int]:
    """Pure FSDP over fast links; data parallelism across GPU nodes.

    TPU slices have ICI between all chips: ``fsdp = chips`` (the configs' ``fsdp=-1, data=1``).
    GPU clusters: ``fsdp`` = GPUs per node (NVLink), ``data`` = nodes (InfiniBand).
    """
    chips = chips or platform.chips
    if platform.name.startswith("TPU") or chips <= platform.chips_per_host:
        return {"data": 1, "fsdp": chips // tensor, "tensor": tensor}
    return {"data": chips // platform.chips_per_host, "fsdp": platform.chips_per_host // tensor,
            "tensor": tensor}


def max_batch_per_chip(model_cfg: Mapping[str, Any], mesh: Mapping[str, int], ema: bool, remat: bool,
                       compute_dtype: str, budget_bytes: float) -> int:
    """The most examples per data-parallel shard whose estimated ``total`` fits ``budget_bytes`` (0: none)."""
    one = estimate_memory(model_cfg, 1, mesh, ema, remat, compute_dtype)["total"]
    two = estimate_memory(model_cfg, 2, mesh, ema, remat, compute_dtype)["total"]
    if one > budget_bytes:
        return 0
    return 1 + int((budget_bytes - one) // (two - one))  # total is affine in the batch


def min_chips(model_cfg: Mapping[str, Any], batch_size: int, platform: Platform, ema: bool, remat: bool,
              compute_dtype: str) -> tuple[int, int, dict[str, int]] | None:
    """Fewest chips (from ``CHIP_COUNTS``, dividing the batch) that fit: ``(chips, total bytes, mesh)``."""
    for chips in CHIP_COUNTS:
        mesh = recommend_mesh(platform, chips)
        if batch_size % (mesh["data"] * mesh["fsdp"]):
            continue
        b = batch_size // (mesh["data"] * mesh["fsdp"])
        total = estimate_memory(model_cfg, b, mesh, ema, remat, compute_dtype)["total"]
        if total <= HEADROOM * platform.hbm_gb * 1e9:
            return chips, total, mesh
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _config_model(cfg) -> tuple[dict[str, Any], str, bool]:
    """``(TarFlow fields, compute dtype name, EMA kept)`` of a config."""
    model = configlib.model_kwargs(cfg)
    return model, model["dtype"].name, cfg.ema_decay > 0


def memory_table(names=PAPER_CONFIGS, platforms=PLATFORMS, config_dir: str | None = None) -> str:
    """Per-chip bytes of each config on each platform's reference cluster (GB = 1e9 bytes)."""
    rows = ["| config | params | compute | platform (HBM/chip) | chips | mesh data×fsdp×tensor "
            "| batch/chip | params GB | opt state GB | EMA GB | grads GB | act. GB no remat "
            "| act. GB remat | total GB no remat / remat | fits in 85% |",
            "|" + "---|" * 15]
    for name in names:
        cfg = config_from_file(name, config_dir)
        model, dtype, ema = _config_model(cfg)
        for p in platforms:
            mesh = recommend_mesh(p)
            b = cfg.batch_size // (mesh["data"] * mesh["fsdp"])
            off = estimate_memory(model, b, mesh, ema, False, dtype)
            on = estimate_memory(model, b, mesh, ema, True, dtype)
            budget = HEADROOM * p.hbm_gb * 1e9
            fits = ("both" if off["total"] <= budget else "remat only" if on["total"] <= budget
                    else "neither")
            rows.append(
                f"| {name}{' (remat)' if model.get('remat') else ''} | {off['num_params'] / 1e6:.1f}M "
                f"| {dtype} | {p.name} ({p.hbm_gb:g} GB) | {p.chips} ({p.slice_name}) "
                f"| {mesh['data']}×{mesh['fsdp']}×{mesh['tensor']} | {b} | {_gb(off['params'])} "
                f"| {_gb(off['optimizer'])} | {_gb(off['ema'])} | {_gb(off['grads'])} "
                f"| {_gb(off['activations'])} | {_gb(on['activations'])} "
                f"| {_gb(off['total'])} / {_gb(on['total'])} | {fits} |")
    return "\n".join(rows)


def capacity_table(names=PAPER_CONFIGS, platforms=PLATFORMS, config_dir: str | None = None) -> str:
    """Largest batch/chip on the reference cluster, and the fewest chips for the config's batch."""
    rows = ["| config | batch | platform | max batch/chip no remat | max batch/chip remat "
            "| fewest chips no remat (mesh, GB/chip) | fewest chips remat (mesh, GB/chip) |",
            "|" + "---|" * 7]
    for name in names:
        cfg = config_from_file(name, config_dir)
        model, dtype, ema = _config_model(cfg)
        for p in platforms:
            mesh = recommend_mesh(p)
            budget = HEADROOM * p.hbm_gb * 1e9
            cells = [str(max_batch_per_chip(model, mesh, ema, r, dtype, budget)) for r in (False, True)]
            for r in (False, True):
                best = min_chips(model, cfg.batch_size, p, ema, r, dtype)
                if best is None:
                    cells.append(f"none of {CHIP_COUNTS[0]}-{CHIP_COUNTS[-1]}")
                else:
                    chips, total, m = best
                    cells.append(f"{chips} ({m['data']}×{m['fsdp']}×{m['tensor']}, {_gb(total)})")
            rows.append(f"| {name} | {cfg.batch_size} | {p.name} ({p.hbm_gb:g} GB) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


USAGE = """\
Per-chip training memory of TarFlow configs (GB = 1e9 bytes), and the chips they need.

  python -m tarflow_jax.tools.memory [--configs=imagenet64_bpd,afhq256] [--chips=32]
"""


def define_flags() -> flags.FlagValues:
    """This tool's flags, on a fresh ``FlagValues``."""
    fv = flags.FlagValues()
    flags.DEFINE_list("configs", list(PAPER_CONFIGS), "Config names in configs/ (or paths to .py files).",
                      flag_values=fv)
    flags.DEFINE_integer("chips", None, "Reference cluster size for the first table (default 32 chips).",
                         lower_bound=1, flag_values=fv)
    return fv


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints the tables of ``docs/scaling.md``; returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    fv = define_flags()
    rest = cli.parse_flags(fv, argv, "python -m tarflow_jax.tools.memory", USAGE)
    if isinstance(rest, int):
        return rest
    args = types.SimpleNamespace(**fv.flag_values_dict())
    platforms = PLATFORMS
    if args.chips:
        platforms = tuple(dataclasses.replace(p, chips=args.chips, slice_name=f"{args.chips} chips")
                          for p in PLATFORMS)
    print(f"Per-chip memory (GB = 1e9 bytes), pure FSDP on TPU slices, FSDP inside a node and data "
          f"parallelism across nodes on GPUs; 'fits' = total <= {HEADROOM:.0%} of HBM:\n")
    print(memory_table(args.configs, platforms))
    print(f"\nCapacity at the same meshes ({HEADROOM:.0%} of HBM); 'fewest chips' tries "
          f"{', '.join(map(str, CHIP_COUNTS))} chips that divide the batch:\n")
    print(capacity_table(args.configs, platforms))
    print("\nTotals = params + AdamW moments + EMA + grads + activations + FSDP all-gather buffers; "
          "they exclude XLA scratch and fragmentation (see tarflow_jax/tools/memory.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
