"""Errors raised for bad configuration, named by the offending field."""


class ConfigError(ValueError):
    """A configuration field is missing or has an unsupported value; the message names the field."""


def check(ok: bool, section: str, field: str, message: str) -> None:
    """Raise `ConfigError("<section> config field '<field>': <message>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{section} config field {field!r}: {message}")
