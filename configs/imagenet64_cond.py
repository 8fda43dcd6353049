"""ImageNet 64×64 class-conditional TarFlow (Zhai et al. 2025; reproductions FID 4.4–6.3 at cfg 2.3).

p=2, width 768, 8×8 (~460M parameters), 1,000 classes with label drop 0.1, Gaussian noise
σ=0.05, bfloat16, batch 256, 200 epochs; sampled with annealed guidance 2.3 and denoised.
Data: TFDS `imagenet2012` resized (shorter side) and center-cropped to 64, random flips
(the downsampled-ImageNet TFDS set has no labels). Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="imagenet2012", train_split="train",
                     eval_split="validation", image_size=64, channels=3, resize="center_crop",
                     random_flip=True)
    c.model.update(patch_size=2, width=768, num_blocks=8, layers_per_block=8, num_classes=1000,
                   dtype="bfloat16", remat=True, scan_layers=True)
    c.noise, c.noise_std = "gaussian", 0.05
    c.label_drop = 0.1
    c.batch_size = 256
    c.num_train_steps = 200 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 20 * STEPS_PER_EPOCH
    c.sample_every_steps = 10 * STEPS_PER_EPOCH
    c.sample.update(guidance=2.3, annealed_guidance=True, guide_what="ab")
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
