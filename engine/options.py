"""Every option of the engine, in one typed object, validated in one place.

Sources, later ones winning: the seed's defaults, a preset (``small``,
``medium``, ``large``), a TOML file (``--config``), environment variables
(``BATCHSCHEDULER_<FIELD>``, e.g. ``BATCHSCHEDULER_TIME_WINDOW_MS=5``), then
command-line flags (``--time-window-ms 5``). Every error names the field, the
value and the source it came from.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from engine.errors import ConfigError, NotRuntimeConfigurable
from ipc.control import MAX_INGESTS, MAX_LANES
from ipc.layout import MAX_CAPACITY

# The engine's smallest ring: room for a few frames of the largest default
# size (max_frame_bytes, 64 KiB). The layout itself accepts smaller rings
# (ipc.layout.MIN_CAPACITY), which the ring's own tests use to force wraps.
MIN_RING_BYTES = 1 << 16

ENV_PREFIX = "BATCHSCHEDULER_"


class Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Engine options. Defaults are the seed's large-scale configuration.

    Build it with ``from_mapping`` or ``resolve``, which validate; the bare
    constructor does not (it is also the decode target of the TOML file)."""

    # --- batching (the seed's BatchSchedulerOptions) ----------------------
    time_window_ms: float = 10.0
    """A batch is cut this long after its first intent arrived..."""
    max_batch_size: int = 857
    """...or as soon as it holds this many intents, whichever comes first."""
    window_covers_commit: bool = True
    """True: a time cut comes early by the lane's expected time from cut to
    reply (mostly the commit), so the window bounds wait plus commit
    (``engine.policy.CommitLead``);
    False: the window bounds the wait alone."""

    # --- adaptive batching (the seed's AdaptiveBatchingConfig) ------------
    adaptive_batching: bool = False
    min_batch_size: int = 50
    adjustment_factor: float = 0.1
    error_rate_threshold: float = 0.01
    latency_threshold_ms: float = 100.0

    # --- circuit breaker (the seed's CircuitBreakerConfig) ----------------
    breaker_failure_threshold: int = 5
    breaker_recovery_timeout_s: float = 30.0
    breaker_half_open_test_count: int = 3

    # --- processes and memory ----------------------------------------------
    ingests: int = 1
    lanes: int = 2
    """Write lanes: flusher processes, each with its own database connection
    and its own slice of the entities (``engine.lanes.lane_of``). Measured
    on the 2-core box: see BENCHMARKS.md, "Lanes"."""
    ring_bytes: int = 8 << 20
    """Byte capacity of each ring, one per (ingest, lane) (power of two)."""
    max_frame_bytes: int = 64 << 10
    max_in_flight_per_connection: int = 8192
    max_connections: int = 4096
    """Per ingest process; further connections wait in the listen backlog."""
    worker_rss_limit_mb: int = 512
    drain_timeout_s: float = 5.0

    # --- endpoints and storage ----------------------------------------------
    socket: str | None = None
    """The Unix socket; None: ``<data_dir>/engine.sock``, so engines on
    different data directories never collide."""
    socket_mode: int = 0o600
    data_dir: str = "var"
    dsn: str | None = None
    """An external PostgreSQL (>= 14). None: the embedded one in data_dir."""
    handlers: str = "engine.handlers:BUILTIN"
    """``module:attribute`` naming the handler registry."""
    apply_state: bool = True
    """False: log intents only, apply no state change (the baseline)."""
    notify_batches: bool = False
    """NOTIFY ``batchscheduler_batches`` with each committed batch id (the
    in-process event bus of ``BatchScheduler`` turns this on)."""
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` (one readable line per record) or ``json`` (one object per line)."""
    stats_interval_s: float = 10.0
    """The supervisor logs one INFO stats line this often; 0 turns it off."""
    metrics_addr: str = "127.0.0.1:9187"
    """Where /metrics (Prometheus) and /health (JSON) are served: HOST:PORT
    (loopback by default; port 0 picks a free one) or ``off``."""

    # --- alerts (the seed's "Alerting Thresholds"; engine.alerts) ------------
    alert_error_rate: float = 0.01
    alert_error_rate_for_s: float = 300.0
    alert_latency_p95_ms: float = 50.0
    alert_latency_for_s: float = 600.0
    alert_flush_failures: int = 3
    alert_memory_ratio: float = 0.8

    def replace(self, **changes: Any) -> Options:
        """A validated copy with ``changes`` applied."""
        return from_mapping({**to_dict(self), **changes}, source="configure()")


# Options ``configure()`` may change while the engine runs: the flusher reads
# them from shared memory at every cut. Anything else needs a restart.
RUNTIME = frozenset(
    {
        "time_window_ms",
        "max_batch_size",
        "adaptive_batching",
        "min_batch_size",
    }
)

PRESETS: dict[str, dict[str, Any]] = {
    # The seed's "Production Deployment Guidance", verbatim.
    "small": {"time_window_ms": 20, "max_batch_size": 200, "adaptive_batching": False},
    "medium": {"time_window_ms": 15, "max_batch_size": 500, "adaptive_batching": True},
    "large": {"time_window_ms": 10, "max_batch_size": 857, "adaptive_batching": True},
}

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def _check(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(field, value, why)


def _validate(o: Options) -> None:
    for name, typ in FIELDS.items():
        value = getattr(o, name)
        # inf and nan pass every comparison below and cannot travel to the workers as JSON.
        _check(typ not in (float, "float") or math.isfinite(value), name, value, "must be a finite number")
    _check(
        0 < o.time_window_ms <= 60_000, "time_window_ms", o.time_window_ms, "must be > 0 and <= 60000 (milliseconds)"
    )
    _check(1 <= o.max_batch_size <= 100_000, "max_batch_size", o.max_batch_size, "must be between 1 and 100000")
    _check(o.min_batch_size >= 1, "min_batch_size", o.min_batch_size, "must be >= 1")
    _check(
        not o.adaptive_batching or o.min_batch_size <= o.max_batch_size,
        "min_batch_size",
        o.min_batch_size,
        f"must not exceed max_batch_size ({o.max_batch_size}) with adaptive batching",
    )
    _check(
        0 < o.adjustment_factor < 1,
        "adjustment_factor",
        o.adjustment_factor,
        "must be between 0 and 1 (the seed suggests 0.1-0.2)",
    )
    _check(
        0 <= o.error_rate_threshold <= 1,
        "error_rate_threshold",
        o.error_rate_threshold,
        "must be a fraction between 0 and 1",
    )
    _check(o.latency_threshold_ms > 0, "latency_threshold_ms", o.latency_threshold_ms, "must be > 0")
    _check(o.breaker_failure_threshold >= 1, "breaker_failure_threshold", o.breaker_failure_threshold, "must be >= 1")
    _check(
        o.breaker_recovery_timeout_s > 0,
        "breaker_recovery_timeout_s",
        o.breaker_recovery_timeout_s,
        "must be > 0 seconds",
    )
    _check(
        o.breaker_half_open_test_count >= 1,
        "breaker_half_open_test_count",
        o.breaker_half_open_test_count,
        "must be >= 1",
    )
    _check(1 <= o.ingests <= MAX_INGESTS, "ingests", o.ingests, f"must be between 1 and {MAX_INGESTS}")
    _check(1 <= o.lanes <= MAX_LANES, "lanes", o.lanes, f"must be between 1 and {MAX_LANES}")
    _check(
        MIN_RING_BYTES <= o.ring_bytes <= MAX_CAPACITY and not o.ring_bytes & (o.ring_bytes - 1),
        "ring_bytes",
        o.ring_bytes,
        f"must be a power of two between {MIN_RING_BYTES} and {MAX_CAPACITY}",
    )
    _check(
        256 <= o.max_frame_bytes <= 16 << 20, "max_frame_bytes", o.max_frame_bytes, "must be between 256 and 16777216"
    )
    _check(
        o.max_frame_bytes * 4 <= o.ring_bytes,
        "max_frame_bytes",
        o.max_frame_bytes,
        f"must be at most a quarter of ring_bytes ({o.ring_bytes}) so a full frame always fits",
    )
    _check(
        o.max_in_flight_per_connection >= 1,
        "max_in_flight_per_connection",
        o.max_in_flight_per_connection,
        "must be >= 1",
    )
    _check(o.max_connections >= 1, "max_connections", o.max_connections, "must be >= 1")
    _check(
        o.worker_rss_limit_mb >= 32,
        "worker_rss_limit_mb",
        o.worker_rss_limit_mb,
        "must be >= 32 (an idle worker uses ~35-50 MiB; below that it would be recycled endlessly)",
    )
    _check(0 < o.drain_timeout_s <= 300, "drain_timeout_s", o.drain_timeout_s, "must be > 0 and <= 300 seconds")
    _check(o.socket is None or bool(o.socket), "socket", o.socket, "must be a path")
    _check(
        len(os.fsencode(os.path.abspath(socket_path(o)))) < 108,
        "socket",
        socket_path(o),
        "absolute path must be shorter than 108 bytes (the Unix socket limit)",
    )
    _check(0 <= o.socket_mode <= 0o777, "socket_mode", o.socket_mode, "must be a file mode like 0o600")
    _check(bool(o.data_dir), "data_dir", o.data_dir, "must be a directory path")
    _check(
        o.dsn is None or bool(o.dsn.strip()),
        "dsn",
        o.dsn,
        "is empty: give a libpq connection string, or leave the option out for the embedded PostgreSQL",
    )
    _check(":" in o.handlers, "handlers", o.handlers, "must look like 'package.module:attribute'")
    try:
        parse_addr(o.metrics_addr)
    except ValueError as exc:
        raise ConfigError("metrics_addr", o.metrics_addr, str(exc)) from None
    _check(o.log_level.upper() in _LOG_LEVELS, "log_level", o.log_level, f"must be one of {', '.join(_LOG_LEVELS)}")
    _check(o.log_format in LOG_FORMATS, "log_format", o.log_format, f"must be one of {', '.join(LOG_FORMATS)}")
    _check(
        o.stats_interval_s == 0 or 1 <= o.stats_interval_s <= 86_400,
        "stats_interval_s",
        o.stats_interval_s,
        "must be 0 (off) or between 1 and 86400 seconds",
    )
    _check(0 < o.alert_error_rate < 1, "alert_error_rate", o.alert_error_rate, "must be a fraction between 0 and 1")
    _check(o.alert_latency_p95_ms > 0, "alert_latency_p95_ms", o.alert_latency_p95_ms, "must be > 0 milliseconds")
    for name in ("alert_error_rate_for_s", "alert_latency_for_s"):
        value = getattr(o, name)
        _check(1 <= value <= 86_400, name, value, "must be between 1 and 86400 seconds")
    _check(
        1 <= o.alert_flush_failures <= 1_000_000,
        "alert_flush_failures",
        o.alert_flush_failures,
        "must be between 1 and 1000000",
    )
    _check(0 < o.alert_memory_ratio <= 1, "alert_memory_ratio", o.alert_memory_ratio, "must be a fraction > 0 and <= 1")


FIELDS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Options)}


def to_dict(o: Options) -> dict[str, Any]:
    return msgspec.structs.asdict(o)


def from_mapping(
    values: Mapping[str, Any], *, source: str = "options", origins: Mapping[str, str] | None = None
) -> Options:
    """Build and validate Options from a mapping (unknown keys are errors).

    An error names where the offending value came from: ``origins[field]``
    (e.g. ``flag --time-window-ms``) when given, else ``source``; a field
    left at its default says ``default``."""

    def origin(field: str) -> str:
        if origins is not None:
            return origins.get(field, "default")
        return source

    for key in values:
        if key not in FIELDS:
            raise ConfigError(key, values[key], f"unknown option (from {origin(key)}); known: {', '.join(FIELDS)}")
    try:
        options = msgspec.convert(dict(values), Options, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = text.rsplit("$.", 1)[-1].strip("`") if "$." in text else "options"
        raise ConfigError(field, values.get(field), f"{text.split(' - at ')[0]} (from {origin(field)})") from None
    try:
        _validate(options)
    except ConfigError as exc:
        raise ConfigError(exc.field, exc.value, f"{str(exc).split(': ', 1)[1]} (from {origin(exc.field)})") from None
    return options


