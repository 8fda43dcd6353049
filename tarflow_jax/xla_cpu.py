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
``forward`` reductions, with the        1.23× over YNNPACK for nothing, which was 1.42×
            layers traced inside        over the default (likelihood pass, batch 32)
            ``forward_pass_kernels``
``sample``  everything (XLA's default)  reductions only: 1.15× at batch 16, 1.00× at
                                        batch 1, 0.93× at batch 64 (cached inverse), so
                                        the samplers keep the default
==========  ==========================  ============================

:func:`compiler_options` gives the ``compiler_options`` for ``jax.jit`` of one program
kind. A ``"forward"`` program should trace its layers inside
:func:`tarflow_jax.layers.forward_pass_kernels` (as ``evaluate.jit_eval_step`` does): without
it YNNPACK takes each LayerNorm's reductions together with the weight product after it and
runs the product at its slower rate (the likelihood pass was then 0.90× the no-YNNPACK one).
The results differ from the default compile by float32 rounding only (summation order inside
the dots): train step 1e-9, forward ``z`` 6e-5 on values up to ~20.
Set the environment variable ``TARFLOW_XLA_CPU_TUNING=0`` to compile with XLA's defaults.

:func:`reuse_host_memory` (process-wide, called by ``tarflow_jax.main`` and the benchmark)
stops each execution's temporaries from being unmapped and page-faulted in again, and
:func:`settings`/:func:`describe` record what a process runs with beside benchmark figures.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax._src import xla_bridge

OPTION = "xla_cpu_experimental_ynn_fusion_type"
_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"
# YNNPACK fusion types kept per program kind (the rest go to XLA's own emitters); None:
# XLA's default list.
LIBRARY_FUSIONS: dict[str, tuple[str, ...] | None] = {"train": (_REDUCE,), "forward": (_REDUCE,), "sample": None}
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
    if not tuning_enabled():
        return None
    if LIBRARY_FUSIONS[program] is None or _platform(where) != "cpu" or jax.default_backend() != "cpu":
        return None
    value = ",".join(LIBRARY_FUSIONS[program])
    return {OPTION: value} if _supported(value) else None


# glibc's mallopt parameters (malloc.h) and the defaults restored if one cannot be set.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_MMAP_MAX = 65536
_NO_TRIM = -1  # M_TRIM_THRESHOLD=-1: glibc never returns freed heap memory to the system
_HOST_MEMORY_SETTINGS: dict[str, Any] = {}
_WARNED_LATE = [False]
_ASYNC = "jax_cpu_enable_async_dispatch"


def tuning_enabled() -> bool:
    """False when the environment variable ``TARFLOW_XLA_CPU_TUNING`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _glibc() -> Any:
    """glibc through ctypes, or ``None`` on another C library or system."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def reuse_host_memory() -> dict[str, Any]:
    """Lets a CPU process reuse the memory of one XLA execution's temporaries for the next.

    XLA:CPU allocates each execution's temporaries as one buffer (``temp_size_in_bytes`` of
    ``compiled.memory_analysis()``: 2.0 GiB for the ``small`` train step at batch 32) and
    frees it afterwards. glibc serves a buffer that large with a fresh ``mmap`` and unmaps
    it on free, so the kernel zero-fills every page again on the next step: 520k page faults
    and ~1 s of system CPU time per ``small`` train step on the benchmark machine. This
    function, process-wide and once:

    * tells glibc (``mallopt``) to serve large blocks from its heap instead of ``mmap``
      (``M_MMAP_MAX=0``) and never to give freed heap memory back (``M_TRIM_THRESHOLD=-1``);
    * turns off JAX's asynchronous dispatch on CPU (``jax_cpu_enable_async_dispatch``), so
      executions run on the calling thread, whose allocations come from glibc's main heap
      (a dispatch thread's large blocks would still be mapped and unmapped).

    Trade-offs: the process keeps its peak host memory until it exits, and host-side work
    (input pipeline, metrics) no longer overlaps a running CPU step. Results do not change.
    Measured on ``small``, batch 32 (``docs/performance.md``): page faults per train step
    520k → ~0; the step alone 2.60 → 2.22 s (1.17×). The library's entry points call it
    (``tarflow_jax.main`` and the benchmark); call it yourself first thing in your own CPU
    training or evaluation script.

    It starts JAX's backends (to learn the default one), so call it after
    ``jax.distributed.initialize`` if you use that, and before the first JAX computation
    (the CPU client reads the dispatch setting when it is created); called after JAX
    started, it logs a warning (once) and does nothing. (A dispatch setting changed by hand
    after JAX started would fool that check.) On a GPU/TPU default backend it undoes the
    ``mallopt`` settings and returns ``{}``; the host CPU client stays synchronous there.
    Also ``{}`` when the C library is not glibc or ``TARFLOW_XLA_CPU_TUNING=0``.

    Returns:
      The settings applied, e.g. ``{"jax_cpu_enable_async_dispatch": False,
      "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}``; ``{}`` when nothing was set.
    """
    if _HOST_MEMORY_SETTINGS:
        return dict(_HOST_MEMORY_SETTINGS)
    if not tuning_enabled():
        return {}
    libc = _glibc()
    if libc is None or _ASYNC not in jax.config.values:  # no glibc, or a JAX without the setting
        return {}
    # JAX has no public check for started backends; without the private one, assume started.
    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if started and jax.config.values[_ASYNC]:
        if not _WARNED_LATE[0]:
            _WARNED_LATE[0] = True
            logging.warning("tarflow_jax.xla_cpu.reuse_host_memory: JAX's backends already exist, so "
                            "executions stay asynchronous and their memory cannot be reused; call it "
                            "before the first JAX computation")
        return {}

    def restore_malloc() -> None:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)

    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)):
        restore_malloc()
        return {}
    jax.config.update(_ASYNC, False)
    if jax.default_backend() != "cpu":
        jax.config.update(_ASYNC, True)
        restore_malloc()
        return {}
    _HOST_MEMORY_SETTINGS.update({_ASYNC: False, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": _NO_TRIM})
    return dict(_HOST_MEMORY_SETTINGS)


def settings() -> dict[str, Any]:
    """What this process compiles and runs with: ``{"compiler_options": {program: options}, "host_memory": {...}}``.

    ``compiler_options`` maps each program kind of :data:`LIBRARY_FUSIONS` to
    :func:`compiler_options` on the default backend; ``host_memory`` is what
    :func:`reuse_host_memory` applied (``{}`` if it was not called or did nothing).
    Benchmarks record this beside their figures.
    """
    return {"compiler_options": {p: compiler_options(p) for p in LIBRARY_FUSIONS},
            "host_memory": dict(_HOST_MEMORY_SETTINGS)}


def describe(recorded: dict[str, Any]) -> str:
    """One line naming the XLA:CPU settings of a :func:`settings` record (for table headers)."""
    options = "on" if any((recorded.get("compiler_options") or {}).values()) else "off"
    memory = "reused" if recorded.get("host_memory") else "default"
    return f"XLA:CPU options {options}, host memory {memory}"
