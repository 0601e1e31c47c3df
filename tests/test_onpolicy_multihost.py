"""`python -m simpo_jax.onpolicy` as two processes (jax.distributed on localhost, 2 CPU devices each): both
sample and score their share of every batch, process 0 alone writes, and the data equals one process's."""
import os
import shutil
import subprocess
import sys

from test_data_multihost import _free_port
from test_onpolicy import ROOT, SPLITS, _config, _reward_model, _values

FIELDS = {"generate.max_prompts": 40, "onpolicy.shard_prompts": 16}


def _pair(outs, rm, stage):
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "simpo_jax.onpolicy", "--config", str(ROOT / "configs" / "onpolicy_tiny.py"),
               "--output", str(outs[i]), f"--stage={stage}", f"--config.judge.reward_model={rm}",
               *[f"--config.{k}={v}" for k, v in FIELDS.items()], "--config.logging.progress_bar=False",
               "--config.mesh.data=4", "--config.mesh.fsdp=1",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, JAX_PLATFORMS="cpu",
                                               XLA_FLAGS="--xla_force_host_platform_device_count=2")))
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def test_two_processes_sample_and_score_as_one_and_only_process_0_writes(tmp_path):
    from simpo_jax.onpolicy.build import build

    rm = _reward_model(tmp_path / "rm", _values(0))
    single = tmp_path / "single"
    build(_config(tmp_path, rm, **FIELDS), str(single))
    # A run that was stopped after its first shard: process 0 holds it and shares it, the rest both sample and score.
    writer, other = tmp_path / "multi", tmp_path / "other"
    (writer / "samples" / "train").mkdir(parents=True)
    shutil.copy(single / "onpolicy.json", writer / "onpolicy.json")
    shutil.copy(single / "samples" / "train" / "shard-00000.jsonl", writer / "samples" / "train")
    outputs = _pair((writer, other), rm, "all")
    assert not other.exists() or not any(other.rglob("*.jsonl"))  # process 1 never writes
    assert len(list((single / "samples" / "train").glob("shard-*"))) >= 2
    for split in SPLITS:
        assert (writer / f"{split}.jsonl").read_bytes() == (single / f"{split}.jsonl").read_bytes()
    assert "wrote" in outputs[0] and "train:" in outputs[0] and "wrote" not in outputs[1]
