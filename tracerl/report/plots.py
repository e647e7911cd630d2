"""PNG plots of run metrics (quickstart, method comparison); matplotlib without a display.

Honest by default: an accuracy axis starts at 0 and shows a 95 % binomial (Wilson) interval for
its sample count; a quantity that is constant over the run (e.g. NFE per token under static
decoding, where it is 1 by construction) gets no plot, and the caller is told which were dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Series = tuple[Sequence[float], Sequence[float]]  # (x, y)


@dataclass
class Panel:
    """One axes: a line per ``series[name] = (x, y)``; ``bands[name] = (low, high)`` shades a spread,
    ``errors[name] = (low, high)`` draws error bars (absolute bounds); ``ylim`` fixes the y range."""

    title: str
    series: dict[str, Series]
    ylabel: str = ""
    xlabel: str = "step"
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    errors: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    ylim: tuple[float, float] | None = None


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95 % for z = 1.96); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, correct / n))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_panel(title: str, points: Sequence[tuple[float, float, int]], *, name: str = "accuracy",
                   xlabel: str = "step") -> Panel:
    """``points`` = (step, accuracy, samples): y from 0 to 1 with Wilson 95 % error bars."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    bounds = [wilson_interval(a * n, n) for _, a, n in points]
    return Panel(title, {name: (xs, ys)}, ylabel="accuracy (95 % CI)", xlabel=xlabel,
                 errors={name: ([b[0] for b in bounds], [b[1] for b in bounds])}, ylim=(0.0, 1.0))


def is_constant(values: Sequence[float], rel: float = 1e-9) -> bool:
    values = [float(v) for v in values]
    if not values:
        return True
    scale = max(1.0, max(abs(v) for v in values))
    return max(values) - min(values) <= rel * scale


def panel_is_constant(panel: Panel) -> bool:
    return all(is_constant(y) for _, y in panel.series.values())


def plot_panels(path: str | Path, panels: Sequence[Panel], *, title: str = "") -> Path:
    """One PNG, the panels side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window (CI, SSH)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), dpi=110, squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            _draw(ax, panel)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _draw(ax, panel: Panel) -> None:
    for name, (x, y) in panel.series.items():
        x, y = list(x), list(y)
        if name in panel.errors:
            low, high = panel.errors[name]
            yerr = [[max(0.0, v - lo) for v, lo in zip(y, low)], [max(0.0, hi - v) for v, hi in zip(y, high)]]
            ax.errorbar(x, y, yerr=yerr, marker="o", markersize=4, capsize=3, label=name)
            continue
        line, = ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3, label=name)
        if name in panel.bands:
            low, high = panel.bands[name]
            ax.fill_between(x, list(low), list(high), alpha=0.2, color=line.get_color())
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.grid(alpha=0.3)
    if len(panel.series) > 1:
        ax.legend(fontsize=8)


def plot_series(
    path: str | Path,
    series: dict[str, Series],
    *,
    title: str,
    xlabel: str = "RL step",
    ylabel: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """One PNG with a line per ``name -> (x, y)``; ``bands[name] = (low, high)`` shades a spread."""
    return plot_panels(path, [Panel(title, series, ylabel=ylabel, xlabel=xlabel, bands=bands or {})])


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (noisy per-step rewards are hard to read)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _column(rows: list[dict], key: str) -> Series | None:
    """(steps, values) of the rows that hold a number under ``key`` (None if none does)."""
    pairs = [(r["step"], r[key]) for r in rows
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return ([s for s, _ in pairs], [v for _, v in pairs]) if pairs else None


def _with_mean(name: str, column: Series, window: int = 10) -> dict[str, Series]:
    steps, values = column
    return {f"{name} (per step)": column, f"moving mean ({window})": (steps, moving_average(list(values), window))}


def run_plots(folder: str | Path, *, sft_rows: list[dict] = (), rl_rows: list[dict] = (),
              heldout: Sequence[tuple[float, float, int]] = ()) -> tuple[list[Path], list[str]]:
    """The plots of an SFT -> RL pipeline: SFT loss and validation accuracy, RL reward, held-out
    accuracy (``heldout`` = (RL step, accuracy, samples), step 0 = the SFT checkpoint), KL to the
    old policy, clip fraction, value loss, NFE per token and response length of the rollouts.
    Returns (written files, names of the plots dropped as constant or absent)."""
    folder = Path(folder)
    written, dropped = [], []

    def emit(name: str, panels: list[Panel], title: str = "") -> None:
        panels = [p for p in panels if p.series]
        if not panels or all(panel_is_constant(p) and not p.errors for p in panels):
            dropped.append(name)
            return
        written.append(plot_panels(folder / f"{name}.png", panels, title=title))

    sft_panels = []
    if (loss := _column(sft_rows, "loss")) is not None:
        sft_panels.append(Panel("SFT loss", _with_mean("loss", loss), ylabel="loss", xlabel="SFT step"))
    val = [(r["step"], r["eval_accuracy"], int(r.get("eval_problems", 0))) for r in sft_rows if "eval_accuracy" in r]
    if val:
        sft_panels.append(accuracy_panel("SFT validation accuracy", val, name="validation", xlabel="SFT step"))
    emit("sft", sft_panels)
    if (reward := _column(rl_rows, "reward_mean")) is not None:
        emit("reward", [Panel("Rollout reward", _with_mean("reward", reward), ylabel="mean reward", xlabel="RL step")])
    else:
        dropped.append("reward")
    if heldout:
        emit("heldout_accuracy", [accuracy_panel("Held-out accuracy (step 0 = SFT checkpoint)", heldout,
                                                 name="held-out", xlabel="RL step")])
    else:
        dropped.append("heldout_accuracy")
    for name, key, title, ylabel in (
        ("kl", "kl", "KL to the rollout policy (k3, mean per token)", "KL"),
        ("ref_kl", "ref_kl", "KL to the reference policy (k3, mean per token)", "KL"),
        ("clip_fraction", "clip_fraction", "PPO clip fraction", "fraction of tokens clipped"),
        ("value_loss", "value_loss", "Value-model loss", "loss"),
        ("nfe_per_token", "nfe_per_token", "Forward passes per generated token (rollouts)", "NFE / token"),
        ("response_length", "response_length", "Response length (rollouts)", "tokens"),
    ):
        column = _column(rl_rows, key)
        if column is None:
            dropped.append(name)
            continue
        emit(name, [Panel(title, {key: column}, ylabel=ylabel, xlabel="RL step")])
    return written, dropped
