"""Tuple-valued config fields as users type them on the command line.

`--config.onpolicy.splits=train`, `=train,test`, `=(train,)`, `=('train', 'test')` and `=[train]` all give
`("train",)` / `("train", "test")`; integer fields (`seeds`, `bucket_lengths`, `prompt_buckets`) take the same
forms. ml_collections hands a form it cannot evaluate over as one string, which is split here; what cannot be
read fails with one line naming the field and an example.
"""
from __future__ import annotations

from typing import Any

from simpo_jax.errors import check

# The tuple fields of the typed sections: what their items are, and an example for the error line.
TUPLE_FIELDS = {"splits": ("names", "train,test"), "seeds": ("integers", "13,21,42"),
                "bucket_lengths": ("integers", "512,1024,2048"), "prompt_buckets": ("integers", "256,1024")}


def split_names(value: Any) -> list[str]:
    """The names in `value` (a string or a sequence of strings), split at commas, brackets and quotes removed."""
    items = [value] if isinstance(value, str) else list(value)
    names = []
    for item in items:
        for part in str(item).strip().strip("()[]").split(","):
            name = part.strip().strip("'\"").strip()
            if name:
                names.append(name)
    return names


def tuple_value(value: Any, section: str, field: str, kind: tuple[str, str]) -> tuple:
    """`value` of `<section>.<field>` as a tuple of names or integers; a ConfigError names the field otherwise."""
    items, example = kind
    names = split_names(value)
    hint = f"e.g. --config.{section}.{field}={example}, got {value!r}"
    check(bool(names), section, field, f"needs at least one value, {hint}")
    if items == "names":
        return tuple(names)
    check(all(_is_int(n) for n in names), section, field, f"takes whole numbers, {hint}")
    return tuple(int(n) for n in names)


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()
