"""Dashboard preview: the Grafana dashboard's panels drawn from its own
queries, over a real engine under load (the code behind ``tools/dashboard_preview``).

No Grafana runs here, so this is not a screenshot: the tool starts an engine
(``tools/run_engine`` in a temp directory, ``--metrics-addr 127.0.0.1:0``)
or uses the one at ``--url``, drives ``tools/load_gen``'s open-loop MUD load
through the engine's socket for ``--duration`` seconds, scrapes ``/metrics``
every ``--scrape-interval``, evaluates every target of every panel of ``docs/grafana/batchscheduler.json``
at every scrape with ``tools/promql.py`` (with the dashboard's template
variables set to All, as Grafana expands them), and draws the panels with
matplotlib in the dashboard's own grid layout: titles, legends from
``legendFormat``, units, thresholds and value mappings.

A query the evaluator cannot evaluate stops the tool (exit 1) naming the
panel and the query: the dashboard and the evaluator cannot drift apart.
The dashboard's queries are parsed before the engine starts, so a broken
dashboard costs no load run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import loadgen, promql
from .bench import args as cli_args

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "batchscheduler.json"
PICTURE = ROOT / "docs" / "grafana" / "dashboard.png"

# The load is tools/load_gen's (loadgen.run): open-loop Poisson arrivals of
# the MUD mix from this many client processes -- enough that one slow
# reply never holds back the arrivals, few enough for a 2-core machine.
LOAD_CONNECTIONS = 4
# Of the entities the load acts on, this share is never spawned: intents on
# them are dead-lettered (no_such_entity), so the dead-letter and error-rate
# panels show data, and stay under the seed's 1% error-rate alert.
UNSPAWNED_SHARE = 0.005
# A scrape reads shared memory and a few psutil calls: milliseconds. Ten
# seconds is a stalled engine, counted as a failed scrape, not a hung tool.
SCRAPE_TIMEOUT_S = 10.0


class DashboardError(ValueError):
    """The dashboard asks for something the preview cannot draw or evaluate."""


class CouldNotRun(RuntimeError):
    """The engine could not be started, loaded or scraped (exit 2)."""


# ------------------------------------------------------------- the dashboard
def load_dashboard(path: str | os.PathLike) -> dict:
    """The dashboard JSON; DashboardError when it is not one."""
    try:
        dashboard = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DashboardError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DashboardError(f"{path} is not JSON: {exc}") from None
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        raise DashboardError(f"{path} is not a Grafana dashboard (no panels list)")
    return dashboard


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, in order; a collapsed row's panels follow it."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return out


def graph_panels(dashboard: dict) -> list[dict]:
    """The panels that query (everything but rows)."""
    return [p for p in panels(dashboard) if p.get("type") != "row"]


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")


def variable_queries(dashboard: dict) -> dict[str, tuple[str, str]]:
    """Each template variable's ``label_values(metric, label)``."""
    found = {}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = _LABEL_VALUES.match(text)
        if var.get("type") != "query" or m is None:
            raise DashboardError(
                f"template variable {var.get('name')!r}: only query variables of the form "
                f"label_values(metric, label) are supported, got {text!r}"
            )
        found[var["name"]] = (m.group(1), m.group(2))
    return found


