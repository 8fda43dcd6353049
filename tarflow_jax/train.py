"""Training: the train state, pure jitted steps, and ``train_and_evaluate``."""

from __future__ import annotations

import functools
import math
import signal
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from tarflow_jax import checkpointing, configlib, evaluate, input_pipeline, layers, sharding
from tarflow_jax.flow import TarFlow, patchify
from tarflow_jax.likelihood import add_noise, dequantize, flow_loss, to_unit_range

VAR_RATE = 0.1  # the VP prior variance moves this far toward mean(z²) per step
NOISE_KINDS = ("uniform", "gaussian")


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


# --------------------------------------------------------------------------- config
def create_model(config: ml_collections.ConfigDict) -> TarFlow:
    """The ``TarFlow`` described by ``config.model`` (``dtype`` given as a string)."""
    kwargs = dict(config.model)
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
    return TarFlow(**kwargs)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    platform: str | None = None) -> None:
    """Raises a ValueError naming the field of an inconsistent config (before any compile).

    ``num_devices`` checks the mesh and batch split; ``platform`` (``"tpu"``, ``"gpu"``,
    ``"cpu"``) checks that ``config.model.attention`` can run there.
    """
    m, d = config.model, config.dataset
    if m.img_size % m.patch_size:
        raise ValueError(f"config.model.img_size={m.img_size} is not divisible by "
                         f"config.model.patch_size={m.patch_size}")
    if m.channels % m.get("head_dim", 64):
        raise ValueError(f"config.model.channels={m.channels} is not divisible by the head dim "
                         f"{m.get('head_dim', 64)}")
    if d.image_size != m.img_size:
        raise ValueError(f"config.dataset.image_size={d.image_size} differs from "
                         f"config.model.img_size={m.img_size}")
    if d.channels != m.in_channels:
        raise ValueError(f"config.dataset.channels={d.channels} differs from "
                         f"config.model.in_channels={m.in_channels}")
    if config.get("matmul_precision", "default") not in configlib.MATMUL_PRECISIONS:
        raise ValueError(f"config.matmul_precision must be one of {configlib.MATMUL_PRECISIONS}; got "
                         f"{config.matmul_precision!r}")
    if config.noise not in NOISE_KINDS:
        raise ValueError(f"config.noise must be one of {NOISE_KINDS}; got {config.noise!r}")
    if config.noise == "gaussian" and not config.noise_std > 0:
        raise ValueError(f"config.noise_std must be > 0 for gaussian noise; got {config.noise_std}")
    for name in ("batch_size", "num_train_steps", "checkpoint_every_steps", "eval_every_steps",
                 "sample_every_steps", "log_every_steps"):
        if config[name] < 0 or (name in ("batch_size", "log_every_steps") and config[name] == 0):
            raise ValueError(f"config.{name}={config[name]} must be positive (0 disables periodic actions)")
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate={config.learning_rate} must be > 0")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 disables EMA)")
    if not 0 <= config.label_drop < 1:
        raise ValueError(f"config.label_drop={config.label_drop} must be in [0, 1)")
    if platform is not None:
        layers.check_attention(m.get("attention", "xla"), platform, jnp.dtype(m.get("dtype", "float32")),
                               (m.img_size // m.patch_size) ** 2)
    if num_devices is not None:
        shape = sharding.mesh_shape(config.mesh, num_devices)
        ways = math.prod(shape[a] for a in sharding.BATCH_AXES)
        if config.batch_size % ways:
            raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                             f"{ways} data-parallel devices of config.mesh {shape}")
        if config.batch_size % jax.process_count():
            raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                             f"{jax.process_count()} processes")
        if m.channels // m.get("head_dim", 64) % shape["tensor"]:
            raise ValueError(f"config.mesh.tensor={shape['tensor']} does not divide the "
                             f"{m.channels // m.get('head_dim', 64)} attention heads")


def create_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (β 0.9/0.95) with linear warmup from 1e-6 and cosine decay to 1e-6; optional clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=config.min_learning_rate, peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, max(config.num_train_steps - 1, 0)),
        decay_steps=max(config.num_train_steps, 1), end_value=config.min_learning_rate)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
    return adamw, schedule


# ---------------------------------------------------------------------------- state
def _dummy_inputs(model: TarFlow) -> tuple[jax.Array, jax.Array | None]:
    x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels), jnp.float32)
    return x, (jnp.zeros((1,), jnp.int32) if model.num_classes else None)


