"""Training: the pure jitted train step and ``train_and_evaluate``, the loop around it."""

from __future__ import annotations

import functools
import signal
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from tarflow_jax import (checkpointing, configlib, evaluate, generate, input_pipeline, layers, sharding,
                         workdir as workdir_lib, xla_cpu)
from tarflow_jax.flow import TarFlow, patchify
from tarflow_jax.likelihood import add_noise, bits_per_dim_from_loss, dequantize, flow_loss, to_unit_range
from tarflow_jax.train_state import (TrainState, abstract_train_state, create_model, create_optimizer,
                                     create_train_state, init_state, validate_config)

VAR_RATE = 0.1  # the VP prior variance moves this far toward mean(z²) per step
SKIP_FRACTION_MIN_STEPS = 100  # config.max_skipped_fraction is checked once this many steps ran

__all__ = ["TrainState", "abstract_batch", "abstract_train_state", "check_skips", "create_model",
           "create_optimizer", "create_train_state", "init_state", "jit_train_step", "prepare_images",
           "train_and_evaluate", "train_step", "validate_config"]


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
    """One AdamW step on a batch: pure ``(state, batch) -> (state, metrics)``, jit-able with shardings.

    The loss is the reference's ``Model.get_loss`` on noised or dequantized images
    (:func:`prepare_images`); labels are dropped to ``-1`` with probability
    ``config.label_drop``. The EMA warms up as ``min(ema_decay, (1+t)/(10+t))``; a
    volume-preserving model's prior variance moves ``VAR_RATE`` toward ``mean(z²)`` (the
    reference's ``update_prior``). A non-finite loss or gradient leaves parameters,
    optimizer state, EMA and prior unchanged (the step counter still advances). The forward
    and backward passes run at ``config.matmul_precision``.

    Args:
      state: the train state.
      batch: ``{"image": uint8 (B, H, W, C) levels 0..Q−1, "label": int (B,)}``.
      model, tx, schedule, config: the flow, optimizer, learning-rate schedule and config.
      param_shardings: the parameters' shardings (:func:`jit_train_step` passes them); the
        gradients are constrained to them, so that under FSDP each weight gradient leaves
        the backward pass reduce-scattered into its shard instead of all-reduced whole.

    Returns:
      ``(new_state, metrics)``; metrics (float32 scalars unless noted):

      * ``loss``: ``loss_prior + loss_logdet``, nats per dimension, Gaussian constant dropped;
      * ``loss_prior``: ``0.5·mean(z²)``, nats/dim; ``loss_logdet``: ``−mean(logdet)/N``, nats/dim;
      * ``train_bpd`` (uniform dequantization only): the batch's exact bits/dim;
      * ``learning_rate``: the rate this step applied, ``schedule(step)`` of the global step (skipped
        steps advance it too, as in the reference); ``grad_norm``: global L2 norm of the gradient;
      * ``skipped``: int32, 1 if this step was skipped as non-finite; ``total_skipped``: int32,
        skipped steps so far.
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

    # Reverse mode only: hand-written VJPs for the dense layers and LayerNorm (faster on XLA:CPU).
    with configlib.matmul_precision(config), layers.reverse_mode_vjps():
        (loss, (prior, logdet_term, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.tree.norm(grads)
    learning_rate = schedule(state.step)  # the global step: skipped steps advance the schedule too
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(old):
        params, opt_state, ema, prior_var = old
        opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:  # warm-up: early averages do not drag in the initialisation
            step = state.step.astype(jnp.float32)
            decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        if not model.nvp:
            z2 = jnp.mean(jnp.square(patchify(z, model.patch_size)), axis=0)
            prior_var = prior_var + VAR_RATE * (z2 - prior_var)
        return params, opt_state, ema, prior_var

    # A non-finite step keeps everything as it was. One lax.cond around the whole update,
    # not a per-leaf select between new and old values: the select made XLA copy every
    # parameter and optimizer-state leaf first (234 copies for `small`; docs/performance.md).
    old = (state.params, state.opt_state, state.ema_params, state.prior_var)
    params, opt_state, ema, prior_var = jax.lax.cond(finite, update, lambda old: old, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, prior_var=prior_var,
        consecutive_skips=(state.consecutive_skips + 1) * skipped,
        total_skips=state.total_skips + skipped)
    metrics = {"loss": loss, "loss_prior": prior, "loss_logdet": logdet_term,
               "learning_rate": learning_rate, "grad_norm": grad_norm,
               "skipped": skipped, "total_skipped": new_state.total_skips}
    if config.noise == "uniform":
        metrics["train_bpd"] = bits_per_dim_from_loss(loss, config.dataset.num_levels)
    return new_state, metrics


def jit_train_step(config: ml_collections.ConfigDict, model: TarFlow,
                   tx: optax.GradientTransformation, schedule: optax.Schedule,
                   mesh: jax.sharding.Mesh, state_shardings: Any):
    """The jitted :func:`train_step` a run executes: state donated, batch split over the data axes.

    Call it, or ``.trace(state, batch)`` it with abstract arguments (the compile-only dry
    run, ``tarflow_jax.tools.aot``, does), inside ``sharding.mesh_context(mesh)``.
    """
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                          param_shardings=state_shardings.params),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,), compiler_options=xla_cpu.compiler_options("train", mesh))


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int,
                   eval_batch: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of a global input batch (see ``input_pipeline``), unallocated.

    Returns:
      ``{"image": uint8 (B, H, W, C), "label": int32 (B,)}`` (plus ``"mask": bool (B,)``
      for ``eval_batch``), split over the data-parallel axes of ``mesh``.
    """
    d = config.dataset
    where = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, d.image_size, d.image_size, d.channels),
                                           jnp.uint8, sharding=where),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=where)}
    if eval_batch:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=where)
    return batch


