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
from absl import flags

from tarflow_jax import JacobiPlan, TarFlow, xla_cpu
from tarflow_jax.tools import benchmark
from tarflow_jax.layers import unstack_layers


@pytest.mark.slow
def test_smoke_benchmark_writes_json(tmp_path):
    out = tmp_path / "smoke.json"
    result = benchmark.run(benchmark.parse_args([
        "benchmark", "--size=smoke", "--steps=2", "--warmup=1", "--what=train,forward,sample,jacobi",
        "--jacobi_segments=1,3", f"--out={out}"]))
    data = json.loads(out.read_text())
    batch = benchmark.DEFAULT_BATCH["smoke"]
    assert data["size"] == "smoke" and data["batch"] == batch
    for key in ("device", "dtype", "scan", "remat", "params", "peak_tflops", "peak_tflops_source",
                "flops_method", "analytic_flops", "jax_version", "results", "xla_cpu"):
        assert key in data, key
    assert data["xla_cpu"]["compiler_options"]["sample"] is None
    assert "XLA:CPU options on" in benchmark.format_table(data)
    # what the benchmark did about host memory is recorded and named in the header (in this
    # process JAX started before the benchmark, so reuse_host_memory had to leave it alone)
    assert data["xla_cpu"]["host_memory"] == xla_cpu.settings()["host_memory"]
    assert "host memory " in benchmark.format_table(data)
    model = benchmark.make_model("smoke")
    assert data["params"] == benchmark.count_params(benchmark.random_variables(model)["params"]) > 0
    flops = benchmark.flop_counts(model, batch)
    assert data["analytic_flops"] == flops and flops["train"] == 3 * flops["forward"] > 0
    res = data["results"]
    assert set(res) == {"train", "forward", "sample", "jacobi_s1", "jacobi_s3"}
    for name, entry in res.items():
        times = entry["times_s"]
        assert len(times) == 2 and all(np.isfinite(t) and t > 0 for t in times), name
        assert entry["median_s"] == pytest.approx(float(np.median(times)))
        assert entry["images_per_s"] == pytest.approx(batch / entry["median_s"])
        assert entry["lower_s"] > 0 and entry["compile_s"] > 0
        assert entry["compile_total_s"] == pytest.approx(entry["lower_s"] + entry["compile_s"])
        assert entry["model_flops"] > 0
        assert entry["model_tflops_per_s"] == pytest.approx(entry["model_flops"] / entry["median_s"] / 1e12)
        assert entry["mfu"] is None  # no known peak on CPU
        mem = entry["memory"]
        assert "device_peak_bytes" in mem and (mem.get("xla_total_bytes") or mem.get("xla_peak_bytes")) > 0
        if entry.get("xla_flops") is not None:
            assert entry["xla_flops"] > 0
    for name in ("train", "forward", "sample"):
        assert res[name]["model_flops"] == flops[name]
    assert np.isfinite(res["train"]["loss"])
    token_steps = model.num_blocks * (model.num_tokens - 1)
    assert res["sample"]["token_steps"] == token_steps and res["sample"]["finite"]
    assert res["sample"]["ms_per_token_step"] == pytest.approx(1e3 * res["sample"]["median_s"] / token_steps)
    for name, segments in (("jacobi_s1", 1), ("jacobi_s3", 3)):
        jac = res[name]
        iterations = np.asarray(jac["iterations"])
        assert jac["max_abs_diff_vs_cached"] < 1e-3 and jac["finite"]
        assert iterations.shape == (2, segments) and jac["total_iterations"] == iterations.sum()
        # every segment iterates at least once and at most its length (exact after that many)
        lengths = np.diff(benchmark.sampling.segment_bounds(model.num_tokens, segments))
        assert np.all(iterations >= 1) and np.all(iterations <= lengths)
        assert jac["model_flops"] == benchmark.jacobi_flops(model, batch, segments, iterations)
        # a Jacobi iteration over a whole segment costs at least the cached steps it replaces
        assert jac["model_flops"] >= flops["sample"] * jac["total_iterations"] / token_steps
        assert jac["speedup_vs_cached"] == pytest.approx(res["sample"]["median_s"] / jac["median_s"])
    assert result["results"]["train"]["images_per_s"] == res["train"]["images_per_s"]
    assert "| train |" in benchmark.format_table(data)


