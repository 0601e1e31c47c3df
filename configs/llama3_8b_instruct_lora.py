"""SimPO, Llama-3-8B-Instruct with LoRA: the paper's 8B-Instruct recipe (data, beta 2.5, gamma/beta 0.55, batch 128,
2,048 tokens) training rank-16 adapters on a frozen bfloat16 base. Not a paper setting (the SimPO paper fine-tunes
every weight). Slices: one v5e or v6e host (v5litepod-8, v6e-8, v6e-4; pods.py).

The adapter choice: LoRA on all seven projections (q/k/v/o and the MLP's gate/up/down: adapters on the MLP
matter most, and attention-only LoRA trails full fine-tuning; Schulman et al., "LoRA Without Regret", Thinking
Machines 2025) with alpha 32 and PEFT's alpha / rank scale, the parametrization under which that study found the
best LoRA learning rate to be about 10x full fine-tuning's, independent of the rank. Rank 16 (scale 2) is a
common PEFT choice; a preference loss takes little information from each pair (the study saw even very low ranks
match full fine-tuning in reinforcement learning), so rank 16 should not be the limit. No dropout (PEFT's
default): a mask as large as each projection's input, drawn again when remat recomputes the layer, costs step
time, and made the TPU compile 6x slower (593 s against 90 s for a 2-layer v6e-8 check);
`--config.model.lora.dropout=0.05` turns it on.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import pods  # noqa: E402
from llama3_8b_instruct import get_config as llama3_8b_config  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(c, learning_rate: float):
    """`c` (a full fine-tuning recipe) trained as rank-16 LoRA adapters on its frozen bfloat16 base."""
    c.model.lora.rank, c.model.lora.alpha, c.model.lora.dropout = 16, 32.0, 0.0
    c.model.lora.targets = LORA_TARGETS
    c.model.param_dtype = "bfloat16"  # the frozen base (the adapters and their AdamW state are float32)
    c.optimizer.learning_rate = learning_rate
    return c


def get_config(slice_name: str = ""):
    """`slice_name`: a TPU slice preset from pods.py (`--config configs/llama3_8b_instruct_lora.py:v6e-8`)."""
    # LoRA's learning rate: about 10x the full fine-tune's (above: 1e-6 -> 1e-5), as LoRA Without Regret found
    # for alpha 32 with the alpha / rank scale; the warmup (10%), cosine schedule and clipping stay the recipe's.
    c = add_lora(llama3_8b_config(), learning_rate=1e-05)
    c.train.output_dir = "runs/llama3_8b_instruct_lora"
    return pods.apply(c, "llama3-8b-lora", slice_name)
