"""The sweep report's PNGs of generated answers: win rate (or task accuracy) over the grid, against the mean
generated length, and generated length during training. A plot without data is not written."""
from __future__ import annotations

import itertools
import math
import os
from typing import Any

import matplotlib.ticker

from simpo_jax.sweep_plots import _save, _value, grid_plot, plt

LENGTH = "gen/length_mean"
# (metric, its LC variant, the initial model's value of it (None: 0.5 by definition), label, file name stem)
SCORES = (("gen/win_rate", "gen/win_rate_lc", None, "win rate vs the initial model", "gen_win_rate"),
          ("gen/task_accuracy", None, "gen/task_accuracy_initial", "task accuracy of generated answers",
           "gen_task_accuracy"))


def _has(rows: list[dict[str, Any]], key: str | None) -> bool:
    return key is not None and any(math.isfinite(_value(row, key)) for row in rows)


def score(rows: list[dict[str, Any]]) -> tuple | None:
    """The win rate's entry of SCORES if a finished run has one, else task accuracy's, else None."""
    return next((s for s in SCORES if _has(rows, s[0])), None)


def _initial(rows: list[dict[str, Any]], key: str) -> float:
    """The initial model's value (the same for every run of one sweep): the first finished run's."""
    return next((v for v in (_value(row, key) for row in rows) if math.isfinite(v)), math.nan)


def score_vs_length_plot(rows: list[dict[str, Any]], entry: tuple, path: str) -> bool:
    """One point per finished run: its final win rate (or task accuracy) against its mean generated length,
    labelled with its swept values; hollow: the length-controlled win rate; star: the initial model."""
    key, lc, initial_key, label, _ = entry
    colors = plt.cm.tab10.colors  # a run's colour as in margins.png and gen_lengths.png
    points = [(row["run"], _value(row, LENGTH), _value(row, key), _value(row, lc) if lc else math.nan,
               colors[i % len(colors)]) for i, row in enumerate(rows)]
    points = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, length, value, controlled, color in points:
        ax.scatter(length, value, color=color, zorder=3)
        ax.annotate(name, (length, value), xytext=(5, 4), textcoords="offset points", fontsize="x-small")
        if math.isfinite(controlled):
            ax.plot([length, length], [value, controlled], color=color, linewidth=0.8, zorder=2)
            ax.scatter(length, controlled, facecolors="none", edgecolors=color, zorder=3)
    start = (_initial(rows, "gen/length_mean_initial"),
             0.5 if initial_key is None else _initial(rows, initial_key))
    if all(math.isfinite(v) for v in start):
        ax.scatter(*start, marker="*", s=160, color="black", zorder=4)
    if initial_key is None:
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color="grey", label=label)]
    if any(math.isfinite(p[3]) for p in points):
        handles.append(plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey",
                                  label="length-controlled win rate"))
    if all(math.isfinite(v) for v in start):
        handles.append(plt.Line2D([], [], marker="*", markersize=12, linestyle="", color="black",
                                  label="initial model"))
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.margins(x=0.15)  # room for the labels
    ax.set(xlabel="mean generated length (tokens)", ylabel=label, ylim=(-0.05, 1.05),
           title=f"{label} against mean generated length (end of run)")
    _save(fig, path)
    return True


def length_curves_plot(curves: dict[str, list[dict[str, float]]], rows: list[dict[str, Any]], path: str) -> bool:
    """gen/length_mean at each step where train sampled answers, per run; the initial model's length dashed."""
    series = {name: [(m["step"], m[LENGTH]) for m in lines if LENGTH in m] for name, lines in curves.items()}
    if not any(series.values()):
        return False
    fig, ax = plt.subplots(figsize=(10, 5))
    styles = zip(itertools.cycle(plt.cm.tab10.colors), itertools.cycle("os^vDP*Xh<>"))  # as in margins.png
    for (color, marker), (name, points) in zip(styles, series.items()):
        if points:
            ax.plot(*zip(*points), color=color, label=name, linewidth=1.2, marker=marker, markersize=4,
                    fillstyle="none")
    start = next((m["gen/length_mean_initial"] for lines in curves.values() for m in lines
                  if "gen/length_mean_initial" in m), _initial(rows, "gen/length_mean_initial"))
    if math.isfinite(start):
        ax.axhline(start, color="grey", linestyle="--", linewidth=1, label="initial model")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="mean generated length (tokens)",
           title="length of generated answers during training")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    _save(fig, path)
    return True


def draw_all(axes: list[dict[str, Any]], rows: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]],
             out: str) -> list[str]:
    """Write gen_win_rate.png (or gen_task_accuracy.png), gen_win_rate_vs_length.png (or
    gen_task_accuracy_vs_length.png) and gen_lengths.png into `out`, each only if it has data; their paths."""
    written = []
    entry = score(rows)
    if entry is not None:
        key, _, _, label, stem = entry
        written.append(os.path.join(out, f"{stem}.png"))
        grid_plot(axes, rows, written[-1], key, label, f"{label} (end of run)")
        path = os.path.join(out, f"{stem}_vs_length.png")
        if score_vs_length_plot(rows, entry, path):
            written.append(path)
    path = os.path.join(out, "gen_lengths.png")
    if length_curves_plot(curves, rows, path):
        written.append(path)
    return written
