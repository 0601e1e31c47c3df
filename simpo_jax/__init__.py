"""simpo_jax: SimPO preference optimization for Llama-3 and Mistral in JAX/Flax NNX."""
import glob as _glob
import os as _os

__version__ = "0.1.0"

_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, AMD ROCm


def host_has_tpu() -> bool:
    """TPU device files on this host (`/dev/accel*` on v4/v5e, VFIO groups on v5p/v6e); imports nothing heavy."""
    return bool(_glob.glob("/dev/accel[0-9]*") or _glob.glob("/dev/vfio/[0-9]*"))


def host_has_gpu() -> bool:
    """GPU device files on this host (the files JAX itself looks for before it starts a GPU backend)."""
    return any(_os.path.exists(path) for path in _GPU_DEVICE_FILES)


if not host_has_tpu():
    # With libtpu installed on a host without TPUs (for `simpo_jax.aot`), every JAX process would take libtpu's
    # single-process lock while probing for chips, so two concurrent runs would fail; there is no TPU to guard.
    _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not host_has_gpu():
        # A CPU host: without this JAX also starts libtpu's TPU backend, which finds no chip and prints start-up
        # errors ("Failed to find host bounds ...", "unexpected worker hostname ...") that read as a failure.
        # `simpo_jax.aot` still compiles for TPU topologies: it loads libtpu by itself. JAX_PLATFORMS wins.
        _os.environ.setdefault("JAX_PLATFORMS", "cpu")
