"""Two processes (localhost jax.distributed, 4 fake CPU devices each) assemble the single-process batches."""
import os
import socket
import subprocess
import sys

from datasets import Dataset

from data_helpers import llama3_tokenizer
from simpo_jax.data import DataConfig, tokenize_dataset

WORKER = os.path.join(os.path.dirname(__file__), "multihost_batches_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_the_single_process_global_batches(tmp_path):
    rows = [{"prompt": "the quick brown fox " * (i % 4 + 1), "chosen": " hello world" * (i % 6 + 1),
             "rejected": f" lazy dog {i}"} for i in range(40)]
    cfg = DataConfig(max_length=128, max_prompt_length=64)
    tokenized, _ = tokenize_dataset(Dataset.from_list(rows), cfg, llama3_tokenizer())
    tokenized.save_to_disk(str(tmp_path / "data"))
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path / "data")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        assert f"process {i}: 4 global batches match" in out
