"""The load tools run end to end on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


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
    assert proc.returncode == 2 and "must be positive" in proc.stderr


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
