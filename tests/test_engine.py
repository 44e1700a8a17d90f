"""End to end through real processes: socket -> ring -> flusher -> PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import subprocess
import sys
import threading

import msgspec
import psutil
import pytest
from conftest import ROOT, query, wait_for

from engine.client import AsyncClient, Client, control
from engine.intent import COMMITTED


def load(engine, connections: int, per_connection: int, *, during=None, window: int = 512):
    """Each connection spawns its own entity, then moves it; returns the
    replies per connection. ``during`` runs once a tenth of the load is in."""
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    progress = [0] * connections

    def worker(c: int):
        try:
            with Client(engine.socket, client_id=f"load-{c}", first_seq=1, timeout=60) as client:
                replies = client.submit_many([client.intent(f"hero-{c}", "spawn", {"state": {"hp": 100}})])
                todo = [client.intent(f"hero-{c}", "move", {"dx": 1, "dy": -1}) for _ in range(per_connection - 1)]
                for start in range(0, len(todo), window):
                    replies += client.submit_many(todo[start : start + window], window=window)
                    progress[c] = len(replies)
                results[c] = replies
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    if during is not None:
        wait_for(lambda: sum(progress) >= connections * per_connection // 10 or errors, 60, "load to start")
        during()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def assert_exactly_once(engine, results, connections, per_connection):
    for replies in results.values():
        assert len(replies) == per_connection
        assert all(r.status == COMMITTED for r in replies), [r for r in replies if r.status != COMMITTED][:3]
        assert [r.seq for r in replies] == list(range(1, per_connection + 1))
    total = connections * per_connection
    ((rows, distinct),) = query(
        engine.dsn, "SELECT count(*), count(DISTINCT (client_id, seq)) FROM batchscheduler.intent_log"
    )
    assert rows == distinct == total
    states = dict(query(engine.dsn, "SELECT id, state FROM batchscheduler.entities"))
    for c in range(connections):
        # Exactly once for state too: every move applied once, none twice.
        assert states[f"hero-{c}"]["pos"] == {"x": per_connection - 1, "y": -(per_connection - 1)}


@pytest.mark.slow
def test_100k_intents_from_8_connections_each_committed_exactly_once(engine_factory):
    engine = engine_factory("--lanes", "4")
    results = load(engine, 8, 12_500)
    assert_exactly_once(engine, results, 8, 12_500)
    ((batches, biggest),) = query(engine.dsn, "SELECT count(*), max(size) FROM batchscheduler.batches")
    assert biggest <= 857
    assert batches >= 100_000 // 857
    # Every lane wrote batches, and each entity was written by one lane only.
    assert {lane for (lane,) in query(engine.dsn, "SELECT DISTINCT lane FROM batchscheduler.batches")} == {0, 1, 2, 3}
    assert query(
        engine.dsn,
        "SELECT count(*) FROM (SELECT l.entity FROM batchscheduler.intent_log l "
        "JOIN batchscheduler.batches b ON b.id = l.batch_id GROUP BY l.entity HAVING count(DISTINCT b.lane) > 1) x",
    ) == [(0,)]
    # Replaying the committed log from an empty world reproduces the state.
    replay = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "replay"), "--dsn", engine.dsn],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "intents in log: 100000, applied: 100000" in replay.stdout


def test_resent_committed_intent_is_answered_committed_and_stored_once(engine):
    with Client(engine.socket, client_id="resender", first_seq=1) as client:
        spawn = client.intent("door", "spawn", {"state": {"hp": 5}})
        hit = client.intent("door", "damage", {"amount": 2})
        first = client.submit_many([spawn, hit])
        again = client.submit_many([spawn, hit])
    assert [r.status for r in first] == [COMMITTED, COMMITTED]
    assert [r.status for r in again] == [COMMITTED, COMMITTED]
    assert not any(r.duplicate for r in first) and all(r.duplicate for r in again)
    assert query(engine.dsn, "SELECT count(*) FROM batchscheduler.intent_log") == [(2,)]
    assert query(engine.dsn, "SELECT state->'hp' FROM batchscheduler.entities") == [(3,)]


def test_resent_dead_letter_gets_its_original_reason(engine):
    with Client(engine.socket, client_id="ghost", first_seq=1) as client:
        intent = client.intent("nobody", "move", {"dx": 1, "dy": 1})
        first = client.submit(intent)
        again = client.submit(intent)
    assert first.status == again.status == "dead_lettered"
    assert first.code == again.code == "no_such_entity"
    assert again.duplicate and again.reason == first.reason
    assert query(engine.dsn, "SELECT count(*) FROM batchscheduler.dead_letters") == [(1,)]


class WireClient:
    """One raw connection speaking one framing; every read is bounded."""

    def __init__(self, path, framing: str) -> None:
        self.framing = framing
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(15)
        self.sock.connect(str(path))
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        assert chunk, "connection closed before a reply"
        self.buf += chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def submit(self, obj: dict) -> dict:
        if self.framing == "msgpack":
            payload = msgspec.msgpack.encode(obj)
            self.sock.sendall(struct.pack(">I", len(payload)) + payload)
            (n,) = struct.unpack(">I", self._read(4))
            return msgspec.msgpack.decode(self._read(n))
        self.sock.sendall(json.dumps(obj).encode() + b"\n")
        while b"\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("framing", ["json", "msgpack"])
def test_seq_reused_for_a_different_intent_is_rejected_and_stores_nothing(engine, framing):
    """(client_id, seq) names ONE intent: a resend that differs in entity,
    kind or args is not a duplicate of the stored one, it is rejected
    (``seq_reused``, naming the stored intent and outcome); the identical
    resend still gets the original outcome, marked duplicate."""
    wire = WireClient(engine.socket, framing)
    try:

        def intent(seq, entity, kind, args):
            return {"client_id": "k", "seq": seq, "entity": entity, "kind": kind, "args": args}

        spawn = intent(1, "orc", "spawn", {"state": {"hp": 10, "name": "grunt"}})
        damage = intent(2, "orc", "damage", {"amount": 3})
        assert wire.submit(spawn) == {"client_id": "k", "seq": 1, "status": "committed"}
        assert wire.submit(damage) == {"client_id": "k", "seq": 2, "status": "committed"}

        reused = {
            "status": "rejected",
            "code": "seq_reused",
            "reason": "seq 2 of client k was already used for a different intent (stored: damage on orc, committed)",
        }
        for other in (
            intent(2, "orc", "heal", {"amount": 3}),  # another kind
            intent(2, "orc", "damage", {"amount": 4}),  # other args
            intent(2, "elf", "damage", {"amount": 3}),  # another entity
        ):
            assert wire.submit(other) == {"client_id": "k", "seq": 2, **reused}, other

        # Nothing of the rejected resends was stored or applied.
        assert query(engine.dsn, "SELECT state FROM batchscheduler.entities") == [({"hp": 7, "name": "grunt"},)]
        assert query(
            engine.dsn, "SELECT seq, entity, kind, args, status FROM batchscheduler.intent_log ORDER BY seq"
        ) == [
            (1, "orc", "spawn", {"state": {"hp": 10, "name": "grunt"}}, "committed"),
            (2, "orc", "damage", {"amount": 3}, "committed"),
        ]
        assert query(engine.dsn, "SELECT count(*) FROM batchscheduler.dead_letters") == [(0,)]

        # The byte-identical resend: its original outcome, as a duplicate.
        assert wire.submit(damage) == {"client_id": "k", "seq": 2, "status": "committed", "duplicate": True}
        # Key order inside args does not make another intent (jsonb equality).
        assert wire.submit(intent(1, "orc", "spawn", {"state": {"name": "grunt", "hp": 10}})) == {
            "client_id": "k",
            "seq": 1,
            "status": "committed",
            "duplicate": True,
        }

        # A dead-lettered original is named with its code.
        ghost = intent(3, "nobody", "move", {"dx": 1, "dy": 1})
        first = wire.submit(ghost)
        assert (first["status"], first["code"]) == ("dead_lettered", "no_such_entity")
        assert wire.submit({**ghost, "args": {"dx": 2, "dy": 1}}) == {
            "client_id": "k",
            "seq": 3,
            "status": "rejected",
            "code": "seq_reused",
            "reason": "seq 3 of client k was already used for a different intent "
            "(stored: move on nobody, dead_lettered: no_such_entity)",
        }
        assert wire.submit(ghost) == {**first, "duplicate": True}
        assert query(engine.dsn, "SELECT state FROM batchscheduler.entities") == [({"hp": 7, "name": "grunt"},)]
    finally:
        wire.close()


def test_json_lines_get_one_json_reply_per_line(engine):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(engine.socket))
        s.sendall(
            b'{"client_id":"p","seq":1,"entity":"e","kind":"spawn","args":{"state":{}}}\n'
            b'{"client_id":"p","seq":2,"entity":"e","kind":"say","args":{"text":"hello"}}\n'
        )
        f = s.makefile("rb")
        replies = [json.loads(f.readline()) for _ in range(2)]
    assert sorted(r["seq"] for r in replies) == [1, 2]
    assert all(r == {"client_id": "p", "seq": r["seq"], "status": "committed"} for r in replies)
    assert query(engine.dsn, "SELECT state FROM batchscheduler.entities") == [({"log": ["hello"]},)]


def test_health_and_metrics_ops(engine):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(engine.socket))
        s.sendall(b'{"op":"health"}\n{"op":"metrics"}\n')
        f = s.makefile("rb")
        health, metrics = json.loads(f.readline()), json.loads(f.readline())
    assert health["is_healthy"] is True and health["breaker"] == "closed"
    assert health["current_batch_size"] == 857
    assert {w["role"] for w in metrics["workers"]} == engine.roles()
    assert [lane["lane"] for lane in health["lanes"]] == list(range(engine.lanes))


def test_asyncio_client_many_in_flight(engine):
    async def main():
        async with AsyncClient(engine.socket, client_id="async", first_seq=1) as client:
            await client.submit(client.intent("bard", "spawn", {"state": {}}))
            replies = await asyncio.gather(
                *[client.submit(client.intent("bard", "pick_up", {"item": f"i{k}"})) for k in range(500)]
            )
        return replies

    replies = asyncio.run(main())
    assert all(r.status == COMMITTED for r in replies)
    ((inv,),) = query(engine.dsn, "SELECT state->'inv' FROM batchscheduler.entities WHERE id = 'bard'")
    assert inv == [f"i{k}" for k in range(500)]  # applied in submission order


def test_workers_are_named_for_ps(engine):
    assert set(engine.workers()) == engine.roles()
    assert "batchscheduler: supervisor" in " ".join(psutil.Process(engine.proc.pid).cmdline())


def test_sigterm_drains_replies_and_leaves_nothing(engine_factory):
    eng = engine_factory("--time-window-ms", "2000", "--max-batch-size", "100000")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(eng.socket))
    sock.sendall(b'{"client_id":"d","seq":1,"entity":"x","kind":"spawn","args":{}}\n')
    wait_for(lambda: query(eng.dsn, "SELECT 1") and _ingest_received(eng) == 1, 10, "intent to be read")
    pids = [p.pid for p in eng.workers().values()]
    assert eng.stop() == 0  # drains long before the 2 s window
    reply = json.loads(sock.makefile("rb").readline())
    assert reply["status"] == "committed"
    assert query(eng.dsn, "SELECT cut_reason FROM batchscheduler.batches") == [("drain",)]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert not eng.socket.exists()
    sock.close()


def _op(eng, op: str) -> dict:
    return control(eng.socket, op, timeout=10)


def _restarted(eng, role: str, old_pid: int) -> bool:
    """A worker with that role is up under a new pid (one snapshot: a worker
    that just started may not have set its title yet)."""
    worker = eng.workers().get(role)
    return worker is not None and worker.pid != old_pid


def _ingest_received(eng) -> int:
    return _op(eng, "metrics")["ingests"][0]["received"]


@pytest.mark.slow
@pytest.mark.parametrize("lanes", [1, 4])
@pytest.mark.parametrize("role", ["flusher 0", "ingest 0"])
def test_worker_killed_mid_load_is_restarted_and_nothing_is_lost_or_doubled(engine_factory, role, lanes):
    """SIGKILL the flusher (records stay in the ring; its successor re-writes
    what it had not acknowledged) or the ingest (its clients reconnect and
    resend): every intent ends up stored exactly once, state applied once."""
    engine = engine_factory("--lanes", str(lanes))
    victim = engine.worker(role)

    def kill():
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: _restarted(engine, role, victim.pid), 15, f"{role} restart")

    results = load(engine, 4, 6_000, during=kill)
    assert_exactly_once(engine, results, 4, 6_000)
    assert f"batchscheduler: {role} (pid {victim.pid}) exited with SIGKILL" in engine.log()


def test_worker_over_its_rss_limit_is_recycled_and_intents_still_commit(engine_factory):
    # An idle flusher (numpy, psycopg, the mapped segment) is ~50 MiB, so with
    # a 40 MiB limit the supervisor keeps recycling it -- losing nothing.
    eng = engine_factory("--worker-rss-limit-mb", "40")
    first = eng.worker("flusher 0").pid
    wait_for(lambda: "RSS > worker_rss_limit_mb=40; recycling it" in eng.log(), 15, "RSS recycling")
    wait_for(lambda: _restarted(eng, "flusher 0", first), 15, "new flusher")
    with Client(eng.socket, client_id="rss", first_seq=1, timeout=60) as client:
        replies = client.submit_many(
            [client.intent("r", "spawn", {})] + [client.intent("r", "say", {"text": str(i)}) for i in range(200)]
        )
    assert all(r.status == COMMITTED for r in replies)
    assert query(eng.dsn, "SELECT count(*) FROM batchscheduler.intent_log") == [(201,)]


def test_database_outage_opens_breaker_answers_busy_and_loses_nothing(short_tmp):
    from conftest import start_engine

    from persistence.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(short_tmp / "pg")
    dsn = pg.start()
    eng = start_engine(short_tmp, dsn, "--breaker-failure-threshold", "2", "--breaker-recovery-timeout-s", "0.5")
    try:
        with Client(eng.socket, client_id="outage", first_seq=1, timeout=60) as client:
            assert client.submit(client.intent("hill", "spawn", {})).status == COMMITTED
            pg.stop()  # the database goes away
            # The first intents after the outage wait in the ring (not lost, not
            # answered); once the breaker opens, new ones are refused as busy.
            stuck = client.intent("hill", "move", {"dx": 1, "dy": 0})
            frame = client._codec.frame(stuck)
            client._unanswered[(stuck.client_id, stuck.seq)] = frame
            client._sock.sendall(frame)
            wait_for(lambda: _op(eng, "health")["breaker"] == "open", 30, "the breaker to open")
            with socket.socket(socket.AF_UNIX) as raw:
                raw.connect(str(eng.socket))
                raw.settimeout(10)
                raw.sendall(b'{"client_id":"probe","seq":1,"entity":"hill","kind":"say","args":{"text":"x"}}\n')
                reply = json.loads(raw.makefile("rb").readline())
            assert reply["status"] == "busy" and reply["code"] == "database_unavailable"
            assert "resend" in reply["reason"]
            pg.start()  # back; the breaker half-opens and closes
            later = client.submit_many([client.intent("hill", "move", {"dx": 1, "dy": 0}) for _ in range(50)])
            assert all(r.status == COMMITTED for r in later)
            # The intent that sat in the ring through the outage is committed too.
            leftover = client.submit_many([stuck])
            assert leftover[0].status == COMMITTED
        assert query(dsn, "SELECT state->'pos'->'x' FROM batchscheduler.entities") == [(51,)]
        assert query(dsn, "SELECT count(*) FROM batchscheduler.intent_log WHERE client_id = 'outage'") == [(52,)]
        assert "breaker open" in eng.log()
    finally:
        code = eng.stop()
        pg.stop()
    assert code == 0


def test_client_that_half_closes_still_gets_every_reply(engine):
    # printf '...' | socat - UNIX-CONNECT:engine.sock: stdin ends, socat
    # shuts down its write side, and must still read the replies.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(engine.socket))
        s.settimeout(10)
        s.sendall(
            b'{"client_id":"hc","seq":1,"entity":"h","kind":"spawn","args":{}}\n'
            b'{"client_id":"hc","seq":2,"entity":"h","kind":"say","args":{"text":"bye"}}\n'
        )
        s.shutdown(socket.SHUT_WR)
        lines = s.makefile("rb").read().splitlines()  # until the engine closes
    assert sorted(json.loads(line)["seq"] for line in lines) == [1, 2]
    assert all(json.loads(line)["status"] == "committed" for line in lines)


def test_adaptive_batching_shrinks_the_limit_when_latency_exceeds_its_threshold(engine_factory):
    # A 1 ms latency threshold cannot be met (the window alone is 5 ms), so
    # every batch shrinks the limit by the adjustment factor, down to the floor.
    eng = engine_factory(
        "--lanes",
        "1",
        "--adaptive-batching",
        "--max-batch-size",
        "200",
        "--min-batch-size",
        "20",
        "--time-window-ms",
        "5",
        "--latency-threshold-ms",
        "1",
        "--adjustment-factor",
        "0.5",
    )
    assert _op(eng, "health")["current_batch_size"] == 200
    with Client(eng.socket, client_id="adapt", first_seq=1, timeout=60) as client:
        client.submit(client.intent("a", "spawn", {}))
        for _ in range(6):
            replies = client.submit_many([client.intent("a", "say", {"text": "x"}) for _ in range(50)])
            assert all(r.status == COMMITTED for r in replies)
    assert _op(eng, "health")["current_batch_size"] == 20
    ((biggest,),) = query(
        eng.dsn,
        "SELECT max(size) FROM batchscheduler.batches WHERE id > (SELECT max(id) - 3 FROM batchscheduler.batches)",
    )
    assert biggest <= 20  # the shrunken limit is what the flusher cuts at


@pytest.mark.slow
def test_sigterm_under_load_answers_everything_it_read_and_exits_0(engine_factory):
    eng = engine_factory()
    with Client(eng.socket, client_id="seed", first_seq=1) as client:
        client.submit(client.intent("busy-room", "spawn", {}))
    socks, frames = [], 3000
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(eng.socket))
        s.settimeout(20)
        socks.append(s)
    payload = {
        c: b"".join(
            b'{"client_id":"d%d","seq":%d,"entity":"busy-room","kind":"say","args":{"text":"x"}}\n' % (c, i)
            for i in range(frames)
        )
        for c in range(4)
    }
    senders = [threading.Thread(target=s.sendall, args=(payload[c],)) for c, s in enumerate(socks)]
    for t in senders:
        t.start()
    wait_for(lambda: _ingest_received(eng) > 1000, 30, "load to arrive")
    code = eng.stop()  # SIGTERM mid-load
    for t in senders:
        t.join(10)  # a sender blocked on a full socket is released when the engine closes it
    assert code == 0
    committed = set()
    for s in socks:
        data = b""
        try:
            while chunk := s.recv(1 << 16):
                data += chunk
        except OSError:
            pass
        s.close()
        for line in data.splitlines():
            reply = json.loads(line)
            # Exactly the documented outcomes of a drain: stored, or refused
            # as busy (not stored; resend later). Never silence for what was read.
            assert reply["status"] in ("committed", "busy"), reply
            if reply["status"] == "committed":
                committed.add((reply["client_id"], reply["seq"]))
    stored = set(query(eng.dsn, "SELECT client_id, seq FROM batchscheduler.intent_log WHERE client_id <> 'seed'"))
    assert committed <= stored
    # Anything stored but not answered was read before the drain began: the
    # drain must have answered it.
    assert stored == committed, f"{len(stored - committed)} stored intents were never answered"


def test_supervisor_killed_with_sigkill_leaves_nothing_running_and_restarts_clean(short_tmp):
    from conftest import start_engine

    eng = start_engine(short_tmp, None)  # embedded PostgreSQL, owned by this supervisor
    tree = [eng.proc.pid] + [p.pid for p in psutil.Process(eng.proc.pid).children(recursive=True)]
    assert any("postgres" in " ".join(psutil.Process(pid).cmdline()) for pid in tree)
    eng.proc.send_signal(signal.SIGKILL)
    eng.proc.wait()
    eng.close_pipes()

    def gone():
        return not [
            pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]

    # Workers drain on their parent-death SIGTERM; PostgreSQL fast-shuts down on its SIGINT.
    wait_for(gone, 20, "the whole process tree to exit")
    again = start_engine(short_tmp, None)  # same data dir, same (stale) socket path
    with Client(again.socket, client_id="after-kill", first_seq=1) as client:
        assert client.submit(client.intent("phoenix", "spawn", {})).status == COMMITTED
    assert again.stop() == 0
    assert not again.socket.exists()


def test_batches_count_what_they_stored_and_a_resend_only_batch_keeps_no_row(engine):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(engine.socket))
        f = s.makefile("rb")

        def send(*lines: bytes) -> list[dict]:
            s.sendall(b"".join(lines))
            return [json.loads(f.readline()) for _ in lines]

        spawn = b'{"client_id":"b","seq":1,"entity":"bk","kind":"spawn","args":{"state":{}}}\n'
        assert send(spawn)[0]["status"] == "committed"
        assert send(spawn)[0].get("duplicate") is True  # alone in its batch
        say = b'{"client_id":"b","seq":2,"entity":"bk","kind":"say","args":{"text":"hi"}}\n'
        assert {r["seq"]: r["status"] for r in send(spawn, say)} == {1: "committed", 2: "committed"}
    rows = query(engine.dsn, "SELECT size, resends FROM batchscheduler.batches ORDER BY id")
    logged = query(engine.dsn, "SELECT count(*), count(DISTINCT batch_id) FROM batchscheduler.intent_log")
    assert logged == [(2, len(rows))], "every batch row has intent_log rows"
    assert sum(size for size, _ in rows) == 2
    assert (1, 1) in rows or rows == [(1, 0), (1, 0)]  # the last two lines may share a batch or not
