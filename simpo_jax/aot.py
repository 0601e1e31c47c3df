"""`python -m simpo_jax.aot --config configs/<setting>.py[:<slice>] --topology v5p-16`: will it fit?

Compiles the real train step for a TPU topology on this host (libtpu, no TPU, no weights: the train state
and batch are abstract, sharded as in training) and prints per-chip memory against the chip's HBM, the
analytic model FLOPs per step and a verdict. Exits 1 when the step does not fit, 2 on a bad config.

With LoRA (`model.lora.rank`) the train state holds the frozen base (in `model.param_dtype`) and the adapters,
with optimizer state for the adapters only; a DPO-style loss's reference is the base with the adapters off, so
no second copy of the weights is an argument.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from simpo_jax.build import reference_options
from simpo_jax.config import MODEL_RUNTIME, RunConfig, build_run_config, model_config
from simpo_jax.data.packing import max_rows
from simpo_jax.errors import ConfigError
from simpo_jax.flops import formula, lora_params, train_step_flops
from simpo_jax.models.config import ModelConfig
from simpo_jax.models.decoder import abstract_decoder
from simpo_jax.models.lora import split_trainable
from simpo_jax.optim import make_optimizer
from simpo_jax.sharding import data_parallel_size
from simpo_jax.step import BATCH_KEYS, PACKED_BATCH_KEYS, REFERENCE_KEYS, TrainState, make_steps, train_state_shardings
from simpo_jax.topology import GiB, Slice, compile_only_devices, parse_slice


TIGHT_SHARE = 0.9
TIGHT = (", but tight: the runtime and fragmentation need some headroom beyond the compiler's count; "
         "prefer more step.micro_batches or a larger slice")


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Per-chip memory of the compiled train step on a slice, and the step's model FLOPs."""

    slice: Slice
    mesh_shape: dict[str, int]
    model: ModelConfig
    batch_pairs: int
    seq_len: int
    micro_batches: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    model_flops: float
    compile_seconds: float
    arguments: tuple = dataclasses.field(default=(), repr=False, compare=False)  # the abstract step arguments
    compiler_error: str = ""  # the TPU compiler's out-of-memory message, when it refused the step
    packed_rows: int = 0  # data.packing: rows of seq_len per step (0: padded chosen and rejected rows)

    @property
    def total_bytes(self) -> int:
        """Peak per-chip footprint: live arguments, non-donated outputs, temporaries and the program."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def hbm_bytes(self) -> int:
        return self.slice.generation.hbm_bytes

    @property
    def share(self) -> float:
        """The per-chip total as a fraction of HBM."""
        return self.total_bytes / self.hbm_bytes

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.total_bytes <= self.hbm_bytes

    def markdown_row(self, config_name: str) -> str:
        """One row of the README's preset table."""
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items() if v > 1) or "1 device"
        return (f"| `{config_name}` | {self.slice.accelerator_type} ({self.slice.chips} chips) | {mesh} | "
                f"{self.model.remat_policy} | {self.micro_batches} | {self.total_bytes / GiB:.1f} GiB | "
                f"{self.hbm_bytes / GiB:.0f} GiB | {self.share:.0%} | "
                f"{('tight fit' if self.share > TIGHT_SHARE else 'fits') if self.fits else 'does not fit'} |")

    def render(self) -> str:
        g, gib, share = self.slice.generation, lambda b: f"{b / GiB:8.2f} GiB", self.share
        ideal = self.model_flops / (self.slice.chips * g.peak_bf16_flops)
        lora = self.model.lora
        adapters = (f", LoRA rank {lora.rank} (alpha {lora.alpha:g}, {len(lora.targets)} projections): "
                    f"{lora_params(self.model) / 1e6:.1f}M trainable params" if lora else "")
        lines = [
            f"slice        {self.slice.describe()}",
            f"mesh         {' x '.join(f'{k}={v}' for k, v in self.mesh_shape.items())}",
            f"model        {self.model.num_params() / 1e9:.2f}B params, {self.model.num_layers} layers, "
            f"dtype {self.model.dtype}, params {self.model.param_dtype}, remat {self.model.remat_policy}{adapters}",
            (f"batch        {self.batch_pairs} pairs packed into {self.packed_rows} rows x {self.seq_len} tokens "
             f"({self.packed_rows * self.seq_len:,} positions), {self.micro_batches} micro-batch(es)"
             if self.packed_rows else
             f"batch        {self.batch_pairs} pairs x {self.seq_len} tokens (chosen + rejected: "
             f"{2 * self.batch_pairs * self.seq_len:,} tokens), {self.micro_batches} micro-batch(es)"),
            "per chip:",
            f"  arguments  {gib(self.argument_bytes)}   (train state and batch shards)",
            f"  outputs    {gib(self.output_bytes)}   ({gib(self.alias_bytes).strip()} of them donated in place)",
            f"  temps      {gib(self.temp_bytes)}",
            f"  program    {gib(self.code_bytes)}",
            f"  total      {gib(self.total_bytes)}   of {g.hbm_bytes / GiB:.0f} GiB HBM ({share:.0%})",
            f"model FLOPs  {self.model_flops:.3e} per step ({formula(self.model)}); at {g.peak_bf16_flops / 1e12:.0f} "
            f"TFLOP/s bf16 per chip: {ideal:.2f} s per step at 100% MFU, {ideal / 0.5:.2f} s at 50%",
            f"compiled in  {self.compile_seconds:.0f} s",
            "verdict      " + (f"FITS ({share:.0%} of HBM)" + (TIGHT if share > TIGHT_SHARE else "") if self.fits else
                               f"DOES NOT FIT: {self.total_bytes / GiB:.2f} GiB > {g.hbm_bytes / GiB:.0f} GiB; "
                               "raise step.micro_batches, use model.remat_policy=full, or a larger slice"),
        ]
        if self.compiler_error:
            lines.insert(-1, f"compiler     {self.compiler_error}")
        return "\n".join(lines)


