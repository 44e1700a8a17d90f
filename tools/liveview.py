"""Live view: a running engine's ``/metrics`` and ``/health`` on one screen,
redrawn every ``--interval`` (``tools/top``).

Two scrapes make a frame: counters become rates over the interval between
them, and the commit-latency histogram's bucket increases give p50/p99 the
way Prometheus' ``histogram_quantile`` does (linear inside the bucket).
``render`` is a pure function of the two samples and the last minute of
throughput, so a test renders real scrapes without a terminal; ``main``
only samples, waits and draws.

The engine may be down, restarting, or not an engine at all: a sample
records why it could not be read, the frame says so, and the view keeps
retrying. Rates are shown only between two samples of the same engine run
(same ``batchscheduler_start_time_seconds``), so a restart never shows a
negative or spurious rate.

Keys: ``q`` quits (so does Ctrl-C); the terminal is restored either way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import http.client
import json
import math
import os
import re
import select
import signal
import sys
import termios
import time
import tty
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

# Prometheus' histogram_quantile over cumulative (bound, count) buckets: the dashboard preview's own.
from .promql import bucket_quantile as histogram_quantile

DEFAULT_URL = "http://127.0.0.1:9187"  # the engine's default --metrics-addr
NAMESPACE = "batchscheduler_"
# A scrape takes milliseconds; an engine that needs longer is stuck, and the
# view says so instead of freezing for the default socket timeout.
HTTP_TIMEOUT_S = 2.0
# An odd server must not fill the memory: the engine's /metrics is ~20 KiB.
MAX_BODY_BYTES = 8 << 20
HINT = "is the engine running? --metrics-addr?"
SPARK_WINDOW_S = 60.0  # the throughput sparkline covers the last minute
SPARK_WIDTH = 60  # characters; longer histories are averaged down to this
SPARK_CHARS = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 20
MAX_RINGS_SHOWN = 8  # fullest first; the rest are summarised on one line
BREAKER_NAMES = {0: "closed", 1: "open", 2: "half-open"}
STATE_STYLES = {
    "closed": "green",
    "open": "bold red",
    "half-open": "yellow",
    "up": "green",
    "down": "bold red",
    "restarting": "yellow",
}
CUTS = ("time", "size", "drain")

Series = dict[str, list[tuple[dict[str, str], float]]]


# ------------------------------------------------------------------ sampling
@dataclasses.dataclass(frozen=True)
class Sample:
    """One scrape of ``/metrics`` and ``/health``. ``error`` says why
    ``/metrics`` could not be read (``series`` is empty then);
    ``health_error`` why ``/health`` could not (``health`` is empty)."""

    url: str
    at: float  # time.monotonic() when taken: rates divide by differences of it
    wall: float  # time.time() when taken: uptime and the clock in the footer
    series: Series = dataclasses.field(default_factory=dict)
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    health_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def total(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` whose labels match; None when the
        engine exports no such sample."""
        values = [v for lab, v in self.series.get(name, ()) if all(lab.get(k) == x for k, x in labels.items())]
        return math.fsum(values) if values else None

    def by(self, name: str, label: str) -> dict[str, float]:
        """``name`` summed per value of ``label`` (samples without it are left out)."""
        out: dict[str, float] = {}
        for lab, v in self.series.get(name, ()):
            if label in lab:
                out[lab[label]] = out.get(lab[label], 0.0) + v
        return out

    def buckets(self, name: str, **labels: str) -> dict[float, float]:
        """A histogram's cumulative ``_bucket`` counts by upper bound, summed
        over the label sets that match (per lane, or all lanes)."""
        out: dict[float, float] = {}
        for lab, v in self.series.get(f"{name}_bucket", ()):
            if not all(lab.get(k) == x for k, x in labels.items()):
                continue
            try:
                le = float(lab.get("le", ""))
            except ValueError:
                continue  # not a bucket Prometheus would read either
            out[le] = out.get(le, 0.0) + v
        return out


