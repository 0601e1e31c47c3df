"""TPU slices, pod presets and the ahead-of-time fit check (compiles for a TPU topology where libtpu is installed)."""
import functools
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from simpo_jax.config import build_run_config
from simpo_jax.errors import ConfigError
from simpo_jax.topology import parse_slice
from test_configs import _load

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu)")


def _config(name, arg=""):
    sys.path.insert(0, str(ROOT / "configs"))  # pods.py, imported by the setting configs and by the test below
    return _load(name, *([arg] if arg else []))


@pytest.mark.parametrize("name, chips, topology, hosts", [
    ("v5p-16", 8, "v5p:2x2x2", 2), ("v4-32", 16, "v4:2x2x4", 4), ("v5litepod-64", 64, "v5e:8x8", 16),
    ("v5e-8", 8, "v5e:2x4", 1), ("v6e-16", 16, "v6e:4x4", 4), ("v6e-64", 64, "v6e:8x8", 16),
    ("v5p-128", 64, "v5p:4x4x4", 16), ("v5p:2x2x1", 4, "v5p:2x2x1", 1), ("2xv5p-16", 16, "v5p:2x2x2", 4),
])
def test_slice_names(name, chips, topology, hosts):
    tpu = parse_slice(name)
    assert (tpu.chips, tpu.topology_name, tpu.hosts) == (chips, topology, hosts)
    assert parse_slice(tpu.accelerator_type).shape == tpu.shape


@pytest.mark.parametrize("name, message", [("v5p-15", "two per chip"), ("v5p:2x2", "3 ICI dimensions"),
                                           ("a100", "accelerator type such as"), ("v6e-24", "power of two")])
