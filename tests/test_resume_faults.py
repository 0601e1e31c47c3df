"""Resume after what a crash leaves behind: a cut-off metrics line, damaged checkpoints, SIGKILLs at random moments."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from test_train import ROOT, _metrics, tiny_overrides

sys.path.insert(0, str(ROOT / "benchmarks"))
import random_kills  # noqa: E402

EVAL = {"train.eval_every": 3}  # as random_kills runs: evaluations mid-run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints 4, 8, 12) and its timeline."""
    return random_kills.reference(tmp_path_factory.mktemp("reference"))


def _train(out):
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
                           *tiny_overrides(out, **EVAL)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _copy(ref, out):
    shutil.copytree(ref, out)
    shutil.rmtree(out / "hf")
    os.remove(out / "summary.json")


def _truncate_arrays(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)


def _same(got, want):
    assert random_kills.difference(got, want) is None, random_kills.difference(got, want)


def test_cut_metrics_line_and_damaged_latest_checkpoint_resume_from_the_one_before(reference, tmp_path):
    ref, _ = reference
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    _copy(ref, out)
    _truncate_arrays(ckpt / "12")  # e.g. a partial copy from a bucket
    lines = (ref / "metrics.jsonl").read_bytes().split(b"\n")[:-1]  # steps 1..12 and the final held-out metrics
    assert len(lines) == 13
    # Garbage where a crash left the file extended with zeros, and the last line cut off mid-write.
    (out / "metrics.jsonl").write_bytes(b"\n".join(lines[:5] + [b"\0" * 16] + lines[5:12] + [lines[12][:25]]))
    code, output = _train(out)
    assert code == 0 and "Traceback" not in output, output[-4000:]
    assert f"warning: checkpoint of step 12 in {ckpt} could not be restored (" in output
    assert "; trying step 8\n" in output and "resumed from the checkpoint of step 8\n" in output
    assert f"warning: dropped line 6 of {out / 'metrics.jsonl'}: unreadable (16 bytes" in output
    assert f"warning: dropped line 14 of {out / 'metrics.jsonl'}: cut off mid-write (25 bytes" in output
    aside = [p for p in ckpt.iterdir() if p.name.startswith("12.damaged-")]
    assert len(aside) == 1 and f"moved the damaged checkpoint of step 12 to {aside[0]}" in output
    assert sorted(os.path.getsize(p) for p in glob.glob(f"{aside[0]}/state/**/d/*", recursive=True)) == sorted(
        os.path.getsize(p) // 2 for p in glob.glob(f"{ref}/checkpoints/12/state/**/d/*", recursive=True))
    assert (ckpt / "12" / "commit_success.txt").exists()  # saved anew next to the damaged one
    _same(_metrics(out), _metrics(ref))
    # Steps 1..8 were not re-run (their lines, timing included, are the copied ones); 9..12 were.
    got = (out / "metrics.jsonl").read_bytes().split(b"\n")
    assert got[:8] == lines[:8] and all(g != w for g, w in zip(got[8:12], lines[8:12]))


def test_no_checkpoint_restores_exits_with_an_error_and_keeps_them(reference, tmp_path):
    ref, _ = reference
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    _copy(ref, out)
    _truncate_arrays(ckpt / "12")
    shutil.rmtree(next((ckpt / "8" / "state").glob("**/d")))  # a directory missing inside the step
    (ckpt / "4" / "data" / "metadata").write_text('{"epo')  # the iterator position cut off
    before = sorted(p.name for p in ckpt.iterdir())
    code, output = _train(out)
    assert code == 2 and "Traceback" not in output, output[-4000:]  # a user error: one line, status 2
    assert "; trying step 8\n" in output and "; trying step 4\n" in output and "no older checkpoint is left" in output
    assert output.strip().splitlines()[-1].startswith(
        f"error: none of the checkpoints in {ckpt} (steps 4, 8, 12) could be restored (step 12: ")
    assert sorted(p.name for p in ckpt.iterdir()) == before and "resumed" not in output
    assert (out / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "emptied", "missing_array_dir", "missing_item", "partial_copy"])
def test_checkpointer_falls_back_past_a_damaged_step_and_saves_it_anew(tmp_path, damage):
    import jax.numpy as jnp

    from simpo_jax.checkpoint import Checkpointer

    def state(x):
        return {"w": jnp.arange(4096, dtype=jnp.float32) * x, "b": jnp.full((3, 5), x, jnp.float32)}

    directory = tmp_path / "ckpt"
    checkpoints = Checkpointer(str(directory), every=1)
    for step in (1, 2):
        checkpoints.save(step, state(step), {"position": step})
    checkpoints.close()
    step_dir, files = directory / "2", sorted(p for p in (directory / "2").rglob("*") if p.is_file())
    if damage == "truncated":
        _truncate_arrays(step_dir)
    elif damage == "emptied":
        for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
            os.truncate(path, 0)
    elif damage == "missing_array_dir":
        shutil.rmtree(next((step_dir / "state").glob("**/d")))
    elif damage == "missing_item":
        shutil.rmtree(step_dir / "state")
    else:  # a copy that stopped half-way: every other file is missing
        for path in files[::2]:
            path.unlink()
    checkpoints = Checkpointer(str(directory), every=1)
    restored, position, step = checkpoints.restore_latest_good(state(0))
    assert (step, position) == (1, {"position": 1}) and float(restored["w"][3]) == 3.0
    assert [p.name.split("-")[0] for p in directory.iterdir() if ".damaged-" in p.name] == ["2.damaged"]
    assert checkpoints.save(2, state(5), {"position": 5})  # no collision with the damaged step
    checkpoints.close()
    checkpoints = Checkpointer(str(directory), every=1)
    restored, position, step = checkpoints.restore_latest_good(state(0))
    checkpoints.close()
    assert (step, position) == (2, {"position": 5}) and float(restored["w"][3]) == 15.0


def test_random_sigkills_then_resume_reproduce_the_uninterrupted_run(reference, tmp_path):
    ref, timeline = reference
    lines = []
    out, records, final, saved = random_kills.kill_run(tmp_path, timeline, kills=2, seed=3, startup_share=0.0,
                                                       say=lines.append)
    report = "\n".join(lines)
    assert [r["outcome"] for r in records] == ["killed"] * 2, report
    assert not final.startswith("exit status"), report + final[-4000:]
    if saved:  # the newest complete checkpoint when the last run started (none if both kills came before one)
        assert f"resumed from the checkpoint of step {saved}\n" in final, report + final[-4000:]
    _same(_metrics(out), _metrics(ref))
