"""TPU slice presets: the mesh split, remat policy and micro-batches that fit the paper's global batch
(128 pairs x 2,048 tokens) on each slice, checked with `python -m simpo_jax.aot` (README table). Every
preset uses the splash-attention kernel (no `[batch, heads, len, len]` scores in HBM).

Pick one with the config file's argument: `--config configs/llama3_8b_instruct.py:v5p-16`.
"""
from ml_collections import ConfigDict

ATTENTION = "splash"
# model family -> slice (accelerator type) -> mesh sizes and step options.
PRESETS = {
    "llama3-8b": {
        "v4-32": dict(fsdp=16, tensor=1, remat_policy="full", micro_batches=4),
        "v5litepod-64": dict(fsdp=64, tensor=1, remat_policy="full", micro_batches=2),
        "v5p-16": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=2),
        "v6e-16": dict(fsdp=16, tensor=1, remat_policy="full", micro_batches=4),
    },
    "llama3-70b": {
        "v5p-128": dict(fsdp=64, tensor=1, remat_policy="full", micro_batches=2),
        # A tight fit: one pair per chip per micro-batch already, so micro_batches cannot grow; with the XLA
        # attention's score tensors it needs 44 GiB a chip. v6e-128 leaves room.
        "v6e-64": dict(fsdp=64, tensor=1, remat_policy="full", micro_batches=2),
        "v6e-128": dict(fsdp=128, tensor=1, remat_policy="full", micro_batches=1),
    },
}
PRESETS["mistral-7b"] = dict(PRESETS["llama3-8b"])  # the same shape but vocabulary: the same splits fit
# Gemma-2: the 256k vocabulary and 42 / 46 layers cost more than Llama-3-8B's (9B on a v6e-16: 61% of HBM).
PRESETS["gemma2-9b"] = {
    "v5p-16": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=2),
    "v6e-16": dict(fsdp=16, tensor=1, remat_policy="full", micro_batches=4),
}
PRESETS["gemma2-27b"] = {
    "v5p-32": dict(fsdp=16, tensor=1, remat_policy="full", micro_batches=4),
    "v5p-64": dict(fsdp=32, tensor=1, remat_policy="full", micro_batches=2),
    # One pair per chip per micro-batch: 78% of HBM; v6e-64 leaves more room.
    "v6e-32": dict(fsdp=32, tensor=1, remat_policy="full", micro_batches=4),
    "v6e-64": dict(fsdp=64, tensor=1, remat_policy="full", micro_batches=2),
}

# LoRA (configs/*_lora.py): the base frozen in bfloat16, float32 adapters with AdamW state for them alone. The
# same SimPO batch on far fewer chips: no fp32 weights, moments or weight gradients of the base.
PRESETS["llama3-70b-lora"] = {
    "v5p-16": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=2),
    "v6e-16": dict(fsdp=16, tensor=1, remat_policy="full", micro_batches=4),
    "v5p-8": dict(fsdp=4, tensor=1, remat_policy="full", micro_batches=8),
    # One pair per chip per micro-batch already (83%; the bf16 base alone is 16.4 GiB a chip).
    "v6e-8": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=16),
}
PRESETS["llama3-8b-lora"] = {  # one host
    "v5litepod-4": dict(fsdp=4, tensor=1, remat_policy="full", micro_batches=8),
    "v5litepod-8": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=4),
    "v6e-4": dict(fsdp=4, tensor=1, remat_policy="full", micro_batches=4),
    "v6e-8": dict(fsdp=8, tensor=1, remat_policy="full", micro_batches=2),
}


def apply(c: ConfigDict, family: str, slice_name: str) -> ConfigDict:
    """Set `c`'s mesh (and mesh.slice), remat policy and micro-batches for `slice_name`; "" leaves `c` as is."""
    if not slice_name:
        return c
    presets = PRESETS[family]
    if slice_name not in presets:
        raise ValueError(f"no {family} preset for slice {slice_name!r} (presets: {', '.join(presets)}); "
                         f"set --config.mesh.* and check with python -m simpo_jax.aot --topology {slice_name}")
    p = presets[slice_name]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.slice = 1, p["fsdp"], p["tensor"], slice_name
    c.model.remat_policy, c.model.attention_impl = p["remat_policy"], ATTENTION
    c.step.micro_batches = p["micro_batches"]
    return c
