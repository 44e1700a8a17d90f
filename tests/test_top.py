"""tools/top: frames drawn from real scrapes of a real engine, the live view
under a real pseudo-terminal (keys, Ctrl-C, the terminal put back), an
engine that cannot be reached, and answers that are not an engine's."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import fcntl
import http.server
import math
import os
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from conftest import ROOT, query

from engine.client import Client
from engine.intent import COMMITTED
from tools import liveview
from tools.liveview import (
    bucket_increase,
    engine_url,
    frame_text,
    histogram_quantile,
    increase,
    scrape,
    throughput,
)

TOP = ROOT / "tools" / "top"
INTENTS = "batchscheduler_intents_total"
LEAVE_ALT_SCREEN = "\x1b[?1049l"
SHOW_CURSOR = "\x1b[?25h"
ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")


def base_url(engine) -> str:
    line = next(line for line in engine.stdout_lines if line.startswith("metrics: "))
    return line.split()[1].rsplit("/metrics", 1)[0]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_") and k not in ("COLUMNS", "LINES")
    }


# ------------------------------------------------------------ the figures
def test_histogram_quantile_interpolates_as_prometheus_does():
    buckets = [(0.01, 10.0), (0.02, 30.0), (0.05, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.01)  # rank 10: the top of the first bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.015)  # rank 20 of (10, 30] in (0.01, 0.02]
    assert histogram_quantile(0.125, buckets) == pytest.approx(0.005)  # the first bucket starts at 0
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0488)  # rank 39.6: 9.6 of 10 into (0.02, 0.05]
    # Rank in the +Inf bucket: the highest finite bound, as Prometheus answers.
    assert histogram_quantile(0.99, [(0.01, 1.0), (math.inf, 100.0)]) == 0.01
    assert math.isnan(histogram_quantile(0.5, [(0.01, 0.0), (math.inf, 0.0)]))  # no observations
    assert math.isnan(histogram_quantile(0.5, [(0.01, 5.0), (0.02, 5.0)]))  # no +Inf bucket
    # A torn read (a count below the bucket under it) is lifted, never read backwards.
    assert histogram_quantile(0.5, [(1.0, 4.0), (2.0, 3.0), (3.0, 8.0), (math.inf, 8.0)]) == pytest.approx(1.0)


def test_the_frame_shows_the_engines_figures_from_two_real_scrapes(engine_factory):
    engine = engine_factory("--lanes", "2")
    url = base_url(engine)
    first = scrape(url)
    assert first.ok, first.error
    with Client(engine.socket, client_id="top", first_seq=1, timeout=60) as client:
        replies = client.submit_many(
            [client.intent(f"t{i}", "spawn", {}) for i in range(30)]
            + [client.intent(f"t{i % 30}", "move", {"dx": 1, "dy": 0}) for i in range(600)]
            + [client.intent("nobody", "move", {"dx": 1, "dy": 0}) for _ in range(5)]
        )
    assert sum(r.status == COMMITTED for r in replies) == 630, {(r.status, getattr(r, "code", None)) for r in replies}
    second = scrape(url)
    assert second.ok and not second.health_error, (second.error, second.health_error)

    ((committed, dead),) = query(
        engine.dsn,
        "SELECT count(*) FILTER (WHERE status = 'committed'), count(*) FILTER (WHERE status = 'dead_lettered') "
        "FROM batchscheduler.intent_log",
    )
    ((batches,),) = query(engine.dsn, "SELECT count(*) FROM batchscheduler.batches")
    by_code = dict(query(engine.dsn, "SELECT code, count(*) FROM batchscheduler.dead_letters GROUP BY code"))
    assert (committed, dead) == (630, 5) and by_code == {"no_such_entity": 5}
    assert increase(first, second, INTENTS, status="committed") == committed
    assert increase(first, second, "batchscheduler_batches_total") == batches
    latency = bucket_increase(first, second, "batchscheduler_commit_latency_seconds")
    assert latency[-1] == (math.inf, committed + dead)  # every stored intent, in the last interval
    p50, p99 = histogram_quantile(0.5, latency), histogram_quantile(0.99, latency)
    assert 0 < p50 <= p99 <= 10.0

    rate = throughput(first, second)
    assert rate == pytest.approx(committed / (second.at - first.at))
    text = frame_text(first, second, [None, rate], interval=second.at - first.at, width=200)
    assert f"committed {committed:,}" in text and f"dead-lettered {dead}" in text
    assert f"{liveview.fmt_rate(rate)} committed" in text
    assert f"p50 {liveview.fmt_seconds(p50)}" in text and f"p99 {liveview.fmt_seconds(p99)}" in text
    assert f"of {batches:,} batches in the last" in text
    assert "healthy" in text and "database up" in text and "breaker closed" in text
    # Dead letters by code, as stored, with their rate over the interval.
    (row,) = [line for line in text.splitlines() if "dead letters" in line]
    shown = dict(re.findall(r"(\w+) ([\d,]+) \([\d.,]+/s\)", row.split("dead letters", 1)[1]))
    assert {code: int(n.replace(",", "")) for code, n in shown.items()} == by_code, row
    # Backpressure: the flag and the share of the interval spent paused, per ingest.
    assert re.search(r"backpressure ingest 0( paused)? \d{1,3}\.\d%", text), text
    for lane in ("0", "1"):  # lane rows: breaker, database, the seed's batch size limit
        row = next(line for line in text.splitlines() if re.match(rf"│\s+{lane}\s+closed\s+up\s+857\s", line))
        assert "/s" in row
    for role in engine.roles():  # each worker with its memory and restarts
        assert re.search(rf"│\s+{role}\s+[\d.]+ MiB\s+0\s", text), role
    for ingest, lane in (("0", "0"), ("0", "1")):
        assert f"ingest {ingest} → lane {lane}" in text
    # Alerts come from /health, as the engine's alert_firing metric flags them; "none" when it reports none.
    alerts = second.health["alerts"]
    assert all(set(a) == {"name", "firing", "since", "value", "threshold", "summary"} for a in alerts)
    assert {a["name"]: float(a["firing"]) for a in alerts} == second.by("batchscheduler_alert_firing", "alert")
    (title,) = [line for line in text.splitlines() if "─ alerts" in line]
    firing = sum(a["firing"] for a in alerts)
    assert (f"alerts ({firing} firing)" if firing else "─ alerts ─") in title
    for a in alerts:
        row = next(line for line in text.splitlines() if re.search(rf"│\s+{a['name']}\s", line))
        assert ("FIRING" if a["firing"] else " ok ") in row and liveview.fmt_number(a["threshold"]) in row
    without = dataclasses.replace(second, health={k: v for k, v in second.health.items() if k != "alerts"})
    lines = frame_text(first, without, width=140).splitlines()
    title = next(i for i, line in enumerate(lines) if "─ alerts " in line)
    assert re.search(r"│\s+none\s+│$", lines[title + 1])


def test_rates_are_shown_only_between_samples_of_the_same_engine_run(engine):
    sample = scrape(base_url(engine))
    assert sample.ok, sample.error
    later = dataclasses.replace(sample, at=sample.at + 1)
    assert throughput(sample, later) == 0.0
    restarted = dict(later.series)
    restarted["batchscheduler_start_time_seconds"] = [({}, later.total("batchscheduler_start_time_seconds") + 5)]
    restarted = dataclasses.replace(later, series=restarted)
    assert throughput(sample, restarted) is None
    assert "measuring…" in frame_text(sample, restarted)
    assert "measuring…" in frame_text(sample, sample)  # one sample: no rates yet
    # Pure: the same samples draw the same frame, whenever drawn.
    assert len({frame_text(sample, later, [1.0, None, 3.0], interval=0.5) for _ in range(3)}) == 1


def test_dead_letters_are_shown_by_code_and_backpressure_as_a_share_of_the_interval():
    def sample(at: float, dead: dict[str, float], paused_s: dict[str, float], flags: dict[str, float]):
        series = {
            "batchscheduler_start_time_seconds": [({}, 1000.0)],
            "batchscheduler_dead_letters_total": [({"code": c}, n) for c, n in dead.items()],
            "batchscheduler_backpressure_seconds_total": [({"ingest": i}, s) for i, s in paused_s.items()],
            "batchscheduler_backpressure": [({"ingest": i}, v) for i, v in flags.items()],
        }
        return liveview.Sample("http://engine", at=at, wall=2000.0 + at, series=series)

    prev = sample(10.0, {"a": 0, "b": 5, "c": 0}, {"0": 1.0, "1": 0.0, "2": 3.0}, {"0": 0, "1": 0, "2": 0})
    cur = sample(12.0, {"a": 3, "b": 5, "c": 0}, {"0": 1.5, "1": 1.8, "2": 5.1}, {"0": 0, "1": 1, "2": 1})
    text = frame_text(prev, cur, interval=2.0, width=200)
    # The most first, each with its rate over the 2 s; a code that never happened is left out.
    assert "dead letters  b 5 (0/s) · a 3 (1.5/s)" in text and " c 0" not in text
    # 0.5 s of 2 s; 1.8 s of 2 s while paused now; a pause a hair longer than the interval reads 100%.
    assert "backpressure ingest 0 25.0%, ingest 1 paused 90.0%, ingest 2 paused 100.0%" in text
    # One sample (no interval yet): the totals and the flag only.
    text = frame_text(cur, cur, width=200)
    assert "dead letters  b 5 · a 3" in text and "backpressure ingest 1 paused, ingest 2 paused " in text
    quiet = sample(12.0, {"a": 0}, {"0": 1.0}, {"0": 0})
    assert re.search(r"dead letters\s+none\s", frame_text(prev, quiet, width=200))


# ------------------------------------------------- odd or absent answers
class OddServer:
    """A real HTTP server answering whatever the test puts in ``routes``."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = routes.get(self.path, (404, b"not found"))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> OddServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_answers_that_are_not_an_engines_are_reported_not_crashed_on():
    partial = b'# TYPE batchscheduler_intents counter\nbatchscheduler_intents_total{status="committed"} 7\n'
    with OddServer() as server:
        cases = [
            ({}, "answered HTTP 404"),
            ({"/metrics": (200, b"<html>hello</html>")}, "is not Prometheus text"),
            ({"/metrics": (200, b"other_metric 1\n")}, "has no batchscheduler_ metrics"),
            ({"/metrics": (500, b"oops")}, "answered HTTP 500"),
        ]
        for routes, message in cases:
            server.routes.clear()
            server.routes.update(routes)
            sample = scrape(server.url)
            assert not sample.ok and message in sample.error
            assert message in frame_text(sample, sample, width=200)
        # Metrics but a /health that is missing or not an object: drawn from what there is.
        for health, note in (((404, b"nope"), "/health"), ((200, b"[1, 2]"), "not an object")):
            server.routes.clear()
            server.routes.update({"/metrics": (200, partial), "/health": health})
            first = scrape(server.url)
            second = dataclasses.replace(first, at=first.at + 1)
            assert first.ok and note in first.health_error
            text = frame_text(first, second, [0.0], width=140)
            assert "health unknown" in text and "committed 7" in text and "no lanes reported" in text
        # Fields of the wrong types, and numbers that are not finite: read as absent, never trusted.
        odd = b'{"is_healthy": "yes", "database": 3, "lanes": [1, {"lane": 0}], "alerts": [null, {"firing": true}]}'
        server.routes["/health"] = (200, odd)
        sample = scrape(server.url)
        assert sample.ok and not sample.health_error
        assert "alerts (1 firing)" in frame_text(sample, sample, width=140)
        server.routes["/health"] = (200, b'{"lanes": 5, "alerts": "error_rate"}')
        server.routes["/metrics"] = (
            200,
            partial + b'batchscheduler_start_time_seconds NaN\nbatchscheduler_breaker_state{lane="0"} NaN\n'
            b'batchscheduler_ring_fill_ratio{ingest="0",lane="0"} +Inf\n'
            b'batchscheduler_worker_rss_bytes{role="flusher 0"} -Inf\n'
            b'batchscheduler_commit_latency_seconds_bucket{lane="0",le="oops"} 3\n',
        )
        first = scrape(server.url)
        second = dataclasses.replace(first, at=first.at + 1)
        text = frame_text(first, second, [math.inf, math.nan, None, 1.0], width=140)
        assert "ingest 0 → lane 0" in text and "flusher 0" in text and "none" in text


