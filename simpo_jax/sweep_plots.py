"""The sweep report's PNGs: held-out accuracy heatmap (or bars), reward-margin curves, response lengths."""
from __future__ import annotations

import itertools
import math
import os
import textwrap
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ACC = "final_eval_rewards/accuracies"
NOTE_LENGTHS = ("token counts of the evaluated preference pairs' responses (the data, not generated text): "
                "equal across runs on the same data")


def _short(fields: list[str]) -> str:
    return " / ".join(f.rpartition(".")[2] for f in fields)


def _value(row: dict[str, Any], key: str) -> float:
    value = row.get(key, "")
    return float(value) if value != "" and row["status"] == "finished" else math.nan


def _coord(row: dict[str, Any], axis: dict[str, Any]) -> int:
    return [list(v) for v in axis["values"]].index([row[f] for f in axis["fields"]])


def _pick(axes: list[dict[str, Any]]) -> tuple[dict, dict, list[dict]]:
    """x: the axis with loss.beta (else the first), y: with loss.gamma_beta_ratio (else the next); the rest."""
    x = next((a for a in axes if "loss.beta" in a["fields"]), axes[0])
    y = next((a for a in axes if a is not x and "loss.gamma_beta_ratio" in a["fields"]),
             next(a for a in axes if a is not x))
    return x, y, [a for a in axes if a is not x and a is not y]


def _bars(axis: dict[str, Any], rows: list[dict[str, Any]], path: str, key: str, label: str, title: str) -> None:
    """One swept axis: a bar per value."""
    labels = [" / ".join(v) for v in axis["values"]]
    acc = [math.nan] * len(labels)
    for row in rows:
        acc[_coord(row, axis)] = _value(row, key)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), np.nan_to_num(acc), color="tab:blue")
    for i, a in enumerate(acc):
        ax.text(i, (0 if math.isnan(a) else a) + 0.02, "n/a" if math.isnan(a) else f"{a:.2f}", ha="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylim=(0, 1.1), xlabel=_short(axis["fields"]), ylabel=label, title=title)
    _save(fig, path)


def accuracy_plot(axes: list[dict[str, Any]], rows: list[dict[str, Any]], path: str) -> None:
    """Heatmap of final held-out reward accuracy over two axes (one panel per value of the others); bars for one."""
    grid_plot(axes, rows, path, ACC, "held-out reward accuracy", "held-out reward accuracy (end of run)")


def grid_plot(axes: list[dict[str, Any]], rows: list[dict[str, Any]], path: str, key: str, label: str,
              title: str) -> None:
    """Heatmap of the finished runs' `key` (a share, 0 to 1) over β × γ/β (or the first two axes; one panel per
    combination of the other axes); bars for a single axis."""
    if len(axes) == 1:
        _bars(axes[0], rows, path, key, label, title)
        return
    x, y, rest = _pick(axes)
    panels = list(itertools.product(*(range(len(a["values"])) for a in rest)))
    cols = min(3, len(panels))
    lines = math.ceil(len(panels) / cols)
    size = (cols * (1.1 * len(x["values"]) + 2.5), lines * (0.8 * len(y["values"]) + 2))
    fig, grid = plt.subplots(lines, cols, squeeze=False, figsize=size, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # runs without a result
    for ax, panel in zip(grid.flat, panels):
        acc = np.full((len(y["values"]), len(x["values"])), np.nan)
        for row in rows:
            if all(_coord(row, a) == i for a, i in zip(rest, panel)):
                acc[_coord(row, y), _coord(row, x)] = _value(row, key)
        image = ax.imshow(np.ma.masked_invalid(acc), origin="lower", cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), a in np.ndenumerate(acc):
            ax.text(j, i, "n/a" if np.isnan(a) else f"{a:.2f}", ha="center", va="center",
                    color="white" if a < 0.6 else "black")  # NaN compares False: black on grey
        ax.set_xticks(range(len(x["values"])), [" / ".join(v) for v in x["values"]])
        ax.set_yticks(range(len(y["values"])), [" / ".join(v) for v in y["values"]])
        ax.set(xlabel=_short(x["fields"]), ylabel=_short(y["fields"]),
               title=", ".join(f"{_short(a['fields'])}={' / '.join(a['values'][i])}" for a, i in zip(rest, panel)))
    for ax in list(grid.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=grid.ravel().tolist(), label=label)
    fig.suptitle(title)
    _save(fig, path)


def margin_plot(curves: dict[str, list[dict[str, float]]], path: str) -> None:
    """rewards/margins per training step for every run (solid), held-out margins (dashed, markers)."""
    fig, ax = plt.subplots(figsize=(10, 5))
    styles = zip(itertools.cycle(plt.cm.tab10.colors), itertools.cycle("os^vDP*Xh<>"))
    for (color, marker), (name, lines) in zip(styles, curves.items()):
        train = [(m["step"], m["rewards/margins"]) for m in lines if "rewards/margins" in m]
        held = [(m["step"], m["eval_rewards/margins"]) for m in lines if "eval_rewards/margins" in m]
        if train:  # a marker per run, so that runs whose curves coincide stay visible
            ax.plot(*zip(*train), color=color, label=name, linewidth=1.2, marker=marker, markersize=4,
                    markevery=max(1, len(train) // 12), fillstyle="none")
        if held:
            ax.plot(*zip(*held), color=color, linestyle="--", marker="o", markersize=4)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="rewards/margins",
           title="reward margin during training (solid: training batches, dashed: held-out)")
    ax.axhline(0, color="grey", linewidth=0.6)
    if curves:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    _save(fig, path)


def length_plot(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]], path: str) -> None:
    """Mean chosen / rejected response length per run (held-out at the end; else the training mean)."""
    chosen, rejected = [], []
    for row in rows:
        lines = curves[row["run"]]
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            held = row[f"final_eval_lengths/{side}"]
            train = [m[f"lengths/{side}"] for m in lines if f"lengths/{side}" in m]
            out.append(float(held) if held != "" else (float(np.mean(train)) if train else math.nan))
    index = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 5.5))
    ax.bar(index - 0.2, np.nan_to_num(chosen), 0.4, label="chosen", color="tab:green")
    ax.bar(index + 0.2, np.nan_to_num(rejected), 0.4, label="rejected", color="tab:red")
    ax.set_xticks(index, [row["run"] for row in rows], rotation=30, ha="right", fontsize="small")
    top = np.nanmax(chosen + rejected + [1.0])
    ax.set(ylabel="mean response length (tokens)", ylim=(0, 1.25 * top))
    ax.set_title("\n".join(textwrap.wrap(NOTE_LENGTHS, 90)), fontsize="small", color="dimgrey")
    fig.suptitle("mean chosen / rejected response length per run")
    ax.legend(loc="upper right", ncols=2)
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_all(axes: list[dict[str, Any]], rows: list[dict[str, Any]], curves: dict[str, list[dict[str, float]]],
             out: str) -> list[str]:
    """Write eval_accuracy.png, margins.png and lengths.png into `out`; returns their paths."""
    paths = [os.path.join(out, name) for name in ("eval_accuracy.png", "margins.png", "lengths.png")]
    accuracy_plot(axes, rows, paths[0])
    margin_plot(curves, paths[1])
    length_plot(rows, curves, paths[2])
    return paths
