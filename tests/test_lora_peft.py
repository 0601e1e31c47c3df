"""LoRA against `peft` and transformers on tiny models in float32: the untouched base at step 0, SimPO gradients of
the adapters, PEFT adapter files both ways (export, import; stacked and per-layer params, rsLoRA, some targets, a
Qwen2 base), the merged Hugging Face export, and one-line errors for adapter directories we cannot reproduce."""
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_hf_model, right_padded_batch, torch_logits
from simpo_jax.config import lora_settings
from simpo_jax.errors import ConfigError
from simpo_jax.losses import LossConfig, compute_loss
from simpo_jax.models.config import LORA_TARGETS, LoraConfig
from simpo_jax.models.hf_export import export_hf
from simpo_jax.models.hf_import import load_hf
from simpo_jax.models.lora import TARGET_SITES, split_trainable
from simpo_jax.models.peft_io import adapter_config, export_peft_adapter, load_peft_adapter, read_adapter_config
from simpo_jax.models.safetensors_io import CheckpointError
from simpo_jax.sharding import make_mesh
from simpo_jax.step import attach_adapters, pair_logps

TOL = 1e-4
BETA, RATIO = 2.0, 0.5  # SimPO's beta and gamma / beta
FP32 = dict(dtype="float32", param_dtype="float32")
IDS, MASK = right_padded_batch(96, 3, 24)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"fsdp": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A factory: `base(variant) -> directory` of a saved tiny transformers model (built once per variant)."""
    made = {}

    def build(variant="llama3"):
        if variant not in made:
            made[variant] = str(tmp_path_factory.mktemp(variant))
            make_hf_model(variant, made[variant])
        return made[variant]

    return build


def _torch(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _peft_model(path, out, seed=0, **lora):
    """A PEFT LoRA model on the base at `path` with random A and B (as after training), saved to `out`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_torch(path), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(out))
    return model.eval()


def _ours(path, mesh, lora, adapter=None, scan=True, seed=0):
    """(cfg, graphdef, params) of our LoRA model on the base at `path`: new adapters, or `adapter`'s."""
    model = load_hf(path, scan_layers=scan, **FP32)
    cfg = model.cfg.replace(lora=lora)
    graphdef, params = attach_adapters(cfg, nnx.split(model)[1], mesh, seed=seed)
    if adapter is not None:
        placed = _shardings(params)
        params = load_peft_adapter(str(adapter), cfg, params)
        assert _shardings(params) == placed  # each adapter where the one it replaces was
    return cfg, graphdef, params


def _shardings(params):
    return {path: var.get_value().sharding for path, var in nnx.to_flat_state(params)
            if isinstance(var, nnx.LoRAParam)}


def _logits(graphdef, params, ids=IDS, mask=MASK):
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)


def _max_diff(a, b, mask=MASK):
    return np.abs(a - b)[mask.astype(bool)].max()


def _to_peft(ours, factor):
    """One layer's A `[*in, r]` / B `[r, *out]` in PEFT's layout: lora_A.weight `[r, in]`, lora_B.weight `[out, r]`."""
    return ours.reshape(-1, ours.shape[-1]).T if factor == "a" else ours.reshape(ours.shape[0], -1).T


