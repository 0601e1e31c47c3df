"""The train and score commands as two processes on localhost (jax.distributed, gloo, 4 fake CPU devices each)."""
import json
import os
import subprocess
import sys

import numpy as np

from test_data_multihost import _free_port
from test_train import ROOT, _metrics, tiny_overrides

CPU8 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
CPU4 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def _command(out, *extra):
    return [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
            *tiny_overrides(out), "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.train.generate_every=6", *extra]  # greedy answers on both processes, step_0's re-read


def _start_pair(command, outs, *extra, envs=({}, {})):
    """`command(out, *args)` on two processes of 4 devices (process i writes to outs[i]), as `launch/` starts it."""
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = command(outs[i], *extra, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, **CPU4, **envs[i])))
    return procs


def _finish(procs, timeout=420):
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    return outputs


def _assert_close(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g.keys(), w.keys())
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=2e-5, atol=1e-6, err_msg=f"step {w['step']} {key}")


def test_two_processes_save_on_one_workers_sigterm_resume_and_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = subprocess.run(_command(single), cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **CPU8),
                          timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A maintenance event reaches worker 1 only, after step 5: both workers save step 5 together and exit 0.
    procs = _start_pair(_command, (multi, multi), envs=[{}, {"SIMPO_JAX_SIGTERM_AT_STEP": "5"}])
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "process 0 of 2; 8 devices (4 local)" in outputs[0]
    assert all("SIGTERM: saved the checkpoint of step 5" in out for out in outputs), outputs
    assert max(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == 5
    assert not (multi / "summary.json").exists()
    # The relaunched pair resumes from that checkpoint and finishes exactly as one process with 8 devices.
    procs = _start_pair(_command, (multi, multi))
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from the checkpoint of step 5" in outputs[0]
    assert "resumed" not in outputs[1] and "final held-out" not in outputs[1]  # only process 0 logs
    _assert_close(_metrics(multi), _metrics(single))
    assert json.loads((multi / "summary.json").read_text())["steps"] == 12
    assert (multi / "hf" / "model.safetensors").exists()


def _score_command(out, *extra):
    return [sys.executable, "-m", "simpo_jax.score", "--config", str(ROOT / "configs" / "tiny.py"),
            *tiny_overrides(out.parent / "run"), "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.score.batch_size=12", f"--output={out}", *extra]


def test_two_processes_score_like_one_process(tmp_path):
    """Every process feeds the same global batches and gets the whole result; only process 0 writes. The pair
    scores packed rows (the pairs reordered over the 4 data-parallel shards), the single process padded ones."""
    single = tmp_path / "single.jsonl"
    proc = subprocess.run(_score_command(single), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **CPU8), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    procs = _start_pair(_score_command, [tmp_path / f"multi{i}.jsonl" for i in range(2)],
                        "--config.data.packing=True")
    outputs = _finish(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    want = [json.loads(line) for line in single.read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "multi0.jsonl").read_text().splitlines()]
    assert len(want) == 32 and [r["index"] for r in got] == [r["index"] for r in want]  # 3 batches, the last padded
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"row {w['index']} {key}")
    assert not (tmp_path / "multi1.jsonl").exists() and "wrote" not in outputs[1]
