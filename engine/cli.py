"""Command line of ``tools/run_engine``: flags are generated from ``Options``,
so flags, the TOML file and environment variables always name the same
options."""

from __future__ import annotations

import argparse
import os
import sys

from engine import logs
from engine import options as opts
from engine.errors import ConfigError, StartupError
from engine.options import FIELDS, HELP, PRESETS


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    defaults = opts.Options()
    # The installed entry point (batchscheduler-engine) goes by its own name.
    invoked = os.path.basename(sys.argv[0] if sys.argv else "")
    parser = argparse.ArgumentParser(
        prog=invoked if invoked.startswith("batchscheduler-") else "tools/run_engine",
        description="Run the BatchScheduler engine in the foreground: embedded PostgreSQL (or --dsn), "
        "supervisor, flusher and ingest processes. Prints the socket path, the DSN and a "
        "'ready' line; SIGTERM or Ctrl-C drains (stop accepting, flush, reply) and exits 0.",
        epilog="Every option can also come from a TOML file (--config; top-level keys or an [engine] "
        "table) or an environment variable BATCHSCHEDULER_<OPTION> (e.g. "
        "BATCHSCHEDULER_TIME_WINDOW_MS=5). Precedence: defaults < preset < file < environment < flags. "
        f"Presets (from the seed): {'; '.join(f'{k}: {v}' for k, v in PRESETS.items())}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file of options")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from one of the seed's presets")
    for name, typ in FIELDS.items():
        default = getattr(defaults, name)
        shown = oct(default) if name == "socket_mode" else default
        text = HELP.get(name, "")
        # Once: not where the help text states its default already ("(default 5)").
        if "(default" not in text and default is not None:
            text = f"{text} (default: {shown})"
        kwargs = {"dest": name, "default": None, "help": text}
        if typ in (bool, "bool"):
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(_flag(name), metavar=name.upper(), type=str, **kwargs)
    parser.set_defaults()
    # ArgumentDefaultsHelpFormatter would print "(default: None)": defaults live in the help text.
    parser.formatter_class = argparse.HelpFormatter
    return parser


def parse_options(argv: list[str] | None = None) -> opts.Options:
    args = build_parser().parse_args(argv)
    flags = {}
    for name in FIELDS:
        value = getattr(args, name)
        if value is None:
            continue
        flags[name] = value if isinstance(value, bool) else opts.parse_text(name, value, source=f"flag {_flag(name)}")
    return opts.resolve(config_file=args.config, preset_name=args.preset, flags=flags)


def run_engine_main(argv: list[str] | None = None) -> int:
    try:
        options = parse_options(argv)
    except ConfigError as exc:
        _say(sys.stderr, f"run_engine: configuration error: {exc}")
        return 2
    logs.configure(options.log_level, options.log_format, "batchscheduler: supervisor")
    from setproctitle import setproctitle

    from engine.supervisor import Supervisor

    setproctitle("batchscheduler: supervisor")
    supervisor = Supervisor(options)
    supervisor.install_signal_handlers()
    try:
        supervisor.start()
    except (StartupError, ConfigError, OSError) as exc:
        _say(sys.stderr, f"run_engine: cannot start: {exc}")
        return 1
    # The CLI's product on stdout (what a wrapper script parses); diagnostics
    # go through logging to stderr.
    _say(sys.stdout, f"socket: {supervisor.socket_path}")
    _say(sys.stdout, f"dsn: {supervisor._safe_dsn()}")
    if supervisor.observability is not None:
        _say(sys.stdout, f"metrics: {supervisor.observability.url}/metrics")
        _say(sys.stdout, f"health: {supervisor.observability.url}/health")
    _say(
        sys.stdout,
        f"ready (pid {os.getpid()}, {options.ingests} ingest(s), "
        f"window {options.time_window_ms:g} ms, max batch {options.max_batch_size})",
    )
    return supervisor.run()


def _say(stream, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()
