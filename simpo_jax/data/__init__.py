"""Preference data: sources, row formats, the official tokenization rules, and global batches."""
from simpo_jax.data.batches import BatchIterator, pack_batch, pad_batch
from simpo_jax.data.config import DataConfig
from simpo_jax.data.pipeline import DataError, load_tokenizer, tokenize_dataset, with_pad_fallback
from simpo_jax.data.sources import load_split, load_train_eval

__all__ = ["BatchIterator", "DataConfig", "DataError", "load_split", "load_tokenizer", "load_train_eval",
           "pack_batch", "pad_batch", "tokenize_dataset", "with_pad_fallback"]
