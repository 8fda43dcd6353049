"""ImageNet 64×64 unconditional likelihood as the TarFlow authors ran it: published 2.99 bits/dim.

The paper's likelihood run (reference README "Unconditional ImageNet64 density modelling":
p=2, width 768, 8 blocks × 8 layers, ~460M parameters, uniform dequantization, float32,
batch 256, 100 epochs) on image-net.org's box-downsampled "Imagenet64x64" (Chrabaszcz et al.
2017; pickles `train_data_batch_1..10`, `val_data`), which the authors confirmed is the set
behind their BPD numbers (apple/ml-tarflow#3: "the official imagenet64 dataset"). This set is
easier for likelihood than the PixelRNN one, so 2.99 is comparable only with numbers measured
on it (not with VDM 3.40 or Jet 3.66, which used `configs/imagenet64_bpd.py`'s set). TFDS
`imagenet_resized/64x64` holds the same images if you prefer TFDS (set `dataset.name="tfds"`).
Data: `--config.dataset.data_dir=DIR` holding the unzipped files (also one folder down, e.g.
`DIR/Imagenet64_train_part1/`); the first run converts each split once into memory-mappable
`.npy` files under `DIR/imagenet_official/` (16 GB; `dataset.cache_dir` puts them elsewhere).
Eval: `val` (50,000 images), as the reference `evaluate_bpd.py` (`data/imagenet64/val`).

Provenance (fields that differ from `configlib.base_config()`; value — source):
  dataset.name="imagenet_official", data_dir="data/imagenet64" — reference `--dataset=imagenet64`
      (`utils.get_data`: `data/imagenet64`), the set named in apple/ml-tarflow#3
  dataset.eval_split="val", label_key=None — reference `evaluate_bpd.py` (`val` folder,
      `num_classes=0`, `y=None`)
  dataset.random_flip=True (also the default) — reference `utils.get_data` flips in every run
  model.remat=True, scan_layers=True — memory and compile time only (docs/scaling.md)
  matmul_precision="highest" — the reference trains this run in float32 (no autocast for uniform
      noise) and PyTorch multiplies float32 in float32 (`allow_tf32` is off by default for
      matmuls); JAX's default is bfloat16 passes on TPU and TF32 on recent GPUs
  num_train_steps=100·5,004 — reference README `--epochs=100`; 1,281,167 // 256 = 5,004 steps/epoch
  warmup_steps=5,004 — reference `CosineLRSchedule(warmup_steps=len(data_loader))`: one epoch
  eval_every_steps=sample_every_steps=10 epochs — logging cadence only
  mesh.fsdp=-1, mesh.data=1 — sharding only
The rest is the default, which is the reference's: patch 2, width 768, 8×8, head dim 64,
unconditional, uniform dequantization, float32 (no autocast for uniform noise), batch 256,
AdamW lr 1e-4 β (0.9, 0.95) weight decay 1e-4, warmup from 1e-6 and cosine to 1e-6, no
clipping, no EMA. Arg `smoke`: a tiny model and two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 256  # 5,004


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="imagenet_official", data_dir="data/imagenet64", train_split="train",
                     eval_split="val", label_key=None, image_size=64, channels=3, resize=None,
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
