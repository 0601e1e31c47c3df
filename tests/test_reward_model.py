"""Reward models (HF `*ForSequenceClassification`): import parity with transformers, errors, and the judge."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, make_reward_model, multi_device, right_padded_batch
from simpo_jax.errors import UserError

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} count {{ m['content'] }}"
            "{% else %} : {{ m['content'] }} </s>{% endif %}{% endfor %}")


def torch_scores(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {"attention_mask": torch.from_numpy(mask)} if mask is not None else {}
        return model(input_ids=torch.from_numpy(ids), **kwargs).logits.float().numpy()


def judge_dir(tmp_path, seed: int = 0):
    """A tiny Llama reward model with the counting tokenizer (and a chat template) in one directory."""
    from simpo_jax.data.builtin import counting_tokenizer

    tokenizer = counting_tokenizer()
    tokenizer.chat_template = TEMPLATE
    path = tmp_path / "rm"
    model = make_reward_model("llama3", path, seed=seed, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    tokenizer.save_pretrained(str(path))
    return str(path), model, tokenizer


PROMPTS = ["from 5 by one", [{"role": "user", "content": "from 3"}, {"role": "assistant", "content": "4 5"},
                             {"role": "user", "content": "from 9 by one"}, {"role": "assistant", "content": "x"}],
           "on from 40", "from 1", "count on from 17 by one :"]
ANSWERS = ["6 7 8", "10 11", "41 42 43 44 45 46", "2", "18 19 20 21"]


@pytest.mark.parametrize("variant,num_labels", [("llama3", 1), ("mistral_v01", 1), ("llama32_tied", 2),
                                                ("gemma2", 1), ("qwen2", 1), ("qwen3", 2)])
def test_scores_match_transformers(tmp_path, variant, num_labels):
    from simpo_jax.models.reward import load_reward_model

    hf = make_reward_model(variant, tmp_path / variant, num_labels=num_labels)
    ids, mask = right_padded_batch(TINY["vocab_size"] - 1, 4, 16, seed=1)
    ids = np.where(mask > 0, ids + 1, 0)  # no pad id (0) inside the sequences
    expected = torch_scores(hf, ids, mask)
    model = load_reward_model(str(tmp_path / variant))
    assert model.num_labels == num_labels
    ours = np.asarray(model(ids, mask))
    assert ours.shape == (4, num_labels) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # Left padding: the last index with mask 1, positions counted from the first token.
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for i, n in enumerate(mask.sum(1)):
        left_ids[i, 16 - n:], left_mask[i, 16 - n:] = ids[i, :n], 1
    np.testing.assert_allclose(np.asarray(model(left_ids, left_mask)), expected, atol=1e-4, rtol=0)


def test_not_a_reward_model(tmp_path, hf_dir):
    from safetensors.numpy import load_file, save_file

    from simpo_jax.models.reward import load_reward_model

    path, _ = hf_dir("llama3")
    with pytest.raises(UserError, match="LlamaForCausalLM.*not a sequence-classification") as info:
        load_reward_model(path)
    assert "\n" not in str(info.value)
    make_reward_model("llama3", tmp_path / "rm")
    tensors = load_file(str(tmp_path / "rm" / "model.safetensors"))
    del tensors["score.weight"]
    save_file(tensors, str(tmp_path / "rm" / "model.safetensors"))
    with pytest.raises(UserError, match="no tensor 'score.weight'") as info:
        load_reward_model(str(tmp_path / "rm"))
    assert "\n" not in str(info.value)


def reference_rows(tokenizer, prompts, answers) -> list[list[int]]:
    """Token ids of each pair as the judge should build them: the template's text, BOS once."""
    from simpo_jax.judging.reward import messages_for

    texts = [tokenizer.apply_chat_template(messages_for(p, a), tokenize=False) for p, a in zip(prompts, answers)]
    rows = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert all(r[0] == tokenizer.bos_token_id and r.count(tokenizer.bos_token_id) == 1 for r in rows)
    assert all(0 not in r for r in rows)  # every word is in the vocabulary: no pad/unk id inside
    return rows


def test_judge_matches_transformers(tmp_path):
    from simpo_jax.judging.reward import RewardJudge

    path, hf, tokenizer = judge_dir(tmp_path)
    rows = reference_rows(tokenizer, PROMPTS, ANSWERS)
    assert tokenizer.decode(rows[1]).split().count("count") == 2  # both user turns, the last assistant turn dropped
    expected = np.array([torch_scores(hf, np.array([r]))[0, 0] for r in rows])
    judge = RewardJudge(path, batch_size=2, max_length=128)
    scores = judge.score(PROMPTS, ANSWERS)
    assert scores.dtype == np.float64 and scores.shape == (5,)
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
    # Over max_length: BOS and the last max_length - 1 tokens (the answer's end) are kept.
    long_prompt, answer = "from " + " ".join(map(str, range(40))), "40 41 42"
    row = reference_rows(tokenizer, [long_prompt], [answer])[0]
    short = RewardJudge(path, batch_size=1, max_length=16)
    kept = [row[0]] + row[-15:]
    np.testing.assert_allclose(short.score([long_prompt], [answer]), torch_scores(hf, np.array([kept]))[:, 0],
                               atol=1e-4, rtol=0)
    # Without a chat template: the plain text prompt + answer.
    judge.tokenizer.chat_template = None
    assert judge.render("count on from 5", " 6 7") == "count on from 5 6 7"
    with pytest.raises(UserError, match="no chat template"):
        judge.render(PROMPTS[1], "1")


@multi_device(8)
def test_judge_on_mesh_matches_one_device(tmp_path):
    from simpo_jax.judging.reward import RewardJudge
    from simpo_jax.sharding import make_mesh

    path, _, _ = judge_dir(tmp_path, seed=3)
    one = RewardJudge(path, batch_size=4, max_length=64).score(PROMPTS, ANSWERS)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    judge = RewardJudge(path, batch_size=4, max_length=64, mesh=mesh)
    assert judge.batch_size == 8
    embed = judge.state["model"]["embed_tokens"][...]
    assert "fsdp" in str(embed.sharding.spec)
    np.testing.assert_allclose(judge.score(PROMPTS, ANSWERS), one, atol=1e-5, rtol=0)
