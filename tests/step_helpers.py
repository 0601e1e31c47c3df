"""Helpers for train-step tests: a tiny model config and random preference batches."""
import jax
import numpy as np

from simpo_jax.losses import LossConfig
from simpo_jax.models import ModelConfig
from simpo_jax.optim import OptimizerConfig, make_optimizer
from simpo_jax.sharding import make_mesh
from simpo_jax.step import StepConfig, init_train_state, make_steps, random_params

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   dtype="float32", rope_theta=500000.0)


def preference_batch(pairs: int, length: int, vocab: int = 96, seed: int = 0) -> dict:
    """Right-padded pairs with varied prompt and response lengths (response lengths differ a lot)."""
    rng = np.random.default_rng(seed)
    batch = {}
    prompts = rng.integers(1, length // 3, pairs)
    for side in ("chosen", "rejected"):
        ids = rng.integers(0, vocab, (pairs, length)).astype(np.int32)
        total = np.minimum(prompts + rng.integers(1, length - length // 3, pairs), length)
        positions = np.arange(length)[None]
        attention = (positions < total[:, None]).astype(np.int32)
        batch[f"{side}_input_ids"] = ids * attention
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_loss_mask"] = attention * (positions >= prompts[:, None]).astype(np.int32)
    return batch


def build(loss: LossConfig, micro_batches: int = 1, mesh_shape=None, devices=None, pairs: int = 8, seed: int = 0,
          reference: str = "model", chunk: int = 8, lr: float = 1e-3, cfg: ModelConfig = TINY, eps: float = 1e-8):
    """(state, steps, reference params or None) for a tiny random model on a mesh.

    Tests comparing updated params use a large Adam `eps`: Adam's first update is about lr * sign(g), which
    turns float rounding in near-zero gradient entries into lr-sized differences; with eps = 1 the update
    is about lr * g, so params differ exactly as much as the gradients do.
    """
    mesh = make_mesh(mesh_shape or {"fsdp": 1}, devices if devices is not None else jax.devices()[:1])
    graphdef, params = random_params(cfg, mesh, seed=seed)
    # The reference is another random model (seed + 1), so DPO-style rewards are not all zero at step 0.
    ref = random_params(cfg, mesh, seed=seed + 1)[1] if loss.needs_reference and reference == "model" else None
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_ratio=0.0, eps=eps), 100)
    state, state_sh = init_train_state(params, tx, mesh)
    steps = make_steps(graphdef, cfg, loss, StepConfig(micro_batches=micro_batches, logprob_chunk_len=chunk,
                                                       reference=reference), tx, schedule, mesh, state_sh, pairs)
    return state, steps, ref


def flat_params(params) -> dict:
    """{path: numpy array} of a params tree."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
