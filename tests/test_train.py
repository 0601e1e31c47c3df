"""The train command: SIGKILL/SIGTERM resume, restore on other meshes, scoring, and the step-1 loss."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import multi_device

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_second",)


def tiny_overrides(out, **extra):
    """Command-line overrides that make configs/tiny.py a seconds-long run."""
    values = {"train.output_dir": str(out), "data.builtin_train_rows": 256, "data.builtin_eval_rows": 32,
              "train.batch_size": 8, "train.max_steps": 12, "train.eval_every": 0, "checkpoint.every": 4,
              "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 2,
              "model.num_kv_heads": 1, "step.logprob_chunk_len": 32, "logging.progress_bar": False,
              "train.generate_every": 0, **extra}  # generations: tests/test_train_generations.py
    return [f"--config.{k}={v}" for k, v in values.items()]


def tiny_config(out, **extra):
    """The same, as a ConfigDict for in-process runs."""
    sys.path.insert(0, str(ROOT / "configs"))
    import tiny

    config = tiny.get_config()
    for arg in tiny_overrides(out, **extra):
        key, value = arg[len("--config."):].split("=", 1)
        section, field = key.split(".")
        current = config[section][field]
        config[section][field] = type(current)(value) if current is not None and not isinstance(current, bool) \
            else (value == "True" if isinstance(current, bool) else int(value))
    return config


def _train(out, *extra, wait=True, env=None):
    cmd = [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
           *tiny_overrides(out), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})))
    if wait:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-4000:]
        return output
    return proc


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _wait_for_lines(proc, out, lines):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path).readlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise TimeoutError("the run did not log in time")


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    """With packed batches (the padded ones: test_resume_faults.py), killed mid-epoch (32 steps an epoch)."""
    full, killed, packing = tmp_path / "full", tmp_path / "killed", "--config.data.packing=True"
    _train(full, packing)
    # The run SIGKILLs itself after step 10, while the (asynchronous) save of step 8 may be in flight.
    proc = _train(killed, packing, wait=False, env={"SIMPO_JAX_SIGKILL_AT_STEP": "10"})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert len(_metrics(killed)) == 10
    output = _train(killed, packing)
    assert "resumed from the checkpoint of step" in output
    assert _metrics(killed) == _metrics(full)  # every metric of every step, exactly
    assert (killed / "hf" / "model.safetensors").exists() and (killed / "tensorboard").is_dir()
    assert json.loads((killed / "summary.json").read_text())["steps"] == 12


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
    proc = _train(tmp_path, "--config.train.max_steps=400", wait=False)
    _wait_for_lines(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    last = _metrics(tmp_path)[-1]["step"]
    assert f"SIGTERM: saved the checkpoint of step {last}" in output
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == last
    assert not (tmp_path / "summary.json").exists()  # not finished


def test_sigterm_during_start_up_exits_zero_without_a_traceback(tmp_path):
    """A maintenance event while the run loads or compiles: the handler is already there (no default kill)."""
    proc = _train(tmp_path, "--config.train.max_steps=400", wait=False)
    seen = []
    for line in proc.stdout:  # the data summary is printed before the model is built and compiled
        seen.append(line)
        if line.startswith("eval: "):
            break
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert ("SIGTERM during start-up: nothing new to save (the run resumes from step 0); exiting" in output
            or "SIGTERM: saved the checkpoint of step 1" in output), output[-2000:]


@multi_device(8)
def test_checkpoint_from_2x2x2_resumes_on_1x8x1_and_one_device(tmp_path, capsys):
    import jax

    from simpo_jax.train import run

    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    run(tiny_config(tmp_path / "a", **mesh, **{"train.max_steps": 8, "export.enabled": False}))
    reference = _metrics(tmp_path / "a")
    logged = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    for name, shape in (("1x8x1", {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}),
                        ("1x1x1", {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})):
        out = tmp_path / name
        shutil.copytree(tmp_path / "a", out)
        shutil.rmtree(out / "checkpoints" / "8")
        if name == "1x1x1":  # one device: run in a process that sees only one
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
            args = tiny_overrides(out, **{f"mesh.{k}": 1 for k in ("data", "fsdp", "tensor")},
                                  **{"train.max_steps": 8, "export.enabled": False})
            output = subprocess.run([sys.executable, "-m", "simpo_jax.train", "--config",
                                     str(ROOT / "configs" / "tiny.py"), *args], cwd=ROOT, env=env, check=True,
                                    capture_output=True, text=True).stdout
        else:
            assert jax.device_count() == 8
            capsys.readouterr()
            run(tiny_config(out, **shape, **{"train.max_steps": 8, "export.enabled": False}))
            output = capsys.readouterr().out
        assert "resumed from the checkpoint of step 4\n" in output, (name, output[-3000:])
        # Steps 1..4 were not re-run: their lines, measured speed included, are the copied ones; 5..8 are new.
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert lines[:4] == logged[:4] and all(a != b for a, b in zip(lines[4:8], logged[4:8])), name
        resumed = _metrics(out)
        assert [m["step"] for m in resumed] == list(range(1, 9)) + [8]  # the last line: final held-out metrics
        for got, want in zip(resumed[4:], reference[4:]):
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, got["step"], key)


def test_step_one_loss_is_simpo_of_the_first_batch_scores(tmp_path):
    from simpo_jax.score import score
    from simpo_jax.train import run

    extra = {"data.shuffle": False, "train.max_steps": 1, "export.enabled": True, "export.dtype": "float32",
             "score.split": "train", "score.dump_tokens": True}
    run(tiny_config(tmp_path / "run", **extra, **{"data.packing": True}))  # trained on packed rows
    step_one = _metrics(tmp_path / "run")[0]
    # Score the same (seeded) initial model over the training split, in order.
    score(tiny_config(tmp_path / "score", **extra), str(tmp_path / "scores.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "scores.jsonl")][:8]
    beta, ratio = 2.0, 0.5
    logits = np.array([r["chosen_logps"] - r["rejected_logps"] for r in rows]) - ratio
    want = float(np.mean(np.logaddexp(0.0, -beta * logits)))
    assert step_one["loss"] == pytest.approx(want, rel=1e-5)
    assert step_one["rewards/accuracies"] == pytest.approx(np.mean(logits + ratio > 0))


# Gemma-2 2B's preset shrunk: alternating windows (shorter than most rows), soft-caps, tied head, GeGLU.
GEMMA2 = {"model.preset": "gemma2-2b", "model.vocab_size": 512, "model.num_layers": 4,
          "model.max_position_embeddings": 512}


def test_score_matches_transformers_on_the_same_tokens(tmp_path):
    """Train, export (HF), score the export: transformers gives the same log-probs on the same tokens. On Gemma-2,
    the family whose export differs most from Llama's (the Llama path: tests/test_smollm2.py, test_hf_io.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from simpo_jax.config import build_run_config, model_config
    from simpo_jax.score import score
    from simpo_jax.train import run

    config = tiny_config(tmp_path / "run", **{"train.max_steps": 3, "export.dtype": "float32"})
    config.model.update({k.split(".")[1]: v for k, v in GEMMA2.items()})
    config.model.sliding_window = 24
    assert model_config(build_run_config(config).model).windows == (24, None, 24, None)
    run(config)
    hf_dir = tmp_path / "run" / "hf"
    # Scored in packed rows: several answers per row, each attending (in its windows) only to itself.
    config = tiny_config(tmp_path / "score", **{"score.dump_tokens": True, "score.batch_size": 5,
                                                 "data.packing": True})
    config.model.preset, config.model.hf_path = "", str(hf_dir)
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        config.model[field] = None
    n = score(config, str(tmp_path / "scores.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "scores.jsonl")]
    assert n == len(rows) == 32 and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    for row in rows:
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row[f"{side}_input_ids"]])
            mask = np.array(row[f"{side}_loss_mask"])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0].numpy()
            want = float((token_logp * mask[1:]).sum() / mask[1:].sum())
            assert row[f"{side}_logps"] == pytest.approx(want, abs=1e-5)
            assert row[f"{side}_tokens"] == int(mask.sum())


def test_unknown_config_fields_are_named(tmp_path):
    from simpo_jax.config import build_run_config
    from simpo_jax.errors import ConfigError

    config = tiny_config(tmp_path)
    config.unlock()
    config.loss.betta = 2.0
    with pytest.raises(ConfigError, match="loss config field 'betta': unknown"):
        build_run_config(config)
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--config.loss.betta=3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "betta" in proc.stderr


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    from simpo_jax.train import run

    # A learning rate of 1e30 blows the weights up after the first update: step 2's loss is not finite.
    config = tiny_config(tmp_path, **{"optimizer.learning_rate": 1e30, "optimizer.warmup_ratio": 0.0,
                                      "checkpoint.every": 1, "checkpoint.directory": str(tmp_path / "ckpt")})
    with pytest.raises(SystemExit, match=r"the loss at step (2|3) is (nan|inf).*last good checkpoint \(step (1|2)\)"):
        run(config)
    assert (tmp_path / "ckpt" / "1").is_dir()
