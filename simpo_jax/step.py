"""The sharded train and eval steps: pure functions of `(graphdef, state)` compiled with explicit shardings.

A batch is a dict of `[pairs, length]` arrays: `{chosen,rejected}_{input_ids,attention_mask,loss_mask}`
(right-padded to one length; `loss_mask` marks response tokens), plus `reference_{chosen,rejected}_logps`
`[pairs]` when reference log-probs are precomputed. Chosen and rejected rows are interleaved into one
forward pass (so each device's pairs stay on it). A packed batch (`data.packing`) holds `[rows, length]`
`input_ids`, `positions`, `segment_ids`, `loss_mask` and the pairs' `index [pairs]` instead; segment
`2q + 1` / `2q + 2` is pair q's chosen / rejected answer (simpo_jax/data/packing.py). Gradient
accumulation scans over micro-batches and normalizes by whole-batch counts, so its result equals the full
batch exactly.

With LoRA (`ModelConfig.lora`) the state's params hold the frozen base and the adapters; gradients, clipping
and the optimizer state cover the adapters only, and DPO-style losses take the base with the adapters off
as their reference (no second copy of the weights) unless a separate reference model is passed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simpo_jax.errors import check
from simpo_jax.logprobs import sequence_logps
from simpo_jax.losses import BatchStats, LossConfig, PairLogps, compute_loss, kto_kl
from simpo_jax.models.config import ModelConfig
from simpo_jax.models.decoder import Decoder, abstract_decoder
from simpo_jax.models.lora import base_config, join, split_trainable
from simpo_jax.sharding import (DEFAULT_RULES, Rules, activation_sharding, batch_sharding, data_parallel_size,
                                state_shardings)

BATCH_KEYS = tuple(f"{side}_{field}" for side in ("chosen", "rejected")
                   for field in ("input_ids", "attention_mask", "loss_mask"))
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
PACKED_BATCH_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "index")


def is_packed(batch: dict) -> bool:
    """Whether a batch holds packed rows (else one right-padded chosen and rejected row per pair)."""
    return "segment_ids" in batch


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Micro-batching, log-prob chunking and where reference log-probs come from."""

    micro_batches: int = 1
    logprob_chunk_len: int = 256  # 0: full logits, kept for the backward (faster when they fit)
    reference: str = "model"  # model (frozen params) | precomputed (batch columns); DPO-style losses only

    def validate(self) -> "StepConfig":
        check(self.micro_batches >= 1, "step", "micro_batches", f"must be >= 1, got {self.micro_batches}")
        check(self.logprob_chunk_len >= 0, "step", "logprob_chunk_len",
              "must be >= 1 (positions per recomputed chunk) or 0 (full logits kept, no recomputation)")
        check(self.reference in ("model", "precomputed"), "step", "reference",
              f"{self.reference!r} is not model or precomputed")
        return self


class TrainState(NamedTuple):
    """Everything a step updates: step counter, parameters, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def pair_logps(graphdef: nnx.GraphDef, params: Any, batch: dict, chunk_len: int,
               dropout_key: jax.Array | None = None) -> tuple[PairLogps, jax.Array]:
    """Policy log-probs of chosen and rejected in one forward pass; also `[2]` sums of raw logits. `params`: the
    model's state, or a tuple of states that together make it (adapters and base)."""
    def interleave(key):
        chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        return jnp.stack([chosen, rejected], axis=1).reshape(-1, chosen.shape[1])

    model: Decoder = nnx.merge(graphdef, *(params if isinstance(params, tuple) else (params,)))
    if is_packed(batch):  # per-segment sums; segment 0 is padding
        s = sequence_logps(model, batch["input_ids"], batch["segment_ids"], batch["loss_mask"], chunk_len,
                           batch["positions"], 2 * batch["index"].shape[0] + 1, dropout_key)
        s = jax.tree.map(lambda x: x[1:], s)
    else:
        s = sequence_logps(model, interleave("input_ids"), interleave("attention_mask"), interleave("loss_mask"),
                           chunk_len, dropout_key=dropout_key)
    logp, tokens = s.logp_sum.reshape(-1, 2), s.tokens.reshape(-1, 2)
    logits_sums = jnp.sum(s.logits_sum.reshape(-1, 2), axis=0)
    return PairLogps(logp[:, 0], logp[:, 1], tokens[:, 0], tokens[:, 1]), logits_sums


