"""Sweeps: a 2 x 2 grid killed and rerun, SIGTERM then resume, the report, failed runs, malformed axes, commands."""
import csv
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "lengths/chosen",
        "lengths/rejected", "loss")
# configs/tiny.py as a seconds-long run: 6 steps, held-out evaluation at step 3 and at the end.
OVERRIDES = [f"--config.{k}={v}" for k, v in {
    "data.builtin_train_rows": 256, "data.builtin_eval_rows": 32, "train.batch_size": 8, "train.max_steps": 6,
    "train.eval_every": 3, "checkpoint.every": 3, "model.hidden_size": 32, "model.intermediate_size": 64,
    "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1, "model.scan_layers": False,
    "step.logprob_chunk_len": 64, "logging.progress_bar": False, "logging.tensorboard": False,
    "export.enabled": False, "train.generate_every": 0}.items()]  # the report's gen/* columns: test_sweep_report_gen


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: a shared JAX compilation cache (the runs' identical init programs compile once)."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")))


def _sweep_cmd(out, *axes, overrides=OVERRIDES):
    return [sys.executable, "-m", "simpo_jax.sweep", "--config", TINY, *axes, "--out", str(out), *overrides]


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear in time"
        time.sleep(0.05)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(run_dir):
    return {name: (run_dir / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "train.log")}


def test_interrupted_grid_reruns_only_the_remaining_runs_then_reports(tmp_path, env):
    from PIL import Image

    from simpo_jax.sweep import main

    out = tmp_path / "sweep"
    cmd = _sweep_cmd(out, "--sweep", "loss.beta=2.0,10", "--sweep", "loss.gamma_beta_ratio=0.3,0.8")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for(out / "sweep.json", proc)
    names = [run["name"] for run in json.loads((out / "sweep.json").read_text())["runs"]]
    assert names == ["beta=2.0,gamma_beta_ratio=0.3", "beta=2.0,gamma_beta_ratio=0.8",
                     "beta=10,gamma_beta_ratio=0.3", "beta=10,gamma_beta_ratio=0.8"]
    # Interrupt as a crash would: SIGKILL the sweep and its training process once the third run has started.
    _wait_for(out / names[2] / "train.log", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, first
    finished = [(out / n / "summary.json").exists() for n in names]
    assert finished == [True, True, False, False], first
    before = {n: _snapshot(out / n) for n in names[:2]}

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for i, name in enumerate(names[:2], 1):
        assert f"[{i}/4] {name}: finished earlier, skipped" in again.stdout
    for i, name in enumerate(names[2:], 3):
        assert f"[{i}/4] {name}: running" in again.stdout
    assert "sweep done: 2 ran, 2 skipped (finished earlier), 0 failed" in again.stdout
    assert again.stdout.count(": running") == 2
    assert {n: _snapshot(out / n) for n in names[:2]} == before  # the finished runs were not touched
    for name in names:
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 6

    assert main(["report", str(out)]) == 0
    with open(out / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    for row in rows:
        beta, ratio = (part.split("=")[1] for part in row["run"].split(","))
        assert (row["loss.beta"], row["loss.gamma_beta_ratio"], row["status"]) == (beta, ratio, "finished")
        evals = [m for m in _lines(out / row["run"] / "metrics.jsonl") if "eval_rewards/accuracies" in m]
        assert [m["step"] for m in evals] == [3, 6]
        for metric in EVAL:
            assert float(row[f"final_eval_{metric}"]) == evals[-1][f"eval_{metric}"], metric
        best = max(m["eval_rewards/accuracies"] for m in evals)
        assert float(row["best_eval_rewards/accuracies"]) == best
        assert int(row["best_step"]) in [m["step"] for m in evals if m["eval_rewards/accuracies"] == best]
    # The loss depends on beta and gamma: four distinct values, so rows cannot have been mixed up unnoticed.
    assert len({row["final_eval_loss"] for row in rows}) == 4
    table = (out / "report" / "results.md").read_text()
    assert all(f"| {name} | finished | " in table for name in names)
    for png in ("eval_accuracy.png", "margins.png", "lengths.png"):
        path = out / "report" / png
        assert path.read_bytes()[:8] == PNG_SIGNATURE, png
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200
            low, high = image.convert("L").getextrema()
            assert high - low > 100, f"{png} is blank"


def _children(pid: int) -> list[int]:
    """The ids of the live processes whose parent is `pid` (from /proc)."""
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _without_timing(path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in _lines(path)]


def test_sigterm_to_the_sweep_checkpoints_the_running_training_and_the_rerun_resumes_it(tmp_path, env):
    """SIGTERM to the sweep: the training saves its step and ends, the sweep exits 143; a rerun resumes it."""
    out = tmp_path / "sweep"
    # 200 steps (a few seconds) so that SIGTERM lands mid-run; no periodic checkpoints, so the only one before
    # the end is the one SIGTERM makes. checkpoint.keep does not change training: the second grid point is an
    # uninterrupted run of the same training, to compare the resumed one with.
    overrides = [a for a in OVERRIDES if not a.startswith(("--config.train.max_steps=", "--config.train.eval_every=",
                                                           "--config.checkpoint.every="))]
    overrides += ["--config.train.max_steps=200", "--config.train.eval_every=0", "--config.checkpoint.every=0"]
    cmd = _sweep_cmd(out, "--sweep", "checkpoint.keep=2,3", overrides=overrides)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics = out / "keep=2" / "metrics.jsonl"
        _wait_for(metrics, proc)
        while len(metrics.read_text().splitlines()) < 2:  # the training is past step 1
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        [child] = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the sweep only, not its process group
        first = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, first
    assert "keep=2: running" in first and "stopped by SIGTERM (the run saved a checkpoint)" in first, first
    assert "keep=3" not in first and not (out / "keep=3").exists()  # the sweep stopped: no next run
    assert not pathlib.Path(f"/proc/{child}").exists()  # the training ended (and was reaped), not orphaned
    log = (out / "keep=2" / "train.log").read_text()
    saved = int(re.search(r"SIGTERM: saved the checkpoint of step (\d+); exiting", log).group(1))
    steps = [m["step"] for m in _lines(metrics)]
    assert 2 <= saved < 200 and steps == list(range(1, saved + 1)), (saved, steps)
    checkpoints = sorted(int(p.name) for p in (out / "keep=2" / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == [saved]  # saved at the step it was at (no periodic checkpoints were due)
    assert not (out / "keep=2" / "summary.json").exists()
    interrupted = metrics.read_bytes()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/2] keep=2: running" in again.stdout and "[2/2] keep=3: running" in again.stdout
    assert "sweep done: 2 ran, 0 skipped (finished earlier), 0 failed" in again.stdout
    log = (out / "keep=2" / "train.log").read_text()
    assert log.count("resumed from the checkpoint of step") == 1
    assert f"resumed from the checkpoint of step {saved}\n" in log
    # Steps 1..saved were not run again: their lines (wall-clock tokens_per_second included) are untouched.
    assert metrics.read_bytes().startswith(interrupted)
    assert [m["step"] for m in _lines(metrics)] == list(range(1, 201)) + [200]  # the last: held-out metrics
    # The resumed run ends where the uninterrupted one does: every metric of every step, exactly.
    assert _without_timing(metrics) == _without_timing(out / "keep=3" / "metrics.jsonl")
    final = [json.loads((out / n / "summary.json").read_text())["final"] for n in ("keep=2", "keep=3")]
    assert final[0] == final[1] and "eval_loss" in final[0]


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, env):
    out = tmp_path / "sweep"
    # A learning rate of 1e30 makes the loss non-finite at step 2: that run fails; the next one must still run.
    cmd = _sweep_cmd(out, "--sweep", "optimizer.learning_rate=1e30,1e-3") + ["--config.optimizer.warmup_ratio=0.0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] learning_rate=1e30: running" in proc.stdout
    non_finite = r"the loss at step \d+ is (nan|inf)"
    assert "FAILED after" in proc.stdout and re.search(non_finite, proc.stdout)  # the tail of the run's log
    assert "[2/2] learning_rate=1e-3: running" in proc.stdout
    assert "sweep done: 1 ran, 0 skipped (finished earlier), 1 failed: learning_rate=1e30" in proc.stdout
    assert not (out / "learning_rate=1e30" / "summary.json").exists()
    assert re.search(non_finite, (out / "learning_rate=1e30" / "train.log").read_text())
    assert json.loads((out / "learning_rate=1e-3" / "summary.json").read_text())["status"] == "finished"


MALFORMED = [
    (["--sweep", "loss.betta=1,2"], "sweep axis 'loss.betta': unknown field (fields of loss: beta,"),
    (["--sweep", "losss.beta=1"], "sweep axis 'losss.beta': unknown field ('losss' is not a section"),
    (["--sweep", "loss.beta="], "sweep axis 'loss.beta': empty value list"),
    (["--sweep", "loss.beta=2.0,,3"], "sweep axis 'loss.beta': empty value at position 2"),
    (["--sweep", "loss.beta=2.0,abc"], "sweep axis 'loss.beta': value 'abc' is not a valid float"),
    (["--sweep", "train.max_steps=4,2.5"], "sweep axis 'train.max_steps': value '2.5' is not a valid int"),
    (["--sweep", "data.shuffle=true,maybe"], "sweep axis 'data.shuffle': value 'maybe' is not a valid bool"),
    (["--sweep", "model.num_layers=2,two"], "sweep axis 'model.num_layers': value 'two' is not a valid int"),
    (["--sweep", "loss.beta=2,2.0"], "sweep axis 'loss.beta': value '2.0' appears twice"),
    (["--sweep", "loss.beta"], "sweep axis 'loss.beta': expected <section>.<field>=<value>"),
    (["--sweep", "train.output_dir=a,b"], "sweep axis 'train.output_dir': set by the sweep"),
    (["--zip", "loss.beta=2,10", "--zip", "optimizer.learning_rate=1e-6"],
     "zip axes must have the same number of values: loss.beta has 2, optimizer.learning_rate has 1"),
    (["--sweep", "loss.beta=2,3", "--sweep", "loss.beta=4"], "sweep axis 'loss.beta': given more than once"),
    (["--sweep", "loss.beta=2,3", "--config.loss.beta=4"], "field 'loss.beta' is both swept and overridden"),
    (["--sweep", "loss.beta=2,3", "--config.loss.betta=4"], "override 'loss.betta': unknown field"),
    (["--sweep", "loss.beta=2,-1"], "run beta=-1: loss config field 'beta': must be > 0"),
    ([], "give at least one --sweep or --zip axis"),
]


@pytest.mark.parametrize("axes,message", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_axes_fail_before_any_run(tmp_path, monkeypatch, axes, message):
    from simpo_jax import sweep

    monkeypatch.setattr(sweep.subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as error:
        sweep.main(["--config", TINY, *axes, "--out", str(tmp_path / "sweep")])
    assert message in str(error.value)
    assert not (tmp_path / "sweep").exists()


def test_malformed_axis_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.sweep", "--config", TINY, "--sweep", "loss.beta=2,x",
                           "--out", str(tmp_path / "sweep")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error: sweep axis 'loss.beta': value 'x' is not a valid float" in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_print_commands_zip_axes_and_per_run_checkpoint_directories(tmp_path, capsys):
    from simpo_jax import sweep

    out = tmp_path / "sweep"
    args = ["run", "--config", TINY, "--zip", "loss.beta=2,10", "--sweep", "loss.gamma_beta_ratio=0.3,0.5",
            "--zip", "optimizer.learning_rate=1e-3,5e-4", "--out", str(out), "--print-commands",
            "--config.checkpoint.directory=gs://bucket/ckpt", "--config.train.max_steps=6"]
    assert sweep.main(args) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    names = ["beta=2,learning_rate=1e-3,gamma_beta_ratio=0.3", "beta=2,learning_rate=1e-3,gamma_beta_ratio=0.5",
             "beta=10,learning_rate=5e-4,gamma_beta_ratio=0.3", "beta=10,learning_rate=5e-4,gamma_beta_ratio=0.5"]
    assert len(commands) == 4
    for cmd, name in zip(commands, names):
        assert cmd[:5] == ["python", "-m", "simpo_jax.train", "--config", TINY]
        values = dict(arg[len("--config."):].split("=", 1) for arg in cmd[5:])
        beta, lr, ratio = (part.split("=")[1] for part in name.split(","))
        assert values == {"checkpoint.directory": f"gs://bucket/ckpt/{name}", "train.max_steps": "6",
                          "loss.beta": beta, "optimizer.learning_rate": lr, "loss.gamma_beta_ratio": ratio,
                          "train.output_dir": str(out / name)}
    assert sorted(os.listdir(out)) == ["sweep.json"]  # nothing ran
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == names and all(r["seed"] == 0 for r in manifest["runs"])
    # The same directory with another grid is refused.
    with pytest.raises(SystemExit, match="holds a different sweep \\(axes differ"):
        sweep.main([a if a != "loss.gamma_beta_ratio=0.3,0.5" else "loss.gamma_beta_ratio=0.3" for a in args])



def _fake_sweep(out, axes, metrics):
    """A sweep directory without training: sweep.json, and for each run in `metrics` (name -> (lines, finished))
    its metrics.jsonl and, if finished, summary.json."""
    from simpo_jax.sweep_grid import Axis, expand

    runs = expand([Axis(tuple(a["fields"]), tuple(tuple(v) for v in a["values"]), a["zip"]) for a in axes])
    out.mkdir()
    manifest = {"config": "configs/tiny.py", "overrides": [], "axes": axes,
                "runs": [{"name": r.name, "values": r.values} for r in runs]}
    (out / "sweep.json").write_text(json.dumps(manifest))
    for name, (lines, finished) in metrics.items():
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        if finished:
            (out / name / "summary.json").write_text(json.dumps({"status": "finished", "steps": lines[-1]["step"]}))
    return [r.name for r in runs]


def _eval(step, acc, loss):
    return {"step": step, "eval_rewards/accuracies": acc, "eval_loss": loss, "eval_rewards/margins": 0.1,
            "eval_logps/chosen": -1.0, "eval_logps/rejected": -2.0, "eval_lengths/chosen": 9.0,
            "eval_lengths/rejected": 7.0}


def _train(step, margin):
    return {"step": step, "loss": 0.6, "rewards/margins": margin, "lengths/chosen": 9.0, "lengths/rejected": 7.0}


def _check_pngs(report):
    from PIL import Image

    for png in ("eval_accuracy.png", "margins.png", "lengths.png"):
        assert (report / png).read_bytes()[:8] == PNG_SIGNATURE, png
        with Image.open(report / png) as image:
            image.verify()


def test_launch_prefix_runs_each_grid_point_on_a_slice_and_fetches_it(tmp_path, capsys):
    from simpo_jax import sweep

    out = tmp_path / "grid"
    prefix = "launch/tpu.sh train --name pod --zone us-east5-a --bucket gs://b/sweeps"
    assert sweep.main(["--config", TINY, "--sweep", "loss.beta=2,10", "--out", str(out), "--print-commands",
                       "--launch", prefix, "--config.train.max_steps=6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert shlex.split(lines[0]) == [*shlex.split(prefix), "--wait", "--run", "grid/beta=2", "--fetch",
                                     str(out / "beta=2"), "--config", TINY, "--",
                                     "--config.train.max_steps=6", "--config.loss.beta=2"]
    # What that command does (its dry run): train on every worker, wait, then fetch the outputs to the run dir,
    # where the sweep looks for summary.json and the report for metrics.jsonl.
    words = shlex.split(lines[0])
    proc = subprocess.run(["bash", words[0], *words[1:2], "--dry-run", *words[2:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ssh, mkdir, fetch = (shlex.split(line) for line in proc.stdout.splitlines())
    assert "--worker=all" in ssh and "--config.checkpoint.directory=gs://b/sweeps/grid/beta=2/checkpoints" in ssh[-1]
    assert fetch == ["gcloud", "storage", "rsync", "--recursive", "gs://b/sweeps/grid/beta=2/output",
                     str(out / "beta=2")]
    with pytest.raises(SystemExit, match="expected a `launch/tpu.sh train"):
        sweep.main(["--config", TINY, "--sweep", "loss.beta=2,10", "--out", str(tmp_path / "x"), "--launch", "ls"])


def test_report_best_and_final_statuses_and_panels_without_training(tmp_path):
    from simpo_jax.sweep import main

    axes = [{"fields": ["loss.name"], "values": [["simpo"], ["dpo"]], "zip": False},
            {"fields": ["loss.beta", "optimizer.learning_rate"], "values": [["2", "1e-6"], ["10", "5e-7"]],
             "zip": True},
            {"fields": ["loss.gamma_beta_ratio"], "values": [["0.3"], ["0.5"]], "zip": False}]
    names = ["name=simpo,beta=2,learning_rate=1e-6,gamma_beta_ratio=0.3",
             "name=simpo,beta=2,learning_rate=1e-6,gamma_beta_ratio=0.5",
             "name=simpo,beta=10,learning_rate=5e-7,gamma_beta_ratio=0.3"]

    def run(at_2, final):  # as train logs: held-out metrics with step 2's line, and after the last step
        return [_train(1, -0.1), {**_train(2, 0.2), **_eval(2, *at_2)}, _train(3, 0.3), _train(4, 0.4),
                _eval(4, *final)]

    metrics = {
        # The final accuracy ties the step-2 one, whose loss is lower: step 2 is the best.
        names[0]: (run((0.75, 0.4), (0.75, 0.5)), True),
        # A non-finite final accuracy (logged as a string): the best is the earlier evaluation.
        names[1]: (run((0.9, 0.5), ("nan", 0.3)), True),
        names[2]: ([_train(1, 0.1)], False),  # stopped before finishing
    }
    got = _fake_sweep(tmp_path / "sweep", axes, metrics)
    assert got[:3] == names and len(got) == 8
    assert main(["report", str(tmp_path / "sweep")]) == 0
    with open(tmp_path / "sweep" / "report" / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert [rows[n]["status"] for n in got] == ["finished", "finished", "incomplete"] + ["not run"] * 5
    first, second, third = (rows[n] for n in names)
    assert (first["steps"], first["best_step"], first["best_eval_loss"], first["final_eval_loss"]) == \
        ("4", "2", "0.4", "0.5")
    assert (second["final_eval_rewards/accuracies"], second["best_eval_rewards/accuracies"]) == ("nan", "0.9")
    assert (third["steps"], third["final_eval_loss"], third["best_step"]) == ("1", "", "")
    assert (rows[got[3]]["optimizer.learning_rate"], rows[got[3]]["steps"]) == ("5e-7", "")
    _check_pngs(tmp_path / "sweep" / "report")

    # One axis: a bar chart instead of the heatmap.
    one = [{"fields": ["loss.beta"], "values": [["2"], ["10"]], "zip": False}]
    _fake_sweep(tmp_path / "one", one, {"beta=2": ([_train(1, 0.1), _eval(1, 0.5, 0.6)], True)})
    assert main(["report", str(tmp_path / "one")]) == 0
    _check_pngs(tmp_path / "one" / "report")
