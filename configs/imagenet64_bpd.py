"""ImageNet 64×64 unconditional TarFlow for likelihood: published 2.99 bits/dim (Zhai et al. 2025).

p=2, width 768, 8 blocks × 8 layers (~460M parameters), uniform dequantization, float32,
batch 256, 100 epochs (500,400 steps), AdamW 1e-4 with one epoch of warmup, cosine to 1e-6.
Data: TFDS `downsampled_imagenet/64x64` (van den Oord et al.), eval on `validation`.
Arg `smoke`: a tiny model and two steps (CI runs it on mock data).
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 256  # 5,004


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="downsampled_imagenet/64x64", train_split="train",
                     eval_split="validation", label_key=None, image_size=64, channels=3, resize=None)
    c.model.update(patch_size=2, width=768, num_blocks=8, layers_per_block=8, num_classes=0,
                   dtype="float32", remat=True, scan_layers=True)
    c.noise = "uniform"
    c.matmul_precision = "highest"  # float32 likelihood: true float32 matmuls on TPU/GPU
    c.batch_size = 256
    c.num_train_steps = 100 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 10 * STEPS_PER_EPOCH
    c.sample_every_steps = 10 * STEPS_PER_EPOCH
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
