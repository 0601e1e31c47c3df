"""On-policy data for SimPO v0.2 (Llama-3-8B-Instruct): the generation + scoring stage of the chain.

The official recipe (princeton-nlp/SimPO, on_policy_data_gen/decode.py): every distinct `prompt` of
HuggingFaceH4/ultrafeedback_binarized `train_prefs` as one user turn with the policy's chat template and
generation prompt; one sample per seed (13, 21, 42, 79, 100) at temperature 0.8, top-p 0.95, up to 4,096 new
tokens; a reward model scores the five answers; best vs worst become chosen vs rejected. Then
configs/llama3_8b_instruct_v0_2.py trains on them (beta 10, gamma/beta 0.3, lr 1e-6), e.g. with
`--config.data.path=<output>/train_prefs.jsonl --config.data.eval_split=<output>/test_prefs.jsonl`.

    python -m simpo_jax.onpolicy --config configs/llama3_8b_instruct_onpolicy.py:v5p-16 --output runs/onpolicy_v0_2
    python -m simpo_jax.generate.aot --config configs/llama3_8b_instruct_onpolicy.py:v5p-16 --batch 256 --cache 6144

Reward model. The recipe's judge is RLHFlow/ArmoRM-Llama3-8B-v0.1, a custom `LlamaForRewardModelWithGating`
(trust_remote_code: a gating network over 19 reward objectives on top of the backbone), which simpo_jax's
reward import cannot load (it takes Llama/MistralForSequenceClassification only). This config uses
Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 instead: a plain LlamaForSequenceClassification (one label, Llama-3.1
backbone with llama3 RoPE scaling, vocabulary 128,257 with a [PAD] token), scored through its own chat template
(Llama-3.1's, which adds a dated system header, as the model card's own `apply_chat_template` usage does). Its
scores are not ArmoRM's: the data this config builds is v0.2-style, not princeton-nlp/llama3-ultrafeedback-armorm.

Lengths. Prompts are cut to 2,048 tokens (buckets 128..2048; longer prompts keep their last tokens and count
in the summary's prompts_cut; vLLM cuts none), so a KV cache holds at most 2,048 + 4,096 = 6,144 positions,
inside Llama-3-8B-Instruct's 8,192. The judge reads up to 8,192 tokens (a 2,048-token prompt, a 4,096-token
answer and the template's ~40 tokens need about 6,200; the judge gets the whole prompt, and cuts the start of any
longer pair). Training (v0.2 config) keeps max_length 2,048 / max_prompt_length 1,800, as the recipe's, so
answers longer than ~250 tokens are cut there.

Slices (`:<slice>`): mesh and generate.batch_size per slice, checked with `python -m simpo_jax.generate.aot`
(one decode step of batch_size rows x 6,144 cache positions). Weights are bf16 (the sampler only reads them):
14.96 GiB for the whole 8B model, which fits on a v5p chip, so v5p uses pure data parallelism (no per-step
weight all-gathers: an fsdp split would all-gather every layer's weights at every decoded token). A v6e chip
(32 GiB) cannot also hold the cache and, in `--stage all`, the judge's 15 GiB of bf16 weights beside the
policy's, so v6e splits heads / MLP / vocabulary over tensor=4 (activations all-reduced per layer, small at
decode). The temps of a decode step hold about one more copy of the KV cache. In `--stage all` the judge's
weights (bf16, ~14 GiB, sharded like the policy's) stay beside the policy's while it samples; the decode check
does not count them: v5p-16 63.7 + 14.0 GiB of 95, v6e-8 / v6e-16 21.9 + 4.2 GiB of 32. The judge's forward
(same mesh, XLA attention: [pairs, 32 heads, len, len] float32 scores at its longest bucket) was compiled by
hand for v5p-16 (16 pairs x 8,192 tokens: 46.6 GiB a chip, plus the policy's 15) and v6e-8 (4 pairs: 12.7 GiB,
plus 3.7); no command checks it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from llama3_8b_instruct import get_config as llama3_8b_instruct_config  # noqa: E402

REWARD_MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
PROMPT_BUCKETS = (128, 256, 512, 1024, 2048)
MAX_NEW_TOKENS = 4096

# slice -> mesh sizes (data x fsdp x tensor = chips), rows decoded together (global) and pairs scored together.
SLICES = {
    # 8 chips (2 hosts), 95 GiB each: weights replicated, 32 rows a chip.
    "v5p-16": dict(data=8, fsdp=1, tensor=1, batch_size=256, judge_batch_size=16),
    # 8 chips (1 host), 32 GiB each: 2 data-parallel groups of 4 chips (tensor 4), 48 rows a group.
    "v6e-8": dict(data=2, fsdp=1, tensor=4, batch_size=96, judge_batch_size=4),
    # 16 chips (4 hosts), 32 GiB each: the same split, twice the groups.
    "v6e-16": dict(data=4, fsdp=1, tensor=4, batch_size=192, judge_batch_size=8),
}


def get_config(slice_name: str = ""):
    """`slice_name`: one of SLICES (`--config configs/llama3_8b_instruct_onpolicy.py:v5p-16`); "" = no mesh."""
    if slice_name and slice_name not in SLICES:
        raise ValueError(f"configs/llama3_8b_instruct_onpolicy.py: no on-policy generation preset for slice "
                         f"{slice_name!r} (presets: {', '.join(SLICES)}); set --config.mesh.* and "
                         f"--config.generate.batch_size and check them with python -m simpo_jax.generate.aot")
    c = llama3_8b_instruct_config()  # the policy: meta-llama/Meta-Llama-3-8B-Instruct, preset llama3-8b
    c.model.param_dtype = "bfloat16"  # inference only: the checkpoint's own dtype, no float32 master copy
    c.model.attention_impl = "splash"  # the prefill runs training's attention: no [rows, heads, len, len] scores
    g = c.generate
    g.prompts, g.prompt_column, g.apply_chat_template = "HuggingFaceH4/ultrafeedback_binarized", "prompt", True
    g.max_prompt_length, g.prompt_buckets = max(PROMPT_BUCKETS), PROMPT_BUCKETS
    g.batch_size = 64
    op = c.onpolicy  # the recipe's sampling (also the section's defaults), spelled out
    op.temperature, op.top_p, op.top_k, op.max_new_tokens = 0.8, 0.95, 0, MAX_NEW_TOKENS
    c.onpolicy.seeds = (13, 21, 42, 79, 100)
    c.onpolicy.splits = ("train_prefs", "test_prefs")
    c.judge.reward_model = REWARD_MODEL
    c.judge.dtype = "bfloat16"  # the reward model's checkpoint dtype (float32 would take 30 GiB a copy)
    c.judge.max_length = 8192
    c.judge.batch_size = 8
    c.train.output_dir = "runs/llama3_8b_instruct_onpolicy"  # unused: this config only samples and scores
    if slice_name:
        p = SLICES[slice_name]
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.slice = p["data"], p["fsdp"], p["tensor"], slice_name
        g.batch_size, c.judge.batch_size = p["batch_size"], p["judge_batch_size"]
    return c