# ----------------------------------------------------------------------------- loop
def _preemption_service_running() -> bool:
    """Whether JAX's distributed preemption service (SIGTERM notices shared by all processes) is up."""
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    state = distributed.global_state
    return getattr(state, "client", None) is not None and \
        getattr(state, "preemption_sync_manager", None) is not None


class _Preemption:
    """Decides, the same on every process, at which step a preempted run saves and stops.

    Multi-process jobs (``jax.distributed``) use JAX's preemption service through Orbax's
    ``CheckpointManager.reached_preemption(step)``: a SIGTERM to any one process reaches all
    of them, and they agree on one step (the largest step any of them has reached, plus
    one), so every process saves the same step and no collective is left waiting. Without
    the service (one process, or the service disabled) SIGTERM sets a flag; with several
    processes the flags are combined by a collective every step.
    """

    def __init__(self, manager: Any):
        self.manager = manager
        self.requested = False
        self.coordinated = _preemption_service_running()
        self._previous = None

    def __enter__(self):
        if self.coordinated:  # JAX's own SIGTERM handler must stay installed
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def reached(self, step: int) -> bool:
        """True at the step where every process saves and stops (call it at every step)."""
        if self.coordinated:
            return bool(self.manager.reached_preemption(step))
        if jax.process_count() > 1:
            return checkpointing._any_process(self.requested)  # pylint: disable=protected-access
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """A barrier of the distributed runtime's coordination service (no device collective).

    Hosts reach the first collective at different times after start-up (data checks,
    compiles, process 0's writes); on CPU the first collective sets up a gloo context with a
    30 s deadline, so waiting here first keeps a slow host from failing the job.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    client = getattr(distributed.global_state, "client", None)
    if client is not None:
        client.wait_at_barrier(f"tarflow_{name}", timeout_in_ms=timeout_s * 1000)


def _state_bytes(config: ml_collections.ConfigDict, model: TarFlow, tx: optax.GradientTransformation) -> int:
    """Bytes of one checkpoint of the train state (uncompressed), from shapes only (nothing compiled)."""
    init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
    abstract = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0)))
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nn.meta.unbox(abstract))))


def check_skips(config: ml_collections.ConfigDict, state: TrainState, step: int, workdir: str) -> None:
    """Stops a run that keeps skipping non-finite steps (see ``train_and_evaluate``'s Raises)."""
    consecutive = int(jax.device_get(state.consecutive_skips))
    total = int(jax.device_get(state.total_skips))
    fix = (f"The last checkpoint in {workdir} is intact. Lower config.learning_rate, set "
           f"config.grad_clip_norm, check the data, or raise")
    if config.max_consecutive_skips and consecutive >= config.max_consecutive_skips:
        raise FloatingPointError(
            f"{consecutive} consecutive training steps had a non-finite loss or gradient (up to step "
            f"{step}); stopping. {fix} config.max_consecutive_skips.")
    fraction = config.get("max_skipped_fraction", 0.0)
    if fraction and step >= min(SKIP_FRACTION_MIN_STEPS, config.num_train_steps) and total > fraction * step:
        raise FloatingPointError(
            f"{total} of the {step} training steps so far ({total / step:.0%}) had a non-finite loss or "
            f"gradient and were skipped, more than config.max_skipped_fraction={fraction}; stopping. "
            f"{fix} config.max_skipped_fraction.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains a TarFlow as ``config`` says, resuming from ``workdir``'s newest intact checkpoint.

    Before anything is compiled: the config is validated, the workdir must be writable with
    room for a checkpoint, and the model must agree with the data (classes, image size,
    channels, levels; ``input_pipeline.check_config_against_data``). Writes
    ``workdir/config.json``; every ``log_every_steps`` the train-step metrics (see
    :func:`train_step`) to TensorBoard and the log; every ``checkpoint_every_steps`` an
    Orbax checkpoint with the train stream's global position (resuming is bit-exact, also
    on another number of processes); every ``eval_every_steps`` the test bits/dim
    (``test_bpd``, ``test_bpd_se``: bits/dim) over the whole eval split; every
    ``sample_every_steps`` a sample grid (PNG and TensorBoard). The last step always logs,
    saves, evaluates and samples. On SIGTERM (to any process of a multi-host job) every
    process saves the same step and returns. A damaged newest checkpoint is moved aside
    with a warning and the run resumes from the newest intact one (see
    ``tarflow_jax.checkpointing``).

    Args:
      config: the run's config (see ``configlib.base_config``).
      workdir: the run's directory (local or ``gs://``).

    Returns:
      The final train state (on the device mesh).

    Raises:
      ValueError: an inconsistent config, or one the data disagrees with (before anything
        is compiled).
      OSError: the workdir is not writable or its disk has no room for a checkpoint.
      FloatingPointError: checked at every log step: ``config.max_consecutive_skips``
        non-finite steps in a row, or more than ``config.max_skipped_fraction`` of all steps
        so far skipped (once ``min(100, num_train_steps)`` steps ran). The last checkpoint
        stays intact.
      checkpointing.DamagedCheckpointError: the workdir has checkpoints but none is intact.
    """
    validate_config(config, jax.device_count(), jax.devices()[0].platform)
    mesh = sharding.create_mesh(config.mesh)
    model = create_model(config)
    tx, schedule = create_optimizer(config)
    is_writer = jax.process_index() == 0
    workdir_lib.check_writable(workdir, _state_bytes(config, model, tx))
    input_pipeline.check_config_against_data(config)
    workdir_lib.save_config(workdir, config)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
    batch_sharding = sharding.batch_sharding(mesh)

    with sharding.mesh_context(mesh):
        state, state_shardings = create_train_state(config, model, tx, mesh)
        _wait_for_all_processes("before_checkpoints")  # start-up work differs per host
        manager = checkpointing.create_manager(workdir, config)
        resumed = checkpointing.restore_newest_intact(manager, state)
        examples_seen = 0
        if resumed is not None:
            state, data, saved_step = resumed
            examples_seen = input_pipeline.resume_position(data, saved_step, config)
            logging.info("Resumed from step %d in %s (train stream position %d)", int(state.step), workdir,
                         examples_seen)
        else:
            writer.write_hparams({k: v for k, v in flatten_config(config).items()})
        train_iter = input_pipeline.create_train_iterator(config, start=examples_seen)
        # Shapes, mean/std and each array's PartitionSpec on the mesh (stats jitted: multi-host safe).
        parameter_overview.log_parameter_overview(state.params, include_stats="global",
                                                  jax_logging_process=0)
        initial_step = int(state.step)

        p_train_step = jit_train_step(config, model, tx, schedule, mesh, state_shardings)
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
            scalars = {"test_bpd": result["bpd"], "test_bpd_se": result["bpd_se"], "test_iw_bpd": result["iw_bpd"]}
            if "conditional" in result:
                scalars.update(test_bpd_given_label=result["conditional"]["bpd"],
                               test_bpd_given_label_se=result["conditional"]["bpd_se"])
            writer.write_scalars(step, scalars)
            logging.info("step %d: test bits/dim %.4f ± %.4f without labels%s over %d examples, %d draws", step,
                         result["bpd"], result["bpd_se"],
                         f", {result['conditional']['bpd']:.4f} given labels" if "conditional" in result else "",
                         result["num_examples"], result["num_draws"])
            return result

        def run_sample(step):
            variables = state.variables(config.eval.use_ema)
            num = config.sample.grid_size
            labels = generate.grid_labels(config, num)
            labels = None if labels is None else jnp.asarray(labels)
            rng = jax.random.PRNGKey(config.seed + 1)
            grids = {"samples": p_sample[False](variables, rng, labels)}
            if config.noise == "gaussian":
                grids["samples_denoised"] = p_sample[True](variables, rng, labels)
            for name, images in grids.items():
                pixels = workdir_lib.to_uint8(jax.device_get(images), config.dataset.num_levels, config.noise)
                grid = workdir_lib.image_grid(pixels)
                writer.write_images(step, {name: grid[None]})
                if is_writer:
                    workdir_lib.write_png(workdir_lib.samples_dir(workdir) / f"{name}_{step:08d}.png", grid)

        with _Preemption(manager) as preemption:
            step = initial_step
            for step in range(initial_step + 1, config.num_train_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    batch = input_pipeline.make_global_batch(next(train_iter), batch_sharding)
                    state, metrics = p_train_step(state, batch)
                examples_seen += config.batch_size
                for hook in hooks:
                    hook(step)
                last = step == config.num_train_steps
                if step % config.log_every_steps == 0 or last:
                    metrics = jax.device_get(metrics)
                    writer.write_scalars(step, metrics)
                    try:
                        check_skips(config, state, step, workdir)
                    except FloatingPointError:
                        manager.wait_until_finished()
                        raise
                preempted = preemption.reached(step)
                if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 or last \
                        or preempted:
                    checkpointing.save(manager, step, state, input_pipeline.data_state(config, examples_seen))
                if preempted:
                    manager.wait_until_finished()
                    logging.warning("Saved step %d after SIGTERM (preemption, agreed by all %d processes); "
                                    "exiting.", step, jax.process_count())
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
