"""CIFAR-10 32×32 class-conditional TarFlow for likelihood (no published TarFlow figure).

p=2, width 512, 6 blocks × 4 layers, uniform dequantization (bits/dim), label drop 0.1,
float32, batch 256, 300 epochs. For scale, published CIFAR-10 likelihoods: Glow 3.35,
Flow++ 3.08, VDM 2.65 bits/dim. Data: TFDS `cifar10`. Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

STEPS_PER_EPOCH = 50_000 // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="tfds", tfds_name="cifar10", train_split="train", eval_split="test",
                     image_size=32, channels=3, random_flip=True)
    c.model.update(patch_size=2, width=512, num_blocks=6, layers_per_block=4, num_classes=10,
                   dtype="float32", scan_layers=True)
    c.noise = "uniform"
    c.matmul_precision = "highest"  # float32 likelihood: true float32 matmuls on TPU/GPU
    c.label_drop = 0.1
    c.batch_size = 256
    c.num_train_steps = 300 * STEPS_PER_EPOCH
    c.warmup_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 20 * STEPS_PER_EPOCH
    c.sample_every_steps = 20 * STEPS_PER_EPOCH
    c.sample.update(guidance=1.0, annealed_guidance=True)
    return configlib.finish(c, arg)
