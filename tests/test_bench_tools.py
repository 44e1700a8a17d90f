"""The benchmark tools run end to end, print their table and write JSON.

Each tool runs as a real subprocess with tiny sizes. Nothing here asserts a
speed: figures on a shared 2-core box are the tools' output, not a contract.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

from conftest import ROOT, query

BENCH_DB = ROOT / "tools" / "bench_db"
BENCH_IPC = ROOT / "tools" / "bench_ipc"

DB_RESULT_KEYS = {
    "key",
    "operation",
    "rows",
    "transactions",
    "seconds",
    "ops_per_s",
    "us_per_op",
    "seed_ops_per_s",
    "ratio_to_baseline",
}
IPC_RESULT_KEYS = {
    "key",
    "variant",
    "skipped",
    "intents_per_s",
    "us_per_intent",
    "min_intents_per_s",
    "max_intents_per_s",
    "runs",
    "ratio_to_baseline",
}
MACHINE_KEYS = {"cpu", "cores", "ram_gib", "python", "postgresql"}


def run_tool(tool, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_tools_are_executable_and_document_their_options():
    for tool, flags in (
        (BENCH_DB, ("--dsn", "--rows", "--batches", "--batch-size", "--json")),
        (BENCH_IPC, ("--records", "--repeat", "--chunk", "--max-batch", "--consume", "--ingest-breakdown", "--json")),
    ):
        assert os.access(tool, os.X_OK), f"{tool} is not executable"
        text = ok(run_tool(tool, "--help"))
        for flag in flags:
            assert flag in text, f"{tool.name} --help does not mention {flag}"


def test_bench_db_prints_the_seed_table_and_writes_json(dsn, short_tmp):
    out = short_tmp / "db.json"
    stdout = ok(
        run_tool(
            BENCH_DB,
            "--dsn",
            dsn,
            "--rows",
            "200",
            "--batches",
            "2",
            "--batch-size",
            "50",
            "--entities",
            "200",
            "--json",
            str(out),
        )
    )
    assert stdout.startswith("machine: ")
    assert "fsync=on" in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("operation"))
    for column in ("ops/s", "µs/op", "seed ops/s", "ratio"):
        assert column in header
    assert "103,169" in stdout  # the seed's INSERT figure sits beside ours

    doc = json.loads(out.read_text())
    assert {"tool", "machine", "server", "params", "baseline", "results"} <= doc.keys()
    assert doc["machine"].keys() >= MACHINE_KEYS
    assert doc["server"]["fsync"] == "on" and doc["server"]["synchronous_commit"] == "on"
    keys = [r["key"] for r in doc["results"]]
    assert keys[:4] == ["insert_per_tx", "update_per_tx", "update_batched", "complex_update_per_tx"]
    assert {"insert_unnest", "copy_write_row", "update_unnest", "update_executemany", "insert_jsonb"} <= set(keys)
    for r in doc["results"]:
        assert r.keys() >= DB_RESULT_KEYS
        assert r["rows"] == (200 if r["key"] in keys[:4] else 100)
    assert doc["results"][0]["ratio_to_baseline"] == 1.0
    # The scratch schema is gone and the engine's schema was never made.
    assert (
        query(dsn, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%' OR nspname = 'batchscheduler'") == []
    )


def test_bench_db_embedded_server_is_stopped_and_removed(short_tmp):
    pattern = os.path.join(tempfile.gettempdir(), "bs-bench-db-*")
    before = set(glob.glob(pattern))
    out = short_tmp / "db.json"
    stdout = ok(
        run_tool(
            BENCH_DB,
            "--rows",
            "50",
            "--batches",
            "1",
            "--batch-size",
            "20",
            "--only",
            "insert_per_tx,insert_jsonb",
            "--json",
            str(out),
        )
    )
    assert "(embedded, temp dir)" in stdout
    doc = json.loads(out.read_text())
    assert doc["server"]["embedded"] is True
    assert [r["key"] for r in doc["results"]] == ["insert_per_tx", "insert_jsonb"]
    assert set(glob.glob(pattern)) <= before, "embedded PostgreSQL data dir left behind"


def test_bench_db_rejects_nonsense_sizes():
    proc = run_tool(BENCH_DB, "--rows", "0")
    assert proc.returncode == 2 and "--rows" in proc.stderr


def test_bench_ipc_prints_the_handoff_table_and_writes_json(short_tmp):
    out = short_tmp / "ipc.json"
    stdout = ok(
        run_tool(
            BENCH_IPC, "--records", "5000", "--repeat", "1", "--ring-bytes", "4096", "--chunk", "64", "--json", str(out)
        )
    )
    assert stdout.startswith("machine: ")
    header = next(line for line in stdout.splitlines() if line.startswith("variant"))
    for column in ("intents/s", "µs/intent", "vs mp.Queue list/put", "per round"):
        assert column in header

    doc = json.loads(out.read_text())
    assert {"tool", "machine", "params", "baseline", "results"} <= doc.keys()
    assert doc["machine"].keys() >= MACHINE_KEYS
    assert doc["params"]["n"] == 5000 and doc["params"]["chunk"] == 64 and doc["params"]["consume"] == "join"
    by_key = {r["key"]: r for r in doc["results"]}
    assert {"ring", "ring_per_record", "mp_queue", "mp_queue_batched", "faster_fifo"} <= by_key.keys()
    for key in ("ring", "ring_per_record", "mp_queue", "mp_queue_batched"):
        r = by_key[key]
        assert r.keys() >= IPC_RESULT_KEYS
        assert r["skipped"] is None and len(r["runs"]) == 1 and len(r["round_ratios"]) == 1
    assert doc["baseline"] == "mp_queue_batched"
    assert by_key["mp_queue_batched"]["ratio_to_baseline"] == 1.0
    # A 4 KiB ring holds ~45 records, fewer than one 64-record chunk, and
    # records are invisible until published: each writer must block on a
    # full ring at least once (backpressure, whatever the timing).
    for key in ("ring", "ring_per_record"):
        assert by_key[key]["runs"][0]["writer_full_waits"] > 0
    ff = by_key["faster_fifo"]
    if ff["skipped"]:
        assert "faster-fifo" in ff["skipped"] and "faster_fifo: skipped" in stdout
    else:
        assert len(ff["runs"]) == 1


def test_bench_ipc_ingest_breakdown_prints_the_stages_and_writes_json(short_tmp):
    out = short_tmp / "ingest.json"
    stdout = ok(run_tool(BENCH_IPC, "--ingest-breakdown", "--records", "640", "--repeat", "1", "--json", str(out)))
    assert stdout.startswith("machine: ")
    for stage in ("framing", "decode", "encode", "validate", "route + append", "reply", "before #9"):
        assert stage in stdout

    doc = json.loads(out.read_text())
    assert doc["tool"] == "bench_ipc --ingest-breakdown" and doc["machine"].keys() >= MACHINE_KEYS
    assert doc["params"]["n"] == 640 and doc["params"]["chunk"] == 64
    assert doc["results"].keys() == {"msgpack", "json"}
    for result in doc["results"].values():
        stages = result["stages"]
        assert stages.keys() == {"framing", "decode", "encode", "validate", "route+append", "reply", "sum"}
        assert all(v >= 0 for v in stages.values()) and stages["sum"] > 0
        assert result["end_to_end_before"] > 0 and result["end_to_end_now"] > 0
        assert len(result["rounds"]) == 1 and len(result["round_ratios"]) == 1


def test_bench_ipc_rejects_a_ring_that_is_not_a_power_of_two():
    proc = run_tool(BENCH_IPC, "--ring-bytes", "100000")
    assert proc.returncode == 2 and "power of two" in proc.stderr
