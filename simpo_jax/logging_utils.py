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
    """Drop lines past `last_step` (logged by a run that died after its last checkpoint)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