def _peft_tensors(state, num_layers):
    """{PEFT tensor name: array} of every adapter in a state (of params or of their gradients)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.LoRAParam):
            continue
        target, factor = path[-1][:-7], path[-1][-1]
        stacked = isinstance(path[1], str)
        for layer in range(num_layers) if stacked else [path[1]]:
            value = np.asarray(var.get_value())
            name = f"base_model.model.model.layers.{layer}.{TARGET_SITES[target][0]}.{target}.lora_{factor.upper()}"
            out[name + ".weight"] = _to_peft(value[layer] if stacked else value, factor)
    return out


def _nudge(params, seed=1):
    """Every B nonzero, as after some training."""
    trainable, frozen = split_trainable(params)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return nnx.merge_state(trainable, frozen)


def test_new_adapters_leave_the_base_model_exactly(base, mesh):
    model = load_hf(base(), **FP32)
    cfg, graphdef, params = _ours(base(), mesh, LoraConfig(rank=4, alpha=8.0))
    assert cfg.lora.targets == LORA_TARGETS
    np.testing.assert_array_equal(_logits(graphdef, params), _logits(*nnx.split(model)))


def _preference_batch(pairs=3, length=16, seed=0):
    """Right-padded chosen / rejected rows sharing a prompt, with responses of different lengths."""
    rng = np.random.default_rng(seed)
    batch = {}
    prompts = rng.integers(2, 6, pairs)
    for side in ("chosen", "rejected"):
        ends = np.minimum(prompts + rng.integers(1, length - 4, pairs), length)
        ends[0] = length if side == "chosen" else ends[0]
        pos = np.arange(length)[None, :]
        batch[f"{side}_input_ids"] = rng.integers(1, 96, (pairs, length)).astype(np.int32)
        batch[f"{side}_attention_mask"] = (pos < ends[:, None]).astype(np.int32)
        batch[f"{side}_loss_mask"] = ((pos >= prompts[:, None]) & (pos < ends[:, None])).astype(np.int32)
    batch["rejected_input_ids"][:, :prompts.max()] = batch["chosen_input_ids"][:, :prompts.max()]
    return batch


def _torch_simpo(model, batch):
    """The SimPO paper's loss by hand: -log sigmoid(beta * (avg logp_w - avg logp_l) - gamma)."""
    averages = []
    for side in ("chosen", "rejected"):
        ids = torch.from_numpy(batch[f"{side}_input_ids"]).long()
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch[f"{side}_attention_mask"])).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        scored = torch.from_numpy(batch[f"{side}_loss_mask"][:, 1:]).float()
        averages.append((logp * scored).sum(-1) / scored.sum(-1))
    return -torch.nn.functional.logsigmoid(BETA * (averages[0] - averages[1]) - RATIO * BETA).mean()


@pytest.fixture(scope="module")
def all_targets(base, mesh, tmp_path_factory):
    """A PEFT adapter (rank 4, alpha 8, every projection) and our model loaded with it (stacked layers)."""
    out = tmp_path_factory.mktemp("all_targets")
    reference = _peft_model(base(), out, r=4, lora_alpha=8, target_modules=list(LORA_TARGETS))
    return out, reference, *_ours(base(), mesh, read_adapter_config(str(out)), out)


def test_simpo_gradients_of_the_adapters_equal_peft(all_targets):
    _, reference, cfg, graphdef, params = all_targets
    batch = _preference_batch()
    torch_loss = _torch_simpo(reference, batch)
    torch_loss.backward()
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in reference.named_parameters() if "lora_" in n}
    reference.zero_grad()
    trainable, frozen = split_trainable(params)

    def loss_fn(adapters):
        policy, _ = pair_logps(graphdef, (adapters, frozen), {k: jnp.asarray(v) for k, v in batch.items()}, 8)
        return compute_loss(LossConfig("simpo", beta=BETA, gamma_beta_ratio=RATIO), policy)[0]

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    ours = _peft_tensors(grads, cfg.num_layers)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * cfg.num_layers
    for name, grad in theirs.items():
        assert np.abs(grad).max() > 0, name
        # fp32 noise here is ~2e-6 of the largest entry; a wrong scale or layout is orders of magnitude more
        np.testing.assert_allclose(ours[name], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(), err_msg=name)


