"""PNG line plots of run metrics (quickstart, method comparison); matplotlib without a display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_series(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "RL step",
    ylabel: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """One PNG with a line per ``name -> (x, y)``; ``bands[name] = (low, high)`` shades a spread."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window (CI, SSH)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    try:
        for name, (x, y) in series.items():
            line, = ax.plot(list(x), list(y), marker="o" if len(x) < 20 else None, markersize=3, label=name)
            if bands and name in bands:
                low, high = bands[name]
                ax.fill_between(list(x), list(low), list(high), alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (noisy per-step rewards are hard to read)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
