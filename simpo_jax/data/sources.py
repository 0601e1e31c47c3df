"""Raw preference datasets through Hugging Face `datasets`: Hub names, local files, `save_to_disk` dirs."""
from __future__ import annotations

import os

import datasets

from simpo_jax.data.config import DataConfig
from simpo_jax.errors import ConfigError, check

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def _builder(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    return _BUILDERS.get(os.path.splitext(name)[1])


def load_split(path: str, split: str, field: str = "data.path") -> datasets.Dataset:
    """One split: `path` is a local file, a `save_to_disk` directory, a directory of data files, or a Hub name.

    A source that cannot be read raises ConfigError naming the config `field` (`<section>.<field>`)."""
    section, name = field.split(".", 1)
    if os.path.isfile(path):
        builder = _builder(path)
        check(builder is not None, section, name, f"{path}: unsupported file type (json, jsonl, parquet, arrow, "
                                                  "optionally .gz)")
        return _load(field, path, builder, data_files={split: path}, split=split)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
                os.path.join(path, "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                check(split in loaded, "data", "train_split", f"{path} has splits {list(loaded)}, not {split!r}")
                return loaded[split]
            return loaded
        return _load(field, path, path, split=split)
    check(not (os.path.isabs(path) or path.startswith(".") or _builder(path)), section, name,
          f"{path}: no such file or directory")
    return _load(field, path, path, split=split)  # a Hub dataset (needs the network)


def _load(field: str, path: str, *args, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset`, with a source it cannot read (missing, unreadable, offline Hub) as ConfigError."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:  # ConnectionError is an OSError
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        section, name = field.split(".", 1)
        raise ConfigError(f"{section} config field {name!r}: cannot read {path} ({type(cause).__name__}: {first})"
                          ) from e


def load_train_eval(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The train split and the held-out split (named, a file, or carved deterministically from train)."""
    check(bool(cfg.path), "data", "path", "no dataset given")
    train = load_split(cfg.path, cfg.train_split)
    # One file has one split: a split name there would hold out the training rows themselves.
    named_split = cfg.eval_split and not (os.path.isfile(cfg.path) and not os.path.exists(cfg.eval_split))
    if named_split:
        if os.path.exists(cfg.eval_split):  # a separate file or directory
            return train, load_split(cfg.eval_split, "eval", "data.eval_split")
        return train, load_split(cfg.path, cfg.eval_split, "data.eval_split")
    check(not cfg.eval_split or cfg.eval_fraction > 0, "data", "eval_split",
          f"{cfg.eval_split!r} is neither a file nor a split of {cfg.path} (a single file has one split): name a "
          "held-out file, set data.eval_fraction to carve one from it, or set data.eval_split to ''")
    if cfg.eval_fraction > 0:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None
