"""Per-program XLA:CPU compiler options (tarflow_jax.xla_cpu): where they apply and that they take effect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import xla_cpu
from tarflow_jax.flow import TarFlow


def test_options_per_program_and_platform(monkeypatch):
    assert xla_cpu.compiler_options("forward", "cpu") == {xla_cpu.OPTION: ""}
    assert xla_cpu.compiler_options("train", "cpu") == {xla_cpu.OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_cpu.compiler_options("train") == xla_cpu.compiler_options("train", "cpu")  # default backend: CPU
    assert xla_cpu.compiler_options("sample", "cpu") is None  # the samplers keep XLA's defaults
    assert xla_cpu.compiler_options("train", "tpu") is None  # a TPU program (the aot dry run) keeps its defaults
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert xla_cpu.compiler_options("forward", mesh) == {xla_cpu.OPTION: ""}
    monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
    assert xla_cpu.compiler_options("train", "cpu") is None
    with pytest.raises(ValueError, match="program must be one of"):
        xla_cpu.compiler_options("backward", "cpu")


def test_forward_option_moves_dots_off_ynnpack_with_the_same_result(tiny_uncond):
    model, variables = tiny_uncond
    x = jax.random.uniform(jax.random.key(0), (4, model.img_size, model.img_size, model.in_channels),
                           minval=-1, maxval=1)
    fwd = lambda v, x: model.apply(v, x)
    default = jax.jit(fwd).lower(variables, x).compile()
    tuned = jax.jit(fwd, compiler_options=xla_cpu.compiler_options("forward", "cpu")).lower(variables, x).compile()
    # the option takes effect: the default hands the dots to YNNPACK, the tuned compile does not
    assert "ynn_fusion" in default.as_text() and "ynn_fusion" not in tuned.as_text()
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
