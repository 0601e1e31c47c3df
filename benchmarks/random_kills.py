"""SIGKILL the tiny training run at seeded random moments, restart it after each, and check that the finished
run's metrics equal an uninterrupted run's (rel 1e-5).

    python benchmarks/random_kills.py [--kills 10] [--seed 0] [--steps 100] [--workdir DIR]

Most kills land a random time (uniform, up to the uninterrupted run's typical time for 4 steps) after the
restarted run logs a random step (seeded, in increasing order over the kills, so that they spread over the
run): in a training step, an evaluation (every 3 steps, its compiling included), an asynchronous save (every
4), or the final save, evaluation and export. A share (--startup-share) lands at a random time of start-up
instead (imports, data, model, restore, compiling). The report names, for each kill, the last logged step, whether
a save was in flight and what came next. Exit status 1 when the metrics differ or a restarted run failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_second",)
TMP_MARK = ".orbax-checkpoint-tmp"
BAR = re.compile(r"train:\s*\d+%\|")  # the progress bar: printed once the run is ready to train


def overrides(out: pathlib.Path, **extra) -> list[str]:
    """tests/test_train.py::tiny_overrides (a seconds-long configs/tiny.py run), with evaluation every 3 steps."""
    values = {"train.output_dir": str(out), "data.builtin_train_rows": 256, "data.builtin_eval_rows": 32,
              "train.batch_size": 8, "train.max_steps": 12, "train.eval_every": 3, "checkpoint.every": 4,
              "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 2,
              "model.num_kv_heads": 1, "step.logprob_chunk_len": 32, "logging.progress_bar": True,
              "train.generate_every": 0, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


def start(out: pathlib.Path, log: pathlib.Path, **extra) -> subprocess.Popen:
    """The train command on `out`, its output (stdout and stderr) going to `log`."""
    cmd = [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
           *overrides(out, **extra)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))


def metrics(out: pathlib.Path) -> list[dict]:
    """The rows of metrics.jsonl without the timing columns."""
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def difference(got: list[dict], want: list[dict], rel: float = 1e-5) -> str | None:
    """The first difference between two metrics files (None when they agree to `rel`)."""
    if [m["step"] for m in got] != [m["step"] for m in want]:
        return f"logged steps differ: {[m['step'] for m in got]} vs {[m['step'] for m in want]}"
    for g, w in zip(got, want):
        if g.keys() != w.keys():
            return f"step {w['step']}: keys {sorted(g)} vs {sorted(w)}"
        for key, value in w.items():
            if isinstance(value, str) or isinstance(g[key], str):
                if g[key] != value:
                    return f"step {w['step']} {key}: {g[key]} vs {value}"
            elif abs(g[key] - value) > rel * abs(value) + 1e-6:
                return f"step {w['step']} {key}: {g[key]!r} vs {value!r}"
    return None


def last_logged_step(out: pathlib.Path) -> int | None:
    """The step of the last complete metrics line (None without one)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    step = None
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            pass
    return step


def in_flight(out: pathlib.Path, since: float = 0.0) -> list[str]:
    """Steps whose save, begun after `since` (a time.time()), is unfinished (`<step>.orbax-checkpoint-tmp-...`)."""
    ckpt = out / "checkpoints"
    if not ckpt.exists():
        return []
    return sorted(p.name.split(".")[0] for p in ckpt.iterdir() if TMP_MARK in p.name and _mtime(p) >= since)