def init_state(rng: jax.Array, *, model: TarFlow, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> TrainState:
    """A fresh train state (parameters boxed with their logical axis names)."""
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, *_dummy_inputs(model))
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
    """
    init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed), shardings, is_leaf=lambda a: a is None)
    return abstract, shardings


def create_train_state(config: ml_collections.ConfigDict, model: TarFlow,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                       ) -> tuple[TrainState, Any]:
    """The train state created sharded on ``mesh`` (never whole on one device), and its shardings."""
    init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
    _, shardings = abstract_train_state(config, model, tx, mesh)
    rng = jax.random.PRNGKey(config.seed)
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def jit_train_step(config: ml_collections.ConfigDict, model: TarFlow,
                   tx: optax.GradientTransformation, schedule: optax.Schedule,
                   mesh: jax.sharding.Mesh, state_shardings: Any):
    """The jitted :func:`train_step` a run executes: state donated, batch split over the data axes.

    Call it (or ``.trace(state, batch)`` it with abstract arguments) inside the mesh and
    logical-axis-rule context of :func:`train_and_evaluate`.
    """
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                          param_shardings=state_shardings.params),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,))


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int,
                   eval_batch: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of a global input batch (see ``input_pipeline``), unallocated."""
    d = config.dataset
    where = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, d.image_size, d.image_size, d.channels),
                                           jnp.uint8, sharding=where),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=where)}
    if eval_batch:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=where)
    return batch


