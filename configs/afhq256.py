"""AFHQ 256×256 (3 classes: cat, dog, wild): authors' checkpoint `afhq_model_8_768_8_8_0.07.pth`.

p=8, width 768, 8×8, label drop 0.1, Gaussian noise σ=0.07, bfloat16, batch 256, 4,000
epochs; reproductions report FID 13.6 with guidance 3.4. Data: an image folder
`<data_dir>/train/{cat,dog,wild}/*.png` (and `test/`), resized and center-cropped to 256,
random flips. Arg `smoke`: tiny model, two steps.
"""

from tarflow_jax import configlib

TRAIN_IMAGES = 14_630
STEPS_PER_EPOCH = TRAIN_IMAGES // 256


def get_config(arg: str | None = None):
    c = configlib.base_config()
    c.dataset.update(name="folder", data_dir="data/afhq", train_split="train", eval_split="test",
                     image_size=256, channels=3, resize="center_crop", random_flip=True)
    c.model.update(patch_size=8, width=768, num_blocks=8, layers_per_block=8, num_classes=3,
                   dtype="bfloat16", remat=True, scan_layers=True)
    c.noise, c.noise_std = "gaussian", 0.07
    c.label_drop = 0.1
    c.batch_size = 256
    c.num_train_steps = 4000 * STEPS_PER_EPOCH
    c.warmup_steps = 100 * STEPS_PER_EPOCH
    c.eval_every_steps = 0
    c.sample_every_steps = 200 * STEPS_PER_EPOCH
    c.sample.update(guidance=3.4, annealed_guidance=True)
    c.mesh.update(fsdp=-1, data=1)
    return configlib.finish(c, arg)
