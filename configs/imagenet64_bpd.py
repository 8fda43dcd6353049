"""ImageNet 64×64 unconditional likelihood, on the van den Oord et al. (PixelRNN) "downsampled ImageNet".

The TarFlow likelihood recipe (p=2, width 768, 8 blocks × 8 layers, ~460M parameters, uniform
dequantization, float32, batch 256, 100 epochs) on TFDS `downsampled_imagenet/64x64`, the set
of van den Oord et al. 2016 that older likelihood papers report on. Comparable with numbers
measured on that set, e.g. VDM 3.40 and Jet 3.66 bits/dim. NOT the set the TarFlow authors
measured their 2.99 on: they answered in their tracker (apple/ml-tarflow#3) that the BPD runs
used "the official imagenet64 dataset", image-net.org's box-downsampled Imagenet64x64, which
is easier for likelihood; `configs/imagenet64_bpd_official.py` trains on that one.
TFDS builds this set from image-net.org/small/, which may no longer serve it; see
docs/reproducing.md. Eval: the `validation` split, every image once.

Provenance (fields that differ from `configlib.base_config()`; value — source):
  dataset.tfds_name="downsampled_imagenet/64x64", eval_split="validation", label_key=None — the
      PixelRNN set as TFDS ships it (unlabelled; the reference's `imagenet64` has no classes)
  dataset.random_flip=True (also the default) — reference `utils.get_data` flips in every run
  model.remat=True, scan_layers=True — memory and compile time only (docs/scaling.md)
  matmul_precision="highest" — the reference trains this run in float32 (no autocast for uniform
      noise) and PyTorch multiplies float32 in float32 (`allow_tf32` is off by default for
      matmuls); JAX's default is bfloat16 passes on TPU and TF32 on recent GPUs
  num_train_steps=100·5,004 — reference README `--epochs=100`, 5,004 steps/epoch at batch 256
  warmup_steps=5,004 — reference `CosineLRSchedule(warmup_steps=len(data_loader))`: one epoch
  eval_every_steps=sample_every_steps=10 epochs — logging cadence only
  mesh.fsdp=-1, mesh.data=1 — sharding only
The rest is the default, which is the reference's: patch 2, width 768, 8×8, head dim 64,
unconditional, uniform dequantization (`--noise_type=uniform`), float32 (no autocast for
uniform noise in the reference `train.py`), batch 256, AdamW lr 1e-4 β (0.9, 0.95) weight
decay 1e-4, warmup from 1e-6 and cosine to 1e-6, no clipping, no EMA.
Arg `smoke`: a tiny model and two steps (CI runs it on mock data).
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 5_004  # about 1.28M training images // batch 256 (both ImageNet 64 versions)


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="downsampled_imagenet/64x64", train_split="train",
                     eval_split="validation", label_key=None, image_size=64, channels=3, resize=None,
                     random_flip=True)
    c.model.update(patch_size=2, width=768, num_blocks=8, layers_per_block=8, num_classes=0,
                   dtype="float32", remat=True, scan_layers=True)
    c.noise = "uniform"
    c.matmul_precision = "highest"  # true float32 matmuls on TPU/GPU, as the reference's fp32 run
    c.batch_size = 256
    c.num_train_steps = 100 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 10 * STEPS_PER_EPOCH
    c.sample_every_steps = 10 * STEPS_PER_EPOCH
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
