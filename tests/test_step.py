"""The train step on one device: exact gradient accumulation, reference sources, schedule, bad configs."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from simpo_jax.errors import ConfigError
from simpo_jax.losses import LossConfig
from simpo_jax.models.decoder import Decoder
from simpo_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from simpo_jax.sharding import MeshConfig
from simpo_jax.step import StepConfig, make_steps, pair_logps
from step_helpers import TINY, build, flat_params, preference_batch


@pytest.mark.parametrize("loss", [
    LossConfig("simpo", beta=2.5, gamma_beta_ratio=0.55, sft_weight=0.5),  # the NLL term is a token mean
    LossConfig("dpo", beta=0.1),
    LossConfig("kto", beta=0.1),  # the KL reference point is a whole-batch statistic
], ids=lambda c: c.name)
def test_accumulating_four_micro_batches_equals_one_full_batch(loss):
    batch = preference_batch(8, 24, seed=1)
    lengths = batch["chosen_loss_mask"].sum(1)
    assert len(set(lengths.tolist())) > 3  # unequal response lengths across micro-batches
    results = []
    for micro in (1, 4):
        state, steps, ref = build(loss, micro_batches=micro, eps=1.0)
        args = (ref,) if ref is not None else ()
        new_state, metrics = steps.train(state, batch, *args)
        results.append((flat_params(new_state.params), {k: float(v) for k, v in metrics.items()}))
    (p1, m1), (p4, m4) = results
    assert m1.keys() == m4.keys()
    for key in m1:
        assert m4[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    for key in p1:
        np.testing.assert_allclose(p4[key], p1[key], atol=1e-6, err_msg=key)


def test_mean_of_micro_means_would_differ():
    """The exactness above is not automatic: averaging per-micro-batch SFT means gives another number."""
    batch = preference_batch(8, 24, seed=1)
    loss = LossConfig("simpo", sft_weight=1.0)
    state, steps, _ = build(loss, micro_batches=1, pairs=2)
    micro_sft = []
    for i in range(4):
        micro = {k: v[i::4] for k, v in batch.items()}
        micro_sft.append(float(steps.eval(state.params, micro)["sft_loss"]))
    full_state, full_steps, _ = build(loss, pairs=8)
    assert abs(np.mean(micro_sft) - float(full_steps.eval(full_state.params, batch)["sft_loss"])) > 1e-4


def test_precomputed_reference_equals_reference_model():
    batch = preference_batch(8, 20, seed=2)
    loss = LossConfig("dpo", beta=0.1)
    state, steps, ref = build(loss)
    online = {k: float(v) for k, v in steps.eval(state.params, batch, ref).items()}
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(TINY, nnx.Rngs(0))))
    ref_logps = pair_logps(graphdef, ref, jax.tree.map(np.asarray, batch), 8)[0]
    batch = dict(batch, reference_chosen_logps=np.asarray(ref_logps.chosen),
                 reference_rejected_logps=np.asarray(ref_logps.rejected))
    state, steps, _ = build(loss, reference="precomputed")
    precomputed = {k: float(v) for k, v in steps.eval(state.params, batch).items()}
    for key in online:
        assert precomputed[key] == pytest.approx(online[key], rel=1e-5, abs=1e-6), key
    assert abs(online["rewards/margins"]) > 1e-3  # the reference really differs from the policy


def test_training_steps_learn_the_preference():
    batch = preference_batch(8, 20, seed=3)
    state, steps, _ = build(LossConfig("simpo", beta=2.0, gamma_beta_ratio=0.5), lr=3e-3)
    first = None
    for _ in range(12):
        state, metrics = steps.train(state, batch)
        first = first or {k: float(v) for k, v in metrics.items()}
    assert float(metrics["loss"]) < 0.5 * first["loss"]
    assert float(metrics["rewards/accuracies"]) == 1.0 and int(state.step) == 12
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["learning_rate"]) > 0


def test_schedule_matches_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    total, cfg = 57, OptimizerConfig(learning_rate=1e-6, warmup_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    hf = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=6, num_training_steps=total)
    ours = learning_rate_schedule(cfg, total)
    for step in range(total):
        assert float(ours(step)) == pytest.approx(hf.get_last_lr()[0], rel=1e-5, abs=1e-14), step
        optimizer.step()
        hf.step()


def test_shared_reference_buffers_are_refused():
    state, steps, _ = build(LossConfig("dpo"))  # the train state is donated: a reference must not alias it
    with pytest.raises(ValueError, match="share buffers"):
        steps.train(state, preference_batch(8, 16), state.params)


def test_missing_batch_columns_are_named():
    state, steps, _ = build(LossConfig("dpo"), reference="precomputed")
    with pytest.raises(KeyError, match="reference_chosen_logps"):
        steps.eval(state.params, preference_batch(8, 16))


@pytest.mark.parametrize("make,field", [
    (lambda: LossConfig(beta=0).validate(), "loss config field 'beta'"),
    (lambda: LossConfig(name="dpoo").validate(), "loss config field 'name'"),
    (lambda: LossConfig(gamma=1.0, gamma_beta_ratio=0.5).validate(), "loss config field 'gamma'"),
    (lambda: MeshConfig(data=3, fsdp=1).build(jax.devices()[:1]), "mesh config field 'data/fsdp/tensor'"),
    (lambda: StepConfig(micro_batches=0).validate(), "step config field 'micro_batches'"),
    (lambda: OptimizerConfig(warmup_ratio=1.5).validate(), "optimizer config field 'warmup_ratio'"),
])
def test_bad_configuration_fails_before_compiling(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


def test_batch_not_divisible_by_micro_batches_fails_before_compiling():
    state, steps, _ = build(LossConfig("simpo"))
    tx, schedule = make_optimizer(OptimizerConfig(), 10)
    with pytest.raises(ConfigError, match="'batch_size': global batch 6 is not divisible by data-parallel size 1 x "
                                          "micro_batches 4"):
        make_steps(None, TINY, LossConfig(), StepConfig(micro_batches=4), tx, schedule,
                   MeshConfig(fsdp=1).build(jax.devices()[:1]), steps.state_shardings, 6)
