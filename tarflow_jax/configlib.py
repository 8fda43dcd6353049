"""Defaults shared by every experiment config, and the ``smoke`` shrink used by CI."""

from __future__ import annotations

import jax
import ml_collections

MATMUL_PRECISIONS = ("default", "high", "highest")


def matmul_precision(config: ml_collections.ConfigDict):
    """A context applying ``config.matmul_precision`` to the matmuls traced inside it.

    ``"default"`` leaves JAX's default (on TPU one bfloat16 pass, also for float32 operands;
    TF32 on recent NVIDIA GPUs), ``"high"`` three bfloat16 passes, ``"highest"`` true float32.
    """
    return jax.default_matmul_precision(config.get("matmul_precision", "default"))


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with the reference recipe's values as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(dict(
        name="tfds", tfds_name="", data_dir=None, train_split="train", eval_split="test",
        image_key="image", label_key="label", image_size=64, channels=3, num_levels=256,
        random_flip=False, resize=None))
    c.data_workers = 0
    c.model = ml_collections.ConfigDict(dict(
        img_size=64, in_channels=3, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
        num_classes=0, nvp=True, head_dim=64, expansion=4, dtype="float32", scan_layers=True,
        remat=False, remat_policy="nothing", attention="xla"))
    # Matmul precision on accelerators (jax.default_matmul_precision) in the train, eval and
    # sampling steps: "default" (TPU: one bfloat16 pass even for float32), "high" (3 passes),
    # "highest" (true float32: 6 passes on TPU, no TF32 on GPU).
    c.matmul_precision = "default"
    # Input noise: "uniform" dequantization (likelihood models) or "gaussian" with noise_std.
    c.noise = "uniform"
    c.noise_std = 0.0
    c.label_drop = 0.0
    # Optimiser: AdamW, linear warmup from min_learning_rate, cosine to min_learning_rate.
    c.batch_size = 256
    c.num_train_steps = 100_000
    c.learning_rate = 1e-4
    c.min_learning_rate = 1e-6
    c.warmup_steps = 5_000
    c.b1, c.b2 = 0.9, 0.95
    c.weight_decay = 1e-4
    c.grad_clip_norm = 0.0  # 0 disables
    c.ema_decay = 0.0  # 0 disables; warmed up as min(decay, (1+t)/(10+t))
    c.max_consecutive_skips = 100  # non-finite steps in a row before the run stops (0: never)
    # Periodic actions (0 disables; the last step always logs, evaluates, samples and saves).
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every_steps = 25_000
    c.sample_every_steps = 25_000
    c.profile = False
    c.eval = ml_collections.ConfigDict(dict(batch_size=256, num_draws=1, use_ema=True))
    c.sample = ml_collections.ConfigDict(dict(
        grid_size=64, batch_size=64, num_samples=64, guidance=0.0, guide_what="ab", attn_temp=1.0,
        annealed_guidance=False, solver="cached", denoise=True, denoise_scale=1.0, labels=None,
        redraw_nan=False))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a tiny model and a few steps, keeping its data and options (for CI)."""
    c.model.channels = 64
    c.model.num_blocks = 2
    c.model.layers_per_block = 1
    c.model.patch_size = min(c.model.patch_size, 2) if c.model.img_size % 2 == 0 else 1
    if c.model.img_size > 16:
        c.model.img_size = c.dataset.image_size = 16
        c.dataset.resize = "center_crop"
    c.batch_size = 8
    c.num_train_steps = 2
    c.warmup_steps = 1
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
    c.sample_every_steps = 0
    c.eval.batch_size = 8
    c.sample.grid_size = c.sample.batch_size = c.sample.num_samples = 4
    return c


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies a config's optional argument: nothing, or ``smoke``."""
    if arg == "smoke":
        return smoke(c)
    if arg:
        raise ValueError(f"unknown config arg {arg!r}; expected nothing or 'smoke'")
    return c
