"""Load generation against a running engine: the code behind ``tools/load_gen``.

Python client processes, one connection each (msgpack framing), send a MUD intent
mix either open-loop at a total Poisson rate λ (the seed's arrival model:
exponential gaps, the sender sleeps until the next arrival, never spins) or
closed-loop with a fixed number in flight per connection. Every reply's
latency (send to reply) is recorded; at the end the engine's ``batches`` table
gives the batch size distribution and the time/size trigger ratio, and psutil
samples give CPU% and RSS per role (supervisor, each ingest, each flusher
lane, PostgreSQL) of the engine under load -- its process tree only: the
supervisor the tool spawned, the one named by ``--pid``, or the one that
owns ``--socket`` -- never another engine's or another PostgreSQL's.

``lost`` counts intents sent without any reply by the end of the grace
period: it must be 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing as mp
import os
import random
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import psutil

from engine.intent import Intent, Reply
from ipc import wire
from ipc.lifetime import signal_on_parent_death
from persistence.migrations import SCHEMA

from .bench import args as cli_args

ROOT = Path(__file__).resolve().parent.parent

# Bounds of the load's shape: one process per connection (the engine takes
# 4096 connections per ingest by default), and every intent in flight is
# built in memory at once.
MAX_CONNECTIONS = 4096
MAX_IN_FLIGHT = 100_000

# The MUD mix: 70% move, 10% say, 10% damage/heal, 10% pick_up/drop.
MIX = (("move", 0.70), ("say", 0.10), ("damage", 0.05), ("heal", 0.05), ("pick_up", 0.05), ("drop", 0.05))


def make_args(kind: str, rng: random.Random) -> dict:
    if kind == "move":
        return {"dx": rng.randint(-1, 1), "dy": rng.randint(-1, 1)}
    if kind == "say":
        return {"text": "hail, traveller"}
    if kind in ("damage", "heal"):
        return {"amount": rng.randint(1, 10)}
    return {"item": rng.choice(("torch", "rope", "coin"))}


@dataclasses.dataclass
class Plan:
    socket: str
    connections: int = 8
    rate: float | None = None  # total intents/s (open loop); None = closed loop
    in_flight: int = 256  # closed loop: per connection
    duration: float = 10.0
    count: int | None = None  # total intents (overrides duration when set)
    entities: int = 10_000
    mix: tuple = MIX
    seed: int = 1
    grace: float = 30.0  # wait this long for the last replies


def _client(index: int, plan: Plan, start_at: float, out) -> None:
    """One client process: its own connection, its own share of the load."""
    rng = random.Random(plan.seed * 1000 + index)
    enc = msgspec.msgpack.Encoder()
    replies = wire.ReplyReader(
        wire.MODE_MSGPACK, msgspec.msgpack.Decoder(Reply).decode, msgspec.json.Decoder(Reply).decode
    )
    kinds = [k for k, _ in plan.mix]
    weights = [w for _, w in plan.mix]
    client_id = f"load-{os.getpid()}-{index}"
    quota = None if plan.count is None else plan.count // plan.connections + (index < plan.count % plan.connections)
    rate = None if plan.rate is None else plan.rate / plan.connections
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(plan.socket)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    outbox = bytearray()
    seq = 0
    while time.time() < start_at:
        time.sleep(min(0.05, start_at - time.time()))
    t0 = time.monotonic()
    end = t0 + plan.duration
    next_at = t0
    done_sending = False

    def frames(n: int, now: float) -> None:
        nonlocal seq
        for _ in range(n):
            kind = rng.choices(kinds, weights)[0]
            entity = f"mob-{rng.randrange(plan.entities)}"
            outbox.extend(wire.frame_msgpack(enc.encode(Intent(client_id, seq, entity, kind, make_args(kind, rng)))))
            sent_at[seq] = now
            seq += 1

    while True:
        now = time.monotonic()
        if not done_sending:
            if (quota is not None and seq >= quota) or (quota is None and now >= end):
                done_sending = True
                grace_end = now + plan.grace
            elif rate is None:
                room = plan.in_flight - len(sent_at)
                if room > 0:
                    frames(min(room, (quota - seq) if quota is not None else room), now)
            else:
                due = 0
                while next_at <= now and (quota is None or seq + due < quota):
                    due += 1
                    next_at += rng.expovariate(rate)
                if due:
                    frames(due, now)
        if outbox:
            try:
                n = sock.send(outbox)
                del outbox[:n]
            except BlockingIOError:
                pass
        if done_sending and not sent_at:
            break
        if done_sending and now > grace_end:
            break
        if outbox:
            sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        else:
            sel.modify(sock, selectors.EVENT_READ)
        if done_sending or rate is None:
            timeout = 0.2
        else:
            timeout = max(0.0, next_at - time.monotonic())
        for _key, events in sel.select(timeout):
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                continue
            if not data:
                done_sending = True
                grace_end = 0
                break
            recv_now = time.monotonic()
            for reply in replies.feed(data):
                start = sent_at.pop(reply.seq, None)
                if start is not None:
                    latencies.append(recv_now - start)
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1
    sock.close()
    out.send(
        {
            "sent": seq,
            "lost": len(sent_at),
            "statuses": statuses,
            "latencies": np.asarray(latencies, dtype=np.float64).tobytes(),
            "elapsed": time.monotonic() - t0,
        }
    )
    out.close()


POSTGRES_ROLE = "postgres (all)"  # the postmaster and every backend, summed


class EngineNotFound(LookupError):
    """The engine behind a socket or PID could not be identified."""


def engine_root(socket_path: str | None = None, pid: int | None = None) -> int:
    """The PID of the engine's root process (its supervisor): ``pid`` checked
    to be alive, or the supervisor of the engine listening on ``socket_path``.

    The kernel records who listens on a Unix socket: ``SO_PEERCRED`` on a
    connection to it names the process that last called ``listen()`` on it
    (an ingest, which serves the socket the supervisor created). The
    supervisor is that process's parent; a process not titled
    ``batchscheduler: ingest N`` (an engine embedded in another program, say)
    is taken as the root itself."""
    if pid is not None:
        try:
            psutil.Process(pid)
        except psutil.Error as exc:
            raise EngineNotFound(f"no process with PID {pid} ({exc})") from None
        return pid
    if socket_path is None:
        raise EngineNotFound("neither a socket nor a PID names the engine")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(socket_path)
            peer, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError as exc:
        raise EngineNotFound(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
    if peer <= 0:  # another PID namespace
        raise EngineNotFound(f"the process listening on {socket_path} is not visible here (another PID namespace?)")
    try:
        proc = psutil.Process(peer)
        if _role(proc).startswith("ingest "):
            parent = proc.parent()
            if parent is not None:
                return parent.pid
        return peer
    except psutil.Error as exc:
        raise EngineNotFound(f"cannot inspect process {peer} listening on {socket_path}: {exc}") from None


def _role(proc: psutil.Process, root_pid: int | None = None) -> str:
    """``supervisor``, ``ingest 0``, ``flusher 1``, ``postgres (all)``, or
    ``other: NAME`` for anything else in the tree."""
    title = " ".join(proc.cmdline()).strip()
    if title.startswith("batchscheduler: "):
        return title.split(" ", 1)[1].strip()
    if proc.name() == "postgres" or title.startswith("postgres"):
        return POSTGRES_ROLE
    if proc.pid == root_pid:
        return "supervisor"
    return f"other: {proc.name()}"


def role_order(role: str) -> tuple:
    """Supervisor, ingests, flusher lanes (numerically), PostgreSQL, others."""
    name, _, num = role.partition(" ")
    rank = {"supervisor": 0, "ingest": 1, "flusher": 2, "postgres": 3}.get(name, 4)
    return (rank, int(num) if num.isdigit() else 0, role)


class Sampler(threading.Thread):
    """Samples CPU% and RSS of one engine's process tree -- the root PID and
    its descendants: supervisor, ingests, flusher lanes and, when embedded,
    PostgreSQL -- per role, and the engine's committed-intents counter (the
    ``metrics`` request on its socket) for throughput over time. One sample
    is taken at start, one every ``interval`` and one at stop, so even a
    short run has a reading (the first CPU reading of a process is 0)."""

    def __init__(self, engine_pid: int, interval: float = 0.5, socket_path: str | None = None) -> None:
        super().__init__(daemon=True)
        self.engine_pid = engine_pid
        self.socket_path = socket_path
        self.interval = interval
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()
        # Keyed by (pid, start time): a reused PID is another process.
        self._procs: dict[tuple[int, float], psutil.Process] = {}

    def _targets(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.engine_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> dict:
        """Take one sample now (and keep it)."""
        sample: dict = {"t": round(time.monotonic() - self._t0, 3), "procs": {}, "committed": self._committed()}
        for proc in self._targets():
            try:
                cached = self._procs.setdefault((proc.pid, proc.create_time()), proc)
                role = _role(cached, self.engine_pid)
                cpu = cached.cpu_percent(None)
                rss = cached.memory_info().rss / 2**20
            except psutil.Error:
                continue
            entry = sample["procs"].setdefault(role, {"cpu": 0.0, "rss_mb": 0.0, "pids": []})
            entry["cpu"] += cpu
            entry["rss_mb"] += rss
            entry["pids"].append(proc.pid)
        self.samples.append(sample)
        return sample

    def start(self) -> None:
        self._t0 = time.monotonic()
        self.sample()
        super().start()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def _committed(self) -> int | None:
        if not self.socket_path:
            return None
        from engine.client import control
        from engine.errors import ClientError

        try:
            return int(control(self.socket_path, "metrics", timeout=2)["flusher"]["committed"])
        except (OSError, ClientError, ValueError, KeyError, TypeError, msgspec.DecodeError):
            return None

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()

    def peaks(self) -> dict:
        out: dict[str, dict] = {}
        for sample in self.samples[1:]:  # the first cpu_percent reading is meaningless
            for role, v in sample["procs"].items():
                peak = out.setdefault(role, {"cpu_peak": 0.0, "rss_peak_mb": 0.0, "processes": 0})
                peak["cpu_peak"] = max(peak["cpu_peak"], round(v["cpu"], 1))
                peak["rss_peak_mb"] = max(peak["rss_peak_mb"], round(v["rss_mb"], 1))
                peak["processes"] = max(peak["processes"], len(v.get("pids", ())))
        return dict(sorted(out.items(), key=lambda kv: role_order(kv[0])))


def spawn_entities(socket_path: str, entities: int) -> None:
    """Create the entities the mix acts on (not measured)."""
    from engine.client import Client

    with Client(socket_path, client_id=f"setup-{os.getpid()}", first_seq=1, timeout=120) as client:
        intents = [
            client.intent(f"mob-{i}", "spawn", {"state": {"hp": 100, "pos": {"x": 0, "y": 0}}}) for i in range(entities)
        ]
        for start in range(0, len(intents), 4096):
            replies = client.submit_many(intents[start : start + 4096], window=4096)
            bad = [r for r in replies if r.status not in ("committed", "dead_lettered")]
            if bad:
                raise RuntimeError(f"setup failed: {bad[0]}")


def run(plan: Plan, *, progress=None) -> dict:
    """Run the load; returns the client-side results."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    start_at = time.time() + 1.0 + 0.1 * plan.connections
    for i in range(plan.connections):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client, args=(i, plan, start_at, send), daemon=True)
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    wall0 = time.time()
    results = []
    failed = []
    for i, recv in enumerate(pipes):
        while not recv.poll(0.5):
            if progress is not None:
                progress()
        try:
            results.append(recv.recv())
        except EOFError:  # the client died before reporting (its traceback is on stderr)
            procs[i].join(10)
            failed.append(f"client {i} exited with {procs[i].exitcode}")
        recv.close()
    for proc in procs:
        proc.join(10)
    if failed:
        raise ClientFailed("; ".join(failed))
    wall1 = time.time()
    lat = np.concatenate([np.frombuffer(r["latencies"], dtype=np.float64) for r in results]) if results else np.zeros(0)
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    elapsed = max(r["elapsed"] for r in results)
    replied = int(lat.size)
    pct = (lambda q: float(np.percentile(lat, q) * 1000)) if lat.size else (lambda q: float("nan"))
    return {
        "sent": sum(r["sent"] for r in results),
        "replied": replied,
        "committed": statuses.get("committed", 0),
        "dead_lettered": statuses.get("dead_lettered", 0),
        "rejected": statuses.get("rejected", 0),
        "busy": statuses.get("busy", 0),
        "lost": sum(r["lost"] for r in results),
        "elapsed_s": round(elapsed, 3),
        "throughput": round(statuses.get("committed", 0) / elapsed, 1),
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "p99.9": pct(99.9),
            "max": float(lat.max() * 1000) if lat.size else float("nan"),
        },
        "window": [max(start_at, wall0), wall1],
        "latencies_ms_sample": (np.sort(lat)[:: max(1, lat.size // 2000)] * 1000).round(3).tolist(),
    }


class ClientFailed(RuntimeError):
    """A load client process died (it could not connect, say)."""


def batch_stats(dsn: str, since: float, until: float) -> dict:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT size, cut_reason FROM {SCHEMA}.batches "
            "WHERE committed_at >= to_timestamp(%s) AND committed_at <= to_timestamp(%s)",
            (since, until + 5),
        ).fetchall()
    if not rows:
        return {"batches": 0}
    sizes = np.array([r[0] for r in rows])
    reasons: dict[str, int] = {}
    for _, reason in rows:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "batches": len(rows),
        "size_mean": round(float(sizes.mean()), 1),
        "size_p50": int(np.percentile(sizes, 50)),
        "size_p99": int(np.percentile(sizes, 99)),
        "size_max": int(sizes.max()),
        "trigger_ratio": {k: round(v / len(rows), 4) for k, v in sorted(reasons.items())},
        "histogram": _histogram(sizes),
    }