def test_bad_slice_names(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_slice(name)


SETTINGS = {"llama3-8b": ["llama3_8b_instruct", "llama3_8b_base", "llama3_8b_instruct_dpo"],
            "mistral-7b": ["mistral_7b_instruct", "mistral_7b_base"], "llama3-70b": ["llama3_70b_instruct"],
            "gemma2-9b": ["gemma2_9b_it"], "gemma2-27b": ["gemma2_27b_it"],
            "llama3-8b-lora": ["llama3_8b_instruct_lora"], "llama3-70b-lora": ["llama3_70b_instruct_lora"]}


def test_every_preset_mesh_matches_its_slice():
    _config("tiny")  # puts configs/ on the path
    import pods
    assert set(pods.PRESETS) == set(SETTINGS)
    assert {"v4-32", "v5litepod-64", "v5p-16", "v6e-16"} <= set(pods.PRESETS["llama3-8b"])
    assert {"v5p-128", "v6e-64", "v6e-128"} <= set(pods.PRESETS["llama3-70b"])
    assert {"v5p-16", "v6e-16"} <= set(pods.PRESETS["llama3-70b-lora"])
    assert {"v5litepod-8", "v6e-8"} <= set(pods.PRESETS["llama3-8b-lora"])
    assert all(parse_slice(s).hosts == 1 for s in pods.PRESETS["llama3-8b-lora"])  # one v5e / v6e host
    for family, slices in pods.PRESETS.items():
        for slice_name in slices:
            for setting in SETTINGS[family]:
                rc = build_run_config(_config(setting, slice_name))
                chips = parse_slice(slice_name).chips
                assert rc.mesh.slice == slice_name and rc.model["attention_impl"] == "splash"
                assert math.prod(rc.mesh.ici_shape(chips)) * rc.mesh.dcn_data * rc.mesh.dcn_fsdp == chips
                assert rc.mesh.fsdp * rc.mesh.tensor * rc.mesh.data == chips, (setting, slice_name)
                assert rc.run["train"]["batch_size"] % (rc.mesh.data * rc.mesh.fsdp * rc.step.micro_batches) == 0
    with pytest.raises(ValueError, match="no llama3-70b preset for slice 'v5p-16'"):
        _config("llama3_70b_instruct", "v5p-16")


def test_without_libtpu_the_command_says_how_to_get_it(monkeypatch):
    from simpo_jax.topology import compile_only_devices

    monkeypatch.setitem(sys.modules, "libtpu", None)
    with pytest.raises(SystemExit, match="pip install libtpu"):
        compile_only_devices(parse_slice("v5p-8"))


def _expected_argument_bytes(tree):
    """Bytes of one device's shards of every argument, from the params' shapes and the mesh alone."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dims = [size // (4 if "fsdp" in str(axis) else 1) for size, axis in
                zip(leaf.shape, tuple(leaf.sharding.spec) + (None,) * len(leaf.shape))]
        total += math.prod(dims) * leaf.dtype.itemsize
    return total


def _tiny_tpu_config(loss="simpo", lora_rank=0):
    config = _config("tiny")
    config.model.dtype = "bfloat16"
    # Shards of 128 lanes (hidden 512 over 4 chips): hardly any TPU tile padding.
    config.model.hidden_size, config.model.intermediate_size, config.model.num_layers = 512, 1024, 2
    config.model.num_heads, config.model.num_kv_heads = 4, 2
    config.data.max_length, config.data.max_prompt_length, config.data.bucket_lengths = 128, 64, (128,)
    config.step.micro_batches = 2
    config.loss.name = loss
    if loss == "dpo":
        config.loss.gamma_beta_ratio = None
    config.model.lora.rank = lora_rank
    return config


@functools.lru_cache(maxsize=None)
def _tiny_report(loss="simpo", lora_rank=0):
    """The tiny step compiled for v5p:2x2x1 (cached: several tests read one compile)."""
    from simpo_jax.aot import check_fit

    return check_fit(_tiny_tpu_config(loss, lora_rank), parse_slice("v5p:2x2x1"))


@needs_libtpu
def test_tiny_step_compiles_for_a_tpu_topology_and_reports_per_chip_memory():
    report = _tiny_report()
    assert report.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1} and report.fits
    # Arguments: one chip's shards of the train state (fp32 params, two Adam moments, counters) and of the
    # batch, as the shardings say; TPU layouts pad the few tiny arrays (norms, counters) to (8, 128) tiles.
    state, arguments = _expected_argument_bytes(report.arguments[0]), _expected_argument_bytes(report.arguments)
    assert arguments <= report.argument_bytes <= 1.02 * arguments
    assert state <= report.alias_bytes <= 1.02 * state  # the whole state is donated
    assert report.temp_bytes > 0 and report.total_bytes < report.hbm_bytes
    # Model FLOPs: 3 x (2 x matmul weights x tokens + attention), weights counted from the abstract params.
    params = jax.tree_util.tree_leaves_with_path(report.arguments[0].params)
    matmul = sum(math.prod(p.shape) for path, p in params if "norm" not in jax.tree_util.keystr(path)) - 512 * 512
    tokens, seq, layers, heads, head_dim = 2 * 32 * 128, 128, 2, 4, 32  # the tiny preset's head_dim
    assert report.model_flops == pytest.approx(3 * (2 * matmul * tokens + 4 * layers * tokens * seq * heads * head_dim))
    assert "FITS" in report.render()


@needs_libtpu
def test_a_lora_step_keeps_optimizer_state_for_the_adapters_alone():
    """The tiny step with rank-8 LoRA: its arguments shrink from full fine-tuning's by the base's two fp32 AdamW
    moments (8 bytes a parameter, sharded over 4 chips) less the adapters with their own moments; the report
    names the adapters, and the FLOPs count no weight gradients for the base."""
    from simpo_jax.flops import lora_params, matmul_params

    full, lora = _tiny_report(), _tiny_report(lora_rank=8)
    cfg = lora.model
    assert cfg.lora.rank == 8 and full.model.lora is None and lora.fits
    # The optimizer state holds the adapters' shapes only (two moments of each adapter, plus counters).
    moments = sum(math.prod(x.shape) for x in jax.tree.leaves(lora.arguments[0].opt_state) if x.ndim)
    assert moments == 2 * lora_params(cfg)
    adapters = [x for path, x in jax.tree_util.tree_leaves_with_path(lora.arguments[0].params)
                if "lora" in jax.tree_util.keystr(path)]
    # 2 layers x rank 8 x (in + out): q and o 512 + 4 x 32, k and v 512 + 2 x 32, gate, up and down 512 + 1024.
    q, kv, mlp = 512 + 128, 512 + 64, 512 + 1024
    assert sum(math.prod(x.shape) for x in adapters) == lora_params(cfg) == 2 * 8 * (2 * q + 2 * kv + 3 * mlp)
    adapter_state = 3 * _expected_argument_bytes(adapters)  # per chip: adapters and their two moments (fp32)
    base_moments = 2 * 4 * cfg.num_params() / 4
    shrink = full.argument_bytes - lora.argument_bytes  # (the same fp32 base in both)
    # TPU layouts pad the adapters' narrow (rank 8) arrays: they take up to half as much again (here 25%).
    assert base_moments - 1.5 * adapter_state < shrink <= base_moments - adapter_state + 0.01 * base_moments, (
        shrink, base_moments, adapter_state)  # with the base's moments kept, it would shrink by nothing at all
    assert f"LoRA rank 8 (alpha 8, 7 projections): {lora_params(cfg) / 1e6:.1f}M trainable" in lora.render()
    tokens, attention = 2 * 32 * 128, 3 * 4 * 2 * (2 * 32 * 128) * 128 * 4 * 32
    nt, nt_lora = matmul_params(cfg) * tokens, lora_params(cfg) * tokens  # N·T of the base and the adapters
    assert lora.model_flops == pytest.approx(4 * nt + attention + 6 * nt_lora)  # no weight gradients of the base
    assert full.model_flops == pytest.approx(6 * nt + attention)


@needs_libtpu
def test_a_lora_dpo_step_takes_no_reference_params():
    """DPO with LoRA: the reference is the base with the adapters off, so the step's arguments are the train
    state and batch alone, as for SimPO (no reference copy of the weights, no reference log-prob columns)."""
    dpo, simpo = _tiny_report("dpo", 8), _tiny_report(lora_rank=8)
    assert len(dpo.arguments) == 2 and dpo.fits
    assert set(dpo.arguments[1]) == set(simpo.arguments[1])
    assert dpo.argument_bytes == simpo.argument_bytes
    # One reference forward of the base on top of the LoRA step.
    from simpo_jax.flops import forward_flops

    assert dpo.model_flops == pytest.approx(simpo.model_flops + forward_flops(dpo.model, 2 * 32 * 128, 128))


@needs_libtpu
def test_a_lora_dpo_step_going_on_from_an_adapter_takes_the_initial_adapters_as_reference(tmp_path):
    """DPO continuing a PEFT adapter (model.lora.adapter_path): the reference is the base with the initial adapters
    (as training passes it), so the one extra argument has the adapters' shapes, not the base's."""
    from simpo_jax.aot import check_fit
    from simpo_jax.models.config import LORA_TARGETS
    from simpo_jax.models.lora import split_trainable

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": list(LORA_TARGETS)}))
    config = _tiny_tpu_config("dpo")
    config.model.lora.adapter_path = str(tmp_path)
    report = check_fit(config, parse_slice("v5p:2x2x1"))
    assert report.fits and report.model.lora.rank == 8 and len(report.arguments) == 3
    shapes = functools.partial(jax.tree.map, lambda x: (x.shape, x.dtype))
    assert shapes(report.arguments[2]) == shapes(split_trainable(report.arguments[0].params)[0])


def test_lora_params_count_the_adapters_of_the_decoder():
    from simpo_jax.flops import lora_params
    from simpo_jax.models.config import LoraConfig
    from simpo_jax.models.decoder import abstract_decoder
    from simpo_jax.models.presets import preset

    cfg = preset("tiny", lora=LoraConfig(rank=4, targets=("q_proj", "o_proj", "down_proj")))
    _, params = abstract_decoder(cfg)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    adapters = sum(math.prod(x.shape) for path, x in leaves if "lora" in jax.tree_util.keystr(path))
    assert lora_params(cfg) == adapters > 0
    assert lora_params(preset("tiny")) == 0
    # Llama-3-70B, rank 16 on all seven projections: 80 layers x 16 x (2 x (8192 + 8192) + 2 x (8192 + 1024)
    # + 3 x (8192 + 28672)).
    assert lora_params(preset("llama3-70b", lora=LoraConfig(rank=16))) == 207_093_760


def test_the_hf_config_path_keeps_lora(tmp_path):
    """A config naming only model.hf_path: the fit check's model carries the adapters too."""
    from simpo_jax.aot import aot_model_config
    from simpo_jax.models.config import to_hf_dict
    from simpo_jax.models.presets import preset

    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(preset("tiny"))))
    config = _config("tiny")
    config.model.preset, config.model.hf_path, config.model.lora.rank = "", str(tmp_path), 4
    cfg = aot_model_config(build_run_config(config))
    assert cfg.lora is not None and cfg.lora.rank == 4 and cfg.hidden_size == preset("tiny").hidden_size
    assert cfg.remat_policy == "none"  # the section's runtime options still apply


