"""SimPO, Gemma-2-9B-it: the official recipe (princeton-nlp/SimPO training_configs/gemma-2-9b-it-simpo.yaml;
on-policy UltraFeedback answers of gemma-2-9b-it, scored by ArmoRM).

The chat template is the recipe's own, not Gemma's. The official trainer inserts an empty system turn before
every prompt whose template mentions "system" (Gemma's does, to refuse it) and renders the chosen and rejected
answers as lone assistant turns; Gemma's stock template raises on both ("System role not supported",
"Conversation roles must alternate"). The recipe's template folds a system turn into the first user turn (an
empty one leaves no trace), names the assistant `model`, and renders any turn alone:
[system "", user "Hi"] -> "<bos><start_of_turn>user\\nHi<end_of_turn>\\n". No code special-cases Gemma.

Batch 128 pairs as in the recipe (2 a device x 16 accumulation x 4 GPUs; the authors trained on 8 GPUs, i.e.
256, and recommend keeping 128).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from base import get_config as base_config  # noqa: E402

# The YAML's chat_template, as YAML reads it (its "\n" escapes are newlines).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim "
    "+ '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}{% for message "
    "in messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}{% else %}{% set "
    "content = message['content'] %}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + content | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/<file>.py:v5p-16`)."""
    c = base_config()
    c.model.hf_path = "google/gemma-2-9b-it"
    c.model.preset = "gemma2-9b"  # its shape, for aot fit checks without the weights
    c.data.path = "princeton-nlp/gemma2-ultrafeedback-armorm"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.max_length, c.data.max_prompt_length = 2048, 1800
    c.data.chat_template = CHAT_TEMPLATE
    c.loss.name, c.loss.beta = "simpo", 10.0
    c.loss.gamma_beta_ratio = 0.5
    c.optimizer.learning_rate = 8e-07
    c.train.batch_size = 128  # pairs (global)
    c.train.output_dir = "runs/gemma2_9b_it"
    return pods.apply(c, "gemma2-9b", slice_name)