def _histogram(sizes: np.ndarray) -> dict:
    edges = [1, 2, 11, 51, 101, 251, 501, 857, 858, 10**9]
    labels = ["1", "2-10", "11-50", "51-100", "101-250", "251-500", "501-856", "857", ">857"]
    counts, _ = np.histogram(sizes, bins=edges)
    return {label: int(c) for label, c in zip(labels, counts) if c}


def run_engine_command() -> list[str]:
    """How to start the engine: the checkout's ``tools/run_engine``, or the
    installed package's entry point when there is no checkout."""
    script = ROOT / "tools" / "run_engine"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from engine.cli import run_engine_main; sys.exit(run_engine_main())"]


class SpawnedEngine:
    """``tools/run_engine`` in a temp dir with the embedded PostgreSQL (or --dsn).
    Raises ``StartupError`` (with the engine's log) when it does not start."""

    def __init__(self, flags: list[str], dsn: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bs-load-"))
        self.socket = str(self.dir / "e.sock")
        cmd = [
            *run_engine_command(),
            # Any free port: the engine under test must not collide with another.
            *([] if "--metrics-addr" in flags else ["--metrics-addr", "127.0.0.1:0"]),
            "--socket",
            self.socket,
            "--data-dir",
            str(self.dir / "var"),
            "--log-level",
            "WARNING",
            *flags,
        ]
        if dsn:
            cmd += ["--dsn", dsn]
        self.log = open(self.dir / "engine.log", "wb")  # noqa: SIM115 - held open for the engine's lifetime, closed in stop()
        # If this tool dies, the engine gets SIGTERM and drains (no orphan).
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            preexec_fn=functools.partial(signal_on_parent_death, signal.SIGTERM),  # noqa: PLW1509 - one prctl() call, takes no lock
        )
        self.dsn = dsn
        self.metrics_url: str | None = None  # its "metrics:" line; None with --metrics-addr off
        for line in self.proc.stdout:
            if line.startswith("dsn: ") and not dsn:
                self.dsn = line[5:].strip()
            if line.startswith("metrics: "):
                self.metrics_url = line[9:].strip()
            if line.startswith("ready"):
                break
        else:
            code = self.stop(keep_log=True)
            text = (self.dir / "engine.log").read_text(errors="replace").strip()
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            from engine.errors import StartupError

            raise StartupError(f"engine exited {code} before it was ready:\n{text[-2000:]}")

    def stop(self, keep_log: bool = False) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        if not keep_log:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
        return code


