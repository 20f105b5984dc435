"""The one exception type that reaches the user as a single line (see cli.main)."""


class UserError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""


def names(items) -> str:
    """Column or field names for a one-line message: quoted, so a name holding a newline or a comma stays legible."""
    return ", ".join(repr(str(item)) for item in items)
