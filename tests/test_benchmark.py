"""The benchmark suite runs end to end at the smoke size and writes every field; no timing assertions.

Also checks the sampling paths the benchmark exercises: a scanned stack's cached and
Jacobi inverses equal the unscanned ones (the layer cache is per-layer buffers, and a
scanned stack samples through its unrolled layers).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import JacobiPlan, TarFlow, benchmark
from tarflow_jax.layers import unstack_layers


def test_smoke_benchmark_writes_json(tmp_path):
    out = tmp_path / "smoke.json"
    result = benchmark.run(["--size=smoke", "--steps=2", "--warmup=1", "--what=train,forward,sample,jacobi",
                            "--jacobi_segments=1,3", f"--out={out}"])
    data = json.loads(out.read_text())
    assert data["size"] == "smoke" and data["batch"] == benchmark.DEFAULT_BATCH["smoke"]
    for key in ("device", "dtype", "scan", "remat", "params", "peak_tflops", "peak_tflops_source",
                "flops_method", "analytic_flops", "jax_version", "results"):
        assert key in data, key
    assert data["params"] > 0
    res = data["results"]
    assert set(res) == {"train", "forward", "sample", "jacobi_s1", "jacobi_s3"}
    for name, entry in res.items():
        for key in ("compile_s", "lower_s", "times_s", "median_s", "images_per_s", "memory"):
            assert key in entry, (name, key)
        assert len(entry["times_s"]) == 2 and entry["images_per_s"] > 0
        assert "model_flops" in entry and "mfu" in entry
        mem = entry["memory"]
        assert "device_peak_bytes" in mem and (mem.get("xla_total_bytes") or mem.get("xla_peak_bytes"))
    assert np.isfinite(res["train"]["loss"])
    assert res["sample"]["ms_per_token_step"] > 0 and res["sample"]["finite"]
    for name in ("jacobi_s1", "jacobi_s3"):
        jac = res[name]
        assert jac["max_abs_diff_vs_cached"] < 1e-3
        assert np.asarray(jac["iterations"]).shape == (2, jac["segments"])
        assert jac["total_iterations"] >= 2 and "speedup_vs_cached" in jac
        assert jac["iteration_count_path_max_abs_diff"] == 0.0
    assert result["results"]["train"]["images_per_s"] == res["train"]["images_per_s"]
    assert "| train |" in benchmark.format_table(data)


def test_compile_only_uses_abstract_state(tmp_path):
    result = benchmark.run(["--size=smoke", "--what=train", "--compile_only", "--noscan", "--remat"])
    entry = result["results"]["train"]
    assert entry["compile_only"] and entry["compile_s"] > 0 and "times_s" not in entry
    assert result["scan"] is False and result["remat"] is True


def test_peak_table_and_flops():
    assert benchmark.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert benchmark.known_peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert benchmark.known_peak_tflops("TPU v5 lite") == 197
    assert benchmark.known_peak_tflops("TPU v4") == 275
    assert benchmark.known_peak_tflops("cpu") is None
    model = benchmark.make_model("small")
    flops = benchmark.flop_counts(model, batch=2)
    t, w = 256, 256
    per_layer = 24 * w * w * t + 4 * t * t * w
    per_block = 2 * per_layer + 2 * t * (12 * w + w * 24)
    assert flops["forward"] == 2 * 4 * per_block and flops["train"] == 3 * flops["forward"]


def test_parse_args_flags():
    args = benchmark.parse_args(["--size=small", "--noscan", "--remat", "--what=forward,sample",
                                 "--dtype=bfloat16", "--peak_tflops=100"])
    assert (args.scan, args.remat, args.what, args.dtype, args.peak_tflops) == (
        False, True, ["forward", "sample"], "bfloat16", 100.0)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--what=train,bogus"])


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_scanned_sampling_matches_unscanned(guidance):
    kw = dict(img_size=8, in_channels=1, patch_size=2, channels=64, num_blocks=2, layers_per_block=3,
              num_classes=3)
    scanned, unrolled = TarFlow(**kw, scan_layers=True), TarFlow(**kw, scan_layers=False)
    variables = benchmark.random_variables(scanned, seed=2, head_std=0.1)
    flat = {**variables, "params": unstack_layers(variables["params"])}
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
    y = jnp.array([0, 2])
    z, _ = scanned.apply(variables, x, y)
    z_flat, _ = unrolled.apply(flat, x, y)
    np.testing.assert_allclose(z, z_flat, atol=1e-5)
    kw = dict(guidance=guidance, attn_temp=0.7, method=TarFlow.reverse)
    for solver, plan in (("cached", None), ("jacobi", JacobiPlan(segments=2))):
        a = scanned.apply(variables, z, y, solver=solver, jacobi=plan, **kw)
        b = unrolled.apply(flat, z, y, solver=solver, jacobi=plan, **kw)
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=solver)
        if guidance == 0.0:
            np.testing.assert_allclose(a, x, atol=1e-4, err_msg=solver)