def parse_metrics(text: str) -> Series:
    """The engine's samples (``batchscheduler_*``) by sample name; raises
    ValueError on text that is not the Prometheus exposition format."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(NAMESPACE):
                series.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return series


# Loopback by default: an http_proxy in the environment must not intercept it.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """Status and body; an HTTP error status is an answer too (``/health``
    says 503 with its JSON), a failure to connect raises OSError."""
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read(MAX_BODY_BYTES)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    return (str(exc) or type(exc).__name__).strip()


def scrape(url: str, *, timeout: float = HTTP_TIMEOUT_S) -> Sample:
    """Read ``url``/metrics and ``url``/health. Never raises for what the
    other end does: an unreachable engine, an HTTP error, a body that is not
    what an engine serves all come back as ``error`` / ``health_error``."""
    at, wall = time.monotonic(), time.time()
    try:
        status, body = _get(f"{url}/metrics", timeout)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Sample(url, at, wall, error=f"cannot reach {url}: {_reason(exc)} ({HINT})")
    if status != 200:
        return Sample(url, at, wall, error=f"{url}/metrics answered HTTP {status}: not an engine's metrics ({HINT})")
    try:
        series = parse_metrics(body.decode("utf-8", errors="replace"))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return Sample(url, at, wall, error=f"{url}/metrics is not Prometheus text: {_reason(exc)} ({HINT})")
    if not series:
        return Sample(url, at, wall, error=f"{url}/metrics has no batchscheduler_ metrics ({HINT})")
    health: dict[str, Any] = {}
    health_error = None
    try:
        status, body = _get(f"{url}/health", timeout)
        loaded = json.loads(body)
        if isinstance(loaded, dict):
            health = loaded
        else:
            health_error = f"/health answered HTTP {status} with JSON that is not an object"
    except (OSError, http.client.HTTPException, ValueError, RecursionError) as exc:
        health_error = f"/health: {_reason(exc)}"
    return Sample(url, at, wall, series, health, None, health_error)


# ------------------------------------------------------------ figures
def comparable(prev: Sample, cur: Sample) -> bool:
    """Whether rates between the two samples mean anything: both read, time
    passed, and the same engine run (counters restart with the engine)."""
    return (
        prev.ok
        and cur.ok
        and cur.at > prev.at
        and prev.total(f"{NAMESPACE}start_time_seconds") == cur.total(f"{NAMESPACE}start_time_seconds")
    )


def increase(prev: Sample, cur: Sample, name: str, **labels: str) -> float | None:
    """How much a counter grew between the samples (None when not comparable
    or not exported). A counter never shrinks within one run; if one does,
    the growth counts from zero, as Prometheus' ``increase`` does."""
    if not comparable(prev, cur):
        return None
    before, after = prev.total(name, **labels), cur.total(name, **labels)
    if after is None:
        return None
    if before is None or after < before:
        return after
    return after - before


def rate(prev: Sample, cur: Sample, name: str, **labels: str) -> float | None:
    grown = increase(prev, cur, name, **labels)
    return None if grown is None else grown / (cur.at - prev.at)


def throughput(prev: Sample, cur: Sample) -> float | None:
    """Committed intents per second between the samples."""
    return rate(prev, cur, f"{NAMESPACE}intents_total", status="committed")


def bucket_increase(prev: Sample, cur: Sample, name: str, **labels: str) -> list[tuple[float, float]]:
    """The histogram's cumulative buckets over the interval, by upper bound
    (empty when the samples are not comparable)."""
    if not comparable(prev, cur):
        return []
    before, after = prev.buckets(name, **labels), cur.buckets(name, **labels)
    if any(after[le] < before.get(le, 0.0) for le in after):  # reset: count from zero
        before = {}
    return sorted((le, after[le] - before.get(le, 0.0)) for le in after)


