"""The on-policy output directory: the manifest, shard files written atomically, and what process 0 shares.

Layout of `<output>`: `onpolicy.json` (the settings and prompts the samples and scores were made from),
`samples/<split>/shard-NNNNN.jsonl` (one line per prompt: its samples), `scored/<split>/shard-NNNNN.jsonl` (the
same with scores), `<split>.jsonl` (the preference rows) and `summary.jsonl` (one line per split). Every file
appears whole or not at all (written beside and renamed), so a killed run leaves finished shards and nothing
half-written that counts. Process 0 reads and writes; `from_main` hands what it read, or the one-line error
it raised, to every process, so that all of them go on, or stop with the same message, together.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax

from simpo_jax.distributed import broadcast_text
from simpo_jax.errors import ConfigError, UserError

MANIFEST = "onpolicy.json"
TEMPORARY = ".tmp-"


def shard_path(output: str, kind: str, split: str, index: int) -> str:
    """`<output>/<kind>/<split>/shard-NNNNN.jsonl` (kind: samples or scored)."""
    return os.path.join(output, kind, split, f"shard-{index:05d}.jsonl")


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file beside it, then a rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f"{TEMPORARY}{os.getpid()}-{os.path.basename(path)}")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_lines(path: str, rows: list[dict]) -> None:
    """Write JSON lines to `path` atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows))


def read_lines(path: str) -> list[dict]:
    """The JSON lines of a file written by `write_lines` (a damaged one is a UserError naming it)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e}); delete it to redo that shard") from e


def remove_partial_files(output: str) -> None:
    """Delete the temporary files a killed run left behind (whatever it was writing when it died)."""
    for root, _, names in os.walk(output):
        for name in names:
            if name.startswith(TEMPORARY):
                os.remove(os.path.join(root, name))


def check_manifest(output: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest merged with `settings` (keys `<section>:<field>`); a recorded setting that differs is an error.

    A setting of None is not compared (the reward model of a sampling-only run); keys `prompts:<split>` hold
    fingerprints of the prompts, which differ when the source, the template or the tokenizer changed."""
    path = os.path.join(output, MANIFEST)
    recorded = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    for key, value in settings.items():
        if key not in recorded or recorded[key] == value or value is None:
            continue
        section, name = key.split(":", 1)
        if section == "prompts":
            raise UserError(f"the prompts of split {name!r} are not those {output} was built from (the prompt source, "
                            "the chat template, generate.prompt_rendering or the tokenizer changed): use another "
                            "--output")
        raise ConfigError(f"{section} config field {name!r}: {output} holds on-policy data made with "
                          f"{recorded[key]!r}, this run asks for {value!r} (use another --output, or the same setting)")
    return {**recorded, **{k: v for k, v in settings.items() if v is not None}}


def write_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write `<output>/onpolicy.json` atomically."""
    write_atomic(os.path.join(output, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def from_main(work: Callable[[], Any]) -> Any:
    """`work()` run on process 0, its JSON result (or the error it raised) on every process.

    Any error on process 0 reaches the others (a UserError as itself, anything else as a UserError naming it),
    so that no process waits in a collective for one that has stopped; process 0 re-raises its own."""
    if jax.process_count() == 1:
        return work()
    outcome, error = "", None
    if jax.process_index() == 0:
        try:
            outcome = json.dumps({"value": work()})
        except Exception as e:  # noqa: BLE001 -- every process must hear of it
            error = e
            outcome = json.dumps({"error": str(e) if isinstance(e, UserError) else
                                  f"process 0 failed ({type(e).__name__}: {e}); see its log",
                                  "config": isinstance(e, ConfigError)})
    result = json.loads(broadcast_text(outcome))
    if error is not None:
        raise error
    if "error" in result:
        raise (ConfigError if result["config"] else UserError)(result["error"])
    return result["value"]


def together(work: Callable[[], Any]) -> Any:
    """`work()` on every process; a UserError on any of them stops all of them (each with its message, the
    others with a pointer to it), instead of leaving the rest waiting in the next collective."""
    from simpo_jax.distributed import any_process

    try:
        value, error = work(), None
    except UserError as e:
        value, error = None, e
    if any_process(error is not None):
        raise error if error is not None else UserError("another process stopped with an error (see its log)")
    return value
