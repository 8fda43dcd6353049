"""The train state and its factories: the model, the optimizer, a fresh (sharded) state; config checks.

``TrainState`` is everything one train step changes, as one pytree that Orbax saves whole.
The factories here are shared by the trainer (``tarflow_jax.train``), the convert tool
(which writes a step-0 state around converted weights) and the benchmark.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from tarflow_jax import configlib, layers, sharding
from tarflow_jax.configlib import create_model
from tarflow_jax.flow import TarFlow

NOISE_KINDS = ("uniform", "gaussian")

__all__ = ["NOISE_KINDS", "TrainState", "abstract_train_state", "create_model", "create_optimizer",
           "create_train_state", "init_state", "validate_config"]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree that Orbax saves whole."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any  # None when config.ema_decay == 0
    prior_var: jax.Array  # (T, D) VP prior variance (ones for NVP models)
    rng: jax.Array  # raw uint32 key; the step's key is fold_in(rng, step)
    consecutive_skips: jax.Array
    total_skips: jax.Array

    def variables(self, use_ema: bool = True) -> dict[str, Any]:
        """Flax variables for ``TarFlow.apply`` (EMA parameters when kept and asked for)."""
        params = self.ema_params if use_ema and self.ema_params is not None else self.params
        return {"params": params, "prior": {"var": self.prior_var}}


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    platform: str | None = None) -> None:
    """Checks a training config before anything is compiled.

    Args:
      config: the run's config (``configlib.base_config`` fields).
      num_devices: the devices the mesh will span; when given, the batch and head counts
        are checked against ``config.mesh`` too.
      platform: the devices' platform (``"tpu"``, ``"gpu"``, ``"cpu"``); when given,
        ``config.model.attention`` is checked against it (``layers.check_attention``).

    Raises:
      ValueError: naming the first inconsistent or out-of-range field and what it must be
        (sizes, steps, rates, decays, sampling options, the dtype; the mesh when
        ``num_devices`` is given).
    """
    _check_ranges(config)  # first: the checks below divide by some of these
    m, d = config.model, config.dataset
    if d.image_size % m.patch_size:
        raise ValueError(f"config.dataset.image_size={d.image_size} is not divisible by "
                         f"config.model.patch_size={m.patch_size}")
    if m.width % m.get("head_dim", 64):
        raise ValueError(f"config.model.width={m.width} is not divisible by the head dim "
                         f"{m.get('head_dim', 64)}")
    if config.get("matmul_precision", "default") not in configlib.MATMUL_PRECISIONS:
        raise ValueError(f"config.matmul_precision must be one of {configlib.MATMUL_PRECISIONS}; got "
                         f"{config.matmul_precision!r}")
    if platform is not None:
        layers.check_attention(m.get("attention", "xla"), platform, jnp.dtype(m.get("dtype", "float32")),
                               (d.image_size // m.patch_size) ** 2)
    if config.noise not in NOISE_KINDS:
        raise ValueError(f"config.noise must be one of {NOISE_KINDS}; got {config.noise!r}")
    if config.noise == "gaussian" and not config.noise_std > 0:
        raise ValueError(f"config.noise_std must be > 0 for gaussian noise; got {config.noise_std}")
    for name in ("batch_size", "num_train_steps", "checkpoint_every_steps", "eval_every_steps",
                 "sample_every_steps", "log_every_steps"):
        if name in ("batch_size", "log_every_steps") and config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be positive")
        if config[name] < 0:
            disables = " (0 disables it)" if name.endswith("_every_steps") else ""
            raise ValueError(f"config.{name}={config[name]} must be >= 0{disables}")
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} must be > 0")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 disables EMA)")
    if not 0 <= config.label_drop < 1:
        raise ValueError(f"config.label_drop={config.label_drop} must be in [0, 1)")
    if num_devices is not None:
        shape = sharding.mesh_shape(config.mesh, num_devices)
        ways = math.prod(shape[a] for a in sharding.BATCH_AXES)
        if config.batch_size % ways:
            raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                             f"{ways} data-parallel devices of config.mesh {shape}")
        if config.batch_size % jax.process_count():
            raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                             f"{jax.process_count()} processes")
        heads = m.width // m.get("head_dim", 64)
        if heads % shape["tensor"]:
            raise ValueError(f"config.mesh.tensor={shape['tensor']} does not divide the "
                             f"{heads} attention heads")


# (config field, test, what it must be): checked by validate_config; NaN fails every test.
_POSITIVE = "a positive integer"
_RANGES = (
    ("eval.batch_size", lambda v: v > 0, _POSITIVE), ("eval.num_draws", lambda v: v > 0, _POSITIVE),
    ("sample.batch_size", lambda v: v > 0, _POSITIVE), ("sample.num_samples", lambda v: v > 0, _POSITIVE),
    ("sample.grid_size", lambda v: v > 0, _POSITIVE), ("keep_checkpoints", lambda v: v > 0, _POSITIVE),
    ("dataset.image_size", lambda v: v > 0, _POSITIVE), ("model.patch_size", lambda v: v > 0, _POSITIVE),
    ("model.width", lambda v: v > 0, _POSITIVE), ("model.num_blocks", lambda v: v > 0, _POSITIVE),
    ("model.layers_per_block", lambda v: v > 0, _POSITIVE), ("model.head_dim", lambda v: v > 0, _POSITIVE),
    ("model.expansion", lambda v: v > 0, _POSITIVE),
    ("warmup_steps", lambda v: v >= 0, ">= 0"), ("max_consecutive_skips", lambda v: v >= 0, ">= 0 (0: never)"),
    ("data_workers", lambda v: v >= 0, ">= 0"), ("model.num_classes", lambda v: v >= 0, ">= 0 (0: unconditional)"),
    ("dataset.channels", lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    ("dataset.num_levels", lambda v: v >= 2, ">= 2"),
    ("min_learning_rate", lambda v: 0 <= v < math.inf, "finite and >= 0"),
    ("b1", lambda v: 0 <= v < 1, "in [0, 1)"), ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: 0 <= v < math.inf, "finite and >= 0"),
    ("grad_clip_norm", lambda v: 0 <= v < math.inf, "finite and >= 0 (0 disables)"),
    ("noise_std", lambda v: 0 <= v < math.inf, "finite and >= 0"),
    ("max_skipped_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (0: never)"),
    ("learning_rate", lambda v: v < math.inf, "finite"),
    ("sample.guidance", math.isfinite, "finite (negative moves toward the unguided model)"),
    ("sample.attn_temp", lambda v: 0 < v < math.inf, "finite and > 0"),
    ("sample.denoise_scale", math.isfinite, "finite"),
    ("sample.guide_what", lambda v: v in ("a", "b", "ab"), "'a', 'b' or 'ab'"),
    ("sample.solver", lambda v: v in ("cached", "jacobi", "uncached"), "'cached', 'jacobi' or 'uncached'"),
    ("dataset.resize", lambda v: v in (None, "center_crop"), "None or 'center_crop'"),
)


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    for path, ok, what in _RANGES:
        node = config
        for part in path.split("."):
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        if node is None and path != "dataset.resize":
            continue  # a field this config does not have
        if not ok(node):
            raise ValueError(f"config.{path}={node!r} must be {what}")
    if not config.min_learning_rate <= config.learning_rate:
        raise ValueError(f"config.min_learning_rate={config.min_learning_rate} must be <= "
                         f"config.learning_rate={config.learning_rate}")
    try:
        dtype = jnp.dtype(config.model.get("dtype", "float32"))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config.model.dtype={config.model.get('dtype')!r} must name a floating-point "
                         f"dtype ('float32', 'bfloat16')")


def create_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (β 0.9/0.95) and its learning-rate schedule: linear warmup from 1e-6, cosine decay to 1e-6.

    The schedule runs on the global step, as the reference's ``CosineLRSchedule.step()`` runs
    after every iteration, also when its GradScaler skipped a non-finite one: the learning rate
    is a hyper-parameter held in the optimizer state (``optax.inject_hyperparams``) that
    ``train.train_step`` sets to ``schedule(state.step)`` before each update. (Inside optax's
    own schedule the step count is part of the optimizer state, which a skipped step rolls
    back, so the schedule would lag by the number of skips.) Optional global-norm clipping first.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is the rate applied at global step ``step`` (0-based).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=config.min_learning_rate, peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, max(config.num_train_steps - 1, 0)),
        decay_steps=max(config.num_train_steps, 1), end_value=config.min_learning_rate)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=jnp.float32(config.min_learning_rate),
                                                  b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
    return adamw, schedule


def init_state(rng: jax.Array, *, model: TarFlow, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> TrainState:
    """A fresh train state (parameters boxed with their logical axis names)."""
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, *model.dummy_inputs())
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=params if config.ema_decay > 0 else None,
        prior_var=variables["prior"]["var"], rng=train_rng,
        consecutive_skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))


def abstract_train_state(config: ml_collections.ConfigDict, model: TarFlow,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                         ) -> tuple[TrainState, Any]:
    """The train state as ``jax.ShapeDtypeStruct`` leaves placed on ``mesh``, and its shardings.

    Nothing is allocated (``jax.eval_shape``); the leaves carry the shardings a real run
    gives the state, so ``jit(...).trace(abstract, ...)`` compiles exactly the real step
    (the compile-only dry run, ``tarflow_jax.tools.aot``, relies on this).

    Returns:
      ``(abstract_state, shardings)``: a :class:`TrainState` of ``ShapeDtypeStruct``s and
      the matching tree of ``NamedSharding``s (:func:`sharding.logical_shardings`).
    """
    init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = sharding.logical_shardings(boxed, mesh)
    values = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    abstract = jax.tree.map(
        lambda a, s: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        values, shardings, is_leaf=lambda a: a is None)
    return abstract, shardings


def create_train_state(config: ml_collections.ConfigDict, model: TarFlow,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                       ) -> tuple[TrainState, Any]:
    """The train state created sharded on ``mesh`` (never whole on one device), and its shardings."""
    init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
    _, shardings = abstract_train_state(config, model, tx, mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(jax.random.PRNGKey(config.seed))
    return state, shardings