# ---------------------------------------------------------------------- CLI
# Flags load_gen sets on the engines it spawns: a variant must not move them.
RESERVED_ENGINE_FLAGS = ("--socket", "--data-dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli_args.prog("load_gen"),
        description="Load an engine with Python client processes (one connection each), open-loop Poisson at a "
        "total rate (--rate) or closed-loop (--in-flight per connection). Prints sent, committed, "
        "dead-lettered, rejected, lost (must be 0), throughput, latency percentiles, batch size "
        "distribution and trigger ratio (from the engine's batches table), and CPU and RSS peaks per "
        "role of that engine's processes only (supervisor, ingests, flusher lanes, its embedded PostgreSQL).",
        epilog="Compare engine configurations in one run with --spawn-engine and several --variant "
        "'NAME=FLAGS', e.g. --variant 'batched=' --variant 'one-per-tx=--max-batch-size 1': each "
        "variant gets a fresh engine and the same load; ratios are against the first variant. "
        "Exit 0 when every intent got a reply; 1 when some were lost; 2 on bad arguments or when the "
        "load could not run (no engine, a client could not connect).",
        formatter_class=cli_args.HelpFormatter,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--socket",
        help="socket of a running engine; the CPU/RSS figures are of the engine listening on it",
    )
    target.add_argument(
        "--spawn-engine",
        action="store_true",
        help="start tools/run_engine (embedded PostgreSQL in a temp dir) for each variant",
    )
    p.add_argument(
        "--pid",
        type=cli_args.positive_int,
        help="with --socket: the PID of the engine's supervisor, whose process tree is sampled "
        "(default: found from the socket)",
    )
    p.add_argument(
        "--dsn",
        type=cli_args.dsn,
        help="the engine's database, for batch statistics (with --socket), or an external database for spawned engines",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="a spawned engine configuration (repeatable); FLAGS are tools/run_engine flags "
        "(not --socket or --data-dir: load_gen sets those)",
    )
    p.add_argument(
        "--connections",
        "-c",
        type=cli_args.int_at_least(1, MAX_CONNECTIONS),
        default=8,
        help="Python client processes, one connection each",
    )
    p.add_argument(
        "--rate",
        type=cli_args.positive_float,
        help="open loop: total Poisson arrival rate, intents/s (default: closed loop)",
    )
    p.add_argument(
        "--in-flight",
        type=cli_args.int_at_least(1, MAX_IN_FLIGHT),
        default=256,
        help="closed loop: intents in flight per connection",
    )
    p.add_argument("--duration", type=cli_args.positive_float, default=10.0, help="seconds of load")
    p.add_argument("--count", type=cli_args.positive_int, help="total intents instead of a duration")
    p.add_argument("--entities", type=cli_args.positive_int, default=10_000, help="entities spawned before the load")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the clients' random choices (intent kinds, entities, arguments, Poisson gaps): "
        "the same seed sends the same intents",
    )
    p.add_argument(
        "--json", metavar="FILE", type=cli_args.output_file, help="write all results as JSON to FILE ('-': stdout)"
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        type=cli_args.output_dir,
        help=f"write latency CDF, throughput and RSS-over-time PNGs to DIR (needs matplotlib: {cli_args.PLOT_HINT})",
    )
    return p


