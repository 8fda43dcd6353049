"""Per-program XLA:CPU compiler options (tarflow_jax.xla_cpu): where they apply and that they take effect."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import xla_cpu
from tarflow_jax.flow import TarFlow


def test_options_per_program_and_platform(monkeypatch):
    assert xla_cpu.compiler_options("forward", "cpu") == {xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_cpu.compiler_options("train", "cpu") == {xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_cpu.compiler_options("train") == xla_cpu.compiler_options("train", "cpu")  # default backend: CPU
    assert xla_cpu.compiler_options("sample", "cpu") is None  # the samplers keep XLA's defaults
    assert xla_cpu.compiler_options("train", "tpu") is None  # a TPU program (the aot dry run) keeps its defaults
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert xla_cpu.compiler_options("forward", mesh) == {xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}
    monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
    assert xla_cpu.compiler_options("train", "cpu") is None
    with pytest.raises(ValueError, match="program must be one of"):
        xla_cpu.compiler_options("backward", "cpu")


def _weight_products_in_ynnpack(compiled) -> list[str]:
    """The layers whose weight product (``qkv``, ``attn_out``, ``mlp_in``, ``mlp_out``) runs inside a YNNPACK fusion."""
    text = compiled.as_text()
    called = re.findall(r"kind=kCustom, calls=(%[\w.\-]+).*__ynn_fusion", text)
    found = []
    for name in called:
        body = re.search(re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", text, re.S).group(1)
        found += re.findall(r" dot\(.*op_name=\"[^\"]*/(qkv|attn_out|mlp_in|mlp_out)/", body)
    return found


def test_forward_program_keeps_ynnpack_for_reductions_with_the_same_result():
    from conftest import random_variables
    from tarflow_jax import layers

    # `small`'s layer shapes (8192 rows of width 256): at these sizes YNNPACK takes a LayerNorm's
    # reductions together with the weight product after it, unless the kernels below are on.
    model = TarFlow(img_size=32, in_channels=3, patch_size=2, channels=256, num_blocks=1, layers_per_block=1)
    variables = random_variables(model, seed=3)
    x = jax.random.uniform(jax.random.key(0), (32, 32, 32, 3), minval=-1, maxval=1)

    def fwd(v, x):  # as evaluate.jit_eval_step traces it
        with layers.forward_pass_kernels():
            return model.apply(v, x)

    default = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
    tuned = jax.jit(fwd, compiler_options=xla_cpu.compiler_options("forward", "cpu")).lower(variables, x).compile()
    # the option takes effect: by default YNNPACK runs the weight products (the LayerNorm in front
    # of each one fused in); in the tuned program every weight product is XLA's own `dot`
    assert _weight_products_in_ynnpack(default)
    assert not _weight_products_in_ynnpack(tuned)
    assert _weight_products_in_ynnpack(jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile(
        compiler_options=xla_cpu.compiler_options("forward", "cpu")))  # the options without the kernels
    for a, b in zip(default(variables, x), tuned(variables, x)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_reductions_only_gives_the_same_samples(tiny_uncond):
    model, variables = tiny_uncond
    z = jax.random.normal(jax.random.key(1), (2, model.img_size, model.img_size, model.in_channels))
    rev = lambda v, z: model.apply(v, z, method=TarFlow.reverse)
    default = jax.jit(rev)(variables, z)
    tuned = jax.jit(rev, compiler_options={xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_REDUCE"})(variables, z)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(default), rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(tuned)))


_FAULTS_PROBE = r"""
import os, resource, sys
import jax, jax.numpy as jnp
from tarflow_jax import xla_cpu
applied = xla_cpu.reuse_host_memory() if sys.argv[1] == "reuse" else {}
# One execution with a 256 MiB temporary (exp(x) is kept for the second reduction).
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) * jnp.arange(x.shape[0])[:, None]) + jnp.max(jnp.exp(x)))
x = jnp.ones((8192, 8192), jnp.float32)
c = f.lower(x).compile()
assert c.memory_analysis().temp_size_in_bytes >= 2**28, c.memory_analysis()
for _ in range(2):  # the heap's layout settles over the first executions
    jax.block_until_ready(c(x))
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(c(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[2])
"""


@pytest.mark.skipif(xla_cpu._glibc() is None, reason="reuse_host_memory needs glibc")
def test_reuse_host_memory_stops_refaulting_the_temporaries(tmp_path):
    """Counts page faults (not time; median of 5 executions): each re-faults its temporaries unless memory is reused."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_FAULTS_PROBE)
    env = {k: v for k, v in os.environ.items() if k != xla_cpu.ENV_SWITCH}
    faults = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                             check=True).stdout.strip().splitlines()[-1]
        applied, n = out.rsplit(" ", 1)
        faults[mode] = float(n)
        assert ("M_MMAP_MAX" in applied) == (mode == "reuse"), out
    pages = 2**28 / 4096
    assert faults["default"] > 0.5 * pages, faults  # the 256 MiB temporary is faulted in every time
    assert faults["reuse"] < 0.05 * pages, faults


def test_reuse_host_memory_off_switch(monkeypatch):
    monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
    monkeypatch.setattr(xla_cpu, "_HOST_MEMORY_SETTINGS", {})
    assert xla_cpu.reuse_host_memory() == {}
    assert xla_cpu.settings()["host_memory"] == {}
    assert xla_cpu.describe(xla_cpu.settings()) == "XLA:CPU options off, host memory default"


def test_reuse_host_memory_after_jax_started_warns_once_and_does_nothing(monkeypatch, caplog):
    monkeypatch.delenv(xla_cpu.ENV_SWITCH, raising=False)
    monkeypatch.setattr(xla_cpu, "_HOST_MEMORY_SETTINGS", {})
    monkeypatch.setattr(xla_cpu, "_WARNED_LATE", [False])
    jax.block_until_ready(jnp.ones(3) + 1)  # JAX has started
    if not jax.config.values.get("jax_cpu_enable_async_dispatch", True):
        pytest.skip("this process already runs with synchronous dispatch")
    with caplog.at_level("WARNING"):
        assert xla_cpu.reuse_host_memory() == {}
        assert xla_cpu.reuse_host_memory() == {}
    assert sum("before the first JAX computation" in r.getMessage() for r in caplog.records) == 1
