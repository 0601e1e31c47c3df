"""On-policy preference data: the policy samples k answers per prompt, a reward model scores them, best vs worst.

`python -m simpo_jax.onpolicy --config configs/<setting>.py --output <dir> [--stage all|sample|score]` writes,
for each split of `onpolicy.splits`, `<dir>/<split>.jsonl` in the UltraFeedback format that `train` reads as
is: `prompt_id`, `prompt` (the instruction), `format_prompt` (the rendered text the samples continue, as the
official generator records it), `chosen` / `rejected` (the prompt's turns plus the answer, as message lists;
plain strings when the policy's tokenizer has no chat template; training renders them by its own rules),
`score_chosen`, `score_rejected`, `seed_*` and `tokens_*` of both, `all_generated_responses` and
`all_rm_scores` (in seed order, as the official data) and `samples` (each with its seed, text, score, token
count and finish reason).
See build.py for the shards and resuming, choose.py for the choice and what is left out.
"""
from simpo_jax.onpolicy.config import OnPolicyConfig
from simpo_jax.onpolicy.choose import binarize, pick, preference_row

__all__ = ["OnPolicyConfig", "binarize", "pick", "preference_row"]  # the engine: simpo_jax.onpolicy.build