def _mtime(path: pathlib.Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # renamed meanwhile
        return 0.0


def resumed_step(log: pathlib.Path) -> int | None:
    """The step a run's output says it resumed from (None: it did not say so, or not yet)."""
    found = re.findall(r"resumed from the checkpoint of step (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


@dataclasses.dataclass
class Timeline:
    """The uninterrupted run's timing, in seconds from launch: when each step's line appeared, and the exit."""

    lines: dict[int, float]
    end: float

    @property
    def first(self) -> float:
        return min(self.lines.values())

    def window(self, steps: int = 4) -> float:
        """The typical time of `steps` steps (with an evaluation and a save among them)."""
        times = sorted(self.lines.values())
        gaps = sorted(b - a for a, b in zip(times, times[1:])) or [0.05]
        return max(steps * gaps[len(gaps) // 2], 0.2)


def watch(proc: subprocess.Popen, out: pathlib.Path, log: pathlib.Path, until: float | None = None,
          after_step: int | None = None) -> dict[int, float]:
    """Poll a run until it exits, or until `until` seconds after its launch (after it logs `after_step`).

    Returns when each step it logged appeared, in seconds from launch.
    """
    launched, seen = time.monotonic(), {}
    anchor = None if after_step is not None else launched
    while proc.poll() is None:
        now, step = time.monotonic(), last_logged_step(out)
        ready = BAR.search(log.read_text(errors="replace"))  # after the restore and the metrics cut-back
        if ready and step is not None and step not in seen and step > (resumed_step(log) or 0):
            seen[step] = now - launched
            if anchor is None and step >= after_step:
                anchor = now
        if until is not None and anchor is not None and now - anchor >= until:
            break
        time.sleep(0.02)
    return seen


def reference(work: pathlib.Path, **extra) -> tuple[pathlib.Path, Timeline]:
    """The uninterrupted run and its timeline."""
    out, log = work / "reference", work / "reference.log"
    launched = time.monotonic()
    proc = start(out, log, **extra)
    seen = watch(proc, out, log)
    if proc.wait() != 0 or not seen:
        raise SystemExit(f"the uninterrupted run failed:\n{log.read_text()[-3000:]}")
    return out, Timeline(seen, time.monotonic() - launched)


def kill_run(work: pathlib.Path, timeline: Timeline, kills: int, seed: int, startup_share: float = 0.2,
             say=print, **extra) -> tuple[pathlib.Path, list[dict], str, int]:
    """Start, SIGKILL at a random moment, restart, `kills` times; then run to the end.

    A kill in training comes a random time (up to `timeline.window()`) after the run logs a random step (drawn
    for all kills at once, in increasing order, so that they spread over the run); one in start-up a random
    time after launch. Returns the run's directory, a record per kill, the last run's output (prefixed
    with its exit status when it failed) and the newest checkpoint there was when it started.
    """
    rng, out, records = random.Random(seed), work / "killed", []
    total = int(extra.get("train.max_steps", 12))
    targets = sorted(rng.randint(1, total) for _ in range(kills))
    for i, target in enumerate(targets):
        log, saved = work / f"killed-{i}.log", _saved(out)
        in_training = rng.random() >= startup_share
        delay = rng.uniform(0, timeline.window() if in_training else timeline.first)
        launched, proc = time.time(), start(out, log, **extra)
        watch(proc, out, log, until=delay, after_step=target if in_training else None)
        record = {"kill": i + 1, "delay_s": round(delay, 2), "from": f"step {target}" if in_training else "launch",
                  "saved": saved, "resumed": resumed_step(log), "last_logged": last_logged_step(out),
                  "saving": in_flight(out, launched), "bar": bool(BAR.search(log.read_text(errors="replace")))}
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            record["outcome"] = "killed"
        else:
            record["outcome"] = f"exited {proc.returncode} before the kill"
        record["warnings"] = [line for line in log.read_text(errors="replace").splitlines()
                              if line.startswith(("warning:", "error:"))]
        record["doing"] = _doing(record, int(extra.get("train.eval_every", 3)), out)
        records.append(record)
        say(_line(record))
        if record["outcome"].startswith("exited") and proc.returncode != 0:
            return out, records, f"exit status {proc.returncode}\n{log.read_text(errors='replace')}", _saved(out)
    log, saved = work / "killed-final.log", _saved(out)
    proc = start(out, log, **extra)
    proc.wait()
    text = log.read_text(errors="replace")
    return out, records, text if proc.returncode == 0 else f"exit status {proc.returncode}\n{text}", saved


def _saved(out: pathlib.Path) -> int:
    ckpt = out / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.exists() else []
    return max(steps, default=0)


def _doing(record: dict, eval_every: int, out: pathlib.Path) -> str:
    """A best guess at what the run was doing when killed."""
    if not record["bar"]:
        return "starting up (imports, data, model, restore)"
    if (out / "summary.json").exists():
        return "finishing (summary written)"
    step = record["last_logged"] or 0
    doing = "compiling or taking its first step" if step <= (record["resumed"] or 0) else f"after step {step}"
    if step > (record["resumed"] or 0) and (step + 1) % eval_every == 0:
        doing += f"; step {step + 1} evaluates"
    if record["saving"]:
        doing += f"; save of step {', '.join(record['saving'])} in flight"
    return doing


def _line(r: dict) -> str:
    resumed = (f"resumed from {r['resumed']}" if r["resumed"] is not None else
               "fresh start" if not r["saved"] else f"killed before resuming from {r['saved']}")
    text = (f"kill {r['kill']:2d}: {r['delay_s']:6.2f} s after {r['from']:6s} ({resumed}): {r['outcome']}; "
            f"last logged step {r['last_logged']}; {r['doing']}")
    return text + "".join(f"\n          {w[:200]}" for w in r["warnings"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100, help="train.max_steps of the run")
    parser.add_argument("--startup-share", type=float, default=0.2, help="share of kills drawn in start-up")
    parser.add_argument("--workdir", default="", help="kept afterwards (default: a temporary directory)")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="random_kills_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "killed"):
        shutil.rmtree(work / name, ignore_errors=True)
    extra = {"train.max_steps": args.steps}
    began = time.monotonic()
    ref, timeline = reference(work, **extra)
    print(f"uninterrupted run: {args.steps} steps; its first step logged {timeline.first:.1f} s after launch, "
          f"then {timeline.end - timeline.first:.1f} s to the end; kill window after a step "
          f"{timeline.window():.2f} s (work dir {work})", flush=True)
    out, records, final, _ = kill_run(work, timeline, args.kills, args.seed, args.startup_share,
                                   say=lambda s: print(s, flush=True), **extra)
    killed = sum(r["outcome"] == "killed" for r in records)
    resumed = re.findall(r"resumed from the checkpoint of step (\d+)", final)
    problem = final if final.startswith("exit status") else difference(metrics(out), metrics(ref))
    print(f"final run: {'resumed from the checkpoint of step ' + resumed[-1] if resumed else 'started from scratch'}"
          f"; {killed} of {len(records)} kills landed; {time.monotonic() - began:.0f} s in all", flush=True)
    if problem:
        print(f"FAIL: the finished run differs from the uninterrupted one: {problem[-2000:]}", flush=True)
        return 1
    print(f"OK: all {len(metrics(ref))} metrics lines equal the uninterrupted run's (rel 1e-5)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
