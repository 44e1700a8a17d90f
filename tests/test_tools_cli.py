"""The tools' command lines: they run directly after the README's install
from any shell, refuse bad arguments before doing any work (exit 2, the flag
named, no traceback), and document every option once."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

TOOLS = ROOT / "tools"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
# Every executable under tools/ (chaos and refresh_lock included).
ALL_TOOLS = (
    "run_engine",
    "load_gen",
    "replay",
    "dead_letters",
    "dashboard_preview",
    "bench_db",
    "bench_ipc",
    "bench_sweep",
    "top",
    "chaos",
    "refresh_lock",
)
GUARD = "BATCHSCHEDULER_TOOL_REEXEC"


def test_every_executable_under_tools_is_listed():
    found = {p.name for p in TOOLS.iterdir() if p.is_file() and os.access(p, os.X_OK)}
    assert found == set(ALL_TOOLS)


@pytest.fixture(scope="module")
def bare_shell():
    """PATH and HOME only, as ``env -i`` gives, with ``python3`` being the
    very interpreter the checkout's .venv was made from (the case where a
    venv's python, a symlink to it, cannot be told apart by its executable)."""
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv in the checkout (the README's install command makes it)")
    base = subprocess.run(
        [str(VENV_PYTHON), "-c", "import sys; print(sys._base_executable)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    bindir = Path(tempfile.mkdtemp(prefix="bs-bin-"))
    (bindir / "python3").symlink_to(os.path.realpath(base))
    try:
        yield {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


@pytest.mark.parametrize("tool", ALL_TOOLS)
def test_tool_runs_directly_from_a_bare_shell(tool, bare_shell):
    proc = subprocess.run(
        [str(TOOLS / tool), "--help"], capture_output=True, text=True, env=bare_shell, cwd="/", timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"usage: tools/{tool}"), proc.stdout[:200]


def test_a_rerun_that_still_lacks_dependencies_says_what_to_do_instead_of_looping(bare_shell):
    proc = subprocess.run(
        [str(TOOLS / "run_engine"), "--help"],
        capture_output=True,
        text=True,
        env={**bare_shell, GUARD: "1"},
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 2
    assert "pip install -c requirements/lock.txt ." in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------- entry points
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})


def test_entry_points_cover_every_installable_tool():
    targets = set(scripts().values())
    assert {
        "engine.cli:run_engine_main",
        "batchscheduler_tools.loadgen:main",
        "batchscheduler_tools.replaylib:main",
        "batchscheduler_tools.deadletters:main",
        "batchscheduler_tools.liveview:main",
        "batchscheduler_tools.bench.db:main",
        "batchscheduler_tools.bench.ipc:main",
        "batchscheduler_tools.bench.sweep:main",
    } <= targets
    for name in scripts():
        assert name.startswith("batchscheduler-")


def test_the_tools_package_installs_under_its_own_name():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"batchscheduler_tools": "tools"}
    assert {"batchscheduler_tools", "batchscheduler_tools.bench"} <= set(setuptools["packages"])
    assert "tools" not in setuptools["packages"]


@pytest.mark.parametrize("name", sorted(scripts()))
def test_entry_point_main_prints_its_help(name, capsys):
    module, _, func = scripts()[name].partition(":")
    # From a checkout the installed name batchscheduler_tools is the package tools/.
    module = module.replace("batchscheduler_tools", "tools", 1) if module.startswith("batchscheduler_tools") else module
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ------------------------------------------------------------ bad arguments
NO_SOCKET = "/nonexistent/engine.sock"
NO_SERVER = "host=/nonexistent-bs-dir dbname=x"
BAD_ARGS = [
    # (tool, args, text the error must contain)
    ("bench_db", ["--entities", "100"], "--entities"),
    ("bench_db", ["--entities", "10", "--batch-size", "20"], "--entities"),
    ("bench_db", ["--rows", "0"], "--rows"),
    ("bench_db", ["--batches", "-1"], "--batches"),
    ("bench_db", ["--batch-size", "abc"], "--batch-size"),
    ("bench_db", ["--only", "nope"], "--only"),
    ("bench_db", ["--writers", "0"], "--writers"),
    ("bench_db", ["--dsn", "not a dsn ="], "--dsn"),
    ("bench_db", ["--dsn", NO_SERVER, "--rows", "1"], "--dsn"),
    ("bench_db", ["--json", "/nonexistent/dir/out.json"], "--json"),
    ("bench_ipc", ["--records", "0"], "--records"),
    ("bench_ipc", ["--repeat", "-2"], "--repeat"),
    ("bench_ipc", ["--chunk", "x"], "--chunk"),
    ("bench_ipc", ["--timeout", "0"], "--timeout"),
    ("bench_ipc", ["--timeout", "nan"], "--timeout"),
    ("bench_ipc", ["--ring-bytes", "abc"], "--ring-bytes"),
    ("bench_ipc", ["--ring-bytes", "100000"], "power of two"),
    ("bench_ipc", ["--only", "nope"], "--only"),
    ("bench_ipc", ["--json", "/nonexistent/dir/out.json"], "--json"),
    ("bench_sweep", ["--sizes", "0"], "--sizes"),
    ("bench_sweep", ["--sizes", "a,b"], "--sizes"),
    ("bench_sweep", ["--sizes", "200000"], "--sizes"),
    ("bench_sweep", ["--duration", "0"], "--duration"),
    ("bench_sweep", ["--duration", "inf"], "--duration"),
    ("bench_sweep", ["--connections", "0"], "--connections"),
    ("bench_sweep", ["--in-flight", "-1"], "--in-flight"),
    ("bench_sweep", ["--entities", "0"], "--entities"),
    ("bench_sweep", ["--window-ms", "0"], "--window-ms"),
    ("bench_sweep", ["--window-ms", "100000"], "--window-ms"),
    ("bench_sweep", ["--dsn", "not a dsn ="], "--dsn"),
    ("bench_sweep", ["--json", "/nonexistent/dir/out.json"], "--json"),
    ("load_gen", ["--socket", NO_SOCKET, "--connections", "0"], "--connections"),
    ("load_gen", ["--socket", NO_SOCKET, "--rate", "-5"], "--rate"),
    ("load_gen", ["--socket", NO_SOCKET, "--rate", "nan"], "--rate"),
    ("load_gen", ["--socket", NO_SOCKET, "--duration", "0"], "--duration"),
    ("load_gen", ["--socket", NO_SOCKET, "--count", "0"], "--count"),
    ("load_gen", ["--socket", NO_SOCKET, "--entities", "0"], "--entities"),
    ("load_gen", ["--socket", NO_SOCKET, "--in-flight", "0"], "--in-flight"),
    ("load_gen", ["--socket", NO_SOCKET, "--in-flight", "1000000"], "--in-flight"),
    ("load_gen", ["--socket", NO_SOCKET, "--connections", "100000"], "--connections"),
    ("load_gen", ["--socket", NO_SOCKET], "--socket"),
    ("load_gen", ["--socket", NO_SOCKET, "--variant", "a="], "--variant"),
    ("load_gen", ["--spawn-engine", "--pid", "1"], "--pid"),
    ("load_gen", ["--spawn-engine", "--variant", "x=--max-batch-size 0"], "--variant"),
    ("load_gen", ["--spawn-engine", "--variant", "x=--no-such-flag"], "--variant"),
    ("load_gen", ["--spawn-engine", "--variant", "x=--socket /tmp/other.sock"], "--variant"),
    ("load_gen", ["--spawn-engine", "--variant", "x='unbalanced"], "--variant"),
    ("load_gen", ["--spawn-engine", "--dsn", NO_SERVER], "--dsn"),
    ("load_gen", ["--spawn-engine", "--json", "/nonexistent/dir/out.json"], "--json"),
    ("replay", [], "--dsn"),
    ("replay", ["--dsn", NO_SERVER, "--data-dir", "/tmp"], "--data-dir"),
    ("replay", ["--dsn", NO_SERVER, "--max-diffs", "-1"], "--max-diffs"),
    ("replay", ["--dsn", "not a dsn ="], "--dsn"),
    ("replay", ["--dsn", NO_SERVER, "--handlers", "no_such_module:X"], "--handlers"),
    ("replay", ["--dsn", NO_SERVER], "cannot reach the database"),
    ("replay", ["--data-dir", "/nonexistent/var"], "no embedded engine database"),
    ("replay", ["--dsn", NO_SERVER, "--json", "/nonexistent/dir/out.json"], "--json"),
    ("dead_letters", ["list", "--code", "invalid"], "--code"),
    ("dead_letters", ["list", "--since", "yesterday"], "--since"),
    ("dead_letters", ["list", "--limit", "-1"], "--limit"),
    ("dead_letters", ["list", "--dsn", NO_SERVER], "cannot reach the database"),
    ("dead_letters", ["replay", "--socket", NO_SOCKET, "--dsn", NO_SERVER], NO_SOCKET),
    ("top", ["--interval", "0"], "--interval"),
    ("top", ["--interval", "nan"], "--interval"),
    ("top", ["--interval", "soon"], "--interval"),
    ("top", ["--url", "ftp://127.0.0.1:9187"], "--url"),
    ("top", ["--url", "http://:9187"], "--url"),
    ("top", ["--url", "127.0.0.1:99999"], "--url"),
    ("top", ["--url", "127.0.0.1:0"], "--url"),
    ("top", ["--once", "--no-such-flag"], "--no-such-flag"),
    ("run_engine", ["--max-batch-size", "0"], "max_batch_size"),
]


@pytest.mark.parametrize(("tool", "args", "names"), BAD_ARGS, ids=[f"{t}{' '.join(a)}" for t, a, _ in BAD_ARGS])
def test_bad_arguments_exit_2_naming_the_problem_without_a_traceback(tool, args, names):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / tool), *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert names in proc.stderr, proc.stderr


# --------------------------------------------------------------- --plot
@pytest.fixture
def no_matplotlib():
    """PYTHONPATH shadowing matplotlib with a package that cannot be imported."""
    path = Path(tempfile.mkdtemp(prefix="bs-nompl-"))
    (path / "matplotlib").mkdir()
    (path / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib (test)')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCHEDULER_")}
    env["PYTHONPATH"] = str(path)
    try:
        yield env, path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    "args",
    [
        # The socket does not exist either: the plot check comes first, before
        # anything that waits or connects, let alone the load.
        ["load_gen", "--socket", NO_SOCKET, "--count", "10"],
        ["load_gen", "--spawn-engine", "--duration", "1"],
        ["bench_sweep", "--sizes", "1", "--duration", "1"],
    ],
)
def test_plot_without_matplotlib_is_refused_before_the_run(args, no_matplotlib):
    env, path = no_matplotlib
    proc = subprocess.run(
        [sys.executable, str(TOOLS / args[0]), *args[1:], "--plot", str(path / "plots")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--plot" in proc.stderr and "pip install -c requirements/lock.txt '.[plot]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "machine:" not in proc.stdout  # refused before any work


# ------------------------------------------------------------------ help
def parsers() -> dict[str, argparse.ArgumentParser]:
    from engine import cli
    from tools import deadletters, liveview, loadgen, replaylib
    from tools.bench import db, ipc, sweep

    return {
        "bench_db": db.build_parser(),
        "bench_ipc": ipc.build_parser(),
        "bench_sweep": sweep.build_parser(),
        "load_gen": loadgen.build_parser(),
        "replay": replaylib.build_parser(),
        "dead_letters": deadletters.build_parser(),
        "top": liveview.build_parser(),
        "run_engine": cli.build_parser(),
    }


@pytest.mark.parametrize(
    "tool", ["bench_db", "bench_ipc", "bench_sweep", "load_gen", "replay", "dead_letters", "top", "run_engine"]
)
def test_help_names_the_program_and_documents_every_option_once(tool):
    parser = parsers()[tool]
    assert parser.prog == f"tools/{tool}"
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"tools/{tool} {action.option_strings} has no help"
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("(default") <= 1, f"tools/{tool} {action.option_strings}: {text!r}"
    text = parser.format_help()
    assert "C client" not in text and "(default: None)" not in text


def test_bench_sweep_warns_when_connections_times_in_flight_cannot_fill_a_batch(monkeypatch, capsys):
    from tools.bench import report, sweep

    def fake_run(sizes, *, connections, in_flight, **_):
        points = [
            {"size": n, "throughput": 100.0 * n, "p50_ms": 1.0, "p99_ms": 2.0, "batch_mean": min(n, 8), "lost": 0}
            for n in sizes
        ]
        never = sweep.unfillable(sizes, connections, in_flight)
        return {
            "points": points,
            "optimum": max(sizes),
            "optimum_fillable": max(sizes) not in never,
            "in_flight_total": connections * in_flight,
            "unfillable_sizes": never,
            "fit": {},
            "seed_table": sweep.SEED_TABLE,
        }

    monkeypatch.setattr(sweep, "run", fake_run)
    monkeypatch.setattr(report, "embedded_pg_version", lambda: "test")
    assert sweep.main(["--sizes", "1,8,64", "--connections", "2", "--in-flight", "4"]) == 0
    out, err = capsys.readouterr()
    assert "warning" in err and "2 x --in-flight 4 = 8" in err and "64" in err
    assert "64*" in out and "can never fill" in out
    assert "optimum on this machine: none measured" in out

    assert sweep.main(["--sizes", "1,8", "--connections", "2", "--in-flight", "4"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "optimum on this machine: 8" in out