@needs_libtpu
def test_a_step_that_does_not_fit_exits_one_naming_the_shortfall(tmp_path):
    # ~2.8B parameters with fp32 Adam state on one 16 GiB v5e chip cannot fit.
    overrides = ["--config.model.hidden_size=4096", "--config.model.intermediate_size=14336",
                 "--config.model.num_layers=8", "--config.model.num_heads=32", "--config.model.num_kv_heads=8",
                 "--config.model.vocab_size=128256", "--config.train.batch_size=4"]
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.aot", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--topology", "v5litepod-1", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DOES NOT FIT" in proc.stdout and "v5litepod-1 (v5e:1x1, 1 chips, 16 GiB HBM per chip)" in proc.stdout
    assert "compiler     RESOURCE_EXHAUSTED" in proc.stdout  # XLA's own out-of-memory verdict, quoted


def test_bad_topology_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "simpo_jax.aot", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--topology", "v9-8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "topology 'v9-8'" in proc.stderr


def test_a_preset_that_disagrees_with_the_loaded_checkpoint_is_named():
    from simpo_jax.build import _check_preset_shape
    from simpo_jax.models.presets import preset

    _check_preset_shape("mistral-7b-v0.2", preset("mistral-7b-v0.2", dtype="float32"))  # runtime options may differ
    with pytest.raises(ConfigError, match=r"model config field 'preset'.*vocab_size: 32768 \(preset 32000\)"):
        _check_preset_shape("mistral-7b-v0.2", preset("mistral-7b-v0.3"))


