"""evaluate_bits_per_dim: the whole split once, K draws, s.e., IW bound, with and without labels."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from tarflow_jax import evaluate, input_pipeline, sharding
from tarflow_jax.flow import TarFlow
from tarflow_jax.likelihood import bits_per_dim, dequantize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def digits_config():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.eval.batch_size = 200  # two batches over the 297 test images, the second padded
    return config


def test_conditional_and_unconditional_bits_per_dim_match_a_direct_computation():
    config = digits_config()
    model = TarFlow(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=1,
                    num_classes=10)
    variables = random_variables(model, seed=5)
    mesh = sharding.create_mesh(config.mesh)
    k = 4
    result = evaluate.evaluate_bits_per_dim(model, variables, config, mesh, num_draws=k, seed=3)

    # Direct: the same draws (key fold_in(PRNGKey(seed), batch index), split into K), every image once.
    per_mode = {None: [], "labels": []}
    for i, batch in enumerate(input_pipeline.create_eval_iterator(config, 200, 0, 1)):
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), i), k)
        mask = batch["mask"]
        for mode in per_mode:
            y = jnp.asarray(batch["label"]) if mode else None
            draws = np.stack([np.asarray(bits_per_dim(*model.apply(variables, dequantize(key, jnp.asarray(batch["image"]), 17), y), 17))
                              for key in keys])  # (K, B)
            per_mode[mode].append(draws[:, mask])
    for mode, name in ((None, None), ("labels", "conditional")):
        draws = np.concatenate(per_mode[mode], axis=1)  # (K, 297)
        got = result if name is None else result[name]
        mean = draws.mean(axis=0)
        nats = draws * 64 * math.log(2)
        iw = -(np.logaddexp.reduce(-nats, axis=0) - math.log(k)) / (64 * math.log(2))
        assert got["bpd"] == pytest.approx(mean.mean(), abs=2e-5)
        assert got["bpd_se"] == pytest.approx(mean.std(ddof=1) / math.sqrt(len(mean)), rel=1e-3)
        assert got["iw_bpd"] == pytest.approx(iw.mean(), abs=2e-5)
        assert got["iw_bpd"] <= got["bpd"]
    assert result["num_examples"] == 297 and result["num_draws"] == k
    assert result["conditional"]["bpd"] != result["bpd"]


def test_one_draw_iw_bound_equals_the_plain_bound_and_unconditional_models_have_one_mode(tiny_uncond, monkeypatch):
    config = digits_config()
    config.dataset.update(channels=3)
    model, variables = tiny_uncond
    images = np.random.default_rng(0).integers(0, 17, (10, 8, 8, 3)).astype(np.uint8)

    class Source:  # ten RGB images as an in-memory dataset
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image": images[i], "label": np.int32(0)}

    monkeypatch.setattr(input_pipeline, "create_source", lambda config, split: Source())
    config.eval.batch_size = 8
    result = evaluate.evaluate_bits_per_dim(model, variables, config, sharding.create_mesh(config.mesh))
    assert "conditional" not in result and result["num_examples"] == 10
    assert result["iw_bpd"] == pytest.approx(result["bpd"], abs=1e-6)