def test_compile_only_uses_abstract_state(tmp_path):
    result = benchmark.run(benchmark.parse_args(["benchmark", "--size=smoke", "--what=train", "--compile_only",
                                                 "--noscan", "--remat"]))
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


def test_parse_args_flags(tmp_path):
    args = benchmark.parse_args(["benchmark", "--size=small", "--noscan", "--remat", "--what=forward,sample",
                                 "--dtype=bfloat16", "--peak_tflops=100", "--jacobi_segments=2,4"])
    assert (args.scan, args.remat, args.what, args.dtype, args.peak_tflops, args.jacobi_segments, args.batch) == (
        False, True, ["forward", "sample"], "bfloat16", 100.0, [2, 4], benchmark.DEFAULT_BATCH["small"])
    assert benchmark.parse_args(["benchmark"]).scan is True  # the paper configs' setting
    ref = tmp_path / "transformer_flow.py"
    ref.write_text("")  # only its presence is checked when the flags are read
    assert benchmark.parse_args(["benchmark", f"--reference={tmp_path}"]).scan is False  # TarFlow's default
    assert benchmark.parse_args(["benchmark", f"--reference={ref}", "--scan"]).scan is True
    with pytest.raises(flags.Error, match="--what"):
        benchmark.parse_args(["benchmark", "--what=train,bogus"])
    with pytest.raises(flags.Error):
        benchmark.parse_args(["benchmark", "--size=huge"])


@pytest.mark.slow
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


# ------------------------------------------------------------- side by side with the authors' code
def reference_dir():
    """The folder of the authors' transformer_flow.py ($TARFLOW_REFERENCE_DIR), or skip."""
    import os
    import pathlib

    path = os.environ.get("TARFLOW_REFERENCE_DIR")
    if not path or not (pathlib.Path(path) / "transformer_flow.py").is_file():
        pytest.skip("the authors' transformer_flow.py not found: set TARFLOW_REFERENCE_DIR to a clone of "
                    "https://github.com/apple/ml-tarflow")
    return path


def test_reference_comparison_runs_and_agrees(tmp_path):
    path = reference_dir()
    out = tmp_path / "ref.json"
    result = benchmark.run(benchmark.parse_args([
        "benchmark", "--size=smoke", "--steps=1", "--warmup=0", f"--reference={path}",
        "--reference_train_batch=4", "--reference_sample_batch=2", f"--out={out}"]))
    ref = json.loads(out.read_text())["reference"]
    assert ref == json.loads(json.dumps(result["reference"]))
    agree = ref["agreement"]
    assert agree["forward_z_max_abs_diff"] < 1e-4 and agree["forward_logdet_per_dim_max_abs_diff"] < 1e-5
    assert agree["sample_x_max_abs_diff"] < 1e-3
    for name in ("train", "forward", "sample"):
        entry = ref[name]
        assert entry["ratio"] == entry["theirs_median_s"] / entry["ours_median_s"] > 0
    # one AdamW step of each program from the same weights on the same images: similar losses
    assert abs(ref["train"]["ours_first_loss"] - ref["train"]["theirs_first_loss"]) < 0.05
    assert "| train step, batch 4" in benchmark.benchmark_reference.format_reference(ref)
    # without --scan the comparison builds TarFlow's default (unscanned) model and says so
    assert result["scan"] is False and ref["model"]["scan_layers"] is False
    assert "scan_layers=False" in benchmark.benchmark_reference.format_reference(ref)
    assert ref["xla_cpu"]["compiler_options"]["forward"] == {"xla_cpu_experimental_ynn_fusion_type":
                                                            "LIBRARY_FUSION_TYPE_REDUCE"}  # CPU here
    assert "XLA:CPU options on" in benchmark.benchmark_reference.format_reference(ref)


def test_reference_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="transformer_flow.py"):
        benchmark.benchmark_reference.load_reference_module(str(tmp_path))
    assert benchmark.main(["benchmark", "--reference=/nowhere", "--what=jacobi"]) == 2
    # a wrong folder is a usage error before anything is built (no traceback)
    assert benchmark.main(["benchmark", f"--reference={tmp_path}", "--what=train"]) == 2
    assert "no transformer_flow.py there" in capsys.readouterr().err
