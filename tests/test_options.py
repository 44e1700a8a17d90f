"""Configuration: one typed object, validated once, errors name field and value."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import RUN_ENGINE

from engine import options as opts
from engine.cli import parse_options
from engine.errors import ConfigError, NotRuntimeConfigurable


def test_defaults_are_the_seeds():
    o = opts.from_mapping({})
    assert (o.time_window_ms, o.max_batch_size, o.adaptive_batching) == (10.0, 857, False)
    assert (o.breaker_failure_threshold, o.breaker_recovery_timeout_s, o.breaker_half_open_test_count) == (5, 30.0, 3)
    assert o.min_batch_size == 50 and o.error_rate_threshold == 0.01 and o.latency_threshold_ms == 100.0


@pytest.mark.parametrize(
    "name, window, size, adaptive", [("small", 20, 200, False), ("medium", 15, 500, True), ("large", 10, 857, True)]
)
def test_presets_match_the_seed(name, window, size, adaptive):
    o = opts.resolve(preset_name=name, environ={})
    assert (o.time_window_ms, o.max_batch_size, o.adaptive_batching) == (window, size, adaptive)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("time_window_ms", 0, "must be > 0"),
        ("time_window_ms", -3, "must be > 0"),
        ("max_batch_size", 0, "between 1 and 100000"),
        ("max_batch_size", "lots", "Expected `int`"),
        ("ring_bytes", 100_000, "power of two"),
        ("max_frame_bytes", 4 << 20, "quarter of ring_bytes"),
        ("socket", "/" + "s" * 200, "108 bytes"),
        ("log_level", "LOUD", "one of"),
        ("handlers", "no_colon", "package.module:attribute"),
        ("ingests", 65, "between 1 and 64"),
        ("bogus", 1, "unknown option"),
    ],
)
def test_bad_values_name_the_field_and_value(field, value, words):
    with pytest.raises(ConfigError) as info:
        opts.from_mapping({field: value})
    assert info.value.field == field
    assert words in str(info.value)
    assert repr(value)[:20] in str(info.value)


def test_precedence_defaults_preset_file_env_flags(tmp_path):
    toml = tmp_path / "engine.toml"
    toml.write_text('preset = "small"\n[engine]\n')  # an [engine] table wins over top-level keys
    toml.write_text("[engine]\ntime_window_ms = 7\nmax_batch_size = 300\ningests = 2\n")
    env = {"BATCHSCHEDULER_MAX_BATCH_SIZE": "400", "BATCHSCHEDULER_INGESTS": "3"}
    o = opts.resolve(config_file=str(toml), preset_name="small", flags={"ingests": 4}, environ=env)
    assert (o.time_window_ms, o.max_batch_size, o.ingests) == (7, 400, 4)


def test_env_values_are_parsed_and_checked():
    assert opts.from_env({"BATCHSCHEDULER_ADAPTIVE_BATCHING": "yes"}) == {"adaptive_batching": True}
    with pytest.raises(ConfigError, match="BATCHSCHEDULER_MAX_BATCH_SIZE"):
        opts.from_env({"BATCHSCHEDULER_MAX_BATCH_SIZE": "ten"})
    with pytest.raises(ConfigError, match="unknown option"):
        opts.from_env({"BATCHSCHEDULER_WINDOW": "5"})


@pytest.mark.parametrize(
    "content, words",
    [
        ("time_window_ms = = 3", "not valid TOML"),
        ("max_batch_size = 'big'", "Expected `int`"),
        ("unknown_thing = 1", "unknown option"),
    ],
)
def test_bad_config_file_is_a_clear_error(tmp_path, content, words):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        opts.resolve(config_file=str(path), environ={})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="file not found"):
        opts.resolve(config_file="/nonexistent/engine.toml", environ={})


def test_flags_map_onto_options():
    o = parse_options(
        [
            "--time-window-ms",
            "2.5",
            "--max-batch-size",
            "0x100",
            "--adaptive-batching",
            "--no-apply-state",
            "--socket-mode",
            "0o660",
        ]
    )
    assert (o.time_window_ms, o.max_batch_size, o.adaptive_batching, o.apply_state, o.socket_mode) == (
        2.5,
        256,
        True,
        False,
        0o660,
    )


def test_runtime_configurable_options_only():
    opts.check_runtime({"time_window_ms": 3, "max_batch_size": 9})
    with pytest.raises(NotRuntimeConfigurable, match="needs a restart"):
        opts.check_runtime({"ingests": 2})


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-batch-size", "-1"], "max_batch_size=-1"),
        (["--time-window-ms", "soon"], "time_window_ms='soon'"),
        (["--ring-bytes", "12345"], "power of two"),
        (["--handlers", "nowhere.module:X", "--dsn", "host=/nonexistent"], "cannot import nowhere"),
    ],
)
def test_run_engine_refuses_bad_flags_with_exit_code_and_message(args, words, short_tmp):
    proc = subprocess.run(
        [sys.executable, str(RUN_ENGINE), "--socket", str(short_tmp / "s"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (1, 2)
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_engine_help_lists_every_option():
    out = subprocess.run([sys.executable, str(RUN_ENGINE), "--help"], capture_output=True, text=True, timeout=60).stdout
    for name in opts.FIELDS:
        assert "--" + name.replace("_", "-") in out
    assert "BATCHSCHEDULER_" in out and "--config" in out and "--preset" in out


@pytest.mark.parametrize(
    "flags, env, toml, origin",
    [
        ({"time_window_ms": -5.0}, {}, None, "(from flag --time-window-ms)"),
        ({}, {"BATCHSCHEDULER_TIME_WINDOW_MS": "-5"}, None, "(from environment BATCHSCHEDULER_TIME_WINDOW_MS)"),
        ({}, {}, "time_window_ms = -5\n", "(from config file "),
        # A cross-field check names the source of the field it reports.
        ({"max_frame_bytes": 1 << 20}, {"BATCHSCHEDULER_RING_BYTES": "1048576"}, None, "(from flag --max-frame-bytes)"),
    ],
)
def test_an_error_names_the_source_of_the_value(tmp_path, flags, env, toml, origin):
    config = None
    if toml is not None:
        config = tmp_path / "engine.toml"
        config.write_text(toml)
    with pytest.raises(ConfigError) as info:
        opts.resolve(config_file=str(config) if config else None, flags=flags, environ=env)
    assert origin in str(info.value)
    assert "defaults < environment < flags" not in str(info.value)


@pytest.mark.parametrize(
    "content, words",
    [
        ("time_window_ms = 5\n[engine]\nmax_batch_size = 10\n", "stands beside the [engine] table"),
        ("[engine]\nmax_batch_size = 10\n[extra]\nx = 1\n", "stands beside the [engine] table"),
        ("[batching]\ntime_window_ms = 5\n", "unknown table [batching]"),
        ("engine = 5\n", "must be a table"),
    ],
)
def test_toml_content_is_used_or_is_an_error(tmp_path, content, words):
    config = tmp_path / "engine.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as info:
        opts.resolve(config_file=str(config), environ={})
    assert words in str(info.value)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_an_empty_dsn_is_an_error_not_the_embedded_database(source):
    with pytest.raises(ConfigError) as info:
        if source == "flag":
            parse_options(["--dsn", ""])
        else:
            opts.resolve(environ={"BATCHSCHEDULER_DSN": ""})
    assert info.value.field == "dsn" and "is empty" in str(info.value)


def test_the_default_socket_lives_in_the_data_directory():
    assert opts.socket_path(opts.from_mapping({"data_dir": "/tmp/x"})) == "/tmp/x/engine.sock"
    assert opts.socket_path(opts.from_mapping({"data_dir": "/tmp/x", "socket": "/tmp/s.sock"})) == "/tmp/s.sock"


def test_the_readme_options_table_lists_every_option_with_its_flag():
    """A new option cannot ship undocumented: README.md's Options table has
    one row per field, naming its flag."""
    import re
    from pathlib import Path

    from engine.options import FIELDS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_]+)` \| `(--[a-z0-9-]+)[^`]*` \|", readme, flags=re.M))
    assert set(rows) == set(FIELDS)
    assert all(flag == "--" + name.replace("_", "-") for name, flag in rows.items())
