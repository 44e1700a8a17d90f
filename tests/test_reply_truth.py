"""A reply is the stored outcome (DESIGN.md contract 8), end to end, in the
situations an outside client found where it was not."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
from conftest import query, start_engine, wait_for

from engine.client import control
from engine.lanes import lane_of

pytestmark = pytest.mark.slow


def _reader(sock: socket.socket, replies: dict, want: int, done: threading.Event) -> None:
    buf = b""
    while len(replies) < want:
        try:
            data = sock.recv(1 << 20)
        except OSError:  # reset: the engine closed with our unread requests in its buffer
            break
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
    n = 8000  # below max_in_flight_per_connection (8192): the ingest reads them all
    ghost = "ghost-" + "g" * 122  # never spawned: every move is dead-lettered with a long reason
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(engine.socket))
    sock.sendall(b'{"client_id":"truth","seq":0,"entity":"hero","kind":"spawn","args":{"state":{}}}\n')
    assert json.loads(sock.recv(4096))["status"] == "committed"
    flusher = engine.worker(f"flusher {lane_of(ghost, engine.lanes)}")
    ingest = engine.worker("ingest 0")
    replies: dict[int, dict] = {}
    done = threading.Event()
    threading.Thread(target=_reader, args=(sock, replies, n, done), daemon=True).start()
    flusher.send_signal(signal.SIGSTOP)
    try:
        payload = b"".join(
            json.dumps(
                {"client_id": "truth", "seq": s, "entity": ghost, "kind": "move", "args": {"dx": 1, "dy": 0}}
            ).encode()
            + b"\n"
            for s in range(1, n + 1)
        )
        sock.sendall(payload)

        wait_for(lambda: _received(engine) >= n + 1, 30, "every intent in the ring")
        ingest.send_signal(signal.SIGSTOP)
    finally:
        flusher.send_signal(signal.SIGCONT)
    try:
        # The flusher commits batches until their outcomes fill the outcome
        # ring; then it waits for the ingest, and the stored count stops.
        seen = [-1, 0]  # last count, polls it stayed the same

        def stalled() -> bool:
            count = query(engine.dsn, "SELECT count(*) FROM batchscheduler.intent_log")[0][0]
            seen[1] = seen[1] + 1 if count == seen[0] and count > 1 else 0
            seen[0] = count
            return seen[1] >= 5  # half a second and more without a commit

        wait_for(stalled, 60, "the flusher to stall on a full outcome ring")
        assert seen[0] < n + 1, "every intent was stored: the outcome ring never filled"
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
    assert all(r["code"] == "no_such_entity" for r in replies.values())


def _send_lines(sock: socket.socket, client_id: str, first: int, count: int, entity: str = "hero") -> None:
    sock.sendall(
        b"".join(
            json.dumps(
                {"client_id": client_id, "seq": s, "entity": entity, "kind": "move", "args": {"dx": 1, "dy": 0}}
            ).encode()
            + b"\n"
            for s in range(first, first + count)
        )
    )


def test_drain_answers_the_backlog_busy_at_once_and_commits_the_ring(engine_factory):
    """A full ring leaves intents read but not in a ring: on SIGTERM they get
    busy/shutting_down before any kill deadline; what is in the ring commits
    and is answered; the engine exits 0."""
    engine = engine_factory("--ring-bytes", "65536", "--max-frame-bytes", "16384", "--drain-timeout-s", "20")
    n = 3000
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(engine.socket))
    sock.sendall(b'{"client_id":"drain","seq":0,"entity":"hero","kind":"spawn","args":{"state":{}}}\n')
    assert json.loads(sock.recv(4096))["status"] == "committed"
    replies: dict[int, dict] = {}
    done = threading.Event()
    threading.Thread(target=_reader, args=(sock, replies, n, done), daemon=True).start()
    flusher = engine.worker("flusher 0")
    flusher.send_signal(signal.SIGSTOP)
    try:
        _send_lines(sock, "drain", 1, n)
        wait_for(lambda: _ring_full(engine), 20, "the ring to fill")
        # The pause still running counts as backpressure time (metrics).
        first = _backpressure_s(engine)
        wait_for(lambda: _backpressure_s(engine) > first, 10, "backpressure time to grow while paused")
        engine.proc.send_signal(signal.SIGTERM)
        # The backlog is answered while the flusher is still stopped.
        wait_for(lambda: any(r["status"] == "busy" for r in replies.values()), 10, "busy replies during the drain")
    finally:
        flusher.send_signal(signal.SIGCONT)
    assert done.wait(30), "the connection stayed open after the drain"
    assert engine.stop() == 0
    sock.close()
    stored = dict(
        query(engine.dsn, "SELECT seq, status FROM batchscheduler.intent_log WHERE client_id = 'drain' AND seq > 0")
    )
    busy = {s for s, r in replies.items() if r["status"] == "busy"}
    assert busy and all(replies[s]["code"] == "shutting_down" for s in busy)
    assert not busy & stored.keys(), "a busy reply for an intent that was stored"
    assert {s for s, r in replies.items() if r["status"] == "committed"} == set(stored)
    assert set(stored.values()) == {"committed"}
    # Requests still unread in the socket when the engine stopped were
    # never accepted: no reply, nothing stored (the client resends them).
    unanswered = set(range(1, n + 1)) - replies.keys()
    assert not unanswered & stored.keys()


def _ring_full(engine) -> bool:
    return any(i["paused"] for i in control(engine.socket, "metrics")["ingests"])


def test_ingests_of_a_dead_supervisor_let_their_clients_go_at_once(short_tmp, dsn):
    """kill -9 of the supervisor: the ingests stop accepting and close their
    connections within about a second, so clients reconnect to the next
    engine instead of waiting on the old one."""
    engine = start_engine(short_tmp, dsn)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(engine.socket))
    sock.sendall(b'{"client_id":"orphan","seq":1,"entity":"o","kind":"spawn","args":{"state":{}}}\n')
    assert json.loads(sock.recv(4096))["status"] == "committed"
    workers = {role: engine.worker(role) for role in engine.roles()}
    # Intents in the ring whose release will not come in time.
    workers["flusher 0"].send_signal(signal.SIGSTOP)
    try:
        _send_lines(sock, "orphan", 2, 50, entity="o")
        wait_for(lambda: _received(engine) >= 51, 10, "intents in the ring")
        engine.proc.kill()
        engine.proc.wait()
        killed = time.monotonic()
        sock.settimeout(15)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        closed_after = time.monotonic() - killed
    finally:
        workers["flusher 0"].send_signal(signal.SIGCONT)
        sock.close()
    assert data == b"", "replies for intents whose fate the ingest could not know"
    # The orphaned ingest gives up after 1 s; its own drain deadline (3 s
    # here) or the old 5 s would be the supervisor's, not the clients'.
    assert closed_after < 2.8, (
        f"the connection closed {closed_after:.1f}s after the supervisor died\n{engine.log()[-2500:]}"
    )
    for w in workers.values():
        w.wait(10)
    engine.close_pipes()
    engine.socket.unlink(missing_ok=True)


def _backpressure_s(engine) -> float:
    return sum(i["backpressure_s"] for i in control(engine.socket, "metrics")["ingests"])


def _received(engine) -> int:
    return sum(i["received"] for i in control(engine.socket, "metrics")["ingests"])


def test_a_drain_right_after_a_failed_fast_write_exits_0(engine_factory):
    """The last batch before the drain fails its one-round-trip write (a
    spawn of an entity the restarted flusher's cache does not know yet: the
    pipeline aborts on the unique key) and is redone by the slow path: the
    flusher must still unmap the segment and exit 0."""
    engine = engine_factory()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(engine.socket))
        reader = sock.makefile("rb")
        spawn = '{"client_id":"me","seq":%d,"entity":"hero","kind":"spawn","args":{"state":{"hp":10}}}\n'
        sock.sendall((spawn % 1).encode())
        assert json.loads(reader.readline())["status"] == "committed"
        old = engine.worker("flusher 0")
        old.kill()
        old.wait(10)
        wait_for(lambda: (w := engine.workers().get("flusher 0")) and w.pid != old.pid, 20, "a new flusher")
        sock.sendall((spawn % 2).encode())
        reply = json.loads(reader.readline())
        assert (reply["status"], reply["code"]) == ("dead_lettered", "entity_exists")
    assert engine.stop() == 0
    log = engine.log()
    assert "BufferError" not in log and "while draining" not in log, log[-3000:]