# ------------------------------------------------------------ formatting
def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """One character per point, ``▁`` (0) to ``█`` (the maximum); a gap
    (None: no rate for that interval) is a space. More points than
    ``width`` are averaged in groups."""
    if len(values) > width:
        groups = [values[len(values) * i // width : len(values) * (i + 1) // width] for i in range(width)]
        known = [[v for v in g if v is not None] for g in groups]
        values = [math.fsum(k) / len(k) if k else None for k in known]
    values = [v if v is not None and math.isfinite(v) else None for v in values]
    top = max((v for v in values if v is not None), default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif top <= 0:
            out.append(SPARK_CHARS[0])
        else:
            out.append(SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(v / top * (len(SPARK_CHARS) - 1) + 0.5))])
    return "".join(out)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar in eighths of a character, ``width`` long when full."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")


def fmt_count(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{round(value):,}"


def fmt_rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}/s" if value >= 10 or value == 0 else f"{value:.1f}/s"


def fmt_seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_bytes(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def fmt_number(value: Any) -> str:
    """An alert's value or threshold: a few significant digits, whatever came."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def natural_key(text: str) -> list[Any]:
    """``flusher 2`` before ``flusher 10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def size_bucket_label(lower: float, upper: float) -> str:
    """Batch sizes are integers: the bucket ``(lower, upper]`` holds
    ``lower+1 .. upper``."""
    if upper == math.inf:
        return f">{lower:.0f}"
    first = math.floor(lower) + 1
    return f"{upper:.0f}" if first >= upper else f"{first}-{upper:.0f}"


def breaker_name(value: float | None) -> str:
    """``batchscheduler_breaker_state``'s number as /health names it."""
    return BREAKER_NAMES.get(int(value), "?") if value is not None and math.isfinite(value) else "?"


def _listed(health: dict[str, Any], key: str) -> list[Any]:
    """A list field of /health; anything else (absent, null, a string) is no entries."""
    value = health.get(key)
    return value if isinstance(value, list) else []


def _state(name: str) -> Text:
    return Text(name, style=STATE_STYLES.get(name, ""))


# ------------------------------------------------------------- the frame
def render(
    prev: Sample, cur: Sample, history: Sequence[float | None] = (), *, interval: float = 1.0, live: bool = False
) -> RenderableType:
    """One screen from two samples (``prev`` the earlier; the same sample
    twice gives a frame without rates) and the throughput of the last
    intervals, oldest first; ``live`` adds the keys to the footer. Pure:
    the same inputs draw the same frame."""
    keys = " · q or Ctrl-C quits" if live else ""
    if not cur.ok:
        message = Text.assemble((cur.error or "", "bold red"), "\n", (f"retrying every {interval:g} s{keys}", "dim"))
        return Panel(message, title=f"BatchScheduler · {cur.url}", title_align="left", border_style="red")
    measured = comparable(prev, cur)
    clock = time.strftime("%H:%M:%S", time.localtime(cur.wall))
    return Group(
        _header(prev, cur),
        _traffic(prev, cur, history, interval, measured),
        SideBySide(_batch_sizes(prev, cur, interval, measured), _rings(cur)),
        _lanes(prev, cur),
        SideBySide(_workers(prev, cur), _alerts(cur), ratios=(2, 3)),
        Text(f"{clock} · every {interval:g} s{keys}", style="dim", justify="right"),
    )


class SideBySide:
    """Two panels in one row where the width allows (``min_width``), else
    one above the other: a narrow terminal gets readable tables, not
    columns squeezed to an ellipsis."""

    def __init__(
        self, left: RenderableType, right: RenderableType, *, ratios: tuple[int, int] = (1, 1), min_width: int = 100
    ) -> None:
        self.left, self.right, self.ratios, self.min_width = left, right, ratios, min_width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width < self.min_width:
            yield self.left
            yield self.right
            return
        grid = Table.grid(expand=True, padding=(0, 1))
        for ratio in self.ratios:
            grid.add_column(ratio=ratio)
        grid.add_row(self.left, self.right)
        yield grid


def _header(prev: Sample, cur: Sample) -> Panel:
    h = cur.health
    version = next(iter(cur.by(f"{NAMESPACE}build_info", "version")), "?")
    started = cur.total(f"{NAMESPACE}start_time_seconds")
    title = f"BatchScheduler {version} · {cur.url}"
    if started and math.isfinite(started):
        title += f" · up {fmt_duration(cur.wall - started)}"
    line = Text()
    healthy = h.get("is_healthy")
    if isinstance(healthy, bool):
        line.append("● healthy" if healthy else "● unhealthy", style="bold green" if healthy else "bold red")
    else:
        line.append(f"● health unknown ({cur.health_error or 'no /health answer'})", style="yellow")
    database = h.get("database")
    if not isinstance(database, str):
        up = cur.total(f"{NAMESPACE}database_up")
        database = "?" if up is None else ("up" if up else "down")
    line.append("   database ")
    line.append_text(_state(database))
    restarts = cur.total(f"{NAMESPACE}database_restarts_total")
    if restarts:
        line.append(f" (restarts {fmt_count(restarts)})", style="yellow")
    breaker = h.get("breaker")
    if not isinstance(breaker, str):
        breaker = breaker_name(max(cur.by(f"{NAMESPACE}breaker_state", "lane").values(), default=0.0))
    line.append("   breaker ")
    line.append_text(_state(breaker))
    if h.get("batching_enabled") is False:
        line.append("   batching off", style="bold red")
    if h.get("draining") is True:
        line.append("   draining", style="yellow")
    in_flight = cur.total(f"{NAMESPACE}intents_in_flight")
    line.append(f"   in flight {fmt_count(in_flight)}")
    line.append_text(_backpressure(prev, cur))
    return Panel(line, title=title, title_align="left", box=box.ROUNDED)


def _backpressure(prev: Sample, cur: Sample) -> Text:
    """Which ingests are paused on a full ring now, and the share of the
    interval each spent paused. Without two comparable samples, only the
    paused ones (the flag), as there is no share to show yet."""
    flags = cur.by(f"{NAMESPACE}backpressure", "ingest")
    seconds = f"{NAMESPACE}backpressure_seconds_total"
    shares = {i: rate(prev, cur, seconds, ingest=i) for i in cur.by(seconds, "ingest")}
    measured = {i: share for i, share in shares.items() if share is not None}
    line = Text()
    for n, ingest in enumerate(sorted(set(measured) | {i for i, v in flags.items() if v}, key=natural_key)):
        line.append("   backpressure " if not n else ", ")
        if flags.get(ingest):
            line.append(f"ingest {ingest} paused", style="bold yellow")
        else:
            line.append(f"ingest {ingest}")
        if ingest in measured:
            # The engine's clock and the scrape's are a scrape's latency apart: a
            # pause covering the whole interval may read a hair over 100%.
            share = max(0.0, min(1.0, measured[ingest]))
            style = "bold red" if share >= 0.5 else "yellow" if share else "dim"
            line.append(f" {100 * share:.1f}%", style=style)
    return line


def _traffic(prev: Sample, cur: Sample, history: Sequence[float | None], interval: float, measured: bool) -> Panel:
    intents = f"{NAMESPACE}intents_total"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    now = throughput(prev, cur)
    spark = Text()
    spark.append(f"{fmt_rate(now)} committed" if now is not None else "measuring…", style="bold cyan")
    known = [v for v in history if v is not None]
    if known:
        spark.append("   ")
        spark.append(sparkline(history), style="cyan")
        spark.append(f"  last {min(SPARK_WINDOW_S, len(history) * interval):g} s, peak {fmt_rate(max(known))}", "dim")
    grid.add_row("throughput", spark)

    counts = Text()
    for i, status in enumerate(("committed", "dead_lettered", "duplicate", "rejected")):
        total = cur.total(intents, status=status)
        per_s = rate(prev, cur, intents, status=status)
        if i:
            counts.append(" · ", style="dim")
        style = "yellow" if status != "committed" and per_s else ""
        counts.append(f"{status.replace('_', '-')} {fmt_count(total)}", style=style)
        if per_s and status != "committed":
            counts.append(f" ({fmt_rate(per_s)})", style="yellow")
    grid.add_row("intents", counts)
    grid.add_row("dead letters", _dead_letters(prev, cur))

    grid.add_row("latency", _latency_line(prev, cur, interval, measured))

    cuts = Text()
    batches = f"{NAMESPACE}batches_total"
    recent = {cut: increase(prev, cur, batches, cut=cut) or 0.0 for cut in CUTS}
    lifetime = {cut: cur.total(batches, cut=cut) or 0.0 for cut in CUTS}
    if measured:
        cuts.append(_ratio(recent) + f" of {fmt_count(sum(recent.values()))} batches in the last {interval:g} s")
        cuts.append(" · ", style="dim")
    cuts.append(f"since start {_ratio(lifetime)} of {fmt_count(sum(lifetime.values()))}", style="dim")
    grid.add_row("flush cuts", cuts)
    return Panel(grid, box=box.ROUNDED, padding=(0, 1))


def _dead_letters(prev: Sample, cur: Sample) -> Text:
    """Dead letters by reply code, the most first: the total since start and
    the rate over the interval. The engine exports every code, zeros too;
    only the codes that happened are shown."""
    name = f"{NAMESPACE}dead_letters_total"
    if name not in cur.series:
        return Text("-", style="dim")  # an engine older than the metric
    totals = sorted(((n, code) for code, n in cur.by(name, "code").items() if n), key=lambda r: (-r[0], r[1]))
    if not totals:
        return Text("none", style="dim")
    line = Text()
    for i, (total, code) in enumerate(totals):
        if i:
            line.append(" · ", style="dim")
        line.append(f"{code} {fmt_count(total)}")
        per_s = rate(prev, cur, name, code=code)
        if per_s is not None:
            line.append(f" ({fmt_rate(per_s)})", style="yellow" if per_s else "dim")
    return line


def _latency_line(prev: Sample, cur: Sample, interval: float, measured: bool) -> Text:
    if not measured:
        return Text("measuring…", style="dim")
    latency = bucket_increase(prev, cur, f"{NAMESPACE}commit_latency_seconds")
    observed = latency[-1][1] if latency else 0.0
    if not observed:
        return Text(f"idle: no commits in the last {interval:g} s", style="dim")
    write = bucket_increase(prev, cur, f"{NAMESPACE}commit_duration_seconds")
    line = Text()
    line.append(f"p50 {fmt_seconds(histogram_quantile(0.5, latency))}", style="bold")
    line.append(" · ")
    line.append(f"p99 {fmt_seconds(histogram_quantile(0.99, latency))}", style="bold")
    line.append(f"  received → committed, {fmt_count(observed)} intents", style="dim")
    if write and write[-1][1]:
        line.append("   db write ")
        line.append(
            f"p50 {fmt_seconds(histogram_quantile(0.5, write))} · p99 {fmt_seconds(histogram_quantile(0.99, write))}"
        )
    return line


def _ratio(counts: dict[str, float]) -> str:
    total = sum(counts.values())
    return " ".join(f"{cut} {100 * counts[cut] / total:.0f}%" if total else f"{cut} -" for cut in CUTS)


def _batch_sizes(prev: Sample, cur: Sample, interval: float, measured: bool) -> Panel:
    name = f"{NAMESPACE}batch_size"
    lifetime = sorted(cur.buckets(name).items())
    recent = dict(bucket_increase(prev, cur, name)) if measured else {}
    table = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("share", ratio=1, no_wrap=True, style="magenta")
    table.add_column("batches", justify="right", no_wrap=True)
    table.add_column(f"last {interval:g}s", justify="right", no_wrap=True, style="dim")
    rows, lower, below, below_recent = [], 0.0, 0.0, 0.0
    for le, cumulative in lifetime:  # cumulative counts -> per bucket
        count = max(0.0, cumulative - below)
        now = max(0.0, recent.get(le, 0.0) - below_recent)
        rows.append((size_bucket_label(lower, le), count, now))
        lower, below, below_recent = le, max(below, cumulative), max(below_recent, recent.get(le, 0.0))
    total = sum(count for _, count, _ in rows)
    used = [i for i, (_, count, _) in enumerate(rows) if count]
    if not used:
        table.add_row("", Text("no batches yet", style="dim"), "", "")
    for label, count, now in rows[used[0] : used[-1] + 1] if used else ():
        table.add_row(label, bar(count / total), fmt_count(count), f"+{fmt_count(now)}" if now else "")
    return Panel(table, title="batch size", title_align="left", box=box.ROUNDED)


def _rings(cur: Sample) -> Panel:
    fills = [
        (lab.get("ingest", "?"), lab.get("lane", "?"), v)
        for lab, v in cur.series.get(f"{NAMESPACE}ring_fill_ratio", ())
    ]
    fills.sort(key=lambda r: (-r[2], natural_key(r[0]), natural_key(r[1])))
    table = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
    table.add_column("ring", no_wrap=True)
    table.add_column("fill", ratio=1, no_wrap=True)
    table.add_column("", justify="right", no_wrap=True)
    for ingest, lane, fill in sorted(fills[:MAX_RINGS_SHOWN], key=lambda r: (natural_key(r[0]), natural_key(r[1]))):
        style = "bold red" if fill >= 0.9 else "yellow" if fill >= 0.5 else "green"
        table.add_row(f"ingest {ingest} → lane {lane}", Text(bar(fill), style=style), f"{100 * fill:.1f}%")
    if len(fills) > MAX_RINGS_SHOWN:
        rest = fills[MAX_RINGS_SHOWN:]
        table.add_row(f"… {len(rest)} more", "", f"≤{100 * rest[0][2]:.1f}%")
    if not fills:
        table.add_row(Text("no rings reported", style="dim"), "", "")
    return Panel(table, title="ring fill", title_align="left", box=box.ROUNDED)


def _lanes(prev: Sample, cur: Sample) -> Panel:
    breaker = cur.by(f"{NAMESPACE}breaker_state", "lane")
    limit = cur.by(f"{NAMESPACE}batch_size_limit", "lane")
    errors = cur.by(f"{NAMESPACE}database_errors_total", "lane")
    batches = cur.by(f"{NAMESPACE}batches_total", "lane")
    health_lanes = {str(lane.get("lane")): lane for lane in _listed(cur.health, "lanes") if isinstance(lane, dict)}
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, expand=True)
    for heading in ("lane", "breaker", "db", "size limit", "batches/s", "p50", "p99", "db errors"):
        table.add_column(heading, justify="left" if heading in ("lane", "breaker", "db") else "right", no_wrap=True)
    lanes = sorted(set(breaker) | set(limit) | set(errors) | set(batches), key=natural_key)
    for lane in lanes:
        state = breaker_name(breaker.get(lane))
        connected = health_lanes.get(lane, {}).get("connected")
        db = _state("up") if connected is True else _state("down") if connected is False else Text("?")
        latency = bucket_increase(prev, cur, f"{NAMESPACE}commit_latency_seconds", lane=lane)
        quiet = not latency or not latency[-1][1]
        failed = increase(prev, cur, f"{NAMESPACE}database_errors_total", lane=lane)
        errs = Text(fmt_count(errors.get(lane)))
        if failed:
            errs.append(f" (+{fmt_count(failed)})", style="bold red")
        table.add_row(
            lane,
            _state(state),
            db,
            fmt_count(limit.get(lane)),
            fmt_rate(rate(prev, cur, f"{NAMESPACE}batches_total", lane=lane)),
            "-" if quiet else fmt_seconds(histogram_quantile(0.5, latency)),
            "-" if quiet else fmt_seconds(histogram_quantile(0.99, latency)),
            errs,
        )
    if not lanes:
        table.add_row(Text("no lanes reported", style="dim"), *[""] * 7)
    return Panel(table, title="lanes", title_align="left", box=box.ROUNDED)


