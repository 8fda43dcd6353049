"""Retired: the hand-written per-chip memory estimates (``tarflow_jax.memory`` / ``tools.memory``).

Their figures disagreed with what the TPU compiler plans (no test held them to it), so
they were removed in favour of the compiler itself: ``python -m tarflow_jax.aot --config=... --topology=...``
compiles a config for any TPU slice from a machine without a TPU and prints each
program's per-chip HBM (see ``docs/scaling.md``). Parameter counts: ``tarflow_jax.flow.count_params``.
"""

import sys

_MESSAGE = ("tarflow_jax.memory was retired (its hand estimates disagreed with the TPU compiler); "
            "use the compile-only dry run: python -m tarflow_jax.aot --config=configs/<name>.py "
            "--topology=v5p-32 (needs libtpu: pip install 'tarflow_jax[tpu]')")

if __name__ == "__main__":
    print(_MESSAGE, file=sys.stderr)
    sys.exit(2)
raise ImportError(_MESSAGE)
