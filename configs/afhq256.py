"""AFHQ 256×256 (3 classes: cat, dog, wild): authors' checkpoint `afhq_model_8_768_8_8_0.07.pth`.

The reference's "AFHQ" run: p=8, width 768, 8×8, label drop 0.1, Gaussian noise σ=0.07,
bfloat16 autocast, batch 256, 4,000 epochs; reproductions report FID 13.6 (torchmetrics /
torch-fidelity, `fid.DEFAULT_PROTOCOL`) with annealed guidance 3.4. Data: an image folder
`<data_dir>/train/{cat,dog,wild}/*` and `<data_dir>/val/...` (AFHQ ships `train/` and
`val/`), resized (bilinear) and center-cropped to 256, random flips.

Provenance (fields that differ from `configlib.base_config()`; value — source):
  dataset.name="folder", data_dir="data/afhq", eval_split="val", image_size=256, resize="center_crop" —
      reference `--dataset=afhq --img_size=256` (`utils.get_data`: ImageFolder `data/afhq`,
      `Resize(256)`, `CenterCrop(256)`); AFHQ's own split folders are `train` and `val`
  dataset.random_flip=True (also the default) — reference `utils.get_data`
  model.patch_size=8, num_classes=3 — reference README `--patch_size=8`, `get_num_classes('afhq')`
  model.dtype="bfloat16" — reference `train.py`: autocast bf16 for Gaussian noise
  model.remat=True, scan_layers=True — memory and compile time only
  noise="gaussian", noise_std=0.07 — reference README `--noise_std=0.07`
  label_drop=0.1 — reference README `--drop_label=0.1`
  num_train_steps=4,000·57 — reference README `--epochs=4000`; 14,630 // 256 = 57 steps/epoch
  warmup_steps=57 — reference `CosineLRSchedule(warmup_steps=len(data_loader))`: one epoch
  eval_every_steps=0, sample_every_steps=200 epochs — cadence (reference `--sample_freq=200`)
  sample.guidance=3.4, annealed_guidance=True — reproductions
  mesh.fsdp=-1, mesh.data=1 — sharding only
Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

TRAIN_IMAGES = 14_630
STEPS_PER_EPOCH = TRAIN_IMAGES // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="folder", data_dir="data/afhq", train_split="train", eval_split="val",
                     image_size=256, channels=3, resize="center_crop", random_flip=True)
    c.model.update(patch_size=8, width=768, num_blocks=8, layers_per_block=8, num_classes=3,
                   dtype="bfloat16", remat=True, scan_layers=True)
    c.noise, c.noise_std = "gaussian", 0.07
    c.label_drop = 0.1
    c.batch_size = 256
    c.num_train_steps = 4000 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 0
    c.sample_every_steps = 200 * STEPS_PER_EPOCH
    c.sample.update(guidance=3.4, annealed_guidance=True)
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