def variable_values(dashboard: dict, scrape: promql.Scrape) -> dict[str, list[str]]:
    """Each template variable's values in ``scrape`` (what Grafana's All selects)."""
    values = {}
    for name, (metric, label) in variable_queries(dashboard).items():
        seen = {dict(labels).get(label, "") for labels in scrape.series.get(metric, {})} - {""}
        if not seen:
            raise DashboardError(f"template variable {name!r}: no {metric} series with a {label!r} label in /metrics")
        values[name] = sorted(seen, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    return values


def expand(expr: str, values: dict[str, list[str]]) -> str:
    """Grafana's expansion of ``$var`` for Prometheus: one value as itself,
    several as the regex ``(a|b)``, each regex-escaped."""

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise DashboardError(f"{expr!r}: ${name} is not a template variable of the dashboard")
        chosen = [re.escape(v) for v in values[name]]
        return chosen[0] if len(chosen) == 1 else "(" + "|".join(chosen) + ")"

    return _VARIABLE.sub(one, expr)


@dataclasses.dataclass
class Query:
    panel: dict
    target: dict
    expr: str  # with the variables expanded
    node: promql.Node


def queries(dashboard: dict, values: dict[str, list[str]]) -> list[Query]:
    """Every target of every panel, parsed; DashboardError names the panel
    and the query the evaluator cannot take."""
    out = []
    for panel in graph_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            if not target.get("expr"):
                raise DashboardError(f"{where}: no expr")
            try:
                expr = expand(target["expr"], values)
                out.append(Query(panel, target, expr, promql.parse(expr)))
            except (DashboardError, promql.UnsupportedQuery) as exc:
                raise DashboardError(f"{where}: {exc}") from None
    return out


def metric_names(dashboard: dict) -> set[str]:
    """Every sample name the dashboard's queries and variables select."""
    placeholder = {name: ["0"] for name in variable_queries(dashboard)}
    names = {metric for metric, _ in variable_queries(dashboard).values()}
    for q in queries(dashboard, placeholder):
        names |= promql.metric_names(q.node)
    return names


_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def legend(fmt: str | None, labels: promql.Labels, expr: str) -> str:
    """A series' name as Grafana shows it: ``legendFormat`` with ``{{label}}``
    filled in; without one, the label set (or the query for a scalar)."""
    named = dict(labels)
    if fmt and fmt != "__auto":
        return _LEGEND.sub(lambda m: named.get(m.group(1), ""), fmt)
    shown = ", ".join(f'{k}="{v}"' for k, v in labels if k != promql.NAME)
    return f"{named.get(promql.NAME, '')}{{{shown}}}" if labels else expr


@dataclasses.dataclass
class Series:
    ref: str
    legend: str
    values: list[float]  # one per scrape; NaN where the query gave no value for this series


@dataclasses.dataclass
class PanelData:
    panel: dict
    series: list[Series]


def evaluate_dashboard(dashboard: dict, history: Sequence[promql.Scrape]) -> list[PanelData]:
    """Every panel's series over the history (variables set to All, from the
    last scrape). DashboardError names the panel and query that failed."""
    if not history:
        raise DashboardError("no scrape to evaluate against")
    values = variable_values(dashboard, history[-1])
    by_panel: dict[int, PanelData] = {}
    for q in queries(dashboard, values):
        data = by_panel.setdefault(id(q.panel), PanelData(q.panel, []))
        found: dict[promql.Labels, list[float]] = {}
        for at in range(len(history)):
            try:
                result = promql.evaluate(q.node, history, at)
            except promql.EvaluationError as exc:
                raise DashboardError(f"panel {q.panel.get('title')!r} target {q.target.get('refId')}: {exc}") from None
            points = {(): result} if isinstance(result, float) else result
            for labels, v in points.items():
                found.setdefault(labels, [math.nan] * len(history))[at] = v
        rendered = [
            Series(q.target.get("refId", ""), legend(q.target.get("legendFormat"), k, q.expr), v)
            for k, v in found.items()
        ]
        data.series.extend(sorted(rendered, key=lambda s: _natural(s.legend)))
    return [by_panel.get(id(p), PanelData(p, [])) for p in graph_panels(dashboard)]


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------- scraping
def fetch(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    """``GET url``; OSError (urllib's errors are OSErrors) when it fails."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


class Scraper(threading.Thread):
    """Scrapes ``url`` every ``interval`` until stopped; each scrape is timed
    at the middle of its request (``time.monotonic``). Failures are counted
    and the last one kept; a run where most scrapes fail is not drawn."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.interval = interval
        self.history: list[promql.Scrape] = []
        self.failures = 0
        self.last_error: str | None = None
        self._halt = threading.Event()

    def scrape_once(self) -> None:
        before = time.monotonic()
        try:
            text = fetch(self.url)
        except OSError as exc:
            self.failures += 1
            self.last_error = str(exc)
            return
        self.history.append(promql.parse_scrape(text, (before + time.monotonic()) / 2))

    def run(self) -> None:
        due = time.monotonic()
        while not self._halt.is_set():
            self.scrape_once()
            due += self.interval
            self._halt.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(SCRAPE_TIMEOUT_S + 5)


# -------------------------------------------------------------------- load
class Load(threading.Thread):
    """``loadgen.run(plan)`` in a thread, so the scraper runs beside it; keeps
    its result (``loadgen.run``'s dict) or the exception that stopped it."""

    def __init__(self, plan: loadgen.Plan) -> None:
        super().__init__(name="load", daemon=True)
        self.plan = plan
        self.result: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = loadgen.run(self.plan)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            self.error = exc


# --------------------------------------------------------------- rendering
# Grafana's named colours, as its default theme draws them.
COLORS = {
    "green": "#56A64B",
    "red": "#E02F44",
    "orange": "#FF9830",
    "yellow": "#F2CC0C",
    "blue": "#3274D9",
    "purple": "#A352CC",
    "text": "#333333",
    "transparent": "none",
}
# Figure geometry: Grafana's grid is 24 columns; a grid row is 30 px on a
# 1920 px-wide screen, so a row is 30/80 of a column.
FIG_WIDTH_IN = 16.0
ROW_IN = FIG_WIDTH_IN / 24 * 30 / 80
HEADER_IN = 0.55
GUTTER_IN = 0.05
DPI = 100  # 1600 px wide: every label readable, the committed PNG still about 100 KiB


def color(name: str) -> str:
    return COLORS.get(name, name)


def format_value(unit: str, v: float) -> str:
    """A value as Grafana's unit would show it (the units the dashboard uses)."""
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if unit == "none":
        return f"{v:.3g}"
    if unit == "short":
        for step, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
            if abs(v) >= step:
                return f"{v / step:.3g}{suffix}"
        return f"{v:.3g}"
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "s":
        if v == 0:
            return "0"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
    if unit == "bytes":
        for step, suffix in ((2**30, " GiB"), (2**20, " MiB"), (2**10, " KiB")):
            if abs(v) >= step:
                return f"{v / step:.3g}{suffix}"
        return f"{v:.0f} B"
    raise DashboardError(f"unit {unit!r} is not one the preview draws (short, none, percentunit, s, bytes)")


def value_mappings(panel: dict) -> dict[float, tuple[str, str | None]]:
    """value -> (text, colour) from the panel's value mappings."""
    out = {}
    for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if mapping.get("type") != "value":
            raise DashboardError(f"panel {panel.get('title')!r}: only value mappings are drawn")
        for value, shown in mapping["options"].items():
            out[float(value)] = (shown.get("text", value), shown.get("color"))
    return out


def threshold_color(panel: dict, v: float) -> str:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    chosen = "green"
    for step in steps:
        if step.get("value") is None or (not math.isnan(v) and v >= step["value"]):
            chosen = step["color"]
    return color(chosen)


def render(data: list[PanelData], dashboard: dict, times: Sequence[float], out: str, caption: str) -> None:
    """Draw every panel in the dashboard's grid layout and write the PNG."""
    from .plots import _pyplot

    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    grid_rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels(dashboard))
    height = HEADER_IN + grid_rows * ROW_IN
    fig = plt.figure(figsize=(FIG_WIDTH_IN, height), dpi=DPI)

    def box(x: float, top: float, w: float, h: float) -> list[float]:
        """Inches from the figure's top left -> figure fractions [left, bottom, width, height]."""
        return [x / FIG_WIDTH_IN, 1 - (top + h) / height, w / FIG_WIDTH_IN, h / height]

    def text(x: float, top: float, s: str, **kw: Any) -> None:
        fig.text(x / FIG_WIDTH_IN, 1 - top / height, s, va="center", **kw)

    text(0.05, 0.2, dashboard.get("title", ""), fontsize=14, weight="bold")
    text(0.05, 0.43, caption, fontsize=8.5, color="#555555")
    col_in = FIG_WIDTH_IN / 24
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            top = HEADER_IN + panel["gridPos"]["y"] * ROW_IN
            text(0.05, top + ROW_IN * 0.5, panel.get("title", ""), fontsize=11, weight="bold")
            rule = 1 - (top + ROW_IN * 0.95) / height
            fig.add_artist(Line2D([0.003, 0.997], [rule, rule], transform=fig.transFigure, color="#BBBBBB", lw=0.8))
    seconds = [t - times[0] for t in times]
    for item in data:
        panel, g = item.panel, item.panel["gridPos"]
        x, top = g["x"] * col_in + GUTTER_IN, HEADER_IN + g["y"] * ROW_IN + GUTTER_IN
        w, h = g["w"] * col_in - 2 * GUTTER_IN, g["h"] * ROW_IN - 2 * GUTTER_IN
        fig.add_artist(
            Rectangle(
                (x / FIG_WIDTH_IN, 1 - (top + h) / height),
                w / FIG_WIDTH_IN,
                h / height,
                transform=fig.transFigure,
                facecolor="#FAFAFA",
                edgecolor="#CCCCCC",
                zorder=-1,  # under the panel's axes
            )
        )
        text(x + 0.08, top + 0.17, panel["title"], fontsize=9, weight="bold")
        kind = panel["type"]
        if kind == "stat":
            _draw_stat(fig, box(x + 0.1, top + 0.35, w - 0.2, h - 0.45), item)
            continue
        if kind not in ("timeseries", "state-timeline"):
            raise DashboardError(f"panel {panel['title']!r}: panel type {kind!r} is not one the preview draws")
        if kind == "timeseries":
            shown = [s.legend for s in item.series]
        else:
            shown = [t for t, _ in dict.fromkeys(value_mappings(panel).values())]
        show_legend = panel.get("options", {}).get("legend", {}).get("showLegend", True)
        legend_rows = _legend_rows(shown, w) if show_legend else 0
        left = 1.1 if kind == "state-timeline" else 0.62
        bottom = 0.3 + 0.17 * legend_rows
        ax_w, ax_h = w - left - 0.12, h - 0.32 - bottom
        ax = fig.add_axes(box(x + left, top + 0.32, ax_w, ax_h))
        ax.set_facecolor("none")
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if not any(not math.isnan(v) for s in item.series for v in s.values):
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="#888888")
        if kind == "timeseries":
            handles = _draw_timeseries(ax, item, seconds)
        else:
            handles = _draw_state_timeline(ax, item, seconds)
        ax.set_xlim(0, max(seconds[-1], 1))
        if handles and legend_rows:
            ax.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(-(left - 0.1) / ax_w, -0.22 / ax_h),
                ncol=math.ceil(len(handles) / legend_rows),
                fontsize=7,
                frameon=False,
                handlelength=1.2,
                columnspacing=1.0,
            )
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def _legend_rows(labels: list[str], width_in: float) -> int:
    """Rows a legend below the plot takes, Grafana's list style."""
    if not labels:
        return 0
    per_entry_in = 0.4 + 0.055 * max(len(label) for label in labels)  # 7 pt text plus the line sample
    per_row = max(1, int((width_in - 0.2) / per_entry_in))
    return math.ceil(len(labels) / per_row)