def _check_engine_flags(flags: list[str]) -> str | None:
    """Why ``tools/run_engine`` would refuse ``flags``, or None."""
    import contextlib
    import io

    from engine.cli import parse_options
    from engine.errors import ConfigError

    for flag in flags:
        if any(flag == r or flag.startswith(r + "=") for r in RESERVED_ENGINE_FLAGS):
            return f"{flag.split('=', 1)[0]} is set by load_gen for each spawned engine"
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parse_options(flags)
    except SystemExit:
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        return lines[-1].split("error: ", 1)[-1] if lines else "tools/run_engine refuses these flags"
    except ConfigError as exc:
        return str(exc)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot:  # before anything slow: a missing matplotlib must not cost a run
        cli_args.require_matplotlib(p)
    if args.socket and args.variant:
        p.error("argument --variant: needs --spawn-engine")
    if args.pid is not None and not args.socket:
        p.error("argument --pid: needs --socket (a spawned engine's PID is known)")
    variants = []
    for v in args.variant or ["default="]:
        name, _, text = v.partition("=")
        try:
            flags = shlex.split(text)
        except ValueError as exc:
            p.error(f"argument --variant: {v!r}: {exc}")
        why = _check_engine_flags(flags)
        if why:
            p.error(f"argument --variant: {v!r}: {why}")
        variants.append((name or "default", flags))
    args.variants = variants
    if args.socket:
        import stat

        try:
            is_socket = stat.S_ISSOCK(os.stat(args.socket).st_mode)
        except OSError as exc:
            p.error(f"argument --socket: {args.socket}: {exc.strerror} (is the engine running?)")
        if not is_socket:
            p.error(f"argument --socket: {args.socket} is not a socket")
        try:
            args.engine_pid = engine_root(args.socket, args.pid)
        except EngineNotFound as exc:
            p.error(f"argument {'--pid' if args.pid is not None else '--socket'}: {exc}")
    if args.dsn:
        import psycopg

        try:
            psycopg.connect(args.dsn, connect_timeout=10).close()
        except psycopg.Error as exc:
            p.error(f"argument --dsn: cannot connect: {str(exc).strip()}")
    return args


