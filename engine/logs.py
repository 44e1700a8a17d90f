"""Log records as an operator reads them: ``--log-format text`` (one line,
``<time> <process title> [<LEVEL>] <logger>: <message>``) or ``json`` (one
object per line: ``time`` ISO-8601 UTC, ``level``, ``process``, ``pid``,
``logger``, ``message``, and for the periodic stats line its figures under
``stats``). Every process of the engine (supervisor and workers) logs to
stderr through ``configure``."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        wall = time.gmtime(record.created)
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", wall) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        stats = getattr(record, "stats", None)
        if stats is not None:
            out["stats"] = stats
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str, process: str) -> None:
    """Root logging for one engine process: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} [%(levelname)s] %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
