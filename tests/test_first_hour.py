"""A new user's first hour, replayed from the README itself: the engine as
its run command starts it (data in ./var of the working directory), the hand
session's lines and replies, the MessagePack frame drawn byte by byte, the
Python API example twice beside the running engine, replay's exit codes.
Every input comes out of README.md, so the README cannot drift from what
the engine does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import msgspec
import pytest
from conftest import ROOT, RUN_ENGINE

README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.slow


def code_block_after(heading: str, lang: str = "") -> str:
    section = README[README.index(heading) :]
    match = re.search(r"```" + lang + r"\n(.*?)```", section, re.S)
    assert match, f"no ```{lang} block after {heading!r}"
    return match.group(1)


@pytest.fixture
def workdir():
    # Short: the socket path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="bs-hour-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_like_the_readme(cwd: Path) -> subprocess.Popen:
    """The README's run command, less the install: tools/run_engine from
    a working directory, everything defaulted (data and socket in ./var)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    proc = subprocess.Popen(
        [sys.executable, str(RUN_ENGINE)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                ready.set()
        ready.set()

    proc.pump = threading.Thread(target=pump, daemon=True)  # type: ignore[attr-defined]
    proc.pump.start()  # type: ignore[attr-defined]
    assert ready.wait(90) and proc.poll() is None, f"engine did not start: {lines}"
    assert any(line.startswith(f"socket: {cwd / 'var' / 'engine.sock'}") for line in lines), lines
    return proc


def hand_session(sock_path: Path) -> list[tuple[dict, dict | None]]:
    """Send the README's typed lines; returns (line, reply) pairs."""
    block = code_block_after("## Try it by hand", "sh")
    typed = [json.loads(line) for line in block.splitlines() if line.startswith("{") and '"status"' not in line]
    shown = [json.loads(line) for line in block.splitlines() if line.startswith("{") and '"status"' in line]
    got = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(sock_path))
        f = s.makefile("rb")
        for line in typed:
            s.sendall(json.dumps(line).encode() + b"\n")
            got.append((line, json.loads(f.readline())))
    intents = [(line, reply) for line, reply in got if "op" not in line]
    assert [reply for _, reply in intents][: len(shown)] == shown or all(r.get("duplicate") for _, r in intents)
    return got


def test_the_readme_first_hour(workdir):
    engine = start_like_the_readme(workdir)
    try:
        sock_path = workdir / "var" / "engine.sock"
        # The hand session: the replies the README shows.
        first = hand_session(sock_path)
        assert [r for line, r in first if "op" not in line] == [
            json.loads(line)
            for line in code_block_after("## Try it by hand", "sh").splitlines()
            if line.startswith("{") and '"status"' in line
        ]
        assert next(r for line, r in first if line.get("op") == "health")["is_healthy"] is True
        # Typed again: the stored outcomes, marked duplicate, nothing applied twice.
        again = hand_session(sock_path)
        assert all(r["status"] == "committed" and r.get("duplicate") is True for line, r in again if "op" not in line)

        # The MessagePack frame the README draws byte by byte is what the engine reads.
        dump = README[README.index("as a MessagePack frame is") :]
        dump = dump[dump.index("```\n") + 4 : dump.index("```", dump.index("```\n") + 4)]
        frame = bytes.fromhex(" ".join(re.findall(r"\b[0-9a-f]{2}\b", " ".join(x[:48] for x in dump.splitlines()))))
        body = msgspec.msgpack.encode(
            {"client_id": "me", "seq": 3, "entity": "hero", "kind": "move", "args": {"dx": 1, "dy": 0}}
        )
        assert frame == len(body).to_bytes(4, "big") + body
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(sock_path))
            s.sendall(frame)
            n = int.from_bytes(s.recv(4), "big")
            reply = msgspec.msgpack.decode(s.recv(n))
        assert reply == {"client_id": "me", "seq": 3, "status": "committed"}

        # The Python API example, twice, while the engine above still runs.
        example = code_block_after("## Python API", "python")
        for _ in range(2):
            run = subprocess.run(
                [sys.executable, "-c", example],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert run.stdout.count("status='committed'") == 2, run.stdout
            assert "failed" not in run.stdout and "entity_exists" not in run.stdout, run.stdout
            assert re.search(r"^batch \d+ 1 time$", run.stdout, re.M), run.stdout

        # replay against a running engine's DSN: 0 identical.
        dsn = f"host={workdir / 'var' / 'pg'} user=postgres dbname=postgres"
        replay = subprocess.run([sys.executable, str(ROOT / "tools" / "replay"), "--dsn", dsn], capture_output=True)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        unreachable = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "replay"), "--dsn", f"host={workdir / 'nowhere'} connect_timeout=2"],
            capture_output=True,
        )
        assert unreachable.returncode == 2
    finally:
        engine.send_signal(signal.SIGTERM)
        code = engine.wait(30)
        engine.pump.join(10)  # reads to EOF, then the pipe can close
        engine.stdout.close()
        assert code == 0
    assert not (workdir / "var" / "engine.sock").exists()
