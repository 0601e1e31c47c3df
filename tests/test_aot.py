"""TPU slices, pod presets and the ahead-of-time fit check (compiles for a TPU topology where libtpu is installed)."""
import importlib.util
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
            "gemma2-9b": ["gemma2_9b_it"], "gemma2-27b": ["gemma2_27b_it"]}


def test_every_preset_mesh_matches_its_slice():
    _config("tiny")  # puts configs/ on the path
    import pods
    assert set(pods.PRESETS) == set(SETTINGS)
    assert {"v4-32", "v5litepod-64", "v5p-16", "v6e-16"} <= set(pods.PRESETS["llama3-8b"])
    assert {"v5p-128", "v6e-64", "v6e-128"} <= set(pods.PRESETS["llama3-70b"])
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


@needs_libtpu
def test_tiny_step_compiles_for_a_tpu_topology_and_reports_per_chip_memory():
    from simpo_jax.aot import check_fit

    config = _config("tiny")
    config.model.dtype = "bfloat16"
    # Shards of 128 lanes (hidden 512 over 4 chips): hardly any TPU tile padding.
    config.model.hidden_size, config.model.intermediate_size, config.model.num_layers = 512, 1024, 2
    config.model.num_heads, config.model.num_kv_heads = 4, 2
    config.data.max_length, config.data.max_prompt_length, config.data.bucket_lengths = 128, 64, (128,)
    config.step.micro_batches = 2
    report = check_fit(config, parse_slice("v5p:2x2x1"))
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
