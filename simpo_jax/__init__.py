"""simpo_jax: SimPO preference optimization for Llama-3 and Mistral in JAX/Flax NNX."""

__version__ = "0.1.0"
