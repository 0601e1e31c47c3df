"""Every shipped setting builds a valid run config with the SimPO paper's hyper-parameters."""
import importlib.util
import pathlib

import pytest

from data_helpers import _bpe
from simpo_jax.config import build_run_config
from simpo_jax.data.formats import row_to_text
from simpo_jax.data.pipeline import resolve_template

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = {  # setting: (loss, beta, gamma/beta, learning rate, max_length, max_prompt_length)
    "llama3_8b_instruct": ("simpo", 2.5, 0.55, 1e-6, 2048, 1800),
    "llama3_8b_base": ("simpo", 2.0, 0.5, 6e-7, 2048, 1800),
    "mistral_7b_base": ("simpo", 2.0, 0.8, 3e-7, 1024, 512),
    "mistral_7b_instruct": ("simpo", 2.5, 0.1, 5e-7, 2048, 1800),
    "llama3_8b_instruct_v0_2": ("simpo", 10.0, 0.3, 1e-6, 2048, 1800),
    "llama3_8b_instruct_dpo": ("dpo", 0.01, None, 7e-7, 2048, 1800),
    "gemma2_9b_it": ("simpo", 10.0, 0.5, 8e-7, 2048, 1800),
    "gemma2_27b_it": ("simpo", 10.0, 0.5, 8e-7, 2048, 1800),  # no published 27B recipe: the 9B one
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


@pytest.mark.parametrize("name", ["gemma2_9b_it", "gemma2_27b_it"])
def test_gemma2_recipe_chat_template(name):
    """The recipe's template through the official rendering (an empty system turn inserted before the prompt,
    the answers rendered alone and their BOS stripped): plain Gemma turns, the system text folded into the first
    user turn."""
    from transformers import PreTrainedTokenizerFast

    rc = build_run_config(_load(name))
    assert rc.data.path == "princeton-nlp/gemma2-ultrafeedback-armorm" and rc.data.auto_insert_empty_system_msg
    assert rc.model["hf_path"] == f"google/gemma-2-{name.split('_')[1]}-it"
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
                                  bos_token="<bos>", eos_token="<eos>")
    template = resolve_template(rc.data)
    turns = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Hello"}]
    row = {"chosen": turns, "rejected": [turns[0], {"role": "assistant", "content": "Go away"}]}
    assert row_to_text(row, "prompt_messages", rc.data, tok, template) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n", "<start_of_turn>model\nHello<end_of_turn>\n",
        "<start_of_turn>model\nGo away<end_of_turn>\n")
    row = {k: [{"role": "system", "content": "Be brief."}] + v for k, v in row.items()}
    prompt = row_to_text(row, "prompt_messages", rc.data, tok, template).prompt
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    assert tok.apply_chat_template(turns[:1], tokenize=False, chat_template=template, add_generation_prompt=True) \
        == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma2_pod_presets():
    """Each Gemma-2 slice preset spans its slice with FSDP, uses splash attention, and splits the batch evenly."""
    import math
    import sys

    from simpo_jax.topology import parse_slice

    sys.path.insert(0, str(CONFIGS))
    import pods

    assert {"v5p-16", "v6e-16"} <= set(pods.PRESETS["gemma2-9b"]) and "v6e-64" in pods.PRESETS["gemma2-27b"]
    for family, name in (("gemma2-9b", "gemma2_9b_it"), ("gemma2-27b", "gemma2_27b_it")):
        for slice_name in pods.PRESETS[family]:
            rc = build_run_config(_load(name, slice_name))
            chips = parse_slice(slice_name).chips
            assert rc.mesh.slice == slice_name and rc.model["attention_impl"] == "splash"
            assert math.prod(rc.mesh.ici_shape(chips)) == rc.mesh.fsdp * rc.mesh.tensor * rc.mesh.data == chips
            assert 128 % (rc.mesh.data * rc.mesh.fsdp * rc.step.micro_batches) == 0


LORA = {"llama3_8b_instruct_lora": ("llama3_8b_instruct", 1e-5),  # setting: (its full fine-tune, learning rate)
        "llama3_70b_instruct_lora": ("llama3_70b_instruct", 5e-6)}


@pytest.mark.parametrize("name", sorted(LORA))
def test_lora_settings(name):
    """The LoRA settings: their full fine-tune's recipe (loss, data, batch, schedule), rank-16 adapters (alpha 32,
    no dropout) on all seven projections of a bfloat16 base, and LoRA's larger learning rate."""
    from simpo_jax.models.config import LORA_TARGETS, LoraConfig

    full_name, lr = LORA[name]
    rc, full = build_run_config(_load(name)), build_run_config(_load(full_name))
    assert rc.model["lora"] == LoraConfig(rank=16, alpha=32.0, dropout=0.0, targets=LORA_TARGETS)
    assert rc.model["param_dtype"] == "bfloat16" and full.model["lora"] is None
    assert rc.optimizer.learning_rate == lr == pytest.approx(10 * full.optimizer.learning_rate)
    assert rc.loss == full.loss and rc.data == full.data and rc.step == full.step
    assert {k: v for k, v in rc.model.items() if k not in ("lora", "param_dtype")} == {
        k: v for k, v in full.model.items() if k not in ("lora", "param_dtype")}
    assert rc.run["train"] | {"output_dir": ""} == full.run["train"] | {"output_dir": ""}
    assert rc.run["train"]["output_dir"] == f"runs/{name}"