def preset(name: str) -> dict[str, Any]:
    """The seed's preset ``name`` as a mapping of option values."""
    if name not in PRESETS:
        raise ConfigError("preset", name, f"must be one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file of options: top-level keys, or one ``[engine]`` table.

    Every key is used or is an error: with an ``[engine]`` table, nothing
    else may stand beside it (a key there would silently lose), and any
    other table is unknown."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    if "engine" in data:
        if not isinstance(data["engine"], dict):
            raise ConfigError("engine", data["engine"], f"must be a table ([engine]) (from {path})")
        beside = [k for k in data if k != "engine"]
        if beside:
            raise ConfigError(
                beside[0],
                data[beside[0]],
                f"stands beside the [engine] table in {path}; put every option inside [engine] "
                "(or use top-level keys and no [engine] table)",
            )
        data = data["engine"]
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                key, "{…}", f"unknown table [{key}] in {path}; options are keys, known: {', '.join(FIELDS)}"
            )
    return data


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Options named by ``BATCHSCHEDULER_<FIELD>`` variables, parsed by type."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "TEST_DSN":
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field == "preset":
            continue
        if field not in FIELDS:
            raise ConfigError(key, raw, f"unknown option in environment; known: {', '.join(FIELDS)}")
        out[field] = parse_text(field, raw, source=f"environment {key}")
    return out


