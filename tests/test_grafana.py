"""The Grafana dashboard (docs/grafana/batchscheduler.json) and the preview
that draws it: the JSON is an importable dashboard, every metric it queries
is in a real engine's /metrics, and every query evaluates (tools/promql.py)
over real scrapes, with the committed rate exactly the counter's rise over
the time between the scrapes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families

from engine.client import Client
from engine.intent import COMMITTED, DEAD_LETTERED, REJECTED
from tools import dashpreview, promql

DASHBOARD = ROOT / "docs" / "grafana" / "batchscheduler.json"
DS = "${DS_PROMETHEUS}"
ROWS = ["Throughput", "Latency", "Batching", "Health and resources"]
COMMITTED_PANEL = "Committed intents/s"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def metrics_url(engine) -> str:
    return next(line.split()[1] for line in engine.stdout_lines if line.startswith("metrics: "))


def scrape(engine) -> promql.Scrape:
    before = time.monotonic()
    with urllib.request.urlopen(metrics_url(engine), timeout=10) as r:
        text = r.read().decode()
    return promql.parse_scrape(text, (before + time.monotonic()) / 2)


def drive(engine, *, moves: int, ghosts: int, invalid: int) -> dict[str, int]:
    """Known traffic: ``moves`` committed, ``ghosts`` dead-lettered
    (no_such_entity), ``invalid`` rejected; returns the replies by status."""
    with Client(engine.socket, client_id=f"g{time.monotonic_ns()}", timeout=60) as client:
        replies = client.submit_many(
            [client.intent(f"m{i % 20}", "move", {"dx": 1, "dy": 0}) for i in range(moves)]
            + [client.intent(f"ghost{i}", "move", {"dx": 1, "dy": 0}) for i in range(ghosts)]
            + [client.intent("m0", "move", {"dx": "east", "dy": 0}) for _ in range(invalid)]
        )
    counts: dict[str, int] = {}
    for r in replies:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def spawn(engine, n: int = 20) -> None:
    with Client(engine.socket, client_id="spawner", first_seq=1, timeout=60) as client:
        assert all(
            r.status == COMMITTED for r in client.submit_many([client.intent(f"m{i}", "spawn", {}) for i in range(n)])
        )


# ------------------------------------------------------------ the JSON
def cells(panel: dict) -> set[tuple[int, int]]:
    g = panel["gridPos"]
    return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}


def test_the_dashboard_is_an_importable_grafana_dashboard(dashboard):
    assert dashboard["title"] == "BatchScheduler" and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    (source,) = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    (lane,) = dashboard["templating"]["list"]
    assert lane["name"] == "lane" and lane["datasource"]["uid"] == DS
    assert lane["query"]["query"] == "label_values(batchscheduler_batches_total, lane)"
    every = dashpreview.panels(dashboard)
    assert [p["title"] for p in every if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    taken: dict[tuple[int, int], str] = {}
    for panel in every:
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh") and g["x"] >= 0 and g["w"] > 0 and g["h"] > 0
        assert g["x"] + g["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for cell in cells(panel):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r} at {cell}"
            taken[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "state-timeline") and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']!r}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS and target["expr"].strip(), (panel["title"], target)


# ---------------------------------------------------- against a real engine
def test_every_metric_the_dashboard_queries_is_in_a_real_engines_metrics(engine_factory, dashboard):
    engine = engine_factory("--lanes", "2")
    spawn(engine)
    assert drive(engine, moves=200, ghosts=3, invalid=2) == {COMMITTED: 200, DEAD_LETTERED: 3, REJECTED: 2}
    with urllib.request.urlopen(metrics_url(engine), timeout=10) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    # Sample names, not family names: the parser names a counter's family
    # without _total and a histogram's without _bucket/_sum/_count.
    exposed = {sample.name for family in families for sample in family.samples}
    wanted = dashpreview.metric_names(dashboard)
    assert "batchscheduler_commit_latency_seconds_bucket" in wanted  # the names are the queries' own
    missing = sorted(wanted - exposed)
    assert not missing, f"the dashboard queries metrics the engine does not export: {missing}"
    # A query of a metric with a lane label follows the dashboard's lane variable.
    per_lane = {s.name for f in families for s in f.samples if "lane" in s.labels}
    for panel in dashpreview.graph_panels(dashboard):
        for target in panel["targets"]:
            if promql.metric_names(promql.parse(target["expr"].replace("$lane", "0"))) & per_lane:
                assert 'lane=~"$lane"' in target["expr"], (panel["title"], target["expr"])


def test_every_query_evaluates_over_two_scrapes_and_the_committed_rate_is_the_counters_rise(engine_factory, dashboard):
    engine = engine_factory("--lanes", "2")
    spawn(engine)
    first = scrape(engine)
    sent = drive(engine, moves=500, ghosts=4, invalid=3)
    second = scrape(engine)
    assert sent == {COMMITTED: 500, DEAD_LETTERED: 4, REJECTED: 3}
    interval = second.t - first.t
    assert 0 < interval < 60  # both scrapes inside the dashboard's [1m] ranges

    data = {item.panel["title"]: item for item in dashpreview.evaluate_dashboard(dashboard, [first, second])}
    assert set(data) == {p["title"] for p in dashpreview.graph_panels(dashboard)}
    (committed,) = data[COMMITTED_PANEL].series
    assert math.isnan(committed.values[0])  # one scrape is no rate
    assert committed.values[1] == pytest.approx(500 / interval, rel=1e-9)
    by_status = {s.legend: s.values[1] for s in data["Intents by status"].series}
    assert by_status["dead_lettered"] == pytest.approx(4 / interval, rel=1e-9)
    assert by_status["rejected"] == pytest.approx(3 / interval, rel=1e-9)
    (error_rate,) = data["Error rate"].series
    assert error_rate.values[1] == pytest.approx(4 / 504, rel=1e-9)
    # Every panel whose metrics the engine exports has a value at the second scrape.
    exposed = set(first.series) | set(second.series)
    for item in data.values():
        queried = set().union(
            *(promql.metric_names(promql.parse(t["expr"].replace("$lane", "0"))) for t in item.panel["targets"])
        )
        if queried <= exposed:
            assert item.series, f"{item.panel['title']!r} evaluated to no series"


# ------------------------------------------------------------ the evaluator
def history(*points: tuple[float, dict[str, dict[tuple, float]]]) -> list[promql.Scrape]:
    return [promql.Scrape(t, {name: dict(series) for name, series in s.items()}) for t, s in points]


def test_rate_sees_through_a_counter_reset_and_quantiles_interpolate_like_prometheus():
    lane0, lane1 = (("lane", "0"),), (("lane", "1"),)
    h = history(
        (0.0, {"c_total": {lane0: 10.0, lane1: 0.0}}),
        (2.0, {"c_total": {lane0: 30.0, lane1: 4.0}}),
        (4.0, {"c_total": {lane0: 6.0, lane1: 8.0}}),  # lane 0 restarted from 0 and counted 6
    )
    assert promql.evaluate("rate(c_total[1m])", h) == {lane0: pytest.approx((20 + 6) / 4), lane1: pytest.approx(2.0)}
    assert promql.evaluate("increase(c_total[3s])", h) == {lane0: 6.0, lane1: 4.0}  # only the samples in (1, 4]
    assert promql.evaluate("sum(rate(c_total[1m])) / scalar(sum(rate(c_total[1m])))", h) == {(): 1.0}
    buckets = {
        (("le", "0.01"),): [0.0, 50.0, 50.0],
        (("le", "0.1"),): [0.0, 90.0, 90.0],
        (("le", "+Inf"),): [0.0, 100.0, 100.0],
    }
    hh = history(*[(t, {"h_bucket": {k: v[i] for k, v in buckets.items()}}) for i, t in enumerate((0.0, 10.0, 20.0))])
    quantile = "histogram_quantile({q}, sum by (le) (rate(h_bucket[15s])))"
    assert promql.evaluate(quantile.format(q=0.5), hh, at=1) == {(): pytest.approx(0.01)}
    assert promql.evaluate(quantile.format(q=0.7), hh, at=1) == {(): pytest.approx(0.01 + 0.09 * 0.5)}
    assert promql.evaluate(quantile.format(q=0.99), hh, at=1) == {(): pytest.approx(0.1)}  # in +Inf: the largest bound
    assert promql.evaluate(quantile.format(q=0.5), hh, at=0) == {}  # one scrape: no rate, no quantile
    assert math.isnan(promql.evaluate(quantile.format(q=0.5), hh)[()])  # nothing observed in (5, 20]: NaN


@pytest.mark.parametrize(
    "query",
    [
        "topk(3, x)",
        "x offset 5m",
        "sum without (a) (x)",
        "x > 1",
        "x / on(a) y",
        'x{a!="1"}',
        "rate(x)",
        "x[1m]",
        "-x",
        "irate(x[1m])",
    ],
)
def test_a_query_outside_the_subset_fails_loudly(query):
    with pytest.raises(promql.UnsupportedQuery, match=r"unsupported|range|must be|not supported"):
        promql.parse(query)


def test_a_dashboard_query_the_evaluator_cannot_take_names_its_panel(dashboard):
    broken = json.loads(json.dumps(dashboard))
    panel = dashpreview.graph_panels(broken)[3]
    panel["targets"][0]["expr"] = "quantile_over_time(0.9, batchscheduler_database_up[5m])"
    with pytest.raises(dashpreview.DashboardError, match=re.escape(f"panel {panel['title']!r} target A")):
        dashpreview.metric_names(broken)


def test_template_variables_expand_as_grafana_expands_them():
    assert dashpreview.expand('x{lane=~"$lane"}', {"lane": ["0", "1"]}) == 'x{lane=~"(0|1)"}'
    assert dashpreview.expand('x{lane=~"${lane}"}', {"lane": ["3"]}) == 'x{lane=~"3"}'
    with pytest.raises(dashpreview.DashboardError, match="__rate_interval"):
        dashpreview.expand("rate(x[$__rate_interval])", {"lane": ["0"]})


# ---------------------------------------------------------------- the tool
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--duration", "0"], "--duration"),
        (["--duration", "nan"], "--duration"),
        (["--rate", "-1"], "--rate"),
        (["--scrape-interval", "0"], "--scrape-interval"),
        (["--duration", "1", "--scrape-interval", "1"], "--scrape-interval"),
        (["--entities", "0"], "--entities"),
        (["--url", "ftp://example/metrics"], "--url"),
        (["--url", "http://127.0.0.1:1/metrics"], "cannot fetch"),
        (["--socket", "/nonexistent/e.sock"], "--socket"),
        (["--dashboard", "/nonexistent/d.json"], "--dashboard"),
        (["--out", "/nonexistent/dir/d.png"], "--out"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(args, names, capsys):
    with pytest.raises(SystemExit) as exit_:
        dashpreview.parse_args(args)
    assert exit_.value.code == 2
    assert names in capsys.readouterr().err


def test_help_documents_every_option_once():
    parser = dashpreview.build_parser()
    assert parser.prog == "tools/dashboard_preview"
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert formatter._expand_help(action).count("(default") <= 1, action.option_strings


def test_without_matplotlib_the_preview_is_refused_before_any_work(short_tmp):
    shadow = short_tmp / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib (test)')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    env["PYTHONPATH"] = str(shadow.parent)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "dashboard_preview"),
            "--duration",
            "1",
            "--out",
            str(short_tmp / "d.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--out" in proc.stderr and "pip install -c requirements/lock.txt '.[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "load:" not in proc.stderr  # refused before the engine started


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the plot extra (matplotlib)")
def test_the_preview_draws_every_panel_from_a_running_engine(engine_factory, short_tmp, dashboard):
    engine = engine_factory("--lanes", "2")
    out, report = short_tmp / "d.png", short_tmp / "d.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "dashboard_preview"), "--url", metrics_url(engine)]
        + ["--socket", str(engine.socket), "--duration", "4", "--rate", "400", "--entities", "50"]
        + ["--out", str(out), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(report.read_text())
    assert [p["title"] for p in result["panels"]] == [p["title"] for p in dashpreview.graph_panels(dashboard)]
    (committed,) = next(p for p in result["panels"] if p["title"] == COMMITTED_PANEL)["series"]
    assert max(v for v in committed["values"] if v is not None) > 0
    assert result["load"]["committed"] > 0 and result["load"]["lost"] == 0
