"""CI helper: setup.cfg's lower bounds as pip constraints, and a report of what an env resolved.

    python .ci/versions.py constraints            # "jax==0.10.2" ... one per lower bound
    python .ci/versions.py requirements           # "jax>=0.10.2" ... (install_requires + test extra)
    python .ci/versions.py report                 # key packages and the Python of this env
    python .ci/versions.py report --lower-bounds  # ... and exit 1 unless each equals its bound
    python .ci/versions.py newest-python          # path of the newest CPython 3 here (> 3.11)

Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import configparser
import pathlib
import glob
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

SETUP_CFG = pathlib.Path(__file__).resolve().parents[1] / "setup.cfg"
# What the README and the CI log name; the rest come with these.
KEY_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "clu", "ml-collections",
                "tensorflow-cpu", "tensorflow-datasets", "numpy", "scipy", "torch", "torchvision", "libtpu",
                "pytest")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(>=|==)\s*([^,;\s]+)\s*$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: pathlib.Path = SETUP_CFG, extra: str = "test") -> list[str]:
    """The requirement lines of setup.cfg's ``install_requires`` and of ``extra``: what
    ``pip install -e '.[test]'`` asks for."""
    cfg = configparser.ConfigParser()
    cfg.read(path)
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip()]


def lower_bounds(path: pathlib.Path = SETUP_CFG) -> dict[str, str]:
    """``{normalized name: version}`` for every ``name>=version`` / ``name==version`` requirement
    of setup.cfg's ``install_requires`` and its ``test`` extra.

    Raises:
      ValueError: a requirement has no lower bound (CI could not say which version it tests).
    """
    bounds = {}
    for line in requirements(path):
        m = _REQ.match(line)
        if not m:
            raise ValueError(f"setup.cfg requirement {line!r} has no single lower bound "
                             "'name>=version'; CI pins each requirement to its lower bound")
        bounds[_normalize(m[1])] = m[3]
    return bounds


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def newest_python(newer_than: tuple[int, int] = (3, 11)) -> str:
    """Path of the newest CPython on this machine: ``python3.N`` on PATH or in pyenv's versions.

    Raises:
      FileNotFoundError: none newer than ``newer_than``.
    """
    candidates = {shutil.which(f"python3.{minor}") for minor in range(newer_than[1] + 1, 30)}
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates |= set(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python3.[0-9]*")))
    found = []
    for path in filter(None, candidates):
        if not re.fullmatch(r"python3\.\d+", os.path.basename(path)):
            continue  # python3.13t, python3.13-config, ...
        try:
            out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:3])"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue  # e.g. a pyenv shim of a version not selected
        version = tuple(map(int, out.split()))
        if version[:2] > newer_than:
            found.append((version, path))
    if not found:
        raise FileNotFoundError(f"no Python newer than {newer_than[0]}.{newer_than[1]} on PATH or in "
                                f"{pyenv_root}/versions; install one (pyenv install 3.13) or set "
                                "TARFLOW_CI_PYTHON")
    return max(found)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("constraints", help="print 'name==lower bound' lines for pip -c / PIP_CONSTRAINT")
    sub.add_parser("requirements", help="print setup.cfg's requirement lines (with the test extra's)")
    report = sub.add_parser("report", help="print the versions this env resolved")
    report.add_argument("--lower-bounds", action="store_true",
                        help="exit 1 unless every requirement is installed at its lower bound")
    sub.add_parser("newest-python", help="print the path of the newest Python 3 (> 3.11) here")
    args = parser.parse_args(argv)
    if args.cmd == "newest-python":
        try:
            print(newest_python())
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    if args.cmd == "requirements":
        print("\n".join(requirements()))
        return 0
    bounds = lower_bounds()
    if args.cmd == "constraints":
        print("\n".join(f"{name}=={version}" for name, version in bounds.items()))
        return 0
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    names = list(KEY_PACKAGES) + [n for n in bounds if n not in KEY_PACKAGES]
    print("  ".join(f"{n} {installed(n) or '-'}" for n in names))
    if args.lower_bounds:
        off = [f"{n} {installed(n) or 'missing'} (lower bound {v})" for n, v in bounds.items()
               if installed(n) != v]
        if off:
            print("not at setup.cfg's lower bounds: " + "; ".join(off), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
