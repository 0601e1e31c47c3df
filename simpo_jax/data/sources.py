"""Raw preference datasets through Hugging Face `datasets`: Hub names, local files, `save_to_disk` dirs."""
from __future__ import annotations

import os

import datasets

from simpo_jax.data.config import DataConfig
from simpo_jax.errors import check

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def _builder(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    return _BUILDERS.get(os.path.splitext(name)[1])


def load_split(path: str, split: str) -> datasets.Dataset:
    """One split: `path` is a local file, a `save_to_disk` directory, a directory of data files, or a Hub name."""
    if os.path.isfile(path):
        builder = _builder(path)
        check(builder is not None, "data", "path", f"{path}: unsupported file type (json, jsonl, parquet, arrow, "
                                                   "optionally .gz)")
        return datasets.load_dataset(builder, data_files={split: path}, split=split)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
                os.path.join(path, "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                check(split in loaded, "data", "train_split", f"{path} has splits {list(loaded)}, not {split!r}")
                return loaded[split]
            return loaded
        return datasets.load_dataset(path, split=split)
    return datasets.load_dataset(path, split=split)  # a Hub dataset (needs the network)


def load_train_eval(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train split and the held-out split (named, a file, or carved deterministically from train)."""
    check(bool(cfg.path), "data", "path", "no dataset given")
    train = load_split(cfg.path, cfg.train_split)
    if cfg.eval_split:
        if os.path.exists(cfg.eval_split):  # a separate file or directory
            return train, load_split(cfg.eval_split, "eval")
        return train, load_split(cfg.path, cfg.eval_split)
    if cfg.eval_fraction > 0:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None