# ---------------------------------------------------------------------------- steps
def prepare_images(rng: jax.Array, pixels: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Integer pixels to model inputs: uniform dequantization, or ``[-1,1]`` plus Gaussian noise."""
    levels = config.dataset.num_levels
    if config.noise == "uniform":
        return dequantize(rng, pixels, levels)
    return add_noise(rng, to_unit_range(pixels, levels), config.noise_std)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: TarFlow,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict, param_shardings: Any = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step; a non-finite loss or gradient leaves parameters and optimizer state unchanged.

    The forward and backward passes run at ``config.matmul_precision``. ``param_shardings``
    (the parameters' shardings; :func:`jit_train_step` passes them) constrains the gradients
    to the parameters' layout, so that under FSDP each weight gradient leaves the backward
    pass as a reduce-scatter into its shard.
    """
    noise_rng, drop_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    x = prepare_images(noise_rng, batch["image"], config)
    y = None
    if model.num_classes:
        y = batch["label"].astype(jnp.int32)
        if config.label_drop > 0:
            y = jnp.where(jax.random.bernoulli(drop_rng, config.label_drop, y.shape), -1, y)

    def loss_fn(params):
        z, logdet = model.apply({"params": params}, x, y)
        loss, prior, logdet_term = flow_loss(z, logdet)
        return loss, (prior, logdet_term, z)

    with configlib.matmul_precision(config):
        (loss, (prior, logdet_term, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if param_shardings is not None:  # FSDP: reduce-scatter each gradient into its shard
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:  # warm-up: early averages do not drag in the initialisation
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    prior_var = state.prior_var
    if not model.nvp:
        z2 = jnp.mean(jnp.square(patchify(z, model.patch_size)), axis=0)
        prior_var = prior_var + VAR_RATE * (z2 - prior_var)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        ema_params=keep(ema, state.ema_params), prior_var=keep(prior_var, state.prior_var),
        consecutive_skips=(state.consecutive_skips + 1) * skipped,
        total_skips=state.total_skips + skipped)
    metrics = {"loss": loss, "loss_prior": prior, "loss_logdet": logdet_term,
               "learning_rate": schedule(state.step), "grad_norm": grad_norm,
               "skipped": skipped, "total_skipped": new_state.total_skips}
    if config.noise == "uniform":
        n = config.dataset.num_levels
        metrics["train_bpd"] = (loss + 0.5 * math.log(2 * math.pi) + math.log(n / 2)) / math.log(2)
    return new_state, metrics


def sample(variables: Any, rng: jax.Array, labels: jax.Array | None, *, model: TarFlow,
           config: ml_collections.ConfigDict, denoise: bool = False) -> jax.Array:
    """Draws images in ``[-1, 1]`` with the sampling options in ``config.sample``."""
    s = config.sample
    batch = config.sample.batch_size if labels is None else labels.shape[0]
    z = jax.random.normal(rng, (batch, model.img_size, model.img_size, model.in_channels))
    x = model.apply(variables, z, labels, guidance=s.guidance, guide_what=s.guide_what,
                    attn_temp=s.attn_temp, annealed_guidance=s.annealed_guidance, solver=s.solver,
                    method=TarFlow.reverse)
    if denoise:
        clean = model.apply(variables, x, labels, config.noise_std, s.denoise_scale, method=TarFlow.denoise)
        x = jnp.where(jnp.isfinite(clean), clean, x)
    return x


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in ``[-1, 1]`` to uint8 (NaN → 0)."""
    x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0)
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """``(N,H,W,C)`` uint8 images tiled into one ``(rows·(H+1)+1, cols·(W+1)+1, C)`` grid."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
    return grid


def sample_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
    """Labels for a sample grid: classes in turn (``None`` for unconditional models)."""
    if not config.model.num_classes:
        return None
    return (np.arange(num) % config.model.num_classes).astype(np.int32)


# ----------------------------------------------------------------------------- loop
class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir`` if it holds a checkpoint), evaluates, samples, checkpoints."""
    validate_config(config, jax.device_count(), jax.devices()[0].platform)
    mesh = sharding.create_mesh(config.mesh)
    model = create_model(config)
    tx, schedule = create_optimizer(config)
    is_writer = jax.process_index() == 0
    checkpointing.save_config(workdir, config)
    train_iter = input_pipeline.create_train_iterator(config)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
    batch_sharding = sharding.batch_sharding(mesh)

    with sharding.mesh_context(mesh):
        state, state_shardings = create_train_state(config, model, tx, mesh)
        manager = checkpointing.create_manager(workdir, config)
        if manager.latest_step() is not None:
            state = checkpointing.restore(manager, state, train_iter)
            logging.info("Resumed from step %d in %s", int(state.step), workdir)
        else:
            writer.write_hparams({k: v for k, v in flatten_config(config).items()})
        # Shapes, mean/std and each array's PartitionSpec on the mesh (stats jitted: multi-host safe).
        parameter_overview.log_parameter_overview(state.params, include_stats="global",
                                                  jax_logging_process=0)
        initial_step = int(state.step)

        p_train_step = jit_train_step(config, model, tx, schedule, mesh, state_shardings)
        from tarflow_jax import generate  # generate imports this module
        p_sample = {denoise: generate.sharded_sample_fn(model, config, mesh, denoise=denoise)
                    for denoise in (False, True)}  # each device samples its slice (shard_map)
        hooks = []
        if is_writer:
            hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                         writer=writer))
            if config.profile:
                hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))

        def run_eval(step):
            result = evaluate.evaluate_bits_per_dim(model, state.variables(config.eval.use_ema),
                                                    config, mesh, num_draws=config.eval.num_draws)
            writer.write_scalars(step, {"test_bpd": result["bpd"], "test_bpd_se": result["bpd_se"]})
            logging.info("step %d: test bits/dim %.4f ± %.4f over %d examples", step, result["bpd"],
                         result["bpd_se"], result["num_examples"])
            return result

        def run_sample(step):
            variables = state.variables(config.eval.use_ema)
            num = config.sample.grid_size
            labels = sample_labels(config, num)
            labels = None if labels is None else jnp.asarray(labels)
            rng = jax.random.PRNGKey(config.seed + 1)
            grids = {"samples": p_sample[False](variables, rng, labels)}
            if config.noise == "gaussian":
                grids["samples_denoised"] = p_sample[True](variables, rng, labels)
            for name, images in grids.items():
                grid = image_grid(to_uint8(jax.device_get(images)))
                writer.write_images(step, {name: grid[None]})
                if is_writer:
                    checkpointing.write_png(
                        checkpointing.workdir_path(workdir) / "samples" / f"{name}_{step:08d}.png", grid)

        with _Preemption() as preemption:
            step = initial_step
            for step in range(initial_step + 1, config.num_train_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = input_pipeline.make_global_batch(next(train_iter), batch_sharding)
                    state, metrics = p_train_step(state, batch)
                for hook in hooks:
                    hook(step)
                last = step == config.num_train_steps
                if step % config.log_every_steps == 0 or last:
                    metrics = jax.device_get(metrics)
                    writer.write_scalars(step, metrics)
                    skips = int(jax.device_get(state.consecutive_skips))
                    if config.max_consecutive_skips and skips >= config.max_consecutive_skips:
                        manager.wait_until_finished()
                        raise FloatingPointError(
                            f"{skips} consecutive training steps had a non-finite loss or gradient "
                            f"(up to step {step}); stopping. The last checkpoint in {workdir} is intact. "
                            f"Lower config.learning_rate, set config.grad_clip_norm, or raise "
                            f"config.max_consecutive_skips.")
                if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 or last \
                        or preemption.requested:
                    checkpointing.save(manager, step, state, train_iter)
                if preemption.requested:
                    manager.wait_until_finished()
                    logging.warning("Saved step %d after SIGTERM; exiting.", step)
                    return state
                if config.eval_every_steps and step % config.eval_every_steps == 0 or last:
                    run_eval(step)
                if config.sample_every_steps and step % config.sample_every_steps == 0 or last:
                    run_sample(step)
            if step == initial_step and initial_step >= config.num_train_steps:
                logging.info("Nothing to train: step %d >= num_train_steps", initial_step)
        manager.wait_until_finished()
        writer.flush()
    return state


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted scalar fields of a config, for hyper-parameter logging."""
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
