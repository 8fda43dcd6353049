"""``python -m tarflow_jax.aot``: the compile-only TPU dry run (see :mod:`tarflow_jax.tools.aot`)."""

from tarflow_jax.tools.aot import run

if __name__ == "__main__":
    run()