def parse_text(field: str, raw: str, *, source: str) -> Any:
    """Parse the text form of ``field`` (env var or flag) into its type."""
    typ = FIELDS[field]
    try:
        if typ in (bool, "bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if typ in (int, "int"):
            return int(raw, 0)
        if typ in (float, "float"):
            return float(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(field, raw, f"{exc} (from {source})") from None


def resolve(
    *,
    config_file: str | None = None,
    preset_name: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Options:
    """Merge defaults < preset < TOML file < environment < flags, validate once."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def layer(values: Mapping[str, Any], where) -> None:
        for key, value in values.items():
            merged[key] = value
            origins[key] = where(key)

    file_values = load_toml(config_file) if config_file else {}
    preset_name = preset_name or file_values.pop("preset", None) or environ.get(ENV_PREFIX + "PRESET")
    if preset_name:
        layer(preset(preset_name), lambda _k: f"preset {preset_name}")
    layer(file_values, lambda _k: f"config file {config_file}")
    layer(from_env(environ), lambda k: f"environment {ENV_PREFIX}{k.upper()}")
    layer({k: v for k, v in (flags or {}).items() if v is not None}, lambda k: f"flag --{k.replace('_', '-')}")
    return from_mapping(merged, origins=origins)


def check_runtime(changes: Mapping[str, Any]) -> None:
    """Raise unless every key of ``changes`` may change without a restart."""
    for key, value in changes.items():
        if key not in FIELDS:
            raise ConfigError(key, value, "unknown option")
        if key not in RUNTIME:
            raise NotRuntimeConfigurable(
                key, value, f"needs a restart; runtime options are {', '.join(sorted(RUNTIME))}"
            )


def data_path(o: Options) -> Path:
    return Path(o.data_dir).resolve()


def parse_addr(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), or None for ``off``."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host.strip("[]"):
        raise ValueError(f"expected HOST:PORT (port 0-65535) or 'off', got {text!r}")
    return host.strip("[]"), int(port)


def socket_path(o: Options) -> str:
    """The socket: ``socket`` when given, else ``<data_dir>/engine.sock``."""
    return o.socket if o.socket else os.path.join(o.data_dir, "engine.sock")


HELP: dict[str, str] = {
    "time_window_ms": "cut a batch this many ms after its first intent arrived (seed default 10)",
    "max_batch_size": "cut a batch as soon as it holds this many intents (seed default 857)",
    "window_covers_commit": "cut a time-triggered batch early by the lane's expected time from cut to reply (mostly "
    "the commit; at most half the window), so an intent's wait plus its commit stays within time_window_ms",
    "adaptive_batching": "adjust the size limit between min_batch_size and max_batch_size from error rate and latency",
    "min_batch_size": "lower bound of the adaptive size limit (seed: 50)",
    "adjustment_factor": "fraction the adaptive limit moves per step (seed: 0.1-0.2)",
    "error_rate_threshold": "smoothed dead-letter fraction above which the limit shrinks (seed: 0.01)",
    "latency_threshold_ms": "first-received-to-commit latency above which the limit shrinks (seed: 100)",
    "breaker_failure_threshold": "consecutive failed batch writes that open the circuit breaker (seed: 5)",
    "breaker_recovery_timeout_s": "seconds an open breaker waits before a test batch (seed: 30)",
    "breaker_half_open_test_count": "test batches that must succeed to close the breaker (seed: 3)",
    "ingests": "number of ingest processes (each with one ring per lane)",
    "lanes": "write lanes: flusher processes, each with its own connection and slice of the entities",
    "ring_bytes": "byte capacity of each ingest's ring, a power of two (default 8 MiB)",
    "max_frame_bytes": "largest frame or JSON line accepted (default 64 KiB)",
    "max_in_flight_per_connection": "unanswered intents per connection before reading pauses",
    "max_connections": "open connections per ingest process",
    "worker_rss_limit_mb": "a worker above this resident memory is drained and restarted",
    "drain_timeout_s": "how long a stop may take before workers are killed (default 5)",
    "socket": "Unix socket path clients connect to (default: <data_dir>/engine.sock)",
    "socket_mode": "permissions of the socket file (default 0o600: only this user)",
    "data_dir": "directory of the embedded PostgreSQL and default files",
    "dsn": "libpq connection string of an external PostgreSQL >= 14 (default: embedded)",
    "handlers": "handler registry as package.module:ATTRIBUTE (default engine.handlers:BUILTIN)",
    "apply_state": "apply handlers' state changes (false: log intents only)",
    "notify_batches": "NOTIFY batchscheduler_batches after each batch (for event-bus listeners)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text (readable lines) or json (one object per line, for log shippers)",
    "stats_interval_s": "log one INFO stats line (committed/s, p50/p99, batch average, ring fill, breaker) this "
    "often; 0: never",
    "alert_error_rate": "alert when the dead-lettered fraction over alert_error_rate_for_s exceeds this (seed: 0.01)",
    "alert_error_rate_for_s": "the error-rate alert's window in seconds (seed: 300)",
    "alert_latency_p95_ms": "alert when p95 received->committed latency over alert_latency_for_s exceeds this "
    "(seed: 50)",
    "alert_latency_for_s": "the latency alert's window in seconds (seed: 600)",
    "alert_flush_failures": "alert when a lane's consecutive failed batch writes exceed this (seed: 3)",
    "alert_memory_ratio": "alert when a worker's RSS exceeds this fraction of worker_rss_limit_mb (seed: 0.8)",
    "metrics_addr": "HOST:PORT of the /metrics and /health HTTP endpoints (loopback; port 0: any free one), or off",
}
