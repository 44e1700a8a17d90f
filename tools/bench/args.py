"""What every tool's command line shares: argument types that refuse bad
values while parsing (argparse names the flag and exits 2, no traceback),
one help style, and the program name.

A tool checks everything it can before it does any work: a bad value found
after a minute of load (or after starting a database) is a value the user
has to type again and a run they have to wait for again.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

# The install hint for the optional plotting dependency (the ``plot`` extra).
PLOT_HINT = "pip install -c requirements/lock.txt '.[plot]'"


def prog(tool: str) -> str:
    """``tools/NAME`` from a checkout; the command's own name when run as an
    installed entry point (``batchscheduler-…``)."""
    invoked = os.path.basename(sys.argv[0] if sys.argv else "")
    return invoked if invoked.startswith("batchscheduler-") else f"tools/{tool}"


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` once: not when the help already speaks of its
    default, and not for defaults that mean "not given" (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
            or (action.nargs == 0 and default is True)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _number(text: str, convert: Callable[[str], float | int], kind: str) -> float | int:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = int(_number(text, int, "an integer"))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(_number(text, float, "a number"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def int_list(low: int, high: int) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of integers in ``[low, high]``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"must name at least one value, got {text!r}")
        bad = [v for v in values if not low <= v <= high]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be between {low} and {high}, got {bad[0]}")
        return values

    parse.__name__ = "list"
    return parse


def dsn(text: str) -> str:
    """argparse type: a libpq connection string psycopg can parse."""
    import psycopg

    try:
        psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        raise argparse.ArgumentTypeError(f"not a valid libpq connection string: {exc}") from None
    return text


def output_file(text: str) -> str:
    """argparse type: a file the tool can write at the end (``-`` is stdout):
    checked now, so a run is not lost to a typo in its output path."""
    if text == "-":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    return text


def output_dir(text: str) -> str:
    """argparse type: a directory the tool can create (with parents) or write."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create or write {text} ({probe} is not a writable directory)")
    return text


def require_matplotlib(parser: argparse.ArgumentParser, flag: str = "--plot") -> None:
    """Fail now, not after the run, when plotting cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        parser.error(f"argument {flag}: needs matplotlib ({exc}); install the plot extra: {PLOT_HINT}")
