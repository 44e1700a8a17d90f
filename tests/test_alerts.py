"""engine.alerts over synthetic samples (the HTTP/log side runs against a
real engine in test_observe.py), and the histogram quantile they use."""

from __future__ import annotations

import logging

import pytest

from engine.alerts import MIN_INTENTS, Alerts
from engine.metrics import COMMIT_LATENCY, Sample, quantile, stats_line
from engine.options import Options, from_mapping

WIDTH = len(COMMIT_LATENCY.bounds) + 1


def latency(seconds: float, n: int) -> tuple[int, ...]:
    """``n`` intents in the bucket that holds ``seconds``."""
    counts = [0] * WIDTH
    counts[next((i for i, b in enumerate(COMMIT_LATENCY.bounds) if seconds <= b), WIDTH - 1)] = n
    return tuple(counts)


def sample(committed=0, dead=0, buckets=(0,) * WIDTH, failures=0) -> Sample:
    return Sample(committed, dead, 0, 0, buckets, failures, 0, 0.0)


def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile():
    counts = [0] * WIDTH
    counts[4] = 100  # bucket (0.0075, 0.01]
    assert quantile(0.5, counts) == pytest.approx(0.0075 + 0.0025 * 0.5)
    assert quantile(0.99, counts) == pytest.approx(0.0075 + 0.0025 * 0.99)
    counts[-1] = 1000  # the +Inf bucket answers the largest finite bound
    assert quantile(0.99, counts) == COMMIT_LATENCY.bounds[-1]
    assert quantile(0.5, [0] * WIDTH) == 0.0


def test_error_rate_needs_the_whole_window_then_fires_and_clears_once(caplog):
    alerts = Alerts(from_mapping({"alert_error_rate_for_s": 10}))
    caplog.set_level(logging.INFO, logger="engine.alerts")
    alerts.evaluate(sample(), rss_ratio=0, now=0)
    alerts.evaluate(sample(committed=90, dead=10), rss_ratio=0, now=5)
    assert not alerts.firing()["error_rate"]  # 5 s of a 10 s window: undecided
    alerts.evaluate(sample(committed=95, dead=10), rss_ratio=0, now=10)
    alerts.evaluate(sample(committed=96, dead=10), rss_ratio=0, now=11)
    state = {a["name"]: a for a in alerts.state()}["error_rate"]
    assert state["firing"] and state["value"] == pytest.approx(10 / 106, abs=1e-6)  # since the sample at 0 s
    alerts.evaluate(sample(committed=5000, dead=10), rss_ratio=0, now=21)  # 10 s of clean traffic
    assert not alerts.firing()["error_rate"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("error_rate firing" in m for m in messages) == 1
    assert sum("error_rate cleared" in m for m in messages) == 1


def test_a_lone_early_dead_letter_is_no_rate_and_fires_nothing():
    alerts = Alerts(from_mapping({"alert_error_rate_for_s": 5, "alert_latency_for_s": 5, "alert_latency_p95_ms": 5}))
    alerts.evaluate(sample(), rss_ratio=0, now=0)
    alerts.evaluate(sample(dead=1, buckets=latency(0.02, 1)), rss_ratio=0, now=5)
    assert alerts.firing() == {"error_rate": False, "latency_p95": False, "flush_failures": False, "memory": False}
    alerts.evaluate(sample(dead=MIN_INTENTS, buckets=latency(0.02, MIN_INTENTS)), rss_ratio=0, now=6)
    assert alerts.firing()["error_rate"] and alerts.firing()["latency_p95"]


def test_latency_stays_firing_while_nothing_commits():
    alerts = Alerts(from_mapping({"alert_latency_for_s": 5}))
    slow = latency(0.09, 500)
    alerts.evaluate(sample(), rss_ratio=0, now=0)
    alerts.evaluate(sample(buckets=slow), rss_ratio=0, now=5)
    assert alerts.firing()["latency_p95"]
    for t in range(11, 40):  # the database is down: no commit at all
        alerts.evaluate(sample(buckets=slow), rss_ratio=0, now=t)
    assert alerts.firing()["latency_p95"]


def test_an_error_rate_at_the_threshold_does_not_fire():
    alerts = Alerts(from_mapping({"alert_error_rate_for_s": 1}))
    alerts.evaluate(sample(), rss_ratio=0, now=0)
    alerts.evaluate(sample(committed=99, dead=1), rss_ratio=0, now=1)
    assert not alerts.firing()["error_rate"]  # 1% is not > 1%


def test_latency_p95_over_its_window():
    alerts = Alerts(from_mapping({"alert_latency_for_s": 60}))
    fast = latency(0.008, 1000)
    alerts.evaluate(sample(buckets=fast), rss_ratio=0, now=0)
    slow = add(fast, latency(0.09, 1000))  # 1000 more, all near 90 ms
    alerts.evaluate(sample(buckets=slow), rss_ratio=0, now=60)
    assert alerts.firing()["latency_p95"]
    assert {a["name"]: a for a in alerts.state()}["latency_p95"]["value"] > 0.05
    alerts.evaluate(sample(buckets=add(slow, latency(0.008, 5000))), rss_ratio=0, now=120)
    assert not alerts.firing()["latency_p95"]


def test_flush_failures_and_memory_fire_at_once():
    alerts = Alerts(Options())
    alerts.evaluate(sample(failures=3), rss_ratio=0.8, now=0)
    assert alerts.firing() == {"error_rate": False, "latency_p95": False, "flush_failures": False, "memory": False}
    alerts.evaluate(sample(failures=4), rss_ratio=0.81, now=1)
    assert alerts.firing()["flush_failures"] and alerts.firing()["memory"]


def test_the_stats_line_reads_an_interval():
    before = sample(committed=1000, buckets=latency(0.008, 1000))
    after = Sample(3000, 20, 10, 2020, add(before.latency_buckets, latency(0.012, 2020)), 0, 0, 0.25)
    text, fields = stats_line(before, after, 2.0)
    assert fields["committed_per_s"] == 1000 and fields["dead_lettered_per_s"] == 10
    assert fields["batch_avg"] == 202 and fields["breaker"] == "closed"
    assert 10 < fields["latency_p50_ms"] <= 12.5 and fields["ring_fill"] == 0.25
    assert text.startswith("stats: 1000 committed/s") and "ring fill 25.0%" in text


@pytest.mark.parametrize(
    "field,bad",
    [
        ("alert_error_rate", 0),
        ("alert_error_rate", 1.5),
        ("alert_error_rate_for_s", 0),
        ("alert_latency_for_s", 10**6),
        ("alert_latency_p95_ms", -1),
        ("alert_flush_failures", 0),
        ("alert_memory_ratio", 0),
        ("alert_memory_ratio", 1.01),
        ("stats_interval_s", 0.5),
        ("stats_interval_s", -1),
        ("log_format", "xml"),
        ("alert_latency_p95_ms", float("inf")),
        ("alert_error_rate", float("nan")),
        ("time_window_ms", float("inf")),
        ("alert_flush_failures", 10**20),
    ],
)
def test_bad_alert_and_log_options_name_the_field(field, bad):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        from_mapping({field: bad})
