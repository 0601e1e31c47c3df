"""What the commands share: flags parsed and user mistakes reported as one line (`error: ...`, exit status 2).

A user's mistake (a bad config value or field, a missing data source or model, a bad row in strict mode, a
damaged checkpoint file) is a ConfigError, DataError or CheckpointError: printed as one line, no traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags

from simpo_jax.errors import UserError

BAD_CONFIG_EXIT = 2


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with status 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(BAD_CONFIG_EXIT)


def _unknown_field(error: LookupError | AttributeError, argv: list[str]) -> str:
    """`--config.loss.betta=1` names no field: say which argument, and ml_collections' suggestion."""
    text = str(error.args[0]) if error.args else str(error)
    text = text.encode().decode("unicode_escape") if "\\n" in text else text
    key = re.search(r"'([^']+)'", text)
    name = key.group(1) if key else "?"
    hint = re.search(r'Did you mean "([^"]+)"', text)
    given = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                  and name in a.split("=", 1)[0][len("--config."):].split(".")), None)
    where = f" in {given}" if given else ""
    return f"unknown config field {name!r}{where}" + (f' (did you mean "{hint.group(1)}"?)' if hint else "")


def _config_file(argv: list[str]) -> str | None:
    """The file named by `--config file.py[:arg]` (`--config=...` too), or None."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
        if arg.startswith("--config="):
            return arg[len("--config="):].split(":", 1)[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags, bad override values and unknown config fields as one line."""
    config_file = _config_file(argv)
    if config_file is not None and not os.path.isfile(config_file):
        fail(f"--config {config_file}: no such file")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if "Traceback (most recent call last)" in message:  # the config file itself raised: keep its last line
            head, _, trace = message.partition("Traceback (most recent call last)")
            message = head + trace.strip().splitlines()[-1]
        fail(message)
    except (KeyError, AttributeError) as e:  # raised by ml_collections for `--config.<unknown field>=...`
        fail(_unknown_field(e, argv))


def run_command(body: Callable[[list[str]], None]) -> None:
    """`absl.app.run(body)`, with user errors (flags, config, data, checkpoints) as one line and exit status 2."""
    def guarded(argv: list[str]) -> None:
        try:
            body(argv)
        except UserError as e:
            fail(str(e))
        except app.UsageError as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)
