"""Sampling from a trained decoder: a KV-cache sampler and the `python -m simpo_jax.generate` command."""
from simpo_jax.generate.cache import KVCache, cached_forward, init_cache
from simpo_jax.generate.sampler import Completion, Sampler, SamplingParams, filter_logits

__all__ = ["KVCache", "cached_forward", "init_cache", "Completion", "Sampler", "SamplingParams", "filter_logits"]