def _draw_timeseries(ax: Any, item: PanelData, seconds: list[float]) -> list:
    from matplotlib.ticker import FuncFormatter

    panel = item.panel
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    unit = defaults.get("unit", "short")
    format_value(unit, 0.0)  # an unknown unit fails even on a panel without data
    if value_mappings(panel):
        raise DashboardError(f"panel {panel['title']!r}: value mappings on a time series are not drawn")
    step = custom.get("lineInterpolation", "linear") == "stepAfter"
    stacked = custom.get("stacking", {}).get("mode", "none") == "normal"
    alpha = custom.get("fillOpacity", 0) / 100
    below = [0.0] * len(seconds)
    handles = []
    for s in item.series:
        top = [b + (0.0 if math.isnan(v) and stacked else v) for b, v in zip(below, s.values, strict=True)]
        (line,) = ax.plot(seconds, top, label=s.legend, lw=1.2, drawstyle="steps-post" if step else "default")
        handles.append(line)
        if alpha:
            base = below if stacked else [0.0] * len(seconds)
            where = "post" if step else None
            ax.fill_between(seconds, base, top, color=line.get_color(), alpha=alpha, lw=0, step=where)
        if stacked:
            below = top
    if custom.get("thresholdsStyle", {}).get("mode") == "line":
        for threshold in defaults.get("thresholds", {}).get("steps", []):
            if threshold.get("value") is not None:
                ax.axhline(threshold["value"], color=color(threshold["color"]), ls="--", lw=1)
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_value(unit, v)))
    if custom.get("axisLabel"):
        ax.set_ylabel(custom["axisLabel"], fontsize=7)
    return handles


