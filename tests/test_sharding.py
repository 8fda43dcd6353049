"""Meshes on 8 simulated CPU devices: data / FSDP / tensor sharding agree with one device.

The device count is fixed when JAX starts, so the checks run in one subprocess
(``tests/_sharding_worker.py``, ~1.5 min on 2 cores) that prints a JSON summary; the tests
below assert on it. Meshes: ``data 8``, ``data 4 × fsdp 2``, ``data 2 × fsdp 2 × tensor 2``.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tarflow_jax import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ("data8", "data4_fsdp2", "data2_fsdp2_tensor2")


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_sharding_worker.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["num_devices"] == 8
    return out


@pytest.mark.slow
def test_train_steps_match_one_device(results):
    ref = results["train"]["one_device"]["losses"]
    assert len(ref) == 3 and all(np.isfinite(ref)) and ref[0] != ref[2]
    for name in MESHES:
        r = results["train"][name]
        np.testing.assert_allclose(r["losses"], ref, rtol=2e-6, err_msg=name)
        # float32 reduction order only: AdamW steps of ~1e-3 agree to ~1e-7
        assert r["max_param_diff"] < 2e-6, (name, r["max_param_diff"])
        assert r["max_ema_diff"] < 2e-6 and r["max_opt_diff"] < 2e-6, name


@pytest.mark.slow
def test_large_arrays_are_sharded(results):
    shards = {name: results["train"][name]["shards"] for name in MESHES}
    for name, s in shards.items():
        assert s["mlp_in"][0] == [128, 512] and s["mlp_in"][2] == "P('fsdp', 'tensor')"
        assert s["qkv"][2] == "P('fsdp', None, 'tensor', None)"
    assert shards["data8"]["mlp_in"][1] == [128, 512]  # pure data parallelism: replicated
    assert shards["data4_fsdp2"]["mlp_in"][1] == [64, 512]
    assert shards["data2_fsdp2_tensor2"]["mlp_in"][1] == [64, 256]
    assert shards["data2_fsdp2_tensor2"]["qkv"][1] == [64, 3, 1, 64]  # one of the 2 heads
    for name in ("data4_fsdp2", "data2_fsdp2_tensor2"):  # optimizer state and EMA follow the params
        assert shards[name]["adam_mu_mlp_in"] == shards[name]["mlp_in"][1]
        assert shards[name]["ema_mlp_in"] == shards[name]["mlp_in"][1]


@pytest.mark.slow
def test_sharded_sampling_matches_one_device(results):
    s = results["sample"]
    assert s["std"] > 0.5  # a non-trivial sample
    for name in ("data8", "data2_fsdp2_tensor2", "data2_fsdp2_tensor2_denoise"):
        assert s[name]["max_diff"] < 1e-5, (name, s[name]["max_diff"])
        assert s[name]["replicated"] and s[name]["shape"] == [6, 8, 8, 1]  # 6 rows padded to 8
    assert s["data2_fsdp2_tensor2"]["params_sharded"]
    for name in ("data8", "data2_fsdp2_tensor2"):  # params gathered once; token loops talk to no one
        assert s[name]["loop_collectives"] == 0
    assert s["data2_fsdp2_tensor2"]["collectives"] > 0
    g = results["generate"]
    assert g["shape"] == [10, 8, 8, 1] and g["labels_equal"] and g["max_uint8_diff"] <= 1


@pytest.mark.slow
def test_sharded_evaluation_matches_one_device(results):
    e = results["eval"]
    assert e["sharded"]["num_examples"] == e["one_device"]["num_examples"] == 297
    for name in ("sharded", "device0_variables_data8"):
        np.testing.assert_allclose(e[name]["bpd"], e["one_device"]["bpd"], rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(results):
    c = results["checkpoint"]
    assert c["fsdp2_to_one"]["src_devices"] == 8 and c["fsdp2_to_one"]["dst_devices"] == 1
    assert c["one_to_fsdp2_tensor2"]["src_devices"] == 1 and c["one_to_fsdp2_tensor2"]["dst_devices"] == 8
    for name, r in c.items():
        assert r["equal"] and r["target_differed"] and r["restored_on_dst_mesh"] and r["step"] == 3, name
    assert c["fsdp2_to_one"]["restored_shard_shape"] == [128, 512]
    assert c["one_to_fsdp2_tensor2"]["restored_shard_shape"] == [64, 256]


def test_per_device_pads_and_trims():
    """``per_device`` on the 1-device (or whatever) mesh of this process: any batch size."""
    import jax
    import jax.numpy as jnp

    mesh = sharding.create_mesh({"data": -1})
    fn = sharding.per_device(lambda w, x, y: (x * w, None if y is None else y + 1), mesh)
    x = jnp.arange(5.0)
    out, none = jax.jit(fn)(jnp.float32(2.0), x, None)
    np.testing.assert_array_equal(out, 2 * np.arange(5.0))
    assert none is None
    with pytest.raises(ValueError, match="at least one batched array"):
        jax.jit(fn)(jnp.float32(2.0), None, None)
