"""Shared command-line plumbing for the absl tools in ``tarflow_jax.tools``."""

from __future__ import annotations

import re
import sys
from typing import Any, Sequence

from absl import flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def usage_error(prog: str, message: str, usage: str) -> int:
    """Prints ``prog: error: message`` and the usage text to stderr; returns exit status 2."""
    message = re.sub(r"\s+", " ", message).strip()
    print(f"{prog}: error: {message}\n\n{usage}", file=sys.stderr)
    return 2


def parse_flags(fv: Any, argv: Sequence[str], prog: str, usage: str) -> list[str] | int:
    """Parses ``argv`` into the flag set ``fv``: the leftover arguments, or an exit status.

    Help flags print the usage and the flags (status 0); bad flags or stray arguments print
    a usage error (status 2).
    """
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage + "\nflags:\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = fv(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        return usage_error(prog, str(e), usage)
    if len(rest) > 1:
        return usage_error(prog, f"unexpected arguments {rest[1:]}", usage)
    return rest


def config_load_error(fv: Any, section: str) -> str | None:
    """Why ``--config`` cannot be loaded (reading ``config.<section>``), or None when it loads."""
    try:
        fv.config[section]  # an unreadable config file raises here
    except Exception as e:  # noqa: BLE001 - report any failure to load the config file
        return f"cannot load {fv['config'].serialize()}: {e}"
    return None