def _draw_state_timeline(ax: Any, item: PanelData, seconds: list[float]) -> list:
    """One band per series; each run of one value a bar in its mapping's colour."""
    from matplotlib.patches import Patch

    mappings = value_mappings(item.panel)
    step = seconds[-1] / max(1, len(seconds) - 1)
    span = seconds[-1] + step
    for row, s in enumerate(item.series):
        run_start = 0
        for i in range(1, len(s.values) + 1):
            if i < len(s.values) and _same(s.values[i], s.values[run_start]):
                continue
            v = s.values[run_start]
            if not math.isnan(v):
                shown, shade = mappings.get(v, (format_value("none", v), None))
                start, end = seconds[run_start], seconds[i] if i < len(seconds) else span
                ax.barh(row, end - start, left=start, height=0.8, color=color(shade or "blue"), alpha=0.85)
                if end - start > 0.12 * span:
                    ax.text((start + end) / 2, row, shown, ha="center", va="center", fontsize=7, color="white")
            run_start = i
    ax.set_yticks(range(len(item.series)), [s.legend for s in item.series], fontsize=7)
    ax.set_ylim(len(item.series) - 0.5, -0.5)
    ax.grid(False)
    return [Patch(color=color(shade or "blue"), label=shown) for shown, shade in dict.fromkeys(mappings.values())]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _draw_stat(fig: Any, frame: list[float], item: PanelData) -> None:
    """The last value of each series, in its mapping's or threshold's colour."""
    panel = item.panel
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    mappings = value_mappings(panel)
    series = item.series or [Series("", "No data", [math.nan])]
    left, bottom, width, height = frame
    for n, s in enumerate(series):
        last = next((v for v in reversed(s.values) if not math.isnan(v)), math.nan)
        shown, shade = mappings.get(last, (format_value(unit, last), None))
        face = color(shade) if shade else threshold_color(panel, last)
        if math.isnan(last):
            shown, face = "No data", "#DDDDDD"
        share = height / len(series)
        ax = fig.add_axes([left, bottom + height - (n + 1) * share, width, share * 0.95])
        ax.set_facecolor(face)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.text(0.5, 0.5, shown, ha="center", va="center", fontsize=20, weight="bold", color="white")


