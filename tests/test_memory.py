"""At Llama-3's vocabulary, the compiled SimPO step never holds full `[2B, L, vocab]` float32 logits."""
from simpo_jax.losses import LossConfig
from simpo_jax.models import ModelConfig
from step_helpers import build, preference_batch

VOCAB, LENGTH, PAIRS = 128256, 2048, 2  # the paper's max_length
# One attention head keeps the [batch, heads, L, L] attention scores small next to the logits.
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1,
                  num_kv_heads=1, dtype="float32")
FULL_LOGITS_BYTES = 2 * PAIRS * LENGTH * VOCAB * 4  # 4 GiB


def _temp_bytes(chunk: int) -> int:
    state, steps, _ = build(LossConfig("simpo"), pairs=PAIRS, chunk=chunk, cfg=CFG)
    compiled = steps.train.jitted.lower(state, preference_batch(PAIRS, LENGTH, vocab=VOCAB)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_logprobs_keep_temp_memory_far_below_full_logits():
    chunked = _temp_bytes(32)
    assert chunked < 0.2 * FULL_LOGITS_BYTES, f"temp {chunked / 2**20:.0f} MiB"
    # The same step without chunking (one chunk = the whole sequence) does materialize them.
    assert _temp_bytes(LENGTH) > FULL_LOGITS_BYTES
