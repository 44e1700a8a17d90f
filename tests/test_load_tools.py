"""The load tools run end to end on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, start_engine


def run_tool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout
    )


def test_load_gen_against_a_running_engine_loses_nothing(engine, short_tmp):
    out = short_tmp / "load.json"
    proc = run_tool(
        "load_gen",
        "--socket",
        str(engine.socket),
        "--dsn",
        engine.dsn,
        "--connections",
        "2",
        "--count",
        "400",
        "--entities",
        "20",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "intents/s" in proc.stdout and "p99" in proc.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert (result["sent"], result["committed"], result["lost"]) == (400, 400, 0)
    assert result["batches"]["batches"] >= 1
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}


def test_load_gen_open_loop_poisson(engine):
    proc = run_tool(
        "load_gen",
        "--socket",
        str(engine.socket),
        "--connections",
        "2",
        "--rate",
        "300",
        "--duration",
        "1",
        "--entities",
        "5",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Poisson" in proc.stdout


def test_load_gen_refuses_bad_arguments():
    proc = run_tool("load_gen", "--socket", "/nonexistent", "--connections", "0")
    assert proc.returncode == 2 and "--connections" in proc.stderr and "must be at least 1" in proc.stderr


@pytest.fixture
def two_engines(dsn):
    """The engine under load (on the session's database: no PostgreSQL in
    its tree) and an unrelated one beside it (embedded PostgreSQL, two
    ingests), each in its own directory; both stopped and checked after."""
    dirs = [Path(tempfile.mkdtemp(prefix="bs-")) for _ in range(2)]
    started = []
    try:
        started.append(start_engine(dirs[0], dsn, name="target"))
        started.append(start_engine(dirs[1], None, "--ingests", "2", name="other"))
        yield started
    finally:
        codes = [eng.stop() for eng in started]
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert codes == [0] * len(started), [eng.log()[-2000:] for eng in started]


def engine_tree(eng) -> set[int]:
    root = psutil.Process(eng.proc.pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


def test_load_gen_samples_only_the_engine_it_loads(two_engines, short_tmp):
    target, other = two_engines
    other.worker("ingest 1")  # the unrelated engine is whole: its second ingest runs
    out = short_tmp / "load.json"
    proc = run_tool(
        "load_gen",
        "--socket",
        str(target.socket),
        "--connections",
        "1",
        "--count",
        "200",
        "--entities",
        "10",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["engine_pid"] == target.proc.pid
    roles = {"supervisor", *target.roles()}  # ingest 0, one flusher per lane
    assert set(result["resources"]) == roles, result["resources"]
    assert all(v["processes"] == 1 for v in result["resources"].values()), result["resources"]
    sampled = {pid for s in result["samples"] for v in s["procs"].values() for pid in v["pids"]}
    assert sampled and sampled <= engine_tree(target)
    assert not sampled & engine_tree(other)
    assert f"peaks (engine pid {target.proc.pid})" in proc.stdout and "ingest 1" not in proc.stdout

    # --pid names the supervisor outright; the other engine's tree (its
    # embedded PostgreSQL and both ingests) is sampled, and only it.
    proc = run_tool(
        "load_gen",
        "--socket",
        str(other.socket),
        "--pid",
        str(other.proc.pid),
        "--connections",
        "1",
        "--count",
        "50",
        "--entities",
        "5",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert set(result["resources"]) == {"supervisor", "postgres (all)", *other.roles(), "ingest 1"}
    assert result["resources"]["supervisor"]["processes"] == 1
    sampled = {pid for s in result["samples"] for v in s["procs"].values() for pid in v["pids"]}
    assert not sampled & engine_tree(target)
    # Backends come and go; whatever sampled process still runs is the other engine's.
    assert {pid for pid in sampled if psutil.pid_exists(pid)} <= engine_tree(other)


def test_rss_plot_has_one_line_per_role_with_gaps_for_restarts():
    from tools import plots

    def sample(t, **roles):
        return {
            "t": t,
            "procs": {r.replace("_", " "): {"cpu": 0.0, "rss_mb": mb, "pids": [1]} for r, mb in roles.items()},
        }

    results = [
        {
            "variant": "v",
            "samples": [
                sample(0.0, supervisor=40, ingest_0=30, flusher_0=50, flusher_1=51),
                sample(0.5, supervisor=41, ingest_0=31, flusher_1=52),  # flusher 0 restarting
                sample(1.0, supervisor=42, ingest_0=32, flusher_0=49, flusher_1=53),
            ],
        }
    ]
    lines = plots.rss_lines(results)
    assert [role for _, role in lines] == ["supervisor", "ingest 0", "flusher 0", "flusher 1"]
    assert lines[("v", "flusher 0")] == ([0.0, 0.5, 1.0], [50, None, 49])  # a gap, not a drop to 0
    assert lines[("v", "flusher 1")] == ([0.0, 0.5, 1.0], [51, 52, 53])


def test_bench_sweep_tiny(short_tmp):
    out = short_tmp / "sweep.json"
    proc = run_tool(
        "bench_sweep",
        "--sizes",
        "1,8",
        "--duration",
        "0.5",
        "--connections",
        "1",
        "--in-flight",
        "16",
        "--entities",
        "10",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert [p["size"] for p in doc["points"]] == [1, 8]
    assert all(p["lost"] == 0 for p in doc["points"])
    assert "c_batch_us" in doc["fit"] and "optimum on this machine" in proc.stdout
