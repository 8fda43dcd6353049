"""Per-program XLA:CPU compiler options, chosen by measurement.

XLA:CPU (jaxlib 0.10) hands dots and reductions to the YNNPACK library by default
("library fusions": ``ynn_fusion`` in ``compiled.as_text()``). For TarFlow's shapes on the
2-core AVX-512 CPU this project is benchmarked on, XLA's own dot emitter ran the
projection and attention products 1.3–1.7× faster than YNNPACK (the same rate as the
authors' PyTorch), while YNNPACK's reductions (LayerNorm statistics, softmax sums, fused
into the neighbouring work) stayed faster. Measured per program, in one process,
alternating (``docs/performance.md``, "Side by side with the authors' code"):

==========  ==========================  ============================
program     YNNPACK keeps               against the default
==========  ==========================  ============================
``train``   reductions                  1.10× (train step, ``small``, batch 32)
``forward`` nothing                     1.42× (likelihood pass, batch 32)
``sample``  everything (XLA's default)  reductions only: 1.15× at batch 16, 1.00× at
                                        batch 1, 0.93× at batch 64 (cached inverse), so
                                        the samplers keep the default
==========  ==========================  ============================

:func:`compiler_options` gives the ``compiler_options`` for ``jax.jit`` of one program
kind. The results differ from the default compile by float32 rounding only (summation
order inside the dots): train step 1e-9, forward ``z`` 6e-5 on values up to ~20.
Set the environment variable ``TARFLOW_XLA_CPU_TUNING=0`` to compile with XLA's defaults.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

OPTION = "xla_cpu_experimental_ynn_fusion_type"
_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"
# YNNPACK fusion types kept per program kind (the rest go to XLA's own emitters); None:
# XLA's default list.
LIBRARY_FUSIONS: dict[str, tuple[str, ...] | None] = {"train": (_REDUCE,), "forward": (), "sample": None}
ENV_SWITCH = "TARFLOW_XLA_CPU_TUNING"


def _platform(where: Any) -> str:
    """The platform of a mesh, a device, a platform name, or (``None``) JAX's default backend."""
    if where is None:
        return jax.default_backend()
    if isinstance(where, str):
        return where
    if isinstance(where, jax.sharding.Mesh):
        return where.devices.flat[0].platform
    return getattr(where, "platform", "")


@functools.cache
def _supported(value: str) -> bool:
    """Whether this jaxlib's default (CPU) backend accepts ``OPTION=value`` (one tiny compile, cached)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={OPTION: value}).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # an unknown option or enum value in another jaxlib: keep XLA's defaults
        return False
    return True


def compiler_options(program: str, where: Any = None) -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a ``program`` kind on the platform of ``where``.

    Args:
      program: ``"train"``, ``"forward"`` (likelihood/eval passes) or ``"sample"`` (the
        samplers); see :data:`LIBRARY_FUSIONS`.
      where: a ``jax.sharding.Mesh``, a device, a platform name (``"cpu"``), or ``None`` for
        JAX's default backend.

    Returns:
      ``{"xla_cpu_experimental_ynn_fusion_type": ...}`` on CPU; ``None`` (XLA's defaults) for
      a program kind that keeps them (``"sample"``), on other platforms, when ``TARFLOW_XLA_CPU_TUNING=0``, or when this jaxlib does not
      accept the option (checked once with a tiny compile).

    Raises:
      ValueError: an unknown ``program``.
    """
    if program not in LIBRARY_FUSIONS:
        raise ValueError(f"program must be one of {sorted(LIBRARY_FUSIONS)}; got {program!r}")
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if LIBRARY_FUSIONS[program] is None or _platform(where) != "cpu" or jax.default_backend() != "cpu":
        return None
    value = ",".join(LIBRARY_FUSIONS[program])
    return {OPTION: value} if _supported(value) else None