def _workers(prev: Sample, cur: Sample) -> Panel:
    rss = cur.by(f"{NAMESPACE}worker_rss_bytes", "role")
    restarts = cur.by(f"{NAMESPACE}worker_restarts_total", "role")
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, expand=True)
    table.add_column("worker", no_wrap=True)
    table.add_column("rss", justify="right", no_wrap=True)
    table.add_column("restarts", justify="right", no_wrap=True)
    for role in sorted(set(rss) | set(restarts), key=natural_key):
        recent = increase(prev, cur, f"{NAMESPACE}worker_restarts_total", role=role)
        count = Text(fmt_count(restarts.get(role)), style="yellow" if restarts.get(role) else "")
        if recent:
            count.append(f" (+{fmt_count(recent)})", style="bold red")
        table.add_row(role, fmt_bytes(rss[role]) if role in rss else Text("not running", style="red"), count)
    return Panel(table, title="workers", title_align="left", box=box.ROUNDED)


def _alerts(cur: Sample) -> Panel:
    alerts = [a for a in _listed(cur.health, "alerts") if isinstance(a, dict)]
    firing = [a for a in alerts if a.get("firing") is True]
    if not alerts:
        body: RenderableType = Text("none", style="dim")
    else:
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False, expand=True)
        for heading in ("alert", "state", "value", "threshold", "since"):
            table.add_column(heading, no_wrap=True, justify="right" if heading in ("value", "threshold") else "left")
        for a in alerts:
            on = a.get("firing") is True
            since = a.get("since")
            table.add_row(
                str(a.get("name", "?")),
                Text("FIRING", style="bold white on red") if on else Text("ok", style="green"),
                fmt_number(a.get("value")),
                fmt_number(a.get("threshold")),
                str(since)[11:19] if on and isinstance(since, str) and len(since) >= 19 else "",
                style="bold red" if on else "",
            )
        notes = [Text(f"{a.get('name', '?')}: {a['summary']}", style="red") for a in firing if a.get("summary")]
        body = Group(table, *notes)
    title = f"alerts ({len(firing)} firing)" if firing else "alerts"
    return Panel(body, title=title, title_align="left", box=box.ROUNDED, border_style="red" if firing else "")