# -------------------------------------------------------------------- CLI
def metrics_url(text: str) -> str:
    """argparse type: an engine's /metrics URL (``http://HOST:PORT`` or the
    full ``…/metrics`` its ``metrics:`` line prints), fetched once now."""
    m = re.fullmatch(r"(https?://[^/\s]+)(/metrics)?/?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"must be http://HOST:PORT/metrics (the engine's 'metrics:' line), got {text!r}"
        )
    url = m.group(1) + "/metrics"
    try:
        body = fetch(url)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot fetch {url}: {exc}") from None
    if "batchscheduler_build_info" not in body:
        raise argparse.ArgumentTypeError(
            f"{url} is not a BatchScheduler engine's /metrics (no batchscheduler_build_info)"
        )
    return url


def dashboard_file(text: str) -> str:
    """argparse type: a dashboard whose every query the evaluator takes."""
    try:
        metric_names(load_dashboard(text))
    except DashboardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def socket_file(text: str) -> str:
    try:
        mode = os.stat(text).st_mode
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror} (is the engine running?)") from None
    if not stat.S_ISSOCK(mode):
        raise argparse.ArgumentTypeError(f"{text} is not a socket")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli_args.prog("dashboard_preview"),
        description="Draw the Grafana dashboard's panels from its own PromQL queries, evaluated over scrapes of "
        "a real engine's /metrics under load (not a Grafana screenshot). Starts an engine in a temp directory "
        "unless --url names a running one.",
        epilog="Exit status: 0 drawn; 1 a dashboard query the evaluator cannot evaluate; 2 bad arguments, or "
        "the engine could not be started, loaded or scraped.",
        formatter_class=cli_args.HelpFormatter,
    )
    # From a checkout, the checkout's dashboard and picture; installed, there is no docs/ to default to.
    in_checkout = DASHBOARD.is_file()
    p.add_argument(
        "--dashboard",
        type=dashboard_file,
        default=str(DASHBOARD) if in_checkout else None,
        required=not in_checkout,
        help="the Grafana dashboard JSON to draw",
    )
    p.add_argument(
        "--out",
        type=cli_args.output_file,
        default=str(PICTURE) if in_checkout else "dashboard.png",
        help="the PNG to write",
    )
    p.add_argument(
        "--url",
        type=metrics_url,
        help="a running engine's /metrics (its 'metrics:' line) instead of starting one; load goes to --socket",
    )
    p.add_argument(
        "--socket",
        type=socket_file,
        help="with --url: the engine's socket, to drive the load through (without it, only scrape)",
    )
    p.add_argument("--duration", type=cli_args.positive_float, default=60.0, help="seconds of load (and scrapes)")
    p.add_argument(
        "--rate",
        type=cli_args.positive_float,
        default=2000.0,
        help="intents/s the load sends (open loop, Poisson arrivals)",
    )
    p.add_argument(
        "--entities",
        type=cli_args.positive_int,
        default=2000,
        help=f"entities the load acts on ({UNSPAWNED_SHARE * 100:g}%% of them never spawned: its dead letters)",
    )
    p.add_argument(
        "--scrape-interval", type=cli_args.positive_float, default=1.0, help="seconds between scrapes of /metrics"
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        type=cli_args.output_file,
        help="also write every panel's series as JSON ('-': stdout)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    cli_args.require_matplotlib(p, "--out")  # after --help, before any work
    if args.socket and not args.url:
        p.error("argument --socket: only with --url (without --url the tool starts its own engine)")
    if args.scrape_interval * 2 > args.duration:
        p.error(f"argument --scrape-interval: {args.scrape_interval:g} s leaves fewer than two scrapes in --duration")
    return args


def summary(data: list[PanelData]) -> str:
    from .bench.report import table

    rows = []
    for item in data:
        unit = item.panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for s in item.series or [Series("", "(no data)", [math.nan])]:
            last = next((v for v in reversed(s.values) if not math.isnan(v)), math.nan)
            rows.append((item.panel["title"], s.legend, format_value(unit, last)))
    return table(("panel", "series", "last value"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    from engine.errors import ClientError, StartupError

    from .bench.report import write_json

    args = parse_args(argv)
    prog = cli_args.prog("dashboard_preview")
    dashboard = load_dashboard(args.dashboard)
    # SIGTERM unwinds like Ctrl-C, so a spawned engine is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engine = None
    try:
        if args.url:
            url, sock = args.url, args.socket
        else:
            engine = loadgen.SpawnedEngine([])
            url, sock = engine.metrics_url, engine.socket
            if url is None:
                raise CouldNotRun("the engine printed no 'metrics:' line")
        load = None
        if sock:
            loadgen.spawn_entities(sock, args.entities - round(args.entities * UNSPAWNED_SHARE))
            plan = loadgen.Plan(
                socket=sock,
                connections=LOAD_CONNECTIONS,
                rate=args.rate,
                duration=args.duration,
                entities=args.entities,
            )
            load = Load(plan)
        scraper = Scraper(url, args.scrape_interval)
        print(
            f"load: Poisson {args.rate:g} intents/s" if load else "no load (no --socket)",
            f"for {args.duration:g} s; scraping {url} every {args.scrape_interval:g} s",
            file=sys.stderr,
        )
        scraper.start()
        try:
            if load:
                load.start()
                load.join()  # the load's duration, its clients' start and the last replies
            else:
                time.sleep(args.duration)
        finally:
            scraper.stop()
            scraper.scrape_once()  # after the load's last replies, and after the thread's last scrape
        if load and load.error is not None:
            raise CouldNotRun(f"the load failed: {load.error}")
        history = scraper.history
        if len(history) < 2 or scraper.failures > len(history):
            raise CouldNotRun(f"{len(history)} scrapes, {scraper.failures} failed (last: {scraper.last_error})")
    except (StartupError, ClientError, loadgen.ClientFailed, CouldNotRun, RuntimeError, OSError) as exc:
        print(f"{prog}: could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing drawn", file=sys.stderr)
        return 130
    finally:
        if engine is not None:
            code = engine.stop()
            if code != 0:
                print(f"{prog}: warning: the engine exited {code}", file=sys.stderr)
    missing = sorted(metric_names(dashboard) - {name for s in history for name in s.series})
    if missing:
        print(f"{prog}: warning: not in /metrics, drawn as no data: {', '.join(missing)}", file=sys.stderr)
    try:
        data = evaluate_dashboard(dashboard, history)
        replies = load.result if load else None
        load_line = (
            f"load_gen's MUD mix, Poisson {args.rate:g}/s, {replies['sent']:,} intents in {args.duration:g} s"
            if replies
            else f"{args.duration:g} s of someone else's load"
        )
        caption = (
            f"Drawn by tools/dashboard_preview from the dashboard's own queries over a real engine's /metrics "
            f"({load_line}; {os.cpu_count()} CPUs; scraped every {args.scrape_interval:g} s; x: seconds; lane = All). "
            f"Not a Grafana screenshot."
        )
        render(data, dashboard, [s.t for s in history], args.out, caption)
    except DashboardError as exc:
        print(f"{prog}: {args.dashboard}: {exc}", file=sys.stderr)
        return 1
    print(summary(data))
    if replies:
        print(
            ", ".join(f"{k} {replies[k]:,}" for k in ("sent", "committed", "dead_lettered", "rejected", "busy", "lost"))
        )
        if replies["lost"]:
            print(f"{prog}: warning: {replies['lost']} intents got no reply", file=sys.stderr)
    print(f"wrote {args.out} ({len(history)} scrapes)")
    if args.json:
        t0 = history[0].t
        write_json(
            args.json,
            {
                "tool": "dashboard_preview",
                "dashboard": str(args.dashboard),
                "duration_s": args.duration,
                "rate": args.rate if load else None,
                "load": {k: v for k, v in replies.items() if k != "latencies_ms_sample"} if replies else None,
                "times_s": [round(s.t - t0, 3) for s in history],
                "panels": [
                    {
                        "title": item.panel["title"],
                        "series": [
                            {
                                "ref": s.ref,
                                "legend": s.legend,
                                "values": [None if math.isnan(v) else v for v in s.values],
                            }
                            for s in item.series
                        ],
                    }
                    for item in data
                ],
            },
        )
    return 0