def test_stacked_adapters_round_trip_exactly_and_merge_as_peft_does(base, all_targets, tmp_path):
    out, _, _, graphdef, params = all_targets
    model = nnx.merge(graphdef, params)
    again = load_file(os.path.join(export_peft_adapter(model, str(tmp_path / "again")), "adapter_model.safetensors"))
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert again.keys() == saved.keys() and all(np.array_equal(again[k], saved[k]) for k in saved)
    merged = load_file(os.path.join(export_hf(model, str(tmp_path / "merged"), dtype="float32"), "model.safetensors"))
    unloaded = peft.PeftModel.from_pretrained(_torch(base()), out).merge_and_unload().state_dict()
    assert merged.keys() == unloaded.keys()
    for name, weight in merged.items():
        np.testing.assert_allclose(weight, unloaded[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("variant,scan,lora", [
    ("llama3", True, None),  # the all-targets adapter of the gradient test
    ("llama3", False, dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("qwen2", True, dict(r=3, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"])),  # q/k/v biases
], ids=["all-targets", "per-layer-rslora-q-v", "qwen2"])
def test_imported_peft_adapter_gives_peft_logits(base, mesh, all_targets, tmp_path, variant, scan, lora):
    if lora is None:
        _, reference, _, graphdef, params = all_targets
    else:
        reference = _peft_model(base(variant), tmp_path, seed=2, **lora)
        saved = read_adapter_config(str(tmp_path))
        assert (saved.rank, saved.alpha, saved.rslora) == (lora["r"], lora["lora_alpha"], bool(lora.get("use_rslora")))
        _, graphdef, params = _ours(base(variant), mesh, saved, tmp_path, scan=scan)
    assert _max_diff(_logits(graphdef, params), torch_logits(reference, IDS, MASK)) <= TOL


@pytest.fixture(scope="module")
def trained(base, mesh, tmp_path_factory):
    """Our model (per-layer params) with adapters on some projections, all B nonzero, and its PEFT export."""
    lora = LoraConfig(rank=3, alpha=5.0, targets=("q_proj", "o_proj", "gate_proj", "down_proj"), rslora=True)
    cfg, graphdef, params = _ours(base(), mesh, lora, scan=False, seed=4)
    params = _nudge(params)
    out = export_peft_adapter(nnx.merge(graphdef, params), str(tmp_path_factory.mktemp("adapter")), base())
    return cfg, graphdef, params, out


def test_exported_adapter_loads_in_peft_with_our_logits(base, trained):
    cfg, graphdef, params, out = trained
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert read_adapter_config(out) == cfg.lora
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert {k: v.dtype for k, v in tensors.items()} == {k: np.float32 for k in _peft_tensors(params, 0)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_torch(base()), out).eval()
    assert not [str(w.message) for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    assert model.peft_config["default"].use_rslora and model.peft_config["default"].r == 3
    assert _max_diff(_logits(graphdef, params), torch_logits(model, IDS, MASK)) <= TOL


def test_merged_export_is_base_plus_scaled_update(base, trained, tmp_path):
    cfg, graphdef, params, adapter = trained
    out = export_hf(nnx.merge(graphdef, params), str(tmp_path / "merged"), dtype="float32")
    merged, original = (load_file(os.path.join(d, "model.safetensors")) for d in (out, base()))
    factors = _peft_tensors(params, 0)
    assert merged.keys() == original.keys()
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    for name, weight in merged.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".lora_A.weight" not in factors:
            np.testing.assert_array_equal(weight, original[name], err_msg=name)
            continue
        update = cfg.lora.scale * factors[prefix + ".lora_B.weight"] @ factors[prefix + ".lora_A.weight"]
        assert np.abs(update).max() > 1e-3, name
        np.testing.assert_allclose(weight, original[name] + update, rtol=1e-6, atol=1e-7, err_msg=name)
    ours = _logits(graphdef, params)
    assert _max_diff(torch_logits(_torch(out), IDS, MASK), ours) <= TOL
    unloaded = peft.PeftModel.from_pretrained(_torch(base()), adapter).merge_and_unload()
    assert _max_diff(torch_logits(unloaded, IDS, MASK), ours) <= TOL


VALID = adapter_config(LoraConfig(rank=4, alpha=8.0))


@pytest.mark.parametrize("edit,message", [
    (None, "is not a directory"),
    ({}, "has no adapter_config.json (not a PEFT adapter directory)"),
    ("{not json", "unreadable"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported (only LORA)"),
    ({"target_modules": r".*\.(q|v)_proj"}, "is a regular expression, which is not supported"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target module 'lm_head' is not supported"),
    ({"target_modules": ["embed_tokens"]}, "target module 'embed_tokens' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] (extra trained modules) is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"use_dora": True}, "use_dora=True (DoRA)"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8}"),
    ({"alpha_pattern": {"v_proj": 2}}, "alpha_pattern={'v_proj': 2}"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0]"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
    ({"r": 0}, "r=0 is not an integer >= 1"),
], ids=["no-dir", "no-config", "bad-json", "ia3", "regex", "lm_head", "embed_tokens", "modules_to_save", "bias",
        "dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "fan_in_fan_out", "pissa", "rank-0"])
def test_unsupported_adapter_config_is_one_line(tmp_path, edit, message):
    path = tmp_path / "adapter"
    if edit is not None:
        path.mkdir()
        if isinstance(edit, str):
            (path / "adapter_config.json").write_text(edit)
        elif edit:
            (path / "adapter_config.json").write_text(json.dumps({**VALID, **edit}))
    with pytest.raises(ConfigError) as e:
        read_adapter_config(str(path))
    text = str(e.value)
    assert text.startswith("model config field 'lora.adapter_path': ") and message in text and "\n" not in text, text
    with pytest.raises(ConfigError):  # the train config's model.lora.adapter_path reads it the same way
        lora_settings({"adapter_path": str(path)})


def _damage(directory, edit):
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})


LAST_B = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("damage,error,message", [
    (lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")), ConfigError,
     "has no adapter_model.safetensors"),
    (lambda d: _damage(d, lambda t: t.pop(LAST_B)), CheckpointError, f"missing tensor '{LAST_B}'"),
    (lambda d: _damage(d, lambda t: t.update({LAST_B: np.zeros((64, 3), np.float32)})), CheckpointError,
     f"tensor '{LAST_B}' has shape [64, 3], the model implies [64, 4]"),
    (lambda d: _damage(d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64))})),
     CheckpointError, "tensor 'base_model.model.lm_head.lora_A.weight' is not an adapter of this model"),
    (lambda d: json.dump({**VALID, "r": 8}, open(os.path.join(d, "adapter_config.json"), "w")), ConfigError,
     "rank 8 differs from the model's 4"),
], ids=["no-weights", "missing", "misshaped", "unused", "other-rank"])
def test_adapter_weights_errors_are_one_line(all_targets, tmp_path, damage, error, message):
    _, _, cfg, graphdef, params = all_targets
    directory = export_peft_adapter(nnx.merge(graphdef, params), str(tmp_path / "adapter"))
    damage(directory)
    with pytest.raises(error) as e:
        load_peft_adapter(directory, cfg, params)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_commands_load_base_and_adapter_from_the_config(base, mesh, all_targets):
    """`model.hf_path` + `model.lora.adapter_path` through the config, as train, score and generate build the model."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import base as base_config

    from simpo_jax.config import build_run_config
    from simpo_jax.generate.cli import load_model, model_source

    out, reference = all_targets[:2]
    config = base_config.get_config()
    config.model.hf_path, config.model.lora.adapter_path, config.data.path = base(), str(out), "unused"
    config.model.dtype = config.model.param_dtype = "float32"
    rc = build_run_config(config)
    assert rc.model["lora"] == read_adapter_config(str(out))
    model = load_model(rc, mesh, None, model_source(rc))
    logits = np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)).logits)
    assert _max_diff(logits, torch_logits(reference, IDS, MASK)) <= TOL
    config.model.lora.rank = 8  # the adapter's is 4
    with pytest.raises(ConfigError, match="'lora.rank': 8 differs from the adapter's"):
        build_run_config(config)
