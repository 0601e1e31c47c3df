"""LoRA training: the config, adapters-only gradients and optimizer state, the adapter-free reference, dropout,
sharding, and the train command's adapters-only checkpoints (resume, base identity, exports).

Parity with `peft` (gradients, adapter files, merged export): tests/test_lora_peft.py."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import multi_device
from simpo_jax.config import lora_settings
from simpo_jax.errors import ConfigError
from simpo_jax.losses import LossConfig
from simpo_jax.models.config import LORA_TARGETS, LoraConfig
from simpo_jax.models.lora import adapter_term, split_trainable
from simpo_jax.sharding import make_mesh
from simpo_jax.step import copy_params, random_params
from step_helpers import TINY, build, flat_params, preference_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
LORA = TINY.replace(lora=LoraConfig(rank=4, alpha=8.0))


def _nudge(state, seed=1):
    """Make every B nonzero (as after some training), so that the adapters change the model."""
    trainable, frozen = split_trainable(state.params)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return state._replace(params=nnx.merge_state(trainable, frozen))


def test_settings_from_the_model_lora_section():
    assert lora_settings({"rank": 0, "adapter_path": ""}) == (None, "")
    cfg, _ = lora_settings({"rank": 8, "targets": "q,v_proj"})
    assert cfg == LoraConfig(rank=8, alpha=8.0, targets=("q_proj", "v_proj")) and cfg.scale == 1.0
    assert lora_settings({"rank": 16, "alpha": 32.0, "rslora": True})[0].scale == 32.0 / 4
    assert lora_settings({"rank": 4, "targets": ["all-linear"]})[0].targets == LORA_TARGETS
    # `--config.model.lora.targets=v_proj,q` reaches the section as ml_collections parses it for a tuple field.
    from ml_collections.config_flags.tuple_parser import TupleParser

    parsed = TupleParser().parse("v_proj,q")  # ("v_proj,q",)
    assert lora_settings({"rank": 4, "targets": parsed})[0].targets == ("q_proj", "v_proj")
    cases = [({"rank": 0, "alpha": 16.0}, "'lora.rank': is 0 (no adapters) but lora.alpha is set"),
             ({"rank": 4, "targets": "q,lm_head"}, "'lora.targets': 'lm_head_proj': not a projection"),
             ({"rank": 4, "dropout": 1.0}, "'lora.dropout': must be in [0, 1)"),
             ({"rank": -2}, "'lora.rank': must be an integer >= 1"),
             ({"rank": 4, "alfa": 1.0}, "'lora.alfa': unknown")]
    for section, message in cases:
        with pytest.raises(ConfigError, match=None) as e:
            lora_settings(section)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_lora_model_is_its_base_at_step_zero_and_its_base_params_are_the_same():
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    base_graphdef, base = random_params(TINY, mesh, seed=3)
    graphdef, params = random_params(LORA, mesh, seed=3)
    trainable, frozen = split_trainable(params)
    frozen, base_flat = flat_params(frozen), flat_params(base)  # the adapters are drawn after the base
    assert frozen.keys() == base_flat.keys() and all(np.array_equal(frozen[k], base_flat[k]) for k in frozen)
    assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(
        x, nnx.Variable)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)), jnp.int32)
    np.testing.assert_array_equal(nnx.merge(graphdef, params)(ids).logits, nnx.merge(base_graphdef, base)(ids).logits)


def test_only_the_adapters_train_and_only_they_have_optimizer_state():
    state, steps, _ = build(LossConfig(name="simpo"), cfg=LORA, lr=1e-2)
    before = flat_params(state.params)
    trainable, frozen = split_trainable(state.params)
    adapter_count = sum(x.size for x in jax.tree.leaves(trainable))
    # AdamW's two moments cover the adapters only (plus scalar counters), not the base's parameters.
    opt_count = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert 2 * adapter_count <= opt_count < 2 * adapter_count + 16
    for seed in range(2):
        state, metrics = steps.train(state, preference_batch(8, 24, seed=seed))
    after = flat_params(state.params)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if "_lora_" in k}  # every adapter moved (A too, from step 2), no base


def test_dpo_reference_is_the_adapter_free_base_or_the_initial_adapters():
    dpo = LossConfig(name="dpo", beta=0.1)
    state, steps, _ = build(dpo, cfg=LORA)
    state = _nudge(state)
    batch = preference_batch(8, 24, seed=2)
    from simpo_jax.optim import OptimizerConfig, make_optimizer
    from simpo_jax.step import StepConfig, make_steps

    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0), 100)
    mesh = steps.state_shardings.step.mesh
    explicit = make_steps(random_params(LORA, mesh)[0], LORA, dpo, StepConfig(logprob_chunk_len=8), tx, schedule,
                          mesh, steps.state_shardings, 8, separate_reference=True)
    frozen_copy = copy_params(split_trainable(state.params)[1])
    implicit_metrics = steps.eval(state.params, batch)
    explicit_metrics = explicit.eval(state.params, batch, frozen_copy)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(implicit_metrics[key], explicit_metrics[key], rtol=1e-6, err_msg=key)
    assert abs(float(implicit_metrics["rewards/chosen"])) > 1e-4  # the adapters do change the policy

    # Continuing a loaded adapter (model.lora.adapter_path): the reference is the initial policy, base + a copy of
    # the initial adapters. At the start the rewards are 0; after a step they are beta x the policy's change.
    initial_steps = make_steps(random_params(LORA, mesh)[0], LORA, dpo, StepConfig(logprob_chunk_len=8), tx,
                               schedule, mesh, steps.state_shardings, 8, reference_adapters=True)
    initial_adapters = copy_params(split_trainable(state.params)[0])
    before = initial_steps.eval(state.params, batch, initial_adapters)
    assert float(before["rewards/chosen"]) == 0.0 and float(before["loss"]) == pytest.approx(np.log(2.0))
    state, _ = initial_steps.train(state, batch, initial_adapters)
    after = initial_steps.eval(state.params, batch, initial_adapters)
    for side in ("chosen", "rejected"):
        change = float(after[f"logps/{side}"]) - float(before[f"logps/{side}"])
        assert float(after[f"rewards/{side}"]) == pytest.approx(0.1 * change, rel=1e-4, abs=1e-7)
        assert abs(change) > 1e-3


def test_micro_batches_give_the_full_batch_gradient():
    states = []
    for micro in (1, 4):
        state, steps, _ = build(LossConfig(name="simpo"), micro_batches=micro, cfg=LORA, eps=1.0)
        state, metrics = steps.train(_nudge(state), preference_batch(8, 24, seed=4))
        states.append((flat_params(state.params), float(metrics["grad_norm"])))
    (one, norm_one), (four, norm_four) = states
    assert norm_four == pytest.approx(norm_one, rel=1e-5)
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)


def _as_unscanned(scanned, unscanned):
    """`unscanned`'s state holding `scanned`'s values (layer i of each stacked array)."""
    values = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(scanned)[0]}

    def pick(path, leaf):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[0] == "layers":
            stacked = values[jax.tree_util.keystr(tuple(path[:1]) + tuple(path[2:]))]
            return jax.device_put(stacked[keys[1]], leaf.sharding)
        return values[jax.tree_util.keystr(path)]
    return jax.tree_util.tree_map_with_path(pick, unscanned)


def test_unscanned_rematerialized_and_splash_layers_train_the_adapters_alike():
    """One step of each layout from the same (nudged) model: the same loss and updated adapters."""
    scanned, steps, _ = build(LossConfig(name="simpo"), cfg=LORA, eps=1.0)
    scanned = _nudge(scanned)
    batch = preference_batch(8, 24, seed=7)
    results = {}
    for name, changes in {"scanned": {}, "unscanned": dict(scan_layers=False), "remat": dict(remat_policy="full"),
                          "splash": dict(attention_impl="splash")}.items():
        state, steps, _ = build(LossConfig(name="simpo"), cfg=LORA.replace(**changes), eps=1.0)
        start = copy_params(scanned)
        if name == "unscanned":
            start = state._replace(params=_as_unscanned(start.params, state.params))
        state, metrics = steps.train(start, batch)
        params = state.params
        if name == "unscanned":  # layers.<i>.<...> back to the stacked layout
            params = {**params, "layers": jax.tree.map(lambda *xs: np.stack(xs), *[params["layers"][i]
                                                                                  for i in range(2)])}
        results[name] = (flat_params(split_trainable(params)[0] if name != "unscanned" else {
            "layers": params["layers"]}), float(metrics["loss"]))
    reference, loss = results.pop("scanned")
    for name, (flat, other_loss) in results.items():
        assert other_loss == pytest.approx(loss, rel=1e-5), name
        for key in reference:
            np.testing.assert_allclose(flat[key], reference[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")


def test_gemma2_scans_its_layer_pairs_with_dropout_keys():
    gemma = TINY.replace(model_type="gemma2", hidden_act="gelu_pytorch_tanh", embed_scale=True, norm_plus_one=True,
                         sandwich_norms=True, sliding_window=8, num_layers=4,
                         layer_types=("sliding_attention", "full_attention") * 2,
                         attn_logit_softcap=50.0, final_logit_softcap=30.0, tie_word_embeddings=True,
                         lora=LoraConfig(rank=2, alpha=4.0, dropout=0.2, targets=("q_proj", "down_proj")))
    assert gemma.layer_groups == ((0, 4, 2),)  # a (sliding, global) pair per scan step
    state, steps, _ = build(LossConfig(name="simpo"), cfg=gemma)
    state = _nudge(state)
    eval_loss = float(steps.eval(state.params, preference_batch(8, 24, seed=8))["loss"])
    losses = [float(steps.train(state_, preference_batch(8, 24, seed=8))[1]["loss"]) for state_ in (
        copy_params(state), state)]
    assert losses[0] == losses[1] and np.isfinite(losses[0])  # the same seed and step: the same masks
    assert eval_loss != losses[0]  # the masks apply in training only
    # Unscanned, from the same params: layer i draws layer i's masks, so the loss is the same.
    flat, steps_flat, _ = build(LossConfig(name="simpo"), cfg=gemma.replace(scan_layers=False))
    scanned = _nudge(build(LossConfig(name="simpo"), cfg=gemma)[0])
    flat = flat._replace(params=_as_unscanned(scanned.params, flat.params))
    assert float(steps_flat.train(flat, preference_batch(8, 24, seed=8))[1]["loss"]) == pytest.approx(losses[0],
                                                                                                      rel=1e-5)


def test_dropout_is_inverted_seeded_and_off_without_a_key():
    cfg = LORA.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    graphdef, params = random_params(cfg, mesh, seed=0)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x + 0.1, params))
    mlp = model.layers.mlp if cfg.scan_layers else model.layers[0].mlp
    layer0 = jax.tree.map(lambda x: x[0], nnx.state(mlp))
    mlp0 = nnx.merge(nnx.graphdef(mlp), layer0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 64)), jnp.float32)
    plain = adapter_term(mlp0, "up_proj", x, jnp.float32, None)
    one = adapter_term(mlp0, "up_proj", x, jnp.float32, jax.random.key(7))
    np.testing.assert_array_equal(one, adapter_term(mlp0, "up_proj", x, jnp.float32, jax.random.key(7)))
    # Inverted dropout: on average over masks, the term without dropout.
    kept = [adapter_term(mlp0, "up_proj", x, jnp.float32, jax.random.key(k)) for k in range(200)]
    np.testing.assert_allclose(np.mean(kept, axis=0), plain, atol=0.15 * float(np.abs(plain).max()))
    assert not np.allclose(kept[0], kept[1])
    # Half of x's entries are dropped before A: x A equals (x * mask / 0.5) A for the mask the key draws.
    mask = jax.random.bernoulli(jax.random.fold_in(jax.random.key(7), LORA_TARGETS.index("up_proj")), 0.5, x.shape)
    by_hand = cfg.lora.scale * ((np.where(mask, x / 0.5, 0) @ mlp0.up_proj_lora_a[...]) @ mlp0.up_proj_lora_b[...])
    np.testing.assert_allclose(one, by_hand, rtol=1e-5, atol=1e-6)


def test_train_steps_use_a_new_dropout_mask_each_step_but_evaluation_none():
    cfg = LORA.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.3))
    state, steps, _ = build(LossConfig(name="simpo"), cfg=cfg)
    state = _nudge(state)
    batch = preference_batch(8, 24, seed=5)
    eval_loss = float(steps.eval(state.params, batch)["loss"])
    assert float(steps.eval(state.params, batch)["loss"]) == eval_loss
    losses = {}  # the same params at steps 0, 1 and 0 again: the step number alone draws the masks
    for step in (0, 1, 0):
        start = copy_params(state)._replace(step=jnp.asarray(step, jnp.int32))
        losses.setdefault(step, []).append(float(steps.train(start, batch)[1]["loss"]))
    assert losses[0][0] == losses[0][1]
    assert min(abs(losses[0][0] - losses[1][0]), abs(losses[0][0] - eval_loss), abs(losses[1][0] - eval_loss)) > 1e-4


@multi_device(8)
def test_adapters_shard_like_their_base_matrices_and_train_the_same_on_a_mesh():
    devices = jax.devices()
    results = []
    for shape in ({"fsdp": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        state, steps, _ = build(LossConfig(name="simpo"), mesh_shape=shape,
                                devices=devices[:1] if shape == {"fsdp": 1} else devices, cfg=LORA, eps=1.0)
        state = _nudge(state)
        state, _ = steps.train(state, preference_batch(8, 24, seed=6))
        results.append(flat_params(state.params))
        attn = state.params["layers"]["self_attn"]
    specs = {name: attn[name].get_value().sharding.spec for name in ("q_proj", "q_proj_lora_a", "q_proj_lora_b",
                                                                      "o_proj_lora_a", "o_proj_lora_b")}
    assert specs["q_proj"][1] == "fsdp" and specs["q_proj_lora_a"][1] == "fsdp"  # embed: as the base
    # heads: over tensor as the base, and over fsdp too (no chip holds a whole factor); embed as the base
    assert specs["q_proj_lora_b"][2] == ("tensor", "fsdp") and specs["o_proj_lora_a"][1] == ("tensor", "fsdp")
    assert specs["o_proj_lora_b"][2] == "fsdp" and specs["q_proj"][2] == "tensor"
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=2e-5, atol=1e-6, err_msg=key)


def _train(out, *extra, env=None, check=True, lora=True):
    values = {"train.output_dir": out, "data.builtin_train_rows": 128, "data.builtin_eval_rows": 16,
              "train.batch_size": 8, "train.max_steps": 6, "train.eval_every": 0, "checkpoint.every": 2,
              "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 2,
              "model.num_kv_heads": 1, "step.logprob_chunk_len": 32, "logging.progress_bar": False,
              "optimizer.learning_rate": 1e-2, "model.lora.rank": 4, "model.lora.dropout": 0.1,
              "train.generate_every": 0}
    if not lora:
        values = {k: v for k, v in values.items() if not k.startswith("model.lora")}
    cmd = [sys.executable, "-m", "simpo_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
           *[f"--config.{k}={v}" for k, v in values.items()], *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **(env or {})),
                          timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in f]


def test_train_command_checkpoints_adapters_only_resumes_exactly_and_refuses_another_base(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    _train(full)
    proc = _train(killed, env={"SIMPO_JAX_SIGKILL_AT_STEP": "5"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    out = _train(killed).stdout
    assert "resumed from the checkpoint of step" in out  # 4, or 2 when the kill cut step 4's save short
    assert _metrics(killed) == _metrics(full)  # dropout masks and all: exactly the uninterrupted run
    # The checkpoint holds the adapters and their AdamW moments, not the base.
    saved = json.loads((tmp_path / "killed" / "checkpoints" / "6" / "state" / "_METADATA").read_text())
    names = " ".join(saved["tree_metadata"])
    assert "q_proj_lora_a" in names and "embed_tokens" not in names and "'q_proj'" not in names
    base = json.loads((tmp_path / "killed" / "checkpoints" / "6" / "base" / "metadata").read_text())
    assert any("embed_tokens" in k for k in base["base"]) and any("_lora_a" in k for k in base["adapters"])
    assert "(LoRA merged)" in out and "exported the PEFT adapter" in out
    assert (tmp_path / "killed" / "adapter" / "adapter_config.json").exists()
    # Another base (train.seed draws the random base): one line, no traceback, nothing overwritten.
    proc = _train(killed, "--config.train.seed=1", "--config.train.max_steps=8", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "holds LoRA adapters trained on another base model" in proc.stderr + proc.stdout
    # Other adapters, or full fine-tuning: one line each, and every checkpoint is still there.
    for lora, message in ((True, "holds other LoRA adapters"),
                          (False, "holds LoRA adapters, and this run trains the whole model")):
        proc = _train(killed, "--config.model.lora.rank=8", "--config.train.max_steps=8", check=False, lora=lora) \
            if lora else _train(killed, "--config.train.max_steps=8", check=False, lora=False)
        output = proc.stderr + proc.stdout
        assert proc.returncode == 2 and "Traceback" not in output and message in output, output[-3000:]
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_the_base_identity_sees_one_layer_changed_but_not_another_layout():
    from simpo_jax.checkpoint import IncompatibleCheckpointError, check_identity, lora_identity

    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    adapters, frozen = split_trainable(random_params(LORA, mesh, seed=0)[1])
    saved = lora_identity(adapters, frozen)
    check_identity(saved, lora_identity(adapters, copy_params(frozen)), "here")
    for change in (lambda w: w.at[1].multiply(1.001), lambda w: w.at[1].multiply(-1.0),  # layer 1 only
                   lambda w: w[::-1]):  # layers swapped
        other = jax.tree.map(lambda x: x, frozen)
        mlp = other["layers"]["mlp"]["up_proj"]
        mlp.set_value(change(mlp.get_value()))
        with pytest.raises(IncompatibleCheckpointError, match="another base model .*up_proj"):
            check_identity(saved, lora_identity(adapters, other), "here")


def test_a_full_fine_tuning_checkpoint_is_not_resumed_as_lora(tmp_path):
    from simpo_jax.checkpoint import Checkpointer, IncompatibleCheckpointError

    full = build(LossConfig(name="simpo"), cfg=TINY)[0]
    checkpoints = Checkpointer(str(tmp_path), every=1, async_save=False)
    checkpoints.save(1, full, {"epoch": 0}, force=True)
    with pytest.raises(IncompatibleCheckpointError, match="holds full fine-tuning state, and this run sets model.lora"):
        checkpoints.restore_latest_good(build(LossConfig(name="simpo"), cfg=LORA)[0])
    assert [p.name for p in tmp_path.iterdir() if p.name[0].isdigit()] == ["1"]  # nothing set aside
    checkpoints.close()
