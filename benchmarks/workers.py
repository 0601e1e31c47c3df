"""One measurement each, run in its own process by `benchmarks/run.py` (so that peak RSS is its own).

Every worker returns a JSON-able dict. Step times are the median of `size.steps` steps after one warm-up step.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from common import (BETA, DPO_BETA, GAMMA, SIZES, Size, busy_cpu_seconds, hf_config_kwargs, matmul_peak,
                    own_cpu_seconds, peak_rss_mib, text_rows, token_batch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGPROB_CHUNK = 256  # simpo_jax's default log-prob chunk (StepConfig.logprob_chunk_len), positions per chunk


def peaks() -> dict:
    """fp32 matmul peak of XLA (JAX) and of PyTorch on this machine, GFLOP/s."""
    return {"jax": matmul_peak("jax"), "torch": matmul_peak("torch")}


def make_model(size: Size, model_dir: str, seed: int = 0) -> None:
    """A random fp32 `LlamaForCausalLM` of `size` saved as safetensors: both frameworks train these weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**hf_config_kwargs(size))).save_pretrained(model_dir)


def word_tokenizer(vocab: int):
    """One word per token (`w<i>` is token i), so TRL's re-tokenization of strings gives exactly our ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def trl_simpo(size: Size, model_dir: str, work_dir: str) -> dict:
    """TRL `CPOTrainer(loss_type="simpo", cpo_alpha=0)` training steps on PyTorch CPU in fp32."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = CPOConfig(output_dir=work_dir, loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=GAMMA,
                     max_length=size.length, per_device_train_batch_size=size.pairs, max_steps=size.steps + 1,
                     learning_rate=1e-6, bf16=False, use_cpu=True, report_to=[], remove_unused_columns=False,
                     logging_steps=1, save_strategy="no", disable_tqdm=True)
    timer = StepTimer()
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(text_rows(size)),
                         processing_class=word_tokenizer(size.vocab), callbacks=[timer])
    _check_same_tokens(size, next(iter(trainer.get_train_dataloader())))
    trainer.train()
    return {"step_s": statistics.median(timer.times[1:]), "times": timer.times, "loss": timer.losses[0],
            "rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def _check_same_tokens(size: Size, trl_batch: dict) -> None:
    """TRL's tokenized rows are exactly simpo_jax's batch (as a set of rows: TRL's sampler shuffles)."""
    ours = token_batch(size)
    for side in ("chosen", "rejected"):
        theirs = trl_batch[f"{side}_input_ids"].numpy()
        labels = trl_batch[f"{side}_labels"].numpy()
        assert theirs.shape == (size.pairs, size.length), theirs.shape
        assert sorted(map(tuple, theirs)) == sorted(map(tuple, ours[f"{side}_input_ids"])), side
        assert ((labels != -100) == ours[f"{side}_loss_mask"].astype(bool)).all(), side


def jax_step(size: Size, model_dir: str, loss: str, remat: str, reference: str = "none",
             chunk: str = str(LOGPROB_CHUNK)) -> dict:
    """simpo_jax's compiled train step on the same weights and batch: time, compiled memory, peak RSS.

    `reference`: none (SimPO), model (DPO with an online frozen reference model), precomputed (DPO with
    reference log-probs as batch columns). `chunk`: log-prob positions per chunk (0 = full logits kept)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from simpo_jax.losses import LossConfig
    from simpo_jax.models.hf_import import load_hf
    from simpo_jax.optim import OptimizerConfig, make_optimizer
    from simpo_jax.sharding import make_mesh
    from simpo_jax.step import StepConfig, copy_params, init_train_state, make_steps

    model = load_hf(model_dir, dtype="float32", remat_policy=remat)
    graphdef, params = nnx.split(model)
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6), total_steps=100)
    state, state_sh = init_train_state(params, tx, mesh)
    loss_cfg = (LossConfig("simpo", beta=BETA, gamma=GAMMA) if loss == "simpo" else LossConfig(loss, beta=DPO_BETA))
    step_cfg = StepConfig(logprob_chunk_len=int(chunk), reference="precomputed" if reference == "precomputed"
                          else "model")
    steps = make_steps(graphdef, model.cfg, loss_cfg, step_cfg, tx, schedule, mesh, state_sh, size.pairs)
    batch = token_batch(size)
    if reference == "precomputed":  # values do not matter for speed: the log-prob of a uniform model
        for side in ("chosen", "rejected"):
            batch[f"reference_{side}_logps"] = np.full(size.pairs, -np.log(size.vocab) * (size.length - size.prompt),
                                                       np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    args = (copy_params(state.params),) if reference == "model" else ()
    start = time.perf_counter()
    compiled = steps.train.jitted.lower(state, batch, *args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times, first_loss = [], None
    for _ in range(size.steps + 1):  # the first call is the warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        first_loss = float(metrics["loss"]) if first_loss is None else first_loss
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    return {"step_s": statistics.median(times[1:]), "times": times, "compile_s": compile_s, "loss": first_loss,
            "temp_mib": memory.temp_size_in_bytes / 2**20, "args_mib": memory.argument_size_in_bytes / 2**20,
            "out_mib": memory.output_size_in_bytes / 2**20, "alias_mib": memory.alias_size_in_bytes / 2**20,
            "rss_mib": peak_rss_mib(), "param_mib": param_bytes / 2**20}


def logits_memory() -> dict:
    """Compiled temp memory of the SimPO step at Llama-3's vocabulary: chunked log-probs vs full logits
    (the measurement of tests/test_memory.py, reused)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_memory

    out = {"vocab": test_memory.VOCAB, "length": test_memory.LENGTH, "pairs": test_memory.PAIRS,
           "full_logits_mib": test_memory.FULL_LOGITS_BYTES / 2**20}
    for chunk in (256, test_memory.LENGTH):
        out[f"temp_mib_{chunk}"] = test_memory._temp_bytes(chunk) / 2**20
    return out


def run(name: str, quick: bool, extra: list[str]) -> dict:
    """Run worker `name` with string arguments `extra`; adds the wall time and the machine's CPU use."""
    size = SIZES["quick" if quick else "full"]
    busy, start = busy_cpu_seconds(), time.perf_counter()
    if name == "peaks":
        out = peaks()
    elif name == "make_model":
        make_model(size, *extra)
        out = {}
    elif name == "trl":
        out = trl_simpo(size, *extra)
    elif name == "jax":
        out = jax_step(size, *extra)
    elif name == "logits_memory":
        out = logits_memory()
    else:
        raise ValueError(name)
    out["wall_s"] = time.perf_counter() - start
    out["machine_cpu_s"] = busy_cpu_seconds() - busy
    out["own_cpu_s"] = own_cpu_seconds()
    return out
