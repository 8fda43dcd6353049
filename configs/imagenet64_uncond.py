"""ImageNet 64×64 unconditional TarFlow for generation (reference README; reproductions FID ≈ 14.7).

The reference's "Unconditional ImageNet64 generation" run: p=2, width 768, 8×8 (~460M
parameters), Gaussian input noise σ=0.05, bfloat16 autocast, batch 256, 200 epochs; samples
are denoised with one score step. Data: as the reference's `--dataset=imagenet64`,
image-net.org's Imagenet64x64 files (see `configs/imagenet64_bpd_official.py`; TFDS
`imagenet_resized/64x64` holds the same images). FIDs quoted for it are torchmetrics /
torch-fidelity FIDs (`fid.DEFAULT_PROTOCOL`) against the training set's statistics.

Provenance (fields that differ from `configlib.base_config()`; value — source):
  dataset.name="imagenet_official", data_dir="data/imagenet64", eval_split="val", label_key=None —
      reference `--dataset=imagenet64` (`utils.get_data`, no classes), the set of apple/ml-tarflow#3
  dataset.random_flip=True (also the default) — reference `utils.get_data`
  model.dtype="bfloat16" — reference `train.py`: autocast bf16 whenever `noise_type == 'gaussian'`
  model.remat=True, scan_layers=True — memory and compile time only
  noise="gaussian", noise_std=0.05 — reference README `--noise_std=0.05`
  num_train_steps=200·5,004 — reference README `--epochs=200`, 5,004 steps/epoch at batch 256
  warmup_steps=5,004 — reference `CosineLRSchedule`: one epoch
  eval_every_steps=20 epochs, sample_every_steps=10 epochs — cadence only
  sample.guidance=0.0, attn_temp=1.0 — reference `--cfg` default 0 (no guidance)
  mesh.fsdp=-1, mesh.data=1 — sharding only
Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="imagenet_official", data_dir="data/imagenet64", train_split="train",
                     eval_split="val", label_key=None, image_size=64, channels=3,
                     random_flip=True)
    c.model.update(patch_size=2, width=768, num_blocks=8, layers_per_block=8, num_classes=0,
                   dtype="bfloat16", remat=True, scan_layers=True)
    c.noise, c.noise_std = "gaussian", 0.05
    c.batch_size = 256
    c.num_train_steps = 200 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 20 * STEPS_PER_EPOCH
    c.sample_every_steps = 10 * STEPS_PER_EPOCH
    c.sample.update(guidance=0.0, attn_temp=1.0)
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
