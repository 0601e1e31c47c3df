"""`python -m simpo_jax.sweep [run] --config F --sweep a=1,2 [--zip b=..] --out DIR` and `... report DIR`."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

from simpo_jax.errors import ConfigError
from simpo_jax.sweep_grid import Axis, Run, apply, expand, load_config, parse_axis, parse_override, zip_axes

MANIFEST = "sweep.json"
LOG_FILE = "train.log"
TAIL_LINES = 20
USAGE = """python -m simpo_jax.sweep [run] --config configs/<setting>.py --sweep "loss.beta=2.0,2.5,10" \\
        [--sweep ...] [--zip "loss.beta=2,10" --zip "optimizer.learning_rate=1e-6,5e-7"] --out runs/<name> \\
        [--print-commands] [--launch "launch/tpu.sh train --name N --zone Z --bucket gs://B"] \
        [--config.<field>=<value> ...]
       python -m simpo_jax.sweep report runs/<name>"""


class _Axes(argparse.Action):
    """Collects --sweep and --zip in command-line order (the zipped group sits where its first --zip is)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.axes = (namespace.axes or []) + [(option_string == "--zip", value)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simpo_jax.sweep", usage=USAGE, description=__doc__)
    p.add_argument("--config", required=True, help="a configs/<setting>.py file (as for simpo_jax.train)")
    p.add_argument("--sweep", action=_Axes, dest="axes", metavar="FIELD=V1,V2,...",
                   help="a grid axis; several --sweep axes are crossed")
    p.add_argument("--zip", action=_Axes, dest="axes", metavar="FIELD=V1,V2,...",
                   help="zipped axes: all --zip axes advance together (equal lengths) as one grid axis")
    p.add_argument("--out", required=True, help="the sweep directory: one sub-directory per run, sweep.json")
    p.add_argument("--print-commands", action="store_true",
                   help="print each unfinished run's `python -m simpo_jax.train ...` command, one per line, "
                        "instead of running it (e.g. for a TPU pod launch script); writes sweep.json")
    p.add_argument("--launch", default="", metavar="PREFIX",
                   help="run each run on a TPU slice with this launch/tpu.sh train command prefix (it adds "
                        "--wait, --run <out name>/<run>, --fetch <out>/<run>, --config and the run's overrides): "
                        "the sweep then works as locally, with checkpoints in the bucket")
    return p


def plan(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Validate everything (axes, overrides, every grid point's full config) and return the manifest."""
    if not args.axes:
        raise ConfigError("give at least one --sweep or --zip axis")
    make_config, digest = load_config(args.config)
    base = make_config()
    fixed = dict(parse_override(arg, base) for arg in overrides)
    plain = [parse_axis(text, base) for zipped, text in args.axes if not zipped]
    zipped = [parse_axis(text, base, zipped=True) for zipped, text in args.axes if zipped]
    axes: list[Axis] = []
    for is_zip, _ in args.axes:  # keep the command-line order; the zipped group where its first --zip is
        if not is_zip:
            axes.append(plain.pop(0))
        elif zipped:
            axes.append(zip_axes(zipped))
            zipped = []
    runs = expand(axes)
    both = sorted(set(fixed) & set(runs[0].values))
    if both:
        raise ConfigError(f"field {both[0]!r} is both swept and overridden with --config.{both[0]}=...")
    from simpo_jax.config import build_run_config  # imports JAX: only once the axes are known to be well formed

    entries = []
    for run in runs:
        out_dir = os.path.join(args.out, run.name)
        assignments = _run_assignments(run, fixed, make_config(), out_dir)
        config = apply(make_config(), assignments)
        try:
            build_run_config(config)
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None
        command = ["python", "-m", "simpo_jax.train", "--config", args.config,
                   *(f"--config.{f}={v}" for f, v in assignments.items())]
        if args.launch:
            command = launch_command(args.launch, args.out, run.name, out_dir, args.config, assignments)
        entries.append({"name": run.name, "values": run.values, "output_dir": out_dir,
                        "seed": config.train.seed, "data_seed": config.data.seed, "command": command})
    return {"config": args.config, "config_sha256": digest, "overrides": overrides,
            "axes": [a.to_json() for a in axes], "runs": entries}


def launch_command(prefix: str, out: str, name: str, out_dir: str, config_file: str,
                   assignments: dict[str, str]) -> list[str]:
    """`launch/tpu.sh train ...` that runs one grid point on every worker, waits, and fetches its outputs."""
    words = shlex.split(prefix)
    if "train" not in words or not any(w.endswith("tpu.sh") for w in words):
        raise ConfigError(f"--launch {prefix!r}: expected a `launch/tpu.sh train --name ... --zone ... --bucket "
                          "gs://...` prefix")
    own = ("train.output_dir", "checkpoint.directory")  # tpu.sh puts both under the run's name in the bucket
    return [*words, "--wait", "--run", f"{os.path.basename(os.path.normpath(out))}/{name}", "--fetch", out_dir,
            "--config", config_file, "--", *(f"--config.{f}={v}" for f, v in assignments.items() if f not in own)]


def _run_assignments(run: Run, fixed: dict[str, str], config: Any, out_dir: str) -> dict[str, str]:
    """Pass-through overrides, the run's values, its output_dir, and its own checkpoint directory if shared."""
    assignments = {**fixed, **run.values, "train.output_dir": out_dir}
    shared = apply(config, {**fixed, **run.values}).checkpoint.directory
    if shared and "checkpoint.directory" not in run.values:  # runs must never resume from each other
        assignments["checkpoint.directory"] = shared.rstrip("/") + "/" + run.name
    return assignments


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    """sweep.json; an existing one must describe the same sweep (the same config, overrides and axes)."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("config", "overrides", "axes"):
            if old.get(key) != manifest[key]:
                raise ConfigError(f"{out} holds a different sweep ({key} differs: {old.get(key)} there, "
                                  f"{manifest[key]} now); use another --out")
        if old.get("config_sha256") != manifest["config_sha256"]:
            print(f"warning: {manifest['config']} changed since this sweep started; finished runs used the old "
                  "file", file=sys.stderr, flush=True)
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)


def summary_path(run_dir: str) -> str:
    """The run's summary.json, which train writes as its last act on success."""
    from simpo_jax.train import SUMMARY_FILE  # imports JAX: not needed to reject a malformed axis

    return os.path.join(run_dir, SUMMARY_FILE)


def is_finished(run_dir: str) -> bool:
    return os.path.exists(summary_path(run_dir))


class _Stop:
    """SIGTERM to the sweep: forwarded to the running train process (which saves and exits), then stop."""

    def __init__(self):
        self.requested, self.child = False, None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    with open(path, errors="replace") as f:
        text = f.read().replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _launch(run: dict[str, Any], log_path: str, stop: _Stop) -> int | None:
    """One train process, its output appended to train.log; its exit code, or None on Ctrl-C."""
    with open(log_path, "a") as log:
        log.write(f"=== simpo_jax.sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(run['command'])}\n")
        log.flush()
        try:
            local = run["command"][0] == "python"  # else a launch/tpu.sh command (a TPU slice)
            stop.child = subprocess.Popen([sys.executable, *run["command"][1:]] if local else run["command"],
                                          stdout=log, stderr=subprocess.STDOUT)
            return stop.child.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches the child too: let it end
            if stop.child is not None:
                stop.child.wait()
            return None


def execute(manifest: dict[str, Any]) -> int:
    """Run the unfinished runs one after another; returns the exit status (1 if any run failed)."""
    runs, stop = manifest["runs"], _Stop()
    ran, skipped, failed = [], [], []
    for i, run in enumerate(runs, 1):
        name, out_dir = run["name"], run["output_dir"]
        if is_finished(out_dir):
            print(f"[{i}/{len(runs)}] {name}: finished earlier, skipped", flush=True)
            skipped.append(name)
            continue
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, LOG_FILE)
        print(f"[{i}/{len(runs)}] {name}: running (log: {log_path})", flush=True)
        began = time.time()
        code = _launch(run, log_path, stop)
        seconds = time.time() - began
        if code is None or (stop.requested and not is_finished(out_dir)):
            how = "Ctrl-C" if code is None else "SIGTERM (the run saved a checkpoint)"
            print(f"    stopped by {how} after {seconds:.0f} s; re-invoke the same command to continue", flush=True)
            return 130 if code is None else 143
        if code == 0 and is_finished(out_dir):
            with open(summary_path(out_dir)) as f:
                acc = json.load(f).get("final", {}).get("eval_rewards/accuracies")
            print(f"    finished in {seconds:.0f} s" + (f", eval_rewards/accuracies={acc:.4f}" if acc is not None
                                                       else ""), flush=True)
            ran.append(name)
        else:
            why = f"exit code {code}" if code != 0 else "exit code 0 without summary.json (stopped early)"
            print(f"    FAILED after {seconds:.0f} s ({why}); last lines of {log_path}:\n"
                  + "\n".join("      " + line for line in _tail(log_path).splitlines()), flush=True)
            failed.append(name)
        if stop.requested:
            print("SIGTERM: stopping; re-invoke the same command to continue", flush=True)
            return 143
    print(f"sweep done: {len(ran)} ran, {len(skipped)} skipped (finished earlier), {len(failed)} failed"
          + (": " + ", ".join(failed) if failed else ""), flush=True)
    return 1 if failed else 0


def print_commands(manifest: dict[str, Any]) -> None:
    """Each unfinished run's train command on stdout (shell-quoted), skipped ones noted on stderr."""
    for run in manifest["runs"]:
        if is_finished(run["output_dir"]):
            print(f"# {run['name']}: finished, skipped", file=sys.stderr)
        else:
            print(shlex.join(run["command"]))


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from simpo_jax.sweep_report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    overrides = [a for a in argv if a.startswith("--config.")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        manifest = plan(args, overrides)
        _write_manifest(args.out, manifest)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.print_commands:
        print_commands(manifest)
        return 0
    print(f"sweep of {len(manifest['runs'])} runs in {args.out} (manifest: {os.path.join(args.out, MANIFEST)})",
          flush=True)
    return execute(manifest)


if __name__ == "__main__":
    sys.exit(main())