def _tick(name: str, t0: float) -> None:
    print(f"\r[{name}] {time.monotonic() - t0:5.1f}s", end="", file=sys.stderr, flush=True)


def render(results: list[dict]) -> str:
    """The table and the per-role peaks."""
    from .bench import report

    base = results[0]["throughput"] or 1
    rows = []
    for r in results:
        lat = r["latency_ms"]
        b = r.get("batches", {})
        rows.append(
            [
                r["variant"],
                r["sent"],
                r["committed"],
                r["dead_lettered"],
                r["rejected"] + r["busy"],
                r["lost"],
                f"{r['throughput']:,.0f}",
                f"{r['throughput'] / base:.2f}x",
                f"{lat['p50']:.1f}",
                f"{lat['p90']:.1f}",
                f"{lat['p99']:.1f}",
                f"{lat['p99.9']:.1f}",
                f"{lat['max']:.1f}",
                b.get("size_mean", "-"),
                " ".join(f"{k}:{v:.0%}" for k, v in b.get("trigger_ratio", {}).items()) or "-",
            ]
        )
    lines = [
        report.table(
            [
                "variant",
                "sent",
                "committed",
                "dead",
                "rej/busy",
                "lost",
                "intents/s",
                "ratio",
                "p50 ms",
                "p90",
                "p99",
                "p99.9",
                "max",
                "batch avg",
                "cut",
            ],
            rows,
        )
    ]
    for r in results:
        res = "  ".join(
            f"{role}: cpu≤{v['cpu_peak']:.0f}% rss≤{v['rss_peak_mb']:.0f}MiB" for role, v in r["resources"].items()
        )
        lines.append(f"[{r['variant']}] peaks (engine pid {r['engine_pid']}): {res}")
        if r.get("batches", {}).get("histogram"):
            lines.append(f"[{r['variant']}] batch sizes: {r['batches']['histogram']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import functools

    from engine.errors import ClientError, StartupError

    from .bench import report

    args = parse_args(argv)
    prog = cli_args.prog("load_gen")
    # SIGTERM unwinds like Ctrl-C, so spawned engines are stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = report.machine(report.embedded_pg_version())
    print(report.machine_line(machine))
    mode = f"open loop, Poisson λ={args.rate:g}/s" if args.rate else f"closed loop, {args.in_flight} in flight/conn"
    print(
        f"load: {args.connections} connections, {mode}, {args.count} intents"
        if args.count
        else f"load: {args.connections} connections, {mode}, {args.duration:g} s"
    )
    results = []
    for name, flags in args.variants:
        engine = None
        try:
            engine = SpawnedEngine(flags, args.dsn) if args.spawn_engine else None
            sock = engine.socket if engine else args.socket
            dsn = engine.dsn if engine else args.dsn
            root = engine.proc.pid if engine else args.engine_pid
            spawn_entities(sock, args.entities)
            plan = Plan(
                socket=sock,
                connections=args.connections,
                rate=args.rate,
                in_flight=args.in_flight,
                duration=args.duration,
                count=args.count,
                entities=args.entities,
                seed=args.seed,
            )
            sampler = Sampler(root, socket_path=sock)
            sampler.start()
            t0 = time.monotonic()
            try:
                result = run(plan, progress=functools.partial(_tick, name, t0))
            finally:
                print(file=sys.stderr)
                sampler.stop()
            result["variant"] = name
            result["flags"] = flags
            result["engine_pid"] = root
            result["resources"] = sampler.peaks()
            result["samples"] = sampler.samples
            if dsn:
                result["batches"] = batch_stats(dsn, *result["window"])
        except (StartupError, ClientError, ClientFailed, RuntimeError, OSError) as exc:
            print(f"{prog}: variant {name}: could not run the load: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; nothing reported", file=sys.stderr)
            return 130
        finally:
            if engine:
                code = engine.stop()
                if code != 0:
                    print(f"{prog}: warning: engine {name} exited {code}", file=sys.stderr)
        results.append(result)
    print(render(results))
    if args.json:
        report.write_json(args.json, {"machine": machine, "args": vars(args), "results": results})
        if args.json != "-":
            print(f"wrote {args.json}")
    if args.plot:
        from . import plots

        for path in plots.load_plots(results, args.plot):
            print(f"wrote {path}")
    return 1 if any(r["lost"] for r in results) else 0
