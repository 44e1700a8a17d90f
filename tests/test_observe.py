"""/metrics and /health over HTTP: real HTTP, parsed with
prometheus_client's own parser, checked against the database's counts."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import query, wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine.client import Client
from engine.intent import COMMITTED
from engine.options import parse_addr

pytestmark = pytest.mark.slow


def base_url(engine) -> str:
    line = next(line for line in engine.stdout_lines if line.startswith("metrics: "))
    return line.split()[1].rsplit("/metrics", 1)[0]


def scrape(engine) -> dict[str, list]:
    with urllib.request.urlopen(base_url(engine) + "/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def health(engine) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base_url(engine) + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_give_the_databases_exact_counts_and_histograms_add_up(engine_factory):
    engine = engine_factory("--lanes", "2")
    with Client(engine.socket, client_id="obs", first_seq=1, timeout=60) as client:
        replies = client.submit_many(
            [client.intent(f"e{i}", "spawn", {}) for i in range(40)]
            + [client.intent(f"e{i % 40}", "move", {"dx": 1, "dy": 0}) for i in range(2000)]
            + [client.intent("nobody", "move", {"dx": 1, "dy": 0}) for _ in range(7)]
        )
    assert sum(r.status == COMMITTED for r in replies) == 2040
    m = scrape(engine)
    ((committed, dead),) = query(
        engine.dsn,
        "SELECT count(*) FILTER (WHERE status = 'committed'), count(*) FILTER (WHERE status = 'dead_lettered') "
        "FROM batchscheduler.intent_log",
    )
    ((batches, stored),) = query(engine.dsn, "SELECT count(*), sum(size) FROM batchscheduler.batches")
    intents = m["batchscheduler_intents"]
    assert value(intents, "batchscheduler_intents_total", status="committed") == committed == 2040
    assert value(intents, "batchscheduler_intents_total", status="dead_lettered") == dead == 7
    assert value(m["batchscheduler_batches"], "batchscheduler_batches_total") == batches
    size = m["batchscheduler_batch_size"]
    assert value(size, "batchscheduler_batch_size_count") == batches
    assert value(size, "batchscheduler_batch_size_sum") == stored
    assert value(size, "batchscheduler_batch_size_bucket", le="+Inf") == batches
    latency = m["batchscheduler_commit_latency_seconds"]
    assert value(latency, "batchscheduler_commit_latency_seconds_count") == 2047
    for lane in ("0", "1"):  # cumulative buckets never decrease
        buckets = [s.value for s in latency if s.name.endswith("_bucket") and s.labels["lane"] == lane]
        assert buckets == sorted(buckets)
    assert value(m["batchscheduler_database_up"], "batchscheduler_database_up") == 1
    assert {s.labels["role"] for s in m["batchscheduler_worker_rss_bytes"]} == engine.roles()


def test_a_killed_worker_loses_no_count_and_counts_nothing_twice(engine_factory):
    engine = engine_factory("--lanes", "1")
    with Client(engine.socket, client_id="k", first_seq=1, timeout=60) as client:
        client.submit(client.intent("k", "spawn", {}))
        before = value(scrape(engine)["batchscheduler_intents"], "batchscheduler_intents_total", status="committed")
        victim = engine.worker("flusher 0")
        victim.kill()
        victim.wait(10)
        wait_for(lambda: (w := engine.workers().get("flusher 0")) and w.pid != victim.pid, 20, "a new flusher")
        replies = client.submit_many([client.intent("k", "say", {"text": str(i)}) for i in range(300)])
    assert all(r.status == COMMITTED for r in replies)
    m = scrape(engine)
    ((committed,),) = query(engine.dsn, "SELECT count(*) FROM batchscheduler.intent_log WHERE status = 'committed'")
    assert before == 1
    assert value(m["batchscheduler_intents"], "batchscheduler_intents_total", status="committed") == committed == 301
    assert value(m["batchscheduler_worker_restarts"], "batchscheduler_worker_restarts_total", role="flusher 0") == 1


def test_health_is_503_while_the_database_is_down_and_200_after(engine_factory):
    engine = engine_factory("--breaker-recovery-timeout-s", "0.5", use_dsn=False)
    code, body = health(engine)
    assert code == 200 and body["is_healthy"]
    supervisor = psutil.Process(engine.proc.pid)
    (postmaster,) = [p for p in supervisor.children() if p.name() == "postgres"]
    postmaster.send_signal(signal.SIGKILL)
    _, body = wait_for(lambda: (h := health(engine))[0] == 503 and h, 30, "503")
    assert body["is_healthy"] is False
    wait_for(lambda: health(engine)[1]["database"] == "up", 60, "the database back")
    with Client(engine.socket, client_id="h", first_seq=1, timeout=60) as client:
        for i in range(4):  # the breaker's half-open test batches
            client.submit(client.intent(f"h{i}", "spawn", {}))
    assert wait_for(lambda: health(engine)[0] == 200, 30, "200 again")


def test_unknown_paths_are_404_and_the_address_is_checked():
    assert parse_addr("off") is None
    assert parse_addr("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert parse_addr("[::1]:0") == ("::1", 0)
    for bad in ("9187", "localhost:", "host:99999", ":80", "host:port"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_metrics_off_serves_nothing(engine_factory):
    engine = engine_factory("--metrics-addr", "off")
    assert not any(line.startswith("metrics: ") for line in engine.stdout_lines)
    with socket.socket(socket.AF_UNIX) as s:  # the engine still serves its socket
        s.connect(str(engine.socket))
        s.sendall(b'{"op":"ping"}\n')
        assert json.loads(s.makefile("rb").readline())["status"] == "ok"
