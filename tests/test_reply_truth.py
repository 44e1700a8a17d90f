"""A reply is the stored outcome (DESIGN.md contract 8), end to end, in the
situations an outside client found where it was not."""

from __future__ import annotations

import json
import signal
import socket
import threading

import pytest
from conftest import query, wait_for

pytestmark = pytest.mark.slow


def _reader(sock: socket.socket, replies: dict, want: int, done: threading.Event) -> None:
    buf = b""
    while len(replies) < want:
        data = sock.recv(1 << 20)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                reply = json.loads(line)
                replies[reply["seq"]] = reply
    done.set()


def test_dead_letters_read_before_their_release_are_answered_dead_lettered(engine):
    """More long dead-letter outcomes than the outcome ring holds, with the
    ingest paused while the flusher publishes: the ingest then reads outcomes
    whose release has not happened yet, and must keep them."""
    n = 6000
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(engine.socket))
    sock.sendall(b'{"client_id":"truth","seq":0,"entity":"hero","kind":"spawn","args":{"state":{}}}\n')
    assert json.loads(sock.recv(4096))["status"] == "committed"
    flusher, ingest = engine.worker("flusher"), engine.worker("ingest 0")
    replies: dict[int, dict] = {}
    done = threading.Event()
    threading.Thread(target=_reader, args=(sock, replies, n, done), daemon=True).start()
    bad_dx = "d" * 450  # dead-lettered handler_error, with a long reason
    flusher.send_signal(signal.SIGSTOP)
    try:
        payload = b"".join(
            json.dumps({"client_id": "truth", "seq": s, "entity": "hero", "kind": "move", "args": {"dx": bad_dx}})
            .encode()
            + b"\n"
            for s in range(1, n + 1)
        )
        sock.sendall(payload)

        def all_in_ring():
            rows = query(engine.dsn, "SELECT 1")  # the database is up meanwhile
            assert rows
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(engine.socket))
                probe.sendall(b'{"op":"metrics"}\n')
                body = json.loads(probe.makefile("rb").readline())
            return sum(i.get("received", 0) for i in body.get("ingests", [])) >= n + 1

        wait_for(all_in_ring, 30, "every intent in the ring")
        ingest.send_signal(signal.SIGSTOP)
    finally:
        flusher.send_signal(signal.SIGCONT)
    try:
        # The flusher commits a few batches and fills the outcome ring.
        wait_for(
            lambda: query(engine.dsn, "SELECT count(*) FROM batchscheduler.intent_log")[0][0] >= 2000,
            30,
            "batches committed while the ingest is paused",
        )
    finally:
        ingest.send_signal(signal.SIGCONT)
    assert done.wait(60), f"only {len(replies)} of {n} replies"
    sock.close()
    stored = dict(
        query(engine.dsn, "SELECT seq, status FROM batchscheduler.intent_log WHERE client_id = 'truth' AND seq > 0")
    )
    assert len(stored) == n
    wrong = {s: r["status"] for s, r in replies.items() if r["status"] != stored[s]}
    assert not wrong, f"{len(wrong)} replies differ from the stored outcome, e.g. {sorted(wrong.items())[:5]}"
    assert all(r["code"] == "handler_error" for r in replies.values())
