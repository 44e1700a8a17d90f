"""PNG plots for the load and benchmark tools (matplotlib is optional:
``pip install '.[plot]'``)."""

from __future__ import annotations

import itertools
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install '.[plot]'") from None
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
    for r in results:
        roles = sorted({role for s in r["samples"] for role in s["procs"]})
        for role in roles:
            ax.plot(
                [s["t"] for s in r["samples"]],
                [s["procs"].get(role, {}).get("rss_mb", 0) for s in r["samples"]],
                label=f"{r['variant']}: {role}",
            )
    paths.append(
        _save(plt, fig, ax, out / "rss.png", "Resident memory over time", "seconds", "RSS (MiB)", legend_size=7)
    )
    return paths


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
