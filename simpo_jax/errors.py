"""Errors that a user's input causes (reported by the commands as one line), and the config-field check."""


class UserError(ValueError):
    """Bad input from the user (configuration, data, checkpoint files): the message says what and where."""


class ConfigError(UserError):
    """A configuration field is missing or has an unsupported value; the message names the field."""


def check(ok: bool, section: str, field: str, message: str) -> None:
    """Raise `ConfigError("<section> config field '<field>': <message>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{section} config field {field!r}: {message}")
