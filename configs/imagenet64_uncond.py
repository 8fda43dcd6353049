"""ImageNet 64×64 unconditional TarFlow for generation (Zhai et al. 2025; reproductions FID ≈ 14.7).

p=2, width 768, 8×8 (~460M parameters), Gaussian input noise σ=0.05, bfloat16 compute,
batch 256, 200 epochs; samples are denoised with one score step. Data: TFDS
`downsampled_imagenet/64x64`. Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="downsampled_imagenet/64x64", train_split="train",
                     eval_split="validation", label_key=None, image_size=64, channels=3,
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