@needs_libtpu
def test_a_tpu_compile_on_a_cpu_host_traces_the_tpu_attention_path():
    """The CPU-only blocked attention is chosen by the platform compiled for, not by this host's backend."""
    from simpo_jax.models.layers import use_blocked_attention
    from simpo_jax.sharding import activation_sharding, make_mesh
    from simpo_jax.topology import compile_only_devices

    assert jax.default_backend() == "cpu" and use_blocked_attention()
    with activation_sharding(make_mesh({"fsdp": 4}, compile_only_devices(parse_slice("v5p:2x2x1")))):
        assert not use_blocked_attention()
    with activation_sharding(make_mesh({"fsdp": 1}, jax.devices()[:1])):
        assert use_blocked_attention()


@needs_libtpu
def test_splash_attention_compiles_for_tpu_without_the_score_tensors():
    """`model.attention_impl=splash` compiles the Pallas kernel for the TPU; the one-block XLA attention keeps
    `[batch, heads, len, len]` float32 scores, the kernel does not, so the step's temporaries shrink."""
    from simpo_jax.aot import check_fit

    temps = {}
    for impl in ("xla", "splash"):
        config = _config("tiny")
        config.model.dtype, config.model.attention_impl = "bfloat16", impl
        config.model.hidden_size, config.model.num_heads, config.model.num_kv_heads = 512, 4, 2
        config.data.max_length, config.data.max_prompt_length, config.data.bucket_lengths = 1024, 64, (1024,)
        report = check_fit(config, parse_slice("v5p:2x2x1"))
        assert report.fits
        temps[impl] = report.temp_bytes
    # One micro-batch's float32 scores on a chip: 16 sequences x 4 heads x 1024 x 1024 x 4 bytes = 256 MiB.
    assert temps["xla"] - temps["splash"] > 256 * 2 ** 20, temps
