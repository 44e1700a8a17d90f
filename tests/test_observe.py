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

from engine import alerts
from engine.client import Client, control
from engine.codes import REPLY_CODES
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
    by_code = dict(query(engine.dsn, "SELECT code, count(*) FROM batchscheduler.dead_letters GROUP BY code"))
    assert by_code == {"no_such_entity": 7}
    dead = m["batchscheduler_dead_letters"]
    assert {s.labels["code"]: s.value for s in dead if s.value} == by_code
    assert {s.labels["code"] for s in dead} == {c for c, st in REPLY_CODES.items() if st == "dead_lettered"}
    assert {s.labels["alert"] for s in m["batchscheduler_alert_firing"]} == set(alerts.NAMES)
    assert value(m["batchscheduler_backpressure_seconds"], "batchscheduler_backpressure_seconds_total") >= 0


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


def _alert(engine, name: str) -> dict:
    return next(a for a in health(engine)[1]["alerts"] if a["name"] == name)


def test_error_rate_alert_fires_and_clears_once_each_in_health_metrics_and_log(engine_factory):
    engine = engine_factory("--lanes", "1", "--alert-error-rate-for-s", "2", "--stats-interval-s", "1")
    assert _alert(engine, "error_rate")["firing"] is False
    with Client(engine.socket, client_id="al", first_seq=1, timeout=60) as client:
        # At least engine.alerts.MIN_INTENTS in the window, or it is no rate.
        client.submit_many([client.intent("nobody", "move", {"dx": 1, "dy": 0}) for _ in range(alerts.MIN_INTENTS)])
        fired = wait_for(lambda: (a := _alert(engine, "error_rate"))["firing"] and a, 20, "error_rate to fire")
        assert fired["value"] > fired["threshold"] == 0.01 and fired["since"].endswith("Z")
        m = scrape(engine)
        assert value(m["batchscheduler_alert_firing"], "batchscheduler_alert_firing", alert="error_rate") == 1
        assert health(engine)[0] == 200  # an alert is not unhealth: nothing is down
        client.submit(client.intent("al", "spawn", {}))
        # Healthy traffic for longer than the window: the rate falls to 0.
        wait_for(
            lambda: (
                client.submit(client.intent("al", "say", {"text": "x"})) and not _alert(engine, "error_rate")["firing"]
            ),
            30,
            "error_rate to clear",
        )
    log = engine.log()
    assert log.count("alert error_rate firing") == 1
    assert log.count("alert error_rate cleared") == 1
    assert "stats: " in log and " committed/s" in log and "breaker closed" in log


def test_memory_alert_compares_worker_rss_with_the_limit(engine_factory):
    engine = engine_factory("--alert-memory-ratio", "0.001")
    fired = wait_for(lambda: (a := _alert(engine, "memory"))["firing"] and a, 20, "memory to fire")
    assert 0.001 < fired["value"] < 1
    assert _alert(engine, "flush_failures") == {
        **_alert(engine, "flush_failures"),
        "firing": False,
        "value": 0.0,
        "threshold": 3,
    }


def test_json_logs_are_one_object_per_line_with_the_stats_figures(engine_factory):
    engine = engine_factory("--log-format", "json", "--stats-interval-s", "1")
    with Client(engine.socket, client_id="js", first_seq=1, timeout=60) as client:
        client.submit(client.intent("js", "spawn", {}))
    wait_for(lambda: '"stats"' in engine.log(), 20, "a stats line")
    assert engine.stop() == 0  # the workers log as they exit
    records = [json.loads(line) for line in engine.log().splitlines() if line.strip()]
    assert {"time", "level", "process", "pid", "logger", "message"} <= set(records[0])
    assert {r["process"] for r in records} >= {"batchscheduler: supervisor", "batchscheduler: ingest 0"}
    stats = next(r["stats"] for r in records if "stats" in r)
    assert set(stats) >= {"committed_per_s", "latency_p50_ms", "latency_p99_ms", "batch_avg", "ring_fill", "breaker"}


def test_socket_metrics_speak_seconds_iso_times_and_state_names(engine):
    with Client(engine.socket, client_id="rd", first_seq=1, timeout=60) as client:
        client.submit(client.intent("rd", "spawn", {}))
    m = control(engine.socket, "metrics")
    assert m["uptime_s"] > 0 and m["started_at"].endswith("Z") and m["version"]
    assert m["time_window_s"] == 0.01 and m["max_batch_size"] == 857
    assert m["flusher"]["breaker"] == "closed" and m["flusher"]["db_connected"] is True
    assert m["flusher"]["last_flush_at"].endswith("Z") and isinstance(m["flusher"]["latency_ewma_s"], float)
    assert not any(key.endswith(("_ns", "_us")) for key in (*m["flusher"], *m["ingests"][0]))
    assert m["answered_by"]["role"] == "ingest 0"
    assert 0 < m["commit_latency_s"]["p50"] <= m["commit_latency_s"]["p99"]
    assert m["ingests"][0]["paused"] is False and m["ingests"][0]["backpressure_s"] >= 0


def test_clients_that_leave_early_cost_no_traceback_and_head_answers(engine_factory):
    import struct

    engine = engine_factory("--log-format", "json")
    host, port = base_url(engine).removeprefix("http://").rsplit(":", 1)
    for path in ("/metrics", "/nope", "/health"):
        for _ in range(3):  # the reply meets a reset connection
            s = socket.create_connection((host, int(port)))
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # half a request, then gone
    head = urllib.request.Request(base_url(engine) + "/health", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as r:
        assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 0
    post = urllib.request.Request(base_url(engine) + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 501
    refused.value.close()
    assert health(engine)[0] == 200  # still serving
    assert engine.stop() == 0
    for line in engine.log().splitlines():  # every stderr line is still one JSON record
        assert json.loads(line)["message"] is not None, line


def test_metrics_serve_on_ipv6_loopback(engine_factory):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    engine = engine_factory("--metrics-addr", "[::1]:0")
    assert base_url(engine).startswith("http://[::1]:")
    assert health(engine)[0] == 200
