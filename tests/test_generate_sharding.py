"""The sampler on a mesh (training's logical rules) equals one device; two processes equal one process."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import make_hf_model, multi_device
from test_generate import prompts
from test_multihost_train import CPU8, _finish, _start_pair
from test_train import ROOT, tiny_overrides
from simpo_jax.generate import Sampler, SamplingParams
from simpo_jax.models.hf_import import load_hf
from simpo_jax.sharding import make_mesh


@multi_device(8)
@pytest.mark.parametrize("variant", ["llama3", "mistral_v01"])
def test_mesh_samples_equal_one_device(tmp_path, variant):
    make_hf_model(variant, tmp_path)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ps = prompts((5, 23, 1, 12, 7, 3))
    for params in (SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=1.0, top_k=40)):
        kw = dict(batch_size=6, buckets=(16, 32), eos_ids=(), pad_id=0)
        one = Sampler(load_hf(str(tmp_path), dtype="float32"), params, **kw).generate(ps)
        sharded = Sampler(load_hf(str(tmp_path), dtype="float32", mesh=mesh), params, mesh=mesh, **kw)
        assert sharded.batch_size == 8  # rounded up to the 4 data-parallel ways
        assert [o.tokens for o in sharded.generate(ps)] == [o.tokens for o in one]
    # The cache: batch over data x fsdp, KV heads over tensor.
    ids, pad, _ = sharded.prepare(ps)
    args = [sharded._place(a) for a in (ids, pad, jnp.zeros(8, jnp.uint32), jnp.zeros(8, jnp.uint32))]
    cache, _ = sharded.prefill(sharded.state, *args)
    assert tuple(cache.k.sharding.spec)[:3] == (None, ("data", "fsdp"), "tensor")
    assert len(jax.devices()) == 8


def _command(out, *extra):
    return [sys.executable, "-m", "simpo_jax.generate", "--config", str(ROOT / "configs" / "tiny.py"),
            *tiny_overrides(out.parent / "run"), "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.generate.max_prompts=6", "--config.generate.num_samples=2",
            "--config.generate.temperature=1.0", "--config.generate.max_new_tokens=10",
            "--config.generate.batch_size=8", f"--output={out}", *extra]


def test_two_processes_generate_like_one_process(tmp_path):
    """2 processes x 4 devices write the same samples as 1 process x 8 devices; only process 0 writes."""
    single = tmp_path / "single.jsonl"
    proc = subprocess.run(_command(single), cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **CPU8),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    procs = _start_pair(_command, [tmp_path / f"multi{i}.jsonl" for i in range(2)])
    outputs = _finish(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    want = [json.loads(line) for line in single.read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "multi0.jsonl").read_text().splitlines()]
    assert len(want) == 12 and got == want
    assert not (tmp_path / "multi1.jsonl").exists() and "wrote" not in outputs[1]
