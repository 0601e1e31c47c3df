"""SimPO in simpo_jax against TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0) on the same model and batch."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model
from simpo_jax.losses import LossConfig, compute_loss
from simpo_jax.models.hf_import import load_hf
from simpo_jax.models.weight_map import HEADS_IN
from simpo_jax.optim import OptimizerConfig, make_optimizer
from simpo_jax.sharding import make_mesh
from simpo_jax.step import StepConfig, init_train_state, make_steps, pair_logps

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # TRL is a test dependency: a missing or moved module fails the suite instead of skipping the parity tests
    import trl.experimental.cpo as trl_cpo
except ImportError as e:
    raise ImportError(f"tests/test_trl_parity.py needs TRL's CPOTrainer from trl.experimental.cpo ({e}); install "
                      "the test extras (pip install -e .[test]) or, if TRL moved the module, update this import") from e

BETA, GAMMA = 2.5, 1.375  # gamma / beta = 0.55, the Llama-3-8B-Instruct setting
SHARED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")


def _word_tokenizer():
    """One word per token, so TRL's re-tokenization of strings gives exact, known lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(93)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _rows(rng, n, fixed_lengths):
    def words(k):
        return " ".join(f"w{i}" for i in rng.integers(0, 93, k))

    def length(lo, hi):
        return hi if fixed_lengths else int(rng.integers(lo, hi + 1))

    # Responses start with a space: TRL joins prompt and answer strings before tokenizing.
    return [dict(prompt=words(length(2, 6)), chosen=" " + words(length(1, 9)), rejected=" " + words(length(1, 9)))
            for _ in range(n)]


def _trl_batch(tmp_path, rows, model):
    from datasets import Dataset

    args = trl_cpo.CPOConfig(output_dir=str(tmp_path / "trl"), loss_type="simpo", cpo_alpha=0.0, beta=BETA,
                             simpo_gamma=GAMMA, max_length=64, per_device_train_batch_size=len(rows),
                             report_to=[], remove_unused_columns=False, use_cpu=True)
    trainer = trl_cpo.CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=_word_tokenizer())
    return trainer, next(iter(trainer.get_train_dataloader()))


def _to_ours(batch, pad_id=0):
    """TRL's tokenized batch as simpo_jax's: chosen and rejected right-padded to one length."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for side in ("chosen", "rejected"):
        def pad(x, value):
            x = x.numpy()
            return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)
        out[f"{side}_input_ids"] = pad(batch[f"{side}_input_ids"], pad_id)
        out[f"{side}_attention_mask"] = pad(batch[f"{side}_attention_mask"], 0)
        out[f"{side}_loss_mask"] = (pad(batch[f"{side}_labels"], -100) != -100).astype(np.int32)
    return out


@pytest.mark.parametrize("variant,fixed_lengths", [("llama3", False), ("llama3", True), ("gemma2", False)],
                         ids=["varied-lengths", "no-padding", "gemma2"])
def test_simpo_matches_trl_cpo_trainer(tmp_path, variant, fixed_lengths):
    """Gemma-2: soft-capped logits (final and attention), tied head, alternating windows shorter than the rows."""
    model_dir = tmp_path / "model"
    torch_model = make_hf_model(variant, model_dir)
    trainer, batch = _trl_batch(tmp_path, _rows(np.random.default_rng(3), 8, fixed_lengths), torch_model)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(torch_model, batch)
    trl_loss.backward()

    ours = _to_ours(batch)
    assert fixed_lengths == (ours["chosen_attention_mask"].all() and ours["rejected_attention_mask"].all())
    model = load_hf(str(model_dir), dtype="float32")
    from flax import nnx
    graphdef, params = nnx.split(model)
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    loss_cfg = LossConfig("simpo", beta=BETA, gamma=GAMMA)
    tx, schedule = make_optimizer(OptimizerConfig(), 10)
    state, state_sh = init_train_state(params, tx, mesh)
    steps = make_steps(graphdef, model.cfg, loss_cfg, StepConfig(logprob_chunk_len=4), tx, schedule, mesh,
                       state_sh, global_batch=8)
    metrics = {k: float(v) for k, v in steps.eval(state.params, ours).items()}
    assert metrics["loss"] == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    for key in SHARED + (("logits/chosen", "logits/rejected") if fixed_lengths else ()):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    # Gradients agree too (TRL's autograd vs ours), here for the LM head and a query projection.
    def loss_of(p):
        return compute_loss(loss_cfg, pair_logps(graphdef, p, jax.tree.map(jnp.asarray, ours), 4)[0])[0]
    grads = jax.grad(loss_of)(state.params)
    if model.cfg.tie_word_embeddings:  # one matrix: its gradient sums the head's and the embedding's
        np.testing.assert_allclose(np.asarray(grads["embed_tokens"][...]),
                                   torch_model.model.embed_tokens.weight.grad.numpy(), atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(grads["lm_head"][...]).T, torch_model.lm_head.weight.grad.numpy(),
                                   atol=1e-6)
    q_grad = HEADS_IN.to_hf(np.asarray(grads["layers"]["self_attn"]["q_proj"][...][1]))
    np.testing.assert_allclose(q_grad, torch_model.model.layers[1].self_attn.q_proj.weight.grad.numpy(), atol=1e-6)


def test_a_missing_trl_module_fails_collection_instead_of_skipping():
    """With trl.experimental.cpo unimportable (as if TRL moved it), this file errors with the message."""
    block = ("import sys, pytest; sys.modules['trl.experimental.cpo'] = None; "
             f"sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider', {__file__!r}]))")
    proc = subprocess.run([sys.executable, "-c", block], cwd=pathlib.Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, proc.stdout[-3000:]  # a collection error
    assert "needs TRL's CPOTrainer from trl.experimental.cpo" in proc.stdout and "skipped" not in proc.stdout
