"""ImageNet 128×128 class-conditional TarFlow: published FID 5.03 (Zhai et al. 2025).

p=4, width 1024, 8×8 (~820M parameters), label drop 0.1, Gaussian noise σ=0.15,
bfloat16, batch 768, 320 epochs; reproductions sample with guidance 1.5. Data: TFDS
`imagenet2012`, resize + center crop to 128, random flips. Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 768


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="imagenet2012", train_split="train",
                     eval_split="validation", image_size=128, channels=3, resize="center_crop",
                     random_flip=True)
    c.model.update(patch_size=4, width=1024, num_blocks=8, layers_per_block=8, num_classes=1000,
                   dtype="bfloat16", remat=True, scan_layers=True)
    c.noise, c.noise_std = "gaussian", 0.15
    c.label_drop = 0.1
    c.batch_size = 768
    c.num_train_steps = 320 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 40 * STEPS_PER_EPOCH
    c.sample_every_steps = 10 * STEPS_PER_EPOCH
    c.sample.update(guidance=1.5, annealed_guidance=True)
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
