"""Run logging on the main process: metrics.jsonl, TensorBoard event files, optional Weights & Biases."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def truncate_metrics(output_dir: str, last_step: int) -> None:
    """Keep one line per step <= `last_step`; drop unreadable lines (a crash's cut-off write) with a warning.

    Later lines were logged after the last checkpoint; a second line of a step is the final held-out metrics,
    which the resumed run logs again. The file is replaced atomically, so a crash here loses nothing.
    """
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    keep, seen = [], set()
    for number, line in enumerate(raw, 1):
        if not line.strip():
            continue
        step = _step_of(line)
        if step is None:
            what = "cut off mid-write" if number == len(raw) else "unreadable"  # no newline: the last, unfinished
            print(f"warning: dropped line {number} of {path}: {what} ({len(line)} bytes, {line[:30]!r})", flush=True)
        elif step <= last_step and step not in seen:  # a second line of a step: final metrics, logged anew
            keep.append(line + b"\n")
            seen.add(step)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _step_of(line: bytes) -> int | None:
    """The `step` of a metrics line; None when the line is not a JSON object with an integer step."""
    try:
        row = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


class MetricsLogger:
    """Writes each logged step once; a no-op on processes other than 0."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, wandb_project: str = "",
                 config: dict | None = None):
        self.enabled, self.writer, self.wandb = enabled, None, None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_FILE)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
        if wandb_project:
            import wandb  # optional dependency: only imported when asked for
            self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=output_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def log_text(self, step: int, tag: str, markdown: str) -> None:
        """A text summary (Markdown, e.g. a table) in TensorBoard's Text tab; nothing without TensorBoard."""
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, markdown, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
