"""simpo_jax: SimPO preference optimization for Llama-3 and Mistral in JAX/Flax NNX."""
import glob as _glob
import os as _os

__version__ = "0.1.0"


def _host_has_tpu() -> bool:
    """TPU device files on this host (`/dev/accel*` on v4/v5e, VFIO groups on v5p/v6e); imports nothing heavy."""
    return bool(_glob.glob("/dev/accel[0-9]*") or _glob.glob("/dev/vfio/[0-9]*"))


# With libtpu installed on a host without TPUs (for `simpo_jax.aot`), every JAX process would take libtpu's
# single-process lock while probing for chips, so two concurrent runs would fail; there is no TPU to guard.
if not _host_has_tpu():
    _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
