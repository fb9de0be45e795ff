"""PNG plots of a comparison run (matplotlib, imported only here and only when drawing).

matplotlib is a bench-only tool, not a dependency of fastproxy: it is loaded with importlib so
that type checking does not need it installed, and a missing matplotlib skips the plots.
"""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.compare import Results

FILES = ("cpu.png", "memory.png", "latency.png")

COLOURS = {
    "nginx": "#2a9d8f",
    "haproxy": "#8ab17d",
    "fastproxy": "#e76f51",
    "fastproxy-tunnel": "#f4a261",
    "fastproxy-httptools": "#d62828",
    "fastproxy-noadmin": "#e9c46a",
    "fastproxy-accesslog": "#bc6c25",
    "relay": "#8d99ae",
    "direct": "#264653",
}


def _bars(ax: Any, r: Results, metric: str, title: str, unit: str) -> None:
    data = r.values.get(metric, {})
    keys = [k for k in r.labels if k in data]
    meds = [statistics.median(data[k]) for k in keys]
    lows = [m - min(data[k]) for m, k in zip(meds, keys, strict=True)]
    highs = [max(data[k]) - m for m, k in zip(meds, keys, strict=True)]
    ax.barh(
        range(len(keys)),
        meds,
        xerr=[lows, highs],
        color=[COLOURS.get(k, "#999999") for k in keys],
        capsize=3,
    )
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([r.labels[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit, fontsize=8)
    for i, (m, hi) in enumerate(zip(meds, highs, strict=True)):
        # after the whisker, so the two never overlap
        ax.text(m + hi, i, f"  {m:,.0f}" if m >= 100 else f"  {m:.3g}", va="center", fontsize=7)


def draw(out: Path, r: Results) -> list[Path]:
    """Write the plots into ``out``; returns the files written (none without matplotlib)."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    written: list[Path] = []

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    _bars(axes[0][0], r, "http_us", "CPU per small request (lower is better)", "µs")
    _bars(axes[0][1], r, "ws_us", "CPU per WebSocket echo round trip", "µs")
    _bars(axes[1][0], r, "down_s_per_gb", "CPU per GB downloaded", "CPU seconds / GB")
    _bars(axes[1][1], r, "up_s_per_gb", "CPU per GB uploaded", "CPU seconds / GB")
    fig.suptitle("Proxy CPU cost, one worker pinned to its own core (whiskers: min-max of runs)")
    fig.tight_layout()
    written.append(out / "cpu.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    _bars(axes[0], r, "idle_http_bytes", "RSS per idle keep-alive connection", "bytes")
    _bars(axes[1], r, "idle_ws_bytes", "RSS per idle WebSocket", "bytes")
    fig.tight_layout()
    written.append(out / "memory.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _bars(axes[0], r, "lat_p50_ms", "Added latency p50 at 500 req/s", "ms")
    _bars(axes[1], r, "lat_p99_ms", "Added latency p99 at 500 req/s", "ms")
    ax = axes[2]
    for key, samples in r.latency_samples.items():
        if not samples:
            continue
        ordered = sorted(samples)
        n = len(ordered)
        ax.plot(
            [v * 1e3 for v in ordered],
            [(i + 1) / n for i in range(n)],
            label=r.labels.get(key, "direct to the origin"),
            color=COLOURS.get(key, "#999999"),
        )
    ax.set_xscale("log")
    ax.set_xlabel("request latency, ms (log)", fontsize=8)
    ax.set_ylabel("fraction of requests", fontsize=8)
    ax.set_title("Latency at 500 req/s, last run", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(out / "latency.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
