"""Every shipped setting builds a valid run config with the SimPO paper's hyper-parameters."""
import importlib.util
import pathlib

import pytest

from simpo_jax.config import build_run_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = {  # setting: (loss, beta, gamma/beta, learning rate, max_length, max_prompt_length)
    "llama3_8b_instruct": ("simpo", 2.5, 0.55, 1e-6, 2048, 1800),
    "llama3_8b_base": ("simpo", 2.0, 0.5, 6e-7, 2048, 1800),
    "mistral_7b_base": ("simpo", 2.0, 0.8, 3e-7, 1024, 512),
    "mistral_7b_instruct": ("simpo", 2.5, 0.1, 5e-7, 2048, 1800),
    "llama3_8b_instruct_v0_2": ("simpo", 10.0, 0.3, 1e-6, 2048, 1800),
    "llama3_8b_instruct_dpo": ("dpo", 0.01, None, 7e-7, 2048, 1800),
}


def _load(name, *args):
    """`configs/<name>.py`'s get_config(*args) (an argument: a slice preset, as after `:` on the command line)."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    rc = build_run_config(_load(name))
    loss, beta, ratio, lr, max_length, max_prompt = PAPER[name]
    assert (rc.loss.name, rc.loss.beta, rc.loss.gamma_beta_ratio) == (loss, beta, ratio)
    assert rc.optimizer.learning_rate == lr and rc.optimizer.warmup_ratio == 0.1 and rc.optimizer.schedule == "cosine"
    assert (rc.data.max_length, rc.data.max_prompt_length) == (max_length, max_prompt)
    assert rc.run["train"]["batch_size"] == 128 and rc.run["train"]["num_epochs"] == 1
    assert rc.model["hf_path"] and rc.data.path


def test_every_config_file_builds():
    names = [p.stem for p in CONFIGS.glob("*.py")]
    assert set(PAPER) | {"base", "tiny"} <= set(names)
    build_run_config(_load("tiny"))
