"""Load generation against a running engine: the code behind ``tools/load_gen``.

C client processes, one connection each (msgpack framing), send a MUD intent
mix either open-loop at a total Poisson rate λ (the seed's arrival model:
exponential gaps, the sender sleeps until the next arrival, never spins) or
closed-loop with a fixed number in flight per connection. Every reply's
latency (send to reply) is recorded; at the end the engine's ``batches`` table
gives the batch size distribution and the time/size trigger ratio, and psutil
samples give CPU% and RSS of every engine process and of PostgreSQL.

``lost`` counts intents sent without any reply by the end of the grace
period: it must be 0.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import random
import selectors
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

_LENGTH = struct.Struct(">I")
ROOT = Path(__file__).resolve().parent.parent

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
    dec = msgspec.msgpack.Decoder(Reply)
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
    buf = bytearray()
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
            payload = enc.encode(Intent(client_id, seq, entity, kind, make_args(kind, rng)))
            outbox.extend(_LENGTH.pack(len(payload)))
            outbox.extend(payload)
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
            buf += data
            pos = 0
            recv_now = time.monotonic()
            while len(buf) - pos >= 4:
                (n,) = _LENGTH.unpack_from(buf, pos)
                if len(buf) - pos - 4 < n:
                    break
                reply = dec.decode(memoryview(buf)[pos + 4 : pos + 4 + n])
                pos += 4 + n
                start = sent_at.pop(reply.seq, None)
                if start is not None:
                    latencies.append(recv_now - start)
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1
            del buf[:pos]
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


class Sampler(threading.Thread):
    """Samples CPU% and RSS of the engine's processes and PostgreSQL, and the
    engine's committed-intents counter (the ``metrics`` request on its
    socket) for throughput over time."""

    def __init__(self, engine_pid: int | None, interval: float = 0.5, socket_path: str | None = None) -> None:
        super().__init__(daemon=True)
        self.engine_pid = engine_pid
        self.socket_path = socket_path
        self.interval = interval
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._procs: dict[int, psutil.Process] = {}

    def _targets(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                title = " ".join(proc.info["cmdline"] or [])
                name = proc.info["name"] or ""
            except psutil.Error:
                continue
            if title.startswith(("batchscheduler:", "postgres")) or name == "postgres":
                found.append(proc)
        return found

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.interval):
            sample = {"t": round(time.monotonic() - t0, 3), "procs": {}, "committed": self._committed()}
            for proc in self._targets():
                cached = self._procs.setdefault(proc.pid, proc)
                try:
                    title = " ".join(cached.cmdline()).strip()
                    role = title.split(" ", 1)[1] if title.startswith("batchscheduler:") else "postgres"
                    role = role if role != "postgres" else "postgres (all)"
                    entry = sample["procs"].setdefault(role, {"cpu": 0.0, "rss_mb": 0.0})
                    entry["cpu"] += cached.cpu_percent(None)
                    entry["rss_mb"] += cached.memory_info().rss / 2**20
                except psutil.Error:
                    continue
            self.samples.append(sample)

    def _committed(self) -> int | None:
        if not self.socket_path:
            return None
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.socket_path)
                s.sendall(b'{"op":"metrics"}\n')
                line = s.makefile("rb").readline()
            return int(msgspec.json.decode(line)["flusher"]["committed"])
        except (OSError, ValueError, KeyError, msgspec.DecodeError):
            return None

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peaks(self) -> dict:
        out: dict[str, dict] = {}
        for sample in self.samples[1:]:  # the first cpu_percent reading is meaningless
            for role, v in sample["procs"].items():
                peak = out.setdefault(role, {"cpu_peak": 0.0, "rss_peak_mb": 0.0})
                peak["cpu_peak"] = max(peak["cpu_peak"], round(v["cpu"], 1))
                peak["rss_peak_mb"] = max(peak["rss_peak_mb"], round(v["rss_mb"], 1))
        return out


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
    for recv in pipes:
        while not recv.poll(0.5):
            if progress is not None:
                progress()
        results.append(recv.recv())
        recv.close()
    for proc in procs:
        proc.join(10)
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


def batch_stats(dsn: str, since: float, until: float) -> dict:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT size, cut_reason FROM batchscheduler.batches "
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


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class SpawnedEngine:
    """``tools/run_engine`` in a temp dir with the embedded PostgreSQL (or --dsn)."""

    def __init__(self, flags: list[str], dsn: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bs-load-"))
        self.socket = str(self.dir / "e.sock")
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "run_engine"),
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
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl() call, takes no lock
        )
        self.dsn = dsn
        for line in self.proc.stdout:
            if line.startswith("dsn: ") and not dsn:
                self.dsn = line[5:].strip()
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError(f"engine failed to start: {(self.dir / 'engine.log').read_text()[-2000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        return code
