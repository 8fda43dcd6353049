"""The offline default: scikit-learn's 8×8 handwritten digits, class-conditional TarFlow.

Data: 1,797 images of 17 grey levels, split 1,500 train / 297 test (fixed). The model is
trained on uniformly dequantized pixels, so the training loss is the likelihood and test
bits/dim are exact. A model of each pixel on its own scores 2.37 bits/dim on this split.

Expected (2 CPU cores, `python -m tarflow_jax.main --config=configs/digits.py
--workdir=/tmp/digits`): see README "Digits demo" for the measured test bits/dim and time.
Arg `smoke` shrinks the run to seconds for tests.
"""

from tarflow_jax import configlib


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="digits", image_size=8, channels=1, num_levels=17, random_flip=False,
                     train_split="train", eval_split="test")
    c.model.update(patch_size=2, width=128, num_blocks=4, layers_per_block=2, num_classes=10)
    c.noise = "uniform"
    c.label_drop = 0.1
    c.batch_size = 64
    c.num_train_steps = 2000  # longer overfits the 1,500 images (test bits/dim rise after ~2k steps)
    c.learning_rate = 1e-3
    c.warmup_steps = 100
    c.grad_clip_norm = 1.0
    c.ema_decay = 0.999
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 1000
    c.sample_every_steps = 0
    c.eval.batch_size = 300
    c.sample.update(grid_size=100, batch_size=100, num_samples=100, guidance=1.0, annealed_guidance=True)
    return configlib.finish(c, arg)