def split_micro_batches(batch: dict, count: int) -> dict:
    """`[B, ...] -> [count, B / count, ...]`, taking rows i, i+count, ... into micro-batch i (no data movement
    between devices: each device's contiguous rows spread evenly over the micro-batches)."""
    return {k: jnp.moveaxis(v.reshape(v.shape[0] // count, count, *v.shape[1:]), 1, 0) for k, v in batch.items()}


class StepFunctions(NamedTuple):
    """Compiled steps and the shardings they were compiled for."""

    train: Callable  # (state, batch[, ref_params]) -> (state, metrics); state is donated
    eval: Callable  # (params, batch[, ref_params]) -> metrics
    state_shardings: TrainState
    batch_sharding: NamedSharding


def make_steps(graphdef: nnx.GraphDef, model_cfg: ModelConfig, loss_cfg: LossConfig, step_cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, state_sh: TrainState,
               global_batch: int, rules: Rules = DEFAULT_RULES, *, separate_reference: bool | None = None,
               reference_adapters: bool = False, seed: int = 0) -> StepFunctions:
    """Validate the configuration (before any compilation) and build the jitted train/eval steps.

    `separate_reference`: whether a DPO-style loss's reference is a params argument of the steps (default: yes
    without LoRA, no with it: the base with the adapters off). `reference_adapters` (LoRA): that argument holds
    adapters (a copy of the initial ones), which go on the policy's own frozen base. `seed`: LoRA dropout's (folded
    with the step)."""
    loss_cfg.validate()
    step_cfg.validate()
    m, dp = step_cfg.micro_batches, data_parallel_size(mesh, rules)
    check(global_batch % (dp * m) == 0, "train", "batch_size",
          f"global batch {global_batch} is not divisible by data-parallel size {dp} x micro_batches {m}")
    lora = model_cfg.lora
    model_reference = loss_cfg.needs_reference and step_cfg.reference == "model"
    separate_reference = lora is None if separate_reference is None else separate_reference
    separate_reference = separate_reference or reference_adapters
    use_ref_model = model_reference and separate_reference  # reference params are a step argument
    base_reference = model_reference and not separate_reference  # the policy's own base, adapters off
    ref_graphdef = graphdef if lora is None else abstract_decoder(base_config(model_cfg))[0]
    dropout = lora is not None and lora.dropout > 0
    chunk, vocab = step_cfg.logprob_chunk_len, model_cfg.vocab_size

    def totals(batch):
        if is_packed(batch):  # chosen answers have odd segment ids, rejected even ones (0: padding)
            seg = batch["segment_ids"]
            chosen, rejected = ((seg > 0) & (seg % 2 == r) for r in (1, 0))
            scored = (batch["loss_mask"][:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])  # as logprobs counts tokens
            return {"pairs": jnp.asarray(batch["index"].shape[0], jnp.float32),
                    "chosen_tokens": jnp.sum((scored & chosen[:, 1:]).astype(jnp.float32)),
                    "positions": jnp.stack([jnp.sum(chosen.astype(jnp.float32)),
                                            jnp.sum(rejected.astype(jnp.float32))]) * vocab}
        mask = lambda k: batch[k].astype(jnp.float32)  # noqa: E731
        return {"pairs": jnp.asarray(batch["chosen_input_ids"].shape[0], jnp.float32),
                "chosen_tokens": jnp.sum(mask("chosen_loss_mask")[:, 1:]),
                "positions": jnp.stack([jnp.sum(mask("chosen_attention_mask")),
                                        jnp.sum(mask("rejected_attention_mask"))]) * vocab}

    def real_tokens(batch):
        if is_packed(batch):
            return jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))
        return sum(jnp.sum(batch[f"{s}_attention_mask"].astype(jnp.float32)) for s in ("chosen", "rejected"))

    def policy_params(trainable, frozen):
        return trainable if frozen is None else (trainable, frozen)

    def reference_logps(policy, batch, ref_params, frozen):
        if not loss_cfg.needs_reference:
            return None
        if reference_adapters:
            return pair_logps(graphdef, (jax.lax.stop_gradient(ref_params), frozen), batch, chunk)[0]
        if base_reference or use_ref_model:
            params = frozen if base_reference else ref_params
            return pair_logps(ref_graphdef, jax.lax.stop_gradient(params), batch, chunk)[0]
        return PairLogps(batch[REFERENCE_KEYS[0]].astype(jnp.float32), batch[REFERENCE_KEYS[1]].astype(
            jnp.float32), policy.chosen_tokens, policy.rejected_tokens)

    def loss_fn(trainable, frozen, batch, ref_params, stats, tot, key):
        policy, logits_sums = pair_logps(graphdef, policy_params(trainable, frozen), batch, chunk, key)
        loss, metrics = compute_loss(loss_cfg, policy, reference_logps(policy, batch, ref_params, frozen), stats)
        metrics["logits/chosen"], metrics["logits/rejected"] = logits_sums / tot["positions"]
        metrics["tokens"] = real_tokens(batch)
        return loss, metrics

    def whole_batch_stats(trainable, frozen, micro, ref_params, tot):
        kl = None
        if loss_cfg.name == "kto" and m > 1:  # KTO's reference point needs the whole batch's log-ratios
            def forward(_, mb):
                policy = pair_logps(graphdef, policy_params(trainable, frozen), mb, chunk)[0]
                return None, (policy, reference_logps(policy, mb, ref_params, frozen))
            _, (pol, ref) = jax.lax.scan(forward, None, micro)
            kl = kto_kl(*(jax.tree.map(lambda x: x.reshape(-1), t) for t in (pol, ref)), loss_cfg)
        return BatchStats(tot["pairs"], tot["chosen_tokens"], kl)

    def accumulate(fn, trainable, frozen, batch, ref_params, key=None):
        """Sum `fn(micro-batch)` over micro-batches (a scan), with whole-batch normalizers; each micro-batch
        gets its own dropout key."""
        tot, micro = totals(batch), split_micro_batches(batch, m)
        stats = whole_batch_stats(trainable, frozen, micro, ref_params, tot)
        if m == 1:
            return fn(trainable, frozen, batch, ref_params, stats, tot, key)
        keys = None if key is None else jax.random.split(key, m)
        first = jax.tree.map(lambda x: x[0], (micro, keys))
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda mb, k: fn(trainable, frozen, mb, ref_params, stats, tot, k), *first))

        def body(acc, xs):
            return jax.tree.map(jnp.add, acc, fn(trainable, frozen, xs[0], ref_params, stats, tot, xs[1])), None
        return jax.lax.scan(body, zeros, (micro, keys))[0]

    def train_step(state: TrainState, batch: dict, ref_params: Any = None):
        trainable, frozen = split_trainable(state.params)
        key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None
        with activation_sharding(mesh, rules):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, metrics), grads = accumulate(grad_fn, trainable, frozen, batch, ref_params, key)
        grads = jax.lax.with_sharding_constraint(grads, split_trainable(param_sh)[0])
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = join(optax.apply_updates(trainable, updates), frozen)
        metrics |= {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    def eval_step(params: Any, batch: dict, ref_params: Any = None):
        with activation_sharding(mesh, rules):
            return accumulate(loss_fn, *split_trainable(params), batch, ref_params)[1]

    param_sh, batch_sh = state_sh.params, batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable_sh, frozen_sh = split_trainable(param_sh)
    ref_sh = (_plain(trainable_sh if reference_adapters else frozen_sh or param_sh),) if use_ref_model else ()
    train = jax.jit(train_step, in_shardings=(_plain(state_sh), batch_sh, *ref_sh),
                    out_shardings=(_plain(state_sh), replicated), donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(_plain(param_sh), batch_sh, *ref_sh), out_shardings=replicated)
    return StepFunctions(_checked(train, loss_cfg, step_cfg, use_ref_model, global_batch, model_reference),
                         _checked(evaluate, loss_cfg, step_cfg, use_ref_model, None, model_reference),
                         state_sh, batch_sh)


def _plain(tree: Any) -> Any:
    """Shardings with NNX Variable containers unwrapped, as jit's in/out_shardings expect."""
    return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _checked(fn: Callable, loss_cfg: LossConfig, step_cfg: StepConfig, use_ref_model: bool,
             global_batch: int | None, model_reference: bool) -> Callable:
    """Check a batch's keys and size (and the reference params) before calling the compiled step."""
    refs = REFERENCE_KEYS if loss_cfg.needs_reference and not model_reference else ()

    def call(state_or_params, batch, ref_params=None):
        packed = is_packed(batch)
        keys = (PACKED_BATCH_KEYS if packed else BATCH_KEYS) + refs
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {', '.join(missing)}")
        size = batch["index" if packed else "chosen_input_ids"].shape[0]
        if global_batch is not None and size != global_batch:
            raise ValueError(f"batch has {size} pairs, the step was built for batch_size={global_batch}")
        if size % step_cfg.micro_batches:
            raise ValueError(f"batch of {size} pairs is not divisible by micro_batches={step_cfg.micro_batches}")
        if packed and batch["input_ids"].shape[0] % step_cfg.micro_batches:
            raise ValueError(f"packed batch of {batch['input_ids'].shape[0]} rows is not divisible by "
                             f"micro_batches={step_cfg.micro_batches}")
        # Segment ids count pairs within a micro-batch: a batch packed for fewer micro-batches has larger ones.
        # (Checked on host arrays; BatchIterator's global arrays are laid out for the step by construction.)
        if packed and isinstance(batch["segment_ids"], np.ndarray) and \
                batch["segment_ids"].max() > 2 * size // step_cfg.micro_batches:
            raise ValueError(f"packed batch was not laid out for micro_batches={step_cfg.micro_batches} (build it "
                             "with BatchIterator(..., micro_batches=...))")
        if use_ref_model and ref_params is None:
            raise ValueError(f"loss {loss_cfg.name!r} with step.reference='model' needs reference params")
        if use_ref_model and global_batch is not None:
            donated = {id(x) for x in jax.tree.leaves(state_or_params)}
            if any(id(x) in donated for x in jax.tree.leaves(ref_params)):
                raise ValueError("reference params share buffers with the train state, which the step donates: "
                                 "pass a copy (simpo_jax.step.copy_params)")
        batch = {k: v for k, v in batch.items() if k in keys}
        return fn(state_or_params, batch, ref_params) if use_ref_model else fn(state_or_params, batch)

    call.jitted = fn  # for .lower(...) / ahead-of-time compilation
    return call


def copy_params(params: Any) -> Any:
    """A copy of (sharded) params with their own buffers, e.g. a frozen reference model."""
    return jax.tree.map(jnp.copy, params)


def random_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0,
                  rules: Rules = DEFAULT_RULES) -> tuple[nnx.GraphDef, Any]:
    """A randomly initialised decoder created directly in its sharded layout (no host copy)."""
    graphdef, init = _sharded_init(cfg, mesh, tuple(rules))
    return graphdef, init(jnp.asarray(seed, jnp.uint32))


