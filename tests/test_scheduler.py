"""The seed's interface: BatchScheduler start/stop/configure and the event bus."""

from __future__ import annotations

import threading

import pytest
from conftest import query, wait_for

from engine.errors import NotRuntimeConfigurable
from engine.intent import COMMITTED, Intent
from engine.scheduler import BatchScheduler, EventBus, SystemEvent


def test_event_bus_in_and_batches_out(dsn, short_tmp):
    bus = EventBus()
    batches, failed = [], []
    lock = threading.Lock()
    bus.on(SystemEvent.INTENT_BATCH, lambda b: (lock.acquire(), batches.append(b), lock.release()))
    bus.on(SystemEvent.INTENT_FAILED, failed.append)
    bus.on(SystemEvent.INTENT_BATCH, lambda b: 1 / 0)  # a broken subscriber hurts no one
    with BatchScheduler(
        event_bus=bus, dsn=dsn, socket=str(short_tmp / "s.sock"), data_dir=str(short_tmp / "var"), time_window_ms=5
    ) as scheduler:
        bus.emit(SystemEvent.INTENT, Intent("bus", 1, "hero", "spawn", {"state": {"hp": 3}}))
        for seq in range(2, 52):
            bus.emit(SystemEvent.INTENT, Intent("bus", seq, "hero", "move", {"dx": 1, "dy": 0}))
        bus.emit(SystemEvent.INTENT, Intent("bus", 52, "ghost", "move", {"dx": 1, "dy": 0}))
        wait_for(lambda: sum(len(b.intents) for b in batches) == 51 and failed, 20, "batch events")
        assert scheduler.metrics()["flusher"]["committed"] == 51
    seqs = [i.seq for b in sorted(batches, key=lambda b: b.id) for i in b.intents]
    assert seqs == list(range(1, 52))  # every committed intent once, in apply order
    assert all(b.cut_reason in ("time", "size", "drain") for b in batches)
    ((intent, reply),) = failed
    assert intent.seq == 52 and reply.code == "no_such_entity"
    assert query(dsn, "SELECT state->'pos'->'x' FROM batchscheduler.entities") == [(50,)]


def test_configure_applies_at_runtime_without_restart(dsn, short_tmp):
    scheduler = BatchScheduler(
        dsn=dsn, socket=str(short_tmp / "s.sock"), data_dir=str(short_tmp / "var"), time_window_ms=200
    )
    scheduler.start()
    try:
        pids = {w["pid"] for w in scheduler.metrics()["workers"]}
        with scheduler.client(client_id="cfg", first_seq=1) as client:
            assert client.submit(client.intent("a", "spawn", {})).status == COMMITTED
            scheduler.configure(max_batch_size=1, time_window_ms=1000)
            replies = client.submit_many([client.intent("a", "say", {"text": str(i)}) for i in range(5)])
        assert all(r.status == COMMITTED for r in replies)
        sizes = [s for (s,) in query(dsn, "SELECT size FROM batchscheduler.batches ORDER BY id")]
        assert sizes[-5:] == [1, 1, 1, 1, 1]  # size limit 1 cut at once despite the 1 s window
        assert {w["pid"] for w in scheduler.metrics()["workers"]} == pids  # nothing restarted
        with pytest.raises(NotRuntimeConfigurable, match="ingests"):
            scheduler.configure(ingests=2)
        with pytest.raises(ValueError, match="max_batch_size"):
            scheduler.configure(max_batch_size=0)
    finally:
        scheduler.stop()
    assert not (short_tmp / "s.sock").exists()


def test_configure_before_start_may_change_anything(short_tmp):
    scheduler = BatchScheduler(socket=str(short_tmp / "s.sock"))
    scheduler.configure(ingests=3, time_window_ms=15)
    assert scheduler.options.ingests == 3 and scheduler.options.time_window_ms == 15


def test_engine_started_from_a_short_lived_thread_outlives_it(dsn, short_tmp):
    # Workers get a parent-death signal; it must not fire when the thread
    # that called start() ends.
    scheduler = BatchScheduler(dsn=dsn, socket=str(short_tmp / "s.sock"), data_dir=str(short_tmp / "var"))
    starter = threading.Thread(target=scheduler.start)
    starter.start()
    starter.join()
    try:
        pids = {w["role"]: w["pid"] for w in scheduler.metrics()["workers"]}
        with scheduler.client(client_id="thread", first_seq=1) as client:
            assert client.submit(client.intent("t", "spawn", {})).status == COMMITTED
        assert {w["role"]: w["pid"] for w in scheduler.metrics()["workers"]} == pids
        assert all(m["restarts"] == 0 for m in scheduler.metrics()["workers"])
    finally:
        scheduler.stop()


def test_start_failure_is_raised_to_the_caller(short_tmp):
    scheduler = BatchScheduler(
        dsn="host=/nonexistent-dir dbname=nope connect_timeout=2", socket=str(short_tmp / "s.sock")
    )
    with pytest.raises(Exception, match=r"unusable|nonexistent"):
        scheduler.start()
    assert not (short_tmp / "s.sock").exists()
