"""tarflow_jax.memory: exact parameter counts and shardings, monotone memory estimates."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from tarflow_jax import TarFlow, sharding
from tarflow_jax.tools import memory

SMALL = dict(img_size=8, in_channels=3, patch_size=2, channels=64, num_blocks=2, layers_per_block=2,
             num_classes=3)
IMAGENET64 = dict(img_size=64, in_channels=3, patch_size=2, channels=768, num_blocks=8, layers_per_block=8,
                  num_classes=0)
IMAGENET128 = dict(img_size=128, in_channels=3, patch_size=4, channels=1024, num_blocks=8,
                   layers_per_block=8, num_classes=1000)


def abstract_params(**cfg):
    model = TarFlow(**cfg)
    y = jnp.zeros((1,), jnp.int32) if cfg.get("num_classes") else None
    x = jnp.zeros((1, cfg["img_size"], cfg["img_size"], cfg.get("in_channels", 3)))
    return jax.eval_shape(model.init, jax.random.key(0), x, y)["params"]


def test_count_params_matches_a_real_init():
    variables = TarFlow(**SMALL).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
    params = nn.meta.unbox(variables["params"])
    assert memory.count_params(SMALL) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("cfg", [
    dict(SMALL, scan_layers=True),
    dict(SMALL, num_classes=0, nvp=False, in_channels=1, patch_size=1, channels=128),
    dict(SMALL, img_size=16, patch_size=4, layers_per_block=3, expansion=2, scan_layers=True),
])
def test_param_specs_mirror_the_model(cfg):
    boxed = abstract_params(**cfg)
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    real = sorted((tuple(x.shape), tuple(n)) for x, n in zip(leaves, names))
    mine = sorted((s.shape, s.axes) for s in memory.param_specs(cfg))
    assert mine == real
    assert memory.count_params(cfg) == sum(math.prod(x.shape) for x in leaves)


@pytest.mark.parametrize("scan", [False, True])
def test_param_shards_match_the_trainer_shardings(scan):
    cfg = dict(SMALL, channels=128, scan_layers=scan)
    boxed = abstract_params(**cfg)
    mesh = AbstractMesh((1, 1, 4, 2), sharding.MESH_AXES)
    shardings = sharding.logical_shardings(boxed, mesh)
    leaves = nn.meta.unbox(boxed)
    per_chip = sum(jax.tree.leaves(jax.tree.map(lambda s, x: math.prod(s.shard_shape(x.shape)),
                                                shardings, leaves)))
    est = memory.estimate_memory(cfg, 1, {"data": 1, "fsdp": 4, "tensor": 2}, ema=True, remat=False)
    assert est["params"] == 4 * per_chip
    assert est["optimizer"] == 2 * est["params"] and est["ema"] == est["grads"] == est["params"]


def test_paper_sizes():
    def closed_form(T, D, W, classes, blocks=8, layers=8):
        return blocks * (D * W + W + T * W + classes * W + W * 2 * D + 2 * D + layers * (12 * W * W + 13 * W))

    assert memory.count_params(IMAGENET64) == closed_form(1024, 12, 768, 0) == 460_142_784  # ~460M
    assert memory.count_params(IMAGENET128) == closed_form(1024, 48, 1024, 1000) == 823_927_552  # ~820M


def test_estimates_are_monotone():
    kw = dict(ema=False, compute_dtype="bfloat16")
    by_fsdp = [memory.estimate_memory(IMAGENET64, 8, {"fsdp": f}, remat=False, **kw) for f in (1, 4, 32)]
    for key in ("params", "optimizer", "grads", "total"):
        assert by_fsdp[0][key] > by_fsdp[1][key] > by_fsdp[2][key], key
    by_tensor = [memory.estimate_memory(IMAGENET64, 8, {"fsdp": 4, "tensor": t}, remat=False, **kw)
                 for t in (1, 2, 4)]
    assert by_tensor[0]["total"] > by_tensor[1]["total"] > by_tensor[2]["total"]
    off = memory.estimate_memory(IMAGENET64, 8, {"fsdp": 32}, remat=False, **kw)
    on = memory.estimate_memory(IMAGENET64, 8, {"fsdp": 32}, remat=True, **kw)
    assert on["activations"] < off["activations"] / 10 and on["total"] < off["total"]
    assert off["activations_remat"] == on["activations"] and on["activations_no_remat"] == off["activations"]
    more = memory.estimate_memory(IMAGENET64, 16, {"fsdp": 32}, remat=True, **kw)
    assert more["activations"] > on["activations"]
    ema = memory.estimate_memory(IMAGENET64, 8, {"fsdp": 32}, ema=True, remat=True, compute_dtype="bfloat16")
    assert ema["total"] - on["total"] == on["params"]
    fp32 = memory.estimate_memory(IMAGENET64, 8, {"fsdp": 32}, ema=False, remat=True, compute_dtype="float32")
    assert fp32["activations"] > on["activations"]
    budget = 80e9
    b = memory.max_batch_per_chip(IMAGENET64, {"fsdp": 32}, False, True, "bfloat16", budget)
    assert memory.estimate_memory(IMAGENET64, b, {"fsdp": 32}, remat=True, **kw)["total"] <= budget
    assert memory.estimate_memory(IMAGENET64, b + 1, {"fsdp": 32}, remat=True, **kw)["total"] > budget


def test_activation_estimate_tracks_xla_on_cpu():
    """The estimate is within 25% of XLA's temp buffers for the gradient of a small float32 model."""
    cfg = dict(img_size=16, in_channels=3, patch_size=1, channels=128, num_blocks=1, layers_per_block=2,
               scan_layers=True)
    b = 2
    x = jnp.zeros((b, 16, 16, 3))
    for remat in (False, True):
        model = TarFlow(**cfg, remat=remat)
        params = nn.meta.unbox(abstract_params(**cfg))

        def loss(p, x):
            z, logdet = model.apply({"params": p}, x)
            return jnp.mean(z ** 2) - jnp.mean(logdet)

        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("no memory analysis on this backend")
        est = memory.estimate_memory(cfg, b, {}, ema=False, remat=remat)["activations"]
        assert 0.75 < analysis.temp_size_in_bytes / est < 1.25, (remat, analysis.temp_size_in_bytes, est)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch_per_chip"):
        memory.estimate_memory(SMALL, 0, {}, ema=False, remat=False)
    with pytest.raises(ValueError, match="compute_dtype"):
        memory.estimate_memory(SMALL, 1, {}, ema=False, remat=False, compute_dtype="int8")
    with pytest.raises(ValueError, match="mesh"):
        memory.estimate_memory(SMALL, 1, {"fsdp": -1}, ema=False, remat=False)


def test_main_prints_tables(capsys):
    assert memory.main(["memory", "--configs=digits"]) == 0
    out = capsys.readouterr().out
    assert "| digits |" in out and "TPU v5p" in out and "fewest chips" in out