def frame_text(
    prev: Sample,
    cur: Sample,
    history: Sequence[float | None] = (),
    *,
    interval: float = 1.0,
    width: int = 120,
) -> str:
    """The frame as plain text (no colour, no escapes): what a test reads."""
    console = Console(width=width, color_system=None, force_terminal=False, record=False, file=_Sink())
    with console.capture() as capture:
        console.print(render(prev, cur, history, interval=interval))
    return capture.get()


class _Sink:
    """A file that drops what it is given (``Console.capture`` keeps the text)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------- the loop
class Watch:
    """The samples behind the view: the latest, the one before it, and the
    throughput of each interval of the last minute."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.history: collections.deque[float | None] = collections.deque(
            maxlen=max(1, math.ceil(SPARK_WINDOW_S / interval))
        )
        self.prev: Sample | None = None
        self.cur: Sample | None = None

    def take(self) -> Sample:
        sample = scrape(self.url)
        self.prev, self.cur = self.cur, sample
        if self.prev is not None:
            self.history.append(throughput(self.prev, sample))
        return sample

    def frame(self, *, live: bool = False) -> RenderableType:
        assert self.cur is not None, "take() first"
        return render(self.prev or self.cur, self.cur, list(self.history), interval=self.interval, live=live)


@contextlib.contextmanager
def keyboard() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    signals), restored on the way out whatever happens. None when stdin is
    not a terminal: then only Ctrl-C quits."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_quit(keys: int | None, deadline: float) -> bool:
    """Sleep until ``deadline`` (monotonic), True at once if ``q`` is typed."""
    while (left := deadline - time.monotonic()) > 0:
        if keys is None:
            time.sleep(left)
            break
        ready, _, _ = select.select([keys], [], [], left)
        if ready:
            typed = os.read(keys, 1024)
            if not typed:  # the terminal went away: keep drawing until Ctrl-C or SIGTERM
                time.sleep(max(0.0, deadline - time.monotonic()))
                break
            if b"q" in typed.lower():
                return True
    return False


