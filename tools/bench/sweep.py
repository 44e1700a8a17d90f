"""The seed's "Batch Size Analysis", end to end through the engine.

One engine (``BatchScheduler`` in this process, workers and the embedded
PostgreSQL as children) serves every size: between runs the size limit is
changed with ``configure(max_batch_size=n)``, at run time, as a user would.
Each run is the same closed-loop MUD load (``tools.loadgen``).

The seed's efficiency model E(n) = n·C_ind / (C_batch + n·C_op) says the
cost per intent at batch size n is C_batch/n + C_op. So 1/throughput(n) is
linear in 1/n; a least-squares line through the measurements gives C_batch
(intercept with 1/n, seconds per batch) and C_op (seconds per intent), and
C_ind is the measured cost at n = 1. The fit error is the RMS relative error
of the predicted throughput.

A size-limited batch can only fill when at least that many intents are in
flight: the load keeps ``connections x in_flight`` in flight, so any size
above that is cut by the time window every time, and its figure measures the
window, not the size. The tool says so (stderr, the table, the JSON) rather
than reporting such a size as an optimum.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from engine.scheduler import BatchScheduler

from .. import loadgen
from . import args as cli_args

SEED_SIZES = (1, 73, 127, 251, 509, 617, 857, 991)
# The seed's measured table, for the side-by-side column.
SEED_TABLE = {73: 17_380, 127: 17_674, 251: 23_622, 509: 24_730, 617: 24_890, 857: 25_336, 991: 24_692}
SEED_OPTIMUM = 857
SEED_BASELINE = 25_336  # the seed's best figure: its "relative" column is against it
# The engine's bounds on max_batch_size and time_window_ms (engine.options).
MAX_SIZE = 100_000
MAX_WINDOW_MS = 60_000.0


@dataclasses.dataclass
class SweepPoint:
    size: int
    throughput: float
    p50_ms: float
    p99_ms: float
    batch_mean: float
    lost: int


def fit(points: list[SweepPoint]) -> dict:
    """Least-squares fit of 1/throughput = C_batch·(1/n) + C_op."""
    n = np.array([p.size for p in points], dtype=float)
    thr = np.array([p.throughput for p in points], dtype=float)
    ok = thr > 0
    n, thr = n[ok], thr[ok]
    if len(n) < 2:
        return {}
    A = np.vstack([1 / n, np.ones_like(n)]).T
    (c_batch, c_op), *_ = np.linalg.lstsq(A, 1 / thr, rcond=None)
    predicted = 1 / (c_batch / n + c_op)
    rms = float(np.sqrt(np.mean(((predicted - thr) / thr) ** 2)))
    c_ind = float(1 / thr[n == 1][0]) if (n == 1).any() else float(c_batch + c_op)
    return {
        "c_ind_us": c_ind * 1e6,
        "c_batch_us": float(c_batch) * 1e6,
        "c_op_us": float(c_op) * 1e6,
        # In the seed's units (C_ind = 3 round trips):
        "c_batch_rt": float(c_batch / c_ind * 3),
        "c_op_rt": float(c_op / c_ind * 3),
        "rms_relative_error": rms,
        "predicted": {int(k): float(v) for k, v in zip(n, predicted)},
    }


def unfillable(sizes: Sequence[int], connections: int, in_flight: int) -> list[int]:
    """The sizes a batch can never reach with ``connections x in_flight``
    intents in flight: every such batch is cut by the time window."""
    return [n for n in sizes if n > connections * in_flight]


def run(
    sizes=SEED_SIZES,
    *,
    connections: int = 8,
    in_flight: int = 256,
    duration: float = 4.0,
    entities: int = 10_000,
    window_ms: float = 10.0,
    dsn: str | None = None,
    progress=None,
) -> dict:
    tmp = tempfile.mkdtemp(prefix="bs-sweep-")
    scheduler = None
    points = []
    try:
        scheduler = BatchScheduler(
            socket=os.path.join(tmp, "e.sock"),
            data_dir=os.path.join(tmp, "var"),
            dsn=dsn,
            time_window_ms=window_ms,
            max_batch_size=max(sizes),
            log_level="WARNING",
        )
        scheduler.start()
        loadgen.spawn_entities(scheduler.socket_path, entities)
        for size in sizes:
            scheduler.configure(max_batch_size=size)
            plan = loadgen.Plan(
                socket=scheduler.socket_path,
                connections=connections,
                in_flight=in_flight,
                duration=duration,
                entities=entities,
                seed=size,
            )
            result = loadgen.run(plan, progress=progress)
            stats = loadgen.batch_stats(scheduler.dsn, *result["window"])
            points.append(
                SweepPoint(
                    size,
                    result["throughput"],
                    result["latency_ms"]["p50"],
                    result["latency_ms"]["p99"],
                    stats.get("size_mean", 0.0),
                    result["lost"],
                )
            )
    finally:
        if scheduler is not None:
            scheduler.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(points, key=lambda p: p.throughput)
    never_full = unfillable(sizes, connections, in_flight)
    return {
        "points": [dataclasses.asdict(p) for p in points],
        "optimum": best.size,
        "optimum_fillable": best.size not in never_full,
        "in_flight_total": connections * in_flight,
        "unfillable_sizes": never_full,
        "fit": fit(points),
        "seed_table": SEED_TABLE,
    }


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli_args.prog("bench_sweep"),
        description="Run the same closed-loop MUD load through one engine at each batch size (changed at run "
        "time with BatchScheduler.configure), print throughput, relative efficiency, p50/p99 "
        "reply latency beside the seed's table, find the optimum on this machine, and fit the seed's "
        "E(n) = n*C_ind / (C_batch + n*C_op). The engine (embedded PostgreSQL in a temp dir unless --dsn) "
        "is started and stopped by the tool.",
        epilog="A batch can only fill to size n when at least n intents are in flight: keep "
        "--connections x --in-flight at or above the largest size, or the sizes above it are all cut "
        "by the time window (the tool warns and marks them). Exit 0 when every size ran and nothing was "
        "lost; 1 when an intent got no reply; 2 on bad arguments or when the engine could not start.",
        formatter_class=cli_args.HelpFormatter,
    )
    p.add_argument(
        "--sizes",
        type=cli_args.int_list(1, MAX_SIZE),
        default=list(SEED_SIZES),
        metavar="N[,N…]",
        help=f"comma-separated max batch sizes, 1 to {MAX_SIZE} (default: the seed's, plus 1: "
        f"{','.join(map(str, SEED_SIZES))})",
    )
    p.add_argument(
        "--connections",
        type=cli_args.int_at_least(1, loadgen.MAX_CONNECTIONS),
        default=8,
        help="Python client processes, one connection each",
    )
    p.add_argument(
        "--in-flight",
        type=cli_args.int_at_least(1, loadgen.MAX_IN_FLIGHT),
        default=256,
        help="intents each connection keeps in flight (closed loop)",
    )
    p.add_argument("--duration", type=cli_args.positive_float, default=4.0, help="seconds of load per size")
    p.add_argument(
        "--entities",
        type=cli_args.positive_int,
        default=10_000,
        help="entities spawned before the load; the intents pick among them at random",
    )
    p.add_argument(
        "--window-ms",
        type=cli_args.positive_float,
        default=10.0,
        help=f"the engine's time window (time_window_ms, at most {MAX_WINDOW_MS:g})",
    )
    p.add_argument(
        "--dsn",
        type=cli_args.dsn,
        help="external PostgreSQL for the engine (default: an embedded one in a temp dir)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        type=cli_args.output_file,
        help="also write the figures, the fit and the arguments as JSON to FILE ('-': stdout)",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        type=cli_args.output_dir,
        help=f"write DIR/sweep.png (needs matplotlib: {cli_args.PLOT_HINT})",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.window_ms > MAX_WINDOW_MS:
        p.error(f"argument --window-ms: must be at most {MAX_WINDOW_MS:g}, got {args.window_ms:g}")
    if args.plot:
        cli_args.require_matplotlib(p)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from engine.errors import ClientError, ConfigError, StartupError

    from . import report

    args = parse_args(argv)
    prog = cli_args.prog("bench_sweep")
    never_full = unfillable(args.sizes, args.connections, args.in_flight)
    if never_full:
        print(
            f"{prog}: warning: --connections {args.connections} x --in-flight {args.in_flight} = "
            f"{args.connections * args.in_flight} intents in flight, fewer than the batch size(s) "
            f"{', '.join(map(str, never_full))}: those batches can never fill and are all cut by the "
            f"{args.window_ms:g} ms window, so their figures measure the window, not the size. Raise "
            f"--connections or --in-flight to at least {max(never_full)} to measure them.",
            file=sys.stderr,
        )
    machine = report.machine(report.embedded_pg_version())
    print(report.machine_line(machine))
    try:
        result = run(
            args.sizes,
            connections=args.connections,
            in_flight=args.in_flight,
            duration=args.duration,
            entities=args.entities,
            window_ms=args.window_ms,
            dsn=args.dsn,
        )
    except (StartupError, ConfigError) as exc:
        print(f"{prog}: the engine could not start: {exc}", file=sys.stderr)
        return 2
    except (ClientError, loadgen.ClientFailed) as exc:
        print(f"{prog}: the load could not run: {exc}", file=sys.stderr)
        return 2
    best = max(pt["throughput"] for pt in result["points"]) or 1
    fit_ = result["fit"]
    rows = []
    for pt in result["points"]:
        seed = SEED_TABLE.get(pt["size"])
        rows.append(
            [
                f"{pt['size']}*" if pt["size"] in never_full else pt["size"],
                f"{pt['throughput']:,.0f}",
                f"{pt['throughput'] / best:.1%}",
                f"{fit_.get('predicted', {}).get(pt['size'], 0):,.0f}",
                f"{pt['p50_ms']:.1f}",
                f"{pt['p99_ms']:.1f}",
                f"{pt['batch_mean']:.0f}",
                pt["lost"],
                f"{seed:,}" if seed else "-",
                f"{seed / SEED_BASELINE:.1%}" if seed else "-",
            ]
        )
    print(
        report.table(
            [
                "batch size",
                "intents/s",
                "relative",
                "E(n) fit",
                "p50 ms",
                "p99 ms",
                "batch avg",
                "lost",
                "seed ops/s",
                "seed rel.",
            ],
            rows,
        )
    )
    if never_full:
        print(
            f"* can never fill: only {result['in_flight_total']} intents in flight "
            f"(--connections x --in-flight); cut by the time window"
        )
    optimum = result["optimum"]
    if result["optimum_fillable"]:
        print(f"optimum on this machine: {optimum} (seed: {SEED_OPTIMUM})")
    else:
        print(
            f"optimum on this machine: none measured: the best figure, at {optimum}, is a size no batch could "
            f"reach with {result['in_flight_total']} intents in flight (seed: {SEED_OPTIMUM})"
        )
    if fit_:
        print(
            f"fit: C_ind={fit_['c_ind_us']:.1f} us, C_batch={fit_['c_batch_us']:.1f} us, "
            f"C_op={fit_['c_op_us']:.2f} us per intent; in the seed's units (C_ind = 3 round trips): "
            f"C_batch={fit_['c_batch_rt']:.2f}, C_op={fit_['c_op_rt']:.4f}; "
            f"RMS relative error {fit_['rms_relative_error']:.1%}"
        )
    if args.json:
        report.write_json(args.json, {"machine": machine, "args": vars(args), **result})
        if args.json != "-":
            print(f"wrote {args.json}")
    if args.plot:
        from .. import plots

        print(f"wrote {plots.sweep_plot(result, args.plot)}")
    return 1 if any(pt["lost"] for pt in result["points"]) else 0
