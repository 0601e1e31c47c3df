"""`python -m simpo_jax.sweep report DIR`: each run's final and best held-out metrics, and its final generation
metrics, as CSV, Markdown and plots."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from typing import Any

from simpo_jax.logging_utils import METRICS_FILE

# Held-out metrics of the report, by their metrics.jsonl names (without the `eval_` prefix).
METRICS = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "lengths/chosen",
           "lengths/rejected", "loss")
SHORT = {"rewards/accuracies": "acc", "rewards/margins": "margin", "logps/chosen": "logp chosen",
         "logps/rejected": "logp rejected", "lengths/chosen": "len chosen", "lengths/rejected": "len rejected",
         "loss": "loss"}
REPORT_DIR = "report"
# Metrics of the answers train samples (at some steps and at the end), by their metrics.jsonl names, with their
# headers in the Markdown table. Win rates are against the initial model's answers (LC: length-controlled).
GEN = {"gen/length_mean": "length", "gen/eos_rate": "eos rate", "gen/repetition": "repetition",
       "gen/reward_mean": "reward", "gen/task_accuracy": "task accuracy",
       "gen/task_win_rate": "task win rate", "gen/win_rate": "win rate",
       "gen/win_rate_lc": "LC win rate", "gen/length_mean_initial": "initial length",
       "gen/reward_mean_initial": "initial reward", "gen/task_accuracy_initial": "initial task accuracy"}
GEN_NOTE = ("Generated answers: each run's last logged generation metrics (length: mean tokens per answer; eos "
            "rate: share of answers that ended with EOS; repetition: share of repeated 4-grams; win rates: against "
            "the initial model's answers to the same prompts, ties half; task win rate: correct where the initial "
            "answer is not; win rate: by the reward model, else the task win rate; LC: length-controlled; initial: "
            "the initial model's answers). Blank: not logged by that run; an incomplete run's figures are from its "
            "last sampling before it stopped.")


def read_metrics(path: str) -> list[dict[str, float]]:
    """metrics.jsonl as a list of rows (non-finite values, logged as strings, back to floats)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in json.loads(line).items()} for line in f if line.strip()]


def _finite(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback


def summarize(lines: list[dict[str, float]]) -> dict[str, Any]:
    """Final (last) and best (highest held-out reward accuracy, then lowest loss) evaluation of one run."""
    evals = [line for line in lines if "eval_rewards/accuracies" in line]
    row: dict[str, Any] = {"steps": int(lines[-1]["step"]) if lines else ""}
    final = evals[-1] if evals else {}
    best = min(evals, key=lambda e: (-_finite(e["eval_rewards/accuracies"], -math.inf),
                                     _finite(e.get("eval_loss", math.inf), math.inf), e["step"]), default={})
    row["best_step"] = int(best["step"]) if best else ""
    for name in METRICS:
        row[f"final_eval_{name}"] = final.get(f"eval_{name}", "")
        row[f"best_eval_{name}"] = best.get(f"eval_{name}", "")
    return row


def final_gen(lines: list[dict[str, float]], final: dict[str, Any]) -> dict[str, float]:
    """Each gen/* metric's value on the last metrics.jsonl line that has it (else summary.json's final dict)."""
    out = {}
    for key in GEN:
        logged = [line[key] for line in lines if key in line]
        if logged or key in final:
            out[key] = logged[-1] if logged else float(final[key])
    return out


def _summary_final(run_dir: str) -> dict[str, Any]:
    from simpo_jax.sweep import summary_path

    try:
        with open(summary_path(run_dir)) as f:
            final = json.load(f).get("final", {})
    except (OSError, ValueError):
        return {}
    return final if isinstance(final, dict) else {}


def collect(out: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """(manifest, one row per run, each run's metrics.jsonl lines)."""
    from simpo_jax.sweep import MANIFEST, is_finished

    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: {out} is not a sweep directory (python -m simpo_jax.sweep "
                         "writes it)")
    with open(path) as f:
        manifest = json.load(f)
    rows, gens, curves = [], [], {}
    for run in manifest["runs"]:
        run_dir = os.path.join(out, run["name"])  # the directory as it is now (the sweep may have been moved)
        lines = read_metrics(os.path.join(run_dir, METRICS_FILE))
        status = "finished" if is_finished(run_dir) else ("incomplete" if os.path.isdir(run_dir) else "not run")
        rows.append({"run": run["name"], "status": status, **run["values"], **summarize(lines)})
        gens.append(final_gen(lines, _summary_final(run_dir) if status == "finished" else {}))
        curves[run["name"]] = lines
    present = [key for key in GEN if any(key in gen for gen in gens)]  # columns no run has are left out
    rows = [{**row, **{key: gen.get(key, "") for key in present}} for row, gen in zip(rows, gens)]
    return manifest, rows, curves


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """The table: swept values, final held-out metrics, best held-out accuracy and its step."""
    head = ["run", "status", *fields, *(SHORT[m] for m in METRICS), "best acc (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = f"{_fmt(row['best_eval_rewards/accuracies'])} ({row['best_step']})" if row["best_step"] != "" else ""
        cells = [row["run"], row["status"], *(row[f] for f in fields),
                 *(_fmt(row[f"final_eval_{m}"]) for m in METRICS), best]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def gen_markdown(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """The generated answers' table (the gen/* columns some run has); empty if no run has any."""
    present = [key for key in GEN if key in rows[0]]
    if not present:
        return ""
    head = ["run", "status", *fields, *(GEN[key] for key in present)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run"], row["status"], *(row[f] for f in fields), *(_fmt(row[key]) for key in present)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Write report/results.csv, results.md and the PNG plots; print the table."""
    from simpo_jax import sweep_gen_plots, sweep_plots

    p = argparse.ArgumentParser(prog="python -m simpo_jax.sweep report", description=__doc__)
    p.add_argument("out", help="the sweep directory (the --out of the sweep)")
    args = p.parse_args(argv)
    manifest, rows, curves = collect(args.out)
    fields = [f for axis in manifest["axes"] for f in axis["fields"]]
    report = os.path.join(args.out, REPORT_DIR)
    os.makedirs(report, exist_ok=True)
    write_csv(rows, os.path.join(report, "results.csv"))
    table = markdown(rows, fields)
    gen_table = gen_markdown(rows, fields)
    if gen_table:
        table += "\n" + GEN_NOTE + "\n\n" + gen_table
    with open(os.path.join(report, "results.md"), "w") as f:
        f.write(f"# Sweep {args.out}\n\nConfig `{manifest['config']}`"
                + (f", overrides `{' '.join(manifest['overrides'])}`" if manifest["overrides"] else "")
                + ". Held-out (eval_) metrics at the end of each run; best = the evaluation with the highest "
                  "held-out reward accuracy.\n\n" + table)
    plots = sweep_plots.draw_all(manifest["axes"], rows, curves, report)
    plots += sweep_gen_plots.draw_all(manifest["axes"], rows, curves, report)
    print(table + f"\nwrote {report}/results.csv, results.md, " + ", ".join(os.path.basename(p) for p in plots),
          flush=True)
    return 0