def test_once_against_nothing_listening_exits_1_saying_what_to_check():
    url = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(
        [sys.executable, str(TOP), "--url", url, "--once"], capture_output=True, text=True, timeout=60, env=tool_env()
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot reach {url}" in proc.stderr and "is the engine running? --metrics-addr?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_once_prints_one_plain_frame_after_two_samples(engine):
    proc = subprocess.run(
        [sys.executable, str(TOP), "--url", base_url(engine) + "/metrics", "--once", "--interval", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**tool_env(), "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stdout  # not a terminal: no alternate screen, no colour
    assert "0/s committed" in proc.stdout and "idle: no commits in the last 0.2 s" in proc.stdout
    assert proc.stdout.count("throughput") == 1


def test_the_url_takes_what_the_engine_prints():
    assert engine_url("http://127.0.0.1:9187/metrics") == "http://127.0.0.1:9187"
    assert engine_url("127.0.0.1:9187") == "http://127.0.0.1:9187"
    assert engine_url("http://[::1]:9187/health/") == "http://[::1]:9187"
    assert engine_url("https://example.org/engine/") == "https://example.org/engine"


# -------------------------------------------------- under a real terminal
class Terminal:
    """A program on the slave side of a pseudo-terminal of known size, with
    the pty as its controlling terminal (so a typed Ctrl-C signals it); the
    test reads what it draws from the master side."""

    def __init__(self, *args: str, rows: int = 60, cols: int = 150) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.modes_before = termios.tcgetattr(self.slave)
        # Become a session leader with the pty as controlling terminal, then run the tool.
        start = "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", start, sys.executable, str(TOP), *args],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env={**tool_env(), "TERM": "xterm-256color"},
        )
        self.raw = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def text(self) -> str:
        """What was drawn, escape sequences removed."""
        return ESCAPE.sub("", self.raw)

    def pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            self.raw += self._decoder.decode(os.read(self.master, 1 << 16))

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; screen:\n{self.text[-3000:]}")
            self.pump(0.2)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        code = self.proc.wait(max(0.1, deadline - time.monotonic()))
        while select.select([self.master], [], [], 0)[0]:  # what it wrote on the way out
            self.pump(0)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def terminal(*args: str):
    term = Terminal(*args)
    try:
        yield term
    finally:
        term.close()


def test_live_view_redraws_under_a_terminal_and_q_puts_the_terminal_back(engine):
    with terminal("--url", base_url(engine), "--interval", "0.2") as term:
        headings = ("throughput", "dead letters", "latency", "flush cuts", "batch size", "ring fill", "lanes")
        headings += ("workers", "alerts", "backpressure ingest 0")
        headings += ("q or Ctrl-C quits",)  # the footer: the whole screen was drawn
        term.wait_for(lambda s: all(h in s for h in headings), 60, "every heading")
        assert "\x1b[?1049h" in term.raw  # full screen: the alternate screen
        # Redrawn: intents sent now show up on the screen without a key pressed.
        with Client(engine.socket, client_id="pty", first_seq=1, timeout=60) as client:
            assert client.submit(client.intent("p", "spawn", {})).status == COMMITTED
            replies = client.submit_many([client.intent("p", "say", {"text": str(i)}) for i in range(149)])
        assert all(r.status == COMMITTED for r in replies)
        term.wait_for(lambda s: "committed 150" in s, 30, "the new count on screen")
        assert termios.tcgetattr(term.slave)[3] & termios.ECHO == 0  # keys are read unechoed meanwhile
        term.type(b"q")
        assert term.wait_exit() == 0, term.text[-2000:]
        tail = term.raw[term.raw.rindex("committed 150") :]
        assert LEAVE_ALT_SCREEN in tail and SHOW_CURSOR in tail
        assert termios.tcgetattr(term.slave) == term.modes_before  # echo and line mode back


def test_live_view_keeps_retrying_an_unreachable_engine_and_ctrl_c_quits_cleanly():
    url = f"http://127.0.0.1:{closed_port()}"
    with terminal("--url", url, "--interval", "0.2") as term:
        message = f"cannot reach {url}"
        term.wait_for(lambda s: s.count(message) >= 3, 60, "the message, redrawn on every retry")
        assert "is the engine running? --metrics-addr?" in term.text
        term.type(b"\x03")  # Ctrl-C, through the terminal's line discipline: SIGINT
        assert term.wait_exit() == 0, term.text[-2000:]
        assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text
        assert LEAVE_ALT_SCREEN in term.raw and SHOW_CURSOR in term.raw
        assert termios.tcgetattr(term.slave) == term.modes_before
