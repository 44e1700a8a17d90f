"""Shared start of every tool: find the project's packages and dependencies.

Tools run from a checkout. If the interpreter running them lacks the
dependencies (say ``python3 tools/run_engine`` with the system Python), they
re-run themselves with the checkout's ``.venv`` (the README's install
command makes it), or say exactly what to do.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:
    import msgspec  # noqa: F401
    import psycopg  # noqa: F401
except ImportError as missing:
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.executable) != os.path.realpath(venv_python):
        os.execv(venv_python, [venv_python, *sys.argv])
    sys.stderr.write(
        f"{os.path.basename(sys.argv[0])}: {missing}. Install first:\n"
        f"  python3 -m venv .venv && .venv/bin/pip install .\n"
    )
    sys.exit(2)
