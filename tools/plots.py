"""PNG plots for the load and benchmark tools (matplotlib is optional:
``pip install -c requirements/lock.txt '.[plot]'``; the tools check for it
before they run, see ``tools.bench.args.require_matplotlib``)."""

from __future__ import annotations

import itertools
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from .bench.args import PLOT_HINT

        raise SystemExit(f"--plot needs matplotlib; install the plot extra: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend_size: int | None = None) -> Path:
    """Label, grid, legend, write the PNG, free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing plotted (no samples): no empty legend
        ax.legend(fontsize=legend_size)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def load_plots(results: list[dict], out_dir: str) -> list[Path]:
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        lat = r["latencies_ms_sample"]
        if lat:
            ax.plot(lat, [i / len(lat) for i in range(len(lat))], label=r["variant"])
    ax.set_xscale("log")
    paths.append(
        _save(plt, fig, ax, out / "latency_cdf.png", "Reply latency CDF", "reply latency (ms)", "fraction of intents")
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = [(s["t"], s.get("committed")) for s in r["samples"] if s.get("committed") is not None]
        rates = [(t1, (c1 - c0) / (t1 - t0)) for (t0, c0), (t1, c1) in itertools.pairwise(points) if t1 > t0]
        if rates:
            ax.plot([t for t, _ in rates], [v for _, v in rates], label=r["variant"])
    paths.append(
        _save(
            plt,
            fig,
            ax,
            out / "throughput.png",
            "Throughput over time (engine's commit counter)",
            "seconds",
            "committed intents/s",
        )
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    for (variant, role), (ts, rss) in rss_lines(results).items():
        style = _ROLE_STYLE.get(role.split(" ", 1)[0], "-")
        label = role if len(results) == 1 else f"{variant}: {role}"
        values = [float("nan") if v is None else v for v in rss]  # NaN: matplotlib leaves a gap
        ax.plot(ts, values, style, label=label, marker="." if sum(v is not None for v in rss) < 3 else None)
    paths.append(
        _save(
            plt,
            fig,
            ax,
            out / "rss.png",
            "Resident memory over time, per engine role",
            "seconds",
            "RSS (MiB)",
            legend_size=7,
        )
    )
    return paths


# Line style per kind of role, so lanes and ingests read as families.
_ROLE_STYLE = {"supervisor": "-", "ingest": "--", "flusher": "-", "postgres": ":"}


def rss_lines(results: list[dict]) -> dict[tuple[str, str], tuple[list[float], list[float | None]]]:
    """One line per (variant, role) -- ``supervisor``, ``ingest 0``,
    ``flusher 0``, ``flusher 1``, …, ``postgres (all)`` -- over the samples
    from the role's first appearance to its last; None where it had no
    process (a worker being restarted is a gap, not a drop to 0)."""
    from .loadgen import role_order

    lines: dict[tuple[str, str], tuple[list[float], list[float | None]]] = {}
    for r in results:
        samples = r["samples"]
        roles = sorted({role for s in samples for role in s["procs"]}, key=role_order)
        for role in roles:
            present = [i for i, s in enumerate(samples) if role in s["procs"]]
            span = samples[present[0] : present[-1] + 1]
            lines[(r["variant"], role)] = (
                [s["t"] for s in span],
                [s["procs"][role]["rss_mb"] if role in s["procs"] else None for s in span],
            )
    return lines


def sweep_plot(result: dict, out_dir: str) -> Path:
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pts = result["points"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["size"] for p in pts], [p["throughput"] for p in pts], "o-", label="measured")
    predicted = result.get("fit", {}).get("predicted", {})
    if predicted:
        fitted = sorted((int(k), v) for k, v in predicted.items())  # JSON makes the keys strings
        ax.plot([k for k, _ in fitted], [v for _, v in fitted], "--", label="E(n) fit")
    return _save(plt, fig, ax, out / "sweep.png", "Batch size sweep", "max batch size", "committed intents/s")
