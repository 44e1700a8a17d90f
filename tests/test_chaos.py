"""tools/chaos: faults under load, then the ledgers against the database.

Each run starts its own engine (embedded PostgreSQL in the test's temp dir),
so these tests need no fixture but the temp dir; the harness itself checks
that the engine left no process, socket or /dev/shm entry, and ``no_leaks``
checks it again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAOS = ROOT / "tools" / "chaos"
RUN_TIMEOUT_S = 150


def run_chaos(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run tools/chaos on a data dir under ``tmp``; returns the process and its JSON report."""
    report = tmp / "report.json"
    cmd = [sys.executable, str(CHAOS), "--data-dir", str(tmp / "d"), "--json", str(report), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM: the harness stops its engine before it exits.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"tools/chaos ran over {RUN_TIMEOUT_S}s:\n{out}\n{err[-4000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return result, json.loads(report.read_text()) if report.exists() else None


def explain(result: subprocess.CompletedProcess, report: dict | None) -> str:
    faults = "\n".join(json.dumps(f) for f in (report or {}).get("faults", []))
    return f"exit {result.returncode}\n{result.stdout}\n{faults}\nstderr tail:\n{result.stderr[-4000:]}"


def assert_clean(result: subprocess.CompletedProcess, report: dict | None) -> None:
    assert report is not None, explain(result, report)
    assert result.returncode == 0, explain(result, report)
    assert report["ok"] is True, explain(result, report)
    assert report["lost"] == 0, explain(result, report)
    assert report["duplicated"] == 0, explain(result, report)
    assert report["mismatched"] == 0, explain(result, report)
    assert report["unanswered"] == 0, explain(result, report)
    assert report["committed"] > 0, explain(result, report)
    assert report["failures"] == [], explain(result, report)
    failed = {name: c["detail"] for name, c in report["checks"].items() if not c["ok"]}
    assert not failed, explain(result, report)


@pytest.mark.slow
def test_worker_faults_lose_nothing(short_tmp):
    """Flusher and ingest kills and SIGSTOPs under load: every reply matches
    the database, entities equal the sum of their committed moves."""
    result, report = run_chaos(
        short_tmp,
        "--clients",
        "3",
        "--kills",
        "6",
        "--kinds",
        "kill-flusher,kill-ingest,stop-worker",
        "--interval",
        "1",
        "--duration",
        "40",
        "--seed",
        "11",
    )
    assert_clean(result, report)
    assert report["kills_done"] == 6, explain(result, report)
    for kind in ("kill-flusher", "kill-ingest", "stop-worker"):
        assert report["by_kind"][kind]["kills"] == 2, explain(result, report)
        assert report["by_kind"][kind]["resumed"] == 2, explain(result, report)
    assert "resume median" in result.stdout and "mismatched replies" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill-supervisor", "kill-postmaster", "terminate-backend"])
def test_process_tree_faults_lose_nothing(short_tmp, kind):
    """The supervisor killed (tree gone, engine restarted on the same data
    dir and socket), the postmaster killed (the engine must restart it), the
    flusher's backend terminated: nothing lost, nothing applied twice."""
    result, report = run_chaos(
        short_tmp,
        "--clients",
        "2",
        "--kills",
        "2",
        "--kinds",
        kind,
        "--interval",
        "1",
        "--duration",
        "40",
        "--seed",
        "12",
        # Should a database fault open the breaker (5 failed writes in a row),
        # its default 30 s recovery would outlast --resume-timeout.
        "--engine-flags",
        "--breaker-recovery-timeout-s 1",
    )
    assert_clean(result, report)
    assert report["by_kind"][kind]["kills"] == 2, explain(result, report)
    assert report["by_kind"][kind]["failed"] == 0, explain(result, report)
    if kind == "kill-supervisor":
        assert report["engine_starts"] == 3, explain(result, report)
    else:
        assert report["engine_starts"] == 1, explain(result, report)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "0"], "argument --clients: must be at least 1, got 0"),
        (["--kills", "-1"], "argument --kills: must be 0 or more"),
        (["--interval", "0"], "argument --interval: must be a positive number of seconds"),
        (["--duration", "soon"], "argument --duration: must be a number of seconds"),
        (["--rate", "-5"], "argument --rate: must be 0 (no limit) or a positive rate"),
        (["--kinds", "kill-flusher,kill-everything"], "unknown fault kind(s) kill-everything"),
        (["--engine-flags", "--dsn host=elsewhere"], "--dsn is set by tools/chaos itself"),
        (["--json", "/nonexistent-dir/r.json"], "directory /nonexistent-dir does not exist"),
        (["--framing", "xml"], "argument --framing: invalid choice"),
    ],
)
def test_bad_usage_exits_2_naming_the_argument(args, message):
    result = subprocess.run([sys.executable, str(CHAOS), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_help_lists_every_kind_and_exit_status():
    result = subprocess.run([sys.executable, str(CHAOS), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for kind in (
        "kill-flusher",
        "kill-ingest",
        "kill-supervisor",
        "kill-postmaster",
        "terminate-backend",
        "stop-worker",
    ):
        assert kind in text
    for option in ("--clients", "--kills", "--interval", "--kinds", "--duration", "--json", "--engine-flags"):
        assert option in text
    assert "Exit status: 0" in text


@pytest.mark.slow
def test_audit_catches_a_lost_intent_a_wrong_status_and_a_wrong_entity(short_tmp, monkeypatch):
    """The harness must fail when the database disagrees with the ledgers:
    tamper with the database before the audit and every check that should
    notice does."""
    from tools import chaoslib

    def load_only(self):
        def moves_committed():
            return sum(
                1 for c in self.clients for e in list(c.ledger.values()) if e.kind == "move" and e.final == "committed"
            )

        assert chaoslib.wait_until(lambda: moves_committed() >= 20, 30), "no moves committed"

    audit = chaoslib.Chaos._audit

    def tamper_then_audit(self, settled):
        moves = [
            (c.client_id, e.seq, e.entity)
            for c in self.clients
            for e in c.ledger.values()
            if e.kind == "move" and e.final == "committed"
        ]
        (lost_id, lost_seq, _), (flip_id, flip_seq, _) = moves[0], moves[1]
        with psycopg.connect(self.engine.dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM batchscheduler.intent_log WHERE client_id = %s AND seq = %s", (lost_id, lost_seq))
            conn.execute(
                "UPDATE batchscheduler.intent_log SET status = 'dead_lettered', code = 'handler_error' "
                "WHERE client_id = %s AND seq = %s",
                (flip_id, flip_seq),
            )
            conn.execute(
                "UPDATE batchscheduler.entities SET state = jsonb_set(state, '{pos,x}', "
                "to_jsonb((state #>> '{pos,x}')::int + 100)) WHERE id = %s",
                (moves[2][2],),
            )
        return audit(self, settled)

    monkeypatch.setattr(chaoslib.Chaos, "_fault_loop", load_only)
    monkeypatch.setattr(chaoslib.Chaos, "_audit", tamper_then_audit)
    cfg = chaoslib.Config(clients=2, kills=0, duration=30, rate=100, data_dir=str(short_tmp / "d"), seed=3)
    report = chaoslib.run(cfg)
    assert report["ok"] is False
    assert report["lost"] == 1
    assert report["mismatched"] >= 2  # the deleted one's reply and the flipped one's
    failed = {name for name, c in report["checks"].items() if not c["ok"]}
    assert {"no_lost", "no_mismatched_replies", "entities_match", "replay_identical"} <= failed
    # The engine itself was fine: it stopped cleanly and left nothing.
    assert {"engine_exit_clean", "no_processes_left", "no_socket_left", "no_new_dev_shm"}.isdisjoint(failed)
    assert "result: FAIL" in chaoslib.table(report)


def test_engine_that_cannot_start_exits_2(short_tmp):
    result, report = run_chaos(short_tmp, "--kills", "0", "--engine-flags", "--max-batch-size 0")
    assert result.returncode == 2, result.stderr
    assert "could not start the engine" in result.stderr
    assert "max_batch_size=0" in result.stderr
    assert report is None
