"""What the embedded PostgreSQL does under root is said, and no more than
the server's user needs."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from persistence.embedded import SYSTEM_USER, EmbeddedPostgres

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to the system user and opens paths")


def test_root_logs_each_permission_it_adds_and_adds_only_search(caplog):
    top = Path(tempfile.mkdtemp(prefix="bs-root-"))
    try:
        private = top / "private"
        private.mkdir(mode=0o700)
        os.chmod(private, 0o700)  # umask-proof
        pg = EmbeddedPostgres(private / "pg")
        with caplog.at_level(logging.WARNING, logger="persistence.embedded"):
            pg.start()
            pg.stop()
        assert stat.S_IMODE(private.stat().st_mode) == 0o701, "more than search (o+x) was granted"
        said = [r.getMessage() for r in caplog.records if "running as root" in r.getMessage()]
        assert any(f"adding o+x to {private} (mode 700 -> 701)" in m and SYSTEM_USER in m for m in said), said
        # Once: a second start changes nothing and says nothing about it.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="persistence.embedded"):
            pg.start()
            pg.stop()
        assert not [r for r in caplog.records if str(private) + " (mode" in r.getMessage()]
    finally:
        shutil.rmtree(top, ignore_errors=True)
