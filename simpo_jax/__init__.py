"""simpo_jax: SimPO preference optimization for Llama-3 and Mistral in JAX/Flax NNX."""
import os as _os

__version__ = "0.1.0"


def _host_has_tpu() -> bool:
    """TPU chips on this host's PCI bus (JAX's own test), or its device files."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return _os.path.exists("/dev/accel0") or _os.path.exists("/dev/vfio/0")


# With libtpu installed on a host without TPUs (for `simpo_jax.aot`), every JAX process would take libtpu's
# single-process lock while probing for chips, so two concurrent runs would fail; there is no TPU to guard.
if not _host_has_tpu():
    _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
