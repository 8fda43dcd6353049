"""The paper configs hold the authors' training arguments, value by value.

EXPECTED is written from the reference README's commands (apple/ml-tarflow: `train.py` flags per
run), `utils.get_data` (resize + center crop + random flips in every run), `utils.CosineLRSchedule`
(linear warmup over one epoch from 1e-6, cosine to 1e-6) and `train.py` (AdamW β (0.9, 0.95),
weight decay 1e-4, no clipping, no EMA; bfloat16 autocast exactly when the noise is Gaussian).
A config edit that drifts from the run it claims to reproduce fails here by name.
"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (dataset (name, source), img, patch, width, blocks, layers, classes, noise, sigma, drop,
#        batch, epochs, train images, eval split, eval guidance (cfg, annealed))
EXPECTED = {
    "imagenet64_bpd": (("tfds", "downsampled_imagenet/64x64"), 64, 2, 768, 8, 8, 0, "uniform", 0.0, 0.0,
                       256, 100, 1_281_167, "validation", (0.0, False)),
    "imagenet64_bpd_official": (("imagenet_official", None), 64, 2, 768, 8, 8, 0, "uniform", 0.0, 0.0,
                                256, 100, 1_281_167, "val", (0.0, False)),
    "imagenet64_uncond": (("imagenet_official", None), 64, 2, 768, 8, 8, 0, "gaussian", 0.05, 0.0,
                          256, 200, 1_281_167, "val", (0.0, False)),
    "imagenet64_cond": (("tfds", "imagenet2012"), 64, 2, 768, 8, 8, 1000, "gaussian", 0.05, 0.1,
                        256, 200, 1_281_167, "validation", (2.3, True)),
    "imagenet128_cond": (("tfds", "imagenet2012"), 128, 4, 1024, 8, 8, 1000, "gaussian", 0.15, 0.1,
                         768, 320, 1_281_167, "validation", (1.5, True)),
    "afhq256": (("folder", None), 256, 8, 768, 8, 8, 3, "gaussian", 0.07, 0.1,
                256, 4000, 14_630, "val", (3.4, True)),
}


def load(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_matches_the_authors_run(name):
    module, c = load(name)
    ((source, tfds_name), img, patch, width, blocks, layers, classes, noise, sigma, drop, batch, epochs,
     images, eval_split, (guidance, annealed)) = EXPECTED[name]
    steps_per_epoch = images // batch  # the reference's len(data_loader) with drop_last=True
    got = {
        "dataset.name": c.dataset.name, "dataset.image_size": c.dataset.image_size,
        "model.patch_size": c.model.patch_size, "model.width": c.model.width, "model.num_blocks": c.model.num_blocks,
        "model.layers_per_block": c.model.layers_per_block, "model.num_classes": c.model.num_classes,
        "model.head_dim": c.model.head_dim, "model.expansion": c.model.expansion, "model.nvp": c.model.nvp,
        "noise": c.noise, "label_drop": c.label_drop, "batch_size": c.batch_size,
        "dataset.random_flip": c.dataset.random_flip, "dataset.eval_split": c.dataset.eval_split,
        "learning_rate": c.learning_rate, "min_learning_rate": c.min_learning_rate,
        "warmup_steps": c.warmup_steps, "num_train_steps": c.num_train_steps,
        "b1": c.b1, "b2": c.b2, "weight_decay": c.weight_decay, "grad_clip_norm": c.grad_clip_norm,
        "ema_decay": c.ema_decay, "model.dtype": c.model.dtype,
        "sample.guidance": c.sample.guidance, "matmul_precision": c.get("matmul_precision", "default"),
    }
    want = {
        "dataset.name": source, "dataset.image_size": img, "model.patch_size": patch, "model.width": width, "model.num_blocks": blocks, "model.layers_per_block": layers,
        "model.num_classes": classes, "model.head_dim": 64, "model.expansion": 4, "model.nvp": True,
        "noise": noise, "label_drop": drop, "batch_size": batch,
        "dataset.random_flip": True, "dataset.eval_split": eval_split,
        "learning_rate": 1e-4, "min_learning_rate": 1e-6,
        "warmup_steps": steps_per_epoch, "num_train_steps": epochs * steps_per_epoch,
        "b1": 0.9, "b2": 0.95, "weight_decay": 1e-4, "grad_clip_norm": 0.0, "ema_decay": 0.0,
        # The reference autocasts to bfloat16 exactly for Gaussian-noise (generation) runs.
        "model.dtype": "bfloat16" if noise == "gaussian" else "float32",
        # ... and multiplies float32 runs in true float32 (PyTorch's allow_tf32=False default for matmuls).
        "matmul_precision": "default" if noise == "gaussian" else "highest",
        "sample.guidance": guidance,
    }
    if noise == "gaussian":
        got["noise_std"], want["noise_std"] = c.noise_std, sigma
    if tfds_name is not None:
        got["dataset.tfds_name"], want["dataset.tfds_name"] = c.dataset.tfds_name, tfds_name
    if guidance:
        got["sample.annealed_guidance"], want["sample.annealed_guidance"] = c.sample.annealed_guidance, annealed
        got["sample.guide_what"], want["sample.guide_what"] = c.sample.guide_what, "ab"
    if img != 64 or c.dataset.name in ("tfds", "folder") and tfds_name != "downsampled_imagenet/64x64":
        got["dataset.resize"], want["dataset.resize"] = c.dataset.resize, "center_crop"
    drift = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not drift, f"configs/{name}.py drifted from the authors' run (field: (config, reference)): {drift}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_docstring_gives_provenance(name):
    module, _ = load(name)
    doc = module.__doc__
    assert "Provenance" in doc and "reference" in doc
    for field in ("warmup_steps", "num_train_steps"):
        assert field in doc, f"configs/{name}.py docstring does not say where {field} comes from"
