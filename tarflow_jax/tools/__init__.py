"""Command-line tools, off the library's import path (nothing in ``tarflow_jax`` imports them).

* ``python -m tarflow_jax.tools.benchmark``: train step, likelihood pass and samplers:
  speed, compile time, memory, FLOPs.
* ``python -m tarflow_jax.tools.fid``: FID of a samples ``.npz``; reference statistics.
* ``python -m tarflow_jax.tools.convert``: the authors' PyTorch checkpoint as a workdir.
* ``python -m tarflow_jax.tools.baselines``: bits/dim of per-pixel histogram baselines.
* ``python -m tarflow_jax.aot`` (= ``tarflow_jax.tools.aot``): compile-only TPU dry run of a
  config on any slice, from a machine without a TPU (``libtpu`` needed: the ``tpu`` extra).
"""