def attach_adapters(cfg: ModelConfig, base_params: Any, mesh: Mesh, seed: int = 0,
                    rules: Rules = DEFAULT_RULES) -> tuple[nnx.GraphDef, Any]:
    """`(graphdef, params)` of the LoRA model `cfg` on top of loaded base params: the adapters are created in their
    sharded layout, as `random_params(cfg, mesh, seed)` would create them (B = 0: the model is its base)."""
    graphdef, init = _sharded_init(cfg, mesh, tuple(rules), nnx.LoRAParam)
    return graphdef, nnx.merge_state(init(jnp.asarray(seed, jnp.uint32)), base_params)


@functools.lru_cache(maxsize=16)
def _sharded_init(cfg: ModelConfig, mesh: Mesh, rules: Rules,
                  part: Any = nnx.Param) -> tuple[nnx.GraphDef, Callable]:
    """The graphdef and a compiled `seed -> params` initializer of the `part` of the params (a filter: all of them,
    or the adapters); cached, as compiling it takes seconds on CPU."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0))))
    shardings = _plain(state_shardings(nnx.filter_state(abstract, part), mesh, rules))
    init = jax.jit(lambda seed: nnx.state(Decoder(cfg, nnx.Rngs(params=jax.random.key(seed))), part),
                   out_shardings=shardings)
    return graphdef, init


def train_state_shardings(params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: Rules = DEFAULT_RULES) -> TrainState:
    """Shardings of the train state for `params` (arrays or abstract): the step counter replicated, params and
    optimizer state (of the trainable params: the adapters with LoRA) by their logical axes."""
    opt_state = jax.eval_shape(tx.init, split_trainable(params)[0])
    return TrainState(NamedSharding(mesh, PartitionSpec()), state_shardings(params, mesh, rules),
                      state_shardings(opt_state, mesh, rules))


def init_train_state(params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                     rules: Rules = DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """Wrap sharded params with a sharded optimizer state; returns (state, its shardings)."""
    state_sh = train_state_shardings(params, tx, mesh, rules)
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(split_trainable(p)[0])),
                   in_shardings=(_plain(state_sh.params),), out_shardings=_plain(state_sh), donate_argnums=(0,))
    return init(params), state_sh