def aot_model_config(rc: RunConfig) -> ModelConfig:
    """The model's shape without loading weights: `model.preset` / explicit shape, else the HF config.json (with
    the section's runtime options and LoRA adapters)."""
    if rc.model.get("preset") or rc.model.get("hidden_size") is not None:
        return model_config(rc.model)
    from simpo_jax.models.hf_import import read_hf_config

    runtime = {k: v for k, v in rc.model.items() if k in MODEL_RUNTIME and v is not None}
    return read_hf_config(rc.model["hf_path"], **runtime).replace(lora=rc.model.get("lora"))


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (no memory)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def check_fit(config: Any, tpu: Slice, devices: list | None = None, packed_rows: int = 0) -> FitReport:
    """Compile the configured train step for `tpu` (devices: libtpu's compile-only devices by default).

    With `data.packing`, for `packed_rows` rows per step (default: the most a step can have)."""
    rc = build_run_config(config)
    cfg = aot_model_config(rc)
    devices = devices if devices is not None else compile_only_devices(tpu)
    mesh = rc.mesh.build(devices)
    batch = int(rc.run["train"]["batch_size"])
    seq = int(rc.data.max_length)
    tx, schedule = make_optimizer(rc.optimizer, 1000)
    graphdef, params = abstract_decoder(cfg)  # with LoRA: the base and the adapters
    state_sh = train_state_shardings(params, tx, mesh)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh.step),
                       _abstract(params, state_sh.params),  # the optimizer's state: of the adapters only with LoRA
                       _abstract(jax.eval_shape(tx.init, split_trainable(params)[0]), state_sh.opt_state))
    reference = reference_options(rc, cfg)  # as in training (simpo_jax/build.py)
    steps = make_steps(graphdef, cfg, rc.loss, rc.step, tx, schedule, mesh, state_sh, batch, **reference)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=steps.batch_sharding)
    args: list[Any] = [state, {k: ids for k in BATCH_KEYS}]
    rows = 0
    if packed_rows and not rc.data.packing:
        raise ConfigError("--packed_rows: the step is not packed (set --config.data.packing=True)")
    if rc.data.packing:
        groups = data_parallel_size(mesh) * rc.step.micro_batches
        seq = rc.data.row_length
        rows = packed_rows or groups * max_rows(2 * batch // groups, seq // rc.data.max_length)
        if rows < 0 or rows % groups:
            raise ConfigError(f"--packed_rows: {rows} rows do not split over data-parallel size "
                              f"{data_parallel_size(mesh)} x micro_batches {rc.step.micro_batches}")
        packed = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=steps.batch_sharding)
        args[1] = {k: packed for k in PACKED_BATCH_KEYS[:-1]}
        args[1]["index"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=steps.batch_sharding)
    ref_forwards = 0
    if rc.loss.needs_reference:
        if rc.step.reference == "model":
            trainable, frozen = split_trainable(params)
            if reference["reference_adapters"]:
                args.append(trainable)
            elif reference["separate_reference"]:  # a LoRA run's separate reference is a plain model: the base's shapes
                args.append(frozen or params)
            ref_forwards = 1
        else:
            col = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=steps.batch_sharding)
            args[1] |= {k: col for k in REFERENCE_KEYS}
    flops = train_step_flops(cfg, (rows or 2 * batch) * seq, seq, ref_forwards)
    began = time.perf_counter()
    report = functools.partial(FitReport, tpu, dict(mesh.shape), cfg, batch, seq, rc.step.micro_batches,
                               packed_rows=rows)
    try:
        compiled = steps.train.jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
        message = str(e).splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        temps = re.search(r"temporaries \(([\d.]+)G\)", message)
        return report(_shard_bytes(args), 0, 0, int(float(temps.group(1)) * GiB) if temps else 0, 0, flops,
                      time.perf_counter() - began, tuple(args), message)
    mem = compiled.memory_analysis()
    return report(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                  mem.temp_size_in_bytes, mem.generated_code_size_in_bytes, flops, time.perf_counter() - began,
                  tuple(args))


def _shard_bytes(tree: Any) -> int:
    """Bytes of one device's shards of abstract arrays (before TPU layout padding)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    """The command line."""
    from absl import app, flags

    from simpo_jax.cli import run_command
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A configs/<setting>.py[:<slice>] file.",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", None, "TPU slice: v5p-16, v5litepod-64, v6e-16, v4-32, v5p:2x2x2, "
                                   "2xv5p-16 (two slices); default: the config's mesh.slice")
    num_slices = flags.DEFINE_integer("num_slices", 1, "Identical slices joined over DCN (multi-slice).")
    markdown = flags.DEFINE_bool("markdown", False, "Also print the result as a Markdown table row.")
    packed_rows = flags.DEFINE_integer("packed_rows", 0, "With data.packing: rows per step (default: the most a "
                                       "step can have).")

    def _main(argv: list[str]) -> None:
        del argv
        if config.value is None:
            raise app.UsageError("--config configs/<setting>.py is required")
        name = topology.value or config.value.mesh.get("slice", "")
        if not name:
            raise app.UsageError("--topology is required (the config names no mesh.slice)")
        report = check_fit(config.value, parse_slice(name, num_slices.value), packed_rows=packed_rows.value)
        print(report.render(), flush=True)
        if markdown.value:
            print(report.markdown_row(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))),
                  flush=True)
        sys.exit(0 if report.fits else 1)

    run_command(_main)


if __name__ == "__main__":
    main()
