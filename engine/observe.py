"""Observability: fixed-bucket histograms in shared memory, and the HTTP
``/metrics`` (Prometheus text format, through ``prometheus_client``) and
``/health`` endpoints the supervisor serves.

Every number lives in the shared segment (``ipc.control``): counters and
histogram buckets written lock-free by the one process that owns them
(each flusher lane its own block), read and summed by whoever reports. A
restarted worker keeps adding to the same words, so a kill loses no count
and counts nothing twice. The collector reads them at scrape time; nothing
is kept in the supervisor (no prometheus_client multiprocess files).

Names follow ../shared/DESIGN.md § Observability names and Prometheus'
conventions (``_total``, ``_seconds``, base units).
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from engine import metrics
from engine.metrics import HISTOGRAMS, Histogram
from ipc.control import Control
from ipc.control import Flusher as F
from ipc.control import Ingest as I

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0


def _histogram_family(h: Histogram, lanes: list[list[int]], label: str = "lane") -> HistogramMetricFamily:
    family = HistogramMetricFamily(h.name, h.help, labels=[label])
    for lane, words in enumerate(lanes):
        counts = words[h.first : h.first + len(h.bounds) + 1]
        cumulative, running = [], 0
        for bound, count in zip((*h.bounds, float("inf")), counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        family.add_metric([str(lane)], cumulative, sum_value=words[h.sum_word] * h.unit)
    return family


class EngineCollector:
    """A prometheus_client collector over one engine's shared memory.

    ``health`` is the supervisor's ``/health`` body (for database state),
    ``alerts`` its alert flags (``engine.alerts.Alerts.firing``)."""

    def __init__(
        self, control: Control, *, started: float, health: Callable[[], dict], alerts: Callable[[], dict]
    ) -> None:
        self.control = control
        self.started = started
        self.health = health
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        c = self.control
        lanes = [f.snapshot() for f in c.flushers]
        ingests = [i.snapshot() for i in c.ingest]
        health = self.health()

        intents = CounterMetricFamily(
            "batchscheduler_intents", "Intents answered, by the status of their reply.", labels=["status"]
        )
        intents.add_metric(["committed"], sum(f[F.COMMITTED] for f in lanes))
        intents.add_metric(["dead_lettered"], sum(f[F.DEAD_LETTERED] for f in lanes))
        intents.add_metric(["duplicate"], sum(f[F.DUPLICATES] for f in lanes))
        intents.add_metric(["rejected"], sum(i[I.REJECTED] for i in ingests))
        yield intents

        dead = CounterMetricFamily(
            "batchscheduler_dead_letters", "Intents dead-lettered, by reply code.", labels=["code"]
        )
        for code, n in metrics.dead_letters_by_code(c).items():
            dead.add_metric([code], n)
        yield dead

        batches = CounterMetricFamily(
            "batchscheduler_batches", "Committed batches that stored intents, by lane and cut.", labels=["lane", "cut"]
        )
        for lane, f in enumerate(lanes):
            for cut, word in (("time", F.TIME_CUTS), ("size", F.SIZE_CUTS), ("drain", F.DRAIN_CUTS)):
                batches.add_metric([str(lane), cut], f[word])
        yield batches

        words = [h.snapshot() for h in c.histograms]
        for h in HISTOGRAMS:
            yield _histogram_family(h, words)

        up = GaugeMetricFamily("batchscheduler_database_up", "1 while the database takes writes, else 0.")
        up.add_metric([], 1.0 if health["database"] == "up" else 0.0)
        yield up
        restarts = CounterMetricFamily(
            "batchscheduler_database_restarts", "Times the supervisor restarted the embedded PostgreSQL."
        )
        restarts.add_metric([], health["database_restarts"])
        yield restarts

        breaker = GaugeMetricFamily(
            "batchscheduler_breaker_state", "Circuit breaker per lane: 0 closed, 1 open, 2 half-open.", labels=["lane"]
        )
        limit = GaugeMetricFamily(
            "batchscheduler_batch_size_limit", "The lane's current (adaptive) batch size limit.", labels=["lane"]
        )
        errors = CounterMetricFamily("batchscheduler_database_errors", "Failed batch writes, by lane.", labels=["lane"])
        for lane, f in enumerate(lanes):
            breaker.add_metric([str(lane)], f[F.BREAKER])
            limit.add_metric([str(lane)], f[F.BATCH_LIMIT])
            errors.add_metric([str(lane)], f[F.DB_ERRORS])
        yield breaker
        yield limit
        yield errors

        fill = GaugeMetricFamily(
            "batchscheduler_ring_fill_ratio", "Unreleased bytes over capacity, per ring.", labels=["ingest", "lane"]
        )
        for i, row in enumerate(c.intent_rings):
            for lane, ring in enumerate(row):
                fill.add_metric([str(i), str(lane)], (ring.published() - ring.released()) / ring.capacity)
        yield fill
        in_flight = GaugeMetricFamily(
            "batchscheduler_intents_in_flight", "Intents received and not yet answered, per ingest.", labels=["ingest"]
        )
        paused = GaugeMetricFamily(
            "batchscheduler_backpressure", "1 while the ingest has stopped reading on a full ring.", labels=["ingest"]
        )
        for i, v in enumerate(ingests):
            in_flight.add_metric([str(i)], max(0, v[I.RECEIVED] - v[I.REPLIES]))
            paused.add_metric([str(i)], v[I.PAUSED])
        yield in_flight
        yield paused
        paused_s = CounterMetricFamily(
            "batchscheduler_backpressure_seconds",
            "Time the ingest spent not reading because a ring was full.",
            labels=["ingest"],
        )
        for i, v in enumerate(ingests):
            paused_s.add_metric([str(i)], metrics.backpressure_s(v))
        yield paused_s

        restarts_w = CounterMetricFamily(
            "batchscheduler_worker_restarts", "Worker restarts by the supervisor.", labels=["role"]
        )
        rss = GaugeMetricFamily("batchscheduler_worker_rss_bytes", "Resident memory per worker.", labels=["role"])
        for slot, w in enumerate(c.workers):
            pid, restarts_n = w.snapshot()[:2]
            role = metrics.role_of(c, slot)
            restarts_w.add_metric([role], restarts_n)
            if pid:
                try:
                    rss.add_metric([role], psutil.Process(pid).memory_info().rss)
                except psutil.Error:  # exited between the read and the look
                    pass
        yield restarts_w
        yield rss

        firing = GaugeMetricFamily(
            "batchscheduler_alert_firing", "1 while the alert fires (thresholds: /health alerts).", labels=["alert"]
        )
        for name, on in self.alerts().items():
            firing.add_metric([name], 1.0 if on else 0.0)
        yield firing

        info = GaugeMetricFamily("batchscheduler_build_info", "The engine's version.", labels=["version"])
        info.add_metric([metrics.VERSION], 1)
        yield info
        start = GaugeMetricFamily("batchscheduler_start_time_seconds", "When the supervisor started (Unix time).")
        start.add_metric([], self.started)
        yield start


class ObservabilityServer:
    """``/metrics`` and ``/health`` on a loopback HTTP port, in a daemon
    thread of the supervisor. ``/health`` answers 200 when healthy, 503
    when not, with the JSON of ``health()``."""

    def __init__(
        self,
        host: str,
        port: int,
        control: Control,
        *,
        health: Callable[[], dict],
        alerts: Callable[[], dict],
        started: float,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = EngineCollector(control, started=started, health=health, alerts=alerts)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        registry, health_fn = self.registry, health

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "batchscheduler"
            # A client that sends half a request is dropped after this long.
            timeout = REQUEST_TIMEOUT_S

            def do_GET(self) -> None:
                self._answer(head=False)

            def do_HEAD(self) -> None:  # health checkers that only look at the status
                self._answer(head=True)

            def _answer(self, *, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry), head)
                elif path == "/health":
                    body = health_fn()
                    code = 200 if body["is_healthy"] else 503
                    self._send(code, "application/json", json.dumps(body).encode(), head)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n", head)

            def _send(self, code: int, ctype: str, body: bytes, head: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # the listen backlog (socketserver's default is 5)
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client gone mid-request (reset, broken pipe, timeout) is
                # the client's business: one debug line, never a traceback
                # on stderr (which would break --log-format json).
                exc = sys.exc_info()[1]
                log.debug("http: request from %s ended: %s: %s", client_address, type(exc).__name__, exc)

        self.httpd = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="observability", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
