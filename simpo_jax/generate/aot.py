"""`python -m simpo_jax.generate.aot --config configs/<setting>.py[:<slice>] --topology v5p-16 --batch 64
--cache 4096`: compile one decode step for a TPU topology on this host and report its per-chip memory.

As `simpo_jax.aot` does for the train step: libtpu's compile-only devices, abstract (sharded) weights in the
config's dtypes and an abstract KV cache sharded by the training rules (batch over data x fsdp, KV heads over
tensor), donated to the step. Exits 1 when the step does not fit, 2 on a bad config.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from simpo_jax.aot import _abstract, aot_model_config
from simpo_jax.config import build_run_config
from simpo_jax.errors import check
from simpo_jax.generate.cache import CACHE_AXES, KVCache, cached_forward
from simpo_jax.generate.sampler import SamplingParams, next_token, row_keys
from simpo_jax.models.config import ModelConfig
from simpo_jax.models.decoder import abstract_decoder
from simpo_jax.sharding import activation_sharding, batch_sharding, logical_to_spec, state_shardings
from simpo_jax.topology import GiB, Slice, compile_only_devices, parse_slice


@dataclasses.dataclass(frozen=True)
class DecodeFitReport:
    """Per-chip memory of one compiled decode step (batch rows, cache positions) on a slice."""

    slice: Slice
    mesh_shape: dict[str, int]
    model: ModelConfig
    batch: int
    cache_len: int
    weight_bytes: int  # one chip's shards of the weights
    cache_bytes: int  # one chip's shards of the KV cache
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compile_seconds: float
    compiler_error: str = ""  # the TPU compiler's own out-of-memory message (then temps are the ones it quotes)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.total_bytes <= self.slice.generation.hbm_bytes

    def render(self) -> str:
        hbm, gib = self.slice.generation.hbm_bytes, lambda b: f"{b / GiB:8.2f} GiB"
        return "\n".join([
            f"slice        {self.slice.describe()}",
            f"mesh         {' x '.join(f'{k}={v}' for k, v in self.mesh_shape.items())}",
            f"model        {self.model.num_params() / 1e9:.2f}B params, {self.model.num_layers} layers, "
            f"dtype {self.model.dtype}, params {self.model.param_dtype}",
            f"decode step  {self.batch} rows x {self.cache_len} cache positions",
            "per chip:",
            f"  weights    {gib(self.weight_bytes)}",
            f"  KV cache   {gib(self.cache_bytes)}   (donated, updated in place)",
            f"  arguments  {gib(self.argument_bytes)}",
            f"  outputs    {gib(self.output_bytes)}   ({gib(self.alias_bytes).strip()} of them donated in place)",
            f"  temps      {gib(self.temp_bytes)}",
            f"  program    {gib(self.code_bytes)}",
            f"  total      {gib(self.total_bytes)}   of {hbm / GiB:.0f} GiB HBM ({self.total_bytes / hbm:.0%})",
            f"compiled in  {self.compile_seconds:.0f} s",
            "verdict      " + ("FITS" if self.fits else "DOES NOT FIT"),
        ] + ([f"compiler     {self.compiler_error}"] if self.compiler_error else []))


def _shard_bytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def check_decode_fit(config: Any, tpu: Slice, batch: int, cache_len: int, devices: list | None = None,
                     params: SamplingParams = SamplingParams(temperature=1.0, top_p=0.9)) -> DecodeFitReport:
    """Compile one sampled decode step of `batch` rows over a `cache_len`-position cache for `tpu`."""
    check(batch >= 1, "generate", "batch_size", f"must be >= 1, got {batch}")
    check(cache_len >= 1, "generate", "max_new_tokens", f"the cache needs >= 1 position, got {cache_len}")
    rc = build_run_config(config)
    cfg = aot_model_config(rc)
    mesh = rc.mesh.build(devices if devices is not None else compile_only_devices(tpu))
    graphdef, abstract = abstract_decoder(cfg)
    state = _abstract(abstract, state_shardings(abstract, mesh))
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    cache_sh = NamedSharding(mesh, logical_to_spec(CACHE_AXES, shape, mesh))
    cache = KVCache(*(jax.ShapeDtypeStruct(shape, cfg.compute_dtype, sharding=cache_sh) for _ in range(2)))
    rows = batch_sharding(mesh)
    col = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows)  # noqa: E731
    position = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))

    def step(state, cache, tokens, pad, prompt_keys, sample_ids, position):
        with activation_sharding(mesh):
            model = nnx.merge(graphdef, state)
            logits, cache = cached_forward(model, tokens[:, None], pad, position, cache)
            keys = row_keys(params.seed, prompt_keys, sample_ids)
            return next_token(logits, keys, position, params), cache

    args = (state, cache, col(jnp.int32), col(jnp.int32), col(jnp.uint32), col(jnp.uint32), position)
    began = time.perf_counter()
    report = functools.partial(DecodeFitReport, tpu, dict(mesh.shape), cfg, batch, cache_len, _shard_bytes(state),
                               _shard_bytes(cache))
    try:
        compiled = jax.jit(step, donate_argnums=(1,), out_shardings=(rows, cache_sh)).lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
        message = (str(e).splitlines() or [""])[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        temps = re.search(r"temporaries \(([\d.]+)G\)", message)
        return report(_shard_bytes(args), 0, 0, int(float(temps.group(1)) * GiB) if temps else 0, 0,
                      time.perf_counter() - began, message)
    mem = compiled.memory_analysis()
    return report(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                  mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, time.perf_counter() - began)


def prefill_memory(config: Any, tpu: Slice, batch: int, prompt_len: int, cache_len: int,
                   devices: list | None = None) -> Any:
    """Compile the prefill of `batch` prompts of `prompt_len` tokens into a `cache_len` cache for `tpu` (the
    training attention: splash when `model.attention_impl=splash`); returns XLA's memory analysis."""
    from simpo_jax.generate.cache import init_cache

    rc = build_run_config(config)
    cfg = aot_model_config(rc)
    mesh = rc.mesh.build(devices if devices is not None else compile_only_devices(tpu))
    graphdef, abstract = abstract_decoder(cfg)
    state = _abstract(abstract, state_shardings(abstract, mesh))
    rows = batch_sharding(mesh)

    def prefill(state, ids, pad):
        with activation_sharding(mesh):
            model = nnx.merge(graphdef, state)
            cache = init_cache(model, batch, cache_len)
            return cached_forward(model, ids, pad, jnp.int32(0), cache, prefill=True)

    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    pad = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    return jax.jit(prefill).lower(state, ids, pad).compile().memory_analysis()


def main() -> None:
    """The command line."""
    from absl import app, flags

    from simpo_jax.cli import run_command
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py[:<slice>] file.",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-16, v6e-16; default: mesh.slice")
    batch = flags.DEFINE_integer("batch", 64, "Rows decoded together (global).")
    cache = flags.DEFINE_integer("cache", 4096, "KV cache positions (prompt bucket + max_new_tokens).")

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        name = topology.value or config.value.mesh.get("slice", "")
        if not name:
            raise app.UsageError("--topology is required (the config names no mesh.slice)")
        report = check_decode_fit(config.value, parse_slice(name), batch.value, cache.value)
        print(report.render(), flush=True)
        sys.exit(0 if report.fits else 1)

    run_command(_main)


if __name__ == "__main__":
    main()
