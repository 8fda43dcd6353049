"""Deprecated: moved to :mod:`tarflow_jax.tools.fid` (``python -m tarflow_jax.tools.fid``).

``python -m tarflow_jax.fid_cli`` and attribute access still work for one release, with a
FutureWarning.
"""

import importlib
import runpy
import warnings

_NEW = "tarflow_jax.tools.fid"
_MESSAGE = f"tarflow_jax.fid_cli is deprecated; use {_NEW} (python -m {_NEW})"


def __getattr__(name: str):
    warnings.warn(_MESSAGE, FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(_NEW), name)


if __name__ == "__main__":
    warnings.warn(_MESSAGE, FutureWarning, stacklevel=1)
    runpy.run_module(_NEW, run_name="__main__", alter_sys=True)