def build_parser() -> argparse.ArgumentParser:
    from .bench import args as cli_args

    p = argparse.ArgumentParser(
        prog=cli_args.prog("top"),
        description="A live, one-screen view of a running engine, from its /metrics and /health: throughput "
        "with a sparkline of the last minute, dead letters by code, commit latency p50/p99, batch sizes, flush "
        "cuts, ring fill, backpressure, lanes, workers, the database, the breaker and alerts. "
        "Keys: q quits (so does Ctrl-C).",
        epilog="Exit status: 0 quit (q, Ctrl-C) or --once drew a frame; 1 --once could not reach the engine; "
        "2 bad arguments.",
        formatter_class=cli_args.HelpFormatter,
    )
    p.add_argument(
        "--url",
        type=engine_url,
        default=DEFAULT_URL,
        help="the engine's metrics address: http://HOST:PORT, or HOST:PORT, or the 'metrics:' line's URL that "
        "tools/run_engine prints (default: %(default)s, the engine's default --metrics-addr)",
    )
    p.add_argument(
        "--interval",
        type=cli_args.positive_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (and between --once's two samples)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="take two samples --interval apart, print one frame to stdout (no full-screen mode) and exit",
    )
    p.add_argument("--no-color", action="store_true", help="no colours (NO_COLOR in the environment does the same)")
    return p


def engine_url(text: str) -> str:
    """argparse type: the base URL of an engine's metrics server; a trailing
    ``/metrics`` or ``/health`` (the engine prints the former) is dropped."""
    candidate = text.strip()
    if "://" not in candidate:
        candidate = f"http://{candidate}"
    try:
        parts = urllib.parse.urlsplit(candidate)
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {text!r}")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"names no host: {text!r}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"must not have a query or fragment: {text!r}")
    path = re.sub(r"/(metrics|health)/?$", "", parts.path).rstrip("/")
    if port == 0:
        raise argparse.ArgumentTypeError(
            f"port 0 is what the engine listens on to pick one; give the port it printed: {text!r}"
        )
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def main(argv: Sequence[str] | None = None) -> int:
    from .bench import args as cli_args

    args = build_parser().parse_args(argv)
    console = Console(no_color=args.no_color or None, highlight=False)
    prog = cli_args.prog("top")
    # SIGTERM unwinds like Ctrl-C: the terminal is put back as it was.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.once:
            return _once(args.url, args.interval, console, prog)
        return _watch(args.url, args.interval, console)
    except KeyboardInterrupt:
        return 0


def _once(url: str, interval: float, console: Console, prog: str) -> int:
    watch = Watch(url, interval)
    for i in range(2):
        if i:
            time.sleep(interval)
        sample = watch.take()
        if not sample.ok:
            print(f"{prog}: {sample.error}", file=sys.stderr)
            return 1
    console.print(watch.frame())
    return 0


def _watch(url: str, interval: float, console: Console) -> int:
    """Redraw every ``interval`` until q or Ctrl-C: full-screen on a
    terminal, one frame after another when stdout is a pipe or a file."""
    watch = Watch(url, interval)
    deadline = time.monotonic()
    with keyboard() as keys:
        screen = Live(console=console, screen=True, auto_refresh=False, transient=True) if console.is_terminal else None
        with screen or contextlib.nullcontext():
            while True:
                watch.take()
                if screen is not None:
                    screen.update(watch.frame(live=True), refresh=True)
                else:
                    console.print(watch.frame())
                deadline = max(deadline + interval, time.monotonic())  # a slow scrape skips, never bunches
                if wait_for_quit(keys, deadline):
                    return 0
