"""A benchmark's figures as a PNG bar chart."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict[str, dict[int, dict]], labels: dict[str, str], streams: list[int], title: str,
         path: Path) -> None:
    """Grouped bars of aggregate tok/s: one group per stream count, one bar per system
    (named by `labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (system, by_streams) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(streams))]
        bars = ax.bar(xs, [by_streams[n]["tok_s"] for n in streams], width, label=labels[system])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(streams)), [f"{n} stream{'s' if n > 1 else ''}" for n in streams])
    ax.set_ylabel("aggregate tok/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
